//! Dropout with a seeded mask, and Embedding.

use std::sync::{Arc, Mutex, MutexGuard};

use rand::rngs::StdRng;
use rand::Rng;

use super::{Module, Parameters, VarBuilder, Visitor};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// A seeded generator that layers draw from at each forward; cloning copies its state
/// (except in the copy of a layer that weight norm or weight dropout runs, which shares
/// it). A draw inside [`super::restore_buffers_on_error`] is undone if the pass fails.
pub(crate) struct SeededRng(Arc<Mutex<StdRng>>);

impl SeededRng {
    pub(crate) fn new(rng: StdRng) -> Self {
        SeededRng(Arc::new(Mutex::new(rng)))
    }

    fn lock(&self) -> MutexGuard<'_, StdRng> {
        lock(&self.0)
    }

    /// A constant mask with this tensor's shape: `1/(1-p)` with probability `1 - p`, else 0
    /// (all zeros at `p = 1`, as torch's dropout gives).
    pub(crate) fn dropout_mask(&self, like: &Tensor, p: f64) -> Result<Tensor> {
        // The mask's 1/(1-p) would be truncated in an integer dtype.
        like.require_float("dropout")?;
        // `p` is a public field of the layers: an edit after construction is checked here.
        check_p("dropout", p)?;
        let scale = if p < 1.0 { 1.0 / (1.0 - p) } else { 0.0 };
        let (data, before) = {
            let mut rng = self.lock();
            let before = rng.clone();
            let data: Vec<f64> = (0..like.elem_count())
                .map(|_| if rng.gen::<f64>() < p { 0.0 } else { scale })
                .collect();
            (data, before)
        };
        let mask = Tensor::from_vec(data, like.dims(), &candle_core::Device::Cpu)
            .and_then(|m| m.to_dtype(like.dtype()))
            .and_then(|m| m.to_device(like.device()));
        match mask {
            Ok(mask) => {
                // Undone with the pass this draw is part of, if that pass fails.
                super::module::journal_undo(|| {
                    let (rng, before) = (self.0.clone(), before);
                    move || *lock(&rng) = before
                });
                Ok(mask.detach())
            }
            Err(e) => {
                *self.lock() = before;
                Err(e)
            }
        }
    }
}

fn lock(rng: &Mutex<StdRng>) -> MutexGuard<'_, StdRng> {
    match rng.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl Clone for SeededRng {
    fn clone(&self) -> Self {
        if super::module::sharing_on_clone() {
            SeededRng(self.0.clone())
        } else {
            SeededRng::new(self.lock().clone())
        }
    }
}

pub(crate) fn check_p(op: &'static str, p: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&p) {
        return Err(Error::InvalidArgument {
            op,
            message: format!("dropout probability {p} is not in [0, 1]"),
        });
    }
    Ok(())
}

/// Dropout (`nn.Dropout(p)`): in training mode each element is zeroed with probability
/// `p` and the rest scaled by `1/(1-p)`; in eval mode it is the identity. Masks come from
/// a generator seeded by the builder (seed and name), advancing at each forward; a clone
/// continues from the same state. A forward that fails leaves the generator as it was, as
/// does a failing pass of a `Sequential` or `FunctionalModel` holding the layer (see
/// [`super::restore_buffers_on_error`]): a retried pass draws the mask the failed one drew.
#[derive(Clone)]
pub struct Dropout {
    /// Drop probability, in `[0, 1]` (checked at each forward).
    pub p: f64,
    /// Training mode.
    pub training: bool,
    rng: SeededRng,
}

impl std::fmt::Debug for Dropout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dropout(p = {}, training = {})", self.p, self.training)
    }
}

/// `nn.Dropout(p)` seeded from `vb` (its seed and name prefix).
pub fn dropout(p: f64, vb: VarBuilder) -> Result<Dropout> {
    check_p("dropout", p)?;
    Ok(Dropout {
        p,
        training: true,
        rng: SeededRng::new(vb.rng("dropout")),
    })
}

impl Module for Dropout {
    /// `p` is checked at every call, in eval mode too (as torch's `F.dropout`).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        check_p("dropout", self.p)?;
        if !self.training || self.p == 0.0 {
            return Ok(x.clone());
        }
        super::restore_buffers_on_error(|| x.mul(&self.rng.dropout_mask(x, self.p)?))
    }
}

impl Parameters for Dropout {
    fn visit(&mut self, v: &mut Visitor<'_>) -> Result<()> {
        v.training(&mut self.training)
    }
}

/// A lookup table (`nn.Embedding`): `weight` `[num_embeddings, dim]`, initialised N(0, 1).
/// The input holds integer indices (any dtype with whole values); the output has the
/// input's shape plus `dim`. Differentiable to any
/// order (`index_select`, whose backward is recorded).
#[derive(Clone, Debug)]
pub struct Embedding {
    /// `[num_embeddings, dim]`.
    pub weight: Tensor,
}

/// `nn.Embedding(num_embeddings, dim)`.
pub fn embedding(num_embeddings: usize, dim: usize, vb: VarBuilder) -> Result<Embedding> {
    Ok(Embedding {
        weight: vb.normal("weight", &[num_embeddings, dim], 0.0, 1.0)?,
    })
}

impl Module for Embedding {
    /// Task-batched when the weight is `[T, num_embeddings, dim]`: then `ids` is `[T, ..]`
    /// and task `t` looks up its own table.
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let batched = super::tasks::batched("Embedding", &self.weight, 2)?;
        let (table, tasks) = if batched {
            let d = self.weight.dims();
            super::tasks::check_input("Embedding", ids, d[0], 1)?;
            (self.weight.reshape(&[d[0] * d[1], d[2]])?, d[0])
        } else {
            (self.weight.clone(), 1)
        };
        // Rows per task from the weight itself: a table of zero tasks has no rows to divide.
        let n = self.weight.dims()[usize::from(batched)];
        let d = table.dims()[1];
        let mut idx = super::loss::class_indices("Embedding", ids, n)?;
        // Task t's rows start at t * n in the flattened table.
        let per_task = ids.elem_count() / tasks.max(1);
        for (i, v) in idx.iter_mut().enumerate() {
            *v += ((i / per_task.max(1)) * n) as u32;
        }
        let idx = Tensor::from_vec(idx, &[ids.elem_count()], self.weight.device())?;
        let mut shape = ids.dims().to_vec();
        shape.push(d);
        table.index_select(&idx, 0)?.reshape(&shape)
    }
}

impl Parameters for Embedding {
    fn visit(&mut self, v: &mut Visitor<'_>) -> Result<()> {
        v.param("weight", &mut self.weight)
    }
}
