use candle_higher::{differentiable_optimizer, Result, State, Tensor};

#[differentiable_optimizer]
pub struct Sgd {
    pub lr: f64,
}

#[differentiable_optimizer]
impl Sgd {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        grad.add_(1.0)?;
        self.lr = 0.1;
        let v = p.detach();
        p.sub_(&v.mul(self.lr)?)?;
        Ok(())
    }
}

fn main() {}
