//! RMSprop (`torch.optim.RMSprop`), plain, centered and with momentum.

use super::common::weight_decay;
use super::validation::in_range;
use super::State;
use crate::error::Result;
use crate::tensor::Tensor;
use candle_higher_macros::differentiable_optimizer;

/// `torch.optim.RMSprop`: `lr`, `alpha`, `eps`, `weight_decay` (coupled), `momentum`,
/// `centered`. State: `step`, `square_avg` (and `momentum_buffer`, `grad_avg`).
///
/// `v = alpha v + (1 - alpha) g^2`; centered: `m = alpha m + (1 - alpha) g` and
/// `avg = sqrt(v - m^2) + eps`, else `avg = sqrt(v) + eps`; with momentum
/// `b = momentum b + g / avg`, `p -= lr b`, else `p -= lr g / avg`.
///
/// The `sqrt` has derivative 0 at 0 at every order: with exactly-zero gradients the
/// meta-gradient stays finite (higher masks `square_avg` at zeros for the plain form and
/// gets NaN for the centered one). `maximize` is not offered.
#[differentiable_optimizer(crate = crate)]
#[derive(PartialEq)]
pub struct RmsProp {
    /// Learning rate.
    pub lr: f64,
    /// Smoothing constant of the running averages.
    pub alpha: f64,
    /// Added to the denominator for stability.
    pub eps: f64,
    /// Coupled L2 penalty.
    pub weight_decay: f64,
    /// Momentum factor (0: none).
    pub momentum: f64,
    /// Normalize by the variance instead of the second moment.
    pub centered: bool,
}

impl Default for RmsProp {
    /// torch's defaults: `lr = 1e-2`, `alpha = 0.99`, `eps = 1e-8`, no decay, no
    /// momentum, not centered.
    fn default() -> Self {
        RmsProp {
            lr: 1e-2,
            alpha: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
            momentum: 0.0,
            centered: false,
        }
    }
}

impl RmsProp {
    /// RMSprop with learning rate `lr` and torch's other defaults.
    pub fn new(lr: f64) -> Self {
        RmsProp {
            lr,
            ..Self::default()
        }
    }
}

#[differentiable_optimizer(crate = crate)]
impl RmsProp {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        state.increment("step");
        let square_avg = state.get_or_insert_with("square_avg", || p.zeros_like())?;
        let g = weight_decay(grad, p, self.weight_decay)?;
        square_avg
            .mul_(self.alpha)?
            .addcmul_(&g, &g, 1.0 - self.alpha)?;
        let avg = if self.centered {
            let grad_avg = state.get_or_insert_with("grad_avg", || p.zeros_like())?;
            grad_avg.mul_(self.alpha)?.add_(&g.mul(1.0 - self.alpha)?)?;
            square_avg.sub(&grad_avg.sqr()?)?.sqrt()?.add(self.eps)?
        } else {
            square_avg.sqrt()?.add(self.eps)?
        };
        // `!= 0` (momentum is never negative): per-task momenta that differ read as NaN,
        // and every task then takes this branch, where a momentum of 0 steps as the other.
        if self.momentum != 0.0 {
            let buf = state.get_or_insert_with("momentum_buffer", || p.zeros_like())?;
            buf.mul_(self.momentum)?.addcdiv_(&g, &avg, 1.0)?;
            p.sub_(&buf.mul(self.lr)?)?;
        } else {
            p.addcdiv_(&g, &avg, -self.lr)?;
        }
        Ok(())
    }

    /// torch's checks: `lr`, `eps`, `momentum`, `weight_decay`, `alpha` >= 0.
    fn validate(&self) -> Result<()> {
        in_range("RmsProp", "lr", &self.lr, 0.0..)?;
        in_range("RmsProp", "eps", &self.eps, 0.0..)?;
        in_range("RmsProp", "momentum", &self.momentum, 0.0..)?;
        in_range("RmsProp", "weight_decay", &self.weight_decay, 0.0..)?;
        in_range("RmsProp", "alpha", &self.alpha, 0.0..)
    }
}
