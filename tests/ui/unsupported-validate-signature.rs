use candle_higher::{differentiable_optimizer, Result, State, Tensor};

#[differentiable_optimizer]
pub struct Sgd {
    pub lr: f64,
}

#[differentiable_optimizer]
impl Sgd {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let _ = state;
        p.sub_(&grad.mul(self.lr)?)?;
        Ok(())
    }

    fn validate(&self, strict: bool) -> bool {
        strict && self.lr >= 0.0
    }
}

fn main() {}
