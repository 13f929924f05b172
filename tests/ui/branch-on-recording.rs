use candle_higher::{differentiable_optimizer, Result, State, Tensor};

#[differentiable_optimizer]
pub struct Sgd {
    pub lr: f64,
}

#[differentiable_optimizer]
impl Sgd {
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        // torch's `if not p.requires_grad: continue`: false for every parameter of the
        // ordinary optimizer (detached, under `no_grad`), true in the twin.
        if !p.requires_grad() || grad.is_leaf() {
            return Ok(());
        }
        if candle_higher::is_grad_enabled() {
            p.sub_(&grad.mul(self.lr)?)?;
        }
        Ok(())
    }
}

fn main() {}
