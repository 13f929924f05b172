//! Meta-batches on several threads: [`meta_batch`] runs the tasks of a meta-batch (each
//! looped, or a task-batched chunk) on a few threads and sums their gradient stores in task
//! order, so the result is bit-identical whatever the thread count.

use std::sync::{Arc, Mutex};

use crate::autograd::GradStore;
use crate::error::{Error, Result};
use crate::tensor::anomaly::{is_anomaly_enabled, set_anomaly};
use crate::tensor::{is_grad_enabled, NoGradGuard};

/// The worker pools [`meta_batch`] has built, one per size, kept for the whole process: a
/// thread spawned per call starts with a cold allocator heap and a cold cache (measured:
/// looped MAML sine, 1 step, took 1.51 ms on two freshly spawned threads against 1.48 ms
/// on one).
static POOLS: Mutex<Vec<(usize, Arc<rayon::ThreadPool>)>> = Mutex::new(Vec::new());

/// The pool of `size` worker threads, built at its first use.
fn pool(size: usize) -> Result<Arc<rayon::ThreadPool>> {
    let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = pools.iter().find(|(n, _)| *n == size) {
        return Ok(p.clone());
    }
    let built = rayon::ThreadPoolBuilder::new()
        .num_threads(size)
        .thread_name(|i| format!("candle-higher-meta-batch-{i}"))
        .build()
        .map_err(|e| Error::InvalidArgument {
            op: "meta_batch",
            message: format!("could not start {size} worker threads: {e}"),
        })?;
    let p = Arc::new(built);
    pools.push((size, p.clone()));
    Ok(p)
}

/// How the per-task gradient stores are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Combine {
    /// Their sum.
    #[default]
    Sum,
    /// Their sum divided by the number of tasks.
    Mean,
}

/// Runs `task(i)` for every `i` in `0..tasks` on `threads` threads (tasks are dealt out in
/// contiguous blocks) and combines the returned stores, always adding them in task order:
/// the result does not depend on `threads`. Each task builds its own graph (tensors are
/// `Send + Sync`, grad mode is per thread); `task` typically runs one inner loop from the
/// shared base model and returns `backward(&meta_loss)`. The first error (by task index)
/// is returned. The calling thread runs the first block (with `threads = 1`, everything),
/// the pool's threads the others, each under the caller's grad mode and anomaly detection.
///
/// Keep the CPU kernels single-threaded while tasks run in parallel, or the threads
/// compete for the cores: `set_cpu_threads(1)` for the library's own, and
/// `RAYON_NUM_THREADS=1` in the environment for candle's elementwise kernels, whose pool
/// is sized once at its first use, from the core count when the variable is unset (the
/// Omniglot CNN on two threads took 1.40-1.53 s per meta-iteration without it, 0.82-0.93 s
/// with it).
///
/// ```
/// # use candle_higher_runtime::{backward, Tensor, parallel::{meta_batch, Combine}};
/// let w = Tensor::scalar(2.0f64).to_leaf();
/// let grads = meta_batch(4, 2, Combine::Mean, |i| {
///     backward(&w.mul(&w)?.mul(i as f64)?) // d/dw = 2 i w
/// })?;
/// assert_eq!(grads.get(&w).unwrap().to_scalar_f64()?, (0.0 + 4.0 + 8.0 + 12.0) / 4.0);
/// # Ok::<(), candle_higher_runtime::Error>(())
/// ```
pub fn meta_batch(
    tasks: usize,
    threads: usize,
    combine: Combine,
    task: impl Fn(usize) -> Result<GradStore> + Sync,
) -> Result<GradStore> {
    if threads == 0 {
        return Err(Error::InvalidArgument {
            op: "meta_batch",
            message: "0 threads; give at least 1".into(),
        });
    }
    let threads = threads.min(tasks.max(1));
    let mut stores: Vec<Result<GradStore>> = Vec::with_capacity(tasks);
    if threads == 1 {
        stores.extend((0..tasks).map(&task));
    } else {
        let per = tasks.div_ceil(threads);
        let task = &task;
        // Every block runs under the caller's grad and anomaly modes, as with one thread.
        let (grad, anomaly) = (is_grad_enabled(), is_anomaly_enabled());
        // A task that panics is an error of its block, not a panic of the caller.
        let block = move |b: usize| -> Vec<Result<GradStore>> {
            let _modes = (NoGradGuard::set(grad), set_anomaly(anomaly));
            let run = || (b * per..((b + 1) * per).min(tasks)).map(task).collect();
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).unwrap_or_else(|_| {
                vec![Err(Error::InvalidArgument {
                    op: "meta_batch",
                    message: format!("a task of block {b} panicked"),
                })]
            })
        };
        let mut blocks: Vec<Vec<Result<GradStore>>> = (0..threads).map(|_| Vec::new()).collect();
        // The caller runs the first block; the others run on the pool's warm threads.
        let (first, rest) = blocks.split_at_mut(1);
        pool(threads - 1)?.in_place_scope(|s| {
            for (i, out) in rest.iter_mut().enumerate() {
                s.spawn(move |_| *out = block(i + 1));
            }
            first[0] = block(0);
        });
        stores.extend(blocks.into_iter().flatten());
    }
    let mut total = GradStore::default();
    for store in stores {
        total.accumulate(&store?)?;
    }
    if combine == Combine::Mean && tasks > 0 {
        total.scale(1.0 / tasks as f64)?;
    }
    Ok(total)
}
