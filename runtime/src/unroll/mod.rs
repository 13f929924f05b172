//! Meta-gradients beyond a plain unroll that holds every step's graph:
//!
//! - [`checkpoint`]: exact meta-gradients of a long unroll that keep only some of its states
//!   (O(sqrt(T)) checkpoints by default) and recompute the rest, segment by segment;
//! - [`implicit`]: meta-gradients through the solution of an inner problem from its optimality
//!   condition (iMAML, hyperparameters at convergence), with conjugate-gradient and Neumann
//!   solvers built on vector-Jacobian products;
//! - [`zero_order`]: evolution-strategies estimates of the gradient of a black box.

pub mod checkpoint;
pub mod implicit;
pub mod zero_order;

pub use checkpoint::{
    checkpointed_unroll, plain_unroll, Carry, CheckpointOptions, OptimizerCarry, UnrollGrads,
};
pub use implicit::{implicit_grad, ImplicitGrads, ImplicitOptions, LinearSolver};
pub use zero_order::{es_gradient, EsEstimate, EsMethod, EsOptions};

use candle_core::DType;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// `sum_i <a_i, b_i>` over lists of tensors, as an f64.
pub(crate) fn dot(a: &[Tensor], b: &[Tensor]) -> Result<f64> {
    let mut total = 0.0;
    for (x, y) in a.iter().zip(b) {
        total += x.mul(y)?.sum_all()?.to_scalar_f64()?;
    }
    Ok(total)
}

/// Each of `ts` (the list `name` of `op`) is a float tensor that requires grad: no gradient
/// can reach another (`torch.autograd.grad` refuses one too), and `None` for it would read
/// as "no effect".
pub(crate) fn check_differentiable(op: &'static str, name: &str, ts: &[Tensor]) -> Result<()> {
    for (i, t) in ts.iter().enumerate() {
        if !t.dtype().is_float() {
            return Err(Error::UnsupportedDType {
                op,
                dtype: t.dtype(),
                expected: "only floating point tensors can be differentiated",
            });
        }
        if !t.requires_grad() {
            return Err(Error::InvalidArgument {
                op,
                message: format!(
                    "{name}[{i}] (shape {:?}) does not require grad, so no gradient can reach \
                     it; make it a leaf with to_leaf() (or compute it from one) before it is \
                     used, or leave it out of {name}",
                    t.dims()
                ),
            });
        }
    }
    Ok(())
}

/// The first of `ts` that holds a NaN or an infinity.
pub(crate) fn first_non_finite(ts: &[Tensor]) -> Result<Option<usize>> {
    for (i, t) in ts.iter().enumerate() {
        if !crate::tensor::anomaly::all_finite(t.value())? {
            return Ok(Some(i));
        }
    }
    Ok(None)
}

/// The spacing of `dtype`'s values at 1 (machine epsilon); 0 for integers.
pub(crate) fn epsilon(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::EPSILON,
        DType::F32 => f64::from(f32::EPSILON),
        DType::F16 => 2f64.powi(-10),
        DType::BF16 => 2f64.powi(-7),
        DType::F8E4M3 | DType::F6E2M3 => 2f64.powi(-3),
        DType::F6E3M2 => 2f64.powi(-2),
        DType::F4 => 0.5,
        dt if dt.is_float() => 1.0,
        _ => 0.0,
    }
}
