//! MAML on sinusoid regression (Finn et al. 2017): second-order meta-learning of an
//! initialisation, compared at meta-test time with a model pretrained on all tasks.
//!
//! MLP 1-40-40-1 (ReLU); a task is y = A sin(x - phase), A in [0.1, 5], phase in [0, pi],
//! x in [-5, 5], K = 10 support points; inner loop: SGD lr 0.01; meta-batch 25; outer
//! optimizer Adam 1e-3. Defaults follow `../shared/anchors` (2000 meta-iterations, 1 inner
//! step), whose PyTorch + higher run reached a meta-test MSE of 0.81 / 0.45 / 0.37 after
//! 1 / 5 / 10 adaptation steps on 100 tasks.
//!
//! The 25 tasks of a meta-batch are adapted at once, in one task-batched inner loop
//! (`InnerloopOptions::tasks`: every fast weight `[25, ...]`, inputs `[25, K, 1]`, the
//! inner loss the sum of the per-task losses); `--looped` adapts them one by one instead,
//! with the same result up to rounding.
//!
//! The figure (`--plot`, default `maml_sine.png`; drawn by `common/plot.rs`) shows three
//! test tasks adapted by both models and the training curve with its moving average.
//!
//! With the `mpi` feature, `mpirun -np N` runs it on N processes: each computes its share of
//! the 25 tasks, the meta-gradients are summed (`distributed::all_reduce_grads`), every rank
//! takes the same outer step, and rank 0 prints and plots.
//!
//! `cargo run --release --example maml_sine -- [--iters N] [--inner-steps K] [--plot PATH] [--looped]`

use candle_higher::distributed::{self, task_share, Communicator};
use candle_higher::nn::{
    linear, mse, mse_per_task, seq, Activation, Module, Parameters, Sequential, VarBuilder,
};
use candle_higher::optim::{Adam, Optimizer, Sgd};
use candle_higher::{
    backward, innerloop, no_grad, DType, FunctionalModel, GradStore, InitialWeights,
    InnerloopOptions, Result, Tensor,
};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[path = "common/plot.rs"]
mod plot;

#[path = "common/args.rs"]
mod args;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const META_BATCH: usize = 25;
const K: usize = 10;
const INNER_LR: f64 = 0.01;

/// A sinusoid task: amplitude and phase.
#[derive(Clone, Copy)]
struct Task {
    amp: f64,
    phase: f64,
}

impl Task {
    fn sample(rng: &mut StdRng) -> Self {
        Task {
            amp: rng.gen_range(0.1..5.0),
            phase: rng.gen_range(0.0..std::f64::consts::PI),
        }
    }

    /// `n` points with x uniform on [-5, 5]: ([n, 1], [n, 1]).
    fn points(&self, n: usize, rng: &mut StdRng) -> Result<(Tensor, Tensor)> {
        let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-5.0f32..5.0)).collect();
        self.at(&x)
    }

    fn at(&self, x: &[f32]) -> Result<(Tensor, Tensor)> {
        let y: Vec<f32> = x
            .iter()
            .map(|&x| (self.amp * (f64::from(x) - self.phase).sin()) as f32)
            .collect();
        Ok((
            Tensor::from_slice(x, &[x.len(), 1], &candle_higher::device_from_env()?)?,
            Tensor::from_vec(y, &[x.len(), 1], &candle_higher::device_from_env()?)?,
        ))
    }
}

fn mlp(seed: u64) -> Result<Sequential> {
    let vb = VarBuilder::new(seed, DType::F32, &candle_higher::device_from_env()?);
    Ok(seq()
        .add(linear(1, 40, vb.pp("0"))?)
        .add(Activation::Relu)
        .add(linear(40, 40, vb.pp("2"))?)
        .add(Activation::Relu)
        .add(linear(40, 1, vb.pp("4"))?))
}

/// Adapts `model` to one task with `steps` SGD steps. With `track`, the steps are
/// differentiable and start from the model's own parameters, so the returned fmodel's
/// query loss has a meta-gradient with respect to them; without (test mode), nothing is
/// recorded.
fn adapt(
    model: &Sequential,
    xs: &Tensor,
    ys: &Tensor,
    steps: usize,
    track: bool,
) -> Result<FunctionalModel<Sequential>> {
    let inner_opt = Optimizer::new(Sgd::new(INNER_LR), model.parameters()?.len())?;
    let options = InnerloopOptions::new()
        .initial_weights(InitialWeights::BaseParameters)
        .track_higher_grads(track);
    let (mut fmodel, mut diffopt) = innerloop(model, &inner_opt, options)?;
    for _ in 0..steps {
        let loss = mse(&fmodel.forward(xs)?, ys)?;
        diffopt.step(&mut fmodel, &loss)?;
    }
    Ok(fmodel)
}

/// Adapts `model` to every task of a meta-batch at once: `xs`, `ys` are `[T, K, 1]`, the
/// fast weights `[T, ...]`, and the inner loss is the sum of the per-task losses, so that
/// each task's gradient is its own.
fn adapt_batched(
    model: &Sequential,
    xs: &Tensor,
    ys: &Tensor,
    steps: usize,
) -> Result<FunctionalModel<Sequential>> {
    let inner_opt = Optimizer::new(Sgd::new(INNER_LR), model.parameters()?.len())?;
    let options = InnerloopOptions::new()
        .initial_weights(InitialWeights::BaseParameters)
        .tasks(xs.dims()[0]);
    let (mut fmodel, mut diffopt) = innerloop(model, &inner_opt, options)?;
    for _ in 0..steps {
        let loss = mse_per_task(&fmodel.forward(xs)?, ys)?.sum_all()?;
        diffopt.step(&mut fmodel, &loss)?;
    }
    Ok(fmodel)
}

/// Mean query MSE over `tasks` after 0, 1, 5 and 10 adaptation steps (100 query points).
fn meta_test(
    model: &Sequential,
    tasks: &[(Task, Tensor, Tensor, Tensor, Tensor)],
) -> Result<[f64; 4]> {
    let mut out = [0.0; 4];
    for (i, steps) in [0usize, 1, 5, 10].into_iter().enumerate() {
        let mut total = 0.0;
        for (_, xs, ys, xq, yq) in tasks {
            let fmodel = adapt(model, xs, ys, steps, false)?;
            let _guard = no_grad();
            total += mse(&fmodel.forward(xq)?, yq)?.to_scalar_f64()?;
        }
        out[i] = total / tasks.len() as f64;
    }
    Ok(out)
}

fn main() -> Result<()> {
    let args = args::Args::parse(&["iters", "inner-steps", "plot"], &["looped"])?;
    let iters = args.get("iters", 2000)?;
    let looped = args.has("looped");
    let inner_steps = args.get("inner-steps", 1)?;
    let plot = args.get("plot", "maml_sine.png".to_string())?;

    let mut rng = StdRng::seed_from_u64(7);
    let mut model = mlp(0)?;
    let mut meta_opt = Optimizer::new(Adam::new(1e-3), model.parameters()?.len())?;
    let mut baseline = mlp(0)?;
    let mut base_opt = Optimizer::new(Adam::new(1e-3), baseline.parameters()?.len())?;
    // The processes of `mpirun -np N` (feature `mpi`), or this one alone. Every rank samples
    // the same tasks (same seed) and computes its own contiguous share of them.
    let comm = distributed::world()?;
    let (rank, ranks) = (comm.rank(), comm.size());
    if ranks > META_BATCH {
        return Err(candle_higher::Error::InvalidArgument {
            op: "maml_sine",
            message: format!(
                "{ranks} ranks for a meta-batch of {META_BATCH}: use at most {META_BATCH}"
            ),
        });
    }
    let share = task_share(META_BATCH, rank, ranks);
    // Of the meta-batch's mean losses, this rank's tasks make up this fraction.
    let fraction = share.len() as f64 / META_BATCH as f64;
    if ranks > 1 {
        // Rank 0's models on every rank (already equal here: same seed).
        distributed::broadcast_model(&*comm, &mut model)?;
        distributed::broadcast_model(&*comm, &mut baseline)?;
    }

    let bar = if rank == 0 {
        ProgressBar::new(iters as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} meta-iterations, {msg} [{elapsed}<{eta}]",
        )
        .expect("a valid template"),
    );
    let started = std::time::Instant::now();
    let mut curve = Vec::with_capacity(iters);
    for it in 0..iters {
        let tasks: Vec<Task> = (0..META_BATCH).map(|_| Task::sample(&mut rng)).collect();
        let mut meta_grads = GradStore::default();
        let mut base_grads = GradStore::default();
        let mut query_loss = 0.0;
        let mut sets = Vec::with_capacity(META_BATCH);
        for task in &tasks {
            let (xs, ys) = task.points(K, &mut rng)?;
            let (xq, yq) = task.points(K, &mut rng)?;
            sets.push([xs, ys, xq, yq]);
        }
        let sets = &sets[share.clone()];
        if looped {
            for [xs, ys, xq, yq] in sets {
                // MAML: the query loss after adaptation, differentiated through the inner loop.
                let fmodel = adapt(&model, xs, ys, inner_steps, true)?;
                let q = mse(&fmodel.forward(xq)?, yq)?.affine(1.0 / META_BATCH as f64, 0.0)?;
                query_loss += q.to_scalar_f64()?;
                meta_grads.accumulate(&backward(&q)?)?;
                // Baseline: plain regression on the same data, no inner loop.
                let b = mse(&baseline.forward(xq)?, yq)?.affine(1.0 / META_BATCH as f64, 0.0)?;
                base_grads.accumulate(&backward(&b)?)?;
            }
        } else {
            // The same, with the tasks stacked on a leading axis: [25, K, 1].
            let stack = |i: usize| {
                let parts: Vec<Tensor> = sets.iter().map(|s| s[i].clone()).collect();
                Tensor::stack(&parts, 0)
            };
            let (xs, ys, xq, yq) = (stack(0)?, stack(1)?, stack(2)?, stack(3)?);
            let fmodel = adapt_batched(&model, &xs, &ys, inner_steps)?;
            // The mean over tasks of the per-task query losses, as the loop averages them
            // (this rank's part of it: `fraction` is 1 in one process).
            let q = mse_per_task(&fmodel.forward(&xq)?, &yq)?
                .mean_all()?
                .affine(fraction, 0.0)?;
            query_loss = q.to_scalar_f64()?;
            meta_grads = backward(&q)?;
            // A plain model sees the stacked points as one batch of 25 K points: its mean
            // squared error is the mean of the per-task ones.
            let b = mse(&baseline.forward(&xq)?, &yq)?.affine(fraction, 0.0)?;
            base_grads = backward(&b)?;
        }
        if ranks > 1 {
            // Both models' gradients summed over the ranks in one call per dtype.
            let params: Vec<Tensor> = model
                .parameters()?
                .into_iter()
                .chain(baseline.parameters()?)
                .collect();
            let mut local = meta_grads;
            local.accumulate(&base_grads)?;
            let total = distributed::all_reduce_grads(&*comm, &params, &local)?;
            (meta_grads, base_grads) = (total.clone(), total);
        }
        meta_opt.step_module(&mut model, &meta_grads)?;
        base_opt.step_module(&mut baseline, &base_grads)?;
        curve.push(query_loss); // this rank's part; summed over the ranks below
        if it % 20 == 0 {
            let loss = sum_over_ranks(&*comm, &[query_loss])?[0];
            bar.set_message(format!("query MSE {loss:.3}"));
        }
        bar.inc(1);
    }
    bar.finish();
    let curve = sum_over_ranks(&*comm, &curve)?;
    if rank != 0 {
        return Ok(()); // rank 0 evaluates, prints and plots
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "trained {iters} meta-iterations ({inner_steps} inner step(s), meta-batch {META_BATCH}, {}{}) in {seconds:.1} s ({:.2} ms each, baseline included); final query MSE {:.3}",
        if looped { "tasks looped" } else { "tasks batched" },
        if ranks > 1 { format!(", {ranks} ranks") } else { String::new() },
        1e3 * seconds / iters as f64,
        curve.last().copied().unwrap_or(f64::NAN)
    );

    let mut test_rng = StdRng::seed_from_u64(999);
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let task = Task::sample(&mut test_rng);
            let (xs, ys) = task.points(K, &mut test_rng)?;
            let (xq, yq) = task.points(100, &mut test_rng)?;
            Ok((task, xs, ys, xq, yq))
        })
        .collect::<Result<_>>()?;
    let maml = meta_test(&model, &tasks)?;
    let base = meta_test(&baseline, &tasks)?;
    println!("meta-test on 100 new tasks, query MSE after k SGD steps (lr {INNER_LR}, K = {K}):");
    println!("| steps | MAML | pretrained baseline | PyTorch + higher anchor |");
    println!("|---|---|---|---|");
    for (i, (steps, anchor)) in [(0, "2.789"), (1, "0.813"), (5, "0.450"), (10, "0.374")]
        .iter()
        .enumerate()
    {
        println!("| {steps} | {:.3} | {:.3} | {anchor} |", maml[i], base[i]);
    }

    draw(&plot, &model, &baseline, &tasks[..3], &curve, inner_steps)?;
    println!("wrote {plot}: top, three test tasks (black: truth, blue: MAML after 10 steps, red: baseline after 10 steps, dots: the K support points); bottom, the training query MSE");
    Ok(())
}

/// The element-wise sum of `values` over the ranks (the values themselves in one process).
fn sum_over_ranks(comm: &dyn Communicator, values: &[f64]) -> Result<Vec<f64>> {
    if comm.size() == 1 {
        return Ok(values.to_vec());
    }
    let local = Tensor::from_slice(values, &[values.len()], &candle_higher::Device::Cpu)?;
    Ok(comm.all_reduce_sum(local.value())?.to_vec1::<f64>()?)
}

/// The figure: three test tasks adapted by both models, and the training curve.
fn draw(
    path: &str,
    model: &Sequential,
    baseline: &Sequential,
    tasks: &[(Task, Tensor, Tensor, Tensor, Tensor)],
    curve: &[f64],
    inner_steps: usize,
) -> Result<()> {
    let grid: Vec<f32> = (0..200).map(|i| -5.0 + 10.0 * i as f32 / 199.0).collect();
    let pairs = |x: &[f32], y: Vec<f64>| -> Vec<(f32, f32)> {
        x.iter().zip(y).map(|(&x, y)| (x, y as f32)).collect()
    };
    let mut panels = Vec::with_capacity(tasks.len());
    for (i, (task, xs, ys, _, _)) in tasks.iter().enumerate() {
        let (xg, yg) = task.at(&grid)?;
        let curve_of = |m: &Sequential| -> Result<Vec<(f32, f32)>> {
            let fmodel = adapt(m, xs, ys, 10, false)?;
            let _guard = no_grad();
            Ok(pairs(&grid, fmodel.forward(&xg)?.to_vec_f64()?))
        };
        let support_x: Vec<f32> = xs.to_vec_f64()?.iter().map(|&x| x as f32).collect();
        panels.push(plot::TaskPanel {
            caption: format!(
                "test task {}: y = {:.2} sin(x - {:.2})",
                i + 1,
                task.amp,
                task.phase
            ),
            truth: pairs(&grid, yg.to_vec_f64()?),
            maml: curve_of(model)?,
            baseline: curve_of(baseline)?,
            support: pairs(&support_x, ys.to_vec_f64()?),
        });
    }
    let curve_title = format!(
        "meta-training: {inner_steps} inner SGD step(s) per task, {META_BATCH} tasks per meta-batch"
    );
    let figure = plot::Figure {
        title: "MAML on sinusoid regression: new tasks after 10 SGD steps on K = 10 points",
        curve_title: &curve_title,
        maml_label: "MAML, after 10 steps",
        baseline_label: "pretrained baseline, after 10 steps",
        support_label: "support points (K = 10)",
        panels: &panels,
        curve,
        curve_label: "query MSE after adaptation (meta-batch mean)",
        window: 50,
    };
    plot::draw(path, &figure).map_err(|e| candle_higher::Error::InvalidArgument {
        op: "plot",
        message: e.to_string(),
    })
}
