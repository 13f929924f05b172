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
    if !lhs.holds(m, k) || !rhs.holds(k, n) || dst.len() < m * n {
        return Err(Error::InvalidArgument {
            op: "gemm",
            message: format!("a {m}x{k} by {k}x{n} product does not fit its buffers"),
        });
    }
    // SAFETY: checked above: every element gemm reads lies inside `lhs.data` or
    // `rhs.data`, and every element it writes (`row * n + col`) inside `dst`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
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
    Ok(())
}
