//! Few-shot image classification with second-order MAML and the MAML-Omniglot CNN, with
//! BatchNorm in the inner loop (higher's `examples/maml-omniglot.py`).
//!
//! Net: 3 x [Conv2d(., 64, 3x3), BatchNorm2d(64, momentum 1), ReLU, MaxPool2d(2)], Flatten,
//! Linear(64, ways); BatchNorm always normalises with the batch's statistics, as in
//! higher's example. N-way K-shot tasks with 15 query images per class, 5 inner SGD steps
//! at lr 0.1 (second order), meta-optimizer Adam 1e-3, f32.
//!
//! Data: by default synthetic 28x28 tasks made here (no download): each class is a
//! prototype image ~ U[0, 1] and its samples are the prototype + 0.3 N(0, 1) noise (as
//! `../shared/anchors/bench_omniglot_conv.py`). With `--omniglot PATH`, real Omniglot: PATH
//! is the unpacked dataset folder (every folder below it that holds PNGs is a character, as
//! in `images_background/<alphabet>/<character>/*.png` and `images_evaluation`; drawings are
//! read as grayscale and resized to 28x28), or the `omniglot.npy` that higher's example
//! (`support/omniglot_loaders.py`) writes, `[characters, 20, (1,) 28, 28]` of f64, f32 or u8.
//! The first 1200 characters train and the rest test, as there.
//!
//! Prints the query accuracy (after adaptation, on the training tasks) as it trains, then
//! the accuracy on held-out tasks before and after meta-training. The default run is short
//! (30 meta-iterations, meta-batch 4, about a minute on one core); longer runs learn more.
//!
//! The tasks of a meta-batch are adapted at once in one task-batched inner loop
//! (`InnerloopOptions::tasks`: conv kernels `[B, 64, C, 3, 3]`, batch-norm statistics per
//! task, images `[B, N, 1, 28, 28]`), in chunks of `--chunk C` tasks (default 4: all tasks
//! of a chunk hold their graphs at once, about 0.4 GB each here); `--looped` adapts them one
//! by one instead.
//!
//! With the `mpi` feature, `mpirun -np N` runs it on N processes: each adapts its share of
//! the meta-batch, the meta-gradients are summed (`distributed::all_reduce_grads`), every
//! rank takes the same outer step, and rank 0 evaluates and prints.
//!
//! `cargo run --release --example maml_fewshot -- [--iters N] [--meta-batch B] [--ways N]
//! [--shots K] [--eval-tasks T] [--omniglot PATH] [--chunk C] [--looped]`

use candle_higher::distributed::{self, task_share};
use candle_higher::nn::{
    batch_norm2d, conv2d, cross_entropy, cross_entropy_per_task, flatten, linear, max_pool2d, seq,
    Activation, BatchNormConfig, ConvConfig, Parameters, Sequential, VarBuilder,
};
use candle_higher::optim::{Adam, Optimizer, Sgd};
use candle_higher::{
    backward, innerloop, no_grad, DType, Error, GradStore, InitialWeights, InnerloopOptions,
    Result, Tensor,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

#[path = "common/args.rs"]
mod args;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const QUERIES: usize = 15;
const INNER_STEPS: usize = 5;
const INNER_LR: f64 = 0.1;
const PIXELS: usize = 28 * 28;

/// One task: support images and labels, query images and labels.
struct Task {
    xs: Tensor,
    ys: Tensor,
    xq: Tensor,
    yq: Tensor,
}

/// Where tasks come from.
enum Source {
    /// Fresh random prototypes for every task.
    Synthetic,
    /// Omniglot characters: `[character][drawing]` images of 784 pixels.
    Omniglot {
        train: Vec<Vec<Vec<f32>>>,
        test: Vec<Vec<Vec<f32>>>,
    },
}

impl Source {
    /// An N-way K-shot task; `test` picks held-out characters (Omniglot) .
    fn task(&self, rng: &mut StdRng, ways: usize, shots: usize, test: bool) -> Result<Task> {
        let (mut xs, mut xq) = (Vec::new(), Vec::new());
        match self {
            Source::Synthetic => {
                let noise = |rng: &mut StdRng| {
                    let (u1, u2): (f32, f32) = (1.0 - rng.gen::<f32>(), rng.gen());
                    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
                };
                for _ in 0..ways {
                    let proto: Vec<f32> = (0..PIXELS).map(|_| rng.gen::<f32>()).collect();
                    for (n, out) in [(shots, &mut xs), (QUERIES, &mut xq)] {
                        for _ in 0..n {
                            out.extend(proto.iter().map(|&p| p + 0.3 * noise(rng)));
                        }
                    }
                }
            }
            Source::Omniglot {
                train,
                test: held_out,
            } => {
                let chars = if test { held_out } else { train };
                for &c in rand::seq::index::sample(rng, chars.len(), ways)
                    .iter()
                    .collect::<Vec<_>>()
                    .iter()
                {
                    let mut drawings: Vec<&Vec<f32>> = chars[c].iter().collect();
                    drawings.shuffle(rng);
                    if drawings.len() < shots + QUERIES {
                        return Err(Error::InvalidArgument {
                            op: "maml_fewshot",
                            message: format!(
                                "a character has {} drawings; {shots} shots + {QUERIES} queries need more",
                                drawings.len()
                            ),
                        });
                    }
                    for d in &drawings[..shots] {
                        xs.extend_from_slice(d);
                    }
                    for d in &drawings[shots..shots + QUERIES] {
                        xq.extend_from_slice(d);
                    }
                }
            }
        }
        let labels = |n: usize| -> Vec<u32> {
            (0..ways as u32)
                .flat_map(|c| std::iter::repeat_n(c, n))
                .collect()
        };
        let dev = &candle_higher::device_from_env()?;
        Ok(Task {
            xs: Tensor::from_vec(xs, &[ways * shots, 1, 28, 28], dev)?,
            ys: Tensor::from_vec(labels(shots), &[ways * shots], dev)?,
            xq: Tensor::from_vec(xq, &[ways * QUERIES, 1, 28, 28], dev)?,
            yq: Tensor::from_vec(labels(QUERIES), &[ways * QUERIES], dev)?,
        })
    }
}

/// Omniglot's characters as `[character][drawing]` images of 784 pixels in [0, 1]: from a
/// folder of PNGs, or from the `omniglot.npy` of higher's loader.
fn omniglot(path: &str) -> std::result::Result<Source, String> {
    let mut chars = if std::path::Path::new(path).is_dir() {
        read_png_folder(path)?
    } else {
        read_npy(path)?
    };
    if chars.is_empty() {
        return Err(format!("{path}: no characters found"));
    }
    let test = chars.split_off(1200.min(chars.len() * 3 / 4));
    println!(
        "Omniglot: {} training and {} test characters, {} drawings each",
        chars.len(),
        test.len(),
        chars[0].len()
    );
    Ok(Source::Omniglot { train: chars, test })
}

/// Every folder below `root` that holds PNGs is one character (Omniglot's
/// `images_*/<alphabet>/<character>/*.png`), in sorted path order; each drawing is read as
/// grayscale and resized to 28x28, as higher's loader does.
fn read_png_folder(root: &str) -> std::result::Result<Vec<Vec<Vec<f32>>>, String> {
    let mut dirs = vec![std::path::PathBuf::from(root)];
    let mut chars = Vec::new();
    while let Some(dir) = dirs.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        let pngs: Vec<_> = entries
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")))
            .collect();
        if !pngs.is_empty() {
            let drawings = pngs
                .iter()
                .map(|p| {
                    let img = image::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
                    let small = image::imageops::resize(
                        &img.to_luma8(),
                        28,
                        28,
                        image::imageops::FilterType::CatmullRom,
                    );
                    Ok(small
                        .pixels()
                        .map(|px| f32::from(px.0[0]) / 255.0)
                        .collect())
                })
                .collect::<std::result::Result<Vec<Vec<f32>>, String>>()?;
            chars.push((dir.clone(), drawings));
        }
        dirs.extend(entries.into_iter().filter(|p| p.is_dir()).rev());
    }
    chars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(chars.into_iter().map(|(_, d)| d).collect())
}

/// `omniglot.npy`: `[characters, drawings, (1,) 28, 28]` of f64, f32 or u8 (u8 / 255).
fn read_npy(path: &str) -> std::result::Result<Vec<Vec<Vec<f32>>>, String> {
    let err = |e: candle_core::Error| format!("{path}: {e}");
    let t = candle_core::Tensor::read_npy(path).map_err(err)?;
    let scale = if t.dtype() == DType::U8 {
        1.0 / 255.0
    } else {
        1.0
    };
    let shape = t.dims().to_vec();
    let per_image: usize = shape.iter().skip(2).product();
    if shape.len() < 4 || per_image != PIXELS {
        return Err(format!(
            "{path}: shape {shape:?}, expected [characters, drawings, (1,) 28, 28]"
        ));
    }
    let values = t
        .to_dtype(DType::F32)
        .and_then(|t| t.affine(scale, 0.0))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(err)?;
    Ok(values
        .chunks_exact(shape[1] * PIXELS)
        .map(|c| c.chunks_exact(PIXELS).map(<[f32]>::to_vec).collect())
        .collect())
}

fn cnn(ways: usize) -> Result<Sequential> {
    let vb = VarBuilder::new(0, DType::F32, &candle_higher::device_from_env()?);
    let mut net = seq();
    for (i, c_in) in [1usize, 64, 64].into_iter().enumerate() {
        let bn = BatchNormConfig {
            momentum: 1.0,
            ..Default::default()
        };
        net = net
            .add(conv2d(c_in, 64, 3, ConvConfig::default(), vb.pp(4 * i))?)
            .add(batch_norm2d(64, bn, vb.pp(4 * i + 1))?)
            .add(Activation::Relu)
            .add(max_pool2d(2));
    }
    Ok(net.add(flatten()).add(linear(64, ways, vb.pp(13))?))
}

/// The fraction of rows of `logits` whose largest entry is at the label.
fn accuracy(logits: &Tensor, labels: &Tensor) -> Result<f64> {
    let classes = logits.dims()[1];
    let values = logits.to_vec_f64()?;
    let labels = labels.to_vec_f64()?;
    let hits = values
        .chunks_exact(classes)
        .zip(&labels)
        .filter(|(row, &label)| {
            let best = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i);
            best as f64 == label
        })
        .count();
    Ok(hits as f64 / labels.len() as f64)
}

/// Adapts `model` to `task` with 5 SGD steps; returns the query logits. With `track`,
/// the steps start from the model's own parameters and are differentiable (MAML);
/// without (evaluation), no graph is kept.
fn adapt(
    model: &Sequential,
    inner_opt: &Optimizer<Sgd>,
    task: &Task,
    track: bool,
) -> Result<Tensor> {
    let options = InnerloopOptions::new()
        .initial_weights(InitialWeights::BaseParameters)
        .track_higher_grads(track);
    let (mut fmodel, mut diffopt) = innerloop(model, inner_opt, options)?;
    for _ in 0..INNER_STEPS {
        let loss = cross_entropy(&fmodel.forward(&task.xs)?, &task.ys)?;
        diffopt.step(&mut fmodel, &loss)?;
    }
    if track {
        fmodel.forward(&task.xq)
    } else {
        let _guard = no_grad();
        fmodel.forward(&task.xq)
    }
}

/// Adapts `model` to all `tasks` at once (second order, from the model's own parameters):
/// returns the query logits `[T, N, ways]` and labels `[T, N]`.
fn adapt_batched(
    model: &Sequential,
    inner_opt: &Optimizer<Sgd>,
    tasks: &[Task],
) -> Result<(Tensor, Tensor)> {
    let stack = |f: fn(&Task) -> &Tensor| {
        let parts: Vec<Tensor> = tasks.iter().map(|t| f(t).clone()).collect();
        Tensor::stack(&parts, 0)
    };
    let (xs, ys) = (stack(|t| &t.xs)?, stack(|t| &t.ys)?);
    let (xq, yq) = (stack(|t| &t.xq)?, stack(|t| &t.yq)?);
    let options = InnerloopOptions::new()
        .initial_weights(InitialWeights::BaseParameters)
        .tasks(tasks.len());
    let (mut fmodel, mut diffopt) = innerloop(model, inner_opt, options)?;
    for _ in 0..INNER_STEPS {
        // The sum of the per-task losses: each task's gradient is its own.
        let loss = cross_entropy_per_task(&fmodel.forward(&xs)?, &ys)?.sum_all()?;
        diffopt.step(&mut fmodel, &loss)?;
    }
    Ok((fmodel.forward(&xq)?, yq))
}

/// Mean query accuracy on `tasks` (held-out tasks, no meta-gradient).
fn evaluate(model: &Sequential, inner_opt: &Optimizer<Sgd>, tasks: &[Task]) -> Result<f64> {
    let mut total = 0.0;
    for task in tasks {
        total += accuracy(&adapt(model, inner_opt, task, false)?, &task.yq)?;
    }
    Ok(total / tasks.len() as f64)
}

fn main() -> Result<()> {
    let args = args::Args::parse(
        &[
            "iters",
            "meta-batch",
            "ways",
            "shots",
            "eval-tasks",
            "chunk",
            "omniglot",
        ],
        &["looped"],
    )?;
    let iters = args.get("iters", 30)?;
    let meta_batch = args.get("meta-batch", 4)?;
    let ways = args.get("ways", 5)?;
    let shots = args.get("shots", 1)?;
    let eval_tasks = args.get("eval-tasks", 20)?;
    let looped = args.has("looped");
    let chunk = args.get("chunk", 4usize)?.max(1);
    let source = match args.get_opt::<String>("omniglot")? {
        Some(path) => omniglot(&path).map_err(|message| Error::InvalidArgument {
            op: "maml_fewshot --omniglot",
            message,
        })?,
        None => Source::Synthetic,
    };
    if let Source::Omniglot { train, test } = &source {
        let fewest = train.len().min(test.len());
        if fewest < ways {
            return Err(Error::InvalidArgument {
                op: "maml_fewshot --omniglot",
                message: format!(
                    "{ways}-way tasks need {ways} characters per split; a split has {fewest}"
                ),
            });
        }
    }

    let mut model = cnn(ways)?;
    let n_params = model.parameters()?.len();
    let mut meta_opt = Optimizer::new(Adam::new(1e-3), n_params)?;
    let inner_opt = Optimizer::new(Sgd::new(INNER_LR), n_params)?;
    // The processes of `mpirun -np N` (feature `mpi`), or this one alone: every rank samples
    // the same tasks (same seed) and adapts its own contiguous share of them; rank 0 prints.
    let comm = distributed::world()?;
    let (rank, ranks) = (comm.rank(), comm.size());
    let share = task_share(meta_batch, rank, ranks);
    if ranks > 1 {
        distributed::broadcast_model(&*comm, &mut model)?; // rank 0's initial weights
    }
    let say = |line: String| {
        if rank == 0 {
            println!("{line}");
        }
    };
    let mut rng = StdRng::seed_from_u64(1);
    let mut eval_rng = StdRng::seed_from_u64(2);
    let eval: Vec<Task> = (0..eval_tasks)
        .map(|_| source.task(&mut eval_rng, ways, shots, true))
        .collect::<Result<_>>()?;

    say(format!(
        "MAML, {ways}-way {shots}-shot, {QUERIES} queries per class, {INNER_STEPS} inner SGD steps at lr {INNER_LR}, meta-batch {meta_batch} ({}{}), Adam 1e-3; {} data",
        if looped { "tasks looped" } else { "tasks batched" },
        if ranks > 1 { format!(", {ranks} ranks") } else { String::new() },
        if matches!(source, Source::Synthetic) { "synthetic" } else { "Omniglot" }
    ));
    let started = std::time::Instant::now();
    let before = if rank == 0 {
        evaluate(&model, &inner_opt, &eval)?
    } else {
        0.0
    };
    say(format!(
        "held-out accuracy after adaptation, before meta-training: {:.1}% ({eval_tasks} tasks)",
        100.0 * before
    ));
    say("iteration | query loss | query accuracy (training tasks, after adaptation) | s".into());
    let report_every = (iters / 10).max(1);
    let (mut acc_sum, mut loss_sum, mut n) = (0.0, 0.0, 0);
    for it in 1..=iters {
        let tasks: Vec<Task> = (0..meta_batch)
            .map(|_| source.task(&mut rng, ways, shots, false))
            .collect::<Result<_>>()?;
        let tasks = &tasks[share.clone()];
        let mut grads = GradStore::default();
        if looped {
            for task in tasks {
                let logits = adapt(&model, &inner_opt, task, true)?;
                let q = cross_entropy(&logits, &task.yq)?.affine(1.0 / meta_batch as f64, 0.0)?;
                loss_sum += q.to_scalar_f64()? * meta_batch as f64;
                acc_sum += accuracy(&logits, &task.yq)?;
                n += 1;
                grads.accumulate(&backward(&q)?)?;
            }
        } else {
            // Chunks of `chunk` tasks per task-batched loop: batching all of a large
            // meta-batch at once holds every task's graph together.
            for part in tasks.chunks(chunk) {
                let (logits, yq) = adapt_batched(&model, &inner_opt, part)?;
                // Summed over the chunk's tasks and divided by the meta-batch: over all
                // chunks, the mean of the per-task query losses, as the loop averages them.
                let q = cross_entropy_per_task(&logits, &yq)?
                    .sum_all()?
                    .affine(1.0 / meta_batch as f64, 0.0)?;
                loss_sum += q.to_scalar_f64()? * meta_batch as f64;
                // Every task has as many queries, so the accuracy over all of them is the
                // mean of the per-task accuracies.
                let rows = logits.dims()[0] * logits.dims()[1];
                acc_sum += accuracy(&logits.reshape(&[rows, ways])?, &yq.flatten_all()?)?
                    * part.len() as f64;
                n += part.len();
                grads.accumulate(&backward(&q)?)?;
            }
        }
        if ranks > 1 {
            grads = distributed::all_reduce_grads(&*comm, &model.parameters()?, &grads)?;
        }
        meta_opt.step_module(&mut model, &grads)?;
        if it % report_every == 0 || it == iters {
            let (mut loss, mut acc, mut count) = (loss_sum, acc_sum, n as f64);
            if ranks > 1 {
                let local =
                    Tensor::from_slice(&[loss, acc, count], &[3], &candle_higher::Device::Cpu)?;
                let sums = comm.all_reduce_sum(local.value())?.to_vec1::<f64>()?;
                (loss, acc, count) = (sums[0], sums[1], sums[2]);
            }
            say(format!(
                "{it:>9} | {:>10.3} | {:>6.1}% | {:.1}",
                loss / count,
                100.0 * acc / count,
                started.elapsed().as_secs_f64()
            ));
            (acc_sum, loss_sum, n) = (0.0, 0.0, 0);
        }
    }
    if rank != 0 {
        return Ok(());
    }
    let after = evaluate(&model, &inner_opt, &eval)?;
    println!(
        "held-out accuracy after adaptation: {:.1}% before meta-training, {:.1}% after {iters} meta-iterations ({:.1} s in all)",
        100.0 * before,
        100.0 * after,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
