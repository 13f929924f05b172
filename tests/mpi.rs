//! Meta-batches across processes, under `mpirun -np 2` on one machine: 2 ranks give the
//! meta-gradient that one process computes over the whole meta-batch (1e-12 relative, f64)
//! and the same parameters after 5 outer steps, on both ranks bit for bit; rank 0's model and
//! optimizer state reach every rank (the state as constants on the device asked for), and
//! models or injected learning rates that differ are an error on every rank.
//!
//! `cargo test --features mpi --test mpi` starts this binary under `mpirun -np 2` itself
//! (`MPIRUN` names another launcher); without the feature it prints that it was skipped.
//! Each rank also computes the whole meta-batch alone, as the single-process reference.

#[cfg(not(feature = "mpi"))]
fn main() {
    println!(
        "tests/mpi.rs skipped: built without the `mpi` feature; run \
         `cargo test --features mpi --test mpi` (needs OpenMPI: apt-get install openmpi-bin \
         libopenmpi-dev libclang-dev)"
    );
}

#[cfg(feature = "mpi")]
fn main() {
    let under_launcher = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    if under_launcher {
        ranks::run();
    } else {
        launch();
    }
}

/// Runs this binary again under `mpirun -np 2` and fails if any rank failed.
#[cfg(feature = "mpi")]
fn launch() {
    use std::process::Command;
    let launcher = std::env::var("MPIRUN").unwrap_or_else(|_| "mpirun".into());
    let exe = std::env::current_exe().expect("the test binary's path");
    let version = Command::new(&launcher).arg("--version").output();
    let Ok(version) = version else {
        eprintln!(
            "tests/mpi.rs: cannot run `{launcher}`; install OpenMPI (openmpi-bin) or set MPIRUN"
        );
        std::process::exit(1);
    };
    let mut cmd = Command::new(&launcher);
    if String::from_utf8_lossy(&version.stdout).contains("Open MPI") {
        // 2 ranks on a machine that may report fewer free slots; root in containers.
        cmd.arg("--oversubscribe")
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    }
    cmd.args(["-np", "2"]).arg(&exe);
    // OpenMPI 4.x has a known race at exit (open-mpi/ompi#7833, closed without a fix for
    // 4.x): after every rank has finalized, mpirun may report a rank "with PID 0" as
    // "exiting improperly" and fail. Only that signature is retried; a failing check fails
    // again in the retry, since the test is deterministic.
    for attempt in 1..=3 {
        let started = std::time::Instant::now();
        let out = cmd.output().expect("mpirun starts");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        print!("{stdout}");
        eprint!("{stderr}");
        println!(
            "tests/mpi.rs: mpirun -np 2 finished in {:.1} s: {}",
            started.elapsed().as_secs_f64(),
            out.status
        );
        if out.status.success() {
            return;
        }
        let exit_race = stderr.contains("with PID 0 on") || stdout.contains("with PID 0 on");
        if !exit_race || attempt == 3 {
            std::process::exit(1);
        }
        println!(
            "tests/mpi.rs: OpenMPI's exit race (ompi#7833), not a test failure; running again"
        );
    }
}

#[cfg(feature = "mpi")]
mod ranks {
    use candle_higher::distributed::{self, Communicator, MpiCommunicator};
    use candle_higher::nn::{self, Parameters, Sequential, VarBuilder};
    use candle_higher::optim::{Adam, Optimizer, Scalar, Sgd, StateValue};
    use candle_higher::parallel::{self, Combine};
    use candle_higher::{
        backward, innerloop, DType, Device, Error, GradStore, InitialWeights, InnerloopOptions,
        Result, Tensor,
    };

    const TASKS: usize = 7; // shares of 4 and 3
    const OUTER_STEPS: usize = 5;

    fn mlp(hidden: usize, seed: u64) -> Result<Sequential> {
        let vb = VarBuilder::new(seed, DType::F64, &Device::Cpu);
        Ok(nn::seq()
            .add(nn::linear(1, hidden, vb.pp("0"))?)
            .add(nn::Activation::Tanh)
            .add(nn::linear(hidden, hidden, vb.pp("2"))?)
            .add(nn::Activation::Tanh)
            .add(nn::linear(hidden, 1, vb.pp("4"))?))
    }

    /// Task `i` of meta-iteration `step`: a sinusoid; two differentiable SGD steps on its
    /// support points, then the query loss, differentiated to the base parameters.
    fn task(model: &Sequential, step: usize, i: usize) -> Result<GradStore> {
        let (amp, phase) = (0.5 + 0.37 * i as f64, 0.2 * step as f64 + 0.1 * i as f64);
        let points = |shift: f64| -> Result<(Tensor, Tensor)> {
            let x: Vec<f64> = (0..6).map(|k| k as f64 * 0.7 - 2.0 + shift).collect();
            let y: Vec<f64> = x.iter().map(|v| amp * (v - phase).sin()).collect();
            Ok((
                Tensor::from_slice(&x, &[6, 1], &Device::Cpu)?,
                Tensor::from_slice(&y, &[6, 1], &Device::Cpu)?,
            ))
        };
        let ((xs, ys), (xq, yq)) = (points(0.0)?, points(0.3)?);
        let inner = Optimizer::new(Sgd::new(0.05), model.parameters()?.len())?;
        let options = InnerloopOptions::new().initial_weights(InitialWeights::BaseParameters);
        let (mut fmodel, mut diffopt) = innerloop(model, &inner, options)?;
        for _ in 0..2 {
            let loss = nn::mse(&fmodel.forward(&xs)?, &ys)?;
            diffopt.step(&mut fmodel, &loss)?;
        }
        backward(&nn::mse(&fmodel.forward(&xq)?, &yq)?)
    }

    /// The largest difference between `got` and `want`, relative to `want`'s largest value.
    fn relative_difference(got: &[Tensor], want: &[Tensor]) -> Result<f64> {
        let mut worst = 0.0f64;
        for (g, w) in got.iter().zip(want) {
            let (g, w) = (g.to_vec_f64()?, w.to_vec_f64()?);
            let scale = w
                .iter()
                .fold(0.0f64, |m, v| m.max(v.abs()))
                .max(f64::MIN_POSITIVE);
            for (a, b) in g.iter().zip(&w) {
                worst = worst.max((a - b).abs() / scale);
            }
        }
        Ok(worst)
    }

    /// Whether every rank holds exactly (bit for bit) rank 0's `tensors`.
    fn identical_on_every_rank(comm: &dyn Communicator, tensors: &[Tensor]) -> Result<bool> {
        let mut bytes = Vec::new();
        for t in tensors {
            for v in t.to_vec_f64()? {
                bytes.extend_from_slice(&v.to_bits().to_le_bytes());
            }
        }
        let all = comm.all_gather_bytes(&bytes)?;
        Ok(all.chunks(bytes.len()).all(|c| c == bytes.as_slice()))
    }

    /// Every tensor of the optimizer's states, in parameter and key order.
    fn state_tensors(opt: &Optimizer<Adam>) -> Vec<Tensor> {
        opt.states()
            .iter()
            .flat_map(|s| {
                s.entries().filter_map(|(_, v)| match v {
                    StateValue::Tensor(t) | StateValue::Scalar(Scalar::Tensor(t)) => Some(t),
                    _ => None,
                })
            })
            .collect()
    }

    fn grads_of(params: &[Tensor], grads: &GradStore) -> Vec<Tensor> {
        params
            .iter()
            .map(|p| {
                grads
                    .get(p)
                    .expect("every parameter has a meta-gradient")
                    .clone()
            })
            .collect()
    }

    pub(super) fn run() {
        if let Err(e) = check() {
            eprintln!("tests/mpi.rs failed: {e}");
            std::process::exit(1);
        }
    }

    fn check() -> Result<()> {
        let comm = MpiCommunicator::init()?;
        let rank = comm.rank();
        assert!(comm.size() >= 2, "run with mpirun -np 2 (or more)");

        // A rank with another model is an error on every rank, and changes nothing.
        let mut odd = mlp(if rank == 1 { 9 } else { 8 }, 0)?;
        match distributed::broadcast_model(&comm, &mut odd) {
            Err(Error::RankMismatch { rank: 1, .. }) => {}
            other => panic!("rank {rank}: expected a mismatch of rank 1, got {other:?}"),
        }

        // Every rank starts from a model and optimizer of its own; rank 0's has trained two
        // steps. The broadcasts give every rank rank 0's.
        let mut model = mlp(16, rank as u64)?;
        let mut opt = Optimizer::new(Adam::new(0.01), model.parameters()?.len())?;
        if rank == 0 {
            for step in 100..102 {
                let g = task(&model, step, 0)?;
                opt.step_module(&mut model, &g)?;
            }
        }
        distributed::broadcast_model(&comm, &mut model)?;
        distributed::broadcast_optimizer_state(&comm, &mut opt, &Device::Cpu)?;
        assert!(
            identical_on_every_rank(&comm, &model.parameters()?)?,
            "broadcast_model"
        );
        // Every rank's states, rank 0's included, are constants on the device asked for.
        let states = state_tensors(&opt);
        assert!(!states.is_empty(), "rank 0's Adam has moments");
        for t in &states {
            assert!(
                t.device().same_device(&Device::Cpu) && !t.requires_grad(),
                "rank {rank}: a state tensor is not a constant on the CPU"
            );
        }
        assert!(
            identical_on_every_rank(&comm, &states)?,
            "broadcast_optimizer_state"
        );

        // A learning rate injected on one rank only is an error on every rank, naming it.
        let mut inner = Optimizer::new(Sgd::new(0.05), model.parameters()?.len())?;
        if rank == 1 {
            inner.inject("lr", &Tensor::full_scalar(0.05, DType::F64, &Device::Cpu)?)?;
        }
        match distributed::broadcast_optimizer_state(&comm, &mut inner, &Device::Cpu) {
            Err(Error::RankMismatch { rank: 1, what, .. })
                if what.contains("\"lr\" is injected") => {}
            other => panic!("rank {rank}: expected a mismatch of rank 1's lr, got {other:?}"),
        }

        // The single-process reference: the same model and optimizer, the whole meta-batch.
        let mut reference = model.clone();
        let mut reference_opt = opt.clone();
        let mut worst_grad = 0.0f64;
        for step in 0..OUTER_STEPS {
            let params = model.parameters()?;
            let grads = distributed::meta_batch(&comm, &params, TASKS, 1, Combine::Mean, |i| {
                task(&model, step, i)
            })?;
            let ref_params = reference.parameters()?;
            let ref_grads =
                parallel::meta_batch(TASKS, 1, Combine::Mean, |i| task(&reference, step, i))?;
            let (got, want) = (grads_of(&params, &grads), grads_of(&ref_params, &ref_grads));
            let diff = relative_difference(&got, &want)?;
            assert!(
                diff <= 1e-12,
                "step {step}: meta-gradient differs by {diff:e}"
            );
            assert!(
                identical_on_every_rank(&comm, &got)?,
                "step {step}: the ranks' meta-gradients differ"
            );
            worst_grad = worst_grad.max(diff);
            opt.step_module(&mut model, &grads)?;
            reference_opt.step_module(&mut reference, &ref_grads)?;
        }
        let params = model.parameters()?;
        let diff = relative_difference(&params, &reference.parameters()?)?;
        assert!(
            diff <= 1e-12,
            "parameters after {OUTER_STEPS} steps differ by {diff:e}"
        );
        assert!(
            identical_on_every_rank(&comm, &params)?,
            "the ranks' parameters differ"
        );
        let moved = relative_difference(&params, &mlp(16, 0)?.parameters()?)?;
        assert!(moved > 1e-3, "the outer steps did not move the parameters");
        if rank == 0 {
            println!(
                "tests/mpi.rs: {} ranks = 1 process over {TASKS} tasks: meta-gradients within \
                 {worst_grad:.1e}, parameters after {OUTER_STEPS} Adam steps within {diff:.1e} \
                 (relative), identical on every rank: ok",
                comm.size()
            );
        }
        Ok(())
    }
}
