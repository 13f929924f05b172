//! Losses, each reduced by the mean over the batch as PyTorch's default
//! (`reduction = "mean"`).
//!
//! The `_per_task` forms take task-batched predictions `[T, ..]` and return `[T]`: entry
//! `t` is the plain loss of task `t`. The inner loss of a task-batched unroll is their
//! **sum** (`.sum_all()`), so that the gradient with respect to task `t`'s fast weights is
//! task `t`'s own gradient (no other task's loss depends on them); a meta-loss averaged
//! over tasks, as a looped MAML averages it, is their mean (`.mean_all()`).

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Mean squared error `mean((pred - target)^2)`; shapes broadcast.
pub fn mse(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    pred.require_float("mse")?;
    pred.sub(target)?.sqr()?.mean_all()
}

/// Checks that `labels` hold class indices in `0..classes` and returns them.
pub(crate) fn class_indices(op: &'static str, labels: &Tensor, classes: usize) -> Result<Vec<u32>> {
    labels
        .to_vec_f64()?
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            if v < 0.0 || v.fract() != 0.0 || v >= classes as f64 {
                Err(Error::InvalidArgument {
                    op,
                    message: format!(
                        "label {v} at position {i} is not a class index in 0..{classes}"
                    ),
                })
            } else {
                Ok(v as u32)
            }
        })
        .collect()
}

/// A constant `[n, classes]` one-hot matrix of integer `labels` (any dtype holding whole
/// numbers), in `dtype` on `like`'s device.
pub(crate) fn one_hot(
    op: &'static str,
    labels: &Tensor,
    classes: usize,
    like: &Tensor,
) -> Result<Tensor> {
    let values = labels.to_vec_f64()?;
    let mut data = vec![0f64; values.len() * classes];
    for (i, &v) in values.iter().enumerate() {
        if v < 0.0 || v.fract() != 0.0 || v as usize >= classes {
            return Err(Error::InvalidArgument {
                op,
                message: format!("label {v} at position {i} is not a class index in 0..{classes}"),
            });
        }
        data[i * classes + v as usize] = 1.0;
    }
    let mut shape = labels.dims().to_vec();
    shape.push(classes);
    Tensor::from_vec(data, &shape, &candle_core::Device::Cpu)?
        .to_dtype(like.dtype())?
        .to_device(like.device())
        .map(|t| t.detach())
}

/// Negative log-likelihood of log-probabilities `log_probs` `[n, classes]` at integer
/// `labels` `[n]`: `-mean_i log_probs[i, labels[i]]` (PyTorch's `nll_loss`).
pub fn nll(log_probs: &Tensor, labels: &Tensor) -> Result<Tensor> {
    super::loss_with::check_class_labels("nll", log_probs, labels)?;
    if log_probs.rank() != 2 || labels.dims() != [log_probs.dims()[0]] {
        return Err(Error::ShapeMismatch {
            op: "nll",
            expected: format!(
                "log_probs [n, classes] with labels [n]; labels have shape {:?}",
                labels.dims()
            ),
            got: log_probs.dims().to_vec(),
        });
    }
    let mask = one_hot("nll", labels, log_probs.dims()[1], log_probs)?;
    log_probs
        .mul(&mask)?
        .sum_all()?
        .affine(-1.0 / labels.elem_count() as f64, 0.0)
}

/// Cross-entropy of `logits` `[n, classes]` with integer `labels` `[n]`:
/// `nll(log_softmax(logits), labels)` (PyTorch's `cross_entropy`).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    super::loss_with::check_class_labels("cross_entropy", logits, labels)?;
    if logits.rank() != 2 {
        return Err(Error::ShapeMismatch {
            op: "cross_entropy",
            expected: "logits [n, classes]".into(),
            got: logits.dims().to_vec(),
        });
    }
    nll(&logits.log_softmax(1)?, labels)
}

/// Binary cross-entropy of `logits` against `targets` in `[0, 1]`, same shape, computed
/// stably as `mean(max(x, 0) - x y + ln(1 + e^-|x|))`.
pub fn binary_cross_entropy_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.dims() != targets.dims() {
        return Err(Error::ShapeMismatch {
            op: "binary_cross_entropy_with_logits",
            expected: format!("targets of the logits' shape {:?}", logits.dims()),
            got: targets.dims().to_vec(),
        });
    }
    let softplus_neg_abs = logits.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    logits
        .relu()?
        .sub(&logits.mul(targets)?)?
        .add(&softplus_neg_abs)?
        .mean_all()
}

/// The task count of a task-batched `pred` `[T, ..]`.
fn task_axis(op: &'static str, pred: &Tensor, min_rank: usize) -> Result<usize> {
    if pred.rank() < min_rank {
        return Err(Error::ShapeMismatch {
            op,
            expected: format!("a task-batched input [T, ..] of rank at least {min_rank}"),
            got: pred.dims().to_vec(),
        });
    }
    Ok(pred.dims()[0])
}

/// Per-task mean squared error: `[T]`, entry `t` is `mse(pred[t], target[t])`. `target`
/// broadcasts against `pred` `[T, ..]` and has at most its rank: a target of higher rank
/// would move the task axis (each task's target against every task's prediction).
pub fn mse_per_task(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    pred.require_float("mse_per_task")?;
    let tasks = task_axis("mse_per_task", pred, 1)?;
    let sq = pred.sub(target)?.sqr()?;
    if target.rank() > pred.rank() || sq.dims()[0] != tasks {
        return Err(Error::ShapeMismatch {
            op: "mse_per_task",
            expected: format!("a target that keeps the prediction's {tasks} tasks"),
            got: target.dims().to_vec(),
        });
    }
    sq.reshape(&[tasks, sq.elem_count() / tasks.max(1)])?
        .mean(1)
}

/// Per-task negative log-likelihood of `log_probs` `[T, n, classes]` at integer `labels`
/// `[T, n]`: entry `t` is `nll(log_probs[t], labels[t])`.
pub fn nll_per_task(log_probs: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let d = log_probs.dims();
    if d.len() != 3 || labels.dims() != [d[0], d[1]] {
        return Err(Error::ShapeMismatch {
            op: "nll_per_task",
            expected: format!(
                "log_probs [T, n, classes] with labels [T, n]; labels have shape {:?}",
                labels.dims()
            ),
            got: d.to_vec(),
        });
    }
    let (tasks, n, classes) = (d[0], d[1], d[2]);
    let mask = one_hot("nll_per_task", labels, classes, log_probs)?;
    log_probs
        .mul(&mask)?
        .reshape(&[tasks, n * classes])?
        .sum(1)?
        .affine(-1.0 / n as f64, 0.0)
}

/// Per-task cross-entropy of `logits` `[T, n, classes]` with integer `labels` `[T, n]`:
/// entry `t` is `cross_entropy(logits[t], labels[t])`.
pub fn cross_entropy_per_task(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    if logits.rank() != 3 {
        return Err(Error::ShapeMismatch {
            op: "cross_entropy_per_task",
            expected: "logits [T, n, classes]".into(),
            got: logits.dims().to_vec(),
        });
    }
    nll_per_task(&logits.log_softmax(2)?, labels)
}

/// Per-task binary cross-entropy with logits: `[T]`, entry `t` is
/// `binary_cross_entropy_with_logits(logits[t], targets[t])`.
pub fn binary_cross_entropy_with_logits_per_task(
    logits: &Tensor,
    targets: &Tensor,
) -> Result<Tensor> {
    let tasks = task_axis("binary_cross_entropy_with_logits_per_task", logits, 1)?;
    if logits.dims() != targets.dims() {
        return Err(Error::ShapeMismatch {
            op: "binary_cross_entropy_with_logits_per_task",
            expected: format!("targets of the logits' shape {:?}", logits.dims()),
            got: targets.dims().to_vec(),
        });
    }
    let softplus_neg_abs = logits.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    let per_element = logits
        .relu()?
        .sub(&logits.mul(targets)?)?
        .add(&softplus_neg_abs)?;
    per_element
        .reshape(&[tasks, logits.elem_count() / tasks.max(1)])?
        .mean(1)
}
