//! Adadelta (`torch.optim.Adadelta`).

use super::common::weight_decay;
use super::validation::in_range;
use super::State;
use crate::error::Result;
use crate::tensor::Tensor;
use candle_higher_macros::differentiable_optimizer;

/// `torch.optim.Adadelta`: `lr`, `rho`, `eps`, `weight_decay` (coupled). State: `step`,
/// `square_avg`, `acc_delta`.
///
/// `v = rho v + (1 - rho) g^2`, `delta = sqrt(u + eps) / sqrt(v + eps) * g`,
/// `u = rho u + (1 - rho) delta^2`, `p -= lr * delta`. `maximize` is not offered.
#[differentiable_optimizer(crate = crate)]
#[derive(PartialEq)]
pub struct Adadelta {
    /// Learning rate (scales the delta).
    pub lr: f64,
    /// Decay rate of the running averages.
    pub rho: f64,
    /// Added inside both square roots.
    pub eps: f64,
    /// Coupled L2 penalty.
    pub weight_decay: f64,
}

impl Default for Adadelta {
    /// torch's defaults: `lr = 1.0`, `rho = 0.9`, `eps = 1e-6`, no decay.
    fn default() -> Self {
        Adadelta {
            lr: 1.0,
            rho: 0.9,
            eps: 1e-6,
            weight_decay: 0.0,
        }
    }
}

impl Adadelta {
    /// Adadelta with learning rate `lr` and torch's other defaults.
    pub fn new(lr: f64) -> Self {
        Adadelta {
            lr,
            ..Self::default()
        }
    }
}

#[differentiable_optimizer(crate = crate)]
impl Adadelta {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        state.increment("step");
        let square_avg = state.get_or_insert_with("square_avg", || p.zeros_like())?;
        let acc_delta = state.get_or_insert_with("acc_delta", || p.zeros_like())?;
        let g = weight_decay(grad, p, self.weight_decay)?;
        square_avg
            .mul_(self.rho)?
            .addcmul_(&g, &g, 1.0 - self.rho)?;
        let std = square_avg.add(self.eps)?.sqrt()?;
        let delta = acc_delta.add(self.eps)?.sqrt()?.div(&std)?.mul(&g)?;
        acc_delta
            .mul_(self.rho)?
            .addcmul_(&delta, &delta, 1.0 - self.rho)?;
        p.sub_(&delta.mul(self.lr)?)?;
        Ok(())
    }

    /// torch's checks: `lr`, `eps`, `weight_decay` >= 0, `rho` in `[0, 1]`.
    fn validate(&self) -> Result<()> {
        in_range("Adadelta", "lr", &self.lr, 0.0..)?;
        in_range("Adadelta", "rho", &self.rho, 0.0..=1.0)?;
        in_range("Adadelta", "eps", &self.eps, 0.0..)?;
        in_range("Adadelta", "weight_decay", &self.weight_decay, 0.0..)
    }
}
