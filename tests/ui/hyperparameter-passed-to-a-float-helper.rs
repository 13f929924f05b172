// Not a rejection of the macro: the twin's `self.lr` is a `Scalar`, and rustc's error names
// both types and the helper's parameter (the macro's clone of `self.lr` keeps its span).
use candle_higher::{differentiable_optimizer, Result, State, Tensor};

fn scaled(g: &Tensor, lr: f64) -> Result<Tensor> {
    g.mul(lr)
}

#[differentiable_optimizer]
pub struct Sgd {
    pub lr: f64,
}

#[differentiable_optimizer]
impl Sgd {
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        p.sub_(&scaled(grad, self.lr)?)?;
        Ok(())
    }
}

fn main() {}
