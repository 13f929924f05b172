//! MAML benchmarks against PyTorch + higher, measured in the same run.
//!
//! `cargo bench --bench maml` prints one table: per workload, our task-batched time
//! (`ours-batched`, the inner loop over all tasks at once), our loop over tasks
//! (`ours-looped`), and, when the anchors' Python environment is installed, every anchor
//! variant of `../shared/anchors/` (PyTorch + higher, TorchOpt, TorchOpt functional + vmap,
//! torch.func + vmap, JAX jit + vmap), each with its ratio to `ours-batched`. The rows are
//! also written to `target/bench-results/maml.json` (`workload`, `variant`, `inner_steps`,
//! `threads`, `seconds`: median per meta-iteration, `peak_rss_mib`). It asserts nothing.
//! Task data are generated before the timed region, as on the Python side. Workloads:
//! - MAML sine (1-40-40-1 ReLU MLP, 25 tasks, K = 10, second order, f32): seconds per
//!   meta-iteration for 1, 5, 10 and 20 inner steps, one and two threads (two threads
//!   split the meta-batch, as on the CNN); peak memory;
//! - the MAML-Omniglot CNN (synthetic 28x28, 5-way 1-shot, 15 query, meta-batch 16,
//!   5 inner steps), one and two threads; `ours-batched` runs it as task-batched chunks
//!   of `OMNIGLOT_CHUNK` tasks; two threads split the meta-batch (`parallel::meta_batch`),
//!   each running the library's kernels on one thread;
//! - two threads against one on MAML sine at meta-batches of 1 to 200 tasks (`scaling`),
//!   with the fixed cost per block and cost per task fitted to the one-thread times, and
//!   at 25 tasks beside a busy thread (more runnable threads than cores);
//! - the cost of one inner step at step 1 and at step 1000 of an unroll, memory per
//!   unrolled step, and test-mode memory over 1000 steps.
//!
//! Each workload runs in a child process of this binary (`--worker NAME ...`), so that its
//! peak resident memory is its own; 1-thread rows run pinned to core 0, as the anchors do.
//! Each of our rows is the median of `OUR_LAUNCHES` launches (one with `--quick`), and so
//! are the rows of the anchors near a target (JAX on sine, higher on the CNN); each other
//! anchor row is one launch (they take minutes).
//! A worker runs alone too, e.g. `--worker sine batched STEPS ITERS WARMUP THREADS [TASKS]`
//! or `--worker omniglot batched|looped ITERS WARMUP META_BATCH THREADS [CHUNK]`
//! (prints `RESULT seconds peak_mib`; `TASKS` changes the meta-batch, for measuring
//! the fixed and per-task costs; `CHUNK` the tasks per batched inner loop).
//! Workers run with mimalloc's default settings unless the environment sets
//! `MIMALLOC_PURGE_DELAY` (see `purge_delay`). Options: `--quick` (fewer iterations), `--only sine|omniglot|scaling|unroll`,
//! `--no-anchor`, `--slow-anchors` (adds JAX on the CNN, minutes per meta-iteration).

use std::process::Command;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use candle_higher::nn::{
    cross_entropy, cross_entropy_per_task, linear, mse, mse_per_task, seq, Activation, Sequential,
    VarBuilder,
};
use candle_higher::optim::{Adam, Optimizer, Sgd};
use candle_higher::{
    backward, innerloop, DType, GradStore, InitialWeights, InnerloopOptions, Parameters, Result,
    Tensor,
};

const META_BATCH: usize = 25;
const K: usize = 10;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(pos) = args.iter().position(|a| a == "--worker") {
        let rest = &args[pos + 1..];
        if let Err(e) = worker(rest) {
            eprintln!("worker failed: {e}");
            std::process::exit(1);
        }
        return;
    }
    driver(&args);
}

/// Peak resident set size of this process, MiB (Linux `VmHWM`).
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Current resident set size, MiB (`VmRSS`).
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A small deterministic generator for task data (the anchors use numpy; the workloads are
/// the same in distribution, not in values).
struct Lcg(u64);

impl Lcg {
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        lo + (hi - lo) * ((self.0 >> 11) as f64 / (1u64 << 53) as f64)
    }

    fn normal(&mut self) -> f64 {
        let (u1, u2) = (1.0 - self.uniform(0.0, 1.0), self.uniform(0.0, 1.0));
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

// ------------------------------------------------------------------------ MAML sine

/// One sinusoid task: support and query sets, [K, 1] each.
struct SineTask {
    xs: Tensor,
    ys: Tensor,
    xq: Tensor,
    yq: Tensor,
}

fn sine_task(rng: &mut Lcg) -> Result<SineTask> {
    let amp = rng.uniform(0.1, 5.0);
    let phase = rng.uniform(0.0, std::f64::consts::PI);
    let mut set = || -> Result<(Tensor, Tensor)> {
        let x: Vec<f32> = (0..K).map(|_| rng.uniform(-5.0, 5.0) as f32).collect();
        let y: Vec<f32> = x
            .iter()
            .map(|&x| (amp * (f64::from(x) - phase).sin()) as f32)
            .collect();
        Ok((
            Tensor::from_vec(x, &[K, 1], &candle_higher::device_from_env()?)?,
            Tensor::from_vec(y, &[K, 1], &candle_higher::device_from_env()?)?,
        ))
    };
    let (xs, ys) = set()?;
    let (xq, yq) = set()?;
    Ok(SineTask { xs, ys, xq, yq })
}

fn sine_model() -> Result<Sequential> {
    let vb = VarBuilder::new(0, DType::F32, &candle_higher::device_from_env()?);
    Ok(seq()
        .add(linear(1, 40, vb.pp("0"))?)
        .add(Activation::Relu)
        .add(linear(40, 40, vb.pp("2"))?)
        .add(Activation::Relu)
        .add(linear(40, 1, vb.pp("4"))?))
}

/// One meta-iteration as higher's example runs it: tasks one by one, each adapted with
/// `steps` differentiable SGD steps, the query losses' meta-gradients summed, one Adam step.
fn maml_iteration(
    model: &mut Sequential,
    meta_opt: &mut Optimizer<Adam>,
    tasks: &[SineTask],
    steps: usize,
) -> Result<()> {
    let inner_opt = Optimizer::new(Sgd::new(0.01), model.parameters()?.len())?;
    let mut total = GradStore::default();
    for task in tasks {
        let (mut fmodel, mut diffopt) = innerloop(&*model, &inner_opt, maml_options())?;
        for _ in 0..steps {
            let loss = mse(&fmodel.forward(&task.xs)?, &task.ys)?;
            diffopt.step(&mut fmodel, &loss)?;
        }
        let query =
            mse(&fmodel.forward(&task.xq)?, &task.yq)?.affine(1.0 / tasks.len() as f64, 0.0)?;
        total.accumulate(&backward(&query)?)?;
    }
    meta_opt.step_module(model, &total)
}

/// The same meta-iteration with the tasks batched: one inner loop over `[T, ...]` fast
/// weights, the inner loss the sum of the per-task losses, the meta-loss their mean.
fn maml_iteration_batched(
    model: &mut Sequential,
    meta_opt: &mut Optimizer<Adam>,
    batch: &SineBatch,
    steps: usize,
) -> Result<()> {
    let inner_opt = Optimizer::new(Sgd::new(0.01), model.parameters()?.len())?;
    let options = maml_options().tasks(batch.tasks);
    let (mut fmodel, mut diffopt) = innerloop(&*model, &inner_opt, options)?;
    for _ in 0..steps {
        let loss = mse_per_task(&fmodel.forward(&batch.xs)?, &batch.ys)?.sum_all()?;
        diffopt.step(&mut fmodel, &loss)?;
    }
    let query = mse_per_task(&fmodel.forward(&batch.xq)?, &batch.yq)?.mean_all()?;
    meta_opt.step_module(model, &backward(&query)?)
}

/// A meta-batch of sine tasks stacked on a task axis: `[T, K, 1]` each.
struct SineBatch {
    tasks: usize,
    xs: Tensor,
    ys: Tensor,
    xq: Tensor,
    yq: Tensor,
}

fn stack_sine(tasks: &[SineTask]) -> Result<SineBatch> {
    let stack = |f: fn(&SineTask) -> &Tensor| -> Result<Tensor> {
        let parts: Vec<Tensor> = tasks.iter().map(|t| f(t).clone()).collect();
        Tensor::stack(&parts, 0)
    };
    Ok(SineBatch {
        tasks: tasks.len(),
        xs: stack(|t| &t.xs)?,
        ys: stack(|t| &t.ys)?,
        xq: stack(|t| &t.xq)?,
        yq: stack(|t| &t.yq)?,
    })
}

/// MAML's inner loops start from the base parameters, so meta-gradients reach them.
fn maml_options() -> InnerloopOptions {
    InnerloopOptions::new().initial_weights(InitialWeights::BaseParameters)
}

/// The MAML sine workload: `iters` timed meta-iterations after `warmup`, task-batched or
/// looped. With `threads > 1` the threads split the meta-batch (`parallel::meta_batch`:
/// contiguous shares of the tasks, batched per share or looped, each thread running
/// one-thread kernels); one thread runs the meta-iteration as a user would write it.
fn sine_worker(
    batched: bool,
    steps: usize,
    iters: usize,
    warmup: usize,
    threads: usize,
    meta_batch: usize,
) -> Result<String> {
    use candle_higher::parallel::{self, Combine};
    if threads > 1 {
        candle_higher::set_cpu_threads(1)?;
    }
    let mut model = sine_model()?;
    let mut meta_opt = Optimizer::new(Adam::new(1e-3), model.parameters()?.len())?;
    let mut rng = Lcg(123);
    let batches: Vec<Vec<SineTask>> = (0..iters + warmup)
        .map(|_| (0..meta_batch).map(|_| sine_task(&mut rng)).collect())
        .collect::<Result<_>>()?;
    // One stacked batch per thread's share (one share with one thread).
    let share = meta_batch.div_ceil(threads);
    let stacked: Vec<Vec<SineBatch>> = if batched {
        batches
            .iter()
            .map(|b| b.chunks(share).map(stack_sine).collect::<Result<_>>())
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    let scale = 1.0 / meta_batch as f64;
    let chunk_grads = |model: &Sequential, batch: &SineBatch| -> Result<GradStore> {
        let inner_opt = Optimizer::new(Sgd::new(0.01), model.parameters()?.len())?;
        let options = maml_options().tasks(batch.tasks);
        let (mut fmodel, mut diffopt) = innerloop(model, &inner_opt, options)?;
        for _ in 0..steps {
            let loss = mse_per_task(&fmodel.forward(&batch.xs)?, &batch.ys)?.sum_all()?;
            diffopt.step(&mut fmodel, &loss)?;
        }
        let query = mse_per_task(&fmodel.forward(&batch.xq)?, &batch.yq)?.sum_all()?;
        backward(&query.affine(scale, 0.0)?)
    };
    let task_grads = |model: &Sequential, task: &SineTask| -> Result<GradStore> {
        let inner_opt = Optimizer::new(Sgd::new(0.01), model.parameters()?.len())?;
        let (mut fmodel, mut diffopt) = innerloop(model, &inner_opt, maml_options())?;
        for _ in 0..steps {
            let loss = mse(&fmodel.forward(&task.xs)?, &task.ys)?;
            diffopt.step(&mut fmodel, &loss)?;
        }
        backward(&mse(&fmodel.forward(&task.xq)?, &task.yq)?.affine(scale, 0.0)?)
    };
    let mut times = Vec::new();
    for (i, batch) in batches.iter().enumerate() {
        let t0 = Instant::now();
        match (batched, threads > 1) {
            (true, false) => {
                maml_iteration_batched(&mut model, &mut meta_opt, &stacked[i][0], steps)?
            }
            (false, false) => maml_iteration(&mut model, &mut meta_opt, batch, steps)?,
            (true, true) => {
                let shares = &stacked[i];
                let total = parallel::meta_batch(shares.len(), threads, Combine::Sum, |c| {
                    chunk_grads(&model, &shares[c])
                })?;
                meta_opt.step_module(&mut model, &total)?
            }
            (false, true) => {
                let total = parallel::meta_batch(batch.len(), threads, Combine::Sum, |t| {
                    task_grads(&model, &batch[t])
                })?;
                meta_opt.step_module(&mut model, &total)?
            }
        }
        // A GPU runs ops asynchronously: the iteration ends when its work has.
        candle_higher::device_from_env()?.synchronize()?;
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok(format!("{} {}", median(times), peak_rss_mib()))
}

// ------------------------------------------------------------------------ unroll cost

/// Per-step time of the inner step at step 1 and step 1000 of one long unroll (second
/// order kept), RSS growth per step, and RSS growth over 1000 steps in test mode.
fn unroll_worker(steps: usize) -> Result<String> {
    let model = sine_model()?;
    let mut rng = Lcg(7);
    let task = sine_task(&mut rng)?;
    let inner_opt = Optimizer::new(Sgd::new(1e-3), model.parameters()?.len())?;
    let run = |track: bool| -> Result<(Vec<f64>, f64)> {
        let options = maml_options().track_higher_grads(track);
        let (mut fmodel, mut diffopt) = innerloop(&model, &inner_opt, options)?;
        let rss0 = rss_mib();
        let mut times = Vec::with_capacity(steps);
        for _ in 0..steps {
            let t0 = Instant::now();
            let loss = mse(&fmodel.forward(&task.xs)?, &task.ys)?;
            diffopt.step(&mut fmodel, &loss)?;
            times.push(t0.elapsed().as_secs_f64());
        }
        Ok((times, rss_mib() - rss0))
    };
    let (times, grown) = run(true)?;
    let window = |r: std::ops::Range<usize>| median(times[r].to_vec());
    // Steps 10-40 against the last 30: the first few steps pay for warming caches.
    let early = window(10..40);
    let late = window(steps - 30..steps);
    let (_, grown_test) = run(false)?;
    Ok(format!(
        "{early} {late} {} {grown_test}",
        grown / steps as f64
    ))
}

// ------------------------------------------------------------------------ Omniglot CNN

/// Tasks per task-batched inner loop on the CNN (a meta-batch of 16 runs as 16 / CHUNK
/// loops, their meta-gradients summed). All 16 at once hold every task's graph together:
/// 5.6 GiB peak, and most of the time is then the kernel zeroing fresh pages (measured
/// with `perf`: 4.2 s, against 2.4-3.0 s in chunks of 2 at 0.8 GiB, 2.6 s in chunks of 4
/// at 1.5 GiB, on a shared machine).
const OMNIGLOT_CHUNK: usize = 2;

/// One task of the Omniglot workload: support and query images with labels.
struct ImageTask {
    xs: Tensor,
    ys: Tensor,
    xq: Tensor,
    yq: Tensor,
}

/// The Omniglot workload's meta-iterations: `meta_batch` tasks per iteration, batched in
/// chunks of `OMNIGLOT_CHUNK` or looped, on `threads` threads (`parallel::meta_batch`: the
/// tasks, or chunks, dealt out in blocks, each thread running one-thread kernels).
fn omniglot_worker(
    batched: bool,
    iters: usize,
    warmup: usize,
    meta_batch: usize,
    threads: usize,
    chunk: usize,
) -> Result<String> {
    use candle_higher::nn::{
        batch_norm2d, conv2d, flatten, max_pool2d, BatchNormConfig, ConvConfig,
    };
    use candle_higher::parallel::{self, Combine};
    let (ways, shots, queries, steps) = (5usize, 1usize, 15usize, 5usize);
    if threads > 1 {
        // The threads split the tasks; each runs the library's kernels on one thread.
        candle_higher::set_cpu_threads(1)?;
    }
    let vb = VarBuilder::new(0, DType::F32, &candle_higher::device_from_env()?);
    let mut net = seq();
    for (i, c_in) in [1usize, 64, 64].into_iter().enumerate() {
        let p = vb.pp(format!("{}", 4 * i));
        net = net
            .add(conv2d(c_in, 64, 3, ConvConfig::default(), p.clone())?)
            .add(batch_norm2d(
                64,
                BatchNormConfig {
                    momentum: 1.0,
                    ..Default::default()
                },
                vb.pp(format!("{}", 4 * i + 1)),
            )?)
            .add(Activation::Relu)
            .add(max_pool2d(2));
    }
    let mut model = net.add(flatten()).add(linear(64, ways, vb.pp("13"))?);
    let mut meta_opt = Optimizer::new(Adam::new(1e-3), model.parameters()?.len())?;
    let inner_opt = Optimizer::new(Sgd::new(0.1), model.parameters()?.len())?;
    let mut rng = Lcg(5);
    let mut images = |n: usize, protos: &[Vec<f32>]| -> Result<(Tensor, Tensor)> {
        let mut data = Vec::with_capacity(ways * n * 784);
        let mut labels = Vec::with_capacity(ways * n);
        for (c, proto) in protos.iter().enumerate() {
            for _ in 0..n {
                data.extend(proto.iter().map(|&p| p + 0.3 * rng.normal() as f32));
                labels.push(c as u32);
            }
        }
        Ok((
            Tensor::from_vec(
                data,
                &[ways * n, 1, 28, 28],
                &candle_higher::device_from_env()?,
            )?,
            Tensor::from_vec(labels, &[ways * n], &candle_higher::device_from_env()?)?,
        ))
    };
    let mut proto_rng = Lcg(11);
    let mut batches: Vec<Vec<ImageTask>> = Vec::new();
    for _ in 0..iters + warmup {
        let mut tasks = Vec::new();
        for _ in 0..meta_batch {
            let protos: Vec<Vec<f32>> = (0..ways)
                .map(|_| {
                    (0..784)
                        .map(|_| proto_rng.uniform(0.0, 1.0) as f32)
                        .collect()
                })
                .collect();
            let (xs, ys) = images(shots, &protos)?;
            let (xq, yq) = images(queries, &protos)?;
            tasks.push(ImageTask { xs, ys, xq, yq });
        }
        batches.push(tasks);
    }
    let stack = |tasks: &[ImageTask], f: fn(&ImageTask) -> &Tensor| -> Result<Tensor> {
        let parts: Vec<Tensor> = tasks.iter().map(|t| f(t).clone()).collect();
        Tensor::stack(&parts, 0)
    };
    // Each meta-batch as chunks of OMNIGLOT_CHUNK tasks, stacked on a task axis.
    let stacked: Vec<Vec<ImageTask>> = if batched {
        batches
            .iter()
            .map(|b| {
                b.chunks(chunk)
                    .map(|c| {
                        Ok(ImageTask {
                            xs: stack(c, |t| &t.xs)?,
                            ys: stack(c, |t| &t.ys)?,
                            xq: stack(c, |t| &t.xq)?,
                            yq: stack(c, |t| &t.yq)?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    let scale = 1.0 / meta_batch as f64;
    // One task-batched chunk's meta-gradient.
    let chunk_grads = |model: &Sequential, b: &ImageTask| -> Result<GradStore> {
        let options = maml_options().tasks(b.xs.dims()[0]);
        let (mut fmodel, mut diffopt) = innerloop(model, &inner_opt, options)?;
        for _ in 0..steps {
            let loss = cross_entropy_per_task(&fmodel.forward(&b.xs)?, &b.ys)?.sum_all()?;
            diffopt.step(&mut fmodel, &loss)?;
        }
        let q = cross_entropy_per_task(&fmodel.forward(&b.xq)?, &b.yq)?
            .sum_all()?
            .affine(scale, 0.0)?;
        backward(&q)
    };
    // One task's meta-gradient, adapted alone.
    let task_grads = |model: &Sequential, task: &ImageTask| -> Result<GradStore> {
        let (mut fmodel, mut diffopt) = innerloop(model, &inner_opt, maml_options())?;
        for _ in 0..steps {
            let loss = cross_entropy(&fmodel.forward(&task.xs)?, &task.ys)?;
            diffopt.step(&mut fmodel, &loss)?;
        }
        let q = cross_entropy(&fmodel.forward(&task.xq)?, &task.yq)?.affine(scale, 0.0)?;
        backward(&q)
    };
    let mut times = Vec::new();
    for (it, batch) in batches.iter().enumerate() {
        let t0 = Instant::now();
        let total = if batched {
            let chunks = &stacked[it];
            parallel::meta_batch(chunks.len(), threads, Combine::Sum, |i| {
                chunk_grads(&model, &chunks[i])
            })?
        } else {
            parallel::meta_batch(batch.len(), threads, Combine::Sum, |i| {
                task_grads(&model, &batch[i])
            })?
        };
        meta_opt.step_module(&mut model, &total)?;
        candle_higher::device_from_env()?.synchronize()?;
        if it >= warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok(format!("{} {}", median(times), peak_rss_mib()))
}

fn worker(args: &[String]) -> Result<()> {
    let num = |i: usize| {
        args.get(i)
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(0)
    };
    let batched = args.get(1).is_some_and(|m| m == "batched");
    let out = match args.first().map(String::as_str) {
        Some("sine") => {
            let meta_batch = args.get(6).map_or(META_BATCH, |_| num(6));
            sine_worker(batched, num(2), num(3), num(4), num(5).max(1), meta_batch)?
        }
        Some("unroll") => unroll_worker(num(1))?,
        Some("omniglot") => {
            let meta_batch = args.get(4).map_or(16, |_| num(4));
            let chunk = args.get(6).map_or(OMNIGLOT_CHUNK, |_| num(6).max(1));
            omniglot_worker(batched, num(2), num(3), meta_batch, num(5).max(1), chunk)?
        }
        other => format!("unknown worker {other:?}"),
    };
    println!("RESULT {out}");
    Ok(())
}

// ------------------------------------------------------------------------ driver

/// Runs this binary as a worker, pinned to core 0 for one thread, with `RAYON_NUM_THREADS`
/// set to `threads`.
fn run_worker(threads: usize, args: &[String]) -> Option<Vec<f64>> {
    run_worker_with(threads, threads, args)
}

/// Launches of each of our rows: this VM's speed drifts by up to a third between launches,
/// more than between the meta-iterations of one launch.
const OUR_LAUNCHES: usize = 3;

/// One of our rows, `launches` times on `threads` cores with one-thread kernels: the
/// median launch's seconds per meta-iteration, and the largest peak RSS.
fn run_ours(launches: usize, threads: usize, args: &[String]) -> Option<Vec<f64>> {
    let mut runs: Vec<Vec<f64>> = (0..launches)
        .filter_map(|_| run_worker_with(threads, 1, args))
        .filter(|o| o.len() >= 2)
        .collect();
    runs.sort_by(|a, b| a[0].total_cmp(&b[0]));
    let rss = runs.iter().map(|o| o[1]).fold(f64::NAN, f64::max);
    let median = runs.get(runs.len() / 2)?[0];
    Some(vec![median, rss])
}

/// [`run_worker`] on `threads` cores with `RAYON_NUM_THREADS` set to `kernel_threads`.
fn run_worker_with(threads: usize, kernel_threads: usize, args: &[String]) -> Option<Vec<f64>> {
    let exe = std::env::current_exe().ok()?;
    let mut cmd = if threads == 1 && has("taskset") {
        let mut c = Command::new("taskset");
        c.arg("-c").arg("0").arg(exe);
        c
    } else {
        Command::new(exe)
    };
    let out = cmd
        .arg("--worker")
        .args(args)
        .env("RAYON_NUM_THREADS", kernel_threads.to_string())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find_map(|l| l.strip_prefix("RESULT "))?;
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    }
    Some(
        line.split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect(),
    )
}

fn has(program: &str) -> bool {
    Command::new("which")
        .arg(program)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The anchors' Python, if installed (`ANCHORS_PYTHON`, or `setup.sh`'s default venv).
fn anchor_python() -> Option<String> {
    let path = std::env::var("ANCHORS_PYTHON").ok().or_else(|| {
        std::env::var("HOME")
            .ok()
            .map(|h| format!("{h}/.cache/candle-higher-anchors/venv/bin/python"))
    })?;
    std::path::Path::new(&path).exists().then_some(path)
}

fn anchors_dir() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/anchors").to_string()
}

/// The anchors whose ratio to ours is near a target, JAX on MAML sine and higher on the
/// CNN, run as many launches as our rows do: this VM's host load slows every process by up
/// to a third for seconds at a time (both ours and JAX's 1-step sine gave fast and slow
/// launches, 0.50 / 0.78 ms and 0.58 / 0.84 ms). The others run once (minutes each).
const CLOSE_SINE_ANCHOR: &str = "jax";
/// See [`CLOSE_SINE_ANCHOR`].
const CLOSE_OMNIGLOT_ANCHOR: &str = "higher";

/// [`run_anchor`] `launches` times: the median launch's seconds, the largest peak RSS.
fn run_anchor_launches(
    launches: usize,
    script: &str,
    args: &[String],
    threads: usize,
) -> Option<(f64, f64)> {
    let mut runs: Vec<(f64, f64)> = (0..launches)
        .filter_map(|_| run_anchor(script, args, threads))
        .collect();
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let rss = runs.iter().map(|r| r.1).fold(f64::NAN, f64::max);
    Some((runs.get(runs.len() / 2)?.0, rss))
}

/// Runs an anchor script under `/usr/bin/time -v`: (median seconds per meta-iteration,
/// peak RSS MiB).
fn run_anchor(script: &str, args: &[String], threads: usize) -> Option<(f64, f64)> {
    let python = anchor_python()?;
    let mut cmd = Command::new("/usr/bin/time");
    cmd.arg("-v");
    if threads == 1 && has("taskset") {
        cmd.args(["taskset", "-c", "0"]);
    }
    let out = cmd
        .arg(python)
        .arg(format!("{}/{script}", anchors_dir()))
        .args(args)
        .output()
        .ok()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = stdout.lines().find_map(|l| l.strip_prefix("RESULT "))?;
    let key = "\"median\": ";
    let start = json.find("sec_per_meta_iter")?;
    let rest = &json[start..];
    let m = rest[rest.find(key)? + key.len()..]
        .split([',', '}'])
        .next()?
        .trim()
        .parse::<f64>()
        .ok()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let rss = stderr
        .lines()
        .find(|l| l.contains("Maximum resident set size"))
        .and_then(|l| l.rsplit(':').next())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0);
    Some((m, rss))
}

/// mimalloc's purge delay as the workers see it: inherited from the environment, else
/// mimalloc's default. The Omniglot workload once needed `-1` (freed pages kept) to avoid
/// re-faulting the pages of its large temporaries; since the fused BatchNorm, the early
/// release of backward gradients and the batched convolution it runs at mimalloc's defaults.
fn purge_delay() -> String {
    std::env::var("MIMALLOC_PURGE_DELAY").unwrap_or_else(|_| "default".into())
}

/// One measured row of the table and of `maml.json`.
struct Row {
    workload: &'static str,
    variant: String,
    inner_steps: usize,
    threads: usize,
    seconds: f64,
    peak_rss_mib: f64,
}

/// The anchor variants of each workload's script.
const SINE_ANCHORS: [&str; 5] = [
    "higher",
    "torchopt",
    "torchopt_func_vmap",
    "torchfunc_vmap",
    "jax",
];
const OMNIGLOT_ANCHORS: [&str; 2] = ["higher", "torchfunc_vmap"];
/// JAX on the CNN (vmap over tasks) takes minutes per meta-iteration on XLA:CPU (the
/// anchors' RESULTS.md), so it runs only with `--slow-anchors`.
const OMNIGLOT_SLOW_ANCHORS: [&str; 1] = ["jax"];

fn driver(args: &[String]) {
    let quick = args.iter().any(|a| a == "--quick");
    let anchors = !args.iter().any(|a| a == "--no-anchor") && anchor_python().is_some();
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned());
    let wants = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let (iters, warmup) = if quick { (5, 1) } else { (30, 3) };
    if !anchors {
        println!("(anchors not installed: run ../shared/anchors/setup.sh for the Python columns)");
    }
    println!(
        "(allocator: mimalloc, MIMALLOC_PURGE_DELAY={})",
        purge_delay()
    );
    let mut rows: Vec<Row> = Vec::new();
    let launches = if quick { 1 } else { OUR_LAUNCHES };
    let ours = |rows: &mut Vec<Row>, workload, steps, threads, worker: Vec<String>| {
        for mode in ["batched", "looped"] {
            let mut a = worker.clone();
            a.insert(1, mode.to_string());
            if let Some(o) = run_ours(launches, threads, &a) {
                rows.push(Row {
                    workload,
                    variant: format!("ours-{mode}"),
                    inner_steps: steps,
                    threads,
                    seconds: o[0],
                    peak_rss_mib: o[1],
                });
            }
        }
    };
    if wants("sine") {
        for threads in [1usize, 2] {
            for steps in [1usize, 5, 10, 20] {
                // Ours and JAX take under 10 ms a meta-iteration: enough of them to steady
                // the medians, within a minute per row for higher's 0.2 s at 20 steps.
                let it = match (quick, steps) {
                    (true, _) => iters,
                    (false, 1 | 5) => 200,
                    (false, 10) => 100,
                    _ => 60,
                };
                let a = [steps, it, warmup].map(|v| v.to_string());
                // Two threads split the meta-batch (`parallel::meta_batch`), each running
                // one-thread kernels.
                let worker = [
                    vec!["sine".to_string()],
                    a.to_vec(),
                    vec![threads.to_string()],
                ]
                .concat();
                ours(&mut rows, "maml_sine", steps, threads, worker);
                for variant in SINE_ANCHORS.iter().filter(|_| anchors) {
                    let script_args = [
                        "--variant",
                        variant,
                        "--inner-steps",
                        &a[0],
                        "--iters",
                        &a[1],
                        "--warmup",
                        &a[2],
                        "--threads",
                        &threads.to_string(),
                    ]
                    .map(String::from);
                    let n = if *variant == CLOSE_SINE_ANCHOR {
                        launches
                    } else {
                        1
                    };
                    if let Some((t, rss)) =
                        run_anchor_launches(n, "bench_maml_sinusoid.py", &script_args, threads)
                    {
                        rows.push(Row {
                            workload: "maml_sine",
                            variant: variant.to_string(),
                            inner_steps: steps,
                            threads,
                            seconds: t,
                            peak_rss_mib: rss,
                        });
                    }
                }
            }
        }
    }
    if wants("omniglot") {
        let (it, wu) = if quick { (2, 1) } else { (5, 1) };
        for threads in [1usize, 2] {
            for mode in ["batched", "looped"] {
                // Two threads split the meta-batch (`parallel::meta_batch`), each running
                // one-thread kernels.
                let a = ["omniglot", mode, &it.to_string(), &wu.to_string(), "16"]
                    .map(String::from)
                    .into_iter()
                    .chain(std::iter::once(threads.to_string()))
                    .collect::<Vec<_>>();
                if let Some(o) = run_ours(launches, threads, &a) {
                    rows.push(Row {
                        workload: "omniglot_cnn",
                        variant: format!("ours-{mode}"),
                        inner_steps: 5,
                        threads,
                        seconds: o[0],
                        peak_rss_mib: o[1],
                    });
                }
            }
        }
        let slow = args.iter().any(|a| a == "--slow-anchors");
        let variants = OMNIGLOT_ANCHORS
            .iter()
            .chain(OMNIGLOT_SLOW_ANCHORS.iter().filter(|_| slow));
        for variant in variants.filter(|_| anchors) {
            let script_args = [
                "--variant",
                variant,
                "--meta-batch",
                "16",
                "--iters",
                &it.to_string(),
                "--warmup",
                &wu.to_string(),
                "--threads",
                "1",
            ]
            .map(String::from);
            let n = if *variant == CLOSE_OMNIGLOT_ANCHOR {
                launches
            } else {
                1
            };
            if let Some((t, rss)) =
                run_anchor_launches(n, "bench_omniglot_conv.py", &script_args, 1)
            {
                rows.push(Row {
                    workload: "omniglot_cnn",
                    variant: variant.to_string(),
                    inner_steps: 5,
                    threads: 1,
                    seconds: t,
                    peak_rss_mib: rss,
                });
            }
        }
    }
    if !rows.is_empty() {
        print_table(&rows);
        write_json(&rows);
    }
    if wants("scaling") {
        split_scaling(launches, quick);
    }
    if wants("unroll") {
        if let Some(o) = run_worker(1, &["unroll".to_string(), "1000".to_string()]) {
            println!(
                "| inner step near step 1 vs near step 1000 (1-40-40-1, graph kept) | {:.1} us vs {:.1} us | ratio {:.2} |",
                o[0] * 1e6,
                o[1] * 1e6,
                o[1] / o[0]
            );
            println!(
                "| memory per unrolled step (graph kept) | {:.3} MiB | - |",
                o[2]
            );
            println!(
                "| memory growth over 1000 test-mode steps | {:.2} MiB | - |",
                o[3]
            );
        }
    }
}

/// Meta-batch sizes of the two-thread scaling table.
const SCALING_TASKS: [usize; 6] = [1, 13, 25, 50, 100, 200];

/// MAML sine at one inner step, task-batched, on one thread and on two threads that split
/// the meta-batch, for each of `SCALING_TASKS`: the speed-up of the split, and the fixed
/// cost per block `F` and cost per task `w` of a least-squares line through the one-thread
/// times up to 50 tasks (`t = F + w T`), which bound what a split can gain: the larger of
/// two blocks takes at least `F + w ceil(T/2)`; and the same at 25 tasks beside a busy
/// thread. Printed, and written to `target/bench-results/maml-scaling.json`.
fn split_scaling(launches: usize, quick: bool) {
    let time = |tasks: usize, threads: usize| {
        // About a quarter of a second of meta-iterations per launch.
        let iters = if quick {
            20
        } else {
            (60_000 / (tasks + 10)).clamp(60, 2000)
        };
        let a = ["sine", "batched", "1", &iters.to_string(), "20"]
            .map(String::from)
            .into_iter()
            .chain([threads.to_string(), tasks.to_string()])
            .collect::<Vec<_>>();
        run_ours(launches, threads, &a).map(|o| o[0])
    };
    let mut points: Vec<(usize, f64, f64)> = Vec::new();
    for tasks in SCALING_TASKS {
        if let (Some(one), Some(two)) = (time(tasks, 1), time(tasks, 2)) {
            points.push((tasks, one, two));
        }
    }
    // The same at 25 tasks with a thread of this process busy beside the workers: the cores
    // are oversubscribed, as on a machine running other work.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        })
    };
    let beside_busy = (time(META_BATCH, 1), time(META_BATCH, 2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = busy.join();
    if points.len() < 2 {
        return;
    }
    // The line is fitted where the target lies (up to twice the benchmark's meta-batch):
    // larger batches leave the caches, and their cost per task grows.
    let fitted: Vec<_> = points.iter().filter(|p| p.0 <= 2 * META_BATCH).collect();
    let n = fitted.len() as f64;
    let mean_t = fitted.iter().map(|p| p.0 as f64).sum::<f64>() / n;
    let mean_s = fitted.iter().map(|p| p.1).sum::<f64>() / n;
    let (sxy, sxx) = fitted.iter().fold((0.0, 0.0), |(sxy, sxx), p| {
        let dx = p.0 as f64 - mean_t;
        (sxy + dx * (p.1 - mean_s), sxx + dx * dx)
    });
    let w = sxy / sxx;
    let f = mean_s - w * mean_t;
    println!(
        "MAML sine, 1 step, batched: two threads that split the meta-batch against one \
         (one-thread fit up to 50 tasks: F = {:.4} ms per block, w = {:.5} ms per task)",
        f * 1e3,
        w * 1e3
    );
    println!("| tasks | one thread (ms) | two threads (ms) | speed-up | model: one thread / (F + w ceil(T/2)) |");
    println!("|---|---|---|---|---|");
    for &(tasks, one, two) in &points {
        let bound = one / (f + w * tasks.div_ceil(2) as f64).max(one / 2.0);
        println!(
            "| {tasks} | {:.4} | {:.4} | {:.2}x | {:.2}x |",
            one * 1e3,
            two * 1e3,
            one / two,
            bound
        );
    }
    if let (Some(one), Some(two)) = beside_busy {
        println!(
            "| {META_BATCH}, beside a busy thread | {:.4} | {:.4} | {:.2}x | - |",
            one * 1e3,
            two * 1e3,
            one / two
        );
    }
    let values: Vec<serde_json::Value> = points
        .iter()
        .map(|&(tasks, one, two)| {
            serde_json::json!({
                "workload": "maml_sine",
                "variant": "ours-batched",
                "inner_steps": 1,
                "tasks": tasks,
                "seconds_one_thread": one,
                "seconds_two_threads": two,
            })
        })
        .collect();
    write_results(
        "maml-scaling.json",
        &serde_json::json!({
            "fixed_seconds_per_block": f,
            "seconds_per_task": w,
            "rows": values,
            "beside_a_busy_thread": {
                "tasks": META_BATCH,
                "seconds_one_thread": beside_busy.0,
                "seconds_two_threads": beside_busy.1,
            },
        }),
    );
}

/// One line per (workload, inner steps, threads): each variant's seconds per
/// meta-iteration and peak RSS, with its time as a multiple of `ours-batched`'s (above 1:
/// slower than ours-batched).
fn print_table(rows: &[Row]) {
    let mut variants: Vec<&str> = vec!["ours-batched", "ours-looped"];
    for r in rows {
        if !variants.contains(&r.variant.as_str()) {
            variants.push(&r.variant);
        }
    }
    println!("seconds per meta-iteration (median), x = time / ours-batched's, peak RSS in MiB");
    println!("| workload | steps | threads | {} |", variants.join(" | "));
    println!("|---|---|---|{}", "---|".repeat(variants.len()));
    let mut keys: Vec<(&str, usize, usize)> = Vec::new();
    for r in rows {
        let k = (r.workload, r.inner_steps, r.threads);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    for (workload, steps, threads) in keys {
        let find = |v: &str| {
            rows.iter().find(|r| {
                r.workload == workload
                    && r.inner_steps == steps
                    && r.threads == threads
                    && r.variant == v
            })
        };
        let base = find("ours-batched").map(|r| r.seconds);
        let cells: Vec<String> = variants
            .iter()
            .map(|v| match (find(v), base) {
                (Some(r), Some(b)) => format!(
                    "{:.5} ({:.2}x, {:.0} MiB)",
                    r.seconds,
                    r.seconds / b,
                    r.peak_rss_mib
                ),
                (Some(r), None) => format!("{:.5} ({:.0} MiB)", r.seconds, r.peak_rss_mib),
                (None, _) => "-".to_string(),
            })
            .collect();
        println!(
            "| {workload} | {steps} | {threads} | {} |",
            cells.join(" | ")
        );
    }
}

/// Writes the rows to `target/bench-results/maml.json`.
fn write_json(rows: &[Row]) {
    let values: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "workload": r.workload,
                "variant": r.variant,
                "inner_steps": r.inner_steps,
                "threads": r.threads,
                "seconds": r.seconds,
                "peak_rss_mib": r.peak_rss_mib,
            })
        })
        .collect();
    write_results("maml.json", &serde_json::Value::Array(values));
}

/// Writes `value` to `target/bench-results/<name>`.
fn write_results(name: &str, value: &serde_json::Value) {
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/target/bench-results"));
    let written = std::fs::create_dir_all(dir).and_then(|()| {
        let text = serde_json::to_string_pretty(value).unwrap_or_default();
        std::fs::write(dir.join(name), text)
    });
    match written {
        Ok(()) => println!("(wrote {})", dir.join(name).display()),
        Err(e) => eprintln!("could not write {name}: {e}"),
    }
}
