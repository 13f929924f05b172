//! Meta-batches on several threads: [`meta_batch`] runs the tasks of a meta-batch (each
//! looped, or a task-batched chunk) on a few threads and sums their gradient stores in task
//! order, so the result is bit-identical whatever the thread count.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::autograd::GradStore;
use crate::error::{Error, Result};
use crate::nn::{task_batch, task_scope};
use crate::tensor::anomaly::{is_anomaly_enabled, set_anomaly};
use crate::tensor::{is_grad_enabled, NoGradGuard};

/// How long the pool's threads, and a caller waiting for them, spin before they sleep. A
/// thread that sleeps between meta-iterations (an outer step apart) takes 30-40 us to wake
/// and then runs its block slower (measured on a 2-vCPU VM: two threads of meta_batch gained
/// 1.0-1.2x on MAML sine where two independent training loops on two threads lost nothing).
/// The same trade as OpenMP's spin-wait time (Intel's default is 200 ms): a core stays busy
/// for at most this long after the last meta-batch.
const KEEP_WARM: Duration = Duration::from_millis(2);

/// The most threads one meta-batch runs on; a larger `threads` is clamped to it. Every
/// thread runs its block on a core of its own and spins while it waits, so threads beyond
/// the cores only slow the others, and since the result does not depend on the count,
/// clamping changes no result. A fixed number rather than the machine's core count, so
/// that a program splits its tasks the same way on every machine and a test of 4 threads
/// runs 4 on a 2-core runner; 256 is above the core count of the machines this runs on.
pub const MAX_THREADS: usize = 256;

/// A pool of worker threads and the count of meta-batches started on it, which tells a
/// worker spinning between meta-batches that the next one has begun. Dropping it (when
/// [`meta_batch`] has replaced it and no caller still runs on it) stops and joins its
/// threads.
struct Pool {
    /// `None` only while the pool is dropped.
    threads: Option<rayon::ThreadPool>,
    /// How many worker threads it has.
    size: usize,
    started: Arc<AtomicU64>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl Pool {
    /// A pool of `size` worker threads.
    fn build(size: usize) -> Result<Pool> {
        let mut handles = Vec::with_capacity(size);
        let built = rayon::ThreadPoolBuilder::new()
            .num_threads(size)
            .thread_name(|i| format!("candle-higher-meta-batch-{i}"))
            .spawn_handler(|thread| {
                let mut b = std::thread::Builder::new();
                if let Some(name) = thread.name() {
                    b = b.name(name.to_string());
                }
                handles.push(b.spawn(move || thread.run())?);
                Ok(())
            })
            .build();
        match built {
            Ok(threads) => Ok(Pool {
                threads: Some(threads),
                size,
                started: Arc::new(AtomicU64::new(0)),
                handles,
            }),
            Err(e) => {
                // rayon has told the threads it started to stop.
                for h in handles {
                    let _ = h.join();
                }
                Err(Error::InvalidArgument {
                    op: "meta_batch",
                    message: format!("could not start {size} worker threads: {e}"),
                })
            }
        }
    }

    fn threads(&self) -> &rayon::ThreadPool {
        self.threads
            .as_ref()
            .expect("a pool has its threads until it is dropped")
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Ends the workers' spinning now rather than after KEEP_WARM.
        self.started.fetch_add(1, Ordering::AcqRel);
        let on_own_worker = self
            .threads
            .as_ref()
            .is_some_and(|t| t.current_thread_index().is_some());
        // Dropping rayon's pool tells its threads to stop once their queued work is done.
        drop(self.threads.take());
        // A thread cannot join itself; the pool's threads hold no reference to it, so this
        // only guards against a future change, and the threads still stop on their own.
        if !on_own_worker {
            for h in self.handles.drain(..) {
                let _ = h.join();
            }
        }
    }
}

/// The worker pool [`meta_batch`] last used. Only one is kept: a training loop calls with
/// the same thread count every time and keeps its warm threads (a thread spawned per call
/// starts with a cold allocator heap and a cold cache; measured: looped MAML sine, 1 step,
/// took 1.51 ms on two freshly spawned threads against 1.48 ms on one), while a sweep over
/// thread counts keeps the threads of its latest count only, as a resized OpenMP team or
/// `torch.set_num_threads` does. A caller still running on a replaced pool holds it (an
/// `Arc`) until it returns.
static POOL: Mutex<Option<Arc<Pool>>> = Mutex::new(None);

/// A pool of at least `need` and at most `most` worker threads: the last one if it fits,
/// otherwise a new one of `need` threads that replaces it.
fn pool(need: usize, most: usize) -> Result<Arc<Pool>> {
    let mut slot = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = slot.as_ref().filter(|p| (need..=most).contains(&p.size)) {
        return Ok(p.clone());
    }
    let built = Arc::new(Pool::build(need)?);
    let old = slot.replace(built.clone());
    drop(slot);
    // Joins the old pool's threads here unless another caller still runs on it.
    drop(old);
    Ok(built)
}

/// How long a spinning thread keeps its core to itself before it offers it to other threads
/// between checks. Past this, each check also yields (`sched_yield`), which returns at once
/// when no other thread wants the core and otherwise lets it run: where the machine's cores
/// are busy with other work, a spinning thread would take the time slices of the very
/// thread it waits for (measured: MAML sine on two threads with another process busy on
/// one core took 2.8 ms per meta-iteration against 0.53 ms on one thread).
const SPIN_ALONE: Duration = Duration::from_micros(50);

/// Spins until `done` holds or [`KEEP_WARM`] has passed, yielding the core between checks
/// after [`SPIN_ALONE`].
fn spin_until(done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        for _ in 0..64 {
            std::hint::spin_loop();
        }
        let waited = start.elapsed();
        if waited > KEEP_WARM {
            return;
        }
        if waited > SPIN_ALONE {
            std::thread::yield_now();
        }
    }
}

/// Runs task `i` of block `b`. A task that panics is an error of its own, in its place among
/// the tasks' results, not a panic of the caller: one thread or many, the first error by
/// task index is the same.
fn run_task(
    task: &(impl Fn(usize) -> Result<GradStore> + Sync),
    i: usize,
    b: usize,
) -> Result<GradStore> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| task(i))).unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        Err(Error::InvalidArgument {
            op: "meta_batch",
            message: format!("task {i} of block {b} panicked: {what}"),
        })
    })
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
/// is returned; a task that panics is an error naming it (`InvalidArgument`), with one
/// thread as with many, and two tasks' gradients for one leaf of different shapes, dtypes
/// or devices are an error, not a broadcast. Zero tasks give an empty store. The calling
/// thread runs the first block (with `threads = 1`, everything), the pool's threads the
/// others, each under the caller's grad mode, anomaly detection and
/// [`crate::nn::task_scope`].
/// The pool's threads and the waiting caller spin rather than sleep, the workers for up to
/// 2 ms after the call returns (until the next meta-batch), so a training loop keeps both
/// cores warm across its outer steps; after 50 us they yield the core between checks, so
/// that on busy cores they do not starve the threads they wait for.
///
/// `threads` above [`MAX_THREADS`] is clamped to it, and only the pool of the latest
/// thread count is kept: a call with another count replaces it (a call with fewer tasks
/// than threads uses the pool it finds if that is large enough), and the replaced pool's
/// threads stop once no caller runs on them, so sweeping thread counts leaves the threads
/// of the last count only.
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
    meta_batch_of(0..tasks, threads, combine, task)
}

/// [`meta_batch`] over the tasks `range` (one rank's share of a larger meta-batch), so that
/// `task` and a panic's error see the tasks' own indices.
pub(crate) fn meta_batch_of(
    range: Range<usize>,
    threads: usize,
    combine: Combine,
    task: impl Fn(usize) -> Result<GradStore> + Sync,
) -> Result<GradStore> {
    let (first, tasks) = (range.start, range.len());
    if threads == 0 {
        return Err(Error::InvalidArgument {
            op: "meta_batch",
            message: "0 threads; give at least 1".into(),
        });
    }
    let threads = threads.min(MAX_THREADS);
    // A pool of up to `threads - 1` workers serves, even if this call uses fewer (fewer
    // tasks than threads), so a smaller last meta-batch keeps the loop's warm pool.
    let most = threads - 1;
    let threads = threads.min(tasks.max(1));
    let mut stores: Vec<Result<GradStore>> = Vec::with_capacity(tasks);
    if threads == 1 {
        stores.extend(range.map(|i| run_task(&task, i, 0)));
    } else {
        let per = tasks.div_ceil(threads);
        let task = &task;
        // Every block runs under the caller's grad and anomaly modes and task scope, as
        // with one thread.
        let (grad, anomaly, scope) = (is_grad_enabled(), is_anomaly_enabled(), task_batch());
        let block = move |b: usize| -> Vec<Result<GradStore>> {
            let _modes = (
                NoGradGuard::set(grad),
                set_anomaly(anomaly),
                task_scope(scope),
            );
            (b * per..((b + 1) * per).min(tasks))
                .map(|i| run_task(task, first + i, b))
                .collect()
        };
        let mut blocks: Vec<Vec<Result<GradStore>>> = (0..threads).map(|_| Vec::new()).collect();
        let finished: Vec<AtomicBool> = (1..threads).map(|_| AtomicBool::new(false)).collect();
        let pool = pool(threads - 1, most)?;
        // Ends the workers' spinning from the last meta-batch (see below).
        let started = pool.started.fetch_add(1, Ordering::AcqRel) + 1;
        // The caller runs the first block; the others run on the pool's warm threads. The
        // caller then spins for them rather than sleeping.
        let (first, rest) = blocks.split_at_mut(1);
        pool.threads().in_place_scope(|s| {
            for ((i, out), finished) in rest.iter_mut().enumerate().zip(&finished) {
                s.spawn(move |_| {
                    *out = block(i + 1);
                    finished.store(true, Ordering::Release);
                });
            }
            first[0] = block(0);
            spin_until(|| finished.iter().all(|f| f.load(Ordering::Acquire)));
        });
        // Each worker spins until the next meta-batch starts (or KEEP_WARM passes), so that
        // it neither sleeps through the caller's outer step nor wakes up cold.
        for _ in 1..threads {
            // Only the counter, not the pool: a pool's own thread never drops it.
            let warm = pool.started.clone();
            pool.threads().spawn(move || {
                spin_until(|| warm.load(Ordering::Acquire) != started);
            });
        }
        stores.extend(blocks.into_iter().flatten());
    }
    let mut total = GradStore::default();
    for store in stores {
        total.accumulate_from(&store?, "meta_batch")?;
    }
    if combine == Combine::Mean && tasks > 0 {
        total.scale(1.0 / tasks as f64)?;
    }
    Ok(total)
}
