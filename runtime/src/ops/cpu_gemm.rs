//! The one call into the gemm crate (the kernel candle's CPU matmul uses), behind a bounds
//! check, for the CPU fast paths of matmul and convolution.

use candle_core::WithDType;

use crate::error::{Error, Result};

/// A matrix stored in a slice: element `(i, j)` is at `i * row_stride + j * col_stride`.
#[derive(Clone, Copy)]
pub(crate) struct Strided<'a, T> {
    pub(crate) data: &'a [T],
    pub(crate) row_stride: usize,
    pub(crate) col_stride: usize,
}

impl<T> Strided<'_, T> {
    /// A row-major matrix with `cols` columns.
    pub(crate) fn rows(data: &[T], cols: usize) -> Strided<'_, T> {
        Strided {
            data,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// Whether every element of a `rows x cols` view lies inside the slice.
    fn holds(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || (rows - 1) * self.row_stride + (cols - 1) * self.col_stride < self.data.len()
    }
}

/// `dst = lhs * rhs` (or `dst += lhs * rhs` when `accumulate`) for an `m x k` and a
/// `k x n` matrix; `dst` is `m x n` row-major.
pub(crate) fn matmul_into<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    lhs: Strided<'_, T>,
    rhs: Strided<'_, T>,
    dst: &mut [T],
    accumulate: bool,
    parallelism: gemm::Parallelism,
) -> Result<()> {
    check_fits((m, n, k), lhs, rhs, dst.len())?;
    // SAFETY: `check_fits` checked that every element gemm reads lies inside `lhs.data` or
    // `rhs.data`, and every element it writes (`row * n + col`) inside `dst`.
    unsafe {
        call_gemm(
            (m, n, k),
            lhs,
            rhs,
            dst.as_mut_ptr(),
            accumulate,
            parallelism,
        )
    };
    Ok(())
}

/// `count` products of `m x k` by `k x n` matrices, entry `i` of `lhs(i) * rhs(i)` from
/// `views(i)`, stacked row-major in one new vector. The vector is not zeroed first: gemm
/// writes every element of a product without reading it (`read_dst = false`), and a
/// fresh buffer's zeroing was a tenth of a task-batched MAML step.
pub(crate) fn products<'a, T: WithDType>(
    count: usize,
    (m, n, k): (usize, usize, usize),
    views: impl Fn(usize) -> Result<(Strided<'a, T>, Strided<'a, T>)>,
    parallelism: gemm::Parallelism,
) -> Result<Vec<T>> {
    let len = count * m * n;
    if len == 0 {
        return Ok(Vec::new());
    }
    let mut dst = Vec::<T>::with_capacity(len);
    let spare = &mut dst.spare_capacity_mut()[..len];
    for (i, out) in spare.chunks_exact_mut(m * n).enumerate() {
        let (lhs, rhs) = views(i)?;
        matmul_into_uninit((m, n, k), lhs, rhs, out, parallelism)?;
    }
    // SAFETY: the loop above wrote all `count` products, `len` elements in all.
    unsafe { dst.set_len(len) };
    Ok(dst)
}

/// `dst = lhs * rhs` into memory that need not be initialised: gemm only writes it
/// (`read_dst` off), and on return the first `m * n` elements of `dst` are initialised.
// Inlined into `products`, which runs it for every small product of a MAML step.
#[inline(always)]
pub(crate) fn matmul_into_uninit<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    lhs: Strided<'_, T>,
    rhs: Strided<'_, T>,
    dst: &mut [std::mem::MaybeUninit<T>],
    parallelism: gemm::Parallelism,
) -> Result<()> {
    check_fits((m, n, k), lhs, rhs, dst.len())?;
    // SAFETY: as in `matmul_into`; with `accumulate = false` gemm never reads `dst`.
    unsafe {
        call_gemm(
            (m, n, k),
            lhs,
            rhs,
            dst.as_mut_ptr().cast::<T>(),
            false,
            parallelism,
        )
    };
    Ok(())
}

fn check_fits<T>(
    (m, n, k): (usize, usize, usize),
    lhs: Strided<'_, T>,
    rhs: Strided<'_, T>,
    dst_len: usize,
) -> Result<()> {
    if !lhs.holds(m, k) || !rhs.holds(k, n) || dst_len < m * n {
        return Err(Error::InvalidArgument {
            op: "gemm",
            message: format!("a {m}x{k} by {k}x{n} product does not fit its buffers"),
        });
    }
    Ok(())
}

/// # Safety
/// `lhs` and `rhs` hold their `m x k` and `k x n` views (`check_fits`), and `dst` points
/// at `m * n` writable elements, initialised when `accumulate`.
unsafe fn call_gemm<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    lhs: Strided<'_, T>,
    rhs: Strided<'_, T>,
    dst: *mut T,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    let single_thread = matches!(parallelism, gemm::Parallelism::None);
    if single_thread && super::small_gemm::try_small_product((m, n, k), lhs, rhs, dst, accumulate) {
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        n as isize,
        accumulate,
        lhs.data.as_ptr(),
        lhs.col_stride as isize,
        lhs.row_stride as isize,
        rhs.data.as_ptr(),
        rhs.col_stride as isize,
        rhs.row_stride as isize,
        T::from_f64(1.0),
        T::from_f64(1.0),
        false,
        false,
        false,
        parallelism,
    );
}
