//! The distributed helpers on ranks simulated by threads of one process (a communicator over
//! shared memory), so that they are tested without MPI; `tests/mpi.rs` runs them under
//! `mpirun -np 2`.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use candle_core::{DType, Device};

use super::*;
use crate::nn::{self, VarBuilder};
use crate::optim::{Adam, Scalar, Sgd, State};
use crate::{backward, innerloop, InitialWeights, InnerloopOptions};

/// A barrier that gives up: a rank left waiting in a collective that another rank skipped
/// gets an error after this long, so a deadlock fails its test instead of hanging it.
const GIVE_UP: Duration = Duration::from_secs(60);

struct Barrier {
    size: usize,
    /// Threads waiting, and the generation (barriers passed so far).
    state: Mutex<(usize, u64)>,
    passed: Condvar,
}

impl Barrier {
    fn new(size: usize) -> Self {
        Barrier {
            size,
            state: Mutex::new((0, 0)),
            passed: Condvar::new(),
        }
    }

    fn wait(&self) -> Result<()> {
        let mut state = self.state.lock().unwrap();
        let generation = state.1;
        state.0 += 1;
        if state.0 == self.size {
            *state = (0, generation + 1);
            self.passed.notify_all();
            return Ok(());
        }
        let (_state, wait) = self
            .passed
            .wait_timeout_while(state, GIVE_UP, |s| s.1 == generation)
            .unwrap();
        if wait.timed_out() {
            return Err(Error::Communication {
                op: "ThreadRank",
                message: "deadlock: the other ranks never reached this collective".into(),
            });
        }
        Ok(())
    }
}

/// Ranks as threads: every collective writes into a shared slot per rank between barriers.
struct ThreadRank {
    rank: usize,
    size: usize,
    slots: Arc<Mutex<Vec<Vec<u8>>>>,
    barrier: Arc<Barrier>,
}

impl Communicator for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn broadcast_bytes(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        if self.rank == 0 {
            self.slots.lock().unwrap()[0] = bytes.to_vec();
        }
        self.barrier.wait()?;
        let out = self.slots.lock().unwrap()[0].clone();
        self.barrier.wait()?;
        Ok(out)
    }
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        self.slots.lock().unwrap()[self.rank] = bytes.to_vec();
        self.barrier.wait()?;
        let out = self.slots.lock().unwrap().concat();
        self.barrier.wait()?;
        Ok(out)
    }
}

/// Runs `f` on `size` simulated ranks and returns their results in rank order.
fn on_ranks<T: Send>(size: usize, f: impl Fn(&ThreadRank) -> T + Sync) -> Vec<T> {
    let slots = Arc::new(Mutex::new(vec![Vec::new(); size]));
    let barrier = Arc::new(Barrier::new(size));
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..size)
            .map(|rank| {
                let comm = ThreadRank {
                    rank,
                    size,
                    slots: slots.clone(),
                    barrier: barrier.clone(),
                };
                let f = &f;
                s.spawn(move || f(&comm))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn mlp(seed: u64) -> nn::Sequential {
    let vb = VarBuilder::new(seed, DType::F64, &Device::Cpu);
    nn::seq()
        .add(nn::linear(1, 8, vb.pp("0")).unwrap())
        .add(nn::Activation::Tanh)
        .add(nn::linear(8, 1, vb.pp("2")).unwrap())
}

/// Task `i` of a sinusoid-like meta-batch: two SGD steps on its support set, then the query
/// loss, differentiated through the steps to the base parameters.
fn maml_task(model: &nn::Sequential, i: usize) -> Result<GradStore> {
    let x: Vec<f64> = (0..5)
        .map(|k| k as f64 / 4.0 - 0.5 + 0.1 * i as f64)
        .collect();
    let y: Vec<f64> = x
        .iter()
        .map(|v| (1.0 + i as f64 * 0.3) * (2.0 * v).sin())
        .collect();
    let xs = Tensor::from_slice(&x, &[5, 1], &Device::Cpu)?;
    let ys = Tensor::from_slice(&y, &[5, 1], &Device::Cpu)?;
    let inner = Optimizer::new(Sgd::new(0.1), model.parameters()?.len())?;
    let options = InnerloopOptions::new().initial_weights(InitialWeights::BaseParameters);
    let (mut fmodel, mut diffopt) = innerloop(model, &inner, options)?;
    for _ in 0..2 {
        let loss = nn::mse(&fmodel.forward(&xs)?, &ys)?;
        diffopt.step(&mut fmodel, &loss)?;
    }
    backward(&nn::mse(&fmodel.forward(&xs.affine(1.0, 0.05)?)?, &ys)?)
}

fn values(ts: &[Tensor]) -> Vec<Vec<f64>> {
    ts.iter().map(|t| t.to_vec_f64().unwrap()).collect()
}

fn assert_close(got: &[f64], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= rel * scale, "{g} vs {w}");
    }
}

#[test]
fn task_shares_tile_the_meta_batch_in_rank_order() {
    for tasks in 0..20 {
        for size in 1..7 {
            let shares: Vec<Range<usize>> = (0..size).map(|r| task_share(tasks, r, size)).collect();
            let mut next = 0;
            for s in &shares {
                assert_eq!(s.start, next, "tasks {tasks} size {size}: {shares:?}");
                next = s.end;
            }
            assert_eq!(next, tasks);
            let (lo, hi) = (
                shares.iter().map(|s| s.len()).min().unwrap(),
                shares.iter().map(|s| s.len()).max().unwrap(),
            );
            assert!(hi - lo <= 1, "uneven shares {shares:?}");
        }
    }
}

#[test]
fn meta_batch_on_ranks_equals_one_process_over_the_whole_batch() {
    let model = mlp(3);
    let params = model.parameters().unwrap();
    // 7 tasks: shares of 3/2/2 on 3 ranks, 4/3 on 2, and one rank with none on 8.
    let whole = parallel::meta_batch(7, 1, Combine::Mean, |i| maml_task(&model, i)).unwrap();
    let want: Vec<Vec<f64>> = params
        .iter()
        .map(|p| whole.get(p).unwrap().to_vec_f64().unwrap())
        .collect();
    for size in [1, 2, 3, 8] {
        let got = on_ranks(size, |comm| {
            let grads =
                meta_batch(comm, &params, 7, 1, Combine::Mean, |i| maml_task(&model, i)).unwrap();
            let flat: Vec<Vec<f64>> = params
                .iter()
                .map(|p| grads.get(p).unwrap().to_vec_f64().unwrap())
                .collect();
            flat
        });
        for rank_values in &got {
            // Bit-identical on every rank; equal to the one-process sum to rounding.
            assert_eq!(rank_values, &got[0], "ranks disagree (size {size})");
            for (g, w) in rank_values.iter().zip(&want) {
                assert_close(g, w, 1e-12);
            }
        }
    }
}

#[test]
fn all_reduce_sums_each_dtype_and_keeps_the_gradients_that_exist_somewhere() {
    let got = on_ranks(3, |comm| {
        let r = comm.rank() as f64;
        let a = Tensor::from_slice(&[1.0f64, 2.0], &[2], &Device::Cpu)
            .unwrap()
            .to_leaf();
        let b = Tensor::from_slice(&[1.0f32, 2.0, 3.0], &[3, 1], &Device::Cpu)
            .unwrap()
            .to_leaf();
        let only_rank_2 = Tensor::from_slice(&[0.0f64], &[1], &Device::Cpu)
            .unwrap()
            .to_leaf();
        let never = Tensor::from_slice(&[0.0f32], &[1], &Device::Cpu)
            .unwrap()
            .to_leaf();
        let params = vec![a.clone(), b.clone(), only_rank_2.clone(), never.clone()];
        let mut grads = GradStore::default();
        grads.insert(
            &a,
            Tensor::from_slice(&[r, 10.0 * r], &[2], &Device::Cpu).unwrap(),
        );
        grads.insert(
            &b,
            Tensor::from_slice(
                &[1.0f32 + r as f32, 0.5, -(r as f32)],
                &[3, 1],
                &Device::Cpu,
            )
            .unwrap(),
        );
        if comm.rank() == 2 {
            grads.insert(
                &only_rank_2,
                Tensor::from_slice(&[7.0f64], &[1], &Device::Cpu).unwrap(),
            );
        }
        let out = all_reduce_grads(comm, &params, &grads).unwrap();
        assert!(out.get(&never).is_none());
        assert_eq!(out.get(&b).unwrap().dtype(), DType::F32);
        assert_eq!(out.get(&b).unwrap().dims(), &[3, 1]);
        (
            out.get(&a).unwrap().to_vec_f64().unwrap(),
            out.get(&b).unwrap().to_vec_f64().unwrap(),
            out.get(&only_rank_2).unwrap().to_vec_f64().unwrap(),
        )
    });
    for g in &got {
        // Sums over ranks 0, 1, 2 of each rank's gradient.
        assert_eq!(g.0, vec![3.0, 30.0]);
        assert_eq!(g.1, vec![6.0, 1.5, -3.0]);
        assert_eq!(g.2, vec![7.0]);
    }
}

#[test]
fn a_rank_with_another_layout_is_an_error_on_every_rank() {
    // Rank 1's model has 9 hidden units: the shapes differ, the count does not.
    let errors = on_ranks(3, |comm| {
        let mut model = if comm.rank() == 1 {
            let vb = VarBuilder::new(0, DType::F64, &Device::Cpu);
            nn::seq()
                .add(nn::linear(1, 9, vb.pp("0")).unwrap())
                .add(nn::Activation::Tanh)
                .add(nn::linear(9, 1, vb.pp("2")).unwrap())
        } else {
            mlp(comm.rank() as u64)
        };
        let before = values(&model.parameters().unwrap());
        let err = broadcast_model(comm, &mut model).unwrap_err();
        assert_eq!(
            values(&model.parameters().unwrap()),
            before,
            "a failed broadcast changed the model"
        );
        let params = model.parameters().unwrap();
        let grads_err = all_reduce_grads(comm, &params, &GradStore::default()).unwrap_err();
        (err.to_string(), grads_err.to_string())
    });
    for (rank, (broadcast, reduce)) in errors.iter().enumerate() {
        for msg in [broadcast, reduce] {
            assert!(
                msg.contains("rank 1 failed or differs from rank 0"),
                "rank {rank}: {msg}"
            );
        }
        // Every rank says what differs: the model's broadcast by name, the list by position.
        assert!(
            broadcast
                .contains("parameter \"0.weight\" is [8, 1] f64 on rank 0, [9, 1] f64 on rank 1"),
            "rank {rank}: {broadcast}"
        );
        assert!(
            reduce.contains("parameter 0 is [8, 1] f64 on rank 0, [9, 1] f64 on rank 1"),
            "rank {rank}: {reduce}"
        );
    }

    // A different count: rank 2 lacks the last layer.
    let errors = on_ranks(3, |comm| {
        let params = mlp(0).parameters().unwrap();
        let n = if comm.rank() == 2 { 2 } else { params.len() };
        broadcast_tensors(comm, &params[..n])
            .unwrap_err()
            .to_string()
    });
    assert!(
        errors.iter().all(|m| m.contains("rank 2 failed or differs")
            && m.contains("4 tensors on rank 0, 2 on rank 2")),
        "{errors:?}"
    );
}

#[test]
fn a_gradient_of_the_wrong_shape_on_one_rank_is_an_error_on_every_rank() {
    let errors = on_ranks(2, |comm| {
        let p = Tensor::zeros(&[2, 2], DType::F64, &Device::Cpu)
            .unwrap()
            .to_leaf();
        let mut grads = GradStore::default();
        let shape: &[usize] = if comm.rank() == 1 { &[4] } else { &[2, 2] };
        grads.insert(&p, Tensor::zeros(shape, DType::F64, &Device::Cpu).unwrap());
        all_reduce_grads(comm, &[p], &grads)
            .unwrap_err()
            .to_string()
    });
    assert!(
        errors
            .iter()
            .all(|m| m.contains("rank 1 failed or differs")),
        "{errors:?}"
    );
    assert!(
        errors[1]
            .contains("the gradient of parameter 0 is [4] f64 but the parameter is [2, 2] f64"),
        "{}",
        errors[1]
    );
}

/// Sets every buffer (running statistics) of `model` to `value + 1`.
fn with_statistics(model: &mut nn::Sequential, value: f64) {
    let buffers: Vec<Tensor> = model
        .named_buffers()
        .unwrap()
        .into_iter()
        .map(|(_, b)| Tensor::full(value + 1.0, b.dims(), b.dtype(), &Device::Cpu).unwrap())
        .collect();
    assert!(!buffers.is_empty());
    model.set_buffers(&buffers).unwrap();
}

#[test]
fn broadcast_model_gives_every_rank_rank_0s_parameters_and_buffers() {
    let build = |seed: u64| {
        let vb = VarBuilder::new(seed, DType::F64, &Device::Cpu);
        nn::seq()
            .add(nn::linear(2, 3, vb.pp("0")).unwrap())
            .add(nn::batch_norm1d(3, Default::default(), vb.pp("1")).unwrap())
    };
    let got = on_ranks(3, |comm| {
        let mut model = build(comm.rank() as u64);
        with_statistics(&mut model, comm.rank() as f64);
        broadcast_model(comm, &mut model).unwrap();
        let params = model.parameters().unwrap();
        assert!(params.iter().all(|p| p.requires_grad() && p.is_leaf()));
        let buffers: Vec<Tensor> = model
            .named_buffers()
            .unwrap()
            .into_iter()
            .map(|(_, b)| b)
            .collect();
        (values(&params), values(&buffers))
    });
    let mut reference = build(0);
    with_statistics(&mut reference, 0.0);
    let want = values(&reference.parameters().unwrap());
    let want_buffers: Vec<Tensor> = reference
        .named_buffers()
        .unwrap()
        .into_iter()
        .map(|(_, b)| b)
        .collect();
    assert_ne!(
        values(&build(1).parameters().unwrap()),
        want,
        "seeds must give different models"
    );
    for (params, buffers) in &got {
        assert_eq!(params, &want);
        assert_eq!(buffers, &values(&want_buffers));
    }
}

#[test]
fn broadcast_optimizer_state_makes_every_later_step_identical() {
    let got = on_ranks(2, |comm| {
        let mut model = mlp(comm.rank() as u64);
        let mut opt = Optimizer::new(Adam::new(0.01), model.parameters().unwrap().len()).unwrap();
        if comm.rank() == 0 {
            // Rank 0 has trained a little: moments and a step count of 3.
            for i in 0..3 {
                let g = maml_task(&model, i).unwrap();
                opt.step_module(&mut model, &g).unwrap();
            }
        }
        broadcast_model(comm, &mut model).unwrap();
        broadcast_optimizer_state(comm, &mut opt, &Device::Cpu).unwrap();
        let steps: Vec<Option<i64>> = opt.states().iter().map(|s| s.int("step")).collect();
        for i in 0..2 {
            let g = all_reduce_grads(
                comm,
                &model.parameters().unwrap(),
                &maml_task(&model, i).unwrap(),
            )
            .unwrap();
            opt.step_module(&mut model, &g).unwrap();
        }
        (steps, values(&model.parameters().unwrap()))
    });
    assert!(got[1].0.iter().all(|s| *s == Some(3)), "{:?}", got[1].0);
    assert_eq!(got[0].1, got[1].1);
}

#[test]
fn a_different_optimizer_size_is_an_error_on_every_rank() {
    let errors = on_ranks(2, |comm| {
        let n = 4 + comm.rank();
        let mut opt = Optimizer::new(Sgd::new(0.1), n).unwrap();
        broadcast_optimizer_state(comm, &mut opt, &Device::Cpu)
            .unwrap_err()
            .to_string()
    });
    for e in &errors {
        assert!(
            e.contains("the optimizer holds 4 parameters on rank 0, 5 on rank 1"),
            "{e}"
        );
    }
}

#[test]
fn optimizer_states_survive_the_wire_and_malformed_bytes_are_errors() {
    let mut state = State::new();
    state.set(
        "exp_avg",
        Tensor::from_slice(&[1.5f32, -2.0], &[2, 1], &Device::Cpu).unwrap(),
    );
    state.set_int("step", 42);
    state.set_scalar("eta", 0.25);
    state.set_scalar("mu", Scalar::Tensor(Tensor::scalar(0.125f64)));
    let states = vec![state, State::new()];
    let bytes = wire::encode_states(&states).unwrap();
    let back = wire::decode_states(&bytes, &Device::Cpu).unwrap();
    assert_eq!(back.len(), 2);
    assert!(back[1].is_empty());
    let t = back[0].tensor("exp_avg").unwrap();
    assert_eq!((t.dtype(), t.dims()), (DType::F32, &[2usize, 1][..]));
    assert_eq!(t.to_vec_f64().unwrap(), vec![1.5, -2.0]);
    assert_eq!(back[0].int("step"), Some(42));
    assert_eq!(back[0].scalar("eta").unwrap().value(), 0.25);
    assert_eq!(back[0].scalar("mu").unwrap().value(), 0.125);
    for cut in [1, 8, 20, bytes.len() - 1] {
        let err = wire::decode_states(&bytes[..cut], &Device::Cpu).unwrap_err();
        assert!(matches!(err, Error::Communication { .. }), "{err}");
    }
    let mut extra = bytes.clone();
    extra.push(0);
    assert!(wire::decode_states(&extra, &Device::Cpu).is_err());
}

/// A tensor whose dims multiply past `usize` is malformed, not an overflow.
#[test]
fn dims_whose_product_overflows_are_malformed() {
    let mut state = State::new();
    state.set(
        "t",
        Tensor::from_slice(&[1.0f64], &[1], &Device::Cpu).unwrap(),
    );
    let valid = wire::encode_states(&[state]).unwrap();
    // The tensor's rank (1) and dim rewritten as rank 8 with dims of 2^20 each; every length
    // is within the (padded) message, so only their product is out of range.
    let rank_at = valid.len() - 8 * 4;
    let dim = 1u64 << 20;
    let mut bytes = valid[..rank_at].to_vec();
    bytes.extend_from_slice(&8u64.to_le_bytes());
    for _ in 0..8 {
        bytes.extend_from_slice(&dim.to_le_bytes());
    }
    bytes.resize(dim as usize, 0);
    let err = wire::decode_states(&bytes, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::Communication { .. }), "{err}");
    assert!(err.to_string().contains("dims"), "{err}");
}

#[test]
fn entries_that_share_a_tensor_still_share_it_after_the_wire() {
    let mut state = State::new();
    let first = state
        .get_or_insert_with("a", || {
            Tensor::from_slice(&[1.0f64, 2.0], &[2], &Device::Cpu)
        })
        .unwrap();
    state.set("b", first);
    state.set(
        "c",
        Tensor::from_slice(&[5.0f64], &[1], &Device::Cpu).unwrap(),
    );
    let bytes = wire::encode_states(&[state]).unwrap();
    let back = wire::decode_states(&bytes, &Device::Cpu).unwrap();
    let (a, b, c) = (
        back[0].get("a").unwrap(),
        back[0].get("b").unwrap(),
        back[0].get("c").unwrap(),
    );
    assert!(a.same_entry(&b) && !a.same_entry(&c));
    // An in-place update through one key reaches the other, as on rank 0.
    a.mul_(3.0).unwrap();
    assert_eq!(
        back[0].tensor("b").unwrap().to_vec_f64().unwrap(),
        vec![3.0, 6.0]
    );
    assert_eq!(
        back[0].tensor("c").unwrap().to_vec_f64().unwrap(),
        vec![5.0]
    );
    // An alias must name an earlier tensor entry: a later one, itself or a counter is
    // malformed.
    let mut counter = State::new();
    counter.set_int("step", 1);
    counter.set(
        "t",
        Tensor::from_slice(&[1.0f64], &[1], &Device::Cpu).unwrap(),
    );
    let valid = wire::encode_states(&[counter]).unwrap();
    for target in [0u64, 1, 7, u64::MAX] {
        // The second entry ("t") rewritten as an alias of `target`: its kind byte follows
        // the key and precedes dtype, rank, one dim, byte count and 8 bytes of data.
        let kind_at = valid.len() - (1 + 8 * 5);
        assert_eq!((valid[kind_at - 1], valid[kind_at]), (b't', 0));
        let mut bytes = valid[..kind_at].to_vec();
        bytes.push(4);
        bytes.extend_from_slice(&target.to_le_bytes());
        let err = wire::decode_states(&bytes, &Device::Cpu).unwrap_err();
        assert!(matches!(err, Error::Communication { .. }), "{err}");
        assert!(
            err.to_string().contains("not an earlier tensor entry"),
            "{err}"
        );
    }
}

#[test]
fn single_process_is_the_identity() {
    let model = mlp(1);
    let params = model.parameters().unwrap();
    let g = maml_task(&model, 0).unwrap();
    let out = all_reduce_grads(&SingleProcess, &params, &g).unwrap();
    for p in &params {
        assert_eq!(
            out.get(p).unwrap().to_vec_f64().unwrap(),
            g.get(p).unwrap().to_vec_f64().unwrap()
        );
    }
}

/// Each gradient's bits, by parameter (`None`: no gradient).
fn grad_bits(store: &GradStore, params: &[Tensor]) -> Vec<Option<Vec<u64>>> {
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

/// Whether `e` is a `RankMismatch` of `op` naming `rank`, and its message.
fn mismatch_of(e: &Error, op: &str, rank: usize) -> (bool, String) {
    let named = matches!(e, Error::RankMismatch { op: o, rank: r, .. } if *o == op && *r == rank);
    (named, e.to_string())
}

#[test]
fn a_task_that_fails_or_panics_on_one_rank_is_an_error_on_every_rank() {
    let model = mlp(3);
    let params = model.parameters().unwrap();
    // 7 tasks on 3 ranks: shares 0..3, 3..5, 5..7, so task 4 runs on rank 1. Before, rank 1
    // returned its error and the others waited in the all-reduce for ever.
    for threads in [1, 2] {
        for panics in [false, true] {
            let errors = on_ranks(3, |comm| {
                let err = meta_batch(comm, &params, 7, threads, Combine::Mean, |i| {
                    if i == 4 {
                        assert!(!panics, "task 4 panics");
                        return Err(Error::InvalidArgument {
                            op: "task",
                            message: "task 4 failed".into(),
                        });
                    }
                    maml_task(&model, i)
                })
                .unwrap_err();
                // Rank 1 keeps its error (a panic: `parallel::meta_batch`'s, naming the
                // task); the others are told which rank failed, and why.
                let own = match &err {
                    Error::InvalidArgument { op, .. } => {
                        *op == if panics { "meta_batch" } else { "task" }
                    }
                    _ => false,
                };
                let (named, msg) = mismatch_of(&err, "meta_batch", 1);
                (own, named, msg)
            });
            let want = if panics {
                "task 4 of block"
            } else {
                "task 4 failed"
            };
            for (rank, (own, named, msg)) in errors.iter().enumerate() {
                let case = format!("{threads} threads, rank {rank}: {msg}");
                assert_eq!((*own, *named), (rank == 1, rank != 1), "{case}");
                assert!(msg.contains(want), "{case}");
                assert!(!panics || msg.contains("task 4 panics"), "{case}");
            }
        }
    }
    // 0 threads on one rank is that rank's own error, and a mismatch naming it elsewhere.
    let errors = on_ranks(2, |comm| {
        let threads = if comm.rank() == 1 { 0 } else { 1 };
        let err = meta_batch(comm, &params, 4, threads, Combine::Sum, |i| {
            maml_task(&model, i)
        })
        .unwrap_err();
        let own = matches!(
            err,
            Error::InvalidArgument {
                op: "meta_batch",
                ..
            }
        );
        let (named, msg) = mismatch_of(&err, "meta_batch", 1);
        (own, named, msg)
    });
    assert!(errors[1].0 && errors[0].1, "{errors:?}");
    assert!(
        errors.iter().all(|e| e.2.contains("0 threads")),
        "{errors:?}"
    );
}

#[test]
fn each_rank_whose_tasks_fail_keeps_its_own_error_and_the_others_name_it() {
    let model = mlp(3);
    let params = model.parameters().unwrap();
    // 7 tasks on 3 ranks: task 4 runs on rank 1, task 6 on rank 2. Before, every rank
    // returned `RankMismatch`: a caller could not tell a NaN loss (skip the batch) from a
    // shape bug, as it can on one process.
    let errors = on_ranks(3, |comm| {
        meta_batch(comm, &params, 7, 2, Combine::Mean, |i| match i {
            4 => Err(Error::NonFinite {
                what: "task 4's query loss".into(),
            }),
            6 => Err(Error::ShapeMismatch {
                op: "task",
                expected: "[5, 1]".into(),
                got: vec![5, 2],
            }),
            _ => maml_task(&model, i),
        })
        .unwrap_err()
    });
    assert!(
        matches!(&errors[1], Error::NonFinite { what } if what == "task 4's query loss"),
        "{:?}",
        errors[1]
    );
    assert!(
        matches!(&errors[2], Error::ShapeMismatch { got, .. } if got == &[5, 2]),
        "{:?}",
        errors[2]
    );
    let (named, msg) = mismatch_of(&errors[0], "meta_batch", 1);
    assert!(named, "{msg}");
    assert!(
        msg.contains("task 4's query loss")
            && msg.contains("rank 2: its share of the tasks failed"),
        "{msg}"
    );
}

#[test]
fn ranks_given_another_task_count_or_combine_are_an_error_on_every_rank() {
    let model = mlp(3);
    let params = model.parameters().unwrap();
    // Before, each rank took its share of its own count and divided by its own: the ranks'
    // stores silently differed.
    for (tasks, combine, want) in [
        (8, Combine::Mean, "of 8 (Combine::Mean) on rank 1"),
        (7, Combine::Sum, "of 7 (Combine::Sum) on rank 1"),
    ] {
        let errors = on_ranks(2, |comm| {
            let (t, c) = if comm.rank() == 1 {
                (tasks, combine)
            } else {
                (7, Combine::Mean)
            };
            let err = meta_batch(comm, &params, t, 1, c, |i| maml_task(&model, i)).unwrap_err();
            mismatch_of(&err, "meta_batch", 1)
        });
        for (named, msg) in &errors {
            assert!(named, "{msg}");
            assert!(
                msg.contains("a meta-batch of 7 tasks (Combine::Mean) on rank 0")
                    && msg.contains(want),
                "{msg}"
            );
        }
    }
}

#[test]
fn one_rank_gives_the_bits_of_one_process_even_for_missing_parameters() {
    let model = mlp(3);
    let params = model.parameters().unwrap();
    // Task i gives gradients only for the parameters j with (i + j) % 3 != 0: every parameter
    // lacks some tasks' gradients.
    let task = |i: usize| -> Result<GradStore> {
        let mut g = maml_task(&model, i)?;
        for (j, p) in params.iter().enumerate() {
            if (i + j).is_multiple_of(3) {
                g.remove(p);
            }
        }
        Ok(g)
    };
    for combine in [Combine::Sum, Combine::Mean] {
        let want = grad_bits(&parallel::meta_batch(5, 1, combine, task).unwrap(), &params);
        for threads in [1, 2, 5] {
            let single = meta_batch(&SingleProcess, &params, 5, threads, combine, task).unwrap();
            assert_eq!(grad_bits(&single, &params), want, "{threads} threads");
            let ranks = on_ranks(1, |comm| {
                grad_bits(
                    &meta_batch(comm, &params, 5, threads, combine, task).unwrap(),
                    &params,
                )
            });
            assert_eq!(ranks[0], want, "{threads} threads, one simulated rank");
        }
        // On 2 ranks: the same bits on both, whatever the thread count.
        let two = |threads: usize| {
            on_ranks(2, |comm| {
                grad_bits(
                    &meta_batch(comm, &params, 5, threads, combine, task).unwrap(),
                    &params,
                )
            })
        };
        let one_thread = two(1);
        assert_eq!(one_thread[0], one_thread[1]);
        assert_eq!(two(3), one_thread);
    }
}

#[test]
fn a_nan_gradient_reaches_every_rank_alike_and_no_store_changes() {
    let got = on_ranks(3, |comm| {
        let p = Tensor::zeros(&[3], DType::F64, &Device::Cpu)
            .unwrap()
            .to_leaf();
        let r = comm.rank() as f64;
        let values = match comm.rank() {
            1 => [f64::NAN, 1.0, f64::INFINITY],
            2 => [1.0, -0.0, f64::NEG_INFINITY],
            _ => [r, 2.0, 3.0],
        };
        let mut grads = GradStore::default();
        grads.insert(&p, Tensor::from_slice(&values, &[3], &Device::Cpu).unwrap());
        let before = grad_bits(&grads, std::slice::from_ref(&p));
        let out = all_reduce_grads(comm, std::slice::from_ref(&p), &grads).unwrap();
        assert_eq!(grad_bits(&grads, std::slice::from_ref(&p)), before);
        out.get(&p).unwrap().to_vec_f64().unwrap()
    });
    for g in &got {
        assert_eq!(
            g.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            got[0].iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        // NaN + ..., 0 + 1 + -0, 3 + inf - inf.
        assert!(g[0].is_nan() && g[2].is_nan(), "{g:?}");
        assert_eq!(g[1], 3.0);
    }
}

#[test]
fn a_gradient_of_another_dtype_on_one_rank_is_an_error_on_every_rank() {
    let errors = on_ranks(3, |comm| {
        let p = Tensor::zeros(&[2], DType::F64, &Device::Cpu)
            .unwrap()
            .to_leaf();
        let mut grads = GradStore::default();
        let dtype = if comm.rank() == 2 {
            DType::F32
        } else {
            DType::F64
        };
        grads.insert(&p, Tensor::zeros(&[2], dtype, &Device::Cpu).unwrap());
        let err = all_reduce_grads(comm, &[p], &grads).unwrap_err();
        mismatch_of(&err, "all_reduce_grads", 2)
    });
    assert!(errors.iter().all(|(named, _)| *named), "{errors:?}");
    assert!(
        errors[2]
            .1
            .contains("is [2] f32 but the parameter is [2] f64"),
        "{}",
        errors[2].1
    );
}

#[test]
fn another_buffer_layout_is_an_error_on_every_rank_and_changes_no_model() {
    // The same parameters; rank 1's model has no running statistics.
    let errors = on_ranks(3, |comm| {
        let vb = VarBuilder::new(comm.rank() as u64, DType::F64, &Device::Cpu);
        let mut model = nn::seq().add(nn::linear(2, 3, vb.pp("0")).unwrap());
        if comm.rank() != 1 {
            let config = nn::BatchNormConfig {
                affine: false,
                ..Default::default()
            };
            model = model.add(nn::batch_norm1d(3, config, vb.pp("1")).unwrap());
            with_statistics(&mut model, comm.rank() as f64);
        }
        let buffers = |m: &nn::Sequential| -> Vec<Tensor> {
            m.named_buffers()
                .unwrap()
                .into_iter()
                .map(|(_, b)| b)
                .collect()
        };
        let before = (
            values(&model.parameters().unwrap()),
            values(&buffers(&model)),
        );
        let err = broadcast_model(comm, &mut model).unwrap_err();
        let after = (
            values(&model.parameters().unwrap()),
            values(&buffers(&model)),
        );
        assert_eq!(after, before, "rank {}: the model changed", comm.rank());
        mismatch_of(&err, "broadcast_model", 1)
    });
    assert!(
        errors
            .iter()
            .all(|(named, msg)| *named && msg.contains("2 buffers on rank 0, 0 on rank 1")),
        "{errors:?}"
    );
}

/// An optimizer after one step of its own, so that it has a state to compare.
fn stepped<O: crate::optim::DifferentiableOptimizer>(
    opt: O,
    model: &nn::Sequential,
) -> Optimizer<O> {
    let mut model = model.clone();
    let mut opt = Optimizer::new(opt, model.parameters().unwrap().len()).unwrap();
    let g = maml_task(&model, 0).unwrap();
    opt.step_module(&mut model, &g).unwrap();
    opt
}

/// Every state's entries as keys and bits, to compare before and after.
fn state_bits(states: &[State]) -> Vec<Vec<(String, Vec<u64>)>> {
    states
        .iter()
        .map(|s| {
            s.entries()
                .map(|(k, v)| {
                    let bits = match v {
                        crate::optim::StateValue::Tensor(t) => t
                            .to_vec_f64()
                            .unwrap()
                            .iter()
                            .map(|x| x.to_bits())
                            .collect(),
                        crate::optim::StateValue::Int(n) => vec![n as u64],
                        crate::optim::StateValue::Scalar(s) => vec![s.value().to_bits()],
                    };
                    (k.to_string(), bits)
                })
                .collect()
        })
        .collect()
}

/// `broadcast_optimizer_state` from rank 0's trained Adam (lr 0.01) to rank 1's trained
/// `theirs`: each rank's error, and whether rank 1's state is unchanged.
fn broadcast_into<O: crate::optim::DifferentiableOptimizer + std::fmt::Debug>(
    theirs: O,
) -> Vec<(bool, String, bool)> {
    let model = mlp(2);
    on_ranks(2, |comm| {
        let (err, unchanged) = if comm.rank() == 1 {
            let mut opt = stepped(theirs.clone(), &model);
            let before = state_bits(opt.states());
            let err = broadcast_optimizer_state(comm, &mut opt, &Device::Cpu).unwrap_err();
            (err, state_bits(opt.states()) == before)
        } else {
            let mut opt = stepped(Adam::new(0.01), &model);
            let err = broadcast_optimizer_state(comm, &mut opt, &Device::Cpu).unwrap_err();
            (err, true)
        };
        let (named, msg) = mismatch_of(&err, "broadcast_optimizer_state", 1);
        (named, msg, unchanged)
    })
}

#[test]
fn optimizers_of_another_type_or_hyperparameters_are_an_error_on_every_rank() {
    // Before, only the parameter count was compared: rank 1 took rank 0's Adam moments into
    // its SGD (or into its Adam of another learning rate), and the ranks' steps silently
    // differed.
    let other_type = broadcast_into(Sgd::new(0.1));
    let other_lr = broadcast_into(Adam::new(0.02));
    // A flag that is not a float: before, only the floats were compared, and rank 1 took
    // plain Adam's state into its AMSGrad.
    let other_flag = broadcast_into(Adam {
        amsgrad: true,
        ..Adam::new(0.01)
    });
    for (errors, want) in [
        (&other_type, "rank 1's optimizer is of another type"),
        (
            &other_lr,
            "hyperparameter \"lr\" of parameter group 0 is 0.01 on rank 0, 0.02 on rank 1",
        ),
        (&other_flag, "amsgrad: false"),
        (&other_flag, "amsgrad: true"),
    ] {
        for (named, msg, unchanged) in errors {
            assert!(*named && msg.contains(want), "{msg}");
            assert!(*unchanged, "rank 1's state changed");
        }
    }
}

#[test]
fn a_state_rank_0_cannot_send_is_an_error_on_every_rank() {
    // Rank 0's state holds an f8 tensor, a dtype the wire cannot carry. Before, rank 0 sent
    // it as f64 values (or hung in candle's f8 conversion) and returned Ok, and rank 1 failed
    // on its own on the unknown dtype code.
    let got = on_ranks(2, |comm| {
        let mut opt = Optimizer::new(Adam::new(0.01), 1).unwrap();
        let mut state = State::new();
        if comm.rank() == 0 {
            let f8 = candle_core::Tensor::from_vec(vec![1.0f64, 2.0], 2, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F8E4M3)
                .unwrap();
            state.set("exp_avg", Tensor::new(f8));
        } else {
            state.set_int("step", 5);
        }
        opt.set_states(vec![state]).unwrap();
        let err = broadcast_optimizer_state(comm, &mut opt, &Device::Cpu).unwrap_err();
        let own = matches!(err, Error::UnsupportedDType { .. });
        let (named, msg) = mismatch_of(&err, "broadcast_optimizer_state", 0);
        (own, named, msg, opt.states()[0].int("step"))
    });
    // Rank 0 keeps its own error; rank 1 is told which rank failed, and why.
    let (own, _, msg, _) = &got[0];
    assert!(
        *own && msg.contains("F8E4M3 tensors are not supported"),
        "{msg}"
    );
    let (_, named, msg, step) = &got[1];
    assert!(named, "{msg}");
    assert!(
        msg.contains("it could not send its optimizer state")
            && msg.contains("F8E4M3 tensors are not supported"),
        "{msg}"
    );
    assert_eq!(*step, Some(5), "rank 1's state changed");
}

#[test]
fn task_shares_of_ranks_past_the_size_are_empty_not_an_overflow() {
    assert_eq!(task_share(10, usize::MAX, 3), 10..10);
    assert_eq!(
        task_share(usize::MAX, usize::MAX, 2),
        usize::MAX..usize::MAX
    );
    assert_eq!(task_share(usize::MAX, 1, 2).len(), usize::MAX / 2);
    assert_eq!(task_share(5, 7, 0), 5..5);
    assert_eq!(task_share(5, 0, 0), 0..5);
}

/// A linear layer and an i64 buffer (a step counter, an index table).
#[derive(Clone)]
struct Counted {
    linear: nn::Linear,
    counts: nn::Buffer,
    /// The rank on which listing the model fails (`visit` returns an error), if any.
    fails_on: Option<usize>,
    rank: usize,
}

impl Counted {
    fn new(rank: usize, counts: &[i64]) -> Self {
        let vb = VarBuilder::new(rank as u64, DType::F64, &Device::Cpu);
        Counted {
            linear: nn::linear(2, 3, vb.pp("linear")).unwrap(),
            counts: nn::Buffer::new(
                Tensor::from_slice(counts, &[counts.len()], &Device::Cpu).unwrap(),
            ),
            fails_on: None,
            rank,
        }
    }
}

impl Parameters for Counted {
    fn visit(&mut self, v: &mut nn::Visitor<'_>) -> Result<()> {
        if self.fails_on == Some(self.rank) {
            return Err(Error::InvalidArgument {
                op: "Counted::visit",
                message: "this rank's model is broken".into(),
            });
        }
        v.module("linear", &mut self.linear)?;
        v.buffer("counts", &mut self.counts)
    }
}

fn i64s(t: &Tensor) -> Vec<i64> {
    t.value().to_vec1::<i64>().unwrap()
}

#[test]
fn integer_tensors_cross_the_wire_bit_for_bit() {
    // Before, every dtype but f32 travelled as f64: 2^53 + 1 arrived as 2^53.
    let wide = [(1i64 << 53) + 1, i64::MAX, -1, i64::MIN, (1 << 62) + 3];
    let got = on_ranks(2, |comm| {
        let mine: Vec<i64> = if comm.rank() == 0 {
            wide.to_vec()
        } else {
            vec![0; 5]
        };
        // Plain tensors, one of each integer dtype, at their extremes.
        let cpu = |t: candle_core::Result<candle_core::Tensor>| Tensor::new(t.unwrap());
        let tensors = vec![
            Tensor::from_slice(&mine, &[5], &Device::Cpu).unwrap(),
            cpu(candle_core::Tensor::new(&[u32::MAX, 1][..], &Device::Cpu)),
            cpu(candle_core::Tensor::new(&[u8::MAX, 7][..], &Device::Cpu)),
            cpu(candle_core::Tensor::new(
                &[i16::MIN, i16::MAX][..],
                &Device::Cpu,
            )),
            cpu(candle_core::Tensor::new(
                &[i32::MIN, i32::MAX][..],
                &Device::Cpu,
            )),
        ];
        let tensors: Vec<Tensor> = if comm.rank() == 0 {
            tensors
        } else {
            tensors.iter().map(|t| t.zeros_like().unwrap()).collect()
        };
        let back = broadcast_tensors(comm, &tensors).unwrap();
        let small = (
            back[1].value().to_vec1::<u32>().unwrap(),
            back[2].value().to_vec1::<u8>().unwrap(),
            back[3].value().to_vec1::<i16>().unwrap(),
            back[4].value().to_vec1::<i32>().unwrap(),
        );
        // A model's buffer.
        let mut model = Counted::new(comm.rank(), &mine);
        broadcast_model(comm, &mut model).unwrap();
        let buffer = i64s(&model.named_buffers().unwrap()[0].1);
        // An optimizer state's tensor (and its counter, an `Int` entry).
        let mut opt = Optimizer::new(Sgd::new(0.1), 1).unwrap();
        let mut state = State::new();
        state.set(
            "index",
            Tensor::from_slice(&mine, &[5], &Device::Cpu).unwrap(),
        );
        state.set_int("step", mine[1]);
        opt.set_states(vec![state]).unwrap();
        broadcast_optimizer_state(comm, &mut opt, &Device::Cpu).unwrap();
        let s = &opt.states()[0];
        let index = s.tensor("index").unwrap();
        assert_eq!(index.dtype(), DType::I64);
        (i64s(&back[0]), small, buffer, i64s(&index), s.int("step"))
    });
    let (plain, small, buffer, index, step) = &got[1];
    assert_eq!(plain, &wide);
    assert_eq!(
        small,
        &(
            vec![u32::MAX, 1],
            vec![u8::MAX, 7],
            vec![i16::MIN, i16::MAX],
            vec![i32::MIN, i32::MAX]
        )
    );
    assert_eq!(buffer, &wide);
    assert_eq!(index, &wide);
    assert_eq!(*step, Some(i64::MAX));
}

/// Two linear layers named "0" and `last`: with `last` "2", the parameter names of `mlp`.
#[derive(Clone)]
struct Renamed {
    first: nn::Linear,
    second: nn::Linear,
    last: &'static str,
}

impl Renamed {
    fn new(seed: u64, last: &'static str) -> Self {
        let vb = VarBuilder::new(seed, DType::F64, &Device::Cpu);
        Renamed {
            first: nn::linear(1, 8, vb.pp("0")).unwrap(),
            second: nn::linear(8, 1, vb.pp(last)).unwrap(),
            last,
        }
    }
}

impl Parameters for Renamed {
    fn visit(&mut self, v: &mut nn::Visitor<'_>) -> Result<()> {
        v.module("0", &mut self.first)?;
        v.module(self.last, &mut self.second)
    }
}

#[test]
fn a_parameter_frozen_or_named_otherwise_on_one_rank_is_an_error_on_every_rank() {
    // Before, only counts, shapes and dtypes were compared: rank 1 kept "2.weight" frozen
    // while rank 0 trained it, and the ranks' models silently diverged.
    for (case, want) in [
        (
            "frozen",
            "parameter \"2.weight\" requires grad on rank 0 but is frozen on rank 1",
        ),
        (
            "renamed",
            "parameter 2 is \"2.weight\" on rank 0, \"out.weight\" on rank 1",
        ),
    ] {
        let errors = on_ranks(3, |comm| {
            let mut model = mlp(comm.rank() as u64);
            if comm.rank() == 1 && case == "frozen" {
                model.set_frozen("2.weight", true).unwrap();
            }
            if case == "renamed" {
                // The same shapes, in the same order: "out" on rank 1 where the others
                // have "2".
                let last = if comm.rank() == 1 { "out" } else { "2" };
                let mut renamed = Renamed::new(comm.rank() as u64, last);
                let before = values(&renamed.parameters().unwrap());
                let err = broadcast_model(comm, &mut renamed).unwrap_err();
                assert_eq!(values(&renamed.parameters().unwrap()), before);
                return mismatch_of(&err, "broadcast_model", 1);
            }
            let before = values(&model.parameters().unwrap());
            let frozen: Vec<bool> = model
                .param_infos()
                .unwrap()
                .iter()
                .map(|p| p.frozen)
                .collect();
            let err = broadcast_model(comm, &mut model).unwrap_err();
            assert_eq!(
                values(&model.parameters().unwrap()),
                before,
                "the model changed"
            );
            let after: Vec<bool> = model
                .param_infos()
                .unwrap()
                .iter()
                .map(|p| p.frozen)
                .collect();
            assert_eq!(after, frozen);
            mismatch_of(&err, "broadcast_model", 1)
        });
        for (rank, (named, msg)) in errors.iter().enumerate() {
            assert!(*named && msg.contains(want), "{case}, rank {rank}: {msg}");
        }
    }
}

#[test]
fn a_model_that_cannot_list_its_parameters_on_one_rank_leaves_no_rank_waiting() {
    // Before, rank 1 returned its error at once and ranks 0 and 2 waited in the layout
    // check until the barrier gave up.
    let started = std::time::Instant::now();
    let errors = on_ranks(3, |comm| {
        let mut model = Counted::new(comm.rank(), &[1, 2]);
        model.fails_on = Some(1);
        broadcast_model(comm, &mut model).unwrap_err()
    });
    assert!(started.elapsed() < GIVE_UP / 2, "a rank waited");
    assert!(
        matches!(
            &errors[1],
            Error::InvalidArgument {
                op: "Counted::visit",
                ..
            }
        ),
        "{:?}",
        errors[1]
    );
    for rank in [0, 2] {
        let (named, msg) = mismatch_of(&errors[rank], "broadcast_model", 1);
        assert!(
            named
                && msg.contains("could not be listed")
                && msg.contains("this rank's model is broken"),
            "rank {rank}: {msg}"
        );
    }
}

#[test]
fn a_model_in_evaluation_mode_on_one_rank_is_an_error_on_every_rank() {
    // Before, rank 2 ran its batch norm on the running statistics while the others used
    // the batch's and updated theirs: the ranks' buffers silently diverged.
    let errors = on_ranks(3, |comm| {
        let vb = VarBuilder::new(comm.rank() as u64, DType::F64, &Device::Cpu);
        let mut model = nn::seq()
            .add(nn::linear(2, 3, vb.pp("0")).unwrap())
            .add(nn::batch_norm1d(3, Default::default(), vb.pp("1")).unwrap());
        if comm.rank() == 2 {
            model.eval().unwrap();
        }
        let before = values(&model.parameters().unwrap());
        let err = broadcast_model(comm, &mut model).unwrap_err();
        assert_eq!(values(&model.parameters().unwrap()), before);
        mismatch_of(&err, "broadcast_model", 2)
    });
    for (rank, (named, msg)) in errors.iter().enumerate() {
        assert!(
            *named && msg.contains("layers in training mode: 1 of 1 on rank 0, 0 of 1 on rank 2"),
            "rank {rank}: {msg}"
        );
    }
}

/// Every tensor of a state (entries and scalar entries), by key.
fn state_tensors(state: &State) -> Vec<(String, Tensor)> {
    state
        .entries()
        .filter_map(|(k, v)| match v {
            crate::optim::StateValue::Tensor(t) => Some((k.to_string(), t)),
            crate::optim::StateValue::Scalar(Scalar::Tensor(t)) => Some((k.to_string(), t)),
            _ => None,
        })
        .collect()
}

#[test]
fn rank_0_places_its_optimizer_state_on_the_device_as_the_other_ranks_do() {
    // Before, rank 0 kept its states as they were (on whatever device, a leaf that requires
    // grad, entries that handles taken before the call still reached) while every other rank
    // received constants on `device`. Rank 0 now goes through the same placement: with
    // Device::Cpu here, a CUDA `device` moves its CPU states there.
    for size in [1, 2, 3] {
        let got = on_ranks(size, |comm| {
            let mut opt = Optimizer::new(Adam::new(0.01), 2).unwrap();
            let mut state = State::new();
            if comm.rank() == 0 {
                let leaf = Tensor::from_slice(&[1.5f64, -2.0], &[2], &Device::Cpu)
                    .unwrap()
                    .to_leaf();
                state.set("exp_avg", leaf);
                let shared = state.get("exp_avg").unwrap();
                state.set("alias", shared);
                state.set_scalar("mu", Scalar::Tensor(Tensor::scalar(0.25f64).to_leaf()));
                state.set_int("step", 3);
            } else {
                state.set_int("step", 9);
            }
            opt.set_states(vec![state, State::new()]).unwrap();
            let before = opt.states()[0].get("exp_avg").ok();
            broadcast_optimizer_state(comm, &mut opt, &Device::Cpu).unwrap();
            let s = &opt.states()[0];
            for (key, t) in state_tensors(s) {
                assert!(
                    t.device().same_device(&Device::Cpu),
                    "rank {}: {key}",
                    comm.rank()
                );
                assert!(
                    !t.requires_grad(),
                    "rank {}: {key} requires grad",
                    comm.rank()
                );
            }
            let (a, b) = (s.get("exp_avg").unwrap(), s.get("alias").unwrap());
            assert!(
                a.same_entry(&b),
                "rank {}: the shared entry split",
                comm.rank()
            );
            if let Some(before) = before {
                // Rank 0's entries are its own now: an update through the old handle misses.
                assert!(!before.same_entry(&a), "rank 0 kept its entry");
                before.mul_(10.0).unwrap();
            }
            state_bits(opt.states())
        });
        for bits in &got {
            assert_eq!(bits, &got[0], "size {size}");
        }
        assert_eq!(
            got[0][0],
            vec![
                (
                    "alias".to_string(),
                    vec![1.5f64.to_bits(), (-2.0f64).to_bits()]
                ),
                (
                    "exp_avg".to_string(),
                    vec![1.5f64.to_bits(), (-2.0f64).to_bits()]
                ),
                ("mu".to_string(), vec![0.25f64.to_bits()]),
                ("step".to_string(), vec![3]),
            ]
        );
    }
    // One process: the same contract.
    let mut opt = Optimizer::new(Sgd::new(0.1), 1).unwrap();
    let mut state = State::new();
    state.set(
        "momentum_buffer",
        Tensor::from_slice(&[4.0f64], &[1], &Device::Cpu)
            .unwrap()
            .to_leaf(),
    );
    opt.set_states(vec![state]).unwrap();
    broadcast_optimizer_state(&SingleProcess, &mut opt, &Device::Cpu).unwrap();
    let t = opt.states()[0].tensor("momentum_buffer").unwrap();
    assert!(t.device().same_device(&Device::Cpu) && !t.requires_grad());
    assert_eq!(t.to_vec_f64().unwrap(), vec![4.0]);
}

/// `broadcast_optimizer_state` on `size` ranks of SGD (lr 0.1, 2 parameters, a step count
/// of its rank in its first state) after `setup` on each: each rank's result as its
/// message (`None`: Ok), whether it is a `RankMismatch` naming `bad`, and whether its
/// injected tensors, and its states, are as before.
fn broadcast_injected(
    size: usize,
    bad: usize,
    setup: impl Fn(usize, &mut Optimizer<Sgd>) + Sync,
) -> Vec<(Option<String>, bool, bool, bool)> {
    on_ranks(size, |comm| {
        let mut opt = Optimizer::new(Sgd::new(0.1), 2).unwrap();
        let mut state = State::new();
        state.set_int("step", comm.rank() as i64);
        opt.set_states(vec![state, State::new()]).unwrap();
        setup(comm.rank(), &mut opt);
        let injected = |opt: &Optimizer<Sgd>| {
            opt.injected()
                .entries()
                .map(|(n, v)| (n.to_string(), v.iter().map(describe_scalar).collect()))
                .collect::<Vec<(String, Vec<String>)>>()
        };
        let (states, tensors) = (state_bits(opt.states()), injected(&opt));
        let result = broadcast_optimizer_state(comm, &mut opt, &Device::Cpu);
        let same_tensors = injected(&opt) == tensors;
        let same_states = state_bits(opt.states()) == states;
        match result {
            Ok(()) => (None, false, same_tensors, same_states),
            Err(e) => {
                let (named, msg) = mismatch_of(&e, "broadcast_optimizer_state", bad);
                (Some(msg), named, same_tensors, same_states)
            }
        }
    })
}

fn lr(value: f64, dtype: DType) -> Tensor {
    Tensor::full_scalar(value, dtype, &Device::Cpu).unwrap()
}

#[test]
fn injected_tensors_that_differ_between_ranks_are_an_error_on_every_rank() {
    // Before, the injected tensors were neither compared nor sent: every case below
    // returned Ok on every rank (`inject` writes the tensor's value into the group's float,
    // and each case keeps the floats equal), and the ranks' inner loops stepped with
    // different learning rates, or reached the meta-gradient on some ranks only.
    let only_rank_1 = broadcast_injected(2, 1, |rank, opt| {
        if rank == 1 {
            opt.inject("lr", &lr(0.1, DType::F64)).unwrap();
        }
    });
    let only_rank_0 = broadcast_injected(2, 1, |rank, opt| {
        if rank == 0 {
            opt.inject("lr", &lr(0.1, DType::F64)).unwrap();
        }
    });
    let other_value = broadcast_injected(2, 1, |rank, opt| {
        opt.inject("lr", &lr(0.1 * (1 + rank) as f64, DType::F64))
            .unwrap();
        opt.groups_mut()[0].hyperparameters.lr = 0.1; // the same float on every rank
    });
    let other_dtype = broadcast_injected(2, 1, |rank, opt| {
        let dtype = if rank == 0 { DType::F64 } else { DType::F32 };
        opt.inject("lr", &lr(0.5, dtype)).unwrap();
    });
    let requires_grad_on_rank_0 = broadcast_injected(2, 1, |rank, opt| {
        let t = lr(0.1, DType::F64);
        let t = if rank == 0 { t.to_leaf() } else { t };
        opt.inject("lr", &t).unwrap();
    });
    // Three ranks, the last one odd: the first that differs is named on every rank.
    let rank_2_momentum = broadcast_injected(3, 2, |rank, opt| {
        opt.inject("lr", &lr(0.1, DType::F64)).unwrap();
        if rank == 2 {
            opt.inject("momentum", &lr(0.0, DType::F64)).unwrap();
        }
    });
    let injected = "is injected (Optimizer::inject) as";
    for (case, want) in [
        (
            &only_rank_1,
            format!(
                "hyperparameter \"lr\" {injected} 0.1 (f64, constant) on rank 1 but not on rank 0"
            ),
        ),
        (
            &only_rank_0,
            format!(
                "hyperparameter \"lr\" {injected} 0.1 (f64, constant) on rank 0 but not on rank 1"
            ),
        ),
        (
            &other_value,
            format!(
                "hyperparameter \"lr\" {injected} 0.1 (f64, constant) on rank 0, 0.2 (f64, \
                 constant) on rank 1"
            ),
        ),
        (
            &other_dtype,
            format!(
                "hyperparameter \"lr\" {injected} 0.5 (f64, constant) on rank 0, 0.5 (f32, \
                 constant) on rank 1"
            ),
        ),
        (
            &requires_grad_on_rank_0,
            format!(
                "hyperparameter \"lr\" {injected} 0.1 (f64, requires grad) on rank 0, 0.1 \
                 (f64, constant) on rank 1"
            ),
        ),
        (
            &rank_2_momentum,
            format!(
                "hyperparameter \"momentum\" {injected} 0.0 (f64, constant) on rank 2 but not \
                 on rank 0"
            ),
        ),
    ] {
        for (rank, (msg, named, same_tensors, same_states)) in case.iter().enumerate() {
            let msg = msg.as_deref().unwrap_or("Ok");
            assert!(
                *named && msg.contains(&want),
                "rank {rank}: {msg}\nwant: {want}"
            );
            assert!(
                *same_tensors && *same_states,
                "rank {rank}'s optimizer changed: {msg}"
            );
        }
    }
}

#[test]
fn the_same_injected_tensors_on_every_rank_are_no_mismatch() {
    // The same value, given as [] or [1] (`inject` keeps one element as a scalar), and names
    // injected in another order.
    let got = broadcast_injected(2, 0, |rank, opt| {
        let lr1 = Tensor::from_slice(&[0.05f64], &[1], &Device::Cpu).unwrap();
        let lr0 = lr(0.05, DType::F64);
        let momentum = lr(0.9, DType::F64);
        if rank == 0 {
            opt.inject("lr", &lr0).unwrap();
            opt.inject("momentum", &momentum).unwrap();
        } else {
            opt.inject("momentum", &momentum).unwrap();
            opt.inject("lr", &lr1).unwrap();
        }
    });
    for (rank, (msg, _, same_tensors, _)) in got.iter().enumerate() {
        assert_eq!(msg, &None, "rank {rank}");
        assert!(*same_tensors, "rank {rank}'s injected tensors changed");
    }
}

#[test]
fn groups_that_differ_between_ranks_name_what_differs() {
    let model = mlp(2);
    let n = model.parameters().unwrap().len();
    let errors = on_ranks(2, |comm| {
        let mut opt = if comm.rank() == 0 {
            Optimizer::new(Sgd::new(0.1), n).unwrap()
        } else {
            let groups = vec![
                crate::optim::ParamGroup::new(vec![0, 1], Sgd::new(0.1)),
                crate::optim::ParamGroup::new((2..n).collect(), Sgd::new(0.1)),
            ];
            Optimizer::with_groups(n, groups).unwrap()
        };
        broadcast_optimizer_state(comm, &mut opt, &Device::Cpu)
            .unwrap_err()
            .to_string()
    });
    for e in &errors {
        assert!(
            e.contains("the number of parameter groups is 1 on rank 0, 2 on rank 1"),
            "{e}"
        );
    }
}

/// A rank whose broadcasts arrive cut in half (a state it cannot read).
struct CutBroadcasts<'a>(&'a ThreadRank);

impl Communicator for CutBroadcasts<'_> {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn size(&self) -> usize {
        self.0.size()
    }
    fn broadcast_bytes(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        let mut out = self.0.broadcast_bytes(bytes)?;
        out.truncate(out.len() / 2);
        Ok(out)
    }
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        self.0.all_gather_bytes(bytes)
    }
}

#[test]
fn a_state_one_rank_cannot_read_is_an_error_on_every_rank() {
    let got = on_ranks(3, |comm| {
        let mut opt = Optimizer::new(Sgd::new(0.1), 1).unwrap();
        let mut state = State::new();
        state.set_int("step", comm.rank() as i64 + 5);
        opt.set_states(vec![state]).unwrap();
        let err = if comm.rank() == 1 {
            broadcast_optimizer_state(&CutBroadcasts(comm), &mut opt, &Device::Cpu)
        } else {
            broadcast_optimizer_state(comm, &mut opt, &Device::Cpu)
        }
        .unwrap_err();
        let own = matches!(err, Error::Communication { .. });
        let (named, msg) = mismatch_of(&err, "broadcast_optimizer_state", 1);
        (own, named, msg, opt.states()[0].int("step"))
    });
    for (rank, (own, named, msg, step)) in got.iter().enumerate() {
        if rank == 1 {
            assert!(*own && msg.contains("malformed optimizer state"), "{msg}");
        } else {
            assert!(*named, "rank {rank}: {msg}");
            assert!(
                msg.contains("it could not read rank 0's optimizer state"),
                "{msg}"
            );
        }
        assert_eq!(*step, Some(rank as i64 + 5), "rank {rank}'s state changed");
    }
}
