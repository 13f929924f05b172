//! Checkpointed unrolls: the exact meta-gradient of a T-step unroll, keeping only some of
//! its states (`jax.checkpoint` over a loop; equinox's checkpointed while-loop).
//!
//! The library runs the unroll itself, from a step closure and a meta-loss closure over a
//! [`Carry`] (parameters, optimizer state, buffers). A first pass runs every step with the
//! graph of that step only, and keeps the carry at the start of each segment (a checkpoint:
//! values only). The backward pass then takes the segments last to first: it recomputes the
//! segment with its graph from the checkpoint (whose tensors are fresh leaves), and
//! propagates the cotangent of the segment's last carry to its first carry and to the
//! hyperparameters with one [`grad`] call (`grad_outputs` = the cotangent), accumulating the
//! hyperparameter gradients. Each step runs twice, so the time is at most about 2x the plain
//! unroll's, and memory holds `checkpoints` carries plus one segment's graph: with the
//! default of ceil(sqrt(T)) checkpoints, O(sqrt(T)) carries.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

use crate::autograd::{grad, GradOptions};
use crate::error::{Error, Result};
use crate::optim::{DiffOptimizer, DifferentiableOptimizer, State};
use crate::tensor::{Tensor, TensorId};

use super::{check_differentiable, epsilon, first_non_finite};

/// What an unroll threads from step to step: a value that can list its tensors in a fixed
/// order and be rebuilt with replacements. Everything else it holds (integer counters, the
/// hyperparameters of an optimizer) is copied by `Clone`, so a checkpoint restores it.
///
/// `Clone` must take a snapshot: stepping a clone must not change the original (a
/// [`DiffOptimizer`]'s clone is one).
pub trait Carry: Clone {
    /// Every tensor of the carry, in a fixed order.
    fn tensors(&self) -> Vec<Tensor>;

    /// A copy of the carry whose tensors are `tensors`, in the order of
    /// [`Carry::tensors`]; a wrong count is an error. The same tensor at two positions
    /// is one tensor listed twice (tied), and stays so through an unroll.
    fn with_tensors(&self, tensors: &[Tensor]) -> Result<Self>;
}

/// A bare list of tensors is a carry (parameters only, stateless steps).
impl Carry for Vec<Tensor> {
    fn tensors(&self) -> Vec<Tensor> {
        self.clone()
    }

    fn with_tensors(&self, tensors: &[Tensor]) -> Result<Self> {
        check_len("Vec<Tensor>::with_tensors", self.len(), tensors.len())?;
        Ok(tensors.to_vec())
    }
}

/// The usual carry: parameters, a [`DiffOptimizer`] (its per-parameter states, counters
/// included, and its hyperparameters) and buffers (BatchNorm running statistics, or
/// anything else the step updates).
///
/// Its tensors are listed as: the parameters, then every tensor entry of every optimizer
/// state (parameter by parameter, entries in key order; scalar entries that are tensors
/// too), then the buffers. Override tensors of the optimizer are not carry tensors: they
/// are the hyperparameters the meta-gradient is taken with respect to. `with_tensors`
/// checks each replacement against the tensor it replaces: shape ([`Error::ParamShape`]
/// naming the slot), dtype and device.
#[derive(Clone, Debug)]
pub struct OptimizerCarry<O: DifferentiableOptimizer> {
    /// The parameters being optimized.
    pub params: Vec<Tensor>,
    /// The optimizer, with its state.
    pub opt: DiffOptimizer<O>,
    /// Buffers the step updates.
    pub buffers: Vec<Tensor>,
}

impl<O: DifferentiableOptimizer> OptimizerCarry<O> {
    /// A carry of `params` and `opt`, without buffers.
    pub fn new(params: Vec<Tensor>, opt: DiffOptimizer<O>) -> Self {
        OptimizerCarry {
            params,
            opt,
            buffers: Vec::new(),
        }
    }

    /// Sets the buffers.
    pub fn with_buffers(mut self, buffers: Vec<Tensor>) -> Self {
        self.buffers = buffers;
        self
    }

    /// One optimizer step of the parameters on `loss`, the buffers replaced by
    /// `new_buffers` (or kept, if `None`).
    pub fn step(&self, loss: &Tensor, new_buffers: Option<Vec<Tensor>>) -> Result<Self> {
        let mut opt = self.opt.clone();
        let params = opt.step_params(loss, &self.params)?;
        let buffers = new_buffers.unwrap_or_else(|| self.buffers.clone());
        check_len(
            "OptimizerCarry::step (buffers)",
            self.buffers.len(),
            buffers.len(),
        )?;
        Ok(OptimizerCarry {
            params,
            opt,
            buffers,
        })
    }
}

impl<O: DifferentiableOptimizer> OptimizerCarry<O> {
    /// The carry's tensors (see [`Carry::tensors`]) and how many each optimizer state lists.
    fn listed(&self) -> (Vec<Tensor>, Vec<usize>) {
        let listed = RefCell::new(self.params.clone());
        let mut per_state = Vec::with_capacity(self.opt.states().len());
        for state in self.opt.states() {
            let before = listed.borrow().len();
            // `map_tensors` visits entries in a fixed order (keys sorted, shared entries
            // once); `with_tensors` replaces them in the same order.
            let _ = state.map_tensors(|t| {
                listed.borrow_mut().push(t.clone());
                Ok(t.clone())
            });
            per_state.push(listed.borrow().len() - before);
        }
        let mut listed = listed.into_inner();
        listed.extend(self.buffers.iter().cloned());
        (listed, per_state)
    }

    /// What carry tensor `i` is, for messages.
    fn describe(&self, i: usize, per_state: &[usize]) -> String {
        let n_params = self.params.len();
        if i < n_params {
            return format!("parameter {i}");
        }
        let mut start = n_params;
        for (p, &n) in per_state.iter().enumerate() {
            if i < start + n {
                return format!("carry tensor {i} (a state entry of parameter {p})");
            }
            start += n;
        }
        format!("carry tensor {i} (buffer {})", i - start)
    }
}

impl<O: DifferentiableOptimizer> Carry for OptimizerCarry<O> {
    fn tensors(&self) -> Vec<Tensor> {
        self.listed().0
    }

    /// Each replacement must have the shape, dtype and device of the tensor it replaces
    /// ([`Error::ParamShape`] naming the slot, [`Error::DTypeMismatch`],
    /// [`Error::DeviceMismatch`]): an optimizer state of another shape would broadcast.
    fn with_tensors(&self, tensors: &[Tensor]) -> Result<Self> {
        const OP: &str = "OptimizerCarry::with_tensors";
        let (current, per_state) = self.listed();
        check_len(OP, current.len(), tensors.len())?;
        for (i, (old, new)) in current.iter().zip(tensors).enumerate() {
            if old.dims() != new.dims() {
                return Err(Error::ParamShape {
                    op: OP,
                    position: i,
                    name: self.describe(i, &per_state),
                    expected: old.dims().to_vec(),
                    got: new.dims().to_vec(),
                });
            }
            old.check_same(new, OP)?;
        }
        let n_params = self.params.len();
        let next = RefCell::new(tensors[n_params..].iter());
        let states = self
            .opt
            .states()
            .iter()
            .map(|s| {
                s.map_tensors(|_| {
                    // Counted above: one replacement per listed entry.
                    Ok(next
                        .borrow_mut()
                        .next()
                        .expect("replacement counted")
                        .clone())
                })
            })
            .collect::<Result<Vec<State>>>()?;
        let buffers: Vec<Tensor> = next.into_inner().cloned().collect();
        let mut opt = self.opt.clone();
        opt.set_states(states)?;
        Ok(OptimizerCarry {
            params: tensors[..n_params].to_vec(),
            opt,
            buffers,
        })
    }
}

fn check_len(op: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::ParamCount {
            op,
            what: "tensors",
            expected,
            got,
        })
    }
}

/// Options of [`checkpointed_unroll`].
#[derive(Clone, Debug, Default)]
pub struct CheckpointOptions {
    /// At most how many carries to keep (the first is the initial one); `None`:
    /// ceil(sqrt(T)). Segments have ceil(T / checkpoints) steps (the last may be shorter).
    /// More checkpoints mean shorter segments, so less graph held at once.
    pub checkpoints: Option<usize>,
}

impl CheckpointOptions {
    /// Keeps `n` checkpoints.
    pub fn checkpoints(n: usize) -> Self {
        CheckpointOptions {
            checkpoints: Some(n),
        }
    }
}

/// The result of an unroll's meta-gradient ([`checkpointed_unroll`], [`plain_unroll`]).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct UnrollGrads<C> {
    /// The meta-loss, detached.
    pub meta_loss: Tensor,
    /// The carry after the last step, detached.
    pub final_carry: C,
    /// The gradient of the meta-loss with respect to each tensor of the initial carry, in
    /// the order of [`Carry::tensors`]; `None` where the meta-loss does not depend on it.
    pub initial_grads: Vec<Option<Tensor>>,
    /// The gradient with respect to each hyperparameter; `None` where it has no effect.
    pub hyper_grads: Vec<Option<Tensor>>,
    /// The carries kept (the initial one included); 0 for a plain unroll.
    pub checkpoints: usize,
    /// Steps run a second time, with their graph, in the backward pass.
    pub recomputed_steps: usize,
}

/// The carry with each distinct tensor replaced by `f` of it, once: a tensor listed at two
/// positions (tied weights) stays one tensor, as it is in a hand-written unroll.
fn map_distinct<C: Carry>(carry: &C, f: impl Fn(&Tensor) -> Tensor) -> Result<C> {
    let mut done: HashMap<TensorId, Tensor> = HashMap::new();
    let mapped: Vec<Tensor> = carry
        .tensors()
        .iter()
        .map(|t| done.entry(t.id()).or_insert_with(|| f(t)).clone())
        .collect();
    carry.with_tensors(&mapped)
}

/// The carry with every float tensor made a fresh leaf (no graph behind it), other tensors
/// detached.
fn fresh<C: Carry>(carry: &C) -> Result<C> {
    map_distinct(carry, |t| {
        let d = t.detach();
        if d.dtype().is_float() {
            d.to_leaf()
        } else {
            d
        }
    })
}

/// The carry with every tensor detached.
fn detached<C: Carry>(carry: &C) -> Result<C> {
    map_distinct(carry, Tensor::detach)
}

/// Adds `g` into `acc` (`None` is zero).
fn accumulate(acc: &mut Option<Tensor>, g: Option<Tensor>) -> Result<()> {
    if let Some(g) = g {
        *acc = Some(match acc.take() {
            Some(a) => a.add(&g)?,
            None => g,
        });
    }
    Ok(())
}

/// Gradients of `outputs` (weighted by `cotangents`, `None` for zero) with respect to
/// `inputs` then `hyper`: the cotangent of the inputs and the hyperparameter gradients.
/// A tensor listed at several positions of `outputs` is seeded once: its cotangent is the
/// gradient with respect to that tensor, the same at each of its positions.
#[allow(clippy::type_complexity)]
fn pull_back(
    outputs: &[Tensor],
    cotangents: &[Option<Tensor>],
    inputs: &[Tensor],
    hyper: &[Tensor],
) -> Result<(Vec<Option<Tensor>>, Vec<Option<Tensor>>)> {
    let mut seen: HashSet<TensorId> = HashSet::new();
    let (outs, seeds): (Vec<Tensor>, Vec<Tensor>) = outputs
        .iter()
        .zip(cotangents)
        .filter_map(|(o, c)| match c {
            Some(c) if o.requires_grad() && seen.insert(o.id()) => Some((o.clone(), c.clone())),
            _ => None,
        })
        .unzip();
    if outs.is_empty() {
        return Ok((vec![None; inputs.len()], vec![None; hyper.len()]));
    }
    let wrt: Vec<Tensor> = inputs.iter().chain(hyper).cloned().collect();
    let options = GradOptions::default()
        .allow_unused(true)
        .grad_outputs(seeds);
    let mut g = grad(&outs, &wrt, options)?;
    let hyper_grads = g.split_off(inputs.len());
    Ok((g, hyper_grads))
}

/// The meta-loss's one value; a meta-loss of several elements is [`Error::NonScalarOutput`]
/// naming `op`, the unroll.
fn meta_loss_value(op: &'static str, loss: &Tensor) -> Result<f64> {
    if loss.elem_count() != 1 {
        return Err(Error::NonScalarOutput {
            op,
            what: "the meta-loss".into(),
            index: 0,
            shape: loss.dims().to_vec(),
            hint: "the meta_loss closure must return one element: reduce its tensor with \
                   sum_all or mean_all",
        });
    }
    loss.to_scalar_f64()
}

/// The error for a meta-loss of non-finite `value`, naming where it comes from: the steps
/// are run again from `from` (the fresh carry before step `from_step`) to find the first
/// one whose carry holds a non-finite value. An error of a step run again is returned as is.
fn non_finite_meta_loss<C: Carry>(
    op: &'static str,
    value: f64,
    from: &C,
    from_step: usize,
    steps: usize,
    step: &mut impl FnMut(&C, usize) -> Result<C>,
) -> Error {
    let mut search = || -> Result<String> {
        if let Some(i) = first_non_finite(&from.tensors())? {
            return Ok(format!(
                "the carry before step {from_step} holds a non-finite value (carry tensor {i})"
            ));
        }
        let mut carry = from.clone();
        for t in from_step..steps {
            carry = fresh(&step(&carry, t)?)?;
            if let Some(i) = first_non_finite(&carry.tensors())? {
                return Ok(format!(
                    "step {t} made carry tensor {i} non-finite (the carry before it is finite)"
                ));
            }
        }
        Ok("the final carry is finite: the meta-loss closure produced it".into())
    };
    match search() {
        Ok(what) => Error::NonFinite {
            what: format!("{op}: the meta-loss is {value}; {what}"),
        },
        Err(e) => e,
    }
}

/// Checks that a segment's steps, run again from its checkpoint, gave the carry they gave
/// the first time (`first`): same tensors (count, sharing, shapes, dtypes) and values to
/// rounding. Otherwise the rebuilt graph is not the unroll's, and its meta-gradient would
/// be silently wrong.
fn check_recomputed(again: &[Tensor], first: &[Tensor], start: usize, end: usize) -> Result<()> {
    let differ = |what: String| {
        Err(Error::InvalidArgument {
            op: "checkpointed_unroll",
            message: format!(
                "the step is not deterministic: run again from the checkpoint at step {start}, \
                 steps {start}..{end} gave {what}; the backward pass rebuilds each segment's \
                 graph by running its steps again, so they must compute the same carry (seed \
                 any randomness from t), or use plain_unroll"
            ),
        })
    };
    if again.len() != first.len() {
        return differ(format!(
            "{} tensors instead of {}",
            again.len(),
            first.len()
        ));
    }
    let shared = |ts: &[Tensor]| -> Vec<usize> {
        ts.iter()
            .map(|t| ts.iter().position(|u| u.id() == t.id()).unwrap_or(0))
            .collect()
    };
    if shared(again) != shared(first) {
        return differ("a carry whose tensors are tied at other positions".into());
    }
    for (i, (a, b)) in again.iter().zip(first).enumerate() {
        if a.dims() != b.dims() || a.dtype() != b.dtype() {
            return differ(format!(
                "carry tensor {i} of shape {:?} and dtype {:?} instead of {:?} and {:?}",
                a.dims(),
                a.dtype(),
                b.dims(),
                b.dtype()
            ));
        }
        let (va, vb) = (a.to_vec_f64()?, b.to_vec_f64()?);
        let scale = va
            .iter()
            .chain(&vb)
            .filter(|v| v.is_finite())
            .fold(0.0f64, |m, v| m.max(v.abs()));
        // Rounding only: the same ops on the same values (sqrt(eps) leaves room for
        // reductions whose order a device does not fix).
        let tol = epsilon(a.dtype()).sqrt() * scale;
        let worst = va
            .iter()
            .zip(&vb)
            .filter(|(x, y)| !(x == y || (x.is_nan() && y.is_nan())))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f64, |m, d| if d.is_nan() || d > m { d } else { m });
        if worst.is_nan() || worst > tol {
            return differ(format!(
                "carry tensor {i} different values (by up to {worst:e}, the tensor's scale is \
                 {scale:e})"
            ));
        }
    }
    Ok(())
}

/// The exact meta-gradient of `meta_loss(carry_T)` after `steps` steps
/// `carry_{t+1} = step(carry_t, t)` from `initial`, with respect to the tensors of
/// `initial` and to `hyper` (tensors the closures capture: learning-rate overrides, data
/// weights, ...), keeping only some carries (see the module doc).
///
/// The initial carry's tensors are replaced by fresh leaves before the first step, so their
/// gradients are in [`UnrollGrads::initial_grads`] (listing one in `hyper` as well gives
/// `None` there); a carry tensor computed from something upstream can be pulled back further
/// with [`grad`] and `grad_outputs` set to its entry.
///
/// `step` must be deterministic: it runs twice for each `t` (once to move forward, once,
/// from a checkpoint, to rebuild the graph), and the meta-gradient is that of the unroll
/// only if both runs compute the same thing. Each segment's second run is compared with
/// the first (tensors, their shapes and dtypes, values to rounding): a step that computes
/// something else is an error, not a wrong gradient. The gradients equal
/// [`plain_unroll`]'s up to the order of floating-point sums.
///
/// A tensor at several positions of the carry (tied weights) stays one tensor, as in a
/// hand-written unroll: a step sees it once, and its whole gradient is reported at each of
/// its positions (as [`grad`] does with a repeated input); so is that of a tensor listed
/// twice in `hyper`.
///
/// Errors, before any step where possible: 0 checkpoints; a hyperparameter that does not
/// require grad or is not a float ([`Error::InvalidArgument`] naming `hyper[i]`,
/// [`Error::UnsupportedDType`]); a meta-loss of several elements
/// ([`Error::NonScalarOutput`]); a NaN or infinite meta-loss ([`Error::NonFinite`] naming
/// the first step whose carry is not finite, found by running the steps again from the last
/// finite checkpoint); a step that is not deterministic; the closures' own errors, as they
/// are. `initial` is never changed.
///
/// ```
/// # use candle_higher_runtime::{Device, Tensor, Result};
/// # use candle_higher_runtime::optim::{DiffOptimizer, Overrides, Sgd};
/// # use candle_higher_runtime::unroll::{checkpointed_unroll, CheckpointOptions, OptimizerCarry};
/// # fn main() -> Result<()> {
/// let w0 = Tensor::from_vec(vec![1.0f64, -2.0], &[2], &Device::Cpu)?.to_leaf();
/// let lr = Tensor::scalar(0.1f64).to_leaf();
/// let mut opt = DiffOptimizer::new(Sgd::new(0.1), &[w0.clone()])?;
/// opt.set_overrides(&Overrides::new().set("lr", lr.clone()))?;
/// let carry = OptimizerCarry::new(vec![w0], opt);
/// let out = checkpointed_unroll(
///     &carry,
///     100,
///     &[lr],
///     |c, _t| c.step(&c.params[0].sqr()?.sum_all()?, None),
///     |c| c.params[0].sum_all(),
///     &CheckpointOptions::default(),
/// )?;
/// // w_T = (1 - 2 lr)^T w0: d sum(w_T) / d lr = -2 T (1 - 2 lr)^(T-1) sum(w0)
/// let expected = -2.0 * 100.0 * 0.8f64.powi(99) * -1.0;
/// let got = out.hyper_grads[0].as_ref().unwrap().to_scalar_f64()?;
/// assert!((got - expected).abs() < 1e-12 * expected.abs());
/// assert_eq!(out.checkpoints, 10);
/// # Ok(()) }
/// ```
pub fn checkpointed_unroll<C: Carry>(
    initial: &C,
    steps: usize,
    hyper: &[Tensor],
    mut step: impl FnMut(&C, usize) -> Result<C>,
    mut meta_loss: impl FnMut(&C) -> Result<Tensor>,
    options: &CheckpointOptions,
) -> Result<UnrollGrads<C>> {
    const OP: &str = "checkpointed_unroll";
    let wanted = match options.checkpoints {
        Some(0) => {
            return Err(Error::InvalidArgument {
                op: OP,
                message: "0 checkpoints; keep at least 1 (the initial carry)".into(),
            })
        }
        Some(n) => n,
        None => (steps as f64).sqrt().ceil() as usize,
    };
    check_differentiable(OP, "hyper", hyper)?;
    let segment_len = if steps == 0 {
        1
    } else {
        steps.div_ceil(wanted.clamp(1, steps))
    };
    // Forward: each step sees fresh leaves, so its graph is freed once its output is cut.
    let mut checkpoints: Vec<C> = Vec::new();
    let mut carry = fresh(initial)?;
    for t in 0..steps {
        if t % segment_len == 0 {
            checkpoints.push(carry.clone());
        }
        carry = fresh(&step(&carry, t)?)?;
    }
    if steps == 0 {
        checkpoints.push(carry.clone());
    }
    let loss = meta_loss(&carry)?;
    let value = meta_loss_value(OP, &loss)?;
    if !value.is_finite() {
        // Search from the last checkpoint that is finite.
        let mut k = checkpoints.len() - 1;
        for (j, c) in checkpoints.iter().enumerate() {
            if first_non_finite(&c.tensors())?.is_some() {
                k = j.saturating_sub(1);
                break;
            }
        }
        let from_step = k * segment_len;
        return Err(non_finite_meta_loss(
            OP,
            value,
            &checkpoints[k],
            from_step,
            steps,
            &mut step,
        ));
    }
    let seed = loss.ones_like()?;
    let (mut cotangent, mut hyper_grads) = pull_back(
        std::slice::from_ref(&loss),
        &[Some(seed)],
        &carry.tensors(),
        hyper,
    )?;
    let final_carry = detached(&carry)?;
    drop(carry);
    // Backward, one segment at a time, last first.
    let mut recomputed_steps = 0;
    for (k, start_carry) in checkpoints.iter().enumerate().rev() {
        let start = k * segment_len;
        let end = (start + segment_len).min(steps);
        let mut c = start_carry.clone();
        for t in start..end {
            c = step(&c, t)?;
        }
        recomputed_steps += end - start;
        let again = c.tensors();
        if end > start {
            let first = checkpoints.get(k + 1).unwrap_or(&final_carry).tensors();
            check_recomputed(&again, &first, start, end)?;
        }
        let (cot, hg) = pull_back(&again, &cotangent, &start_carry.tensors(), hyper)?;
        cotangent = cot;
        for (acc, g) in hyper_grads.iter_mut().zip(hg) {
            accumulate(acc, g)?;
        }
    }
    Ok(UnrollGrads {
        meta_loss: loss.detach(),
        final_carry,
        initial_grads: cotangent,
        hyper_grads,
        checkpoints: checkpoints.len(),
        recomputed_steps,
    })
}

/// The same meta-gradient as [`checkpointed_unroll`] from one graph of the whole unroll:
/// every step's graph is held until the end (the reference, and the fast choice when it
/// fits in memory). Ties and errors as there; each step runs once, except that a
/// non-finite meta-loss runs the steps again to name the first that made the carry
/// non-finite.
pub fn plain_unroll<C: Carry>(
    initial: &C,
    steps: usize,
    hyper: &[Tensor],
    mut step: impl FnMut(&C, usize) -> Result<C>,
    mut meta_loss: impl FnMut(&C) -> Result<Tensor>,
) -> Result<UnrollGrads<C>> {
    const OP: &str = "plain_unroll";
    check_differentiable(OP, "hyper", hyper)?;
    let start = fresh(initial)?;
    let mut carry = start.clone();
    for t in 0..steps {
        carry = step(&carry, t)?;
    }
    let loss = meta_loss(&carry)?;
    let value = meta_loss_value(OP, &loss)?;
    if !value.is_finite() {
        return Err(non_finite_meta_loss(OP, value, &start, 0, steps, &mut step));
    }
    let seed = loss.ones_like()?;
    let (initial_grads, hyper_grads) = pull_back(
        std::slice::from_ref(&loss),
        &[Some(seed)],
        &start.tensors(),
        hyper,
    )?;
    Ok(UnrollGrads {
        meta_loss: loss.detach(),
        final_carry: detached(&carry)?,
        initial_grads,
        hyper_grads,
        checkpoints: 0,
        recomputed_steps: 0,
    })
}
