//! Per-parameter optimizer state: named tensors, scalars and integer counters.
//!
//! Tensor entries behave like torch's state tensors: [`State::get`] and
//! [`State::get_or_insert_with`] return a [`StateTensor`], another name for the entry
//! itself, so an in-place op on the local *is* the update of the state, on every path
//! through a step (tuples, `if let`, `let .. else`, loops with `continue`, helper
//! functions). Nothing has to be written back, so no analysis of the step body can miss
//! a write.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use elsa::sync::FrozenVec;

use super::Scalar;
use crate::error::{Error, Result};
use crate::ops::Operand;
use crate::tensor::Tensor;

/// One entry of an optimizer's per-parameter state, as read back from a [`State`].
#[derive(Clone, Debug)]
pub enum StateValue {
    /// A tensor (moment estimates, momentum buffers, ...).
    Tensor(Tensor),
    /// A float that may depend on a hyperparameter (ASGD's `eta`, `mu`).
    Scalar(Scalar),
    /// An integer counter (`step`).
    Int(i64),
}

/// A tensor entry of a [`State`], shared with the entry the way a torch state tensor is
/// shared with `state['k']`: in-place ops (`mul_`, `add_`, ...) through any handle update
/// the entry, and every handle (and the state) sees the update.
///
/// It dereferences to the entry's current [`Tensor`], so out-of-place ops read it as a
/// tensor. Two kinds of copy, as in torch:
/// - `m.clone()` is torch's `m.clone()`: a new [`Tensor`] holding the current value,
///   unaffected by later updates of the entry;
/// - `Clone::clone(&m)` (and moving `m` to another name) is Python's `m2 = m`: another
///   handle to the same entry.
///
/// A handle stays attached to its entry until [`State::set`] replaces the entry; updates
/// through it then no longer reach the state, as in torch after `state['k'] = other`.
pub struct StateTensor(Arc<Slot>);

/// The versions an entry went through during one step, the current one last. Versions
/// are never removed while a handle exists (so `Deref` can hand out references); a
/// state is re-slotted with its current values before every step, which bounds them.
struct Slot(FrozenVec<Box<Tensor>>);

impl Slot {
    fn new(t: Tensor) -> Self {
        let versions = FrozenVec::new();
        versions.push(Box::new(t));
        Slot(versions)
    }

    fn current(&self) -> &Tensor {
        // Never empty: created with one version, only ever pushed to.
        self.0
            .get(self.0.len() - 1)
            .expect("a state slot holds at least one version")
    }
}

impl StateTensor {
    /// A new entry holding `t`, attached to no state yet.
    pub fn new(t: Tensor) -> Self {
        StateTensor(Arc::new(Slot::new(t)))
    }

    /// The entry's current value: torch's `clone()` (see the type's doc).
    #[allow(clippy::should_implement_trait)]
    pub fn clone(&self) -> Tensor {
        self.current().clone()
    }

    /// The entry's current value as a plain [`Tensor`].
    pub fn tensor(&self) -> Tensor {
        self.current().clone()
    }

    fn current(&self) -> &Tensor {
        self.0.current()
    }

    /// Makes `value` the entry's current value, for every handle.
    fn replace(&self, value: Tensor) -> &Self {
        self.0 .0.push(Box::new(value));
        self
    }

    /// Whether two handles name the same entry.
    pub fn same_entry(&self, other: &StateTensor) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Updates the entry to `self + rhs` (torch's `add_`).
    pub fn add_(&self, rhs: impl Into<Operand>) -> Result<&Self> {
        Ok(self.replace(self.current().add(rhs)?))
    }

    /// Updates the entry to `self - rhs`.
    pub fn sub_(&self, rhs: impl Into<Operand>) -> Result<&Self> {
        Ok(self.replace(self.current().sub(rhs)?))
    }

    /// Updates the entry to `self - alpha * other` (see [`Tensor::sub_scaled`]).
    pub fn sub_scaled_(&self, other: &Tensor, alpha: impl Into<Operand>) -> Result<&Self> {
        Ok(self.replace(self.current().sub_scaled(other, alpha)?))
    }

    /// Updates the entry to `self * rhs`.
    pub fn mul_(&self, rhs: impl Into<Operand>) -> Result<&Self> {
        Ok(self.replace(self.current().mul(rhs)?))
    }

    /// Updates the entry to `self / rhs`.
    pub fn div_(&self, rhs: impl Into<Operand>) -> Result<&Self> {
        Ok(self.replace(self.current().div(rhs)?))
    }

    /// Updates the entry to `self + value * t1 * t2` (`torch.addcmul_`).
    pub fn addcmul_(&self, t1: &Tensor, t2: &Tensor, value: impl Into<Operand>) -> Result<&Self> {
        let mut t = self.current().clone();
        t.addcmul_(t1, t2, value)?;
        Ok(self.replace(t))
    }

    /// Updates the entry to `self + value * t1 / t2` (`torch.addcdiv_`).
    pub fn addcdiv_(&self, t1: &Tensor, t2: &Tensor, value: impl Into<Operand>) -> Result<&Self> {
        let mut t = self.current().clone();
        t.addcdiv_(t1, t2, value)?;
        Ok(self.replace(t))
    }

    /// Updates the entry to `self + weight * (end - self)` (`torch.lerp_`).
    pub fn lerp_(&self, end: &Tensor, weight: impl Into<Operand>) -> Result<&Self> {
        let mut t = self.current().clone();
        t.lerp_(end, weight)?;
        Ok(self.replace(t))
    }

    /// Updates the entry to its square root (safe at zero).
    pub fn sqrt_(&self) -> Result<&Self> {
        Ok(self.replace(self.current().sqrt()?))
    }

    /// Updates the entry to `maximum(self, rhs)`.
    pub fn maximum_(&self, rhs: impl Into<Operand>) -> Result<&Self> {
        Ok(self.replace(self.current().maximum(rhs)?))
    }

    /// Updates the entry to `clamp(self, min, max)`.
    pub fn clamp_(&self, min: impl Into<Operand>, max: impl Into<Operand>) -> Result<&Self> {
        Ok(self.replace(self.current().clamp(min, max)?))
    }

    /// Updates the entry to `value` (torch's `copy_`).
    pub fn set_(&self, value: &Tensor) -> Result<&Self> {
        Ok(self.replace(value.clone()))
    }

    /// Updates the entry to zeros of its shape.
    pub fn zero_(&self) -> Result<&Self> {
        Ok(self.replace(self.current().zeros_like()?))
    }
}

/// Another handle to the same entry (Python's `m2 = m`); see the type's doc.
impl Clone for StateTensor {
    fn clone(&self) -> Self {
        StateTensor(Arc::clone(&self.0))
    }
}

impl Deref for StateTensor {
    type Target = Tensor;
    fn deref(&self) -> &Tensor {
        self.current()
    }
}

impl AsRef<Tensor> for StateTensor {
    fn as_ref(&self) -> &Tensor {
        self.current()
    }
}

impl fmt::Debug for StateTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StateTensor({:?})", self.current())
    }
}

impl From<Tensor> for StateTensor {
    fn from(t: Tensor) -> Self {
        StateTensor::new(t)
    }
}

impl From<&Tensor> for StateTensor {
    fn from(t: &Tensor) -> Self {
        StateTensor::new(t.clone())
    }
}

impl From<StateTensor> for Operand {
    fn from(t: StateTensor) -> Self {
        Operand::Tensor(t.tensor())
    }
}

impl From<&StateTensor> for Operand {
    fn from(t: &StateTensor) -> Self {
        Operand::Tensor(t.tensor())
    }
}

/// How an entry is held.
enum Entry {
    Tensor(StateTensor),
    Scalar(Scalar),
    Int(i64),
}

/// The state of one parameter, keyed by name as in `torch.optim` (`exp_avg`, `step`, ...).
///
/// Entries are created lazily on the first step. Tensor entries are [`StateTensor`]s:
/// handles that alias their entry, as torch's state tensors do. Cloning a `State` takes a
/// snapshot: the clone's entries hold the current values in entries of their own (entries
/// that shared one tensor still share one), so stepping a clone leaves the original as it
/// was. The differentiable twin threads states functionally that way.
#[derive(Default)]
pub struct State {
    entries: BTreeMap<String, Entry>,
}

impl Clone for State {
    fn clone(&self) -> Self {
        let mut fresh: Vec<(&StateTensor, StateTensor)> = Vec::new();
        let entries = self
            .entries
            .iter()
            .map(|(k, e)| {
                let e = match e {
                    Entry::Tensor(t) => {
                        let copy = match fresh.iter().find(|(old, _)| old.same_entry(t)) {
                            Some((_, new)) => Clone::clone(new),
                            None => {
                                let new = StateTensor::new(t.tensor());
                                fresh.push((t, Clone::clone(&new)));
                                new
                            }
                        };
                        Entry::Tensor(copy)
                    }
                    Entry::Scalar(s) => Entry::Scalar(s.clone()),
                    Entry::Int(n) => Entry::Int(*n),
                };
                (k.clone(), e)
            })
            .collect();
        State { entries }
    }
}

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.entries()).finish()
    }
}

impl State {
    /// An empty state (before the first step).
    pub fn new() -> Self {
        Self::default()
    }

    /// Drops the versions a step left in each entry, keeping the current value, as a
    /// snapshot ([`Clone`]) would: in place where no other handle holds the entry, else by
    /// taking the snapshot (which keeps entries that share a tensor shared).
    pub(crate) fn keep_current_only(&mut self) {
        let mut shared = false;
        for entry in self.entries.values_mut() {
            if let Entry::Tensor(t) = entry {
                match Arc::get_mut(&mut t.0) {
                    Some(slot) if slot.0.len() > 1 => *slot = Slot::new(slot.current().clone()),
                    Some(_) => {}
                    None => shared = true,
                }
            }
        }
        if shared {
            *self = self.clone();
        }
    }

    /// The tensor entry `key`, created by `init` if it does not exist yet. The handle is
    /// the entry: updating it in place updates the state.
    pub fn get_or_insert_with(
        &mut self,
        key: &str,
        init: impl FnOnce() -> Result<Tensor>,
    ) -> Result<StateTensor> {
        match self.entries.get(key) {
            Some(Entry::Tensor(t)) => return Ok(Clone::clone(t)),
            Some(_) => return Err(wrong_kind(key, "a tensor")),
            None => {}
        }
        let t = StateTensor::new(init()?);
        self.entries
            .insert(key.to_string(), Entry::Tensor(Clone::clone(&t)));
        Ok(t)
    }

    /// The tensor entry `key` (a handle that aliases it); an error names it when it does
    /// not exist.
    pub fn get(&self, key: &str) -> Result<StateTensor> {
        match self.entries.get(key) {
            Some(Entry::Tensor(t)) => Ok(Clone::clone(t)),
            Some(_) => Err(wrong_kind(key, "a tensor")),
            None => Err(missing(key)),
        }
    }

    /// The current value of the tensor entry `key`, as a plain tensor.
    pub fn tensor(&self, key: &str) -> Result<Tensor> {
        self.get(key).map(|t| t.tensor())
    }

    /// Sets the tensor entry `key` (torch's `state['k'] = value`). A [`Tensor`] becomes a
    /// new entry; a [`StateTensor`] makes `key` another name for that entry. Handles to
    /// the entry `key` held before stay attached to the old entry.
    pub fn set(&mut self, key: &str, value: impl Into<StateTensor>) {
        self.entries
            .insert(key.to_string(), Entry::Tensor(value.into()));
    }

    /// The scalar entry `key`, created by `init` if it does not exist yet. Scalars are
    /// values (Python floats): change one with [`State::set_scalar`].
    pub fn scalar_or_insert_with(
        &mut self,
        key: &str,
        init: impl FnOnce() -> Scalar,
    ) -> Result<Scalar> {
        match self.entries.get(key) {
            Some(Entry::Scalar(s)) => Ok(s.clone()),
            Some(_) => Err(wrong_kind(key, "a scalar")),
            None => {
                let s = init();
                self.entries
                    .insert(key.to_string(), Entry::Scalar(s.clone()));
                Ok(s)
            }
        }
    }

    /// The scalar entry `key`; an error names it when it does not exist.
    pub fn scalar(&self, key: &str) -> Result<Scalar> {
        match self.entries.get(key) {
            Some(Entry::Scalar(s)) => Ok(s.clone()),
            Some(_) => Err(wrong_kind(key, "a scalar")),
            None => Err(missing(key)),
        }
    }

    /// Sets the scalar entry `key`.
    pub fn set_scalar(&mut self, key: &str, value: impl Into<Scalar>) {
        self.entries
            .insert(key.to_string(), Entry::Scalar(value.into()));
    }

    /// Increments the counter `key` (0 before the first call) and returns its new value:
    /// `let step = state.increment("step");` gives 1 on the first step.
    pub fn increment(&mut self, key: &str) -> i64 {
        let next = self.int(key).unwrap_or(0) + 1;
        self.entries.insert(key.to_string(), Entry::Int(next));
        next
    }

    /// The counter `key`, if set.
    pub fn int(&self, key: &str) -> Option<i64> {
        match self.entries.get(key) {
            Some(Entry::Int(n)) => Some(*n),
            _ => None,
        }
    }

    /// Sets the counter `key`.
    pub fn set_int(&mut self, key: &str, value: i64) {
        self.entries.insert(key.to_string(), Entry::Int(value));
    }

    /// Whether the entry `key` exists.
    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// Whether no entry exists (the parameter has not been stepped).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry `key`'s current value, if it exists.
    pub fn value(&self, key: &str) -> Option<StateValue> {
        self.entries.get(key).map(Entry::value)
    }

    /// All entries with their current values, in key order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, StateValue)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.value()))
    }

    /// Sets any entry.
    pub fn insert(&mut self, key: &str, value: StateValue) {
        let entry = match value {
            StateValue::Tensor(t) => Entry::Tensor(StateTensor::new(t)),
            StateValue::Scalar(s) => Entry::Scalar(s),
            StateValue::Int(n) => Entry::Int(n),
        };
        self.entries.insert(key.to_string(), entry);
    }

    /// Applies `f` to every tensor entry (and the tensor of every scalar entry):
    /// detaching or moving a whole state. Entries that shared a tensor share the result.
    pub fn map_tensors(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<State> {
        let snapshot = self.clone();
        let mut out = State::new();
        let mut mapped: Vec<(StateTensor, StateTensor)> = Vec::new();
        for (k, v) in &snapshot.entries {
            let v = match v {
                Entry::Tensor(t) => match mapped.iter().find(|(old, _)| old.same_entry(t)) {
                    Some((_, new)) => Entry::Tensor(Clone::clone(new)),
                    None => {
                        let new = StateTensor::new(f(t)?);
                        mapped.push((Clone::clone(t), Clone::clone(&new)));
                        Entry::Tensor(new)
                    }
                },
                Entry::Scalar(Scalar::Tensor(t)) => Entry::Scalar(Scalar::Tensor(f(t)?)),
                Entry::Scalar(s) => Entry::Scalar(s.clone()),
                Entry::Int(n) => Entry::Int(*n),
            };
            out.entries.insert(k.clone(), v);
        }
        Ok(out)
    }
}

impl Entry {
    fn value(&self) -> StateValue {
        match self {
            Entry::Tensor(t) => StateValue::Tensor(t.tensor()),
            Entry::Scalar(s) => StateValue::Scalar(s.clone()),
            Entry::Int(n) => StateValue::Int(*n),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(t: &Tensor) -> Vec<f64> {
        t.to_vec_f64().unwrap()
    }

    /// torch semantics: a local bound to an entry and the entry are one tensor until
    /// `set` replaces the entry; `clone()` copies; a cloned state is a snapshot.
    #[test]
    fn handles_alias_their_entry_like_torch_state_tensors() -> Result<()> {
        let mut s = State::new();
        let m = s.get_or_insert_with("m", || Ok(Tensor::scalar(1.0f64)))?;
        let copy = m.clone();
        let alias = Clone::clone(&m);
        m.mul_(3.0)?;
        assert_eq!(vals(&s.tensor("m")?), [3.0]);
        assert_eq!(vals(&alias), [3.0]);
        assert_eq!(vals(&copy), [1.0]);
        alias.add_(1.0)?;
        assert_eq!(vals(&s.tensor("m")?), [4.0]);

        let snapshot = s.clone();
        s.get("m")?.mul_(2.0)?;
        assert_eq!(vals(&snapshot.tensor("m")?), [4.0]);
        assert_eq!(vals(&s.tensor("m")?), [8.0]);

        s.set("m", Tensor::scalar(0.5f64));
        m.mul_(10.0)?;
        assert_eq!(vals(&s.tensor("m")?), [0.5]);
        assert_eq!(vals(&m), [80.0]);
        Ok(())
    }

    /// Two keys set to one entry stay one entry, in the state and in its snapshots.
    #[test]
    fn shared_entries_stay_shared_across_snapshots() -> Result<()> {
        let mut s = State::new();
        let a = s.get_or_insert_with("a", || Ok(Tensor::scalar(2.0f64)))?;
        s.set("b", Clone::clone(&a));
        let snap = s.clone();
        snap.get("a")?.mul_(5.0)?;
        assert_eq!(vals(&snap.tensor("b")?), [10.0]);
        assert_eq!(vals(&s.tensor("b")?), [2.0]);
        let moved = s.map_tensors(|t| t.add(1.0))?;
        moved.get("b")?.mul_(2.0)?;
        assert_eq!(vals(&moved.tensor("a")?), [6.0]);
        Ok(())
    }

    /// Dropping a step's versions keeps the current values and what a snapshot keeps:
    /// shared entries stay shared, and a handle from before no longer reaches the state.
    #[test]
    fn keeping_current_values_only_is_a_snapshot() -> Result<()> {
        let versions = |s: &State, key: &str| match s.entries.get(key) {
            Some(Entry::Tensor(t)) => t.0 .0.len(),
            _ => 0,
        };
        let mut s = State::new();
        let m = s.get_or_insert_with("m", || Ok(Tensor::scalar(1.0f64)))?;
        m.mul_(3.0)?.add_(1.0)?;
        drop(m);
        s.increment("step");
        assert_eq!(versions(&s, "m"), 3);
        s.keep_current_only();
        assert_eq!((versions(&s, "m"), vals(&s.tensor("m")?)), (1, vec![4.0]));
        assert_eq!(s.int("step"), Some(1));

        let a = s.get_or_insert_with("a", || Ok(Tensor::scalar(2.0f64)))?;
        s.set("b", Clone::clone(&a));
        a.mul_(5.0)?;
        s.keep_current_only();
        assert_eq!(vals(&s.tensor("b")?), [10.0]);
        s.get("a")?.add_(1.0)?;
        assert_eq!(vals(&s.tensor("b")?), [11.0]);
        a.mul_(100.0)?;
        assert_eq!(vals(&s.tensor("a")?), [11.0]);
        Ok(())
    }
}
