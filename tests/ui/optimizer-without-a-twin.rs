// A hand-written optimizer has an ordinary step but no differentiable twin: handing it to
// an API that differentiates through optimization fails with a message saying what to do.
use candle_higher::{DifferentiableOptimizer, OptimizerStep, Result, State, Tensor};

pub struct PlainSgd {
    pub lr: f64,
}

impl OptimizerStep for PlainSgd {
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        p.sub_(&grad.mul(self.lr)?)?;
        Ok(())
    }
}

fn inner_loop<O: DifferentiableOptimizer>(_opt: O) {}

fn main() {
    inner_loop(PlainSgd { lr: 0.1 });
}
