//! Which kernels run on the CPU: the library's fast paths (small matmuls through gemm,
//! convolution by im2col, the max-pool argmax, NaN-keeping relu, one-pass loops for small
//! elementwise arithmetic) or candle's own kernels, the ones every other device takes.
//!
//! `CANDLE_HIGHER_KERNELS=candle` in the environment (read once, at the first op) forces
//! candle's kernels everywhere, so the path a GPU takes is tested on any machine; CI runs
//! the golden and finite-difference suites both ways. Unset, or `fast`, keeps the fast
//! paths. [`set_cpu_fast_paths`] switches in-process.

use std::sync::atomic::{AtomicU8, Ordering};

const UNREAD: u8 = 0;
const FAST: u8 = 1;
const CANDLE: u8 = 2;

static MODE: AtomicU8 = AtomicU8::new(UNREAD);

/// Whether the CPU fast paths run (see the module docs).
pub fn cpu_fast_paths() -> bool {
    match MODE.load(Ordering::Relaxed) {
        FAST => true,
        CANDLE => false,
        _ => {
            let candle = std::env::var("CANDLE_HIGHER_KERNELS").is_ok_and(|v| v == "candle");
            MODE.store(if candle { CANDLE } else { FAST }, Ordering::Relaxed);
            !candle
        }
    }
}

/// Turns the CPU fast paths on or off for the whole process (`false`: candle's own
/// kernels, as on other devices). Wins over `CANDLE_HIGHER_KERNELS`.
pub fn set_cpu_fast_paths(on: bool) {
    MODE.store(if on { FAST } else { CANDLE }, Ordering::Relaxed);
}

/// Runs `f` on the elements of a CPU tensor of element type `T`, in row-major order:
/// borrowed from its storage when contiguous, else from a contiguous copy. An error off the
/// CPU or for another dtype.
pub(crate) fn with_cpu_slice<T: candle_core::WithDType, R>(
    v: &candle_core::Tensor,
    f: impl FnOnce(&[T]) -> crate::Result<R>,
) -> crate::Result<R> {
    let v = v.contiguous()?;
    let (storage, layout) = v.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(crate::Error::InvalidArgument {
            op: "cpu kernel",
            message: "a CPU kernel was given a tensor off the CPU".into(),
        });
    };
    f(&cpu.as_slice::<T>()?[layout.start_offset()..][..v.elem_count()])
}

/// The largest tensors the one-pass elementwise loops ([`map_small`], [`zip_small`]) take:
/// candle splits larger ones over its threads, at this same size.
const SMALL_ELEMENTWISE: usize = 64 * 1024;

/// The dtype of `values` when they are all contiguous CPU tensors of one float dtype
/// (f32 or f64) and one shape, with at most [`SMALL_ELEMENTWISE`] elements, and the fast
/// paths are on: the tensors [`map_small`] and [`zip_small`] take. A small elementwise op
/// through candle costs 240-450 ns on 400 elements (layout iterators, dispatch, its
/// checks), several times the arithmetic; the loops skip all of that.
pub(crate) fn small_cpu_floats(values: &[&candle_core::Tensor]) -> Option<candle_core::DType> {
    let first = values.first()?;
    let dtype = first.dtype();
    let takes = cpu_fast_paths()
        && matches!(dtype, candle_core::DType::F32 | candle_core::DType::F64)
        && first.elem_count() <= SMALL_ELEMENTWISE
        && values.iter().all(|v| {
            v.device().is_cpu()
                && v.is_contiguous()
                && v.dtype() == dtype
                && v.dims() == first.dims()
        });
    takes.then_some(dtype)
}

/// `f` of each element of `v` (element type `T`; see [`small_cpu_floats`]), in one pass
/// into a new tensor of its shape.
pub(crate) fn map_small<T: candle_core::WithDType>(
    v: &candle_core::Tensor,
    f: impl Fn(T) -> T,
) -> crate::Result<candle_core::Tensor> {
    let out = with_cpu_slice::<T, _>(v, |x| {
        Ok(vectorized(|| x.iter().map(|&x| f(x)).collect::<Vec<T>>()))
    })?;
    Ok(candle_core::Tensor::from_vec(out, v.shape(), v.device())?)
}

/// `f` of each pair of elements of `a` and `b` (element type `T`, one shape; see
/// [`small_cpu_floats`]), in one pass into a new tensor of their shape.
pub(crate) fn zip_small<T: candle_core::WithDType>(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
    f: impl Fn(T, T) -> T,
) -> crate::Result<candle_core::Tensor> {
    let out = with_cpu_slice::<T, _>(a, |x| {
        with_cpu_slice::<T, _>(b, |y| {
            Ok(vectorized(|| {
                x.iter().zip(y).map(|(&x, &y)| f(x, y)).collect::<Vec<T>>()
            }))
        })
    })?;
    Ok(candle_core::Tensor::from_vec(out, a.shape(), a.device())?)
}

/// Runs `f` inlined into a copy compiled for AVX2 and FMA where the CPU has them, so that
/// the loops it inlines vectorize to 256 bits instead of the baseline's 128 (for the loops
/// without a hand-written AVX-512 path on CPUs without AVX-512). The arithmetic is the
/// same: Rust never contracts a multiply and an add into a fused one.
#[inline(always)]
pub(crate) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { avx2(f) };
    }
    f()
}

/// `f()`, compiled with AVX2 and FMA.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// An AVX2 mask vector selecting the first `w` (at most 8) of 8 32-bit lanes, for
/// `_mm256_maskload_ps`.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn lane_mask32(w: usize) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(w as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

/// [`lane_mask32`] for 4 64-bit lanes (`_mm256_maskload_pd`).
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn lane_mask64(w: usize) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_cmpgt_epi64(_mm256_set1_epi64x(w as i64), _mm256_setr_epi64x(0, 1, 2, 3))
}
