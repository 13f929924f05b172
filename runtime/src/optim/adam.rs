//! Adam (`torch.optim.Adam`), with AMSGrad and coupled weight decay.

use super::common::{bias_correction, weight_decay};
use super::validation::in_range;
use super::{Scalar, State};
use crate::error::Result;
use crate::ops::fused::{self, AdamStep};
use crate::tensor::Tensor;
use candle_higher_macros::differentiable_optimizer;

/// `torch.optim.Adam`: `lr`, `betas`, `eps`, `weight_decay` (coupled L2: `g += wd * p`),
/// `amsgrad`. State: `step`, `exp_avg`, `exp_avg_sq` (and `max_exp_avg_sq`).
///
/// The update is torch.optim's (and higher's git HEAD's):
/// `p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)`. higher 0.2.1
/// placed eps differently (`sqrt(v) + eps` with the step scaled by `sqrt(1 - beta2^t)`);
/// that form is not offered.
///
/// Divergences from higher, all in the derivatives: `sqrt(1 - beta2^t)` keeps its path to
/// a tensor `beta2` (higher's `math.sqrt` detaches it, so its `d/d beta2` is wrong), and
/// the `sqrt` is the runtime's, whose derivative is 0 at 0 at every order, where higher
/// masks the gradient of `exp_avg_sq` at exact zeros (`_maybe_mask`): both give the same
/// finite numbers. `maximize`, `foreach`, `fused`, `capturable` are not offered.
#[differentiable_optimizer(crate = crate)]
#[derive(PartialEq)]
pub struct Adam {
    /// Learning rate.
    pub lr: f64,
    /// Decay rates of the first and second moment estimates.
    pub betas: (f64, f64),
    /// Added to the denominator for stability.
    pub eps: f64,
    /// Coupled L2 penalty.
    pub weight_decay: f64,
    /// Use the maximum of past second moments (AMSGrad).
    pub amsgrad: bool,
}

impl Default for Adam {
    /// torch's defaults: `lr = 1e-3`, `betas = (0.9, 0.999)`, `eps = 1e-8`, no decay.
    fn default() -> Self {
        Adam {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
        }
    }
}

impl Adam {
    /// Adam with learning rate `lr` and torch's other defaults.
    pub fn new(lr: f64) -> Self {
        Adam {
            lr,
            ..Self::default()
        }
    }
}

#[differentiable_optimizer(crate = crate)]
impl Adam {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let g = weight_decay(grad, p, self.weight_decay)?;
        adam_update(
            p,
            &g,
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
        in_range("Adam", "lr", &self.lr, 0.0..)?;
        in_range("Adam", "eps", &self.eps, 0.0..)?;
        in_range("Adam", "betas.0", &self.betas.0, 0.0..1.0)?;
        in_range("Adam", "betas.1", &self.betas.1, 0.0..1.0)?;
        in_range("Adam", "weight_decay", &self.weight_decay, 0.0..)
    }
}

/// The moment updates and the parameter update of Adam, shared with AdamW (which decays
/// the parameter before, instead of adding to the gradient).
#[allow(clippy::too_many_arguments)]
pub(crate) fn adam_update(
    p: &mut Tensor,
    g: &Tensor,
    state: &mut State,
    lr: impl Into<Scalar>,
    beta1: impl Into<Scalar>,
    beta2: impl Into<Scalar>,
    eps: impl Into<Scalar>,
    amsgrad: bool,
) -> Result<()> {
    let (lr, beta1, beta2, eps) = (lr.into(), beta1.into(), beta2.into(), eps.into());
    let step = state.increment("step");
    let exp_avg = state.get_or_insert_with("exp_avg", || p.zeros_like())?;
    let exp_avg_sq = state.get_or_insert_with("exp_avg_sq", || p.zeros_like())?;
    // The ordinary optimizer (nothing records, constant hyperparameters): one pass that
    // rounds as the ops below (`ops::fused::adam`).
    if let (false, [Scalar::Float(lr), Scalar::Float(b1), Scalar::Float(b2), Scalar::Float(eps)]) =
        (amsgrad, [&lr, &beta1, &beta2, &eps])
    {
        let hyper = AdamStep {
            lr: *lr,
            betas: (*b1, *b2),
            eps: *eps,
            step,
        };
        let moments = (&exp_avg.tensor(), &exp_avg_sq.tensor());
        if let Some([p_new, m, v]) = fused::adam(p, g, moments, &hyper)? {
            exp_avg.set_(&m)?;
            exp_avg_sq.set_(&v)?;
            *p = p_new;
            return Ok(());
        }
    }
    exp_avg
        .mul_(beta1.clone())?
        .add_(&g.mul(1.0 - beta1.clone())?)?;
    exp_avg_sq
        .mul_(beta2.clone())?
        .addcmul_(g, g, 1.0 - beta2.clone())?;
    let second = if amsgrad {
        let max = state.get_or_insert_with("max_exp_avg_sq", || p.zeros_like())?;
        max.maximum_(&exp_avg_sq)?;
        max
    } else {
        exp_avg_sq
    };
    let bias_correction1 = bias_correction(beta1, step);
    let bias_correction2 = bias_correction(beta2, step);
    let denom = second.sqrt()?.div(bias_correction2.sqrt())?.add(eps)?;
    let step_size = lr / bias_correction1;
    p.addcdiv_(&exp_avg, &denom, -step_size)?;
    Ok(())
}
