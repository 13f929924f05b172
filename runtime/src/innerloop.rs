//! `innerloop(model, opt, options) -> (fmodel, diffopt)`: the entry point of an unrolled
//! inner loop (higher's `innerloop_ctx`), and the step of a [`DiffOptimizer`] on a
//! [`FunctionalModel`].

use std::collections::HashMap;

use candle_core::Device;

use crate::error::Result;
use crate::functional::{FunctionalModel, FunctionalOptions, InitialWeights};
use crate::nn::{walk, Entry, Module, Parameters};
use crate::optim::{
    DiffOptimizer, DifferentiableOptimizer, GradCallback, InnerGradMode, Optimizer, Overrides,
    StepOptions,
};
use crate::tensor::{Tensor, TensorId};

/// Options of [`innerloop`], with higher's defaults except where noted.
#[derive(Clone)]
pub struct InnerloopOptions {
    /// Move the fast weights (and buffers, and the optimizer state) to this device; the
    /// move is differentiable, so with [`InitialWeights::BaseParameters`] the
    /// meta-gradient still reaches the base model. `None`: stay where the model is.
    pub device: Option<Device>,
    /// How the initial fast weights relate to the base model's parameters (higher's
    /// `copy_initial_weights`; see [`InitialWeights`]). Default: detached copies.
    pub initial_weights: InitialWeights,
    /// Hyperparameter overrides applied at construction (see [`Overrides`]).
    pub overrides: Overrides,
    /// Test mode when `false` (higher's `track_higher_grads`): no graph is kept, the
    /// fmodel holds only its latest weights. Default `true`.
    pub track_higher_grads: bool,
    /// First-order mode: inner gradients computed without a graph, the update path kept
    /// (first-order MAML and first-order hypergradients). Ignored in test mode.
    pub first_order: bool,
    /// A gradient callback for every step (a step's own callback wins).
    pub callback: Option<GradCallback>,
    /// Task batching: `Some(T)` steps `T` tasks at once (see
    /// [`FunctionalOptions::tasks`]); overrides may then give one value per task. Default
    /// `None`.
    pub tasks: Option<usize>,
}

impl std::fmt::Debug for InnerloopOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InnerloopOptions")
            .field("device", &self.device)
            .field("initial_weights", &self.initial_weights)
            .field("overrides", &self.overrides)
            .field("track_higher_grads", &self.track_higher_grads)
            .field("first_order", &self.first_order)
            .field("callback", &self.callback.as_ref().map(|_| "<fn>"))
            .field("tasks", &self.tasks)
            .finish()
    }
}

impl Default for InnerloopOptions {
    fn default() -> Self {
        InnerloopOptions {
            device: None,
            initial_weights: InitialWeights::default(),
            overrides: Overrides::new(),
            track_higher_grads: true,
            first_order: false,
            callback: None,
            tasks: None,
        }
    }
}

impl InnerloopOptions {
    /// Default options: detached initial copies, full higher-order gradients.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the device.
    pub fn device(mut self, device: &Device) -> Self {
        self.device = Some(device.clone());
        self
    }

    /// Sets how the initial weights relate to the base model.
    pub fn initial_weights(mut self, initial_weights: InitialWeights) -> Self {
        self.initial_weights = initial_weights;
        self
    }

    /// Sets the overrides applied at construction.
    pub fn overrides(mut self, overrides: Overrides) -> Self {
        self.overrides = overrides;
        self
    }

    /// Test mode when `false`.
    pub fn track_higher_grads(mut self, track: bool) -> Self {
        self.track_higher_grads = track;
        self
    }

    /// First-order mode.
    pub fn first_order(mut self, first_order: bool) -> Self {
        self.first_order = first_order;
        self
    }

    /// Sets the gradient callback.
    pub fn callback(mut self, callback: GradCallback) -> Self {
        self.callback = Some(callback);
        self
    }

    /// Batches `tasks` tasks in one unroll: every fast weight, buffer and optimizer state
    /// carries a leading task axis `[tasks, ...]` (see [`FunctionalOptions::tasks`] for the
    /// initial weights and the meta-gradient), and [`Overrides`] may give a `[tasks]`
    /// tensor, one value per task.
    pub fn tasks(mut self, tasks: usize) -> Self {
        self.tasks = Some(tasks);
        self
    }

    fn mode(&self) -> InnerGradMode {
        match (self.track_higher_grads, self.first_order) {
            (false, _) => InnerGradMode::Test,
            (true, true) => InnerGradMode::FirstOrder,
            (true, false) => InnerGradMode::Full,
        }
    }
}

/// Starts an unrolled inner loop: a [`FunctionalModel`] around a copy of `model` and a
/// [`DiffOptimizer`] branched from `opt` (its groups, hyperparameters and per-parameter
/// states are copied; `opt` is not changed). higher's `innerloop_ctx`.
///
/// ```
/// use candle_higher_runtime::nn::{self, Module, Parameters};
/// use candle_higher_runtime::optim::{Optimizer, Sgd};
/// use candle_higher_runtime::{backward, innerloop, DType, Device, InitialWeights, InnerloopOptions, Tensor};
/// # fn main() -> candle_higher_runtime::Result<()> {
/// let dev = Device::Cpu;
/// let vb = nn::VarBuilder::new(0, DType::F64, &dev);
/// let mut model = nn::seq().add(nn::linear(1, 8, vb.pp("0"))?).add(nn::Activation::Tanh).add(nn::linear(8, 1, vb.pp("2"))?);
/// let mut meta_opt = Optimizer::new(Sgd::new(0.01), model.parameters()?.len())?;
/// let inner_opt = Optimizer::new(Sgd::new(0.1), model.parameters()?.len())?;
/// let x = Tensor::from_vec(vec![0.1f64, 0.5, 0.9], &[3, 1], &dev)?;
/// let y = x.mul(3.0)?;
/// // One MAML outer step: 2 inner steps, then the meta-loss reaches the base model.
/// let options = InnerloopOptions::new().initial_weights(InitialWeights::BaseParameters);
/// let (mut fmodel, mut diffopt) = innerloop(&model, &inner_opt, options)?;
/// for _ in 0..2 {
///     let loss = nn::mse(&fmodel.forward(&x)?, &y)?;
///     diffopt.step(&mut fmodel, &loss)?;
/// }
/// let meta_loss = nn::mse(&fmodel.forward(&x)?, &y)?;
/// let grads = backward(&meta_loss)?;
/// meta_opt.step_module(&mut model, &grads)?;
/// # Ok(()) }
/// ```
pub fn innerloop<M, O>(
    model: &M,
    opt: &Optimizer<O>,
    options: InnerloopOptions,
) -> Result<(FunctionalModel<M>, DiffOptimizer<O>)>
where
    M: Module + Parameters + Clone,
    O: DifferentiableOptimizer,
{
    let moved;
    let base = match &options.device {
        Some(device) => {
            moved = to_device(model, device)?;
            &moved
        }
        None => model,
    };
    let mut fmodel_options = FunctionalOptions::default()
        .initial_weights(options.initial_weights)
        .track_higher_grads(options.track_higher_grads);
    fmodel_options.tasks = options.tasks;
    let fmodel = FunctionalModel::new(base, fmodel_options)?;
    let mut diffopt = DiffOptimizer::branch(opt, fmodel.fast_params(), options.tasks)?;
    diffopt.set_frozen(fmodel.frozen())?;
    diffopt.set_mode(options.mode());
    diffopt.set_callback(options.callback.clone());
    diffopt.set_overrides(&options.overrides)?;
    Ok((fmodel, diffopt))
}

/// A copy of `model` with its parameters and buffers on `device`. Parameters move
/// differentiably (their gradients move back); tied slots stay tied.
fn to_device<M: Parameters + Clone>(model: &M, device: &Device) -> Result<M> {
    let mut copy = model.clone();
    let mut moved: HashMap<TensorId, Tensor> = HashMap::new();
    walk(&mut copy, &mut |_, entry| {
        match entry {
            Entry::Param(t) | Entry::Buffer(t) => {
                let new = match moved.get(&t.id()) {
                    Some(m) => m.clone(),
                    None => {
                        let m = t.to_device(device)?;
                        moved.insert(t.id(), m.clone());
                        m
                    }
                };
                *t = new;
            }
            Entry::Training(_) => {}
        }
        Ok(())
    })?;
    Ok(copy)
}

impl<O: DifferentiableOptimizer> DiffOptimizer<O> {
    /// One inner step on a functional model (higher's `diffopt.step(loss)`): gradients of
    /// `loss` with respect to the fmodel's latest fast weights (with `create_graph` unless
    /// in test or first-order mode), the callback, the update; the new fast weights are
    /// recorded in `fmodel` and returned. Frozen parameters follow the fmodel's flags.
    /// A loss that reaches some fast weights and not others steps the ones it reaches; one
    /// that reaches none (computed from the base model, say) is [`crate::Error::NoGradient`]
    /// and changes nothing. A model whose parameters are all frozen steps as a no-op.
    pub fn step<M: Module + Parameters + Clone>(
        &mut self,
        fmodel: &mut FunctionalModel<M>,
        loss: &Tensor,
    ) -> Result<Vec<Tensor>> {
        self.step_with(fmodel, loss, StepOptions::default())
    }

    /// [`DiffOptimizer::step`] with a per-step override (it persists) and callback. A
    /// failing step (a bad override, a gradient callback's error, new weights the fmodel
    /// rejects) changes neither the fmodel nor this optimizer.
    pub fn step_with<M: Module + Parameters + Clone>(
        &mut self,
        fmodel: &mut FunctionalModel<M>,
        loss: &Tensor,
        options: StepOptions,
    ) -> Result<Vec<Tensor>> {
        let params = fmodel.fast_params().to_vec();
        let pending = self.prepare_step(loss, &params, options, Some(fmodel.frozen()))?;
        // The fmodel checks the new weights; the state, the overrides and the frozen flags
        // are committed only once it has accepted them.
        fmodel.update_params(pending.params().to_vec())?;
        self.commit(pending);
        Ok(fmodel.fast_params().to_vec())
    }
}

impl<O: DifferentiableOptimizer> Optimizer<O> {
    /// One step on a model's parameters with the gradients of `backward(loss)` (the
    /// outer loop of MAML: `opt.step_module(&mut model, &backward(&meta_loss)?)`). The
    /// model's parameters are replaced by fresh leaves; frozen ones are left alone. The
    /// states are committed only once the model has accepted the new parameters: a failing
    /// call changes neither. A store with a gradient for none of the model's trainable
    /// parameters is [`crate::Error::NoGradient`] (typically a meta-loss from an inner loop
    /// with [`InitialWeights::DetachedCopy`], the default); a model whose parameters are all
    /// frozen steps as a no-op.
    pub fn step_module<M: Parameters + Clone>(
        &mut self,
        model: &mut M,
        grads: &crate::GradStore,
    ) -> Result<()> {
        let mut params = model.parameters()?;
        let grads: Vec<Option<Tensor>> = params.iter().map(|p| grads.get(p).cloned()).collect();
        crate::optim::check_some_gradient("Optimizer::step_module", &params, &grads)?;
        let pending = self.compute_step(&params, &grads)?;
        pending.apply_to(&mut params);
        model.set_parameters(&params)?;
        self.commit_states(pending);
        Ok(())
    }
}
