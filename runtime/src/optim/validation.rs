//! Hyperparameter checks: the helpers an optimizer's `fn validate` is written with, and
//! the checks the runtime runs on every parameter group (no float NaN, then `validate`).
//!
//! A `validate` body is shared by the optimizer (`f64` fields) and its twin ([`Scalar`]
//! fields, possibly tensors, compared by value), so the helpers take either by reference:
//!
//! ```
//! use candle_higher_runtime::optim::validation::{in_range, require};
//! # fn main() {
//! let (lr, momentum) = (0.1f64, 0.0f64);
//! assert!(in_range("Sgd", "lr", &lr, 0.0..).is_ok());
//! let err = in_range("Adam", "betas.0", &1.0f64, 0.0..1.0).unwrap_err();
//! assert_eq!(err.to_string(), "Adam: invalid betas.0: 1; expected in [0, 1)");
//! assert!(require(momentum > 0.0, "Sgd", "momentum", &momentum, "> 0 with nesterov").is_err());
//! # }
//! ```

use std::ops::{Bound, RangeBounds};

use super::{Hyperparameters, OptimizerStep, Scalar, TwinHyperparameters};
use crate::error::{Error, Result};

/// The error for hyperparameter `name` of `optimizer` with value `value`.
pub fn hyperparameter_error(
    optimizer: &'static str,
    name: &str,
    value: f64,
    expected: impl Into<String>,
) -> Error {
    Error::InvalidHyperparameter {
        optimizer,
        name: name.to_string(),
        value,
        expected: expected.into(),
        group: None,
    }
}

/// The value of an `f64` or a [`Scalar`] (a tensor is read), for checks that combine
/// several hyperparameters.
pub fn value_of<T: Clone + Into<Scalar>>(value: &T) -> f64 {
    value.clone().into().value()
}

/// Ok when `ok`, else [`Error::InvalidHyperparameter`] naming `name`, its value and
/// `expected` (for conditions that involve several fields, e.g. Nesterov momentum).
pub fn require<T: Clone + Into<Scalar>>(
    ok: bool,
    optimizer: &'static str,
    name: &str,
    value: &T,
    expected: &str,
) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(hyperparameter_error(
            optimizer,
            name,
            value_of(value),
            expected,
        ))
    }
}

/// Ok when `value` lies in `range` (`0.0..` for `>= 0`, `0.0..1.0` for `[0, 1)`,
/// `(Bound::Excluded(0.0), Bound::Excluded(1.0))` for `(0, 1)`); NaN never does.
pub fn in_range<T: Clone + Into<Scalar>>(
    optimizer: &'static str,
    name: &str,
    value: &T,
    range: impl RangeBounds<f64>,
) -> Result<()> {
    let v = value_of(value);
    if !v.is_nan() && range.contains(&v) {
        return Ok(());
    }
    Err(hyperparameter_error(
        optimizer,
        name,
        v,
        describe(range.start_bound(), range.end_bound()),
    ))
}

/// `>= 0`, `> 1`, `in [0, 1)`, ... for a range.
fn describe(start: Bound<&f64>, end: Bound<&f64>) -> String {
    let lower = match start {
        Bound::Included(a) => Some(('[', ">=", a)),
        Bound::Excluded(a) => Some(('(', ">", a)),
        Bound::Unbounded => None,
    };
    let upper = match end {
        Bound::Included(b) => Some((']', "<=", b)),
        Bound::Excluded(b) => Some((')', "<", b)),
        Bound::Unbounded => None,
    };
    match (lower, upper) {
        (Some((open, _, a)), Some((close, _, b))) => format!("in {open}{a}, {b}{close}"),
        (Some((_, op, a)), None) | (None, Some((_, op, a))) => format!("{op} {a}"),
        (None, None) => "a number".to_string(),
    }
}

/// The optimizer's type name without its path (`Adam`), for error messages.
pub(crate) fn short_name<O>() -> &'static str {
    let full = std::any::type_name::<O>();
    full.rsplit("::").next().unwrap_or(full)
}

/// Puts the group index into a hyperparameter error.
fn in_group(error: Error, group: usize) -> Error {
    match error {
        Error::InvalidHyperparameter {
            optimizer,
            name,
            value,
            expected,
            group: None,
        } => Error::InvalidHyperparameter {
            optimizer,
            name,
            value,
            expected,
            group: Some(group),
        },
        other => other,
    }
}

fn not_nan(optimizer: &'static str, name: &str, value: f64) -> Result<()> {
    if value.is_nan() {
        return Err(hyperparameter_error(
            optimizer,
            name,
            value,
            "a number, not NaN",
        ));
    }
    Ok(())
}

/// The hyperparameters of parameter group `group`: no float is NaN, and the optimizer's
/// own `validate` accepts them. Float comparisons only: cheap enough for every step.
pub(crate) fn check_hyperparameters<O: Hyperparameters + OptimizerStep>(
    hyperparameters: &O,
    group: usize,
) -> Result<()> {
    for &name in O::FLOAT_NAMES {
        if let Some(v) = hyperparameters.float(name) {
            not_nan(short_name::<O>(), name, v).map_err(|e| in_group(e, group))?;
        }
    }
    hyperparameters.validate().map_err(|e| in_group(e, group))
}

/// The twin of parameter group `group`, as [`check_hyperparameters`]; tensors are read by
/// value (run when overrides are set, not at every step). A per-task tensor (one value per
/// task) is checked task by task, each task's values together.
pub(crate) fn check_twin<O: Hyperparameters>(twin: &O::Twin, group: usize) -> Result<()> {
    let mut per_task: Vec<(&'static str, Vec<f64>)> = Vec::new();
    for &name in O::FLOAT_NAMES {
        if let Some(Scalar::Tensor(t)) = twin.get(name) {
            if t.elem_count() > 1 {
                per_task.push((name, t.to_vec_f64()?));
            }
        }
    }
    let tasks = per_task.iter().map(|(_, v)| v.len()).max().unwrap_or(1);
    for task in 0..tasks {
        let mut one = twin.clone();
        for (name, values) in &per_task {
            one.set(name, Scalar::Float(values[task.min(values.len() - 1)]))?;
        }
        for &name in O::FLOAT_NAMES {
            if let Some(v) = one.get(name) {
                not_nan(short_name::<O>(), name, v.value()).map_err(|e| in_group(e, group))?;
            }
        }
        one.validate().map_err(|e| in_group(e, group))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::ops::Bound::{Excluded, Included};

    use super::*;
    use crate::tensor::Tensor;

    #[test]
    fn ranges_read_as_torch_writes_them() {
        let cases: [(Result<()>, &str); 5] = [
            (in_range("O", "a", &-0.1f64, 0.0..), ">= 0"),
            (in_range("O", "a", &1.0f64, 0.0..1.0), "in [0, 1)"),
            (in_range("O", "a", &1.5f64, 0.0..=1.0), "in [0, 1]"),
            (
                in_range("O", "a", &0.0f64, (Excluded(0.0), Excluded(1.0))),
                "in (0, 1)",
            ),
            (
                in_range(
                    "O",
                    "a",
                    &1.0f64,
                    (Excluded(1.0), std::ops::Bound::Unbounded),
                ),
                "> 1",
            ),
        ];
        for (result, expected) in cases {
            match result {
                Err(Error::InvalidHyperparameter { expected: e, .. }) => assert_eq!(e, expected),
                other => panic!("expected an invalid hyperparameter, got {other:?}"),
            }
        }
        assert!(in_range("O", "a", &1.0f64, (Included(0.0), Included(1.0))).is_ok());
        assert!(in_range("O", "a", &f64::NAN, ..).is_err());
    }

    #[test]
    fn tensors_are_checked_by_value() {
        let lr = Scalar::Tensor(Tensor::scalar(-0.5f64).to_leaf());
        match in_range("O", "lr", &lr, 0.0..) {
            Err(Error::InvalidHyperparameter { value, .. }) => assert_eq!(value, -0.5),
            other => panic!("expected an invalid hyperparameter, got {other:?}"),
        }
        assert!(in_range("O", "lr", &Scalar::Float(0.5), 0.0..).is_ok());
    }
}
