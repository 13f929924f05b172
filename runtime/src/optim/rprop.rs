//! Resilient backpropagation (`torch.optim.Rprop`).

use super::common::{clamp, full_like, sign_masks};
use std::ops::Bound::{Excluded, Unbounded};

use super::validation::{in_range, require, value_of};
use super::State;
use crate::error::Result;
use crate::tensor::Tensor;
use candle_higher_macros::differentiable_optimizer;

/// `torch.optim.Rprop`: `lr`, `etas = (etaminus, etaplus)`,
/// `step_sizes = (min, max)`. State: `step`, `prev`, `step_size`.
///
/// Per entry, with `s = sign(g * prev)`: the step size is multiplied by `etaplus` where
/// `s > 0`, by `etaminus` where `s < 0` (and the gradient is then taken as 0), and clamped
/// to `step_sizes`; `p -= sign(g) * step_size`; `prev = g`. The step size starts at `lr`.
///
/// The update depends on the gradient only through signs, so its derivative with respect
/// to the gradient is 0 (higher warns about this); the derivatives with respect to `lr`,
/// `etas` and `step_sizes` are exact. `maximize` is not offered.
#[differentiable_optimizer(crate = crate)]
#[derive(PartialEq)]
pub struct Rprop {
    /// Initial step size.
    pub lr: f64,
    /// Multiplicative decrease and increase factors `(etaminus, etaplus)`.
    pub etas: (f64, f64),
    /// Minimal and maximal step sizes.
    pub step_sizes: (f64, f64),
}

impl Default for Rprop {
    /// torch's defaults: `lr = 1e-2`, `etas = (0.5, 1.2)`, `step_sizes = (1e-6, 50)`.
    fn default() -> Self {
        Rprop {
            lr: 1e-2,
            etas: (0.5, 1.2),
            step_sizes: (1e-6, 50.0),
        }
    }
}

impl Rprop {
    /// Rprop with learning rate `lr` and torch's other defaults.
    pub fn new(lr: f64) -> Self {
        Rprop {
            lr,
            ..Self::default()
        }
    }
}

#[differentiable_optimizer(crate = crate)]
impl Rprop {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        state.increment("step");
        let prev = state.get_or_insert_with("prev", || p.zeros_like())?;
        let step_size = state.get_or_insert_with("step_size", || full_like(p, self.lr))?;
        let (up, down) = sign_masks(&grad.mul(&prev)?)?;
        let same = up.add(&down)?.affine(-1.0, 1.0)?;
        let factor = up
            .mul(self.etas.1)?
            .add(&down.mul(self.etas.0)?)?
            .add(&same)?;
        step_size.mul_(&factor)?;
        step_size.set_(&clamp(&step_size, self.step_sizes.0, self.step_sizes.1)?)?;
        let g = grad.mul(&down.affine(-1.0, 1.0)?)?;
        p.sub_(&g.sign()?.mul(&step_size)?)?;
        state.set("prev", g);
        Ok(())
    }

    /// torch's checks: `lr` >= 0 and `0 < etas.0 < 1 < etas.1`. Beyond torch (which
    /// accepts them and clamps oddly): `0 <= step_sizes.0 <= step_sizes.1`.
    fn validate(&self) -> Result<()> {
        in_range("Rprop", "lr", &self.lr, 0.0..)?;
        in_range(
            "Rprop",
            "etas.0",
            &self.etas.0,
            (Excluded(0.0), Excluded(1.0)),
        )?;
        in_range("Rprop", "etas.1", &self.etas.1, (Excluded(1.0), Unbounded))?;
        let (min, max) = (value_of(&self.step_sizes.0), value_of(&self.step_sizes.1));
        in_range("Rprop", "step_sizes.0", &min, 0.0..)?;
        let at_least_min = format!(">= step_sizes.0 = {min}");
        require(max >= min, "Rprop", "step_sizes.1", &max, &at_least_min)
    }
}
