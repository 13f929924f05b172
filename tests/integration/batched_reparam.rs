//! Weight norm and weight dropout on task-batched parameters: one unroll of `T` tasks
//! (fast weights `[T, ...]`) against `T` separate unrolls, to 1e-12 in f64 in every fast
//! weight and meta-gradient (as `batched.rs` does for the other layers). Weight norm: an
//! MLP and a convolution (norm over several dims), SGD with momentum and Adam, first order.
//! Weight dropout: fixed masks, one per task or shared, on a Linear and on an LSTM's
//! hidden-to-hidden weight; p = 0 and eval mode with drawn masks; drawn masks that are
//! independent per task, at the rate p, reproducible from the seed; the shape errors.

use candle_higher::nn::{
    self, conv2d, flatten, linear, linear_no_bias, mse, mse_per_task, seq, weight_dropout,
    weight_norm, Activation, ConvConfig, Module, Sequential, VarBuilder,
};
use candle_higher::optim::{Adam, Optimizer, Sgd};
use candle_higher::{
    innerloop, DifferentiableOptimizer, Error, InitialWeights, InnerloopOptions, Parameters, Tensor,
};
use rand::Rng;

use crate::common::{assert_batched_same, device, randn, rng, uniform, F64};

/// Agreement required between the batched and the looped unroll (relative to max(1, |x|)).
const EXACT: f64 = 1e-12;

fn assert_same(what: &str, got: &Tensor, want: &Tensor) {
    assert_batched_same(what, got, want, EXACT);
}

/// Per task a support and a query set.
struct Data {
    support: Vec<(Tensor, Tensor)>,
    query: Vec<(Tensor, Tensor)>,
}

fn stacked(sets: &[(Tensor, Tensor)]) -> (Tensor, Tensor) {
    let xs: Vec<Tensor> = sets.iter().map(|s| s.0.clone()).collect();
    let ys: Vec<Tensor> = sets.iter().map(|s| s.1.clone()).collect();
    (
        Tensor::stack(&xs, 0).unwrap(),
        Tensor::stack(&ys, 0).unwrap(),
    )
}

/// Final fast weights (`[T, ...]`) and the meta-gradients w.r.t. the base parameters
/// (summed over tasks).
struct Outcome {
    fast: Vec<Tensor>,
    meta: Vec<Tensor>,
}

fn meta_grads(loss: &Tensor, xs: &[Tensor]) -> Vec<Tensor> {
    crate::common::grads_or_zeros(loss, xs)
}

fn options(first_order: bool, eval_query: bool) -> (InnerloopOptions, bool) {
    let o = InnerloopOptions::new()
        .initial_weights(InitialWeights::BaseParameters)
        .first_order(first_order);
    (o, eval_query)
}

/// The loop over tasks: task `t` runs on `models[t]` (equal parameter values; a model per
/// task so that each can hold its own fixed dropout mask), MSE losses.
fn looped<O: DifferentiableOptimizer>(
    models: &[Sequential],
    opt: &Optimizer<O>,
    data: &Data,
    steps: usize,
    setup: (InnerloopOptions, bool),
) -> Outcome {
    let mut fast: Vec<Vec<Tensor>> = Vec::new();
    let mut meta: Option<Vec<Tensor>> = None;
    for (t, model) in models.iter().enumerate() {
        let (mut fmodel, mut diffopt) = innerloop(model, opt, setup.0.clone()).unwrap();
        let (xs, ys) = &data.support[t];
        for _ in 0..steps {
            let loss = mse(&fmodel.forward(xs).unwrap(), ys).unwrap();
            diffopt.step(&mut fmodel, &loss).unwrap();
        }
        if setup.1 {
            fmodel.eval().unwrap();
        }
        let (xq, yq) = &data.query[t];
        let q = mse(&fmodel.forward(xq).unwrap(), yq).unwrap();
        fast.push(fmodel.fast_params().to_vec());
        let g = meta_grads(&q, &model.parameters().unwrap());
        meta = Some(match meta {
            None => g,
            Some(s) => s.iter().zip(&g).map(|(a, b)| a.add(b).unwrap()).collect(),
        });
    }
    let fast = (0..fast[0].len())
        .map(|i| {
            let parts: Vec<Tensor> = fast.iter().map(|v| v[i].clone()).collect();
            Tensor::stack(&parts, 0).unwrap()
        })
        .collect();
    Outcome {
        fast,
        meta: meta.unwrap(),
    }
}

/// All tasks in one unroll on `model`.
fn batched<O: DifferentiableOptimizer>(
    model: &Sequential,
    opt: &Optimizer<O>,
    data: &Data,
    steps: usize,
    setup: (InnerloopOptions, bool),
) -> Outcome {
    let tasks = data.support.len();
    let (mut fmodel, mut diffopt) = innerloop(model, opt, setup.0.tasks(tasks)).unwrap();
    let (xs, ys) = stacked(&data.support);
    for _ in 0..steps {
        let losses = mse_per_task(&fmodel.forward(&xs).unwrap(), &ys).unwrap();
        assert_eq!(losses.dims(), [tasks]);
        diffopt
            .step(&mut fmodel, &losses.sum_all().unwrap())
            .unwrap();
    }
    if setup.1 {
        fmodel.eval().unwrap();
    }
    let (xq, yq) = stacked(&data.query);
    let q = mse_per_task(&fmodel.forward(&xq).unwrap(), &yq)
        .unwrap()
        .sum_all()
        .unwrap();
    Outcome {
        fast: fmodel.fast_params().to_vec(),
        meta: meta_grads(&q, &model.parameters().unwrap()),
    }
}

fn max_abs(t: &Tensor) -> f64 {
    t.to_vec_f64()
        .unwrap()
        .into_iter()
        .fold(0.0, |m, v| m.max(v.abs()))
}

/// Runs `batched_model` batched and `task_models` looped, and compares every fast weight
/// and meta-gradient; the weights must have moved and the meta-gradients must not vanish.
fn check<O: DifferentiableOptimizer>(
    name: &str,
    batched_model: &Sequential,
    task_models: &[Sequential],
    opt: &Optimizer<O>,
    data: &Data,
    setup: (InnerloopOptions, bool),
) {
    let want = looped(task_models, opt, data, 2, setup.clone());
    let got = batched(batched_model, opt, data, 2, setup);
    let names: Vec<String> = batched_model
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
    let base = batched_model.parameters().unwrap();
    let moved = (0..base.len())
        .map(|i| max_abs(&want.fast[i].sub(base[i].unsqueeze(0).unwrap()).unwrap()))
        .fold(0.0, f64::max);
    assert!(
        moved > 1e-6,
        "{name}: the inner loop did not move the weights"
    );
    let meta = want.meta.iter().map(max_abs).fold(0.0, f64::max);
    assert!(meta > 1e-6, "{name}: the meta-gradient vanishes");
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

fn vb(seed: u64) -> VarBuilder {
    VarBuilder::new(seed, F64, &device())
}

/// Sinusoid regression sets, `[6, 1]` each, a different amplitude and phase per task.
fn sine_data(tasks: usize, seed: u64) -> Data {
    let mut r = rng(seed);
    let mut set = |amp: f64, phase: f64| {
        let x = uniform(&mut r, &[6, 1], -3.0, 3.0);
        let y: Vec<f64> = x
            .to_vec_f64()
            .unwrap()
            .into_iter()
            .map(|v| amp * (v - phase).sin())
            .collect();
        (x, Tensor::from_vec(y, &[6, 1], &device()).unwrap())
    };
    let sets: Vec<_> = (0..tasks)
        .map(|t| {
            let (amp, phase) = (0.5 + t as f64, 0.3 * t as f64);
            (set(amp, phase), set(amp, phase))
        })
        .collect();
    Data {
        support: sets.iter().map(|s| s.0.clone()).collect(),
        query: sets.iter().map(|s| s.1.clone()).collect(),
    }
}

// ------------------------------------------------------------------------ weight norm

fn weight_norm_mlp() -> Sequential {
    let vb = vb(31);
    seq()
        .add(weight_norm(linear(1, 8, vb.pp("0")).unwrap(), "weight").unwrap())
        .add(Activation::Tanh)
        .add(weight_norm(linear(8, 1, vb.pp("2")).unwrap(), "weight").unwrap())
}

#[test]
fn weight_norm_mlp_batched_equals_looped() {
    let model = weight_norm_mlp();
    let names: Vec<String> = model
        .named_parameters()
        .unwrap()
        .into_iter()
        .map(|p| p.0)
        .collect();
    assert_eq!(
        names,
        [
            "0.bias",
            "0.weight_g",
            "0.weight_v",
            "2.bias",
            "2.weight_g",
            "2.weight_v"
        ]
    );
    let data = sine_data(4, 32);
    let n = names.len();
    let loop_models = vec![model.clone(); 4];
    let full = options(false, false);
    check(
        "wn sgd",
        &model,
        &loop_models,
        &sgd_momentum(n),
        &data,
        full.clone(),
    );
    check("wn adam", &model, &loop_models, &adam(n), &data, full);
    let fo = options(true, false);
    check(
        "wn adam first order",
        &model,
        &loop_models,
        &adam(n),
        &data,
        fo,
    );
}

/// A convolution's weight `[out, in, kh, kw]`: the norm runs over three dims per task.
#[test]
fn weight_norm_conv_batched_equals_looped() {
    let vb = vb(33);
    let pad = ConvConfig {
        padding: 1,
        ..ConvConfig::default()
    };
    let model = seq()
        .add(weight_norm(conv2d(2, 3, 3, pad, vb.pp("0")).unwrap(), "weight").unwrap())
        .add(Activation::Tanh)
        .add(flatten())
        .add(linear(3 * 4 * 4, 2, vb.pp("3")).unwrap());
    let mut r = rng(34);
    let mut set = || (randn(&mut r, &[3, 2, 4, 4]), randn(&mut r, &[3, 2]));
    let data = Data {
        support: (0..3).map(|_| set()).collect(),
        query: (0..3).map(|_| set()).collect(),
    };
    let n = model.parameters().unwrap().len();
    let loop_models = vec![model.clone(); 3];
    check(
        "wn conv adam",
        &model,
        &loop_models,
        &adam(n),
        &data,
        options(false, false),
    );
}

/// The batched weight is, task by task, the unbatched weight of that task's `g` and `v`
/// (each task's own norm), and a magnitude of the wrong shape is a typed error.
#[test]
fn weight_norm_takes_each_tasks_own_norm() {
    let mut r = rng(35);
    let mut wn = weight_norm(linear(4, 3, vb(36)).unwrap(), "weight").unwrap();
    let (g, v) = (
        uniform(&mut r, &[5, 3, 1], 0.5, 2.0),
        randn(&mut r, &[5, 3, 4]),
    );
    let per_task: Vec<Tensor> = (0..5)
        .map(|t| {
            let mut one = wn.clone();
            one.g = g.narrow(0, t, 1).unwrap().squeeze(0).unwrap();
            one.v = v.narrow(0, t, 1).unwrap().squeeze(0).unwrap();
            let w = one.weight().unwrap();
            // Each row of a task's weight has that task's magnitude as its norm.
            let norms = w.sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
            assert_same("row norms = g", &norms, &one.g.squeeze(1).unwrap());
            w
        })
        .collect();
    wn.g = g.clone();
    wn.v = v.clone();
    assert_same(
        "batched weight",
        &wn.weight().unwrap(),
        &Tensor::stack(&per_task, 0).unwrap(),
    );
    wn.g = uniform(&mut r, &[5, 1, 1], 0.5, 2.0);
    let err = wn.weight().unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    assert!(err.to_string().contains("[5, 3, 4]"), "{err}");
    wn.g = g;
    wn.v = randn(&mut r, &[2, 5, 3, 4]);
    assert!(matches!(wn.weight(), Err(Error::InvalidArgument { .. })));
}

// ------------------------------------------------------------------------ weight dropout

const P: f64 = 0.4;

/// A mask of `shape`: `1/(1-P)` with probability `1 - P`, else 0, from `seed`.
fn mask(shape: &[usize], seed: u64) -> Tensor {
    let mut r = rng(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n)
        .map(|_| {
            if r.gen::<f64>() < P {
                0.0
            } else {
                1.0 / (1.0 - P)
            }
        })
        .collect();
    Tensor::from_vec(data, shape, &device()).unwrap()
}

/// Linear -> tanh -> WeightDropout(Linear 8x8) -> tanh -> Linear; the dropout's masks
/// fixed to `masks` if given. Equal parameter values at every call.
fn dropout_mlp(p: f64, masks: Option<Tensor>) -> Sequential {
    let vb = vb(41);
    let mut wd = weight_dropout(
        linear(8, 8, vb.pp("2")).unwrap(),
        &["weight"],
        p,
        vb.pp("2"),
    )
    .unwrap();
    if let Some(m) = masks {
        wd.fix_masks(vec![m]).unwrap();
    }
    seq()
        .add(linear(1, 8, vb.pp("0")).unwrap())
        .add(Activation::Tanh)
        .add(wd)
        .add(Activation::Tanh)
        .add(linear(8, 1, vb.pp("4")).unwrap())
}

/// One fixed mask per task: the batched run with the `[T, 8, 8]` masks equals the loop
/// in which task `t` has row `t`; a mask shared by all tasks equals the loop with it.
#[test]
fn weight_dropout_fixed_masks_batched_equals_looped() {
    let tasks = 3;
    let data = sine_data(tasks, 42);
    let per_task = mask(&[tasks, 8, 8], 43);
    let rows: Vec<Tensor> = (0..tasks)
        .map(|t| per_task.narrow(0, t, 1).unwrap().squeeze(0).unwrap())
        .collect();
    // The masks really differ between tasks.
    assert!(max_abs(&rows[0].sub(&rows[1]).unwrap()) > 0.0);
    let model = dropout_mlp(P, Some(per_task));
    let loop_models: Vec<Sequential> = rows
        .iter()
        .map(|m| dropout_mlp(P, Some(m.clone())))
        .collect();
    let n = model.parameters().unwrap().len();
    let full = options(false, false);
    check(
        "wd per-task sgd",
        &model,
        &loop_models,
        &sgd_momentum(n),
        &data,
        full.clone(),
    );
    check(
        "wd per-task adam",
        &model,
        &loop_models,
        &adam(n),
        &data,
        full.clone(),
    );
    let fo = options(true, false);
    check(
        "wd per-task first order",
        &model,
        &loop_models,
        &adam(n),
        &data,
        fo,
    );

    let shared = mask(&[8, 8], 44);
    let model = dropout_mlp(P, Some(shared.clone()));
    let loop_models = vec![model.clone(); tasks];
    check(
        "wd shared adam",
        &model,
        &loop_models,
        &adam(n),
        &data,
        full,
    );
}

/// With p = 0, and in eval mode for the query, drawn masks leave nothing random: the
/// batched run equals the loop exactly.
#[test]
fn weight_dropout_p0_and_eval_batched_equal_looped() {
    let data = sine_data(3, 45);
    let model = dropout_mlp(0.0, None);
    let n = model.parameters().unwrap().len();
    let loop_models = vec![model.clone(); 3];
    check(
        "wd p=0 adam",
        &model,
        &loop_models,
        &adam(n),
        &data,
        options(false, false),
    );
    // Eval mode throughout (inner steps too): the raw weights unchanged.
    let mut model = dropout_mlp(P, None);
    model.eval().unwrap();
    let loop_models = vec![model.clone(); 3];
    check(
        "wd eval sgd",
        &model,
        &loop_models,
        &sgd_momentum(n),
        &data,
        options(false, true),
    );
}

/// AWD-LSTM style: an LSTM's hidden-to-hidden weight dropped with a fixed mask per task.
#[test]
fn weight_dropout_lstm_batched_equals_looped() {
    let tasks = 2;
    let build = |m: Tensor| {
        let vb = vb(46);
        let mut wd = weight_dropout(
            nn::lstm(2, 4, 1, vb.pp("0")).unwrap(),
            &["weight_hh_l0"],
            P,
            vb.pp("0"),
        )
        .unwrap();
        wd.fix_masks(vec![m]).unwrap();
        seq().add(wd).add(linear(4, 1, vb.pp("1")).unwrap())
    };
    let per_task = mask(&[tasks, 16, 4], 47);
    let model = build(per_task.clone());
    let loop_models: Vec<Sequential> = (0..tasks)
        .map(|t| build(per_task.narrow(0, t, 1).unwrap().squeeze(0).unwrap()))
        .collect();
    let mut r = rng(48);
    let mut set = || (randn(&mut r, &[3, 2, 2]), randn(&mut r, &[3, 2, 1]));
    let data = Data {
        support: (0..tasks).map(|_| set()).collect(),
        query: (0..tasks).map(|_| set()).collect(),
    };
    let n = model.parameters().unwrap().len();
    check(
        "awd lstm adam",
        &model,
        &loop_models,
        &adam(n),
        &data,
        options(false, false),
    );
}

/// Drawn masks in a task-batched forward: each task's own (the tasks, given the same input
/// and the same initial weights, give different outputs), at the rate p (a `[T, ..]` raw
/// weight draws a `[T, ..]` mask of zeros at rate p, within 5 standard deviations), and
/// reproducible (two fmodels from one base draw the same masks).
#[test]
fn weight_dropout_draws_independent_masks_per_task() {
    let tasks = 6;
    let vb = vb(49);
    let mut wd = weight_dropout(
        linear_no_bias(20, 20, vb.pp("0")).unwrap(),
        &["weight"],
        P,
        vb,
    )
    .unwrap();
    let one = wd.raw[0].clone();
    wd.raw[0] = one
        .unsqueeze(0)
        .unwrap()
        .broadcast_as(&[tasks, 20, 20])
        .unwrap();
    let masks = wd.sample_masks().unwrap();
    assert_eq!(masks[0].dims(), [tasks, 20, 20]);
    let values = masks[0].to_vec_f64().unwrap();
    assert!(values.iter().all(|&v| v == 0.0 || v == 1.0 / (1.0 - P)));
    let zeros = values.iter().filter(|&&v| v == 0.0).count() as f64;
    let n = values.len() as f64;
    let sd = (P * (1.0 - P) / n).sqrt();
    assert!((zeros / n - P).abs() < 5.0 * sd, "zero rate {}", zeros / n);
    for t in 1..tasks {
        let (a, b) = (
            masks[0].narrow(0, 0, 1).unwrap(),
            masks[0].narrow(0, t, 1).unwrap(),
        );
        assert!(
            max_abs(&a.sub(&b).unwrap()) > 0.0,
            "tasks 0 and {t} share a mask"
        );
    }

    // In a task-batched fmodel: the same input for every task.
    let model = dropout_mlp(P, None);
    let opt = adam(model.parameters().unwrap().len());
    let x = randn(&mut rng(50), &[5, 1]).to_vec_f64().unwrap();
    let x = Tensor::from_vec(x.repeat(tasks), &[tasks, 5, 1], &device()).unwrap();
    let batched_forward = || {
        let (fmodel, _) = innerloop(&model, &opt, InnerloopOptions::new().tasks(tasks)).unwrap();
        fmodel.forward(&x).unwrap()
    };
    let y = batched_forward();
    let y0 = y.narrow(0, 0, 1).unwrap();
    for t in 1..tasks {
        let d = max_abs(&y.narrow(0, t, 1).unwrap().sub(&y0).unwrap());
        assert!(d > 1e-6, "task {t} got task 0's mask");
    }
    assert_same("reproducible", &batched_forward(), &y);
}

/// Masks of the wrong shape are typed errors: at `fix_masks`, and a per-task mask used
/// where the forward is not task-batched (or has another number of tasks).
#[test]
fn weight_dropout_mask_shape_errors() {
    let vb = vb(51);
    let mut wd = weight_dropout(linear(3, 2, vb.pp("0")).unwrap(), &["weight"], P, vb).unwrap();
    let err = wd.fix_masks(vec![mask(&[3, 2], 52)]).unwrap_err();
    assert!(matches!(err, Error::ParamShape { .. }), "{err}");
    let err = wd.fix_masks(vec![mask(&[4, 3, 2], 52)]).unwrap_err();
    assert!(matches!(err, Error::ParamShape { .. }), "{err}");
    wd.fix_masks(vec![mask(&[4, 2, 3], 53)]).unwrap();
    // Not batched: the per-task mask does not fit.
    let err = wd.forward(&randn(&mut rng(54), &[5, 3])).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    assert!(err.to_string().contains("weight"), "{err}");
    // Batched with 3 tasks, masks for 4.
    let model = seq().add(wd);
    let opt = adam(model.parameters().unwrap().len());
    let (fmodel, _) = innerloop(&model, &opt, InnerloopOptions::new().tasks(3)).unwrap();
    let err = fmodel
        .forward(&randn(&mut rng(55), &[3, 5, 3]))
        .unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
}
