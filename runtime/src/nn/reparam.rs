//! Weight reparametrizations: the layer computes with a function of raw parameters, and
//! the raw ones are what is listed, updated and differentiated (so they work inside a
//! `FunctionalModel`, unlike PyTorch's hook-based versions under `higher`, issue #14).

use super::dropout::{check_p, SeededRng};
use super::{walk, Entry, Module, Parameters, VarBuilder, Visitor};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The parameter `name` of `module` (full dotted name relative to it).
fn find_param<L: Parameters + Clone>(op: &'static str, module: &L, name: &str) -> Result<Tensor> {
    let mut copy = module.clone();
    let mut found = None;
    let mut known = Vec::new();
    walk(&mut copy, &mut |n, e| {
        if let Entry::Param(t) = e {
            if n == name {
                found = Some(t.clone());
            }
            known.push(n.to_string());
        }
        Ok(())
    })?;
    found.ok_or_else(|| Error::InvalidArgument {
        op,
        message: format!("no parameter named \"{name}\"; known: {}", known.join(", ")),
    })
}

/// A clone of `module` with the named slots replaced, sharing `module`'s buffers.
fn with_replaced<L: Parameters + Clone>(
    module: &L,
    names: &[String],
    values: &[Tensor],
) -> Result<L> {
    let mut m = super::module::clone_sharing_buffers(module);
    walk(&mut m, &mut |n, e| {
        if let Entry::Param(t) = e {
            if let Some(i) = names.iter().position(|x| x == n) {
                *t = values[i].clone();
            }
        }
        Ok(())
    })?;
    Ok(m)
}

/// The shape of the wrapped layer's own (hidden) slot `name`: the weight's shape without a
/// task axis, whatever the fmodel holding the wrapper does with the raw parameters.
fn nominal_shape<L: Parameters + Clone>(
    op: &'static str,
    module: &L,
    name: &str,
) -> Result<Vec<usize>> {
    Ok(find_param(op, module, name)?.dims().to_vec())
}

/// fastai's `WeightDropout` (AWD-LSTM): at every forward in training mode, dropout is
/// applied to the raw weights and the wrapped layer runs with the dropped weights.
///
/// Parameters: the wrapped layer's under `module.` except the dropped ones, then each
/// dropped weight's raw tensor as `<name>_raw` (fastai's names). In eval mode the raw
/// weights are used unchanged. Masks come from a seeded generator, or are fixed with
/// [`WeightDropout::fix_masks`] (e.g. to check gradients by finite differences).
///
/// Task-batched (raw weights `[T, ..]`, in a task-batched fmodel): a drawn mask has the
/// raw weight's shape, so every task gets its own independent mask; a fixed mask is either
/// shared by all tasks (the weight's own shape) or one per task (`[T, ..]`).
#[derive(Clone)]
pub struct WeightDropout<L> {
    /// The wrapped layer (its dropped slots are overwritten at each forward).
    pub module: L,
    /// Dotted names (relative to the layer) of the weights to drop.
    pub names: Vec<String>,
    /// The raw weights, one per name.
    pub raw: Vec<Tensor>,
    /// Drop probability.
    pub p: f64,
    /// Training mode.
    pub training: bool,
    rng: SeededRng,
    fixed: Option<Vec<Tensor>>,
}

impl<L> std::fmt::Debug for WeightDropout<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightDropout({:?}, p = {})", self.names, self.p)
    }
}

/// Wraps `module`, dropping the weights `names` with probability `p`; masks are seeded
/// from `vb`.
pub fn weight_dropout<L: Module + Parameters + Clone>(
    module: L,
    names: &[&str],
    p: f64,
    vb: VarBuilder,
) -> Result<WeightDropout<L>> {
    check_p("weight_dropout", p)?;
    let raw = names
        .iter()
        .map(|n| find_param("weight_dropout", &module, n))
        .collect::<Result<_>>()?;
    Ok(WeightDropout {
        module,
        names: names.iter().map(|n| n.to_string()).collect(),
        raw,
        p,
        training: true,
        rng: SeededRng::new(vb.rng("weight_dropout")),
        fixed: None,
    })
}

impl<L: Module + Parameters + Clone> WeightDropout<L> {
    /// Draws one set of masks (constants, `0` or `1/(1-p)`) from the generator. On error
    /// (a raw weight that is not floating point) the generator is left as it was.
    pub fn sample_masks(&self) -> Result<Vec<Tensor>> {
        super::restore_buffers_on_error(|| {
            self.raw
                .iter()
                .map(|w| self.rng.dropout_mask(w, self.p))
                .collect()
        })
    }

    /// Uses these masks at every forward from now on, one per dropped weight: of the
    /// weight's shape (shared by every task of a task-batched run), or with a leading task
    /// axis `[T, ..]` (row `t` for task `t`; only for a task-batched run with `T` tasks).
    pub fn fix_masks(&mut self, masks: Vec<Tensor>) -> Result<()> {
        if masks.len() != self.raw.len() {
            return Err(Error::ParamCount {
                op: "fix_masks",
                what: "masks",
                expected: self.raw.len(),
                got: masks.len(),
            });
        }
        for (position, (n, m)) in self.names.iter().zip(&masks).enumerate() {
            let shape = nominal_shape("fix_masks", &self.module, n)?;
            let per_task = m.rank() == shape.len() + 1 && m.dims()[1..] == shape[..];
            if m.dims() != shape.as_slice() && !per_task {
                return Err(Error::ParamShape {
                    op: "fix_masks",
                    position,
                    name: n.clone(),
                    expected: shape,
                    got: m.dims().to_vec(),
                });
            }
        }
        self.fixed = Some(masks.iter().map(Tensor::detach).collect());
        Ok(())
    }

    /// Checks the fixed masks against the raw weights of this forward: a per-task mask
    /// needs raw weights with the same task axis.
    fn check_fixed(&self, masks: &[Tensor]) -> Result<()> {
        for ((n, w), m) in self.names.iter().zip(&self.raw).zip(masks) {
            let shape = nominal_shape("WeightDropout", &self.module, n)?;
            if m.dims() != shape.as_slice() && m.dims() != w.dims() {
                return Err(Error::ShapeMismatch {
                    op: "WeightDropout",
                    expected: format!(
                        "a mask for \"{n}\" of shape {shape:?} or of its raw weight's {:?} \
                         (per-task masks need a task-batched run with as many tasks)",
                        w.dims()
                    ),
                    got: m.dims().to_vec(),
                });
            }
        }
        Ok(())
    }

    /// Goes back to drawing a fresh mask at each forward.
    pub fn unfix_masks(&mut self) {
        self.fixed = None;
    }
}

impl<L: Module + Parameters + Clone> Module for WeightDropout<L> {
    /// A forward that fails (in the wrapped layer too) leaves the generator as it was, and
    /// the buffers of the wrapped layer (see [`super::restore_buffers_on_error`]).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        super::restore_buffers_on_error(|| self.forward_unguarded(x))
    }
}

impl<L: Module + Parameters + Clone> WeightDropout<L> {
    fn forward_unguarded(&self, x: &Tensor) -> Result<Tensor> {
        let weights: Vec<Tensor> = if !self.training || self.p == 0.0 {
            self.raw.clone()
        } else {
            let masks = match &self.fixed {
                Some(m) => {
                    self.check_fixed(m)?;
                    m.clone()
                }
                None => self.sample_masks()?,
            };
            self.raw
                .iter()
                .zip(&masks)
                .map(|(w, m)| w.mul(m))
                .collect::<Result<_>>()?
        };
        with_replaced(&self.module, &self.names, &weights)?.forward(x)
    }
}

impl<L: Parameters> Parameters for WeightDropout<L> {
    fn visit(&mut self, v: &mut Visitor<'_>) -> Result<()> {
        v.module_hiding("module", &mut self.module, &self.names)?;
        for (n, w) in self.names.iter().zip(self.raw.iter_mut()) {
            v.param(&format!("{n}_raw"), w)?;
        }
        v.training(&mut self.training)
    }
}

/// Weight normalisation (`torch.nn.utils.weight_norm`, `dim = 0`): the weight `name` of
/// the wrapped layer is computed as `g * v / ||v||`, the norm taken over every dim but
/// the first. Parameters, as PyTorch names them: the layer's others (no prefix), then
/// `<name>_g` (shape `[out, 1, ..]`) and `<name>_v`. Initially `v` is the weight and `g`
/// its norm, so the output is unchanged.
///
/// Task-batched (`g` `[T, out, 1, ..]`, `v` `[T, ..]`, in a task-batched fmodel): each task's
/// norm is its own, over every dim but the task axis and `out`.
#[derive(Clone, Debug)]
pub struct WeightNorm<L> {
    /// The wrapped layer (its `name` slot is overwritten at each forward).
    pub module: L,
    /// Name of the reparametrized weight, relative to the layer.
    pub name: String,
    /// Magnitude, `[out, 1, ..]`.
    pub g: Tensor,
    /// Direction, the weight's shape.
    pub v: Tensor,
}

/// `||v||` over every dim after `first` (the output dim), kept as size 1.
fn row_norm(v: &Tensor, first: usize) -> Result<Tensor> {
    let dims: Vec<usize> = (first + 1..v.rank()).collect();
    if dims.is_empty() {
        return v.abs();
    }
    v.sqr()?.sum_dims(&dims, true)?.sqrt()
}

/// Wraps `module`, reparametrizing its parameter `name` (e.g. `"weight"`).
pub fn weight_norm<L: Module + Parameters + Clone>(module: L, name: &str) -> Result<WeightNorm<L>> {
    let w = find_param("weight_norm", &module, name)?;
    let g = row_norm(&w.detach(), 0)?;
    let (g, v) = if w.requires_grad() {
        (g.to_leaf(), w.detach().to_leaf())
    } else {
        (g, w.detach())
    };
    Ok(WeightNorm {
        module,
        name: name.to_string(),
        g,
        v,
    })
}

impl<L: Module + Parameters + Clone> WeightNorm<L> {
    /// The weight the layer computes with: `g * v / ||v||` (per task when task-batched).
    pub fn weight(&self) -> Result<Tensor> {
        let nominal = nominal_shape("WeightNorm", &self.module, &self.name)?.len();
        let lead = usize::from(super::tasks::batched("WeightNorm", &self.v, nominal)?);
        let head = |t: &Tensor| t.dims().get(..=lead).map(<[usize]>::to_vec);
        if self.g.rank() != self.v.rank() || head(&self.g) != head(&self.v) {
            return Err(Error::ShapeMismatch {
                op: "WeightNorm",
                expected: format!(
                    "a magnitude g of rank {} starting {:?}, as v is {:?}",
                    self.v.rank(),
                    head(&self.v).unwrap_or_default(),
                    self.v.dims()
                ),
                got: self.g.dims().to_vec(),
            });
        }
        self.v.mul(&self.g.div(&row_norm(&self.v, lead)?)?)
    }
}

impl<L: Module + Parameters + Clone> Module for WeightNorm<L> {
    /// A forward that fails leaves the wrapped layer's buffers and dropout generators as
    /// they were (see [`super::restore_buffers_on_error`]).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        super::restore_buffers_on_error(|| {
            let names = [self.name.clone()];
            with_replaced(&self.module, &names, &[self.weight()?])?.forward(x)
        })
    }
}

impl<L: Parameters> Parameters for WeightNorm<L> {
    fn visit(&mut self, v: &mut Visitor<'_>) -> Result<()> {
        let hide = [self.name.clone()];
        v.module_hiding("", &mut self.module, &hide)?;
        v.param(&format!("{}_g", self.name), &mut self.g)?;
        v.param(&format!("{}_v", self.name), &mut self.v)
    }
}
