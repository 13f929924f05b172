//! The distributed helpers on ranks simulated by threads of one process (a communicator over
//! shared memory), so that they are tested without MPI; `tests/mpi.rs` runs them under
//! `mpirun -np 2`.

use std::sync::{Arc, Barrier, Mutex};

use candle_core::{DType, Device};

use super::*;
use crate::nn::{self, VarBuilder};
use crate::optim::{Adam, Scalar, Sgd, State};
use crate::{backward, innerloop, InitialWeights, InnerloopOptions};

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
        self.barrier.wait();
        let out = self.slots.lock().unwrap()[0].clone();
        self.barrier.wait();
        Ok(out)
    }
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        self.slots.lock().unwrap()[self.rank] = bytes.to_vec();
        self.barrier.wait();
        let out = self.slots.lock().unwrap().concat();
        self.barrier.wait();
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
                msg.contains("rank 1 disagrees with rank 0"),
                "rank {rank}: {msg}"
            );
        }
    }
    assert!(
        errors[1]
            .0
            .contains("parameter 0 is [8, 1] f64 on rank 0, [9, 1] f64 here"),
        "{}",
        errors[1].0
    );

    // A different count: rank 2 lacks the last layer.
    let errors = on_ranks(3, |comm| {
        let params = mlp(0).parameters().unwrap();
        let n = if comm.rank() == 2 { 2 } else { params.len() };
        broadcast_tensors(comm, &params[..n])
            .unwrap_err()
            .to_string()
    });
    assert!(
        errors.iter().all(|m| m.contains("rank 2 disagrees")),
        "{errors:?}"
    );
    assert!(
        errors[2].contains("4 tensors on rank 0, 2 here"),
        "{}",
        errors[2]
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
        errors.iter().all(|m| m.contains("rank 1 disagrees")),
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
