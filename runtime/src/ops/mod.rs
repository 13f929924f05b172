//! Differentiable ops, by family. Each op records a node whose vector-Jacobian product is
//! written with these same ops, so derivatives of any order come from the same code.

pub(crate) mod activation;
pub(crate) mod binary;
pub(crate) mod cast;
pub(crate) mod channel;
pub(crate) mod compare;
pub(crate) mod conv;
mod convenience;
mod cpu_gemm;
pub(crate) mod fused;
pub(crate) mod im2col;
pub(crate) mod index;
pub(crate) mod kernels;
pub(crate) mod linear;
pub(crate) mod matmul;
mod nan;
pub(crate) mod pool;
pub(crate) mod reduce;
pub(crate) mod scalar;
pub(crate) mod select;
pub(crate) mod shape;
mod small_gemm;
pub(crate) mod softmax;
pub(crate) mod unary;
mod winograd;

mod operators;

use crate::error::Result;
use crate::tensor::Tensor;

/// Zeros of `shape`, like `like`, connected to `inputs` so that their gradients are zeros:
/// the result of a product or convolution with an empty operand (candle's kernels do not
/// take them), as PyTorch gives it. A sum over no elements is an exact 0 whose gradient
/// is the empty tensor, so no inf or NaN in an input can leak in.
pub(crate) fn connected_zeros(
    shape: &[usize],
    like: &Tensor,
    inputs: &[&Tensor],
) -> Result<Tensor> {
    connected_full(shape, 0.0, like, inputs)
}

/// [`connected_zeros`] holding `value` instead (a logsumexp over no elements is -inf).
pub(crate) fn connected_full(
    shape: &[usize],
    value: f64,
    like: &Tensor,
    inputs: &[&Tensor],
) -> Result<Tensor> {
    let mut out = if value == 0.0 {
        Tensor::zeros(shape, like.dtype(), like.device())?
    } else {
        Tensor::full(value, shape, like.dtype(), like.device())?
    };
    // Only inputs that can get a gradient need the connection (an integer one's sum would
    // be another dtype).
    for t in inputs
        .iter()
        .filter(|t| t.requires_grad() && t.dtype().is_float())
    {
        out = out.add(&t.flatten_all()?.narrow(0, 0, 0)?.sum_all()?)?;
    }
    Ok(out)
}

/// The right-hand side of an arithmetic op: a tensor (broadcast like PyTorch) or a plain
/// float (a scalar op that records no extra input).
#[derive(Clone, Debug)]
pub enum Operand {
    /// A tensor operand.
    Tensor(Tensor),
    /// A constant float.
    Float(f64),
}

impl From<f64> for Operand {
    fn from(v: f64) -> Self {
        Operand::Float(v)
    }
}

impl From<&f64> for Operand {
    fn from(v: &f64) -> Self {
        Operand::Float(*v)
    }
}

impl From<Tensor> for Operand {
    fn from(t: Tensor) -> Self {
        Operand::Tensor(t)
    }
}

impl From<&Tensor> for Operand {
    fn from(t: &Tensor) -> Self {
        Operand::Tensor(t.clone())
    }
}

impl From<&mut Tensor> for Operand {
    fn from(t: &mut Tensor) -> Self {
        Operand::Tensor(t.clone())
    }
}
