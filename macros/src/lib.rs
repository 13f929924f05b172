//! `#[differentiable_optimizer]`: one optimizer definition, its ordinary and differentiable
//! forms. Users reach this crate through the `candle-higher` facade.
//!
//! Stages, one file each: [`args`] (the `crate = path` argument), [`ast`] (what the macro
//! understands of a struct or an `impl` block), [`valid`] (every rule, one function each),
//! [`rewrite`] (the body rewrites shared by both forms), [`expand`] (only `quote!`).

mod args;
mod ast;
mod expand;
mod rewrite;
mod valid;

use proc_macro::TokenStream;

/// Turns an optimizer written once, in place, into an ordinary optimizer and its
/// differentiable twin.
///
/// Put it on the hyperparameter struct and on the `impl` block that defines the step:
///
/// ```ignore
/// use candle_higher::{differentiable_optimizer, Result, State, Tensor};
///
/// #[differentiable_optimizer]
/// pub struct SignSgd { pub lr: f64, pub momentum: f64 }
///
/// #[differentiable_optimizer]
/// impl SignSgd {
///     fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
///         let buf = state.get_or_insert_with("momentum_buffer", || p.zeros_like())?;
///         buf.mul_(self.momentum)?.add_(grad)?;
///         p.sub_(&buf.sign()?.mul(self.lr)?)?;
///         Ok(())
///     }
/// }
/// ```
///
/// On the struct it derives `Clone` and `Debug` when missing, and emits the twin
/// `SignSgdTwin` (every `f64` becomes a `Scalar`, a tuple of `f64` a tuple of `Scalar`s;
/// `bool` and integer fields are copied as flags) with `Hyperparameters` and
/// `TwinHyperparameters`. On the `impl` block it emits the step as `OptimizerStep` for
/// both structs, and `DifferentiableOptimizer` for the optimizer; an optional
/// `fn validate(&self) -> Result<()>` beside the step (the hyperparameter checks) goes into
/// both impls with the step's rewrites, where the twin's `Scalar`s compare with floats by
/// value. State tensors alias their entries (`let buf = state.get_or_insert_with(..)?` is
/// the entry, as in torch), so nothing needs writing back.
///
/// A hyperparameter is an `f64` in one form and a `Scalar` in the other, and both have the
/// same arithmetic (`self.lr * grad` is a `Result<Tensor>` either way), comparisons and
/// printing (`{}`, `{:?}`, `{:e}` print the same text). What would read a plain `f64` out
/// of a `Scalar` (`f64::from(self.lr)`, `self.lr as f64`, `let lr: f64 = self.lr`) is a
/// compile error at the user's tokens: it would cut a tensor hyperparameter out of the
/// graph. `f64::from` of an integer or `bool` flag converts as usual, and `as f64` (or
/// `as f32`) of an integer flag of any width casts as usual.
///
/// Code inside the runtime crate writes `#[differentiable_optimizer(crate = crate)]`.
#[proc_macro_attribute]
pub fn differentiable_optimizer(args: TokenStream, input: TokenStream) -> TokenStream {
    expand::expand(args.into(), input.into())
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

#[cfg(test)]
mod tests;
