//! Layers, initialisers, losses, the [`Module`] trait and parameter visiting.
//!
//! A model is a plain struct whose parameters are [`Tensor`](crate::Tensor) fields. It
//! implements [`Module`] (its forward) and [`Parameters`] (a short `visit` that shows every
//! field, with a name, to a [`Visitor`]); from that it can list its parameters and buffers
//! in a stable order with dotted names, be rebuilt from a replacement list, switch between
//! train and eval, and be wrapped in a [`crate::FunctionalModel`].
//!
//! Layers are built in candle-nn's style, `linear(in, out, vb)`, from a [`VarBuilder`]
//! that carries a seed, a dtype, a device and a name prefix (`vb.pp("encoder")`).

mod activation;
mod linear;
mod loss;
mod module;
mod sequential;
mod var_builder;

pub use activation::{flatten, Activation, Flatten};
pub use linear::{linear, linear_b, linear_no_bias, Linear};
pub use loss::{binary_cross_entropy_with_logits, cross_entropy, log_softmax_last, mse, nll};
pub use module::{walk, Buffer, Entry, Module, ParamInfo, Parameters, VisitFn, Visitor};
pub use sequential::{seq, Func, Layer, Sequential};
pub use var_builder::VarBuilder;

pub(crate) use module::ParamLayout;
