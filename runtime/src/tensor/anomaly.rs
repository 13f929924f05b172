//! Anomaly detection (`torch.autograd.detect_anomaly`): an opt-in, thread-local check that
//! every op's output, forward and backward, is finite. Off by default; when off it costs one
//! thread-local read per op.

use std::cell::Cell;

use candle_core::DType;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

thread_local! {
    static ANOMALY: Cell<bool> = const { Cell::new(false) };
}

/// Whether anomaly detection is on for this thread.
pub fn is_anomaly_enabled() -> bool {
    ANOMALY.with(Cell::get)
}

/// Restores the previous anomaly mode when dropped. Made by [`detect_anomaly`].
#[derive(Debug)]
#[must_use = "anomaly detection ends as soon as the guard is dropped"]
pub struct AnomalyGuard {
    previous: bool,
}

impl Drop for AnomalyGuard {
    fn drop(&mut self) {
        ANOMALY.with(|a| a.set(self.previous));
    }
}

/// Turns anomaly detection on for this thread until the returned guard is dropped: the
/// first op whose forward output or backward gradient holds a NaN or an infinity fails with
/// [`Error::NonFinite`], naming the op and the shapes of its inputs and output. Every
/// checked value is scanned, so this is for debugging, not for training runs.
///
/// ```
/// # use candle_higher_runtime::{detect_anomaly, Error, Tensor};
/// let x = Tensor::scalar(0.0f64);
/// assert!(x.log().is_ok()); // -inf passes silently by default
/// let _guard = detect_anomaly();
/// let err = x.log().unwrap_err();
/// assert!(matches!(err, Error::NonFinite { .. }), "{err}");
/// assert!(err.to_string().contains("log"));
/// ```
pub fn detect_anomaly() -> AnomalyGuard {
    set_anomaly(true)
}

/// Turns anomaly detection on or off on this thread until the guard is dropped.
pub(crate) fn set_anomaly(enabled: bool) -> AnomalyGuard {
    let previous = ANOMALY.with(|a| a.replace(enabled));
    AnomalyGuard { previous }
}

/// Whether every element of `value` is finite (integer tensors always are).
pub(crate) fn all_finite(value: &candle_core::Tensor) -> Result<bool> {
    let finite = match value.dtype() {
        DType::F64 => value
            .flatten_all()?
            .to_vec1::<f64>()?
            .iter()
            .all(|v| v.is_finite()),
        dt if dt.is_float() => value
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .iter()
            .all(|v| v.is_finite()),
        _ => true,
    };
    Ok(finite)
}

/// [`check`] of a forward output, kept out of line so the ordinary path of every op pays
/// only for the flag.
#[cold]
#[inline(never)]
pub(crate) fn check_forward(
    op: &str,
    inputs: &[&Tensor],
    value: &candle_core::Tensor,
) -> Result<()> {
    let shapes: Vec<&[usize]> = inputs.iter().map(|t| t.dims()).collect();
    check("forward", op, &shapes, value)
}

/// With anomaly detection on, fails if `value` (the output of `op` in `phase`) is not
/// finite; `inputs` are the op's input shapes, for the message.
pub(crate) fn check(
    phase: &str,
    op: &str,
    inputs: &[&[usize]],
    value: &candle_core::Tensor,
) -> Result<()> {
    if !is_anomaly_enabled() || all_finite(value)? {
        return Ok(());
    }
    Err(Error::NonFinite {
        what: format!(
            "anomaly detected: {phase} of {op} (inputs {inputs:?}) produced shape {:?}",
            value.dims()
        ),
    })
}
