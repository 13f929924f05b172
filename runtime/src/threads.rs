//! The thread count of the library's own CPU kernels (gemm products, convolution by
//! im2col), chosen once and cached: no per-call lookup.
//!
//! candle's CPU matmul asks for its thread count on every call, and with
//! `RAYON_NUM_THREADS` unset that re-reads `/proc/cpuinfo` (30-45 us against about 1 us for
//! a 10x40 by 40x40 product). The library's kernels read [`cpu_threads`] instead: the first
//! call takes `RAYON_NUM_THREADS` if it is set to a positive number, else
//! [`std::thread::available_parallelism`], and keeps it; [`set_cpu_threads`] changes it.
//! Products under 48 x 48 x 256 multiply-adds, and convolutions under a million, run on
//! one thread whatever the count.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Result};

/// 0 until the count is first read or set.
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// The number of threads the library's own CPU kernels use for large products (see the
/// module docs): chosen at the first call and cached.
pub fn cpu_threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => {
            let chosen = std::env::var("RAYON_NUM_THREADS")
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .filter(|&n| n > 0)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            // A concurrent set_cpu_threads wins over the default.
            match THREADS.compare_exchange(0, chosen, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => chosen,
                Err(set) => set,
            }
        }
        n => n,
    }
}

/// Sets the thread count of the library's own CPU kernels for the whole process (wins over
/// `RAYON_NUM_THREADS`); 0 is an error. Large products then run on up to `threads` threads of
/// rayon's global pool. candle's own kernels (those the library does not replace) still
/// follow `RAYON_NUM_THREADS`.
pub fn set_cpu_threads(threads: usize) -> Result<()> {
    if threads == 0 {
        return Err(Error::InvalidArgument {
            op: "set_cpu_threads",
            message: "the thread count must be at least 1".into(),
        });
    }
    THREADS.store(threads, Ordering::Relaxed);
    Ok(())
}

/// gemm's parallelism for a product of `multiply_adds` multiply-adds: none below
/// `threshold`, else the cached count.
pub(crate) fn gemm_parallelism(multiply_adds: usize, threshold: usize) -> gemm::Parallelism {
    if multiply_adds < threshold {
        return gemm::Parallelism::None;
    }
    match cpu_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}
