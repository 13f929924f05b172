//! Task-batched inner loops under adversarial input: every misfit (another task count
//! between inputs, targets, overrides and the model, a missing task axis, wrong ranks,
//! dtypes, zero tasks, zero-size dims, bad labels, unknown names) is a typed error naming
//! what is wrong, never a panic or a silently wrong number, and a failed step leaves the
//! fmodel and the optimizer as they were. Beside the misfits, batched unrolls of layer and
//! optimizer combinations that `batched.rs` and `batched_reparam.rs` do not cover are
//! compared with the loop over tasks.

use candle_higher::nn::{
    self, avg_pool2d, batch_norm1d, batch_norm2d, conv1d, conv2d, cross_entropy_per_task,
    embedding, flatten, gru_cell, layer_norm, linear, lstm, mse, mse_per_task, nll_per_task,
    rnn_cell, seq, weight_norm, Activation, BatchNormConfig, ConvConfig, Module, Parameters,
    Sequential, VarBuilder,
};
use candle_higher::optim::{
    grad_callback, Adadelta, Adagrad, Adam, AdamW, Adamax, Asgd, DiffOptimizer, Optimizer,
    Overrides, RmsProp, Rprop, Sgd, StateValue, StepOptions,
};
use candle_higher::{
    innerloop, DType, DifferentiableOptimizer, Error, FunctionalModel, FunctionalOptions,
    InitialWeights, InnerloopOptions, Tensor,
};

use crate::common::{assert_batched_same, device, dtype, from_f64, randn, rng, t};

/// Agreement required between the batched and the looped unroll (relative to max(1, |x|)).
const EXACT: f64 = 1e-12;

fn assert_same(what: &str, got: &Tensor, want: &Tensor) {
    assert_batched_same(what, got, want, EXACT);
}

fn vb(seed: u64) -> VarBuilder {
    VarBuilder::new(seed, dtype(), &device())
}

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, dtype(), &device()).unwrap()
}

fn per_task(values: &[f64]) -> Tensor {
    from_f64(values.to_vec(), &[values.len()])
}

fn mlp(seed: u64) -> Sequential {
    let vb = vb(seed);
    seq()
        .add(linear(2, 6, vb.pp("0")).unwrap())
        .add(Activation::Tanh)
        .add(linear(6, 1, vb.pp("2")).unwrap())
}

fn adam(n: usize) -> Optimizer<Adam> {
    Optimizer::new(Adam::new(0.05), n).unwrap()
}

fn stack(ts: &[Tensor]) -> Tensor {
    Tensor::stack(ts, 0).unwrap()
}

fn grads(loss: &Tensor, xs: &[Tensor]) -> Vec<Tensor> {
    crate::common::grads_or_zeros(loss, xs)
}

/// Everything a failed step must leave alone: the time, the fast weights' handles, the
/// buffers' values and every optimizer state entry's value.
#[derive(Debug, PartialEq)]
struct Observed {
    time: usize,
    params: Vec<candle_higher::TensorId>,
    buffers: Vec<Vec<f64>>,
    states: Vec<Vec<(String, Vec<f64>)>>,
    lr: Vec<f64>,
}

fn observe<M: Module + Parameters + Clone, O: DifferentiableOptimizer>(
    fmodel: &FunctionalModel<M>,
    diffopt: &DiffOptimizer<O>,
) -> Observed {
    let states = diffopt
        .states()
        .iter()
        .map(|s| {
            s.entries()
                .map(|(k, v)| {
                    let values = match v {
                        StateValue::Tensor(t) => t.to_vec_f64().unwrap(),
                        StateValue::Scalar(s) => s
                            .as_tensor()
                            .map_or_else(|| vec![f64::NAN], |t| t.to_vec_f64().unwrap()),
                        StateValue::Int(i) => vec![i as f64],
                    };
                    (k.to_string(), values)
                })
                .collect()
        })
        .collect();
    let lr = match diffopt.hyperparameter(0, "lr").unwrap() {
        candle_higher::Scalar::Float(v) => vec![v],
        candle_higher::Scalar::Tensor(t) => t.to_vec_f64().unwrap(),
    };
    Observed {
        time: fmodel.time(),
        params: fmodel.fast_params().iter().map(Tensor::id).collect(),
        buffers: fmodel
            .buffers()
            .unwrap()
            .into_iter()
            .map(|b| b.1.to_vec_f64().unwrap())
            .collect(),
        states,
        lr,
    }
}

// ------------------------------------------------------------------ linear_tasks

/// A batched Linear with no input features computes each task's bias alone (PyTorch's
/// `bmm` of empty operands gives zeros), and its step moves the bias: the loss
/// `mean_{n, j} b_j^2` over 4 rows has `d/db_j = 2 b_j / 3` (3 outputs).
#[test]
fn linear_tasks_with_no_input_features_gives_each_tasks_bias() {
    let model = seq().add(linear(0, 3, vb(1).pp("0")).unwrap());
    let opt = Optimizer::new(Sgd::new(0.3), 2).unwrap();
    let options = InnerloopOptions::new().tasks(2);
    let (mut fmodel, mut diffopt) = innerloop(&model, &opt, options).unwrap();
    let y = fmodel.forward(&zeros(&[2, 4, 0])).unwrap();
    assert_eq!(y.dims(), [2, 4, 3]);
    let b = model.parameters().unwrap()[1].to_vec_f64().unwrap();
    let rows: Vec<f64> = (0..8).flat_map(|_| b.clone()).collect();
    assert_eq!(y.to_vec_f64().unwrap(), rows);
    let loss = mse_per_task(&y, &zeros(&[2, 4, 3]))
        .unwrap()
        .sum_all()
        .unwrap();
    diffopt.step(&mut fmodel, &loss).unwrap();
    assert_eq!(fmodel.fast_params()[0].dims(), [2, 3, 0]);
    let moved: Vec<f64> = b.iter().map(|v| v * (1.0 - 0.3 * 2.0 / 3.0)).collect();
    let got = fmodel.fast_params()[1].to_vec_f64().unwrap();
    for (g, w) in got.iter().zip(moved.iter().chain(&moved)) {
        assert!((g - w).abs() < 1e-12, "{got:?} vs {moved:?}");
    }
}

/// Zero tasks, zero rows and zero outputs give empty results of the right shapes, and the
/// backward of an empty product is zeros.
#[test]
fn linear_tasks_with_zero_size_dims_is_empty() {
    let y = zeros(&[0, 2, 3])
        .linear_tasks(&zeros(&[0, 4, 3]), None)
        .unwrap();
    assert_eq!(y.dims(), [0, 2, 4]);
    let y = zeros(&[2, 0, 3])
        .linear_tasks(&zeros(&[2, 4, 3]), Some(&zeros(&[2, 4])))
        .unwrap();
    assert_eq!(y.dims(), [2, 0, 4]);
    let x = randn(&mut rng(2), &[2, 3, 2]).to_leaf();
    let w = randn(&mut rng(3), &[2, 0, 2]).to_leaf();
    let y = x.linear_tasks(&w, None).unwrap();
    assert_eq!(y.dims(), [2, 3, 0]);
    let g = grads(&y.sum_all().unwrap(), &[x]);
    assert_eq!(g[0].to_vec_f64().unwrap(), vec![0.0; 12]);
}

#[test]
fn linear_tasks_rejects_every_misfit_operand() {
    let x = zeros(&[3, 4, 2]);
    let w = zeros(&[3, 5, 2]);
    // (input, weight): no task axis on the weight, another task count, another in_features,
    // an input without rows.
    for (xd, wd) in [
        (&[3, 4, 2][..], &[5, 2][..]),
        (&[2, 4, 2], &[3, 5, 2]),
        (&[3, 4, 3], &[3, 5, 2]),
        (&[3], &[3, 5, 2]),
        (&[3, 4, 2], &[3, 5, 2, 1]),
    ] {
        match zeros(xd).linear_tasks(&zeros(wd), None) {
            Err(Error::ShapeMismatch {
                op: "linear_tasks",
                got,
                ..
            }) => assert_eq!(got, xd),
            other => panic!("{xd:?} x {wd:?}: {other:?}"),
        }
    }
    for bd in [&[5][..], &[2, 5], &[3, 4], &[3, 5, 1]] {
        match x.linear_tasks(&w, Some(&zeros(bd))) {
            Err(Error::ShapeMismatch {
                op: "linear_tasks (bias)",
                got,
                ..
            }) => assert_eq!(got, bd),
            other => panic!("bias {bd:?}: {other:?}"),
        }
    }
    let other = if dtype() == DType::F64 {
        DType::F32
    } else {
        DType::F64
    };
    let x_other = x.to_dtype(other).unwrap();
    assert!(matches!(
        x_other.linear_tasks(&w, None),
        Err(Error::DTypeMismatch { .. })
    ));
    let b_other = zeros(&[3, 5]).to_dtype(other).unwrap();
    assert!(matches!(
        x.linear_tasks(&w, Some(&b_other)),
        Err(Error::DTypeMismatch { .. })
    ));
    // Integer operands are rejected as the plain `linear` rejects them.
    let xi = x.to_dtype(DType::U32).unwrap();
    let wi = w.to_dtype(DType::U32).unwrap();
    match xi.linear_tasks(&wi, None) {
        Err(Error::UnsupportedDType { op, .. }) => assert_eq!(op, "linear_tasks"),
        other => panic!("u32 operands: {other:?}"),
    }
}

// ------------------------------------------------------------------ layers in a batched fmodel

/// Runs `model` batched with 3 tasks on `good` (which must work) and on each of `bad`,
/// which must be a `ShapeMismatch` (or for a BatchNorm with one value per channel, too)
/// and leave the fmodel's buffers and weights unchanged; an input of `good`'s shape in
/// the other float dtype is a dtype error.
fn probe<M: Module + Parameters + Clone>(name: &str, model: &M, good: &[usize], bad: &[&[usize]]) {
    let opt = adam(model.parameters().unwrap().len());
    let (fmodel, diffopt) = innerloop(model, &opt, InnerloopOptions::new().tasks(3)).unwrap();
    let ones = |shape: &[usize]| Tensor::ones(shape, dtype(), &device()).unwrap();
    let y = fmodel.forward(&ones(good)).unwrap();
    assert_eq!(y.dims()[0], 3, "{name}: output {:?}", y.dims());
    let before = observe(&fmodel, &diffopt);
    for shape in bad {
        // (A recurrent layer names the time step's input, the rest the whole input.)
        match fmodel.forward(&ones(shape)) {
            Err(Error::ShapeMismatch { got, .. }) => {
                assert!(
                    got == *shape || got.len() + 1 == shape.len(),
                    "{name}: {got:?}"
                )
            }
            other => panic!("{name}: input {shape:?}: {other:?}"),
        }
        assert_eq!(observe(&fmodel, &diffopt), before, "{name}: {shape:?}");
    }
    let other = if dtype() == DType::F64 {
        DType::F32
    } else {
        DType::F64
    };
    match fmodel.forward(&ones(good).to_dtype(other).unwrap()) {
        Err(Error::DTypeMismatch { .. }) => {}
        other => panic!("{name}: input in the other dtype: {other:?}"),
    }
    assert_eq!(observe(&fmodel, &diffopt), before, "{name}: dtype");
}

#[test]
fn batched_layers_reject_inputs_of_another_task_count_or_rank() {
    let vb = vb(5);
    let cfg = ConvConfig::default();
    let bn = BatchNormConfig::default();
    probe(
        "linear",
        &seq().add(linear(2, 3, vb.pp("a")).unwrap()),
        &[3, 4, 2],
        &[&[2, 4, 2], &[4, 2], &[3, 4, 5], &[1, 4, 2], &[3, 0]],
    );
    probe(
        "conv1d",
        &seq().add(conv1d(2, 3, 3, cfg, vb.pp("b")).unwrap()),
        &[3, 4, 2, 6],
        &[&[2, 4, 2, 6], &[4, 2, 6], &[3, 4, 5, 6], &[3, 4, 2, 6, 1]],
    );
    probe(
        "conv2d",
        &seq().add(conv2d(2, 3, 3, cfg, vb.pp("c")).unwrap()),
        &[3, 4, 2, 5, 5],
        &[
            &[2, 4, 2, 5, 5],
            &[4, 2, 5, 5],
            &[3, 4, 1, 5, 5],
            &[3, 4, 2, 2, 2],
        ],
    );
    probe(
        "batch_norm1d",
        &seq().add(batch_norm1d(2, bn, vb.pp("d")).unwrap()),
        &[3, 4, 2],
        &[
            &[2, 4, 2],
            &[4, 2],
            &[3, 4, 3],
            &[3, 1, 2],
            &[3, 4, 2, 1, 1],
        ],
    );
    probe(
        "batch_norm2d",
        &seq().add(batch_norm2d(2, bn, vb.pp("e")).unwrap()),
        &[3, 4, 2, 3, 3],
        &[
            &[2, 4, 2, 3, 3],
            &[4, 2, 3, 3],
            &[3, 4, 5, 3, 3],
            &[3, 1, 2, 1, 1],
        ],
    );
    probe(
        "layer_norm",
        &seq().add(layer_norm(&[2, 3], vb.pp("f")).unwrap()),
        &[3, 4, 2, 3],
        &[&[2, 4, 2, 3], &[2, 3], &[3, 4, 3, 2]],
    );
    probe(
        "rnn_cell",
        &seq().add(rnn_cell(2, 3, vb.pp("g")).unwrap()),
        &[3, 4, 2],
        &[&[2, 4, 2], &[4, 2], &[3, 4, 5], &[3, 4, 2, 1]],
    );
    probe(
        "gru_cell",
        &seq().add(gru_cell(2, 3, vb.pp("h")).unwrap()),
        &[3, 4, 2],
        &[&[2, 4, 2], &[4, 2], &[3, 4, 3]],
    );
    probe(
        "lstm",
        &seq().add(lstm(2, 3, 2, vb.pp("i")).unwrap()),
        &[3, 5, 4, 2],
        &[&[2, 5, 4, 2], &[5, 4, 2], &[3, 5, 4, 3]],
    );
    probe(
        "weight_norm linear",
        &seq().add(weight_norm(linear(2, 3, vb.pp("j")).unwrap(), "weight").unwrap()),
        &[3, 4, 2],
        &[&[2, 4, 2], &[4, 2], &[3, 4, 3]],
    );
    // A later layer's misfit, after a pooling of the rank-5 input: the Linear names the
    // flattened features it got.
    let model = seq()
        .add(conv2d(1, 2, 3, cfg, vb.pp("k")).unwrap())
        .add(avg_pool2d(2))
        .add(flatten())
        .add(linear(2, 1, vb.pp("l")).unwrap());
    probe(
        "conv pool linear",
        &model,
        &[3, 2, 1, 4, 4],
        &[&[2, 2, 1, 4, 4]],
    );
    let (fmodel, _) = innerloop(&model, &adam(4), InnerloopOptions::new().tasks(3)).unwrap();
    match fmodel.forward(&zeros(&[3, 2, 1, 6, 6])) {
        Err(Error::ShapeMismatch { op, got, .. }) => {
            assert_eq!((op, got), ("Linear", vec![3, 2, 8]))
        }
        other => panic!("{other:?}"),
    }
}

/// Token ids that are not class indices (fractions, negatives, NaN, past the table) are
/// errors naming the bad id and its position, whichever task holds it; a table with no
/// task axis where the ids have one works as a shared table.
#[test]
fn batched_embedding_rejects_ids_that_are_not_indices() {
    let model = seq().add(embedding(4, 2, vb(7).pp("0")).unwrap());
    let opt = adam(1);
    let (fmodel, _) = innerloop(&model, &opt, InnerloopOptions::new().tasks(2)).unwrap();
    let ok = t(&[0.0, 1.0, 2.0, 3.0, 3.0, 2.0], &[2, 3]);
    assert_eq!(fmodel.forward(&ok).unwrap().dims(), [2, 3, 2]);
    for (bad, shown) in [(1.5, "1.5"), (-1.0, "-1"), (f64::NAN, "NaN"), (4.0, "4")] {
        let ids = t(&[0.0, 1.0, 2.0, 3.0, bad, 2.0], &[2, 3]);
        match fmodel.forward(&ids) {
            Err(Error::InvalidArgument { op, message }) => {
                assert_eq!(op, "Embedding");
                assert!(
                    message.contains(shown) && message.contains("position 4"),
                    "{message}"
                );
            }
            other => panic!("id {bad}: {other:?}"),
        }
    }
    match fmodel.forward(&t(&[0.0, 1.0, 2.0], &[3])) {
        Err(Error::ShapeMismatch { got, .. }) => assert_eq!(got, [3]),
        other => panic!("ids without the task axis: {other:?}"),
    }
    // A hand-built table with zero tasks: an error, not a division by zero.
    let empty = nn::Embedding {
        weight: zeros(&[0, 4, 2]),
    };
    assert!(matches!(
        empty.forward(&t(&[0.0, 1.0], &[1, 2])),
        Err(Error::ShapeMismatch { .. })
    ));
    let y = empty.forward(&zeros(&[0, 2])).unwrap();
    assert_eq!(y.dims(), [0, 2, 2]);
}

/// A recurrent layer over an empty sequence is a shape error naming the sequence dim, as
/// PyTorch raises ("Expected sequence length to be larger than 0"), batched or not, in
/// either layout; it used to be `cat`'s "no tensors to concatenate".
#[test]
fn recurrent_over_an_empty_sequence_is_a_shape_error() {
    let mut layer = lstm(2, 3, 1, vb(8).pp("0")).unwrap();
    for (batch_first, shape, dim) in [(false, [0, 4, 2], 0), (true, [4, 0, 2], 1)] {
        layer.batch_first = batch_first;
        match layer.forward(&zeros(&shape)) {
            Err(Error::ShapeMismatch { op, expected, got }) => {
                assert_eq!((op, got.as_slice()), ("Recurrent", &shape[..]));
                assert!(expected.contains(&format!("dim {dim}")), "{expected}");
            }
            other => panic!("batch_first {batch_first}: {other:?}"),
        }
    }
    layer.batch_first = false;
    let model = seq().add(layer);
    let opt = adam(model.parameters().unwrap().len());
    let (fmodel, _) = innerloop(&model, &opt, InnerloopOptions::new().tasks(2)).unwrap();
    match fmodel.forward(&zeros(&[2, 0, 4, 2])) {
        Err(Error::ShapeMismatch { expected, .. }) => assert!(expected.contains("dim 1")),
        other => panic!("batched: {other:?}"),
    }
}

// ------------------------------------------------------------------ per-task losses

/// A target must keep the prediction's task axis at dim 0: one of higher rank would
/// broadcast the prediction against every task's target (entry `t` would then mix all
/// tasks' predictions).
#[test]
fn mse_per_task_rejects_targets_that_move_the_task_axis() {
    let pred = randn(&mut rng(11), &[3, 4]);
    for target in [&[3, 1, 4][..], &[3, 3, 4], &[1, 3, 4]] {
        match mse_per_task(&pred, &zeros(target)) {
            Err(Error::ShapeMismatch { op, got, .. }) => {
                assert_eq!((op, got.as_slice()), ("mse_per_task", target));
            }
            other => panic!("target {target:?}: {other:?}"),
        }
    }
    assert!(matches!(
        mse_per_task(&pred, &zeros(&[2, 4])),
        Err(Error::BroadcastMismatch { .. })
    ));
    assert!(matches!(
        mse_per_task(&randn(&mut rng(12), &[1, 4]), &zeros(&[3, 4])),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        mse_per_task(&Tensor::scalar(1.0f64), &Tensor::scalar(1.0f64)),
        Err(Error::ShapeMismatch { .. })
    ));
    // A shared target (no task axis, or a task axis of 1) is every task's.
    let shared = randn(&mut rng(13), &[4]);
    let got = mse_per_task(&pred, &shared).unwrap();
    let want = mse_per_task(&pred, &shared.unsqueeze(0).unwrap()).unwrap();
    assert_eq!(got.dims(), [3]);
    assert_eq!(got.to_vec_f64().unwrap(), want.to_vec_f64().unwrap());
    for task in 0..3 {
        let one = mse(&pred.narrow(0, task, 1).unwrap(), &shared).unwrap();
        let diff = got.to_vec_f64().unwrap()[task] - one.to_scalar_f64().unwrap();
        assert!(diff.abs() < 1e-15, "task {task}");
    }
    let ints = pred.to_dtype(DType::U32).unwrap();
    match mse_per_task(&ints, &ints) {
        Err(Error::UnsupportedDType { op, .. }) => assert_eq!(op, "mse_per_task"),
        other => panic!("integer predictions: {other:?}"),
    }
}

#[test]
fn class_losses_per_task_reject_misfit_labels() {
    let logits = randn(&mut rng(14), &[3, 4, 5]);
    let labels = |v: &[f64], shape: &[usize]| t(v, shape);
    let good = labels(&[0., 1., 2., 3., 4., 0., 1., 2., 3., 4., 0., 1.], &[3, 4]);
    assert_eq!(cross_entropy_per_task(&logits, &good).unwrap().dims(), [3]);
    for shape in [&[2, 4][..], &[3, 3], &[12], &[3, 4, 1], &[3, 4, 5]] {
        let n: usize = shape.iter().product();
        let l = zeros(shape);
        assert_eq!(l.elem_count(), n);
        match cross_entropy_per_task(&logits, &l) {
            Err(Error::ShapeMismatch { op, .. }) => assert_eq!(op, "nll_per_task"),
            other => panic!("labels {shape:?}: {other:?}"),
        }
    }
    for (bad, shown) in [(5.0, "5"), (-1.0, "-1"), (2.5, "2.5"), (f64::NAN, "NaN")] {
        let mut v = good.to_vec_f64().unwrap();
        v[10] = bad;
        match nll_per_task(&logits.log_softmax(2).unwrap(), &labels(&v, &[3, 4])) {
            Err(Error::InvalidArgument { message, .. }) => {
                assert!(
                    message.contains(shown) && message.contains("position 10"),
                    "{message}"
                );
            }
            other => panic!("label {bad}: {other:?}"),
        }
    }
    for rank in [&[4, 5][..], &[3, 4, 5, 1]] {
        assert!(matches!(
            cross_entropy_per_task(&zeros(rank), &good),
            Err(Error::ShapeMismatch { .. })
        ));
    }
    let bce = nn::binary_cross_entropy_with_logits_per_task;
    let x = randn(&mut rng(15), &[3, 4]);
    assert!(matches!(
        bce(&x, &zeros(&[3, 1, 4])),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        bce(&Tensor::scalar(0.5f64), &Tensor::scalar(0.5f64)),
        Err(Error::ShapeMismatch { .. })
    ));
}

/// Zero-size inputs give PyTorch's results: no tasks give `[0]`, tasks with no elements
/// give NaN (the mean of nothing).
#[test]
fn per_task_losses_of_empty_tasks_follow_pytorch() {
    assert_eq!(
        mse_per_task(&zeros(&[0, 4]), &zeros(&[0, 4]))
            .unwrap()
            .dims(),
        [0]
    );
    let nan = mse_per_task(&zeros(&[3, 0]), &zeros(&[3, 0])).unwrap();
    assert_eq!(nan.dims(), [3]);
    assert!(nan.to_vec_f64().unwrap().iter().all(|v| v.is_nan()));
    let ce = cross_entropy_per_task(&zeros(&[0, 2, 3]), &zeros(&[0, 2])).unwrap();
    assert_eq!(ce.dims(), [0]);
}

// ------------------------------------------------------------------ zero tasks, misfit lists

#[test]
fn zero_tasks_is_an_error_everywhere_it_can_be_asked_for() {
    let model = mlp(1);
    let opt = adam(4);
    for initial in [InitialWeights::DetachedCopy, InitialWeights::BaseParameters] {
        let options = FunctionalOptions::default()
            .initial_weights(initial)
            .tasks(0);
        match FunctionalModel::new(&model, options) {
            Err(Error::InvalidArgument { op, message }) => {
                assert_eq!(op, "FunctionalModel::new");
                assert!(message.contains("tasks = 0"), "{message}");
            }
            other => panic!("{initial:?}: {other:?}"),
        }
        let options = InnerloopOptions::new().initial_weights(initial).tasks(0);
        assert!(matches!(
            innerloop(&model, &opt, options),
            Err(Error::InvalidArgument { .. })
        ));
    }
    // A model without parameters still has no tasks to batch.
    let no_params = seq().add(Activation::Relu);
    let options = FunctionalOptions::default().tasks(0);
    assert!(matches!(
        FunctionalModel::new(&no_params, options),
        Err(Error::InvalidArgument { .. })
    ));
    // A task-batched convolution with zero tasks.
    let x = zeros(&[0, 1, 1, 4, 4]);
    let conv = nn::Conv2d {
        weight: zeros(&[0, 1, 1, 3, 3]),
        bias: None,
        config: ConvConfig::default(),
    };
    assert!(matches!(conv.forward(&x), Err(Error::ShapeMismatch { .. })));
}

/// `update_params` on a batched fmodel takes `[T, ...]` weights only: the base model's own
/// parameters, another task count or a dropped task axis are `ParamShape` errors naming
/// the parameter, and nothing changes.
#[test]
fn update_params_on_a_batched_fmodel_needs_the_task_axis() {
    let model = mlp(2);
    let opt = adam(4);
    let (mut fmodel, diffopt) = innerloop(&model, &opt, InnerloopOptions::new().tasks(3)).unwrap();
    let before = observe(&fmodel, &diffopt);
    let base = model.parameters().unwrap();
    let other: Vec<Tensor> = fmodel
        .fast_params()
        .iter()
        .map(|p| p.narrow(0, 0, 2).unwrap())
        .collect();
    for list in [base, other] {
        match fmodel.update_params(list) {
            Err(Error::ParamShape { name, expected, .. }) => {
                assert_eq!(name, "0.weight");
                assert_eq!(expected, [3, 6, 2]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(observe(&fmodel, &diffopt), before);
    }
    let mut short = fmodel.fast_params().to_vec();
    short.pop();
    assert!(matches!(
        fmodel.update_params(short),
        Err(Error::ParamCount { .. })
    ));
    assert_eq!(observe(&fmodel, &diffopt), before);
    let x = zeros(&[3, 2, 2]);
    let y = fmodel.forward(&x).unwrap();
    assert_eq!(y.dims(), [3, 2, 1]);
}

// ------------------------------------------------------------------ failed steps change nothing

/// A batched fmodel with Adam after one good step, its data, and its observation.
fn stepped_batched() -> (
    FunctionalModel<Sequential>,
    DiffOptimizer<Adam>,
    Tensor,
    Tensor,
) {
    let model = mlp(3);
    let opt = adam(4);
    let options = InnerloopOptions::new()
        .tasks(3)
        .overrides(Overrides::new().set("lr", per_task(&[0.01, 0.02, 0.03])));
    let (mut fmodel, mut diffopt) = innerloop(&model, &opt, options).unwrap();
    let xs = randn(&mut rng(20), &[3, 5, 2]);
    let ys = randn(&mut rng(21), &[3, 5, 1]);
    let loss = mse_per_task(&fmodel.forward(&xs).unwrap(), &ys)
        .unwrap()
        .sum_all()
        .unwrap();
    diffopt.step(&mut fmodel, &loss).unwrap();
    (fmodel, diffopt, xs, ys)
}

#[test]
fn bad_step_overrides_change_neither_the_fmodel_nor_the_optimizer() {
    let (mut fmodel, mut diffopt, xs, ys) = stepped_batched();
    let before = observe(&fmodel, &diffopt);
    assert_eq!(before.lr, [0.01, 0.02, 0.03]);
    let loss = |f: &FunctionalModel<Sequential>| {
        mse_per_task(&f.forward(&xs).unwrap(), &ys)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    type Check = fn(&Error) -> bool;
    let shape: Check = |e| matches!(e, Error::ShapeMismatch { .. });
    let invalid: Check = |e| matches!(e, Error::InvalidHyperparameter { .. });
    let unknown: Check = |e| matches!(e, Error::InvalidArgument { message, .. } if message.contains("learning_rate"));
    let count: Check = |e| {
        matches!(
            e,
            Error::OverrideCount {
                given: 2,
                groups: 1,
                ..
            }
        )
    };
    let cases: Vec<(&str, Overrides, Check)> = vec![
        (
            "lr [2]",
            Overrides::new().set("lr", per_task(&[0.1, 0.2])),
            shape,
        ),
        (
            "lr [4]",
            Overrides::new().set("lr", per_task(&[0.1; 4])),
            shape,
        ),
        ("lr [0]", Overrides::new().set("lr", per_task(&[])), shape),
        (
            "lr [3, 1]",
            Overrides::new().set("lr", from_f64(vec![0.1; 3], &[3, 1])),
            shape,
        ),
        (
            "lr [1, 3]",
            Overrides::new().set("lr", from_f64(vec![0.1; 3], &[1, 3])),
            shape,
        ),
        (
            "lr NaN in task 1",
            Overrides::new().set("lr", per_task(&[0.1, f64::NAN, 0.1])),
            invalid,
        ),
        (
            "lr < 0 in task 2",
            Overrides::new().set("lr", per_task(&[0.1, 0.1, -0.1])),
            invalid,
        ),
        (
            "betas.1 = 1 in task 0",
            Overrides::new().set("betas.1", per_task(&[1.0, 0.9, 0.9])),
            invalid,
        ),
        (
            "eps < 0",
            Overrides::new().set("eps", per_task(&[1e-8, -1e-8, 1e-8])),
            invalid,
        ),
        (
            "unknown name",
            Overrides::new().set("learning_rate", per_task(&[0.1; 3])),
            unknown,
        ),
        (
            "two groups' values",
            Overrides::new().per_group("lr", [0.1, 0.2]),
            count,
        ),
        // A good entry before a bad one is not applied either.
        (
            "good then bad",
            Overrides::new()
                .set("lr", 0.5)
                .set("betas.0", per_task(&[0.9, 0.9, 1.5])),
            invalid,
        ),
    ];
    for (name, overrides, check) in cases {
        let l = loss(&fmodel);
        let err = diffopt
            .step_with(&mut fmodel, &l, StepOptions::new().overrides(overrides))
            .unwrap_err();
        assert!(check(&err), "{name}: {err}");
        assert_eq!(observe(&fmodel, &diffopt), before, "{name}");
    }
    // set_overrides checks in the same way.
    let err = diffopt
        .set_overrides(&Overrides::new().set("lr", per_task(&[0.1, 0.2])))
        .unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    assert!(err.to_string().contains("[3]"), "{err}");
    assert_eq!(observe(&fmodel, &diffopt), before);
    // The fmodel still steps.
    let l = loss(&fmodel);
    diffopt.step(&mut fmodel, &l).unwrap();
    assert_eq!(fmodel.time(), before.time + 1);
}

/// A loss that is not reduced to a scalar (the `[T]` per-task losses themselves), one from
/// another fmodel's weights, and a gradient callback that returns gradients without the
/// task axis or fails are errors that change nothing.
#[test]
fn bad_losses_and_callbacks_change_nothing() {
    let (mut fmodel, mut diffopt, xs, ys) = stepped_batched();
    let before = observe(&fmodel, &diffopt);
    let losses = mse_per_task(&fmodel.forward(&xs).unwrap(), &ys).unwrap();
    assert!(matches!(
        diffopt.step(&mut fmodel, &losses),
        Err(Error::NonScalarOutput { .. })
    ));
    assert_eq!(observe(&fmodel, &diffopt), before);
    let (other, _, _, _) = stepped_batched();
    let foreign = mse_per_task(&other.forward(&xs).unwrap(), &ys)
        .unwrap()
        .sum_all()
        .unwrap();
    assert!(matches!(
        diffopt.step(&mut fmodel, &foreign),
        Err(Error::NoGradient { .. })
    ));
    assert_eq!(observe(&fmodel, &diffopt), before);
    let loss = losses.sum_all().unwrap();
    // Task 0's gradient only (the task axis dropped): a shape error naming the parameter.
    let drop_axis = grad_callback(|gs| {
        gs.iter()
            .map(|g| {
                g.as_ref()
                    .map(|g| g.narrow(0, 0, 1)?.squeeze(0))
                    .transpose()
            })
            .collect()
    });
    let err = diffopt
        .step_with(&mut fmodel, &loss, StepOptions::new().callback(drop_axis))
        .unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    assert_eq!(observe(&fmodel, &diffopt), before);
    let failing = grad_callback(|_| {
        Err(Error::InvalidArgument {
            op: "clip",
            message: "refused".into(),
        })
    });
    let err = diffopt
        .step_with(&mut fmodel, &loss, StepOptions::new().callback(failing))
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { op: "clip", .. }),
        "{err}"
    );
    assert_eq!(observe(&fmodel, &diffopt), before);
    diffopt.step(&mut fmodel, &loss).unwrap();
}

/// A per-task override set for one task count does not silently broadcast against the
/// parameters when the task count is changed afterwards (`[3]` against `[2, 3]` would
/// scale each column by another task's learning rate).
#[test]
fn per_task_overrides_must_match_the_task_count_at_each_step() {
    let p = randn(&mut rng(30), &[2, 3]).to_leaf();
    let mut opt = DiffOptimizer::new(Sgd::new(0.1), std::slice::from_ref(&p)).unwrap();
    opt.set_tasks(Some(3));
    opt.set_overrides(&Overrides::new().set("lr", per_task(&[0.1, 0.2, 0.3])))
        .unwrap();
    for tasks in [Some(2), None] {
        opt.set_tasks(tasks);
        let loss = p.sqr().unwrap().sum_all().unwrap();
        match opt.step_params(&loss, std::slice::from_ref(&p)) {
            Err(Error::ShapeMismatch { got, .. }) => assert_eq!(got, [3]),
            other => panic!("tasks {tasks:?}: {other:?}"),
        }
        assert!(opt.states()[0].is_empty(), "tasks {tasks:?}");
    }
    // Back at 3 tasks on a [3, ..] parameter, it steps task by task.
    opt.set_tasks(Some(3));
    let q = randn(&mut rng(31), &[3, 2]).to_leaf();
    let loss = q
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .affine(0.5, 0.0)
        .unwrap();
    let new = opt.step_params(&loss, std::slice::from_ref(&q)).unwrap();
    let (qv, nv) = (q.to_vec_f64().unwrap(), new[0].to_vec_f64().unwrap());
    for i in 0..6 {
        let lr = [0.1, 0.2, 0.3][i / 2];
        assert!((nv[i] - qv[i] * (1.0 - lr)).abs() < 1e-15, "{i}");
    }
}

/// A state that fits neither the parameter nor one task of it is `StateShape`, also for a
/// 0-dim parameter in a task-batched optimizer (which has no task axis to drop).
#[test]
fn misfit_states_in_a_batched_optimizer_are_state_shape_errors() {
    let sgd = Sgd {
        momentum: 0.9,
        ..Sgd::new(0.1)
    };
    for shape in [&[][..], &[3, 2]] {
        let p = randn(&mut rng(32), shape).to_leaf();
        let mut opt = DiffOptimizer::new(sgd.clone(), std::slice::from_ref(&p)).unwrap();
        opt.set_tasks(Some(3));
        let mut state = candle_higher::State::new();
        state.set("momentum_buffer", zeros(&[4]));
        opt.set_states(vec![state]).unwrap();
        let loss = p.sqr().unwrap().sum_all().unwrap();
        match opt.step_params(&loss, std::slice::from_ref(&p)) {
            Err(Error::StateShape {
                entry, state_shape, ..
            }) => {
                assert_eq!(
                    (entry.as_str(), state_shape.as_slice()),
                    ("momentum_buffer", &[4][..])
                );
            }
            other => panic!("parameter {shape:?}: {other:?}"),
        }
    }
}

// ------------------------------------------------------------------ batched equals looped

/// One task's support and query sets.
struct Task {
    xs: Tensor,
    ys: Tensor,
    xq: Tensor,
    yq: Tensor,
}

fn tasks_for(x: &[usize], y: &[usize], count: usize, seed: u64) -> Vec<Task> {
    let mut r = rng(seed);
    (0..count)
        .map(|_| Task {
            xs: randn(&mut r, x),
            ys: randn(&mut r, y),
            xq: randn(&mut r, x),
            yq: randn(&mut r, y),
        })
        .collect()
}

/// Runs `steps` MSE inner steps for each task in a loop and for all in one batched unroll
/// (MAML: base parameters at time 0), each task with its own values of the `per_task`
/// hyperparameters, and asserts that fast weights, buffers, the base meta-gradient and
/// the hypergradients agree.
fn assert_batched_equals_looped<M, O>(
    name: &str,
    model: &M,
    opt: &Optimizer<O>,
    tasks: &[Task],
    steps: usize,
    per_task_values: &[(&str, Vec<f64>)],
) where
    M: Module + Parameters + Clone,
    O: DifferentiableOptimizer,
{
    let n = tasks.len();
    let base = model.parameters().unwrap();
    let options = InnerloopOptions::new().initial_weights(InitialWeights::BaseParameters);
    // Looped.
    let (mut fast, mut bufs, mut hyper) = (Vec::new(), Vec::new(), Vec::new());
    let mut meta: Option<Vec<Tensor>> = None;
    for (t, task) in tasks.iter().enumerate() {
        let leaves: Vec<Tensor> = per_task_values
            .iter()
            .map(|(_, v)| from_f64(vec![v[t]], &[]).to_leaf())
            .collect();
        let overrides = per_task_values
            .iter()
            .zip(&leaves)
            .fold(Overrides::new(), |o, ((k, _), l)| o.set(k, l.clone()));
        let (mut fmodel, mut diffopt) =
            innerloop(model, opt, options.clone().overrides(overrides)).unwrap();
        for _ in 0..steps {
            let loss = mse(&fmodel.forward(&task.xs).unwrap(), &task.ys).unwrap();
            diffopt.step(&mut fmodel, &loss).unwrap();
        }
        let q = mse(&fmodel.forward(&task.xq).unwrap(), &task.yq).unwrap();
        fast.push(fmodel.fast_params().to_vec());
        bufs.push(
            fmodel
                .buffers()
                .unwrap()
                .into_iter()
                .map(|b| b.1)
                .collect::<Vec<_>>(),
        );
        hyper.push(grads(&q, &leaves));
        let g = grads(&q, &base);
        meta = Some(match meta {
            None => g,
            Some(s) => s.iter().zip(&g).map(|(a, b)| a.add(b).unwrap()).collect(),
        });
    }
    // Batched.
    let leaves: Vec<Tensor> = per_task_values
        .iter()
        .map(|(_, v)| per_task(v).to_leaf())
        .collect();
    let overrides = per_task_values
        .iter()
        .zip(&leaves)
        .fold(Overrides::new(), |o, ((k, _), l)| o.set(k, l.clone()));
    let (mut fmodel, mut diffopt) =
        innerloop(model, opt, options.overrides(overrides).tasks(n)).unwrap();
    let pick =
        |f: fn(&Task) -> &Tensor| stack(&tasks.iter().map(|t| f(t).clone()).collect::<Vec<_>>());
    let (xs, ys, xq, yq) = (
        pick(|t| &t.xs),
        pick(|t| &t.ys),
        pick(|t| &t.xq),
        pick(|t| &t.yq),
    );
    for _ in 0..steps {
        let losses = mse_per_task(&fmodel.forward(&xs).unwrap(), &ys).unwrap();
        diffopt
            .step(&mut fmodel, &losses.sum_all().unwrap())
            .unwrap();
    }
    let q = mse_per_task(&fmodel.forward(&xq).unwrap(), &yq)
        .unwrap()
        .sum_all()
        .unwrap();
    let names: Vec<String> = model
        .named_parameters()
        .unwrap()
        .into_iter()
        .map(|p| p.0)
        .collect();
    for (i, p) in fmodel.fast_params().iter().enumerate() {
        let want = stack(&fast.iter().map(|f| f[i].clone()).collect::<Vec<_>>());
        assert_same(&format!("{name}: fast weight {}", names[i]), p, &want);
    }
    for (i, (b_name, b)) in fmodel.buffers().unwrap().into_iter().enumerate() {
        let want = stack(&bufs.iter().map(|f| f[i].clone()).collect::<Vec<_>>());
        assert_same(&format!("{name}: buffer {b_name}"), &b, &want);
    }
    let meta = meta.unwrap();
    for (i, g) in grads(&q, &base).iter().enumerate() {
        assert_same(&format!("{name}: meta-gradient {}", names[i]), g, &meta[i]);
    }
    for (k, (g, (h, values))) in grads(&q, &leaves).iter().zip(per_task_values).enumerate() {
        let want = stack(&hyper.iter().map(|v| v[k].clone()).collect::<Vec<_>>());
        // A task whose value is exactly 0 takes torch's branch without the term in its own
        // loop, which reports no derivative (see `Overrides`); the batched step, one branch
        // for all tasks, reports the derivative there: only the other tasks are compared.
        let keep: Vec<f64> = values
            .iter()
            .map(|v| f64::from(u8::from(*v != 0.0)))
            .collect();
        let keep = from_f64(keep, &[n]);
        let (g, want) = (g.mul(&keep).unwrap(), want.mul(&keep).unwrap());
        assert_same(&format!("{name}: hypergradient {h}"), &g, &want);
        assert!(
            want.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar_f64()
                .unwrap()
                > 1e-9,
            "{name}: the hypergradient of {h} vanished"
        );
    }
    let moved = fmodel.fast_params()[0]
        .sub(base[0].unsqueeze(0).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar_f64()
        .unwrap();
    assert!(
        moved > 1e-6,
        "{name}: the inner loop did not move the weights"
    );
}

/// RMSprop with per-task momentum: tasks whose momenta differ (or are 0 for some) all take
/// the momentum branch, each with its own value, as its own loop would.
#[test]
fn rmsprop_with_per_task_momentum_matches_the_loop() {
    let model = mlp(40);
    let tasks = tasks_for(&[5, 2], &[5, 1], 3, 41);
    let plain = Optimizer::new(RmsProp::new(0.01), 4).unwrap();
    for momenta in [vec![0.5, 0.9, 0.7], vec![0.0, 0.9, 0.3]] {
        let values = [
            ("momentum", momenta.clone()),
            ("lr", vec![0.01, 0.02, 0.015]),
        ];
        assert_batched_equals_looped(
            &format!("rmsprop {momenta:?}"),
            &model,
            &plain,
            &tasks,
            3,
            &values,
        );
    }
    let centered = RmsProp {
        centered: true,
        momentum: 0.5,
        weight_decay: 0.01,
        ..RmsProp::new(0.01)
    };
    let opt = Optimizer::new(centered, 4).unwrap();
    let values = [
        ("alpha", vec![0.9, 0.99, 0.95]),
        ("momentum", vec![0.5, 0.2, 0.0]),
    ];
    assert_batched_equals_looped("rmsprop centered", &model, &opt, &tasks, 3, &values);
}

/// SGD with dampening and per-task momenta of which one is 0: that task steps with its
/// undamped gradient (torch keeps no buffer at momentum 0), as its own loop does, while the
/// others damp theirs. The batched step used to damp every task's from the second step.
#[test]
fn sgd_with_dampening_and_a_zero_per_task_momentum_matches_the_loop() {
    let model = mlp(48);
    let tasks = tasks_for(&[5, 2], &[5, 1], 3, 49);
    let sgd = Sgd {
        momentum: 0.9,
        dampening: 0.5,
        ..Sgd::new(0.1)
    };
    let opt = Optimizer::new(sgd, 4).unwrap();
    let values = [
        ("momentum", vec![0.0, 0.9, 0.5]),
        ("dampening", vec![0.5, 0.3, 0.0]),
    ];
    assert_batched_equals_looped("sgd dampening", &model, &opt, &tasks, 3, &values);
}

/// Every built-in optimizer the other suites do not batch, with per-task values of its
/// own hyperparameters.
#[test]
fn every_optimizer_with_per_task_hyperparameters_matches_the_loop() {
    let model = mlp(42);
    let tasks = tasks_for(&[5, 2], &[5, 1], 3, 43);
    let lr = || ("lr", vec![0.01, 0.03, 0.02]);
    let adagrad = Adagrad {
        lr_decay: 0.1,
        weight_decay: 0.01,
        ..Adagrad::new(0.05)
    };
    assert_batched_equals_looped(
        "adagrad",
        &model,
        &Optimizer::new(adagrad, 4).unwrap(),
        &tasks,
        3,
        &[
            lr(),
            ("lr_decay", vec![0.0, 0.1, 0.2]),
            ("initial_accumulator_value", vec![0.0, 0.1, 0.5]),
        ],
    );
    assert_batched_equals_looped(
        "adadelta",
        &model,
        &Optimizer::new(Adadelta::new(1.0), 4).unwrap(),
        &tasks,
        3,
        &[("lr", vec![1.0, 0.5, 2.0]), ("rho", vec![0.9, 0.8, 0.95])],
    );
    assert_batched_equals_looped(
        "adamax",
        &model,
        &Optimizer::new(Adamax::new(0.02), 4).unwrap(),
        &tasks,
        3,
        &[lr(), ("betas.0", vec![0.9, 0.8, 0.5])],
    );
    let adamw = AdamW {
        amsgrad: true,
        ..AdamW::new(0.02)
    };
    assert_batched_equals_looped(
        "adamw amsgrad",
        &model,
        &Optimizer::new(adamw, 4).unwrap(),
        &tasks,
        3,
        &[
            lr(),
            ("weight_decay", vec![0.0, 0.01, 0.1]),
            ("betas.1", vec![0.999, 0.9, 0.99]),
        ],
    );
    assert_batched_equals_looped(
        "asgd",
        &model,
        &Optimizer::new(
            Asgd {
                t0: 1.0,
                ..Asgd::new(0.05)
            },
            4,
        )
        .unwrap(),
        &tasks,
        3,
        &[lr(), ("lambd", vec![1e-4, 1e-2, 1e-3])],
    );
    assert_batched_equals_looped(
        "rprop",
        &model,
        &Optimizer::new(Rprop::new(0.01), 4).unwrap(),
        &tasks,
        3,
        &[lr()],
    );
    let nesterov = Sgd {
        momentum: 0.9,
        nesterov: true,
        ..Sgd::new(0.05)
    };
    assert_batched_equals_looped(
        "sgd nesterov",
        &model,
        &Optimizer::new(nesterov, 4).unwrap(),
        &tasks,
        3,
        &[
            lr(),
            ("momentum", vec![0.9, 0.5, 0.7]),
            ("weight_decay", vec![0.0, 0.1, 0.01]),
        ],
    );
    let amsgrad = Adam {
        amsgrad: true,
        ..Adam::new(0.02)
    };
    assert_batched_equals_looped(
        "adam amsgrad",
        &model,
        &Optimizer::new(amsgrad, 4).unwrap(),
        &tasks,
        3,
        &[
            ("eps", vec![1e-8, 1e-3, 1e-1]),
            ("betas.1", vec![0.999, 0.9, 0.5]),
        ],
    );
}

/// An inner optimizer that has already stepped (its states un-batched) starts every task
/// from the same state, as the loop over tasks does.
#[test]
fn an_optimizer_that_has_stepped_starts_every_task_from_its_state() {
    let mut model = mlp(44);
    let tasks = tasks_for(&[5, 2], &[5, 1], 3, 45);
    fn warm<O: DifferentiableOptimizer>(opt: &mut Optimizer<O>, model: &mut Sequential) {
        let x = randn(&mut rng(46), &[4, 2]);
        let loss = model
            .forward(&x)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        opt.step_module(model, &candle_higher::backward(&loss).unwrap())
            .unwrap();
    }
    let mut sgd = Optimizer::new(
        Sgd {
            momentum: 0.9,
            dampening: 0.1,
            ..Sgd::new(0.05)
        },
        4,
    )
    .unwrap();
    warm(&mut sgd, &mut model);
    assert_batched_equals_looped(
        "stepped sgd",
        &model,
        &sgd,
        &tasks,
        2,
        &[("lr", vec![0.05, 0.1, 0.02])],
    );
    let mut adam = adam(4);
    let mut model = mlp(47);
    warm(&mut adam, &mut model);
    warm(&mut adam, &mut model);
    assert_batched_equals_looped(
        "stepped adam",
        &model,
        &adam,
        &tasks,
        2,
        &[("betas.0", vec![0.9, 0.5, 0.7])],
    );
}

/// Layers the other suites do not batch: grouped, dilated, strided Conv2d with a 2-D batch
/// norm in training mode and average pooling; a batch norm on `[T, N, C]` and on
/// `[T, N, C, L]`, a LayerNorm over two dims; an RNN cell.
#[test]
fn more_layers_batched_equal_looped() {
    let vb = vb(50);
    let grouped = ConvConfig {
        padding: 1,
        stride: 2,
        dilation: 2,
        groups: 2,
    };
    let bn = BatchNormConfig {
        momentum: 0.3,
        ..BatchNormConfig::default()
    };
    let cnn = seq()
        .add(conv2d(2, 4, 3, grouped, vb.pp("0")).unwrap())
        .add(batch_norm2d(4, bn, vb.pp("1")).unwrap())
        .add(Activation::Tanh)
        .add(avg_pool2d(2))
        .add(flatten())
        .add(linear(4, 2, vb.pp("5")).unwrap());
    let tasks = tasks_for(&[3, 2, 7, 7], &[3, 2], 3, 51);
    let sgd = Optimizer::new(
        Sgd {
            momentum: 0.5,
            ..Sgd::new(0.1)
        },
        cnn.parameters().unwrap().len(),
    )
    .unwrap();
    assert_batched_equals_looped(
        "grouped cnn",
        &cnn,
        &sgd,
        &tasks,
        2,
        &[("lr", vec![0.1, 0.05, 0.2])],
    );
    let norms = seq()
        .add(linear(3, 4, vb.pp("a")).unwrap())
        .add(batch_norm1d(5, bn, vb.pp("b")).unwrap())
        .add(layer_norm(&[5, 4], vb.pp("c")).unwrap())
        .add(Activation::Gelu)
        .add(linear(4, 1, vb.pp("d")).unwrap());
    let tasks = tasks_for(&[2, 5, 3], &[2, 5, 1], 3, 52);
    let n = norms.parameters().unwrap().len();
    assert_batched_equals_looped(
        "norms",
        &norms,
        &adam(n),
        &tasks,
        2,
        &[("lr", vec![0.05, 0.01, 0.02])],
    );
    let bn1d = seq()
        .add(batch_norm1d(3, bn, vb.pp("e")).unwrap())
        .add(linear(2, 1, vb.pp("f")).unwrap());
    let tasks = tasks_for(&[4, 3, 2], &[4, 3, 1], 2, 53);
    let n = bn1d.parameters().unwrap().len();
    assert_batched_equals_looped(
        "bn [N, C]",
        &bn1d,
        &adam(n),
        &tasks,
        2,
        &[("lr", vec![0.05, 0.01])],
    );
    let cell = seq()
        .add(rnn_cell(3, 4, vb.pp("g")).unwrap())
        .add(linear(4, 1, vb.pp("h")).unwrap());
    let tasks = tasks_for(&[5, 3], &[5, 1], 3, 54);
    let n = cell.parameters().unwrap().len();
    assert_batched_equals_looped(
        "rnn cell",
        &cell,
        &adam(n),
        &tasks,
        2,
        &[("lr", vec![0.05, 0.01, 0.02])],
    );
}
