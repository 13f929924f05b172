//! Adamax (`torch.optim.Adamax`): Adam with the infinity norm.

use super::common::{bias_correction, weight_decay};
use super::validation::in_range;
use super::State;
use crate::error::Result;
use crate::tensor::Tensor;
use candle_higher_macros::differentiable_optimizer;

/// `torch.optim.Adamax`: `lr`, `betas`, `eps`, `weight_decay` (coupled). State: `step`,
/// `exp_avg`, `exp_inf`.
///
/// `m = beta1 m + (1 - beta1) g`, `u = max(beta2 u, |g| + eps)`,
/// `p -= lr / (1 - beta1^t) * m / u`. At an exact tie inside the max the gradient is split
/// in half (`torch.maximum`); torch/higher's `max(dim)` sends it all to one side.
/// `maximize` is not offered.
#[differentiable_optimizer(crate = crate)]
#[derive(PartialEq)]
pub struct Adamax {
    /// Learning rate.
    pub lr: f64,
    /// Decay rates of the first moment and of the infinity norm.
    pub betas: (f64, f64),
    /// Added to `|g|` for stability.
    pub eps: f64,
    /// Coupled L2 penalty.
    pub weight_decay: f64,
}

impl Default for Adamax {
    /// torch's defaults: `lr = 2e-3`, `betas = (0.9, 0.999)`, `eps = 1e-8`, no decay.
    fn default() -> Self {
        Adamax {
            lr: 2e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl Adamax {
    /// Adamax with learning rate `lr` and torch's other defaults.
    pub fn new(lr: f64) -> Self {
        Adamax {
            lr,
            ..Self::default()
        }
    }
}

#[differentiable_optimizer(crate = crate)]
impl Adamax {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let step = state.increment("step");
        let exp_avg = state.get_or_insert_with("exp_avg", || p.zeros_like())?;
        let exp_inf = state.get_or_insert_with("exp_inf", || p.zeros_like())?;
        let g = weight_decay(grad, p, self.weight_decay)?;
        exp_avg
            .mul_(self.betas.0)?
            .add_(&g.mul(1.0 - self.betas.0)?)?;
        exp_inf
            .mul_(self.betas.1)?
            .maximum_(&g.abs()?.add(self.eps)?)?;
        let clr = self.lr / bias_correction(self.betas.0, step);
        p.addcdiv_(&exp_avg, &exp_inf, -clr)?;
        Ok(())
    }

    /// torch's checks: `lr`, `eps`, `weight_decay` >= 0, both betas in `[0, 1)`.
    fn validate(&self) -> Result<()> {
        in_range("Adamax", "lr", &self.lr, 0.0..)?;
        in_range("Adamax", "eps", &self.eps, 0.0..)?;
        in_range("Adamax", "betas.0", &self.betas.0, 0.0..1.0)?;
        in_range("Adamax", "betas.1", &self.betas.1, 0.0..1.0)?;
        in_range("Adamax", "weight_decay", &self.weight_decay, 0.0..)
    }
}
