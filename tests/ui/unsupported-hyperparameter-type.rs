use candle_higher::{differentiable_optimizer, Result, State, Tensor};

#[differentiable_optimizer]
pub struct Sgd {
    pub lr: f64,
    pub schedule: Vec<f64>,
}

#[differentiable_optimizer]
impl Sgd {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        p.sub_(&grad.mul(self.lr)?)?;
        Ok(())
    }
}

fn main() {}
