//! Adagrad (`torch.optim.Adagrad`).

use super::common::{full_like, weight_decay};
use super::validation::in_range;
use super::State;
use crate::error::Result;
use crate::tensor::Tensor;
use candle_higher_macros::differentiable_optimizer;

/// `torch.optim.Adagrad`: `lr`, `lr_decay`, `weight_decay` (coupled), `eps`,
/// `initial_accumulator_value`. State: `step`, `sum`.
///
/// `clr = lr / (1 + (t - 1) lr_decay)`, `sum += g^2`, `p -= clr * g / (sqrt(sum) + eps)`.
/// The `sqrt` has derivative 0 at 0 at every order, where higher masks the gradient of
/// `sum` at exact zeros: same numbers, no NaN. `step` is an integer counter (torch keeps a
/// float tensor). Sparse gradients and `maximize` are not offered.
#[differentiable_optimizer(crate = crate)]
#[derive(PartialEq)]
pub struct Adagrad {
    /// Learning rate.
    pub lr: f64,
    /// Learning-rate decay per step.
    pub lr_decay: f64,
    /// Coupled L2 penalty.
    pub weight_decay: f64,
    /// Added to the denominator for stability.
    pub eps: f64,
    /// Initial value of the sum of squared gradients.
    pub initial_accumulator_value: f64,
}

impl Default for Adagrad {
    /// torch's defaults: `lr = 1e-2`, `eps = 1e-10`, the rest 0.
    fn default() -> Self {
        Adagrad {
            lr: 1e-2,
            lr_decay: 0.0,
            weight_decay: 0.0,
            eps: 1e-10,
            initial_accumulator_value: 0.0,
        }
    }
}

impl Adagrad {
    /// Adagrad with learning rate `lr` and torch's other defaults.
    pub fn new(lr: f64) -> Self {
        Adagrad {
            lr,
            ..Self::default()
        }
    }
}

#[differentiable_optimizer(crate = crate)]
impl Adagrad {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let step = state.increment("step");
        let sum =
            state.get_or_insert_with("sum", || full_like(p, self.initial_accumulator_value))?;
        let g = weight_decay(grad, p, self.weight_decay)?;
        let clr = self.lr / (1.0 + (step - 1) as f64 * self.lr_decay);
        sum.addcmul_(&g, &g, 1.0)?;
        let std = sum.sqrt()?.add(self.eps)?;
        p.addcdiv_(&g, &std, -clr)?;
        Ok(())
    }

    /// torch's checks: `lr`, `lr_decay`, `weight_decay`, `initial_accumulator_value`,
    /// `eps` >= 0.
    fn validate(&self) -> Result<()> {
        in_range("Adagrad", "lr", &self.lr, 0.0..)?;
        in_range("Adagrad", "lr_decay", &self.lr_decay, 0.0..)?;
        in_range("Adagrad", "weight_decay", &self.weight_decay, 0.0..)?;
        in_range(
            "Adagrad",
            "initial_accumulator_value",
            &self.initial_accumulator_value,
            0.0..,
        )?;
        in_range("Adagrad", "eps", &self.eps, 0.0..)
    }
}
