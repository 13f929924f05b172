//! `GradStore`: gradients of leaves, keyed by tensor identity.

use std::collections::HashMap;

use crate::error::Result;
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

    /// Adds every gradient of `other` into this store (keys missing here are copied).
    pub fn accumulate(&mut self, other: &GradStore) -> Result<()> {
        for (id, g) in &other.grads {
            let sum = match self.grads.get(id) {
                Some(prev) => prev.add(g)?,
                None => g.clone(),
            };
            self.grads.insert(*id, sum);
        }
        Ok(())
    }

    /// Multiplies every gradient by `factor` (an average over tasks: `1 / n`).
    pub fn scale(&mut self, factor: f64) -> Result<()> {
        for g in self.grads.values_mut() {
            *g = g.affine(factor, 0.0)?;
        }
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
