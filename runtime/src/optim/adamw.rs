//! AdamW (`torch.optim.AdamW`): Adam with decoupled weight decay.

use super::adam::adam_update;
use super::validation::in_range;
use super::State;
use crate::error::Result;
use crate::tensor::Tensor;
use candle_higher_macros::differentiable_optimizer;

/// `torch.optim.AdamW`: `lr`, `betas`, `eps`, `weight_decay` (decoupled), `amsgrad`.
/// State as [`Adam`](super::Adam).
///
/// The parameter is decayed first, `p *= 1 - lr * weight_decay`, then takes Adam's step
/// without weight decay (torch.optim and higher's git HEAD; higher 0.2.1 has no AdamW).
/// Derivatives are exact; see [`Adam`](super::Adam) for where higher's differ.
#[differentiable_optimizer(crate = crate)]
#[derive(PartialEq)]
pub struct AdamW {
    /// Learning rate.
    pub lr: f64,
    /// Decay rates of the first and second moment estimates.
    pub betas: (f64, f64),
    /// Added to the denominator for stability.
    pub eps: f64,
    /// Decoupled weight decay: `p *= 1 - lr * weight_decay` before each step.
    pub weight_decay: f64,
    /// Use the maximum of past second moments (AMSGrad).
    pub amsgrad: bool,
}

impl Default for AdamW {
    /// torch's defaults: `lr = 1e-3`, `betas = (0.9, 0.999)`, `eps = 1e-8`,
    /// `weight_decay = 1e-2`.
    fn default() -> Self {
        AdamW {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 1e-2,
            amsgrad: false,
        }
    }
}

impl AdamW {
    /// AdamW with learning rate `lr` and torch's other defaults.
    pub fn new(lr: f64) -> Self {
        AdamW {
            lr,
            ..Self::default()
        }
    }
}

#[differentiable_optimizer(crate = crate)]
impl AdamW {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        p.mul_(1.0 - self.lr * self.weight_decay)?;
        adam_update(
            p,
            grad,
            state,
            self.lr,
            self.betas.0,
            self.betas.1,
            self.eps,
            self.amsgrad,
        )
    }

    /// torch's checks: `lr`, `eps`, `weight_decay` >= 0, both betas in `[0, 1)`.
    fn validate(&self) -> Result<()> {
        in_range("AdamW", "lr", &self.lr, 0.0..)?;
        in_range("AdamW", "eps", &self.eps, 0.0..)?;
        in_range("AdamW", "betas.0", &self.betas.0, 0.0..1.0)?;
        in_range("AdamW", "betas.1", &self.betas.1, 0.0..1.0)?;
        in_range("AdamW", "weight_decay", &self.weight_decay, 0.0..)
    }
}
