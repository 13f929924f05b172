//! Task-batched inner loops against the loop over tasks (the path the golden PyTorch runs
//! verify): one unroll of `T` tasks with `[T, ...]` fast weights must give, to 1e-12 in
//! f64, every task's fast weights, buffers and meta-gradients that `T` separate unrolls
//! give. Covered: an MLP, a small Omniglot-style CNN with batch norm (momentum 1 and 0.1,
//! the query in train and in eval mode), an Embedding + LayerNorm model; SGD with momentum
//! and weight decay, Adam; an LSTM and a GRU; per-task learning rates; full, first-order and test modes;
//! meta-gradients with respect to the base parameters and to detached initial copies.

use candle_higher::nn::{
    self, batch_norm2d, conv2d, cross_entropy, cross_entropy_per_task, embedding, flatten,
    layer_norm, linear, max_pool2d, mse, mse_per_task, seq, Activation, BatchNormConfig,
    ConvConfig, Sequential, VarBuilder,
};
use candle_higher::optim::{Adam, Optimizer, Overrides, Sgd};
use candle_higher::{
    innerloop, DifferentiableOptimizer, Error, FunctionalModel, InitialWeights, InnerloopOptions,
    Parameters, Result, Tensor,
};

use crate::common::{assert_batched_same, randn, rng, uniform, F64};

/// Agreement required between the batched and the looped unroll (relative to max(1, |x|)).
const EXACT: f64 = 1e-12;

fn assert_same(what: &str, got: &Tensor, want: &Tensor) {
    assert_batched_same(what, got, want, EXACT);
}

type LossFn = fn(&Tensor, &Tensor) -> Result<Tensor>;

/// One meta-batch: per task a support and a query set, and the two forms of the loss.
struct Data {
    support: Vec<(Tensor, Tensor)>,
    query: Vec<(Tensor, Tensor)>,
    loss: LossFn,
    loss_per_task: LossFn,
}

impl Data {
    fn tasks(&self) -> usize {
        self.support.len()
    }

    fn stacked(sets: &[(Tensor, Tensor)]) -> (Tensor, Tensor) {
        let xs: Vec<Tensor> = sets.iter().map(|s| s.0.clone()).collect();
        let ys: Vec<Tensor> = sets.iter().map(|s| s.1.clone()).collect();
        (
            Tensor::stack(&xs, 0).unwrap(),
            Tensor::stack(&ys, 0).unwrap(),
        )
    }
}

/// How an unroll is run.
#[derive(Clone, Copy)]
struct Setup {
    steps: usize,
    initial: InitialWeights,
    first_order: bool,
    track: bool,
    /// Per-task learning rates (an override), or none.
    per_task_lr: bool,
    /// Query in eval mode (batch norm with its running statistics).
    eval_query: bool,
}

impl Setup {
    fn maml(steps: usize) -> Self {
        Setup {
            steps,
            initial: InitialWeights::BaseParameters,
            first_order: false,
            track: true,
            per_task_lr: false,
            eval_query: false,
        }
    }

    fn options(&self) -> InnerloopOptions {
        InnerloopOptions::new()
            .initial_weights(self.initial)
            .first_order(self.first_order)
            .track_higher_grads(self.track)
    }
}

/// What is compared, each with the task axis in front (the looped run's per-task results
/// stacked).
struct Outcome {
    fast: Vec<Tensor>,
    buffers: Vec<Tensor>,
    /// Meta-gradients: w.r.t. the base parameters (summed over tasks), or w.r.t. each
    /// task's initial weights, or in test mode w.r.t. the final weights.
    meta: Vec<Tensor>,
    /// The meta-gradient w.r.t. each task's learning rate, `[T]`.
    lr: Option<Tensor>,
}

fn lrs(tasks: usize) -> Vec<f64> {
    (0..tasks).map(|t| 0.05 + 0.03 * t as f64).collect()
}

/// The meta-gradient targets of an unroll: the base parameters, or its initial weights,
/// or in test mode its final weights.
fn targets<M: nn::Module + Parameters + Clone>(
    setup: &Setup,
    base: &M,
    fmodel: &FunctionalModel<M>,
) -> Vec<Tensor> {
    if !setup.track {
        fmodel.fast_params().to_vec()
    } else if setup.initial == InitialWeights::BaseParameters {
        base.parameters().unwrap()
    } else {
        fmodel.init_fast_params().unwrap().to_vec()
    }
}

fn grads(loss: &Tensor, xs: &[Tensor]) -> Vec<Tensor> {
    crate::common::grads_or_zeros(loss, xs)
}

fn looped<M, O>(model: &M, opt: &Optimizer<O>, data: &Data, setup: Setup) -> Outcome
where
    M: nn::Module + Parameters + Clone,
    O: DifferentiableOptimizer,
{
    let tasks = data.tasks();
    let lr_leaves: Vec<Tensor> = lrs(tasks)
        .into_iter()
        .map(|v| Tensor::scalar(v).to_leaf())
        .collect();
    let mut fast: Vec<Vec<Tensor>> = Vec::new();
    let mut buffers: Vec<Vec<Tensor>> = Vec::new();
    let mut meta: Vec<Vec<Tensor>> = Vec::new();
    let mut lr_grads = Vec::new();
    let mut meta_sum: Option<Vec<Tensor>> = None;
    for t in 0..tasks {
        let mut options = setup.options();
        if setup.per_task_lr {
            options = options.overrides(Overrides::new().set("lr", lr_leaves[t].clone()));
        }
        let (mut fmodel, mut diffopt) = innerloop(model, opt, options).unwrap();
        let (xs, ys) = &data.support[t];
        for _ in 0..setup.steps {
            let loss = (data.loss)(&fmodel.forward(xs).unwrap(), ys).unwrap();
            diffopt.step(&mut fmodel, &loss).unwrap();
        }
        if setup.eval_query {
            fmodel.eval().unwrap();
        }
        let (xq, yq) = &data.query[t];
        let q = (data.loss)(&fmodel.forward(xq).unwrap(), yq).unwrap();
        fast.push(fmodel.fast_params().to_vec());
        buffers.push(fmodel.buffers().unwrap().into_iter().map(|b| b.1).collect());
        let xs = targets(&setup, model, &fmodel);
        let g = grads(&q, &xs);
        if setup.track && setup.initial == InitialWeights::BaseParameters {
            meta_sum = Some(match meta_sum {
                None => g,
                Some(s) => s.iter().zip(&g).map(|(a, b)| a.add(b).unwrap()).collect(),
            });
        } else {
            meta.push(g);
        }
        if setup.per_task_lr && setup.track {
            lr_grads.push(grads(&q, &lr_leaves[t..=t]).remove(0));
        }
    }
    let stack = |per_task: &[Vec<Tensor>]| -> Vec<Tensor> {
        (0..per_task.first().map_or(0, Vec::len))
            .map(|i| {
                let parts: Vec<Tensor> = per_task.iter().map(|v| v[i].clone()).collect();
                Tensor::stack(&parts, 0).unwrap()
            })
            .collect()
    };
    Outcome {
        fast: stack(&fast),
        buffers: stack(&buffers),
        meta: meta_sum.unwrap_or_else(|| stack(&meta)),
        lr: (!lr_grads.is_empty()).then(|| Tensor::stack(&lr_grads, 0).unwrap()),
    }
}

fn batched<M, O>(model: &M, opt: &Optimizer<O>, data: &Data, setup: Setup) -> Outcome
where
    M: nn::Module + Parameters + Clone,
    O: DifferentiableOptimizer,
{
    let tasks = data.tasks();
    let lr_leaf = Tensor::from_vec(lrs(tasks), &[tasks], &crate::common::device())
        .unwrap()
        .to_leaf();
    let mut options = setup.options().tasks(tasks);
    if setup.per_task_lr {
        options = options.overrides(Overrides::new().set("lr", lr_leaf.clone()));
    }
    let (mut fmodel, mut diffopt) = innerloop(model, opt, options).unwrap();
    assert_eq!(fmodel.tasks(), Some(tasks));
    let (xs, ys) = Data::stacked(&data.support);
    for _ in 0..setup.steps {
        let losses = (data.loss_per_task)(&fmodel.forward(&xs).unwrap(), &ys).unwrap();
        assert_eq!(losses.dims(), [tasks]);
        diffopt
            .step(&mut fmodel, &losses.sum_all().unwrap())
            .unwrap();
    }
    if setup.eval_query {
        fmodel.eval().unwrap();
    }
    let (xq, yq) = Data::stacked(&data.query);
    let q = (data.loss_per_task)(&fmodel.forward(&xq).unwrap(), &yq)
        .unwrap()
        .sum_all()
        .unwrap();
    let xs = targets(&setup, model, &fmodel);
    Outcome {
        fast: fmodel.fast_params().to_vec(),
        buffers: fmodel.buffers().unwrap().into_iter().map(|b| b.1).collect(),
        meta: grads(&q, &xs),
        lr: (setup.per_task_lr && setup.track).then(|| grads(&q, &[lr_leaf]).remove(0)),
    }
}

/// Runs both ways and compares everything; returns the looped outcome for extra checks.
fn check<M, O>(name: &str, model: &M, opt: &Optimizer<O>, data: &Data, setup: Setup) -> Outcome
where
    M: nn::Module + Parameters + Clone,
    O: DifferentiableOptimizer,
{
    let want = looped(model, opt, data, setup);
    let got = batched(model, opt, data, setup);
    let names: Vec<String> = model
        .named_parameters()
        .unwrap()
        .into_iter()
        .map(|p| p.0)
        .collect();
    assert_eq!(got.fast.len(), names.len());
    for (i, n) in names.iter().enumerate() {
        assert_same(
            &format!("{name}: fast weight {n}"),
            &got.fast[i],
            &want.fast[i],
        );
        assert_same(
            &format!("{name}: meta-gradient {n}"),
            &got.meta[i],
            &want.meta[i],
        );
    }
    assert_eq!(got.buffers.len(), want.buffers.len());
    for (i, (g, w)) in got.buffers.iter().zip(&want.buffers).enumerate() {
        assert_same(&format!("{name}: buffer {i}"), g, w);
    }
    // The unroll moved the weights: agreement is not that of two no-ops.
    let base = model.parameters().unwrap()[0].unsqueeze(0).unwrap();
    let moved = want.fast[0]
        .sub(&base)
        .unwrap()
        .abs()
        .unwrap()
        .max_all_f64();
    assert!(
        moved > 1e-6,
        "{name}: the inner loop did not move the weights"
    );
    match (&got.lr, &want.lr) {
        (Some(g), Some(w)) => assert_same(&format!("{name}: lr meta-gradient"), g, w),
        (None, None) => {}
        _ => panic!("{name}: the lr meta-gradient is missing on one side"),
    }
    want
}

trait MaxAll {
    fn max_all_f64(&self) -> f64;
}

impl MaxAll for Tensor {
    fn max_all_f64(&self) -> f64 {
        self.to_vec_f64().unwrap().into_iter().fold(0.0, f64::max)
    }
}

// ------------------------------------------------------------------------ models, data

fn mlp(seed: u64) -> Sequential {
    let vb = VarBuilder::new(seed, F64, &crate::common::device());
    seq()
        .add(linear(1, 12, vb.pp("0")).unwrap())
        .add(Activation::Tanh)
        .add(linear(12, 12, vb.pp("2")).unwrap())
        .add(Activation::Relu)
        .add(linear(12, 1, vb.pp("4")).unwrap())
}

fn sine_data(tasks: usize, seed: u64) -> Data {
    let mut r = rng(seed);
    let mut set = |amp: f64, phase: f64| {
        let x = uniform(&mut r, &[6, 1], -3.0, 3.0);
        let y = x.affine(1.0, -phase).unwrap();
        let y = Tensor::from_vec(
            y.to_vec_f64()
                .unwrap()
                .into_iter()
                .map(|v| amp * v.sin())
                .collect(),
            &[6, 1],
            &crate::common::device(),
        )
        .unwrap();
        (x, y)
    };
    let (mut support, mut query) = (Vec::new(), Vec::new());
    for t in 0..tasks {
        let (amp, phase) = (0.5 + t as f64, 0.3 * t as f64);
        support.push(set(amp, phase));
        query.push(set(amp, phase));
    }
    Data {
        support,
        query,
        loss: mse,
        loss_per_task: mse_per_task,
    }
}

fn cnn(momentum: f64) -> Sequential {
    let vb = VarBuilder::new(3, F64, &crate::common::device());
    let pad = ConvConfig {
        padding: 1,
        ..ConvConfig::default()
    };
    let bn = BatchNormConfig {
        momentum,
        ..BatchNormConfig::default()
    };
    seq()
        .add(conv2d(1, 4, 3, pad, vb.pp("0")).unwrap())
        .add(batch_norm2d(4, bn, vb.pp("1")).unwrap())
        .add(Activation::Relu)
        .add(max_pool2d(2))
        .add(conv2d(4, 4, 3, pad, vb.pp("4")).unwrap())
        .add(batch_norm2d(4, bn, vb.pp("5")).unwrap())
        .add(Activation::Relu)
        .add(max_pool2d(2))
        .add(flatten())
        .add(linear(16, 3, vb.pp("9")).unwrap())
}

fn image_data(tasks: usize, seed: u64) -> Data {
    let mut r = rng(seed);
    let mut set = |n: usize| {
        let x = randn(&mut r, &[n, 1, 8, 8]);
        let labels: Vec<f64> = (0..n).map(|i| (i % 3) as f64).collect();
        (
            x,
            Tensor::from_vec(labels, &[n], &crate::common::device()).unwrap(),
        )
    };
    Data {
        support: (0..tasks).map(|_| set(3)).collect(),
        query: (0..tasks).map(|_| set(6)).collect(),
        loss: cross_entropy,
        loss_per_task: cross_entropy_per_task,
    }
}

/// Embedding -> LayerNorm -> Linear on token ids, mean over tokens for the output.
fn token_model() -> Sequential {
    let vb = VarBuilder::new(9, F64, &crate::common::device());
    seq()
        .add(embedding(7, 5, vb.pp("0")).unwrap())
        .add(layer_norm(&[5], vb.pp("1")).unwrap())
        .add(Activation::Gelu)
        .add(linear(5, 3, vb.pp("3")).unwrap())
}

fn token_data(tasks: usize, seed: u64) -> Data {
    let mut r = rng(seed);
    let mut set = || {
        let ids = uniform(&mut r, &[4], 0.0, 7.0).to_vec_f64().unwrap();
        let ids: Vec<f64> = ids.into_iter().map(f64::floor).collect();
        let labels: Vec<f64> = ids.iter().map(|v| (*v as usize % 3) as f64).collect();
        (
            Tensor::from_vec(ids, &[4], &crate::common::device()).unwrap(),
            Tensor::from_vec(labels, &[4], &crate::common::device()).unwrap(),
        )
    };
    Data {
        support: (0..tasks).map(|_| set()).collect(),
        query: (0..tasks).map(|_| set()).collect(),
        loss: cross_entropy,
        loss_per_task: cross_entropy_per_task,
    }
}

/// A two-layer recurrent net on `[seq, batch, 2]` sequences with a linear read-out.
fn recurrent_model(kind: &str) -> Sequential {
    let vb = VarBuilder::new(17, F64, &crate::common::device());
    let body = match kind {
        "lstm" => nn::lstm(2, 5, 2, vb.pp("0")).unwrap(),
        _ => nn::gru(2, 5, 2, vb.pp("0")).unwrap(),
    };
    seq().add(body).add(linear(5, 1, vb.pp("1")).unwrap())
}

fn sequence_data(tasks: usize, seed: u64) -> Data {
    let mut r = rng(seed);
    let mut set = || (randn(&mut r, &[4, 3, 2]), randn(&mut r, &[4, 3, 1]));
    Data {
        support: (0..tasks).map(|_| set()).collect(),
        query: (0..tasks).map(|_| set()).collect(),
        loss: mse,
        loss_per_task: mse_per_task,
    }
}

fn sgd_momentum(n: usize) -> Optimizer<Sgd> {
    let sgd = Sgd {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 0.01,
        ..Sgd::default()
    };
    Optimizer::new(sgd, n).unwrap()
}

fn adam(n: usize) -> Optimizer<Adam> {
    Optimizer::new(Adam::new(0.05), n).unwrap()
}

// ------------------------------------------------------------------------ tests

#[test]
fn mlp_batched_equals_looped_with_sgd_momentum_and_adam() {
    let model = mlp(1);
    let data = sine_data(4, 2);
    let n = model.parameters().unwrap().len();
    check("mlp sgd", &model, &sgd_momentum(n), &data, Setup::maml(3));
    let want = check("mlp adam", &model, &adam(n), &data, Setup::maml(3));
    // The meta-gradient is real: it does not vanish.
    assert!(
        want.meta[0]
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar_f64()
            .unwrap()
            > 1e-6
    );
}

#[test]
fn mlp_batched_modes_and_initial_weights() {
    let model = mlp(4);
    let data = sine_data(3, 5);
    let n = model.parameters().unwrap().len();
    let fo = Setup {
        first_order: true,
        ..Setup::maml(2)
    };
    check("first order", &model, &adam(n), &data, fo);
    let detached = Setup {
        initial: InitialWeights::DetachedCopy,
        ..Setup::maml(2)
    };
    check("detached", &model, &sgd_momentum(n), &data, detached);
    let test_mode = Setup {
        track: false,
        ..Setup::maml(3)
    };
    check("test mode", &model, &adam(n), &data, test_mode);
}

#[test]
fn per_task_learning_rates_match_looped_overrides() {
    let model = mlp(6);
    let data = sine_data(3, 7);
    let n = model.parameters().unwrap().len();
    let setup = Setup {
        per_task_lr: true,
        ..Setup::maml(2)
    };
    check("sgd lr", &model, &sgd_momentum(n), &data, setup);
    check("adam lr", &model, &adam(n), &data, setup);
    let fo = Setup {
        first_order: true,
        ..setup
    };
    check("adam lr first order", &model, &adam(n), &data, fo);
}

#[test]
fn cnn_with_batch_norm_batched_equals_looped() {
    let data = image_data(3, 11);
    for momentum in [1.0, 0.1] {
        let model = cnn(momentum);
        let n = model.parameters().unwrap().len();
        let name = |what: &str| format!("cnn bn {momentum} {what}");
        check(&name("adam"), &model, &adam(n), &data, Setup::maml(2));
        // Eval mode with SGD: a conv bias before a batch norm gets a gradient that is zero
        // up to rounding, which Adam's second-order terms amplify by lr / eps (to 1e-10
        // relative), so with Adam the comparison would measure rounding, not the code.
        let eval = Setup {
            eval_query: true,
            ..Setup::maml(2)
        };
        check(&name("sgd eval"), &model, &sgd_momentum(n), &data, eval);
        let lr = Setup {
            per_task_lr: true,
            first_order: true,
            ..Setup::maml(2)
        };
        check(&name("lr fo"), &model, &adam(n), &data, lr);
    }
}

#[test]
fn embedding_and_layer_norm_batched_equal_looped() {
    let model = token_model();
    let data = token_data(3, 13);
    let n = model.parameters().unwrap().len();
    check("tokens adam", &model, &adam(n), &data, Setup::maml(2));
}

#[test]
fn conv1d_with_stride_and_padding_batched_equals_looped() {
    let vb = VarBuilder::new(21, F64, &crate::common::device());
    let config = ConvConfig {
        padding: 1,
        stride: 2,
        ..ConvConfig::default()
    };
    let model = seq()
        .add(nn::conv1d(2, 3, 3, config, vb.pp("0")).unwrap())
        .add(Activation::Tanh)
        .add(flatten())
        .add(linear(12, 3, vb.pp("3")).unwrap());
    let mut r = rng(23);
    let mut set = |n: usize| {
        let labels: Vec<f64> = (0..n).map(|i| (i % 3) as f64).collect();
        (
            randn(&mut r, &[n, 2, 8]),
            Tensor::from_vec(labels, &[n], &crate::common::device()).unwrap(),
        )
    };
    let data = Data {
        support: (0..3).map(|_| set(4)).collect(),
        query: (0..3).map(|_| set(5)).collect(),
        loss: cross_entropy,
        loss_per_task: cross_entropy_per_task,
    };
    let n = model.parameters().unwrap().len();
    check("conv1d", &model, &adam(n), &data, Setup::maml(2));
}

#[test]
fn lstm_and_gru_batched_equal_looped() {
    let data = sequence_data(3, 19);
    for kind in ["lstm", "gru"] {
        let model = recurrent_model(kind);
        let n = model.parameters().unwrap().len();
        check(kind, &model, &adam(n), &data, Setup::maml(2));
        let lr = Setup {
            per_task_lr: true,
            ..Setup::maml(2)
        };
        check(&format!("{kind} lr"), &model, &sgd_momentum(n), &data, lr);
    }
}

#[test]
fn dropout_masks_are_independent_across_tasks() {
    let vb = VarBuilder::new(29, F64, &crate::common::device());
    let model = seq()
        .add(linear(4, 64, vb.pp("0")).unwrap())
        .add(nn::dropout(0.5, vb.pp("1")).unwrap());
    let opt = adam(model.parameters().unwrap().len());
    let (fmodel, _) = innerloop(&model, &opt, InnerloopOptions::new().tasks(3)).unwrap();
    let x = Tensor::ones(&[3, 2, 4], F64, &crate::common::device()).unwrap();
    let y = fmodel.forward(&x).unwrap().to_vec_f64().unwrap();
    // Every task has the same weights and input, so only the masks tell them apart.
    let dropped: Vec<Vec<bool>> = y
        .chunks(128)
        .map(|t| t.iter().map(|v| *v == 0.0).collect())
        .collect();
    assert_eq!(dropped.len(), 3);
    for t in 1..3 {
        assert_ne!(dropped[t], dropped[0], "task {t} got task 0's dropout mask");
    }
    let rate = dropped.iter().flatten().filter(|d| **d).count() as f64 / 384.0;
    assert!((0.35..0.65).contains(&rate), "drop rate {rate}");
}

/// Per-task learning rates beside a shared tensor `betas.0`: the twin combines a `[T, 1, ..]`
/// value with a 0-dim one both ways round (`lr / (1 - beta1^t)`), and the meta-gradient with
/// respect to the shared value is the sum of the per-task ones.
#[test]
fn per_task_and_shared_tensor_overrides_together() {
    let model = mlp(8);
    let data = sine_data(3, 9);
    let opt = adam(model.parameters().unwrap().len());
    let beta = || Tensor::scalar(0.8f64).to_leaf();
    let lr_values = lrs(3);
    // Looped: task t with lr_t and its own leaf for beta1 (summed afterwards).
    let (mut fast, mut lr_grads) = (Vec::new(), Vec::new());
    let mut beta_grad = 0.0;
    for (t, &lr_t) in lr_values.iter().enumerate() {
        let (lr, b1) = (Tensor::scalar(lr_t).to_leaf(), beta());
        let o = Overrides::new()
            .set("lr", lr.clone())
            .set("betas.0", b1.clone());
        let options = Setup::maml(2).options().overrides(o);
        let (mut fmodel, mut diffopt) = innerloop(&model, &opt, options).unwrap();
        let (xs, ys) = &data.support[t];
        for _ in 0..2 {
            let loss = mse(&fmodel.forward(xs).unwrap(), ys).unwrap();
            diffopt.step(&mut fmodel, &loss).unwrap();
        }
        let (xq, yq) = &data.query[t];
        let q = mse(&fmodel.forward(xq).unwrap(), yq).unwrap();
        let g = grads(&q, &[lr, b1]);
        lr_grads.push(g[0].clone());
        beta_grad += g[1].to_scalar_f64().unwrap();
        fast.push(fmodel.fast_params()[0].clone());
    }
    // Batched: one [3] lr tensor and one shared beta1 leaf.
    let (lr, b1) = (
        Tensor::from_vec(lr_values, &[3], &crate::common::device())
            .unwrap()
            .to_leaf(),
        beta(),
    );
    let o = Overrides::new()
        .set("lr", lr.clone())
        .set("betas.0", b1.clone());
    let options = Setup::maml(2).options().overrides(o).tasks(3);
    let (mut fmodel, mut diffopt) = innerloop(&model, &opt, options).unwrap();
    let (xs, ys) = Data::stacked(&data.support);
    for _ in 0..2 {
        let loss = mse_per_task(&fmodel.forward(&xs).unwrap(), &ys).unwrap();
        diffopt.step(&mut fmodel, &loss.sum_all().unwrap()).unwrap();
    }
    let (xq, yq) = Data::stacked(&data.query);
    let q = mse_per_task(&fmodel.forward(&xq).unwrap(), &yq)
        .unwrap()
        .sum_all()
        .unwrap();
    let g = grads(&q, &[lr, b1]);
    assert_same(
        "first fast weight",
        &fmodel.fast_params()[0],
        &Tensor::stack(&fast, 0).unwrap(),
    );
    assert_same(
        "lr meta-gradient",
        &g[0],
        &Tensor::stack(&lr_grads, 0).unwrap(),
    );
    assert_same(
        "shared beta1 meta-gradient",
        &g[1],
        &Tensor::scalar(beta_grad),
    );
    assert!(beta_grad.abs() > 1e-8, "the beta1 meta-gradient vanished");
}

#[test]
fn per_task_override_of_the_wrong_length_is_an_error() {
    let model = mlp(1);
    let opt = adam(model.parameters().unwrap().len());
    let lr = Tensor::from_vec(vec![0.1f64, 0.2], &[2], &crate::common::device()).unwrap();
    let options = InnerloopOptions::new()
        .tasks(3)
        .overrides(Overrides::new().set("lr", lr.clone()));
    let err = innerloop(&model, &opt, options).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    assert!(err.to_string().contains("[3]"), "{err}");
    // Without task batching a [2] tensor is not a per-task value either.
    let options = InnerloopOptions::new().overrides(Overrides::new().set("lr", lr));
    assert!(innerloop(&model, &opt, options).is_err());
}

#[test]
fn batched_fmodel_rejects_misfit_inputs_and_write_back() {
    let mut model = mlp(1);
    let opt = adam(model.parameters().unwrap().len());
    let (fmodel, _) = innerloop(&model, &opt, InnerloopOptions::new().tasks(3)).unwrap();
    assert_eq!(fmodel.fast_params()[0].dims(), [3, 12, 1]);
    // An input without the task axis, or with another task count, is a shape error.
    let x = Tensor::zeros(&[5, 1], F64, &crate::common::device()).unwrap();
    assert!(matches!(
        fmodel.forward(&x),
        Err(Error::ShapeMismatch { .. })
    ));
    let x = Tensor::zeros(&[2, 5, 1], F64, &crate::common::device()).unwrap();
    assert!(matches!(
        fmodel.forward(&x),
        Err(Error::ShapeMismatch { .. })
    ));
    let x = Tensor::zeros(&[3, 5, 1], F64, &crate::common::device()).unwrap();
    assert_eq!(fmodel.forward(&x).unwrap().dims(), [3, 5, 1]);
    let before = model.parameters().unwrap();
    assert!(fmodel.write_back_params(&mut model).is_err());
    let after = model.parameters().unwrap();
    assert!(before.iter().zip(&after).all(|(a, b)| a.id() == b.id()));
    let zero = InnerloopOptions::new().tasks(0);
    assert!(innerloop(&model, &opt, zero).is_err());
}

/// Per-task hyperparameters are validated task by task: one task's negative learning rate
/// or a NaN is rejected and names the value; valid ones pass, each checked on its own.
#[test]
fn per_task_overrides_are_validated_task_by_task() {
    use candle_higher::optim::DiffOptimizer;
    let p = Tensor::zeros(&[3, 2], candle_higher::DType::F64, &crate::common::device())
        .unwrap()
        .to_leaf();
    let mut opt = DiffOptimizer::new(Sgd::new(0.1), std::slice::from_ref(&p)).unwrap();
    opt.set_tasks(Some(3));
    let per_task = |v: Vec<f64>| Tensor::from_vec(v, &[3], &crate::common::device()).unwrap();
    opt.set_overrides(&Overrides::new().set("lr", per_task(vec![0.1, 0.2, 0.3])))
        .unwrap();
    for (bad, value) in [
        (vec![0.1, -0.2, 0.3], -0.2),
        (vec![0.1, 0.2, f64::NAN], f64::NAN),
    ] {
        match opt.set_overrides(&Overrides::new().set("lr", per_task(bad))) {
            Err(candle_higher::Error::InvalidHyperparameter { name, value: v, .. }) => {
                assert_eq!(name, "lr");
                assert!(v == value || (v.is_nan() && value.is_nan()), "{v}");
            }
            other => panic!("expected an invalid lr, got {other:?}"),
        }
    }
    // The rejected overrides changed nothing: the valid per-task values are still there.
    let lr = opt.hyperparameter(0, "lr").unwrap();
    assert_eq!(
        lr.as_tensor().unwrap().to_vec_f64().unwrap(),
        [0.1, 0.2, 0.3]
    );
}
