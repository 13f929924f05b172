//! `FunctionalModel`: a model with a fast-weight history (the `fmodel` of PyTorch
//! `higher`).

use std::collections::HashSet;

use crate::error::{Error, Result};
use crate::nn::{Module, ParamLayout, Parameters};
use crate::tensor::{Node, Tensor};

/// What the fast weights at time 0 are, relative to the base model's parameters.
///
/// ```text
///  DetachedCopy (default)                 BaseParameters (MAML)
///
///  base.w ──x── w0 ── w1 ── w2 ── loss     base.w ═══ w0 ── w1 ── w2 ── loss
///          copy, cut from the graph                the same handle
///  backward(loss) reaches w0 only;         backward(loss) reaches base.w:
///  the base model gets no gradient         the outer optimizer can train it
/// ```
///
/// This replaces higher's `copy_initial_weights` flag (`True` is `DetachedCopy`, `False`
/// is `BaseParameters`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InitialWeights {
    /// Time 0 holds fresh leaves with the base values: gradients stop there, and the
    /// meta-gradient is read with `grad(&[loss], fmodel.init_fast_params()?, ..)`.
    #[default]
    DetachedCopy,
    /// Time 0 holds the base model's own parameter handles: `backward(&loss)` reports
    /// meta-gradients for the base parameters (they must be leaves, e.g. made by a
    /// [`crate::nn::VarBuilder`] or [`Tensor::to_leaf`]).
    BaseParameters,
}

/// Options of a [`FunctionalModel`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FunctionalOptions {
    /// What the fast weights at time 0 are. Default: [`InitialWeights::DetachedCopy`].
    pub initial_weights: InitialWeights,
    /// Keep the graph through the updates (default `true`). With `false` (test mode) each
    /// update is detached and only the latest weights are held, so memory stays flat over
    /// any number of steps; gradients w.r.t. the latest weights still work.
    pub track_higher_grads: bool,
    /// Task batching (`Some(T)`): every fast weight and buffer carries a leading task axis
    /// `[T, ...]`, so one unroll steps `T` tasks at once; see [`FunctionalOptions::tasks`].
    /// Default `None`.
    pub tasks: Option<usize>,
}

impl Default for FunctionalOptions {
    fn default() -> Self {
        FunctionalOptions {
            initial_weights: InitialWeights::DetachedCopy,
            track_higher_grads: true,
            tasks: None,
        }
    }
}

impl FunctionalOptions {
    /// Sets [`FunctionalOptions::initial_weights`].
    pub fn initial_weights(mut self, initial_weights: InitialWeights) -> Self {
        self.initial_weights = initial_weights;
        self
    }

    /// Sets [`FunctionalOptions::track_higher_grads`].
    pub fn track_higher_grads(mut self, track: bool) -> Self {
        self.track_higher_grads = track;
        self
    }

    /// Batches `tasks` tasks in one fmodel: the fast weights at time 0 are the base
    /// parameters broadcast to `[tasks, ...]`, and each buffer (batch-norm statistics) is
    /// copied to `[tasks, ...]`, one per task.
    ///
    /// - With [`InitialWeights::BaseParameters`] the broadcast is recorded, so
    ///   `backward(meta_loss)` reaches the base parameters with the **sum over tasks** of
    ///   the per-task meta-gradients (divide the meta-loss by `T` for their mean).
    /// - With [`InitialWeights::DetachedCopy`] time 0 holds one fresh leaf of shape
    ///   `[tasks, ...]` per parameter; a gradient with respect to it has the task axis,
    ///   row `t` being task `t`'s.
    ///
    /// Inputs carry the task axis too (`[T, N, ...]`), and the forward runs inside a
    /// [`crate::nn::task_scope`]. The library's layers detect it (a Linear weight `[T, out,
    /// in]` is a batched layer) and losses have per-task forms ([`crate::nn::mse_per_task`]
    /// returns `[T]`); the inner loss is the sum of the per-task losses, so each task's
    /// gradient is its own. The optimizers step all tasks at once, unchanged.
    pub fn tasks(mut self, tasks: usize) -> Self {
        self.tasks = Some(tasks);
        self
    }
}

/// A model with a history of fast weights: the `fmodel` of PyTorch `higher`.
///
/// It holds its own copy of the model (with its own buffers, e.g. batch-norm statistics,
/// and its own train/eval flags); the base model is never changed except by the explicit
/// write-back methods. Time 0 holds the initial weights (see [`InitialWeights`]); each
/// [`FunctionalModel::update_params`] appends a time. Parameters are in the model's flat
/// order (tied weights once, frozen ones included and marked by
/// [`FunctionalModel::frozen`]).
///
/// ```
/// use candle_higher_runtime::nn::{self, Module};
/// use candle_higher_runtime::{grad, DType, Device, FunctionalModel, FunctionalOptions, GradOptions, Tensor};
/// # fn main() -> candle_higher_runtime::Result<()> {
/// let vb = nn::VarBuilder::new(0, DType::F64, &Device::Cpu);
/// let model = nn::seq().add(nn::linear(2, 4, vb.pp("0"))?).add(nn::Activation::Tanh).add(nn::linear(4, 1, vb.pp("2"))?);
/// let mut fmodel = FunctionalModel::new(&model, FunctionalOptions::default())?;
/// let x = Tensor::from_vec(vec![1.0f64, 2.0, 3.0, 4.0], &[2, 2], &Device::Cpu)?;
/// for _ in 0..3 {
///     let loss = fmodel.forward(&x)?.sqr()?.mean_all()?;
///     let params = fmodel.fast_params().to_vec();
///     let grads = grad(&[loss], &params, GradOptions::create_graph())?;
///     let new: Vec<Tensor> = params.iter().zip(grads).map(|(p, g)| p.sub(&g.unwrap().affine(0.1, 0.0)?)).collect::<Result<_, _>>()?;
///     fmodel.update_params(new)?;
/// }
/// let meta_loss = fmodel.forward(&x)?.sqr()?.mean_all()?;
/// let meta_grads = grad(&[meta_loss], fmodel.init_fast_params()?, GradOptions::default())?;
/// assert_eq!(meta_grads.len(), 4);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct FunctionalModel<M> {
    model: M,
    layout: ParamLayout,
    frozen: Vec<bool>,
    /// `history[i]` holds the weights at time `first + i`.
    history: Vec<Vec<Tensor>>,
    first: usize,
    /// Why times before `first` are not held.
    dropped: Option<String>,
    options: FunctionalOptions,
}

impl<M> std::fmt::Debug for FunctionalModel<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionalModel")
            .field("params", &self.layout.names)
            .field("time", &self.time())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<M> FunctionalModel<M> {
    /// The latest time: the number of updates so far.
    pub fn time(&self) -> usize {
        self.first + self.history.len() - 1
    }
}

impl<M: Module + Parameters + Clone> FunctionalModel<M> {
    /// Wraps a copy of `base`. The copy shares nothing mutable with `base`: buffers are
    /// copied, and parameters are replaced by their time-0 fast weights.
    pub fn new(base: &M, options: FunctionalOptions) -> Result<Self> {
        let mut model = base.clone();
        let mut layout = ParamLayout::of(&mut model)?;
        let frozen: Vec<bool> = layout.tensors.iter().map(|t| !t.requires_grad()).collect();
        let initial: Vec<Tensor> = match options.tasks {
            None => match options.initial_weights {
                InitialWeights::BaseParameters => layout.tensors.clone(),
                InitialWeights::DetachedCopy => layout
                    .tensors
                    .iter()
                    .zip(&frozen)
                    .map(|(t, &f)| if f { t.detach() } else { t.detach().to_leaf() })
                    .collect(),
            },
            Some(tasks) => Self::batched_initial(&layout, &frozen, tasks, options)?,
        };
        layout.write(&mut model, &initial)?;
        if let Some(tasks) = options.tasks {
            let buffers = layout
                .buffer_tensors
                .iter()
                .map(|b| task_copies(&b.detach(), tasks))
                .collect::<Result<Vec<_>>>()?;
            layout.write_buffers(&mut model, &buffers)?;
            // The slots now hold `[T, ...]` tensors: later lists are checked against them.
            // Each flat entry got a tensor of its own, so the slots map as before.
            layout.shapes = initial.iter().map(|t| t.dims().to_vec()).collect();
            layout.tensors = initial.clone();
            layout.buffer_tensors = buffers;
        }
        Ok(FunctionalModel {
            model,
            layout,
            frozen,
            history: vec![initial],
            first: 0,
            dropped: None,
            options,
        })
    }

    /// Time 0 of a task-batched fmodel (see [`FunctionalOptions::tasks`]).
    fn batched_initial(
        layout: &ParamLayout,
        frozen: &[bool],
        tasks: usize,
        options: FunctionalOptions,
    ) -> Result<Vec<Tensor>> {
        if tasks == 0 {
            return Err(Error::InvalidArgument {
                op: "FunctionalModel::new",
                message: "a task-batched fmodel needs at least one task (tasks = 0)".into(),
            });
        }
        layout
            .tensors
            .iter()
            .zip(frozen)
            .map(|(t, &f)| match (options.initial_weights, f) {
                (InitialWeights::BaseParameters, false) => {
                    let mut shape = vec![tasks];
                    shape.extend_from_slice(t.dims());
                    t.broadcast_as(&shape)
                }
                (InitialWeights::DetachedCopy, false) => {
                    Ok(task_copies(&t.detach(), tasks)?.to_leaf())
                }
                (_, true) => task_copies(&t.detach(), tasks),
            })
            .collect()
    }

    /// The number of tasks of a task-batched fmodel (`None`: not batched).
    pub fn tasks(&self) -> Option<usize> {
        self.options.tasks
    }

    /// The options it was made with.
    pub fn options(&self) -> FunctionalOptions {
        self.options
    }

    /// Whether updates keep the graph (`false` in test mode).
    pub fn track_higher_grads(&self) -> bool {
        self.options.track_higher_grads
    }

    /// Dotted names of the parameters, in flat order.
    pub fn names(&self) -> &[String] {
        &self.layout.names
    }

    /// Frozen flags, in flat order: a frozen parameter must be passed back unchanged.
    pub fn frozen(&self) -> &[bool] {
        &self.frozen
    }

    /// Number of parameters (tied ones once).
    pub fn num_params(&self) -> usize {
        self.layout.names.len()
    }

    /// The fast weights at `time` (0 ..= [`FunctionalModel::time`]). A time past the
    /// latest is [`Error::TimeOutOfRange`]; an earlier time that is no longer held (test
    /// mode, or before a [`FunctionalModel::truncate`]) is [`Error::HistoryUnavailable`].
    pub fn parameters(&self, time: usize) -> Result<&[Tensor]> {
        let latest = self.time();
        if time > latest {
            return Err(Error::TimeOutOfRange {
                time,
                first: self.first,
                latest,
            });
        }
        if time < self.first {
            return Err(Error::HistoryUnavailable {
                time,
                reason: self
                    .dropped
                    .clone()
                    .unwrap_or_else(|| "it is no longer held".into()),
            });
        }
        Ok(&self.history[time - self.first])
    }

    /// The latest fast weights.
    pub fn fast_params(&self) -> &[Tensor] {
        self.history.last().map(Vec::as_slice).unwrap_or(&[])
    }

    /// The fast weights at time 0 (`parameters(0)`): what a meta-gradient is taken with
    /// respect to.
    pub fn init_fast_params(&self) -> Result<&[Tensor]> {
        self.parameters(0)
    }

    /// The latest fast weights with their names and frozen flags.
    pub fn named_fast_params(&self) -> Vec<(String, Tensor, bool)> {
        self.layout
            .names
            .iter()
            .zip(self.fast_params())
            .zip(&self.frozen)
            .map(|((n, t), &f)| (n.clone(), t.clone(), f))
            .collect()
    }

    /// Appends new fast weights (one per parameter, flat order) as the next time.
    ///
    /// The list is checked first (length, each shape, dtype and device, and that frozen
    /// parameters are passed unchanged); on error nothing changes. In test mode each
    /// trainable weight is detached and made a fresh leaf, and the previous time is
    /// dropped.
    pub fn update_params(&mut self, params: Vec<Tensor>) -> Result<()> {
        self.layout.check("update_params", &params)?;
        let latest = self.fast_params();
        for (i, &f) in self.frozen.iter().enumerate() {
            if f && params[i].id() != latest[i].id() {
                return Err(Error::FrozenParameter {
                    op: "update_params",
                    name: self.layout.names[i].clone(),
                });
            }
        }
        let params = if self.options.track_higher_grads {
            params
        } else {
            self.cut(params)
        };
        if let Err(e) = self.layout.write(&mut self.model, &params) {
            // A model whose walk fails part-way has some slots written: put the latest
            // weights back so that the model and the history agree.
            let latest = self.fast_params().to_vec();
            let _ = self.layout.write(&mut self.model, &latest);
            return Err(e);
        }
        if self.options.track_higher_grads {
            self.history.push(params);
        } else {
            self.first = self.time() + 1;
            self.history = vec![params];
            self.dropped = Some(
                "track_higher_grads is off (test mode): only the latest weights are held".into(),
            );
        }
        Ok(())
    }

    /// Trainable weights become fresh leaves with the same values; frozen ones stay.
    fn cut(&self, params: Vec<Tensor>) -> Vec<Tensor> {
        params
            .into_iter()
            .zip(&self.frozen)
            .map(|(t, &f)| if f { t } else { t.detach().to_leaf() })
            .collect()
    }

    /// Runs the model with the latest fast weights. In training mode, layers with buffers
    /// (batch norm) update this fmodel's copy of them; a pass that fails puts them back
    /// ([`crate::nn::restore_buffers_on_error`]). A task-batched fmodel runs it inside a
    /// [`crate::nn::task_scope`].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _scope = self
            .options
            .tasks
            .map(|tasks| crate::nn::task_scope(Some(tasks)));
        crate::nn::restore_buffers_on_error(|| self.model.forward(x))
    }

    /// Records `params` as the next time ([`FunctionalModel::update_params`]) and runs the
    /// model with them (higher's `fmodel(x, params=params)`). If the forward pass fails,
    /// the fmodel is put back as it was: its time, weights and buffers.
    pub fn forward_with(&mut self, params: Vec<Tensor>, x: &Tensor) -> Result<Tensor> {
        let saved = self.snapshot();
        self.update_params(params)?;
        self.forward(x).inspect_err(|_| self.restore(saved))
    }

    /// What [`FunctionalModel::forward_with`] may change: the history (only its latest
    /// time, when tracking). The forward pass puts back the buffers itself.
    fn snapshot(&self) -> Snapshot {
        let history = if self.options.track_higher_grads {
            None
        } else {
            Some(self.history.clone())
        };
        Snapshot {
            len: self.history.len(),
            history,
            first: self.first,
            dropped: self.dropped.clone(),
        }
    }

    /// Puts back a [`Snapshot`]; the model's slots get the weights it held.
    fn restore(&mut self, saved: Snapshot) {
        match saved.history {
            Some(history) => self.history = history,
            None => self.history.truncate(saved.len),
        }
        self.first = saved.first;
        self.dropped = saved.dropped;
        let latest = self.fast_params().to_vec();
        // The same walk just succeeded in `update_params`; should it fail now, the history
        // is still right, and the caller gets the forward pass's error.
        let _ = self.layout.write(&mut self.model, &latest);
    }

    /// Drops the history and graph before the latest time and continues from there
    /// (truncated backprop through the unroll): the latest trainable weights become fresh
    /// leaves, and `parameters(t)` for earlier `t` says they were truncated.
    pub fn truncate(&mut self) {
        let latest = self.time();
        let params = self.cut(self.fast_params().to_vec());
        // The slots already hold tensors of the right shapes; writing cannot fail.
        if self.layout.write(&mut self.model, &params).is_ok() {
            self.history = vec![params];
            self.first = latest;
            self.dropped = Some(format!("the history was truncated at time {latest}"));
        }
    }

    /// The wrapped copy of the model, holding the latest fast weights.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// Sets this fmodel's train/eval flags (the base model's are untouched).
    pub fn train(&mut self, training: bool) -> Result<()> {
        self.model.train(training)
    }

    /// Evaluation mode for this fmodel.
    pub fn eval(&mut self) -> Result<()> {
        self.model.train(false)
    }

    /// This fmodel's buffers (its own copy), with names, in flat order.
    pub fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        let mut copy = self.model.clone();
        let values = self.layout.read_buffers(&mut copy)?;
        Ok(self
            .layout
            .buffer_names
            .iter()
            .cloned()
            .zip(values)
            .collect())
    }

    /// Writes the latest fast weights into `base`: detached, trainable ones as fresh
    /// leaves, frozen ones as constants; tied slots stay tied. The base's old parameter
    /// handles are replaced (an optimizer holding them must be given the new ones).
    pub fn write_back_params(&self, base: &mut M) -> Result<()> {
        self.check_not_batched("write_back_params")?;
        let params: Vec<Tensor> = self
            .fast_params()
            .iter()
            .zip(&self.frozen)
            .map(|(t, &f)| if f { t.detach() } else { t.detach().to_leaf() })
            .collect();
        let layout = ParamLayout::of(base)?;
        layout.check("write_back_params", &params)?;
        layout.write(base, &params)
    }

    /// Writes this fmodel's buffers (e.g. running statistics) into `base`.
    pub fn write_back_buffers(&self, base: &mut M) -> Result<()> {
        self.check_not_batched("write_back_buffers")?;
        let mut copy = self.model.clone();
        let values = self.layout.read_buffers(&mut copy)?;
        let layout = ParamLayout::of(base)?;
        layout.check_buffers("write_back_buffers", &values)?;
        layout.write_buffers(base, &values)
    }

    /// A task-batched fmodel holds `[T, ...]` tensors that do not fit the base model.
    fn check_not_batched(&self, op: &'static str) -> Result<()> {
        match self.options.tasks {
            Some(tasks) => Err(Error::InvalidArgument {
                op,
                message: format!(
                    "this fmodel batches {tasks} tasks: its tensors have a leading task axis \
                     and do not fit the base model; read them with fast_params() or buffers()"
                ),
            }),
            None => Ok(()),
        }
    }

    /// The number of recorded op nodes reachable from the fast weights it holds: 0 in
    /// test mode, growing with each tracked update. A way to see how much graph the
    /// history keeps alive.
    pub fn graph_len(&self) -> usize {
        let roots: Vec<&Tensor> = self.history.iter().flatten().collect();
        count_op_nodes(&roots)
    }
}

/// The parts of a [`FunctionalModel`] that a failing call puts back.
struct Snapshot {
    /// The history's length (tracking: a failed update is popped).
    len: usize,
    /// The whole history (test mode, where an update replaces it).
    history: Option<Vec<Vec<Tensor>>>,
    first: usize,
    dropped: Option<String>,
}

/// `tasks` contiguous copies of `t` stacked on a new leading axis (no graph).
fn task_copies(t: &Tensor, tasks: usize) -> Result<Tensor> {
    let mut shape = vec![tasks];
    shape.extend_from_slice(t.dims());
    let value = t.value().unsqueeze(0)?.broadcast_as(shape)?.contiguous()?;
    Ok(Tensor::new(value))
}

/// Counts op nodes reachable from `roots` (each once).
pub(crate) fn count_op_nodes(roots: &[&Tensor]) -> usize {
    let mut seen = HashSet::new();
    let mut stack: Vec<Tensor> = roots.iter().map(|t| (*t).clone()).collect();
    let mut count = 0;
    while let Some(t) = stack.pop() {
        if let Some(Node::Op { inputs, .. }) = t.node() {
            if seen.insert(t.id()) {
                count += 1;
                stack.extend(inputs.iter().cloned());
            }
        }
    }
    count
}

impl<M: Module + Parameters + Clone> Module for FunctionalModel<M> {
    /// [`FunctionalModel::forward`]: in the fmodel's task scope, buffers put back on failure.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        FunctionalModel::forward(self, x)
    }
}
