//! The engine of candle-higher: a higher-order reverse-mode tape over candle tensors,
//! functional models with fast-weight histories, and differentiable optimizers.
//!
//! Users depend on the `candle-higher` facade, which re-exports this crate.
#![warn(missing_docs)]

mod autograd;
mod error;
mod ops;
mod tensor;

pub use autograd::{backward, grad, GradOptions, GradStore};
pub use error::{Error, Result};
pub use ops::Operand;
pub use tensor::{is_grad_enabled, no_grad, NoGradGuard, Tensor, TensorId};

pub use candle_core::{DType, Device};
