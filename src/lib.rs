//! candle-higher: differentiate through optimization on candle.
//!
//! Unroll an inner training loop and get exact gradients of a loss at its end with respect
//! to the initial weights, the learning rates, or anything else that fed the loop. See the
//! README for a tour.

pub use candle_higher_runtime::*;

pub use candle_higher_macros::differentiable_optimizer;

/// The candle-core this crate is built on, so that your program uses the same version
/// (`candle_higher::candle::Tensor` is a plain candle tensor, e.g. for a [`CustomOp`]'s
/// forward).
pub use candle_core as candle;
