//! Meta-batches across processes: the speed-up of 2 MPI ranks over 1 on one machine, and the
//! all-reduce's share of a meta-iteration, for MAML sine (1-40-40-1 ReLU MLP, 25 tasks,
//! K = 10, 1 inner step and, as `maml_sine_5`, 5 inner steps, task-batched, f32) and the
//! MAML-Omniglot CNN (synthetic 28x28,
//! 5-way 1-shot, 15 queries, meta-batch 4, 5 inner steps, task-batched, f32).
//!
//! `cargo bench --features mpi --bench mpi [-- --quick]` runs itself under `mpirun -np 1`
//! and `mpirun -np 2` (`MPIRUN` names another launcher), three launches each, alternating,
//! and keeps each one's median launch; prints a table (seconds per
//! meta-iteration, the ratio, the all-reduce's share on 2 ranks) and writes it to
//! `target/bench-results/mpi.json`. Each rank runs with one candle thread, on mimalloc at
//! its defaults (as `benches/maml.rs`). The time is rank 0's median meta-iteration after
//! a warm-up one; task data are generated before. The all-reduce's share is rank 0's total
//! time in `all_reduce_grads`, including waiting for the other rank to finish its share,
//! over its total time (shown as that share of the median). It asserts nothing. `--quick` is a smoke run (a few
//! iterations of smaller workloads) that checks the code, not a measurement.

// The allocator of `benches/maml.rs`, at its default settings, so the two benches compare.
#[cfg(feature = "mpi")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(not(feature = "mpi"))]
fn main() {
    println!("benches/mpi.rs needs the `mpi` feature: cargo bench --features mpi --bench mpi");
}

#[cfg(feature = "mpi")]
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    if let Some(i) = args.iter().position(|a| a == "--worker") {
        let workload = args.get(i + 1).cloned().unwrap_or_default();
        if let Err(e) = worker::run(&workload, quick) {
            eprintln!("benches/mpi.rs worker failed: {e}");
            std::process::exit(1);
        }
    } else {
        launcher::run(quick);
    }
}

#[cfg(feature = "mpi")]
mod launcher {
    use std::process::Command;

    /// Rank 0's report of one run.
    struct Report {
        seconds: f64,
        all_reduce: f64,
    }

    fn launch(ranks: usize, workload: &str, quick: bool) -> Option<Report> {
        let launcher = std::env::var("MPIRUN").unwrap_or_else(|_| "mpirun".into());
        let exe = std::env::current_exe().ok()?;
        let mut cmd = Command::new(&launcher);
        let version = Command::new(&launcher).arg("--version").output().ok()?;
        if String::from_utf8_lossy(&version.stdout).contains("Open MPI") {
            cmd.arg("--oversubscribe")
                .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
                .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
        }
        cmd.args(["-np", &ranks.to_string()])
            .arg(exe)
            .args(["--worker", workload])
            .env("RAYON_NUM_THREADS", "1");
        if quick {
            cmd.arg("--quick");
        }
        // OpenMPI 4.x's known exit race (open-mpi/ompi#7833): after a good run, mpirun may
        // report a rank "with PID 0" as "exiting improperly"; only that is run again.
        let mut out = cmd.output().ok()?;
        for _ in 0..2 {
            let text = String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout);
            if out.status.success() || !text.contains("with PID 0 on") {
                break;
            }
            out = cmd.output().ok()?;
        }
        if !out.status.success() {
            eprintln!(
                "{workload} on {ranks} rank(s) failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().find_map(|l| l.strip_prefix("RESULT "))?;
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        Some(Report {
            seconds: v["seconds"].as_f64()?,
            all_reduce: v["all_reduce"].as_f64()?,
        })
    }

    /// The launch with the median time (its own all-reduce time with it); `None` for none.
    fn median_report(mut reports: Vec<Report>) -> Option<Report> {
        reports.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
        let mid = reports.len() / 2;
        (!reports.is_empty()).then(|| reports.swap_remove(mid))
    }

    pub(super) fn run(quick: bool) {
        println!(
            "| workload | 1 rank (ms / meta-iteration) | 2 ranks | speed-up | all-reduce share on 2 ranks |"
        );
        println!("|---|---|---|---|---|");
        let mut rows = Vec::new();
        for workload in ["maml_sine", "maml_sine_5", "omniglot_cnn"] {
            // 1 and 2 ranks alternate, three launches each: this machine's speed drifts by
            // a third between launches a minute apart, so one launch each can mislead.
            let rounds = if quick { 1 } else { 3 };
            let (mut ones, mut twos) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                ones.extend(launch(1, workload, quick));
                twos.extend(launch(2, workload, quick));
            }
            let (Some(one), Some(two)) = (median_report(ones), median_report(twos)) else {
                println!("| {workload} | failed | | | |");
                continue;
            };
            let speedup = one.seconds / two.seconds;
            let share = two.all_reduce / two.seconds;
            println!(
                "| {workload} | {:.3} | {:.3} | {speedup:.2}x | {:.1}% |",
                1e3 * one.seconds,
                1e3 * two.seconds,
                100.0 * share
            );
            rows.push(serde_json::json!({
                "workload": workload,
                "quick": quick,
                "seconds_1_rank": one.seconds,
                "seconds_2_ranks": two.seconds,
                "speedup": speedup,
                "all_reduce_seconds_2_ranks": two.all_reduce,
                "all_reduce_share_2_ranks": share,
                "all_reduce_share_1_rank": one.all_reduce / one.seconds,
            }));
        }
        if quick {
            println!("(--quick: a smoke run of smaller workloads, not a measurement)");
        }
        let dir =
            std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/target/bench-results"));
        let written = std::fs::create_dir_all(dir).and_then(|()| {
            let text = serde_json::to_string_pretty(&rows).unwrap_or_default();
            std::fs::write(dir.join("mpi.json"), text)
        });
        match written {
            Ok(()) => println!("(wrote {})", dir.join("mpi.json").display()),
            Err(e) => println!("(could not write {}: {e})", dir.join("mpi.json").display()),
        }
    }
}

#[cfg(feature = "mpi")]
mod worker {
    use std::time::Instant;

    use candle_higher::distributed::{self, task_share, Communicator, MpiCommunicator};
    use candle_higher::nn::{
        batch_norm2d, conv2d, cross_entropy_per_task, flatten, linear, max_pool2d, mse_per_task,
        seq, Activation, BatchNormConfig, ConvConfig, Parameters, Sequential, VarBuilder,
    };
    use candle_higher::optim::{Adam, Optimizer, Sgd};
    use candle_higher::{
        backward, innerloop, DType, Device, Error, GradStore, InitialWeights, InnerloopOptions,
        Result, Tensor,
    };
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// A workload: its model, meta-batch size, inner steps and inner learning rate, and
    /// the per-task losses of a task-batched chunk.
    struct Workload {
        model: Sequential,
        tasks: usize,
        inner_steps: usize,
        inner_lr: f64,
        /// Stacked support and query sets of the whole meta-batch: xs, ys, xq, yq.
        data: Vec<[Tensor; 4]>,
        loss: fn(&Tensor, &Tensor) -> Result<Tensor>,
    }

    fn sine(quick: bool, inner_steps: usize, rng: &mut StdRng) -> Result<Workload> {
        let vb = VarBuilder::new(0, DType::F32, &Device::Cpu);
        let model = seq()
            .add(linear(1, 40, vb.pp("0"))?)
            .add(Activation::Relu)
            .add(linear(40, 40, vb.pp("2"))?)
            .add(Activation::Relu)
            .add(linear(40, 1, vb.pp("4"))?);
        let (tasks, k, iters) = (25, 10, if quick { 20 } else { 500 });
        let data = (0..iters + 1)
            .map(|_| {
                let mut set = |n: usize| -> Result<[Tensor; 2]> {
                    let (mut x, mut y) = (Vec::new(), Vec::new());
                    for _ in 0..tasks {
                        let (amp, phase) = (
                            rng.gen_range(0.1..5.0f32),
                            rng.gen_range(0.0..std::f32::consts::PI),
                        );
                        for _ in 0..n {
                            let v = rng.gen_range(-5.0..5.0f32);
                            x.push(v);
                            y.push(amp * (v - phase).sin());
                        }
                    }
                    Ok([
                        Tensor::from_vec(x, &[tasks, n, 1], &Device::Cpu)?,
                        Tensor::from_vec(y, &[tasks, n, 1], &Device::Cpu)?,
                    ])
                };
                let ([xs, ys], [xq, yq]) = (set(k)?, set(k)?);
                Ok([xs, ys, xq, yq])
            })
            .collect::<Result<_>>()?;
        Ok(Workload {
            model,
            tasks,
            inner_steps,
            inner_lr: 0.01,
            data,
            loss: |out, y| mse_per_task(out, y),
        })
    }

    fn omniglot_cnn(quick: bool, rng: &mut StdRng) -> Result<Workload> {
        let vb = VarBuilder::new(0, DType::F32, &Device::Cpu);
        let mut model = seq();
        for (i, c_in) in [1usize, 64, 64].into_iter().enumerate() {
            let bn = BatchNormConfig {
                momentum: 1.0,
                ..Default::default()
            };
            model = model
                .add(conv2d(c_in, 64, 3, ConvConfig::default(), vb.pp(4 * i))?)
                .add(batch_norm2d(64, bn, vb.pp(4 * i + 1))?)
                .add(Activation::Relu)
                .add(max_pool2d(2));
        }
        let (ways, shots, queries) = (5, 1, 15);
        let model = model.add(flatten()).add(linear(64, ways, vb.pp(13))?);
        let (tasks, inner_steps, iters) = if quick { (2, 1, 1) } else { (4, 5, 5) };
        let data = (0..iters + 1)
            .map(|_| {
                let (mut xs, mut xq) = (Vec::new(), Vec::new());
                for _ in 0..tasks {
                    for _ in 0..ways {
                        let proto: Vec<f32> = (0..28 * 28).map(|_| rng.gen::<f32>()).collect();
                        for (n, out) in [(shots, &mut xs), (queries, &mut xq)] {
                            for _ in 0..n {
                                out.extend(
                                    proto.iter().map(|&p| p + 0.3 * (rng.gen::<f32>() - 0.5)),
                                );
                            }
                        }
                    }
                }
                let labels = |n: usize| -> Vec<u32> {
                    (0..tasks)
                        .flat_map(|_| (0..ways as u32).flat_map(move |c| std::iter::repeat_n(c, n)))
                        .collect()
                };
                Ok([
                    Tensor::from_vec(xs, &[tasks, ways * shots, 1, 28, 28], &Device::Cpu)?,
                    Tensor::from_vec(labels(shots), &[tasks, ways * shots], &Device::Cpu)?,
                    Tensor::from_vec(xq, &[tasks, ways * queries, 1, 28, 28], &Device::Cpu)?,
                    Tensor::from_vec(labels(queries), &[tasks, ways * queries], &Device::Cpu)?,
                ])
            })
            .collect::<Result<_>>()?;
        Ok(Workload {
            model,
            tasks,
            inner_steps,
            inner_lr: 0.1,
            data,
            loss: |out, y| cross_entropy_per_task(out, y),
        })
    }

    /// One meta-iteration on this rank's share of the tasks: returns its meta-gradient
    /// (its part of the mean over all tasks).
    fn share_grads(w: &Workload, comm: &dyn Communicator, data: &[Tensor; 4]) -> Result<GradStore> {
        let share = task_share(w.tasks, comm.rank(), comm.size());
        let part = |t: &Tensor| t.narrow(0, share.start, share.len());
        let (xs, ys, xq, yq) = (
            part(&data[0])?,
            part(&data[1])?,
            part(&data[2])?,
            part(&data[3])?,
        );
        let inner = Optimizer::new(Sgd::new(w.inner_lr), w.model.parameters()?.len())?;
        let options = InnerloopOptions::new()
            .initial_weights(InitialWeights::BaseParameters)
            .tasks(share.len());
        let (mut fmodel, mut diffopt) = innerloop(&w.model, &inner, options)?;
        for _ in 0..w.inner_steps {
            let loss = (w.loss)(&fmodel.forward(&xs)?, &ys)?.sum_all()?;
            diffopt.step(&mut fmodel, &loss)?;
        }
        let q = (w.loss)(&fmodel.forward(&xq)?, &yq)?
            .sum_all()?
            .affine(1.0 / w.tasks as f64, 0.0)?;
        backward(&q)
    }

    pub(super) fn run(workload: &str, quick: bool) -> Result<()> {
        let comm = MpiCommunicator::init()?;
        let mut rng = StdRng::seed_from_u64(3);
        let mut w = match workload {
            "maml_sine" => sine(quick, 1, &mut rng)?,
            "maml_sine_5" => sine(quick, 5, &mut rng)?,
            "omniglot_cnn" => omniglot_cnn(quick, &mut rng)?,
            other => {
                return Err(Error::InvalidArgument {
                    op: "benches/mpi.rs",
                    message: format!("unknown workload {other:?}"),
                })
            }
        };
        let mut opt = Optimizer::new(Adam::new(1e-3), w.model.parameters()?.len())?;
        // Per meta-iteration (the first warms up and is not kept): its time, and the
        // all-reduce's part of it.
        let (mut times, mut reduces) = (Vec::new(), Vec::new());
        for (it, data) in w.data.iter().enumerate() {
            let started = Instant::now();
            let grads = share_grads(&w, &comm, data)?;
            let t = Instant::now();
            let grads = distributed::all_reduce_grads(&comm, &w.model.parameters()?, &grads)?;
            let reduce = t.elapsed();
            opt.step_module(&mut w.model, &grads)?;
            if it > 0 {
                times.push(started.elapsed().as_secs_f64());
                reduces.push(reduce.as_secs_f64());
            }
        }
        // The median meta-iteration (robust to the machine's hiccups); the all-reduce's
        // share is its total over the total.
        let share = reduces.iter().sum::<f64>() / times.iter().sum::<f64>().max(f64::MIN_POSITIVE);
        times.sort_by(f64::total_cmp);
        let seconds = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
        if comm.rank() == 0 {
            println!(
                "RESULT {}",
                serde_json::json!({
                    "seconds": seconds,
                    "all_reduce": share * seconds,
                })
            );
        }
        Ok(())
    }
}
