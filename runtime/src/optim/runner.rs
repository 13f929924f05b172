//! The ordinary optimizer: steps parameters in place under `no_grad`, for normal training
//! (the outer loop of MAML).

use super::{Hyperparameters, OptimizerStep, State};
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

/// Checks that every group index is in range and no parameter is in two groups.
pub(crate) fn check_groups<'a>(
    op: &'static str,
    n_params: usize,
    groups: impl Iterator<Item = &'a [usize]>,
) -> Result<()> {
    let mut owner = vec![None; n_params];
    for (g, params) in groups.enumerate() {
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
    Ok(())
}

pub(crate) fn check_count(op: &'static str, what: &str, expected: usize, got: usize) -> Result<()> {
    if expected != got {
        return Err(Error::InvalidArgument {
            op,
            message: format!("expected {expected} {what}, got {got}"),
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
/// let mut opt = Optimizer::new(Sgd::new(0.1), params.len());
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
}

impl<O: Hyperparameters + OptimizerStep> Optimizer<O> {
    /// One group holding all `n_params` parameters.
    pub fn new(hyperparameters: O, n_params: usize) -> Self {
        Optimizer {
            groups: vec![ParamGroup::new((0..n_params).collect(), hyperparameters)],
            states: vec![State::new(); n_params],
        }
    }

    /// Several groups over `n_params` parameters; parameters in no group are never
    /// updated. An index out of range or in two groups is an error.
    pub fn with_groups(n_params: usize, groups: Vec<ParamGroup<O>>) -> Result<Self> {
        check_groups(
            "Optimizer::with_groups",
            n_params,
            groups.iter().map(|g| g.params.as_slice()),
        )?;
        Ok(Optimizer {
            groups,
            states: vec![State::new(); n_params],
        })
    }

    /// Number of parameters this optimizer was made for.
    pub fn n_params(&self) -> usize {
        self.states.len()
    }

    /// The parameter groups.
    pub fn groups(&self) -> &[ParamGroup<O>] {
        &self.groups
    }

    /// The parameter groups, mutably (to change a learning rate between steps).
    pub fn groups_mut(&mut self) -> &mut [ParamGroup<O>] {
        &mut self.groups
    }

    /// The state of each parameter, by position.
    pub fn states(&self) -> &[State] {
        &self.states
    }

    /// Replaces the state of every parameter (e.g. loaded from a checkpoint); the count
    /// must match.
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
    pub fn step(&mut self, params: &mut [Tensor], grads: &GradStore) -> Result<()> {
        let grads: Vec<Option<Tensor>> = params.iter().map(|p| grads.get(p).cloned()).collect();
        self.step_grads(params, &grads)
    }

    /// One step on a plain candle model's `Var`s with the gradients of candle's own
    /// `loss.backward()` (candle-nn's `Optimizer::step` style). Vars are matched to the
    /// optimizer's parameters by position; a var without a gradient is left as it is. The
    /// update is computed for every var before any is set, so a failing step changes none.
    pub fn step_vars(
        &mut self,
        vars: &[candle_core::Var],
        grads: &candle_core::backprop::GradStore,
    ) -> Result<()> {
        // Copies: `Var::set` writes into the var's storage, which a state entry holding
        // the parameter itself would otherwise share.
        let mut params = vars
            .iter()
            .map(|v| Ok(Tensor::new(v.as_tensor().copy()?)))
            .collect::<Result<Vec<Tensor>>>()?;
        let grads: Vec<Option<Tensor>> = vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).map(|g| Tensor::new(g.clone())))
            .collect();
        let before: Vec<Tensor> = params.clone();
        self.step_grads(&mut params, &grads)?;
        for ((var, new), old) in vars.iter().zip(&params).zip(&before) {
            if new.id() != old.id() {
                var.set(new.value())?;
            }
        }
        Ok(())
    }

    /// One step with explicit gradients, one per parameter in order (`None`: no gradient).
    pub fn step_grads(&mut self, params: &mut [Tensor], grads: &[Option<Tensor>]) -> Result<()> {
        const OP: &str = "Optimizer::step";
        check_count(OP, "parameters", self.states.len(), params.len())?;
        check_count(OP, "gradients", params.len(), grads.len())?;
        let _guard = no_grad();
        // Compute everything first, commit after: a failing step changes nothing.
        let mut updates = Vec::new();
        for group in &self.groups {
            for &i in &group.params {
                let Some(g) = &grads[i] else { continue };
                check_grad_shape(OP, i, &params[i], g)?;
                let mut p = params[i].detach();
                let mut state = self.states[i].clone();
                group
                    .hyperparameters
                    .step(&mut p, &g.detach(), &mut state)?;
                let p = if params[i].requires_grad() {
                    p.to_leaf()
                } else {
                    p
                };
                updates.push((i, p, state));
            }
        }
        for (i, p, state) in updates {
            params[i] = p;
            // A snapshot keeps each entry's current value only, not the versions the
            // step went through.
            self.states[i] = state.clone();
        }
        Ok(())
    }
}
