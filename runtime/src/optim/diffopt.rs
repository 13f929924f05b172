//! The differentiable optimizer runtime (the `diffopt` of higher): parameter groups with
//! per-group twins, per-parameter states, overrides, a gradient callback, test and
//! first-order modes.

use std::fmt;
use std::sync::Arc;

use candle_core::{DType, Device};

use super::runner::{
    check_count, check_grad_shape, check_groups, check_state_shapes, check_step_result, ParamGroup,
};
use super::validation::{check_hyperparameters, check_twin, short_name};
use super::{
    unknown_hyperparameter, DifferentiableOptimizer, Hyperparameters, Optimizer, OptimizerStep,
    Scalar, State, StateValue, TwinHyperparameters,
};
use crate::autograd::{grad, GradOptions};
use crate::error::{Error, Result};
use crate::tensor::graph_exit::TwinStepGuard;
use crate::tensor::{no_grad, Tensor};

/// A gradient callback: sees the gradient of every parameter, in parameter order (`None`
/// where a parameter has none: frozen, unused, or in no group) and returns the gradients
/// the optimizer will use, as many as it was given. Gradient clipping is the usual case.
pub type GradCallback = Arc<dyn Fn(&[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> + Send + Sync>;

/// Wraps a closure as a [`GradCallback`].
pub fn grad_callback(
    f: impl Fn(&[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> GradCallback {
    Arc::new(f)
}

/// Replacement values for float hyperparameters, usually tensors that require grad so the
/// meta-gradient reaches them (higher's `override`).
///
/// Each entry names a float hyperparameter as in [`Hyperparameters::FLOAT_NAMES`] (`lr`,
/// `betas.0`, `betas.1`, ...) and gives one value for every
/// parameter group or one value per group. Tensors must have one element; they are
/// converted, differentiably, to the dtype and device of the parameters. (An
/// ordinary optimizer built with tensor hyperparameters, optax's `inject_hyperparams`, is
/// [`Optimizer::inject`]: its inner loops start with those tensors as overrides.) In a task-batched
/// unroll ([`DiffOptimizer::set_tasks`]) a tensor may instead have shape `[T]`: one value
/// per task, broadcast as `[T, 1, .., 1]` against each `[T, ...]` parameter.
///
/// An override replaces the float wherever the step reads it, whatever the float was, and
/// a branch on a hyperparameter (`if self.momentum != 0.0`) is decided by the override's
/// value: `Sgd::new(0.1)` (`weight_decay` and `momentum` 0) with tensor overrides of
/// `weight_decay` and `momentum` decays and uses momentum, and reports both derivatives.
/// A `weight_decay` tensor is applied even at value 0, so its derivative is reported
/// there too; a `momentum` (or `dampening`, `nesterov`-style branch) whose value is
/// exactly 0 takes torch's branch without a buffer, and no derivative with respect to it
/// is reported. The same holds for every optimizer's branches on a float.
///
/// ```
/// # use candle_higher_runtime::{Tensor, optim::Overrides};
/// let lr = Tensor::scalar(0.1f64).to_leaf();
/// let o = Overrides::new().set("lr", lr).set("betas.1", 0.99).per_group("eps", [1e-8, 1e-6]);
/// assert_eq!(o.len(), 3);
/// ```
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    entries: Vec<(String, Vec<Scalar>)>,
}

impl Overrides {
    /// No overrides.
    pub fn new() -> Self {
        Self::default()
    }

    /// Overrides `name` with one value for every parameter group.
    pub fn set(mut self, name: &str, value: impl Into<Scalar>) -> Self {
        self.entries.push((name.to_string(), vec![value.into()]));
        self
    }

    /// Overrides `name` with one value per parameter group (or one value for all).
    pub fn per_group<S: Into<Scalar>>(
        mut self,
        name: &str,
        values: impl IntoIterator<Item = S>,
    ) -> Self {
        self.entries.push((
            name.to_string(),
            values.into_iter().map(Into::into).collect(),
        ));
        self
    }

    /// Number of overridden names.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is overridden.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// These overrides with `name`'s entries replaced by one value for every group.
    pub(crate) fn replace(mut self, name: &str, value: impl Into<Scalar>) -> Self {
        self.entries.retain(|(n, _)| n != name);
        self.set(name, value)
    }

    /// The entries: a name and its values.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &[Scalar])> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v.as_slice()))
    }
}

/// How gradients flow through the inner loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum InnerGradMode {
    /// Full higher-order: inner gradients with `create_graph`, the update recorded.
    #[default]
    Full,
    /// First order: inner gradients computed without `create_graph` (constants), the update
    /// recorded, so `d new / d old` is the identity through the gradient but the paths
    /// through the update (and to hyperparameters) are kept: first-order MAML and
    /// first-order hypergradients.
    FirstOrder,
    /// Test mode (higher's `track_higher_grads=False`): no graph at all. Inner gradients
    /// without `create_graph`, the update under `no_grad`, new parameters are fresh leaves.
    Test,
}

/// Per-step options of [`DiffOptimizer::step_params_with`]: an override that replaces the
/// current values from this step on (it persists, as in higher, once the step succeeds)
/// and a callback that wins over the one given at construction, for this step only.
#[derive(Clone, Default)]
pub struct StepOptions {
    /// Overrides applied before this step; they persist if the step succeeds.
    pub overrides: Option<Overrides>,
    /// A gradient callback for this step only.
    pub callback: Option<GradCallback>,
}

impl StepOptions {
    /// No override and no per-step callback.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the step's overrides.
    pub fn overrides(mut self, overrides: Overrides) -> Self {
        self.overrides = Some(overrides);
        self
    }

    /// Sets the step's callback.
    pub fn callback(mut self, callback: GradCallback) -> Self {
        self.callback = Some(callback);
        self
    }
}

impl fmt::Debug for StepOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepOptions")
            .field("overrides", &self.overrides)
            .field("callback", &self.callback.as_ref().map(|_| "<fn>"))
            .finish()
    }
}

/// One parameter group of a [`DiffOptimizer`]: its parameters' positions and its twin.
#[derive(Clone)]
struct DiffGroup<O: Hyperparameters> {
    params: Vec<usize>,
    twin: O::Twin,
    /// The hyperparameters the group was made from (non-float fields, and the values the
    /// twin started with).
    base: O,
}

/// A differentiable optimizer: the twin of `O` driving an unrolled inner loop.
///
/// Each step computes the gradients of a loss with respect to the current parameters
/// (with `create_graph` in [`InnerGradMode::Full`]), hands them to the gradient callback,
/// runs the twin's update for every parameter of every group, and returns the new
/// parameters. States thread functionally: a step never changes a tensor that an earlier
/// step produced, so the meta-gradient reaches the initial parameters and every
/// hyperparameter given as a tensor through any number of steps.
///
/// ```
/// # use candle_higher_runtime::{grad, Device, GradOptions, Tensor};
/// # use candle_higher_runtime::optim::{DiffOptimizer, Overrides, Sgd};
/// # fn main() -> candle_higher_runtime::Result<()> {
/// let w0 = Tensor::from_vec(vec![1.0f64, -2.0], &[2], &Device::Cpu)?.to_leaf();
/// let lr = Tensor::scalar(0.1f64).to_leaf();
/// let mut opt = DiffOptimizer::new(Sgd::new(0.1), &[w0.clone()])?;
/// opt.set_overrides(&Overrides::new().set("lr", lr.clone()))?;
/// let mut params = vec![w0.clone()];
/// for _ in 0..3 {
///     let loss = params[0].sqr()?.sum_all()?;
///     params = opt.step_params(&loss, &params)?;
/// }
/// // w3 = (1 - 2 lr)^3 w0, so d sum(w3) / d lr = -6 (1 - 2 lr)^2 sum(w0) = 3.84
/// let meta = params[0].sum_all()?;
/// let g = grad(&[meta], &[lr], GradOptions::default())?;
/// assert!((g[0].as_ref().unwrap().to_scalar_f64()? - 3.84).abs() < 1e-12);
/// # Ok(()) }
/// ```
pub struct DiffOptimizer<O: DifferentiableOptimizer> {
    groups: Vec<DiffGroup<O>>,
    states: Vec<State>,
    frozen: Vec<bool>,
    mode: InnerGradMode,
    callback: Option<GradCallback>,
    dtype: DType,
    device: Device,
    /// The task count of a task-batched unroll, which per-task overrides must match.
    tasks: Option<usize>,
    /// The gradients the last committed step used (after the callback).
    last_grads: Vec<Option<Tensor>>,
}

impl<O: DifferentiableOptimizer> Clone for DiffOptimizer<O> {
    fn clone(&self) -> Self {
        DiffOptimizer {
            groups: self.groups.clone(),
            states: self.states.clone(),
            frozen: self.frozen.clone(),
            mode: self.mode,
            callback: self.callback.clone(),
            dtype: self.dtype,
            device: self.device.clone(),
            tasks: self.tasks,
            last_grads: self.last_grads.clone(),
        }
    }
}

impl<O: DifferentiableOptimizer> fmt::Debug for DiffOptimizer<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiffOptimizer")
            .field("optimizer", &std::any::type_name::<O>())
            .field(
                "groups",
                &self.groups.iter().map(|g| &g.params).collect::<Vec<_>>(),
            )
            .field("n_params", &self.states.len())
            .field("mode", &self.mode)
            .field("callback", &self.callback.as_ref().map(|_| "<fn>"))
            .finish()
    }
}

/// The dtype and device of the parameters (f32 on the CPU when there are none).
fn dtype_device(params: &[Tensor]) -> (DType, Device) {
    params
        .first()
        .map(|p| (p.dtype(), p.device().clone()))
        .unwrap_or((DType::F32, Device::Cpu))
}

/// A step computed but not committed: the new parameters, the new states of the stepped
/// parameters, and the twins (with this step's overrides) and frozen flags it ran with.
pub(crate) struct PendingStep<O: DifferentiableOptimizer> {
    params: Vec<Tensor>,
    states: Vec<(usize, State)>,
    twins: Option<Vec<O::Twin>>,
    frozen: Option<Vec<bool>>,
    grads: Vec<Option<Tensor>>,
}

impl<O: DifferentiableOptimizer> PendingStep<O> {
    /// The new parameters, in order.
    pub(crate) fn params(&self) -> &[Tensor] {
        &self.params
    }
}

impl<O: DifferentiableOptimizer> DiffOptimizer<O> {
    /// One group holding all `params` (which give the count, dtype and device). No
    /// parameters and invalid hyperparameters are errors.
    pub fn new(hyperparameters: O, params: &[Tensor]) -> Result<Self> {
        if params.is_empty() {
            return Err(Error::NoParameters {
                op: "DiffOptimizer::new",
                group: None,
            });
        }
        let group = ParamGroup::new((0..params.len()).collect(), hyperparameters);
        Self::with_groups(params, vec![group])
    }

    /// Several groups over `params`; parameters in no group pass through every step
    /// unchanged. No group, an empty group, an index out of range or in two groups, and
    /// invalid hyperparameters are errors.
    pub fn with_groups(params: &[Tensor], groups: Vec<ParamGroup<O>>) -> Result<Self> {
        check_groups(
            "DiffOptimizer::with_groups",
            params.len(),
            groups.iter().map(|g| g.params.as_slice()),
        )?;
        for (g, group) in groups.iter().enumerate() {
            check_hyperparameters(&group.hyperparameters, g)?;
        }
        let (dtype, device) = dtype_device(params);
        Ok(DiffOptimizer {
            groups: groups
                .into_iter()
                .map(|g| DiffGroup {
                    twin: g.hyperparameters.twin(),
                    params: g.params,
                    base: g.hyperparameters,
                })
                .collect(),
            states: vec![State::new(); params.len()],
            frozen: vec![false; params.len()],
            mode: InnerGradMode::Full,
            callback: None,
            last_grads: Vec::new(),
            dtype,
            device,
            tasks: None,
        })
    }

    /// Branches from an ordinary optimizer that may have taken steps: its groups,
    /// hyperparameters and per-parameter states are copied (tensors are immutable handles,
    /// so the copy is cheap and the ordinary optimizer is not changed). `params` are the
    /// current parameters, for the count, dtype and device; states are moved to their
    /// device and detached. A state whose tensors do not have its parameter's shape is
    /// [`Error::StateShape`], and the hyperparameters are checked again (they may have
    /// been changed through [`Optimizer::groups_mut`]). Hyperparameters injected as
    /// tensors ([`Optimizer::inject`]) become this optimizer's overrides.
    pub fn from_optimizer(opt: &Optimizer<O>, params: &[Tensor]) -> Result<Self> {
        Self::branch(opt, params, None)
    }

    /// [`DiffOptimizer::from_optimizer`] for a task-batched unroll of `tasks` tasks
    /// (`params` `[tasks, ...]`): a state of the un-batched parameter's shape is every
    /// task's state.
    pub(crate) fn branch(
        opt: &Optimizer<O>,
        params: &[Tensor],
        tasks: Option<usize>,
    ) -> Result<Self> {
        const OP: &str = "DiffOptimizer::from_optimizer";
        check_count(OP, "parameters", opt.n_params(), params.len())?;
        for (i, (state, p)) in opt.states().iter().zip(params).enumerate() {
            check_task_state(OP, tasks, i, p, state)?;
        }
        let mut d = Self::with_groups(params, opt.groups().to_vec())?;
        d.tasks = tasks;
        let device = d.device.clone();
        d.states = opt
            .states()
            .iter()
            .map(|s| s.map_tensors(|t| t.detach().to_device(&device)))
            .collect::<Result<_>>()?;
        d.set_overrides(opt.injected())?;
        Ok(d)
    }

    /// Number of parameters.
    pub fn n_params(&self) -> usize {
        self.states.len()
    }

    /// Number of parameter groups.
    pub fn n_groups(&self) -> usize {
        self.groups.len()
    }

    /// The positions of the parameters of group `group`.
    pub fn group_params(&self, group: usize) -> Option<&[usize]> {
        self.groups.get(group).map(|g| g.params.as_slice())
    }

    /// The twin (current hyperparameters, overrides included) of group `group`.
    pub fn twin(&self, group: usize) -> Option<&O::Twin> {
        self.groups.get(group).map(|g| &g.twin)
    }

    /// The current value of hyperparameter `name` in group `group`: the override tensor
    /// (with its graph) where one was given.
    pub fn hyperparameter(&self, group: usize, name: &str) -> Result<Scalar> {
        let g = self
            .groups
            .get(group)
            .ok_or_else(|| Error::InvalidArgument {
                op: "DiffOptimizer::hyperparameter",
                message: format!(
                    "no parameter group {group}; there are {}",
                    self.groups.len()
                ),
            })?;
        g.twin
            .get(name)
            .cloned()
            .ok_or_else(|| unknown_hyperparameter(short_name::<O>(), name, O::FLOAT_NAMES))
    }

    /// The state of each parameter, by position.
    pub fn states(&self) -> &[State] {
        &self.states
    }

    /// Replaces the state of every parameter, by position (restoring a snapshot of
    /// [`DiffOptimizer::states`], as a checkpointed unroll does). The count must match.
    pub fn set_states(&mut self, states: Vec<State>) -> Result<()> {
        check_count(
            "DiffOptimizer::set_states",
            "states",
            self.states.len(),
            states.len(),
        )?;
        self.states = states;
        Ok(())
    }

    /// The inner-gradient mode.
    pub fn mode(&self) -> InnerGradMode {
        self.mode
    }

    /// Sets the inner-gradient mode (full, first order, or test).
    pub fn set_mode(&mut self, mode: InnerGradMode) {
        self.mode = mode;
    }

    /// higher's `track_higher_grads`: `false` is [`InnerGradMode::Test`], `true` goes back
    /// to [`InnerGradMode::Full`] (or keeps first order if it is set).
    pub fn set_track_higher_grads(&mut self, track: bool) {
        self.mode = match (track, self.mode) {
            (false, _) => InnerGradMode::Test,
            (true, InnerGradMode::Test) => InnerGradMode::Full,
            (true, m) => m,
        };
    }

    /// Marks parameters as frozen: they never change and get no gradient. One flag per
    /// parameter.
    pub fn set_frozen(&mut self, frozen: &[bool]) -> Result<()> {
        check_count(
            "DiffOptimizer::set_frozen",
            "flags",
            self.states.len(),
            frozen.len(),
        )?;
        self.frozen = frozen.to_vec();
        Ok(())
    }

    /// The frozen flags, one per parameter.
    pub fn frozen(&self) -> &[bool] {
        &self.frozen
    }

    /// Declares a task-batched unroll of `tasks` tasks (every parameter `[tasks, ...]`), so
    /// that an override may be a `[tasks]` tensor, one value per task; `None` ends it.
    /// [`crate::innerloop`] sets it from [`crate::InnerloopOptions::tasks`]. The built-in
    /// optimizers are elementwise and step all tasks at once unchanged; a gradient
    /// callback sees `[tasks, ...]` gradients (a norm for clipping must be taken per task).
    /// A per-task override set before a change of the count is an error at the next step.
    pub fn set_tasks(&mut self, tasks: Option<usize>) {
        self.tasks = tasks;
    }

    /// The task count of a task-batched unroll.
    pub fn tasks(&self) -> Option<usize> {
        self.tasks
    }

    /// Sets (or clears) the gradient callback used by every step without its own.
    pub fn set_callback(&mut self, callback: Option<GradCallback>) {
        self.callback = callback;
    }

    /// Applies overrides (see [`Overrides`]); they persist for every later step. Every
    /// entry is checked before any is applied: an unknown name is an error that lists the
    /// known ones, a wrong number of values is [`Error::OverrideCount`], and a value the
    /// optimizer does not accept (a tensor by its value now) is
    /// [`Error::InvalidHyperparameter`]; on error nothing changes.
    pub fn set_overrides(&mut self, overrides: &Overrides) -> Result<()> {
        let twins = self.overridden_twins(overrides)?;
        for (group, twin) in self.groups.iter_mut().zip(twins) {
            group.twin = twin;
        }
        Ok(())
    }

    /// Every group's twin with `overrides` applied and checked; `self` is not changed.
    fn overridden_twins(&self, overrides: &Overrides) -> Result<Vec<O::Twin>> {
        let n_groups = self.groups.len();
        let mut plan: Vec<(&'static str, usize, Scalar)> = Vec::new();
        for (name, values) in overrides.entries() {
            let names = expand_name::<O>(name)?;
            if values.len() != 1 && values.len() != n_groups {
                return Err(Error::OverrideCount {
                    name: name.to_string(),
                    given: values.len(),
                    groups: n_groups,
                });
            }
            for g in 0..n_groups {
                let v = if values.len() == 1 {
                    &values[0]
                } else {
                    &values[g]
                };
                let v = self.convert(name, v)?;
                for &n in &names {
                    plan.push((n, g, v.clone()));
                }
            }
        }
        let mut twins: Vec<O::Twin> = self.groups.iter().map(|g| g.twin.clone()).collect();
        for (name, g, v) in plan {
            twins[g].set(name, v)?;
        }
        if !overrides.is_empty() {
            for (g, twin) in twins.iter().enumerate() {
                check_twin::<O>(twin, g)?;
            }
        }
        Ok(twins)
    }

    /// An override value as the twin uses it: a float, or a 0-dim tensor with the
    /// parameters' dtype and device (converted differentiably), or in a task-batched
    /// unroll a `[T]` tensor (one value per task).
    fn convert(&self, name: &str, v: &Scalar) -> Result<Scalar> {
        match v {
            Scalar::Float(x) => Ok(Scalar::Float(*x)),
            Scalar::Tensor(t) => {
                let per_task = matches!(self.tasks, Some(n) if t.dims() == [n]);
                if t.elem_count() != 1 && !per_task {
                    let expected = match self.tasks {
                        Some(n) => format!("one element, or [{n}] (one per task), for \"{name}\""),
                        None => format!("one element for \"{name}\""),
                    };
                    return Err(Error::ShapeMismatch {
                        op: "DiffOptimizer override",
                        expected,
                        got: t.dims().to_vec(),
                    });
                }
                let t = t.to_dtype(self.dtype)?.to_device(&self.device)?;
                let t = if per_task || t.rank() == 0 {
                    t
                } else {
                    t.reshape(&[])?
                };
                Ok(Scalar::Tensor(t))
            }
        }
    }

    /// The twin of a group as it steps a parameter of rank `rank`: each per-task (`[T]`)
    /// hyperparameter reshaped to `[T, 1, .., 1]` so that it broadcasts against `[T, ...]`.
    /// `None` when the twin has no per-task hyperparameter. A per-task value set for
    /// another task count (or none, after [`DiffOptimizer::set_tasks`] changed it) is an
    /// error: it would broadcast against the parameter's last dim instead.
    fn twin_for_rank(&self, twin: &O::Twin, rank: usize) -> Result<Option<O::Twin>> {
        let mut out: Option<O::Twin> = None;
        for &name in O::FLOAT_NAMES {
            let Some(Scalar::Tensor(t)) = twin.get(name) else {
                continue;
            };
            let tasks = match self.tasks {
                Some(n) if t.dims() == [n] => n,
                _ if t.elem_count() == 1 => continue,
                tasks => {
                    let expected = match tasks {
                        Some(n) => format!("one element, or [{n}] (one per task), for \"{name}\""),
                        None => format!(
                            "one element for \"{name}\" (a per-task value needs a task-batched \
                             unroll, see set_tasks)"
                        ),
                    };
                    return Err(Error::ShapeMismatch {
                        op: "DiffOptimizer::step",
                        expected,
                        got: t.dims().to_vec(),
                    });
                }
            };
            let mut shape = vec![1; rank.max(1)];
            shape[0] = tasks;
            let reshaped = Scalar::Tensor(t.reshape(&shape)?);
            out.get_or_insert_with(|| twin.clone())
                .set(name, reshaped)?;
        }
        Ok(out)
    }

    /// One step on bare tensors (no model): gradients of `loss` with respect to `params`,
    /// the callback, the update. Returns the new parameters, in order; frozen parameters,
    /// parameters without a gradient (the loss does not depend on them, or they do not
    /// require grad) and parameters in no group come back unchanged, their state not
    /// advanced. A loss that reaches none of the trainable parameters that require grad is
    /// [`Error::NoGradient`]; with none of them trainable (all frozen) the step is a no-op.
    pub fn step_params(&mut self, loss: &Tensor, params: &[Tensor]) -> Result<Vec<Tensor>> {
        self.step_params_with(loss, params, StepOptions::default())
    }

    /// [`DiffOptimizer::step_params`] with a per-step override and callback. A failing
    /// step changes nothing: its overrides are kept only if it succeeds.
    pub fn step_params_with(
        &mut self,
        loss: &Tensor,
        params: &[Tensor],
        options: StepOptions,
    ) -> Result<Vec<Tensor>> {
        let pending = self.prepare_step(loss, params, options, None)?;
        Ok(self.commit(pending))
    }

    /// One step with gradients computed elsewhere (one per parameter, `None` for none);
    /// the callback and the update as in [`DiffOptimizer::step_params`]. A failing step
    /// changes nothing.
    pub fn step_grads(
        &mut self,
        params: &[Tensor],
        grads: Vec<Option<Tensor>>,
        options: StepOptions,
    ) -> Result<Vec<Tensor>> {
        const OP: &str = "DiffOptimizer::step_grads";
        check_count(OP, "parameters", self.states.len(), params.len())?;
        check_count(OP, "gradients", params.len(), grads.len())?;
        let twins = self.step_twins(&options)?;
        let trainable = self.trainable(&self.frozen);
        let pending = self.update(params, grads, &options, twins, None, &trainable)?;
        Ok(self.commit(pending))
    }

    /// A whole step on `params` computed without changing anything: this step's overrides
    /// (checked), the inner gradients of `loss`, the callback, the update. `frozen`, when
    /// given, replaces the frozen flags for this step (and is committed with it).
    pub(crate) fn prepare_step(
        &self,
        loss: &Tensor,
        params: &[Tensor],
        options: StepOptions,
        frozen: Option<&[bool]>,
    ) -> Result<PendingStep<O>> {
        const OP: &str = "DiffOptimizer::step";
        check_count(OP, "parameters", self.states.len(), params.len())?;
        let frozen = match frozen {
            Some(f) if f != self.frozen.as_slice() => {
                check_count(OP, "frozen flags", self.states.len(), f.len())?;
                Some(f.to_vec())
            }
            _ => None,
        };
        let twins = self.step_twins(&options)?;
        let trainable = self.trainable(frozen.as_deref().unwrap_or(&self.frozen));
        let grads = self.inner_grads(loss, params, &trainable)?;
        self.update(params, grads, &options, twins, frozen, &trainable)
    }

    /// The twins with this step's overrides, if it has any.
    fn step_twins(&self, options: &StepOptions) -> Result<Option<Vec<O::Twin>>> {
        options
            .overrides
            .as_ref()
            .map(|o| self.overridden_twins(o))
            .transpose()
    }

    /// Commits a computed step (states, overrides, frozen flags) and returns its new
    /// parameters.
    pub(crate) fn commit(&mut self, pending: PendingStep<O>) -> Vec<Tensor> {
        for (i, state) in pending.states {
            // A snapshot keeps each entry's current value only, not the versions the
            // step went through.
            self.states[i] = state.clone();
        }
        if let Some(twins) = pending.twins {
            for (group, twin) in self.groups.iter_mut().zip(twins) {
                group.twin = twin;
            }
        }
        if let Some(frozen) = pending.frozen {
            self.frozen = frozen;
        }
        self.last_grads = pending.grads;
        pending.params
    }

    /// The gradients the last successful step used, one per parameter (after the gradient
    /// callback, as the step saw them; `None` where there was none): differentiable in full mode, as
    /// the step's update is. Empty before the first step.
    pub fn last_grads(&self) -> &[Option<Tensor>] {
        &self.last_grads
    }

    /// Whether parameter `i` is stepped: in a group and not frozen.
    fn trainable(&self, frozen: &[bool]) -> Vec<bool> {
        let mut t = vec![false; self.states.len()];
        for g in &self.groups {
            for &i in &g.params {
                t[i] = !frozen[i];
            }
        }
        t
    }

    /// The gradients of `loss` with respect to every trainable parameter (`None`
    /// elsewhere), with `create_graph` in full mode only.
    fn inner_grads(
        &self,
        loss: &Tensor,
        params: &[Tensor],
        trainable: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        if loss.elem_count() != 1 {
            return Err(Error::NonScalarOutput {
                op: "DiffOptimizer::step",
                what: "the loss".into(),
                index: 0,
                shape: loss.dims().to_vec(),
                hint: "the step differentiates one value: reduce the loss with sum_all or \
                       mean_all (a task-batched loss too: the sum over tasks keeps each \
                       task's gradient its own)",
            });
        }
        let idx: Vec<usize> = (0..params.len())
            .filter(|&i| trainable[i] && params[i].requires_grad())
            .collect();
        let mut out = vec![None; params.len()];
        if idx.is_empty() {
            return Ok(out);
        }
        let inputs: Vec<Tensor> = idx.iter().map(|&i| params[i].clone()).collect();
        if loss.requires_grad() {
            let options = GradOptions {
                create_graph: self.mode == InnerGradMode::Full,
                allow_unused: true,
                grad_outputs: None,
            };
            let grads = grad(std::slice::from_ref(loss), &inputs, options)?;
            for (&i, g) in idx.iter().zip(grads) {
                out[i] = g;
            }
        }
        if out.iter().all(Option::is_none) {
            // A loss that reaches some parameters but not others is fine; one that
            // reaches none would make the step silently change nothing.
            return Err(Error::NoGradient {
                op: "DiffOptimizer::step",
                trainable: idx.len(),
                hint: LOSS_MISSES_FAST_WEIGHTS,
            });
        }
        Ok(out)
    }

    /// The callback and the update, given the gradients, with `twins` (this step's
    /// overrides) where given; nothing is changed.
    fn update(
        &self,
        params: &[Tensor],
        grads: Vec<Option<Tensor>>,
        options: &StepOptions,
        twins: Option<Vec<O::Twin>>,
        frozen: Option<Vec<bool>>,
        trainable: &[bool],
    ) -> Result<PendingStep<O>> {
        const OP: &str = "DiffOptimizer::step";
        let grads = match options.callback.as_ref().or(self.callback.as_ref()) {
            Some(cb) => {
                let out = cb(&grads)?;
                if out.len() != grads.len() {
                    return Err(Error::InvalidArgument {
                        op: OP,
                        message: format!(
                            "the gradient callback returned {} gradients for {} parameters",
                            out.len(),
                            grads.len()
                        ),
                    });
                }
                out
            }
            None => grads,
        };
        let test = self.mode == InnerGradMode::Test;
        let _guard = test.then(no_grad);
        let mut new_params = params.to_vec();
        let mut new_states = Vec::new();
        for (g_index, group) in self.groups.iter().enumerate() {
            let group_twin = twins.as_ref().map_or(&group.twin, |t| &t[g_index]);
            let mut by_rank: Vec<(usize, Option<O::Twin>)> = Vec::new();
            for &i in &group.params {
                if !trainable[i] {
                    continue;
                }
                let Some(g) = &grads[i] else { continue };
                check_grad_shape(OP, i, &params[i], g)?;
                check_task_state(OP, self.tasks, i, &params[i], &self.states[i])?;
                let rank = params[i].rank();
                if !by_rank.iter().any(|(r, _)| *r == rank) {
                    by_rank.push((rank, self.twin_for_rank(group_twin, rank)?));
                }
                let twin = by_rank
                    .iter()
                    .find(|(r, _)| *r == rank)
                    .and_then(|(_, t)| t.as_ref())
                    .unwrap_or(group_twin);
                let mut p = params[i].clone();
                let mut state = self.states[i].clone();
                let watch = (!test).then(TwinStepGuard::start);
                twin.step(&mut p, g, &mut state)?;
                if let Some(exit) = watch.and_then(TwinStepGuard::finish) {
                    return Err(Error::LeavesGraph {
                        op: exit.op,
                        location: exit.location,
                        param: i,
                    });
                }
                check_step_result(OP, i, &params[i], &p)?;
                new_params[i] = if test { p.detach().to_leaf() } else { p };
                new_states.push((i, state));
            }
        }
        Ok(PendingStep {
            params: new_params,
            states: new_states,
            twins,
            frozen,
            grads,
        })
    }

    /// The current hyperparameters as ordinary values, one `O` per group: the base
    /// hyperparameters with every float replaced by the twin's current value (learned
    /// values read back; higher's `get_trainable_opt_params`).
    pub fn hyperparameters(&self) -> Result<Vec<O>> {
        self.groups
            .iter()
            .map(|g| {
                let mut o = g.base.clone();
                for &name in O::FLOAT_NAMES {
                    if let Some(v) = g.twin.get(name) {
                        o.set_float(name, read_value(name, v)?)?;
                    }
                }
                Ok(o)
            })
            .collect()
    }

    /// Writes the current float hyperparameters into an ordinary optimizer with the same
    /// number of groups (higher's `apply_trainable_opt_params`). Values the ordinary
    /// optimizer does not accept with its own flags (momentum 0 into a Nesterov SGD) are an
    /// error, and then nothing is written.
    pub fn apply_to(&self, opt: &mut Optimizer<O>) -> Result<()> {
        check_count(
            "DiffOptimizer::apply_to",
            "parameter groups",
            self.groups.len(),
            opt.groups().len(),
        )?;
        let mut updated: Vec<O> = Vec::with_capacity(self.groups.len());
        for (g, (dst, src)) in opt.groups().iter().zip(self.hyperparameters()?).enumerate() {
            let mut h = dst.hyperparameters.clone();
            for &name in O::FLOAT_NAMES {
                if let Some(v) = src.float(name) {
                    h.set_float(name, v)?;
                }
            }
            check_hyperparameters(&h, g)?;
            updated.push(h);
        }
        for (dst, h) in opt.groups_mut().iter_mut().zip(updated) {
            dst.hyperparameters = h;
        }
        Ok(())
    }

    /// Detaches every state tensor from the graph, to truncate an unroll and keep going
    /// (with [`crate::FunctionalModel::truncate`]). Override tensors are kept: they are
    /// what a hypergradient is taken with respect to.
    pub fn detach(&mut self) -> Result<()> {
        self.states = self
            .states
            .iter()
            .map(|s| s.map_tensors(|t| Ok(t.detach())))
            .collect::<Result<_>>()?;
        Ok(())
    }
}

/// [`check_state_shapes`], except that in a task-batched unroll a state of the parameter's
/// shape without its task axis (branched from an un-batched optimizer) is every task's.
fn check_task_state(
    op: &'static str,
    tasks: Option<usize>,
    i: usize,
    p: &Tensor,
    state: &State,
) -> Result<()> {
    check_state_shapes(op, i, p, state).or_else(|e| {
        let shared = tasks.is_some()
            && p.rank() > 0
            && state.entries().all(|(_, v)| match v {
                StateValue::Tensor(t) => {
                    t.rank() == 0 || t.dims() == p.dims() || t.dims() == &p.dims()[1..]
                }
                _ => true,
            });
        if shared {
            Ok(())
        } else {
            Err(e)
        }
    })
}

/// The value of a scalar, with an error for a tensor that cannot be read.
fn read_value(name: &str, v: &Scalar) -> Result<f64> {
    match v {
        Scalar::Float(x) => Ok(*x),
        Scalar::Tensor(t) => t.to_scalar_f64().map_err(|e| Error::InvalidArgument {
            op: "DiffOptimizer::hyperparameters",
            message: format!("cannot read \"{name}\": {e}"),
        }),
    }
}

/// The float name `name` as `O` spells it; an unknown name is an error listing the known
/// ones (a tuple field is overridden component by component: `betas.0`, `betas.1`).
pub(crate) fn expand_name<O: Hyperparameters>(name: &str) -> Result<Vec<&'static str>> {
    match O::FLOAT_NAMES.iter().find(|&&n| n == name) {
        Some(&n) => Ok(vec![n]),
        None => Err(unknown_hyperparameter(
            short_name::<O>(),
            name,
            O::FLOAT_NAMES,
        )),
    }
}

/// What [`Error::NoGradient`] says when an inner loss reaches none of the fast weights.
const LOSS_MISSES_FAST_WEIGHTS: &str = "the loss does not depend on the fast weights being \
stepped: compute it from `fmodel.forward(..)` (or `forward_with` the latest \
`fmodel.fast_params()`), not from the base model, and not under `no_grad` or from detached \
tensors";
