//! Bad input to `parallel::meta_batch`, `GradStore`'s combination and the distributed helpers
//! over a communicator that lies: panics, stores that do not add up, NaN, nesting, cut-short
//! replies. Each is a typed error (the same for every thread count), never a panic or a
//! hang, and changes nothing the caller had.

use std::cell::Cell;
use std::sync::mpsc;
use std::time::Duration;

use candle_higher::distributed::{self, Communicator};
use candle_higher::nn::{self, Module, Parameters};
use candle_higher::optim::{Adam, Optimizer};
use candle_higher::parallel::{meta_batch, Combine};
use candle_higher::{backward, detect_anomaly, DType, Error, GradStore, Result, Tensor};

fn leaf(values: &[f64]) -> Tensor {
    Tensor::from_slice(values, &[values.len()], &crate::common::device())
        .unwrap()
        .to_leaf()
}

fn zeros(shape: &[usize], dtype: DType) -> Tensor {
    Tensor::zeros(shape, dtype, &crate::common::device()).unwrap()
}

/// The bits of each parameter's gradient (`None`: no gradient).
fn bits(store: &GradStore, params: &[Tensor]) -> Vec<Option<Vec<u64>>> {
    params
        .iter()
        .map(|p| {
            store.get(p).map(|g| {
                g.to_vec_f64()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            })
        })
        .collect()
}

/// Runs `f` on a thread of its own and gives up after two minutes: a deadlock fails the
/// test instead of hanging the suite.
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(out) => out,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: no result in 120 s (deadlock)"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: the thread panicked"),
    }
}

/// A cheap task with rounding in it: d/dw sum(tanh(c w)) = c (1 - tanh(c w)^2), c = 0.3 (i + 1).
fn tanh_task(w: &Tensor, i: usize) -> Result<GradStore> {
    backward(&w.mul(0.3 * (i + 1) as f64)?.tanh()?.sum_all()?)
}

#[test]
fn a_panicking_task_is_the_same_error_for_every_thread_count() {
    // Before, one thread (or one task) let the panic through to the caller, while several
    // threads turned it into an error.
    let w = leaf(&[0.1, -0.2]);
    for (tasks, threads) in [(3, 1), (3, 2), (3, 3), (3, 8), (1, 1), (1, 4)] {
        let panicking = tasks - 1;
        let err = meta_batch(tasks, threads, Combine::Sum, |i| {
            assert!(i != panicking, "task {i} panics");
            tanh_task(&w, i)
        })
        .unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidArgument {
                    op: "meta_batch",
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("task {panicking} of block"))
                && msg.contains(&format!("task {panicking} panics")),
            "{tasks} tasks, {threads} threads: {msg}"
        );
    }
    // The pool survives: the next meta-batch runs.
    assert_eq!(
        meta_batch(3, 3, Combine::Sum, |i| tanh_task(&w, i))
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn an_earlier_error_wins_over_a_later_panic_in_the_same_block() {
    // Task 0 fails, task 1 panics. Before, on 2 threads the panic replaced the whole block
    // (tasks 0 and 1) and hid task 0's error; on 4 threads task 0's error came first.
    let w = leaf(&[0.5]);
    for threads in [1, 2, 3, 4] {
        let err = meta_batch(4, threads, Combine::Mean, |i| match i {
            0 => Err(Error::InvalidArgument {
                op: "task",
                message: "task 0 failed".into(),
            }),
            1 => panic!("task 1 panics"),
            _ => tanh_task(&w, i),
        })
        .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument { op: "task", message }
                if message == "task 0 failed"),
            "{threads} threads: {err}"
        );
    }
}

#[test]
fn stores_whose_shapes_differ_for_one_leaf_are_an_error_not_a_broadcast() {
    // Before, the second gradient was broadcast against the first: [1] + [3] gave a [3]
    // "gradient" for a [1] leaf, [2, 1] + [1, 2] a [2, 2] one.
    let w = leaf(&[1.0]);
    let cases: [(&[usize], &[usize]); 5] = [
        (&[1], &[3]),
        (&[3], &[1]),
        (&[2, 1], &[1, 2]),
        (&[], &[3]),
        (&[3], &[1, 3]),
    ];
    for (first, second) in cases {
        let mut messages = Vec::new();
        for threads in [1, 2, 3] {
            let err = meta_batch(3, threads, Combine::Sum, |i| {
                let mut g = GradStore::default();
                g.insert(&w, zeros(if i == 2 { second } else { first }, DType::F64));
                Ok(g)
            })
            .unwrap_err();
            assert!(
                matches!(&err, Error::ShapeMismatch { op: "meta_batch", got, .. } if got == second),
                "{first:?} then {second:?}, {threads} threads: {err:?}"
            );
            messages.push(err.to_string());
        }
        assert!(messages.iter().all(|m| *m == messages[0]), "{messages:?}");
    }
}

#[test]
fn stores_whose_dtypes_differ_for_one_leaf_are_an_error() {
    let w = leaf(&[1.0, 2.0]);
    for threads in [1, 2] {
        let err = meta_batch(2, threads, Combine::Mean, |i| {
            let mut g = GradStore::default();
            let dtype = if i == 0 { DType::F64 } else { DType::F32 };
            g.insert(&w, zeros(&[2], dtype));
            Ok(g)
        })
        .unwrap_err();
        assert!(
            matches!(
                err,
                Error::DTypeMismatch {
                    op: "meta_batch",
                    lhs: DType::F64,
                    rhs: DType::F32
                }
            ),
            "{threads} threads: {err:?}"
        );
    }
}

#[test]
fn a_failed_accumulate_or_scale_changes_nothing_and_names_the_same_leaf_every_run() {
    for _run in 0..8 {
        // 64 leaves that add up, then two that do not ([2] against [3] and [4]), and one new.
        let leaves: Vec<Tensor> = (0..66).map(|_| leaf(&[0.0, 0.0])).collect();
        let new = leaf(&[0.0]);
        let mut total = GradStore::default();
        let mut other = GradStore::default();
        for (k, l) in leaves.iter().enumerate() {
            total.insert(
                l,
                Tensor::from_slice(&[1.0f64, 1.5], &[2], &crate::common::device()).unwrap(),
            );
            let shape: &[usize] = match k {
                64 => &[3],
                65 => &[4],
                _ => &[2],
            };
            other.insert(
                l,
                Tensor::ones(shape, DType::F64, &crate::common::device()).unwrap(),
            );
        }
        other.insert(&new, zeros(&[1], DType::F64));
        let before = bits(&total, &leaves);
        let err = total.accumulate(&other).unwrap_err();
        // Before, the leaves the map visited first were already summed, and which bad leaf
        // was named depended on the map's random order.
        assert!(
            matches!(&err, Error::ShapeMismatch { op: "GradStore::accumulate", got, .. }
                if got == &[3]),
            "{err:?}"
        );
        assert!(err.to_string().contains("[2]"), "{err}");
        assert_eq!(
            bits(&total, &leaves),
            before,
            "a failed accumulate changed the store"
        );
        assert!(total.get(&new).is_none() && total.len() == 66);
    }
    // A scale that anomaly detection stops (a NaN among 32 gradients) changes no gradient.
    let leaves: Vec<Tensor> = (0..32).map(|_| leaf(&[0.0])).collect();
    let mut store = GradStore::default();
    for (k, l) in leaves.iter().enumerate() {
        let v = if k == 17 { f64::NAN } else { k as f64 };
        store.insert(
            l,
            Tensor::from_slice(&[v], &[1], &crate::common::device()).unwrap(),
        );
    }
    let before = bits(&store, &leaves);
    let err = {
        let _anomaly = detect_anomaly();
        store.scale(0.5).unwrap_err()
    };
    assert!(matches!(err, Error::NonFinite { .. }), "{err:?}");
    assert_eq!(
        bits(&store, &leaves),
        before,
        "a failed scale changed the store"
    );
}

#[test]
fn the_mean_over_tasks_lacking_parameters_is_bit_identical_for_every_thread_count() {
    // Task i has a gradient for parameter j only when (i + j) % 3 != 0; parameter 4 never.
    let params: Vec<Tensor> = (0..5).map(|j| leaf(&[j as f64, 1.0])).collect();
    let task = |i: usize| -> Result<GradStore> {
        let mut g = GradStore::default();
        for (j, p) in params.iter().enumerate().take(4) {
            if !(i + j).is_multiple_of(3) {
                let v = [(0.7 * (i * 5 + j) as f64).sin(), 1.0 / (i + j + 1) as f64];
                g.insert(p, Tensor::from_slice(&v, &[2], &crate::common::device())?);
            }
        }
        Ok(g)
    };
    let tasks = 7;
    let mut by_hand = GradStore::default();
    for i in 0..tasks {
        by_hand.accumulate(&task(i).unwrap()).unwrap();
    }
    let sum = bits(&by_hand, &params);
    by_hand.scale(1.0 / tasks as f64).unwrap();
    let mean = bits(&by_hand, &params);
    assert!(mean[4].is_none() && mean[..4].iter().all(Option::is_some));
    for threads in 1..=8 {
        for _run in 0..2 {
            let got = meta_batch(tasks, threads, Combine::Mean, task).unwrap();
            assert_eq!(bits(&got, &params), mean, "{threads} threads");
            let got = meta_batch(tasks, threads, Combine::Sum, task).unwrap();
            assert_eq!(bits(&got, &params), sum, "{threads} threads");
        }
    }
}

#[test]
fn nan_gradients_propagate_alike_and_anomaly_detection_stops_them_alike() {
    let w = leaf(&[0.25, -0.5, 2.0]);
    let scale = |i: usize| if i == 2 { f64::NAN } else { i as f64 + 0.5 };
    // d/dw sum(w * c_i) = c_i: a NaN gradient from task 2.
    let task = |i: usize| backward(&w.mul(scale(i))?.sum_all()?);
    let want = bits(
        &meta_batch(5, 1, Combine::Mean, task).unwrap(),
        std::slice::from_ref(&w),
    );
    let first = want[0].as_ref().unwrap();
    assert!(first.iter().all(|b| f64::from_bits(*b).is_nan()));
    for threads in [2, 3, 5] {
        let got = meta_batch(5, threads, Combine::Mean, task).unwrap();
        assert_eq!(
            bits(&got, std::slice::from_ref(&w)),
            want,
            "{threads} threads"
        );
    }
    // Under anomaly detection task 2 fails on whichever thread runs it, with one message.
    let _anomaly = detect_anomaly();
    let mut messages = Vec::new();
    for threads in [1, 2, 3, 5] {
        let err = meta_batch(5, threads, Combine::Mean, task).unwrap_err();
        assert!(
            matches!(err, Error::NonFinite { .. }),
            "{threads} threads: {err:?}"
        );
        messages.push(err.to_string());
    }
    assert!(messages.iter().all(|m| *m == messages[0]), "{messages:?}");
}

#[test]
fn zero_tasks_give_an_empty_store_and_zero_threads_an_error() {
    let w = leaf(&[1.0]);
    for threads in [1, 2, 64] {
        for combine in [Combine::Sum, Combine::Mean] {
            let got = meta_batch(0, threads, combine, |i| tanh_task(&w, i)).unwrap();
            assert!(got.is_empty());
        }
    }
    for tasks in [0, 1, 5] {
        let err = meta_batch(tasks, 0, Combine::Mean, |i| tanh_task(&w, i)).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument { op: "meta_batch", message }
                if message.contains("0 threads")),
            "{err:?}"
        );
    }
    // Far more threads than tasks: the same bits as one thread.
    let one = meta_batch(2, 1, Combine::Mean, |i| tanh_task(&w, i)).unwrap();
    let many = meta_batch(2, 1000, Combine::Mean, |i| tanh_task(&w, i)).unwrap();
    let w = std::slice::from_ref(&w);
    assert_eq!(bits(&many, w), bits(&one, w));
}

#[test]
fn nested_meta_batches_neither_deadlock_nor_depend_on_the_thread_counts() {
    let got = within("nested meta_batch", || {
        let w = leaf(&[0.3, -0.7, 1.1]);
        let nested = |outer: usize, inner: usize| {
            let store = meta_batch(3, outer, Combine::Sum, |o| {
                meta_batch(4, inner, Combine::Mean, |j| tanh_task(&w, 4 * o + j))
            })
            .unwrap();
            bits(&store, std::slice::from_ref(&w))
        };
        let want = nested(1, 1);
        let mut all = Vec::new();
        for outer in [1, 2, 3] {
            for inner in [1, 2, 4] {
                all.push(((outer, inner), nested(outer, inner)));
            }
        }
        (want, all)
    });
    let (want, all) = got;
    for ((outer, inner), bits) in all {
        assert_eq!(bits, want, "{outer} outer, {inner} inner threads");
    }
}

/// How a lying communicator spoils one reply.
#[derive(Clone, Copy, Debug)]
enum Spoil {
    /// Only this rank's bytes (an all-gather) or half of them (a broadcast).
    Short,
    /// Three bytes more: not a whole number of values.
    Odd,
    /// Nothing at all.
    Empty,
    /// One rank's worth too many.
    Long,
}

/// Rank `rank` of `size`, where every other rank sends the same bytes as this one, except
/// that collective number `spoil_at` (counting every call) returns a spoiled reply.
struct Liar {
    rank: usize,
    size: usize,
    calls: Cell<usize>,
    spoil_at: usize,
    spoil: Spoil,
}

impl Liar {
    fn new(rank: usize, size: usize, spoil_at: usize, spoil: Spoil) -> Self {
        Liar {
            rank,
            size,
            calls: Cell::new(0),
            spoil_at,
            spoil,
        }
    }

    fn reply(&self, honest: Vec<u8>, one: &[u8]) -> Vec<u8> {
        let call = self.calls.get();
        self.calls.set(call + 1);
        if call != self.spoil_at {
            return honest;
        }
        match self.spoil {
            Spoil::Short if honest.len() > one.len() => one.to_vec(),
            Spoil::Short => honest[..honest.len() / 2].to_vec(),
            Spoil::Odd => [honest.as_slice(), &[1, 2, 3]].concat(),
            Spoil::Empty => Vec::new(),
            Spoil::Long => [honest.as_slice(), one].concat(),
        }
    }
}

impl Communicator for Liar {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn broadcast_bytes(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        Ok(self.reply(bytes.to_vec(), bytes))
    }
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        Ok(self.reply(bytes.repeat(self.size), bytes))
    }
}

fn small_model(seed: u64) -> nn::Sequential {
    let vb = nn::VarBuilder::new(seed, DType::F64, &crate::common::device());
    nn::seq().add(nn::linear(2, 3, vb.pp("0")).unwrap()).add(
        nn::batch_norm1d(
            3,
            nn::BatchNormConfig {
                affine: false,
                ..Default::default()
            },
            vb.pp("1"),
        )
        .unwrap(),
    )
}

fn model_values(model: &nn::Sequential) -> Vec<Vec<u64>> {
    let buffers = model.named_buffers().unwrap().into_iter().map(|(_, b)| b);
    model
        .parameters()
        .unwrap()
        .into_iter()
        .chain(buffers)
        .map(|t| {
            t.to_vec_f64()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        })
        .collect()
}

/// Every entry point, on both sides of a 2-rank job, with each of its collectives spoiled in
/// every way: a typed error or (with the spoil past its last collective) success, never a
/// panic, and a failure changes neither the model nor the optimizer.
#[test]
fn spoiled_replies_are_errors_and_change_nothing() {
    // Before, a reply of the wrong length indexed out of bounds (a panic) in the layout
    // check, the optimizer-size check, the gradient mask and the sum.
    let trained = {
        let mut model = small_model(7);
        let mut opt = Optimizer::new(Adam::new(0.01), model.parameters().unwrap().len()).unwrap();
        let x = Tensor::ones(&[4, 2], DType::F64, &crate::common::device()).unwrap();
        let g = backward(&model.forward(&x).unwrap().sum_all().unwrap()).unwrap();
        opt.step_module(&mut model, &g).unwrap();
        opt
    };
    let spoils = [Spoil::Short, Spoil::Odd, Spoil::Empty, Spoil::Long];
    for rank in [0, 1] {
        for spoil in spoils {
            for spoil_at in 0..8 {
                let liar = || Liar::new(rank, 2, spoil_at, spoil);
                let case = format!("rank {rank}, {spoil:?} reply to collective {spoil_at}");
                let expected = |e: &Error| {
                    matches!(e, Error::Communication { .. } | Error::RankMismatch { .. })
                };

                let mut model = small_model(3);
                let before = model_values(&model);
                if let Err(e) = distributed::broadcast_model(&liar(), &mut model) {
                    assert!(expected(&e), "broadcast_model, {case}: {e:?}");
                    assert_eq!(model_values(&model), before, "broadcast_model, {case}");
                }

                let params = model.parameters().unwrap();
                let x = Tensor::ones(&[4, 2], DType::F64, &crate::common::device()).unwrap();
                let grads = backward(&model.forward(&x).unwrap().sum_all().unwrap()).unwrap();
                let grads_before = bits(&grads, &params);
                if let Err(e) = distributed::all_reduce_grads(&liar(), &params, &grads) {
                    assert!(
                        matches!(e, Error::Communication { .. }),
                        "all_reduce_grads, {case}: {e:?}"
                    );
                }
                assert_eq!(bits(&grads, &params), grads_before);
                // A store missing a gradient takes the mask's extra collective.
                let mut partial = grads.clone();
                partial.remove(&params[0]);
                if let Err(e) = distributed::all_reduce_grads(&liar(), &params, &partial) {
                    assert!(
                        matches!(e, Error::Communication { .. }),
                        "all_reduce_grads (partial), {case}: {e:?}"
                    );
                }
                if let Err(e) =
                    distributed::meta_batch(&liar(), &params, 3, 2, Combine::Mean, |_| {
                        Ok(grads.clone())
                    })
                {
                    assert!(
                        matches!(e, Error::Communication { .. }),
                        "meta_batch, {case}: {e:?}"
                    );
                }

                let mut opt = trained.clone();
                let state_before = format!("{:?}", opt.states());
                if let Err(e) = distributed::broadcast_optimizer_state(
                    &liar(),
                    &mut opt,
                    &crate::common::device(),
                ) {
                    assert!(expected(&e), "broadcast_optimizer_state, {case}: {e:?}");
                    assert_eq!(format!("{:?}", opt.states()), state_before, "{case}");
                }
            }
        }
    }
    // No ranks at all, or a rank past the size: an error, not an index out of bounds.
    for (rank, size) in [(0, 0), (3, 2)] {
        let comm = Liar::new(rank, size, usize::MAX, Spoil::Empty);
        let mut model = small_model(3);
        let before = model_values(&model);
        let err = distributed::broadcast_model(&comm, &mut model).unwrap_err();
        assert!(matches!(err, Error::Communication { .. }), "{err:?}");
        assert_eq!(model_values(&model), before);
        let params = model.parameters().unwrap();
        let err = distributed::all_reduce_grads(&comm, &params, &GradStore::default()).unwrap_err();
        assert!(matches!(err, Error::Communication { .. }), "{err:?}");
        let mut opt = trained.clone();
        let err = distributed::broadcast_optimizer_state(&comm, &mut opt, &crate::common::device())
            .unwrap_err();
        assert!(matches!(err, Error::Communication { .. }), "{err:?}");
    }
}
