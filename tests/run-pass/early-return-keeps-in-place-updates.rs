// An entry updated in place before an early `return` keeps the update (the local is the
// entry); a `let` that shadows the local binds a new tensor and leaves the entry alone.
use candle_higher::{differentiable_optimizer, Device, OptimizerStep, Result, State, Tensor};

#[differentiable_optimizer]
pub struct Counting {
    pub lr: f64,
    pub skip_update: bool,
}

#[differentiable_optimizer]
impl Counting {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let total = state.get_or_insert_with("grad_sum", || p.zeros_like())?;
        total.add_(grad)?;
        if self.skip_update {
            return Ok(());
        }
        let total = total.mul(self.lr)?;
        p.sub_(&total)?;
        Ok(())
    }
}

fn main() {
    let g = Tensor::from_vec(vec![2.0f64], &[1], &Device::Cpu).unwrap();
    for skip_update in [true, false] {
        let opt = Counting {
            lr: 0.5,
            skip_update,
        };
        let mut p = Tensor::from_vec(vec![1.0f64], &[1], &Device::Cpu).unwrap();
        let mut state = State::new();
        opt.step(&mut p, &g, &mut state).unwrap();
        opt.step(&mut p, &g, &mut state).unwrap();
        let total = state.get("grad_sum").unwrap().to_vec_f64().unwrap();
        assert_eq!(total, [4.0], "skip_update = {skip_update}");
        let expected = if skip_update { 1.0 } else { 1.0 - 1.0 - 2.0 };
        assert_eq!(p.to_vec_f64().unwrap(), [expected]);
    }
}
