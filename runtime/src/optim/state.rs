//! Per-parameter optimizer state: named tensors, scalars and integer counters.

use std::collections::BTreeMap;

use super::Scalar;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// One entry of an optimizer's per-parameter state.
#[derive(Clone, Debug)]
pub enum StateValue {
    /// A tensor (moment estimates, momentum buffers, ...).
    Tensor(Tensor),
    /// A float that may depend on a hyperparameter (ASGD's `eta`, `mu`).
    Scalar(Scalar),
    /// An integer counter (`step`).
    Int(i64),
}

/// The state of one parameter, keyed by name as in `torch.optim` (`exp_avg`, `step`, ...).
///
/// Entries are created lazily on the first step. Tensors are immutable handles, so a
/// cloned `State` is an independent snapshot: the differentiable twin threads states
/// functionally by cloning, which costs one map of `Arc` clones.
#[derive(Clone, Debug, Default)]
pub struct State {
    entries: BTreeMap<String, StateValue>,
}

impl State {
    /// An empty state (before the first step).
    pub fn new() -> Self {
        Self::default()
    }

    /// The tensor entry `key`, created by `init` if it does not exist yet.
    pub fn get_or_insert_with(
        &mut self,
        key: &str,
        init: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Tensor> {
        if let Some(StateValue::Tensor(t)) = self.entries.get(key) {
            return Ok(t.clone());
        }
        if self.entries.contains_key(key) {
            return Err(wrong_kind(key, "a tensor"));
        }
        let t = init()?;
        self.entries
            .insert(key.to_string(), StateValue::Tensor(t.clone()));
        Ok(t)
    }

    /// The tensor entry `key`; an error names it when it does not exist.
    pub fn get(&self, key: &str) -> Result<Tensor> {
        match self.entries.get(key) {
            Some(StateValue::Tensor(t)) => Ok(t.clone()),
            Some(_) => Err(wrong_kind(key, "a tensor")),
            None => Err(missing(key)),
        }
    }

    /// Sets the tensor entry `key`.
    pub fn set(&mut self, key: &str, value: Tensor) {
        self.entries
            .insert(key.to_string(), StateValue::Tensor(value));
    }

    /// The scalar entry `key`, created by `init` if it does not exist yet.
    pub fn scalar_or_insert_with(
        &mut self,
        key: &str,
        init: impl FnOnce() -> Scalar,
    ) -> Result<Scalar> {
        match self.entries.get(key) {
            Some(StateValue::Scalar(s)) => Ok(s.clone()),
            Some(_) => Err(wrong_kind(key, "a scalar")),
            None => {
                let s = init();
                self.entries
                    .insert(key.to_string(), StateValue::Scalar(s.clone()));
                Ok(s)
            }
        }
    }

    /// The scalar entry `key`; an error names it when it does not exist.
    pub fn scalar(&self, key: &str) -> Result<Scalar> {
        match self.entries.get(key) {
            Some(StateValue::Scalar(s)) => Ok(s.clone()),
            Some(_) => Err(wrong_kind(key, "a scalar")),
            None => Err(missing(key)),
        }
    }

    /// Sets the scalar entry `key`.
    pub fn set_scalar(&mut self, key: &str, value: impl Into<Scalar>) {
        self.entries
            .insert(key.to_string(), StateValue::Scalar(value.into()));
    }

    /// Increments the counter `key` (0 before the first call) and returns its new value:
    /// `let step = state.increment("step");` gives 1 on the first step.
    pub fn increment(&mut self, key: &str) -> i64 {
        let next = self.int(key).unwrap_or(0) + 1;
        self.entries.insert(key.to_string(), StateValue::Int(next));
        next
    }

    /// The counter `key`, if set.
    pub fn int(&self, key: &str) -> Option<i64> {
        match self.entries.get(key) {
            Some(StateValue::Int(n)) => Some(*n),
            _ => None,
        }
    }

    /// Sets the counter `key`.
    pub fn set_int(&mut self, key: &str, value: i64) {
        self.entries.insert(key.to_string(), StateValue::Int(value));
    }

    /// Whether the entry `key` exists.
    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// Whether no entry exists (the parameter has not been stepped).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// All entries, in key order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &StateValue)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Sets any entry.
    pub fn insert(&mut self, key: &str, value: StateValue) {
        self.entries.insert(key.to_string(), value);
    }

    /// Applies `f` to every tensor entry (and the tensor of every scalar entry):
    /// detaching or moving a whole state.
    pub fn map_tensors(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<State> {
        let mut out = State::new();
        for (k, v) in &self.entries {
            let v = match v {
                StateValue::Tensor(t) => StateValue::Tensor(f(t)?),
                StateValue::Scalar(Scalar::Tensor(t)) => StateValue::Scalar(Scalar::Tensor(f(t)?)),
                other => other.clone(),
            };
            out.entries.insert(k.clone(), v);
        }
        Ok(out)
    }
}

fn missing(key: &str) -> Error {
    Error::InvalidArgument {
        op: "optimizer state",
        message: format!("no entry \"{key}\"; create it with get_or_insert_with before reading it"),
    }
}

fn wrong_kind(key: &str, wanted: &str) -> Error {
    Error::InvalidArgument {
        op: "optimizer state",
        message: format!("entry \"{key}\" is not {wanted}"),
    }
}
