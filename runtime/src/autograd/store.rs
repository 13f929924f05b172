//! `GradStore`: gradients of leaves, keyed by tensor identity.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::tensor::{Tensor, TensorId};

/// Gradients of leaf tensors, as returned by [`crate::backward`]. Stores from several
/// tasks add up with [`GradStore::accumulate`] (the outer loop of MAML sums per-task
/// meta-gradients).
#[derive(Clone, Debug, Default)]
pub struct GradStore {
    grads: HashMap<TensorId, Tensor>,
}

impl GradStore {
    /// The gradient of `leaf`, if the output depended on it.
    pub fn get(&self, leaf: &Tensor) -> Option<&Tensor> {
        self.grads.get(&leaf.id())
    }

    /// The gradient of the leaf with this id.
    pub fn get_id(&self, id: TensorId) -> Option<&Tensor> {
        self.grads.get(&id)
    }

    /// Sets the gradient of `leaf`, replacing any previous one.
    pub fn insert(&mut self, leaf: &Tensor, grad: Tensor) {
        self.grads.insert(leaf.id(), grad);
    }

    /// Removes and returns the gradient of `leaf`.
    pub fn remove(&mut self, leaf: &Tensor) -> Option<Tensor> {
        self.grads.remove(&leaf.id())
    }

    /// Adds every gradient of `other` into this store (keys missing here are copied). A
    /// gradient whose shape, dtype or device is not that of the one stored for its leaf is an
    /// error (not a broadcast), and a failing call changes nothing.
    pub fn accumulate(&mut self, other: &GradStore) -> Result<()> {
        self.accumulate_from(other, "GradStore::accumulate")
    }

    /// [`GradStore::accumulate`], with `op` naming the caller in errors. Every sum is
    /// computed before any is stored; of several mismatched leaves, the one with the
    /// smallest id is reported (the same on every run, unlike the map's order).
    pub(crate) fn accumulate_from(&mut self, other: &GradStore, op: &'static str) -> Result<()> {
        let mismatch = other
            .grads
            .iter()
            .filter_map(|(id, g)| self.grads.get(id).map(|prev| (*id, prev, g)))
            .filter(|(_, prev, g)| {
                prev.dims() != g.dims()
                    || prev.dtype() != g.dtype()
                    || !prev.device().same_device(g.device())
            })
            .min_by_key(|(id, _, _)| *id);
        if let Some((_, prev, g)) = mismatch {
            if prev.dims() != g.dims() {
                return Err(Error::ShapeMismatch {
                    op,
                    expected: format!(
                        "{:?}, the shape of the gradient stored for this leaf",
                        prev.dims()
                    ),
                    got: g.dims().to_vec(),
                });
            }
            prev.check_same(g, op)?;
        }
        let sums = other
            .grads
            .iter()
            .map(|(id, g)| {
                let sum = match self.grads.get(id) {
                    Some(prev) => prev.add(g)?,
                    None => g.clone(),
                };
                Ok((*id, sum))
            })
            .collect::<Result<Vec<_>>>()?;
        self.grads.extend(sums);
        Ok(())
    }

    /// Multiplies every gradient by `factor` (an average over tasks: `1 / n`). A factor
    /// that is NaN or infinite is an error, and a failing call (anomaly detection finding
    /// a NaN) changes nothing.
    pub fn scale(&mut self, factor: f64) -> Result<()> {
        if !factor.is_finite() {
            return Err(Error::InvalidArgument {
                op: "GradStore::scale",
                message: format!("factor {factor}: expected a finite number"),
            });
        }
        let scaled = self
            .grads
            .iter()
            .map(|(id, g)| Ok((*id, g.affine(factor, 0.0)?)))
            .collect::<Result<Vec<_>>>()?;
        self.grads.extend(scaled);
        Ok(())
    }

    /// Number of leaves with a gradient.
    pub fn len(&self) -> usize {
        self.grads.len()
    }

    /// Whether no leaf has a gradient.
    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    /// The leaf ids with a gradient.
    pub fn ids(&self) -> impl Iterator<Item = TensorId> + '_ {
        self.grads.keys().copied()
    }
}
