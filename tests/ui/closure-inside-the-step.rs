use candle_higher::{differentiable_optimizer, Result, State, Tensor};

#[differentiable_optimizer]
pub struct Sgd {
    pub lr: f64,
}

#[differentiable_optimizer]
impl Sgd {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let scaled = |t: &Tensor| t.mul(self.lr);
        p.sub_(&scaled(grad)?)?;
        Ok(())
    }
}

fn main() {}
