// The struct is rejected, but the item and stub impls are still emitted: the code that
// uses `Sgd` as an optimizer below reports nothing more.
use candle_higher::{differentiable_optimizer, DifferentiableOptimizer, Result, State, Tensor};

#[differentiable_optimizer]
pub struct Sgd {
    pub lr: f32,
}

#[differentiable_optimizer]
impl Sgd {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let _ = state.increment("step");
        p.sub_(&grad.mul(1e-3)?)?;
        Ok(())
    }
}

fn inner_loop<O: DifferentiableOptimizer>(opt: O) -> O::Twin {
    opt.twin()
}

fn main() {
    let _twin = inner_loop(Sgd { lr: 0.1 });
}
