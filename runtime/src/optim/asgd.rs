//! Averaged SGD (`torch.optim.ASGD`), as higher implements it.

use super::common::{scalar, weight_decay};
use super::validation::in_range;
use super::State;
use crate::error::Result;
use crate::tensor::Tensor;
use candle_higher_macros::differentiable_optimizer;

/// `torch.optim.ASGD`: `lr`, `lambd`, `alpha`, `t0`, `weight_decay` (coupled). State:
/// `step`, `eta`, `mu` (scalars that may depend on tensor hyperparameters), `ax`.
///
/// Per step: `p *= 1 - lambd * eta`, then `p -= eta * g`;
/// `ax = p_decayed` while `mu == 1`, else `ax += mu * (p_decayed - ax)`;
/// `eta = lr / (1 + lambd * lr * t)^alpha`, `mu = 1 / max(1, t - t0)`. The first step
/// uses `eta = lr`.
///
/// Divergences: `ax` averages the decayed parameter before the gradient step, as higher
/// (torch 2.x averages the parameter after the step; `ax` never feeds back into the
/// parameters). The derivative of `eta` keeps its path through the denominator
/// (higher's `math.pow` detaches it, so its `d/d lr` and `d/d lambd` are slightly off).
#[differentiable_optimizer(crate = crate)]
#[derive(PartialEq)]
pub struct Asgd {
    /// Learning rate.
    pub lr: f64,
    /// Decay term.
    pub lambd: f64,
    /// Power of the eta update.
    pub alpha: f64,
    /// Step at which averaging starts.
    pub t0: f64,
    /// Coupled L2 penalty.
    pub weight_decay: f64,
}

impl Default for Asgd {
    /// torch's defaults: `lr = 1e-2`, `lambd = 1e-4`, `alpha = 0.75`, `t0 = 1e6`, no decay.
    fn default() -> Self {
        Asgd {
            lr: 1e-2,
            lambd: 1e-4,
            alpha: 0.75,
            t0: 1e6,
            weight_decay: 0.0,
        }
    }
}

impl Asgd {
    /// ASGD with learning rate `lr` and torch's other defaults.
    pub fn new(lr: f64) -> Self {
        Asgd {
            lr,
            ..Self::default()
        }
    }
}

#[differentiable_optimizer(crate = crate)]
impl Asgd {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let step = state.increment("step");
        let eta = state.scalar_or_insert_with("eta", || scalar(self.lr))?;
        let mu = state.scalar_or_insert_with("mu", || scalar(1.0))?;
        let ax = state.get_or_insert_with("ax", || p.zeros_like())?;
        let g = weight_decay(grad, p, self.weight_decay)?;
        p.mul_(1.0 - self.lambd * eta)?;
        if mu != 1.0 {
            ax.add_(&p.sub(&ax)?.mul(mu)?)?;
        } else {
            ax.set_(p)?;
        }
        p.sub_(&g.mul(eta)?)?;
        let base = scalar(1.0 + self.lambd * self.lr * step as f64);
        state.set_scalar("eta", scalar(self.lr) / base.pow(&scalar(self.alpha)));
        state.set_scalar("mu", scalar(step as f64 - self.t0).max_f64(1.0).recip());
        Ok(())
    }

    /// torch's checks: `lr`, `weight_decay` >= 0 (`lambd`, `alpha`, `t0` only must not be
    /// NaN, which the runtime checks for every float).
    fn validate(&self) -> Result<()> {
        in_range("Asgd", "lr", &self.lr, 0.0..)?;
        in_range("Asgd", "weight_decay", &self.weight_decay, 0.0..)
    }
}
