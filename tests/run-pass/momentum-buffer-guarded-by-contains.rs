// torch's SGD momentum: the buffer starts as the first gradient. Reading it with
// `state.get` is accepted inside `if state.contains(..)`, and the in-place update through
// the alias reaches the state.
use candle_higher::{differentiable_optimizer, Device, OptimizerStep, Result, State, Tensor};

#[differentiable_optimizer]
pub struct Momentum {
    pub lr: f64,
    pub momentum: f64,
}

#[differentiable_optimizer]
impl Momentum {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        if state.contains("momentum_buffer") {
            let buf = state.get("momentum_buffer")?;
            buf.mul_(self.momentum)?.add_(grad)?;
        } else {
            state.set("momentum_buffer", grad.clone());
        }
        let buf = state.get("momentum_buffer")?;
        p.sub_(&buf.mul(self.lr)?)?;
        Ok(())
    }
}

fn main() {
    let opt = Momentum {
        lr: 0.5,
        momentum: 0.9,
    };
    let mut p = Tensor::from_vec(vec![1.0f64], &[1], &Device::Cpu).unwrap();
    let g = Tensor::from_vec(vec![1.0f64], &[1], &Device::Cpu).unwrap();
    let mut state = State::new();
    opt.step(&mut p, &g, &mut state).unwrap();
    opt.step(&mut p, &g, &mut state).unwrap();
    // buf: 1, then 0.9 + 1 = 1.9; p: 1 - 0.5 - 0.95
    let buf = state.get("momentum_buffer").unwrap().to_vec_f64().unwrap();
    let p = p.to_vec_f64().unwrap();
    assert!((buf[0] - 1.9).abs() < 1e-15, "{buf:?}");
    assert!((p[0] + 0.45).abs() < 1e-15, "{p:?}");
}
