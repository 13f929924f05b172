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

use crate::error::Result;
use crate::tensor::Tensor;

/// `sum_i <a_i, b_i>` over lists of tensors, as an f64.
pub(crate) fn dot(a: &[Tensor], b: &[Tensor]) -> Result<f64> {
    let mut total = 0.0;
    for (x, y) in a.iter().zip(b) {
        total += x.mul(y)?.sum_all()?.to_scalar_f64()?;
    }
    Ok(total)
}
