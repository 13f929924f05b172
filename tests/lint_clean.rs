//! The expansion of `#[differentiable_optimizer]` is lint-clean: rustc checks this file
//! under `deny(warnings)` in every `cargo test`, and clippy (CI runs it on all targets)
//! under `deny(clippy::pedantic)`.
#![deny(warnings)]
#![deny(clippy::pedantic)]

use candle_higher::optim::validation::in_range;
use candle_higher::{
    differentiable_optimizer, Device, Hyperparameters, OptimizerStep, Result, State, Tensor,
};

/// SGD with momentum, Nesterov, weight decay and a warm-up counter: flags, a tuple, an
/// alias written back, a branch on a hyperparameter and on the step counter, a wide flag cast
/// with `as`, a hyperparameter on the left of a tensor.
#[differentiable_optimizer]
pub struct Linted {
    /// Learning rate.
    pub lr: f64,
    /// Momentum and dampening.
    pub momentum: (f64, f64),
    /// L2 penalty.
    pub weight_decay: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Steps without momentum.
    pub warmup: u32,
    /// Steps the update is spread over (a flag wider than `f64::from` takes).
    pub horizon: u64,
}

#[differentiable_optimizer]
impl Linted {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let step = state.increment("step");
        let (momentum, dampening) = self.momentum;
        let mut g = grad.clone();
        if self.weight_decay != 0.0 {
            g.add_(&p.mul(self.weight_decay)?)?;
        }
        let buf = state.get_or_insert_with("momentum_buffer", || p.zeros_like())?;
        buf.mul_(momentum)?.add_(&g.mul(1.0 - dampening)?)?;
        if step > i64::from(self.warmup) {
            g = if self.nesterov {
                g.add(&buf.mul(momentum)?)?
            } else {
                buf.clone()
            };
        }
        let horizon = (self.horizon as f64).max(1.0);
        p.sub_(&(self.lr * &g.div(horizon)?)?)?;
        Ok(())
    }

    /// A non-negative learning rate, and a momentum in [0, 1).
    fn validate(&self) -> Result<()> {
        in_range("Linted", "lr", &self.lr, 0.0..)?;
        in_range("Linted", "momentum.0", &self.momentum.0, 0.0..1.0)
    }
}

#[test]
fn linted_optimizer_steps() {
    let opt = Linted {
        lr: 0.1,
        momentum: (0.9, 0.0),
        weight_decay: 0.0,
        nesterov: true,
        warmup: 0,
        horizon: 1,
    };
    let mut p = Tensor::from_vec(vec![1.0f64], &[1], &Device::Cpu).unwrap();
    let g = Tensor::from_vec(vec![1.0f64], &[1], &Device::Cpu).unwrap();
    let mut state = State::new();
    opt.twin().step(&mut p, &g, &mut state).unwrap();
    // buf = 1; nesterov: g + 0.9 * buf = 1.9; p = 1 - 0.19
    let v = p.to_vec_f64().unwrap()[0];
    assert!((v - 0.81).abs() < 1e-15, "{v}");
    assert!(opt.validate().is_ok() && opt.twin().validate().is_ok());
    let bad = Linted { lr: -0.1, ..opt };
    assert!(bad.validate().is_err() && bad.twin().validate().is_err());
}
