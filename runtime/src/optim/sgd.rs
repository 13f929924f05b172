//! Stochastic gradient descent (`torch.optim.SGD`).

use super::common::{sgd_damping, weight_decay};
use super::validation::{in_range, require};
use super::State;
use crate::error::Result;
use crate::tensor::Tensor;
use candle_higher_macros::differentiable_optimizer;

/// `torch.optim.SGD`: `lr`, `momentum`, `dampening`, `weight_decay` (coupled L2:
/// `g += weight_decay * p`), `nesterov`. State: `momentum_buffer` (with momentum only).
///
/// The momentum buffer starts as the first gradient (no dampening on the first step),
/// then `buf = momentum * buf + (1 - dampening) * g`; the step uses `buf`, or
/// `g + momentum * buf` with Nesterov. As torch and higher, a momentum whose value is 0
/// (even a tensor) takes the branch without a buffer; in a task-batched unroll with
/// per-task momenta of which some are 0, those tasks step with their undamped gradient,
/// as that branch does. `maximize` is not offered (negate the loss).
///
/// ```
/// # use candle_higher_runtime::optim::Sgd;
/// let opt = Sgd { momentum: 0.9, ..Sgd::new(0.1) };
/// assert_eq!(opt.dampening, 0.0);
/// ```
#[differentiable_optimizer(crate = crate)]
#[derive(PartialEq)]
pub struct Sgd {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor (0: none).
    pub momentum: f64,
    /// Dampening of the momentum.
    pub dampening: f64,
    /// Coupled L2 penalty.
    pub weight_decay: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
}

impl Default for Sgd {
    /// torch's defaults: `lr = 1e-3`, no momentum, no dampening, no decay.
    fn default() -> Self {
        Sgd {
            lr: 1e-3,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        }
    }
}

impl Sgd {
    /// Plain SGD with learning rate `lr` and torch's other defaults.
    pub fn new(lr: f64) -> Self {
        Sgd {
            lr,
            ..Self::default()
        }
    }
}

#[differentiable_optimizer(crate = crate)]
impl Sgd {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let mut g = weight_decay(grad, p, self.weight_decay)?;
        if self.momentum != 0.0 {
            if state.contains("momentum_buffer") {
                let buf = state.get("momentum_buffer")?;
                let damping = sgd_damping(self.momentum, self.dampening)?;
                buf.mul_(self.momentum)?.add_(&g.mul(damping)?)?;
            } else {
                state.set("momentum_buffer", g.clone());
            }
            let buffer = state.get("momentum_buffer")?;
            if self.nesterov {
                g = g.add(&buffer.mul(self.momentum)?)?;
            } else {
                g = buffer.clone();
            }
        }
        p.sub_scaled_(&g, self.lr)?;
        Ok(())
    }

    /// torch's checks: `lr`, `momentum`, `weight_decay` >= 0; Nesterov needs a
    /// momentum and zero dampening.
    fn validate(&self) -> Result<()> {
        in_range("Sgd", "lr", &self.lr, 0.0..)?;
        in_range("Sgd", "momentum", &self.momentum, 0.0..)?;
        in_range("Sgd", "weight_decay", &self.weight_decay, 0.0..)?;
        if self.nesterov {
            let m = &self.momentum;
            require(*m > 0.0, "Sgd", "momentum", m, "> 0 with nesterov")?;
            let d = &self.dampening;
            require(*d == 0.0, "Sgd", "dampening", d, "0 with nesterov")?;
        }
        Ok(())
    }
}
