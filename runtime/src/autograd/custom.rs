//! Ops of your own (PyTorch's `torch.autograd.Function`): a forward on candle tensors and
//! a vector-Jacobian product written with this library's differentiable ops.

use std::sync::Arc;

use super::{Backward, VjpCtx};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// A differentiable op of your own, applied with [`apply_custom_op`].
///
/// The forward computes on plain candle tensors (any candle op or kernel; nothing is
/// recorded). The backward ([`CustomOp::vjp`]) is written with this library's ops on the
/// op's inputs and output: with `create_graph` those ops are recorded, so the op has
/// derivatives of every order as long as `vjp` is itself differentiable.
///
/// ```
/// use candle_higher_runtime::{apply_custom_op, grad_one, CustomOp, GradOptions, Result, Tensor};
///
/// /// `ln(cosh(x))`, computed stably; its derivative is `tanh(x)`.
/// struct LogCosh;
///
/// impl CustomOp for LogCosh {
///     fn name(&self) -> &'static str { "log_cosh" }
///     fn forward(&self, inputs: &[&candle_core::Tensor]) -> Result<candle_core::Tensor> {
///         // |x| + ln(1 + e^{-2|x|}) - ln 2
///         let a = inputs[0].abs()?;
///         let tail = ((a.affine(-2.0, 0.0)?.exp()? + 1.0)?.log()? - std::f64::consts::LN_2)?;
///         Ok((a + tail)?)
///     }
///     fn vjp(&self, inputs: &[Tensor], _output: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
///         Ok(vec![Some(grad.mul(&inputs[0].tanh()?)?)])
///     }
/// }
///
/// # fn main() -> Result<()> {
/// let x = Tensor::scalar(0.5f64).to_leaf();
/// let y = apply_custom_op(LogCosh, &[&x])?;
/// let dy = grad_one(&y, &x, GradOptions::create_graph())?; // tanh(0.5)
/// let d2y = grad_one(&dy, &x, GradOptions::default())?;    // 1 - tanh(0.5)^2
/// assert!((dy.to_scalar_f64()? - 0.5f64.tanh()).abs() < 1e-15);
/// assert!((d2y.to_scalar_f64()? - (1.0 - 0.5f64.tanh().powi(2))).abs() < 1e-15);
/// # Ok(()) }
/// ```
pub trait CustomOp: Send + Sync + 'static {
    /// The op's name, used in error messages and anomaly reports.
    fn name(&self) -> &'static str;

    /// The output's value, from the inputs' values (in the order given to
    /// [`apply_custom_op`]).
    fn forward(&self, inputs: &[&candle_core::Tensor]) -> Result<candle_core::Tensor>;

    /// The gradient with respect to each input, given `grad`, the gradient of the output
    /// (of the output's shape), written with this library's ops so that it can be
    /// differentiated again. Return one entry per input, each of its input's shape and
    /// dtype, `None` where it is zero or not needed.
    fn vjp(&self, inputs: &[Tensor], output: &Tensor, grad: &Tensor)
        -> Result<Vec<Option<Tensor>>>;
}

/// Applies a [`CustomOp`] to `inputs`: its forward on their values, recorded (when grad
/// mode is on, an input requires grad and the output is a float tensor) so that `grad`
/// and `backward` run its [`CustomOp::vjp`]. The vjp's results are checked against the
/// inputs (count, shapes, dtypes) and a mismatch is an error naming the op, as is a panic
/// in `forward` or `vjp` ([`Error::InvalidArgument`]).
pub fn apply_custom_op<O: CustomOp>(op: O, inputs: &[&Tensor]) -> Result<Tensor> {
    let values: Vec<&candle_core::Tensor> = inputs.iter().map(|t| &t.0.value).collect();
    let value = unwind_to_error(op.name(), "forward", || op.forward(&values))?;
    Tensor::from_op(value, inputs, Custom(Arc::new(op)))
}

/// Runs `f`, a user's forward or vjp; a panic in it is an error naming the op (as
/// `meta_batch` reports a task that panics), so it cannot unwind through `grad`.
fn unwind_to_error<T>(op: &'static str, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        Err(Error::InvalidArgument {
            op,
            message: format!("the custom op's {what} panicked: {message}"),
        })
    })
}

struct Custom<O>(Arc<O>);

impl<O: CustomOp> Backward for Custom<O> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let op = self.0.name();
        let grads = unwind_to_error(op, "vjp", || self.0.vjp(ctx.inputs, ctx.output, ctx.grad))?;
        if grads.len() != ctx.inputs.len() {
            return Err(Error::InvalidArgument {
                op,
                message: format!(
                    "vjp returned {} gradients for {} inputs; return one per input (None for none)",
                    grads.len(),
                    ctx.inputs.len()
                ),
            });
        }
        grads
            .into_iter()
            .zip(ctx.inputs)
            .zip(ctx.needs)
            .enumerate()
            .map(|(i, ((g, input), &need))| match g {
                Some(g) if need => {
                    if g.dims() != input.dims() {
                        return Err(Error::ShapeMismatch {
                            op,
                            expected: format!(
                                "the gradient of input {i} to have its shape {:?}",
                                input.dims()
                            ),
                            got: g.dims().to_vec(),
                        });
                    }
                    input.check_same(&g, op)?;
                    Ok(Some(g))
                }
                _ => Ok(None),
            })
            .collect()
    }
}
