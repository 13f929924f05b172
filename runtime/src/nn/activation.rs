//! Activations as parameter-free layers, and `Flatten`.

use super::{Module, Parameters, Visitor};
use crate::error::Result;
use crate::tensor::Tensor;

/// An elementwise activation, usable as a layer in a [`super::Sequential`].
///
/// Every variant is built from differentiable ops, so derivatives of any order flow
/// through it.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Activation {
    /// `max(x, 0)`.
    Relu,
    /// `tanh(x)`.
    Tanh,
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// `x` for `x > 0`, `slope * x` otherwise (PyTorch's default slope is 0.01).
    LeakyRelu(f64),
    /// `x` for `x > 0`, `alpha (e^x - 1)` otherwise (PyTorch's default alpha is 1).
    Elu(f64),
    /// `ln(1 + e^x)`, computed stably as `relu(x) + ln(1 + e^-|x|)`.
    Softplus,
    /// `x * sigmoid(x)` (SiLU, swish).
    Silu,
    /// `x * Phi(x)` with the exact (erf) normal CDF, PyTorch's default GELU.
    Gelu,
    /// `x`.
    Identity,
}

impl Module for Activation {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match *self {
            Activation::Relu => x.relu(),
            Activation::Tanh => x.tanh(),
            Activation::Sigmoid => x.sigmoid(),
            Activation::LeakyRelu(slope) => {
                // relu(x) - slope * relu(-x)
                x.relu()?.sub(&x.neg()?.relu()?.affine(slope, 0.0)?)
            }
            Activation::Elu(alpha) => {
                // relu(x) + alpha * (exp(min(x, 0)) - 1); min(x, 0) = -relu(-x)
                let neg = x.neg()?.relu()?.neg()?;
                x.relu()?.add(&neg.exp()?.affine(alpha, -alpha)?)
            }
            Activation::Softplus => x
                .relu()?
                .add(&x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?),
            Activation::Silu => x.mul(&x.sigmoid()?),
            Activation::Gelu => x.gelu(),
            Activation::Identity => Ok(x.clone()),
        }
    }
}

impl Parameters for Activation {
    fn visit(&mut self, _v: &mut Visitor<'_>) -> Result<()> {
        Ok(())
    }
}

/// Flattens every dim from `start_dim` on (PyTorch's `nn.Flatten`, default `start_dim = 1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flatten {
    /// First dim to flatten.
    pub start_dim: usize,
}

impl Default for Flatten {
    fn default() -> Self {
        Flatten { start_dim: 1 }
    }
}

/// `Flatten` from dim 1 (keeps the batch dim).
pub fn flatten() -> Flatten {
    Flatten::default()
}

impl Module for Flatten {
    /// In a task-batched forward ([`super::task_batch`]) the task axis is kept: dims from
    /// `start_dim + 1` on are flattened.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let offset = usize::from(super::task_batch().is_some());
        x.flatten_from(self.start_dim + offset)
    }
}

impl Parameters for Flatten {
    fn visit(&mut self, _v: &mut Visitor<'_>) -> Result<()> {
        Ok(())
    }
}
