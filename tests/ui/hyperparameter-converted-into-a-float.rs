// Not a rejection of the macro: `.into()` also converts a hyperparameter into a `Scalar`
// (in both forms), so only rustc knows the target. Its error is on the user's `.into()`
// and names both types; the twin's `Scalar` converts into no float, which would cut a
// tensor hyperparameter out of the graph.
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
        p.sub_(&scaled(grad, self.lr.into())?)?;
        Ok(())
    }
}

fn main() {}
