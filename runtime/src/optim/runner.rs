//! The ordinary optimizer: steps parameters in place under `no_grad`, for normal training
//! (the outer loop of MAML).

use super::diffopt::{expand_name, Overrides};
use super::validation::{check_hyperparameters, check_twin};
use super::{Hyperparameters, OptimizerStep, Scalar, State, StateValue, TwinHyperparameters};
use crate::autograd::GradStore;
use crate::error::{Error, Result};
use crate::tensor::{no_grad, Tensor};

/// A parameter group: the positions of its parameters in the parameter list, and its own
/// hyperparameters (`torch.optim`'s `param_groups`).
#[derive(Clone, Debug)]
pub struct ParamGroup<O> {
    /// Positions of the group's parameters in the model's parameter order.
    pub params: Vec<usize>,
    /// The group's hyperparameters.
    pub hyperparameters: O,
}

impl<O> ParamGroup<O> {
    /// A group of the parameters at `params` with hyperparameters `hyperparameters`.
    pub fn new(params: Vec<usize>, hyperparameters: O) -> Self {
        ParamGroup {
            params,
            hyperparameters,
        }
    }
}

/// Checks that there is a group, that every group has a parameter, that every index is
/// in range and that no parameter is in two groups.
pub(crate) fn check_groups<'a>(
    op: &'static str,
    n_params: usize,
    groups: impl Iterator<Item = &'a [usize]>,
) -> Result<()> {
    let mut owner = vec![None; n_params];
    let mut n_groups = 0;
    for (g, params) in groups.enumerate() {
        n_groups += 1;
        if params.is_empty() {
            return Err(Error::NoParameters { op, group: Some(g) });
        }
        for &i in params {
            if i >= n_params {
                return Err(Error::InvalidArgument {
                    op,
                    message: format!(
                        "parameter group {g} names parameter {i}, but there are {n_params} parameters"
                    ),
                });
            }
            if let Some(other) = owner[i] {
                return Err(Error::InvalidArgument {
                    op,
                    message: format!("parameter {i} is in parameter groups {other} and {g}"),
                });
            }
            owner[i] = Some(g);
        }
    }
    if n_groups == 0 {
        return Err(Error::NoParameters { op, group: None });
    }
    Ok(())
}

/// [`Error::ParamCount`] unless a list of `what` has the `expected` length.
pub(crate) fn check_count(
    op: &'static str,
    what: &'static str,
    expected: usize,
    got: usize,
) -> Result<()> {
    if expected != got {
        return Err(Error::ParamCount {
            op,
            what,
            expected,
            got,
        });
    }
    Ok(())
}

/// Every tensor entry of parameter `i`'s state that has a dimension has the parameter's
/// shape (0-dim entries are per-parameter scalars, as torch's `step`). A state made for
/// other parameters would otherwise broadcast into them. The one place this rule lives.
pub(crate) fn check_state_shapes(
    op: &'static str,
    i: usize,
    p: &Tensor,
    state: &State,
) -> Result<()> {
    for (entry, value) in state.entries() {
        if let StateValue::Tensor(t) = value {
            if t.rank() > 0 && t.dims() != p.dims() {
                return Err(Error::StateShape {
                    op,
                    param: i,
                    entry: entry.to_string(),
                    param_shape: p.dims().to_vec(),
                    state_shape: t.dims().to_vec(),
                });
            }
        }
    }
    Ok(())
}

/// A step keeps its parameter's shape, dtype and device: anything else is a step that
/// broadcast or converted it.
pub(crate) fn check_step_result(
    op: &'static str,
    i: usize,
    old: &Tensor,
    new: &Tensor,
) -> Result<()> {
    if old.dims() != new.dims() {
        return Err(Error::ShapeMismatch {
            op,
            expected: format!(
                "{:?}, the shape of parameter {i} before the step",
                old.dims()
            ),
            got: new.dims().to_vec(),
        });
    }
    if old.dtype() != new.dtype() || !old.device().same_device(new.device()) {
        return Err(Error::InvalidArgument {
            op,
            message: format!(
                "the step turned parameter {i} from {:?} on {:?} into {:?} on {:?}",
                old.dtype(),
                old.device(),
                new.dtype(),
                new.device()
            ),
        });
    }
    Ok(())
}

pub(crate) fn check_grad_shape(op: &'static str, i: usize, p: &Tensor, g: &Tensor) -> Result<()> {
    if p.dims() != g.dims() {
        return Err(Error::ShapeMismatch {
            op,
            expected: format!("{:?}, the shape of parameter {i}", p.dims()),
            got: g.dims().to_vec(),
        });
    }
    Ok(())
}

/// An ordinary optimizer over a list of parameters: `torch.optim.Foo(params, ...)`.
///
/// It keeps one [`State`] per parameter *position* (parameters are immutable handles that
/// are replaced by every step, so their identity changes) and steps under `no_grad`. After a
/// step every updated parameter is a fresh leaf, so the next `backward` reports it.
///
/// ```
/// # use candle_higher_runtime::{backward, Device, Tensor};
/// # use candle_higher_runtime::optim::{Optimizer, Sgd};
/// # fn main() -> candle_higher_runtime::Result<()> {
/// let mut params = vec![Tensor::from_vec(vec![1.0f64, -2.0], &[2], &Device::Cpu)?.to_leaf()];
/// let mut opt = Optimizer::new(Sgd::new(0.1), params.len())?;
/// let loss = params[0].sqr()?.sum_all()?;
/// let grads = backward(&loss)?;
/// opt.step(&mut params, &grads)?;
/// assert_eq!(params[0].to_vec_f64()?, vec![0.8, -1.6]);
/// assert!(params[0].is_leaf() && params[0].requires_grad());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Optimizer<O> {
    groups: Vec<ParamGroup<O>>,
    states: Vec<State>,
    /// Hyperparameters given as tensors ([`Optimizer::inject`]), for every inner loop
    /// branched from this optimizer.
    injected: Overrides,
}

/// A step computed for every parameter that has a gradient, not yet committed: the new
/// parameters and their states, by position.
pub(crate) struct PendingStep {
    updates: Vec<(usize, Tensor, State)>,
}

impl PendingStep {
    /// Writes the new parameters into `params`.
    pub(crate) fn apply_to(&self, params: &mut [Tensor]) {
        for (i, p, _) in &self.updates {
            params[*i] = p.clone();
        }
    }
}

impl<O: Hyperparameters + OptimizerStep> Optimizer<O> {
    /// One group holding all `n_params` parameters. Invalid hyperparameters (as
    /// torch.optim rejects them, see [`OptimizerStep::validate`]) and `n_params == 0` are
    /// errors.
    pub fn new(hyperparameters: O, n_params: usize) -> Result<Self> {
        if n_params == 0 {
            return Err(Error::NoParameters {
                op: "Optimizer::new",
                group: None,
            });
        }
        check_hyperparameters(&hyperparameters, 0)?;
        Ok(Optimizer {
            groups: vec![ParamGroup::new((0..n_params).collect(), hyperparameters)],
            states: vec![State::new(); n_params],
            injected: Overrides::new(),
        })
    }

    /// Several groups over `n_params` parameters; parameters in no group are never
    /// updated. No group, an empty group, an index out of range or in two groups, and
    /// invalid hyperparameters are errors.
    pub fn with_groups(n_params: usize, groups: Vec<ParamGroup<O>>) -> Result<Self> {
        check_groups(
            "Optimizer::with_groups",
            n_params,
            groups.iter().map(|g| g.params.as_slice()),
        )?;
        for (g, group) in groups.iter().enumerate() {
            check_hyperparameters(&group.hyperparameters, g)?;
        }
        Ok(Optimizer {
            groups,
            states: vec![State::new(); n_params],
            injected: Overrides::new(),
        })
    }

    /// optax's `inject_hyperparams`: the hyperparameter `name` (as in
    /// [`Hyperparameters::FLOAT_NAMES`]: `lr`, `momentum`, `betas.1`) of every group
    /// becomes the tensor `value`, so every inner loop branched from this optimizer
    /// ([`crate::innerloop`], [`super::DiffOptimizer::from_optimizer`]) steps with it and
    /// the meta-gradient reaches it; what was given as a float for `name` is replaced.
    /// optax's `inject_hyperparams(optax.sgd)(learning_rate=lr)` reads
    /// `Optimizer::new(Sgd::default(), n)?` then `opt.inject("lr", &lr)?`.
    ///
    /// The tensor must have one element (per-task `[T]` values go through
    /// [`crate::InnerloopOptions::overrides`]; an integer tensor converts, as an override
    /// does, to the parameters' dtype); it is checked as an override is, by its
    /// value now (tensors are immutable), and that value is also what this optimizer's
    /// own ordinary steps use. An inner loop's tensor reaches a hyperparameter whatever its
    /// float was: `Sgd::default()` with injected `momentum` and `weight_decay` uses both
    /// (see [`Overrides`] for a value of exactly 0). Injecting a name again replaces the
    /// earlier tensor; overrides given to the inner loop win over injected tensors. An
    /// unknown name, a tensor of more than one element, or a value the optimizer does not
    /// accept is an error, and then nothing changes. Changing the float
    /// later through [`Optimizer::groups_mut`] does not change the injected tensor.
    ///
    /// ```
    /// # use candle_higher_runtime::{DType, Device, Tensor};
    /// # use candle_higher_runtime::optim::{Optimizer, Sgd};
    /// # fn main() -> candle_higher_runtime::Result<()> {
    /// let lr = Tensor::full_scalar(0.1, DType::F64, &Device::Cpu)?.to_leaf();
    /// let mut inner_opt = Optimizer::new(Sgd::default(), 4)?;
    /// inner_opt.inject("lr", &lr)?;
    /// assert_eq!(inner_opt.groups()[0].hyperparameters.lr, 0.1);
    /// assert!(inner_opt.inject("learning_rate", &lr).is_err()); // torch's names: "lr"
    /// # Ok(()) }
    /// ```
    pub fn inject(&mut self, name: &str, value: &Tensor) -> Result<&mut Self> {
        const OP: &str = "Optimizer::inject";
        let names = expand_name::<O>(name)?;
        if value.elem_count() != 1 {
            return Err(Error::ShapeMismatch {
                op: OP,
                expected: format!(
                    "one element for \"{name}\" (one value per task: InnerloopOptions::overrides)"
                ),
                got: value.dims().to_vec(),
            });
        }
        let tensor = value.reshape(&[])?;
        let mut groups = self.groups.clone();
        for (g, group) in groups.iter_mut().enumerate() {
            let mut twin = group.hyperparameters.twin();
            for &n in &names {
                twin.set(n, Scalar::Tensor(tensor.clone()))?;
            }
            check_twin::<O>(&twin, g)?;
            let v = tensor.to_scalar_f64()?;
            for &n in &names {
                group.hyperparameters.set_float(n, v)?;
            }
            check_hyperparameters(&group.hyperparameters, g)?;
        }
        self.groups = groups;
        self.injected = std::mem::take(&mut self.injected).replace(name, tensor);
        Ok(self)
    }

    /// The hyperparameters given as tensors by [`Optimizer::inject`], as the overrides
    /// every inner loop branched from this optimizer starts with.
    pub fn injected(&self) -> &Overrides {
        &self.injected
    }

    /// Number of parameters this optimizer was made for.
    pub fn n_params(&self) -> usize {
        self.states.len()
    }

    /// The parameter groups.
    pub fn groups(&self) -> &[ParamGroup<O>] {
        &self.groups
    }

    /// The parameter groups, mutably (to change a learning rate between steps). The next
    /// step checks the hyperparameters again and fails, changing nothing, if they are
    /// invalid.
    pub fn groups_mut(&mut self) -> &mut [ParamGroup<O>] {
        &mut self.groups
    }

    /// The state of each parameter, by position.
    pub fn states(&self) -> &[State] {
        &self.states
    }

    /// Replaces the state of every parameter (e.g. loaded from a checkpoint); the count
    /// must match. Each state's tensors are checked against its parameter's shape at the
    /// next step.
    pub fn set_states(&mut self, states: Vec<State>) -> Result<()> {
        check_count(
            "Optimizer::set_states",
            "states",
            self.states.len(),
            states.len(),
        )?;
        self.states = states;
        Ok(())
    }

    /// One step with the gradients of `backward(loss)`, keyed by the parameters' identity.
    /// Parameters without a gradient are left as they are and their state is not advanced.
    ///
    /// A store that holds a gradient for none of the parameters that require grad is
    /// [`Error::NoGradient`] (the loss does not reach them, and the step would change
    /// nothing); when no parameter requires grad (all frozen), the step is a no-op.
    pub fn step(&mut self, params: &mut [Tensor], grads: &GradStore) -> Result<()> {
        let grads: Vec<Option<Tensor>> = params.iter().map(|p| grads.get(p).cloned()).collect();
        check_some_gradient("Optimizer::step", params, &grads)?;
        self.step_grads(params, &grads)
    }

    /// One step on a plain candle model's `Var`s with the gradients of candle's own
    /// `loss.backward()` (candle-nn's `Optimizer::step` style). Vars are matched to the
    /// optimizer's parameters by position; a var without a gradient is left as it is. The
    /// update is computed and checked against every var (shape, dtype, device) before any
    /// is set, so a failing step changes no var and no state. A store holding a gradient
    /// for none of the vars is [`Error::NoGradient`].
    pub fn step_vars(
        &mut self,
        vars: &[candle_core::Var],
        grads: &candle_core::backprop::GradStore,
    ) -> Result<()> {
        const OP: &str = "Optimizer::step_vars";
        // Copies: `Var::set` writes into the var's storage, which a state entry holding
        // the parameter itself would otherwise share.
        let params = vars
            .iter()
            .map(|v| Ok(Tensor::new(v.as_tensor().copy()?)))
            .collect::<Result<Vec<Tensor>>>()?;
        let grads: Vec<Option<Tensor>> = vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).map(|g| Tensor::new(g.clone())))
            .collect();
        if !vars.is_empty() && grads.iter().all(Option::is_none) {
            return Err(Error::NoGradient {
                op: OP,
                trainable: vars.len(),
                hint: "candle's gradient store holds none of these vars: compute the loss \
                       from them (a `Var` copied with `as_tensor().copy()` or `detach()` is \
                       another tensor)",
            });
        }
        let pending = self.compute_step(&params, &grads)?;
        for (i, new, _) in &pending.updates {
            let var = vars[*i].as_tensor();
            check_step_result(OP, *i, &Tensor::new(var.clone()), new)?;
        }
        for (i, new, _) in &pending.updates {
            vars[*i].set(new.value())?;
        }
        self.commit_states(pending);
        Ok(())
    }

    /// One step with explicit gradients, one per parameter in order (`None`: no gradient).
    /// Everything is computed and checked before anything is committed: a failing step
    /// changes neither the parameters nor the states.
    pub fn step_grads(&mut self, params: &mut [Tensor], grads: &[Option<Tensor>]) -> Result<()> {
        let pending = self.compute_step(params, grads)?;
        pending.apply_to(params);
        self.commit_states(pending);
        Ok(())
    }

    /// The step of every parameter that has a gradient, computed under `no_grad` on copies
    /// of the states; nothing is changed. Checks the hyperparameters (they may have been
    /// changed through [`Optimizer::groups_mut`]), each gradient's and state's shapes
    /// against the parameter's, and that the step kept the parameter's shape and dtype.
    pub(crate) fn compute_step(
        &self,
        params: &[Tensor],
        grads: &[Option<Tensor>],
    ) -> Result<PendingStep> {
        const OP: &str = "Optimizer::step";
        check_count(OP, "parameters", self.states.len(), params.len())?;
        check_count(OP, "gradients", params.len(), grads.len())?;
        for (g, group) in self.groups.iter().enumerate() {
            check_hyperparameters(&group.hyperparameters, g)?;
        }
        let _guard = no_grad();
        let mut updates = Vec::new();
        for group in &self.groups {
            for &i in &group.params {
                let Some(g) = &grads[i] else { continue };
                check_grad_shape(OP, i, &params[i], g)?;
                check_state_shapes(OP, i, &params[i], &self.states[i])?;
                let mut p = params[i].detach();
                let mut state = self.states[i].clone();
                group
                    .hyperparameters
                    .step(&mut p, &g.detach(), &mut state)?;
                check_step_result(OP, i, &params[i], &p)?;
                let p = if params[i].requires_grad() {
                    p.to_leaf()
                } else {
                    p
                };
                updates.push((i, p, state));
            }
        }
        Ok(PendingStep { updates })
    }

    /// Commits the states of a computed step (its parameters are the caller's to write).
    pub(crate) fn commit_states(&mut self, pending: PendingStep) {
        for (i, _, mut state) in pending.updates {
            state.keep_current_only();
            self.states[i] = state;
        }
    }
}

/// What [`Error::NoGradient`] says to a caller whose gradient store missed every parameter.
const NO_GRADIENT_HINT: &str = "the gradients do not reach these parameters; a meta-loss \
from `innerloop` with the default `InitialWeights::DetachedCopy` does not reach the base \
model: use `InnerloopOptions::new().initial_weights(InitialWeights::BaseParameters)` (MAML), \
or take `grad(&[meta_loss], &fmodel.parameters(0)?, ..)` and step with `step_grads`";

/// Fails with [`Error::NoGradient`] when some parameter requires grad and none has a
/// gradient: a step that would silently change nothing. Parameters that do not require
/// grad (frozen) are not counted, so a model with only frozen parameters steps as a no-op.
pub(crate) fn check_some_gradient(
    op: &'static str,
    params: &[Tensor],
    grads: &[Option<Tensor>],
) -> Result<()> {
    let trainable = params.iter().filter(|p| p.requires_grad()).count();
    if trainable == 0 || grads.iter().any(Option::is_some) {
        return Ok(());
    }
    Err(Error::NoGradient {
        op,
        trainable,
        hint: NO_GRADIENT_HINT,
    })
}
