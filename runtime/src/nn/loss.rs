//! Losses, each reduced by the mean over the batch as PyTorch's default
//! (`reduction = "mean"`).

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Mean squared error `mean((pred - target)^2)`; shapes broadcast.
pub fn mse(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    pred.sub(target)?.sqr()?.mean_all()
}

/// `log_softmax` over the last dim, from `x - max - ln(sum(exp(x - max)))` (the max is a
/// constant shift, so every order of derivative is exact).
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    if x.rank() == 0 {
        return Err(Error::ShapeMismatch {
            op: "log_softmax",
            expected: "at least 1 dim".into(),
            got: vec![],
        });
    }
    let d = x.rank() - 1;
    let m = x.max_keepdim(d)?.detach();
    let shifted = x.sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(d)?.log()?;
    shifted.sub(&lse)
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
    nll(&log_softmax_last(logits)?, labels)
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
