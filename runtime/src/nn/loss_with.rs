//! Losses with a choice of reduction (PyTorch's `reduction = "none" | "mean" | "sum"`),
//! soft-target cross-entropy, and a public `one_hot`. The plain losses (`mse`, `nll`, ...)
//! keep PyTorch's default, the mean.

use candle_core::DType;

use super::loss::one_hot as one_hot_like;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// How a loss reduces its per-element (or per-example) values, as PyTorch's `reduction`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reduction {
    /// No reduction: one value per element (`mse`, `binary_cross_entropy_with_logits`) or
    /// per example (`nll`, `cross_entropy`, `soft_cross_entropy`), e.g. to weight examples.
    None,
    /// The mean (PyTorch's default).
    #[default]
    Mean,
    /// The sum.
    Sum,
}

impl Reduction {
    fn apply(self, values: Tensor) -> Result<Tensor> {
        match self {
            Reduction::None => Ok(values),
            Reduction::Mean => values.mean_all(),
            Reduction::Sum => values.sum_all(),
        }
    }
}

/// Squared error `(pred - target)^2`, reduced by `reduction`; shapes broadcast, and with
/// [`Reduction::None`] the result has the broadcast shape.
pub fn mse_with(pred: &Tensor, target: &Tensor, reduction: Reduction) -> Result<Tensor> {
    pred.require_float("mse")?;
    reduction.apply(pred.sub(target)?.sqr()?)
}

/// Fails where class-index labels are expected and `labels` has the shape of the scores
/// (one-hot rows or probabilities): says what was expected and where to go instead.
pub(crate) fn check_class_labels(op: &'static str, scores: &Tensor, labels: &Tensor) -> Result<()> {
    if scores.rank() == 2 && labels.dims() == scores.dims() {
        return Err(Error::ShapeMismatch {
            op,
            expected: format!(
                "labels as class indices of shape [{}] (one per row of the scores {:?}); \
                 these look like one-hot or probability targets: use \
                 nn::soft_cross_entropy(logits, targets, reduction) for those, or turn \
                 one-hot rows into indices with targets.argmax(1)",
                scores.dims()[0],
                scores.dims()
            ),
            got: labels.dims().to_vec(),
        });
    }
    Ok(())
}

/// Negative log-likelihood `-log_probs[i, labels[i]]` of `log_probs` `[n, classes]` at
/// class indices `labels` `[n]`, reduced by `reduction` (`[n]` with [`Reduction::None`]).
pub fn nll_with(log_probs: &Tensor, labels: &Tensor, reduction: Reduction) -> Result<Tensor> {
    check_class_labels("nll", log_probs, labels)?;
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
    let mask = one_hot_like("nll", labels, log_probs.dims()[1], log_probs)?;
    reduction.apply(log_probs.mul(&mask)?.sum(1)?.neg()?)
}

/// Cross-entropy of `logits` `[n, classes]` with class indices `labels` `[n]`, reduced by
/// `reduction`: `nll_with(log_softmax(logits), labels, reduction)`.
pub fn cross_entropy_with(
    logits: &Tensor,
    labels: &Tensor,
    reduction: Reduction,
) -> Result<Tensor> {
    check_class_labels("cross_entropy", logits, labels)?;
    if logits.rank() != 2 {
        return Err(Error::ShapeMismatch {
            op: "cross_entropy",
            expected: "logits [n, classes]".into(),
            got: logits.dims().to_vec(),
        });
    }
    nll_with(&logits.log_softmax(1)?, labels, reduction)
}

/// Cross-entropy of `logits` `[n, classes]` with target distributions `targets` of the same
/// shape (one-hot rows, or soft labels): `-sum_c targets[i, c] log_softmax(logits)[i, c]`
/// per example, reduced by `reduction` (PyTorch's `cross_entropy` with probability
/// targets). Differentiable in both.
pub fn soft_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    reduction: Reduction,
) -> Result<Tensor> {
    if logits.rank() != 2 || targets.dims() != logits.dims() {
        return Err(Error::ShapeMismatch {
            op: "soft_cross_entropy",
            expected: format!(
                "logits [n, classes] and targets of the same shape; targets have shape {:?}",
                targets.dims()
            ),
            got: logits.dims().to_vec(),
        });
    }
    reduction.apply(logits.log_softmax(1)?.mul(targets)?.sum(1)?.neg()?)
}

/// Binary cross-entropy of `logits` against `targets` in `[0, 1]` (same shape), computed
/// stably as `max(x, 0) - x y + ln(1 + e^-|x|)`, reduced by `reduction`.
pub fn binary_cross_entropy_with_logits_with(
    logits: &Tensor,
    targets: &Tensor,
    reduction: Reduction,
) -> Result<Tensor> {
    if logits.dims() != targets.dims() {
        return Err(Error::ShapeMismatch {
            op: "binary_cross_entropy_with_logits",
            expected: format!("targets of the logits' shape {:?}", logits.dims()),
            got: targets.dims().to_vec(),
        });
    }
    let softplus_neg_abs = logits.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    reduction.apply(
        logits
            .relu()?
            .sub(&logits.mul(targets)?)?
            .add(&softplus_neg_abs)?,
    )
}

/// One-hot encoding of class indices `labels` (any shape, any dtype holding whole numbers
/// in `0..classes`): a constant of shape `labels.dims() + [classes]` in `dtype`, on the
/// labels' device (`torch.nn.functional.one_hot`, which gives integers).
pub fn one_hot(labels: &Tensor, classes: usize, dtype: DType) -> Result<Tensor> {
    let like = Tensor::zeros(&[], dtype, labels.device())?;
    one_hot_like("one_hot", labels, classes, &like)
}
