#![doc = include_str!("../README.md")]

pub use candle_higher_runtime::*;

pub use candle_higher_macros::differentiable_optimizer;

/// The candle-core this crate is built on, so that your program uses the same version
/// (`candle_higher::candle::Tensor` is a plain candle tensor, e.g. for a [`CustomOp`]'s
/// forward).
pub use candle_core as candle;

/// The candle-nn this crate's `candle-nn` feature works with (`nn::load_varmap`,
/// `nn::write_varmap`), so your candle-nn models use the same version.
#[cfg(feature = "candle-nn")]
pub use candle_nn;
