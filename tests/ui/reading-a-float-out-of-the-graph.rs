use candle_higher::{differentiable_optimizer, Result, State, Tensor};

#[differentiable_optimizer]
pub struct Sgd {
    pub lr: f64,
}

#[differentiable_optimizer]
impl Sgd {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let scale = grad.sqr()?.sum_all()?.to_scalar_f64()?;
        p.sub_(&grad.mul(self.lr / scale)?)?;
        Ok(())
    }
}

fn main() {}
