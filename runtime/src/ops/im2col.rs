//! The CPU convolution behind every conv op (forward, input gradient and weight gradient
//! are all convolutions, see `conv.rs`): im2col into a reused column buffer, one gemm per
//! chunk of the batch, rows copied whole where the stride is 1. candle's own CPU conv2d
//! gathers its columns one element at a time and spent a third of a MAML-Omniglot
//! iteration there.

use candle_core::{DType, Device, Storage, WithDType};

use super::cpu_gemm::{matmul_into, Strided};
use crate::error::Result;

/// Elements of the column buffer per chunk of the batch (1 MiB in f32): large enough for
/// one gemm to be efficient, small enough to stay in cache and to avoid page faults.
const COLUMN_BUDGET: usize = 1 << 18;

/// `conv2d(x, w)` of candle (cross-correlation, `groups == 1`) on CPU for f32 and f64;
/// `None` when this path does not apply and candle's own conv should run.
pub(crate) fn conv2d(
    x: &candle_core::Tensor,
    w: &candle_core::Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
) -> Result<Option<candle_core::Tensor>> {
    if !x.device().is_cpu() || x.dtype() != w.dtype() || x.rank() != 4 || w.rank() != 4 {
        return Ok(None);
    }
    match x.dtype() {
        DType::F32 => run::<f32>(x, w, padding, stride, dilation).map(Some),
        DType::F64 => run::<f64>(x, w, padding, stride, dilation).map(Some),
        _ => Ok(None),
    }
}

/// Sizes of one convolution.
#[derive(Clone, Copy)]
struct Conv {
    c_in: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    ho: usize,
    wo: usize,
    padding: usize,
    stride: usize,
    dilation: usize,
}

impl Conv {
    /// Output positions `[lo, hi)` along one axis whose input index
    /// `o * stride + k * dilation - padding` falls inside `0..len`.
    fn valid(&self, k: usize, len: usize, out: usize) -> (usize, usize) {
        let shift = k * self.dilation;
        let lo = self.padding.saturating_sub(shift).div_ceil(self.stride);
        let hi = (len + self.padding)
            .checked_sub(shift)
            .map_or(0, |reach| reach.div_ceil(self.stride))
            .min(out);
        (lo.min(hi), hi)
    }

    /// Writes the columns of `images` (each `c_in * h * w`, contiguous) into `cols`, a
    /// `(c_in kh kw) x (images * ho * wo)` row-major matrix.
    fn im2col<T: WithDType>(&self, images: &[T], cols: &mut [T]) {
        let plane = self.h * self.w;
        let l = self.ho * self.wo;
        let n = images.len() / (self.c_in * plane);
        let row_len = n * l;
        cols.fill(T::from_f64(0.0));
        for c in 0..self.c_in {
            for ky in 0..self.kh {
                let (oy_lo, oy_hi) = self.valid(ky, self.h, self.ho);
                for kx in 0..self.kw {
                    let (ox_lo, ox_hi) = self.valid(kx, self.w, self.wo);
                    let r = (c * self.kh + ky) * self.kw + kx;
                    let row = &mut cols[r * row_len..(r + 1) * row_len];
                    for b in 0..n {
                        let src = &images[(b * self.c_in + c) * plane..][..plane];
                        for oy in oy_lo..oy_hi {
                            let iy = oy * self.stride + ky * self.dilation - self.padding;
                            let ix0 = ox_lo * self.stride + kx * self.dilation - self.padding;
                            let dst = &mut row[b * l + oy * self.wo..][ox_lo..ox_hi];
                            let src = &src[iy * self.w + ix0..];
                            if self.stride == 1 {
                                dst.copy_from_slice(&src[..dst.len()]);
                            } else {
                                for (d, s) in dst.iter_mut().zip(src.iter().step_by(self.stride)) {
                                    *d = *s;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn run<T: WithDType>(
    x: &candle_core::Tensor,
    w: &candle_core::Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
) -> Result<candle_core::Tensor> {
    let (n, c_in, h, wd) = x.dims4()?;
    let (c_out, _, kh, kw) = w.dims4()?;
    let span = |len: usize, k: usize| (len + 2 * padding - dilation * (k - 1) - 1) / stride + 1;
    let conv = Conv {
        c_in,
        h,
        w: wd,
        kh,
        kw,
        ho: span(h, kh),
        wo: span(wd, kw),
        padding,
        stride,
        dilation,
    };
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let (x_storage, x_layout) = x.storage_and_layout();
    let (w_storage, w_layout) = w.storage_and_layout();
    let (Storage::Cpu(x_cpu), Storage::Cpu(w_cpu)) = (&*x_storage, &*w_storage) else {
        return Ok(x.conv2d(&w, padding, stride, dilation, 1)?);
    };
    let images = &x_cpu.as_slice::<T>()?[x_layout.start_offset()..][..x.elem_count()];
    let kernel = &w_cpu.as_slice::<T>()?[w_layout.start_offset()..][..w.elem_count()];
    let k = c_in * kh * kw;
    let l = conv.ho * conv.wo;
    let chunk = (COLUMN_BUDGET / (k * l).max(1)).clamp(1, n.max(1));
    let mut cols = vec![T::from_f64(0.0); k * chunk * l];
    let mut product = vec![T::from_f64(0.0); c_out * chunk * l];
    let mut out = vec![T::from_f64(0.0); n * c_out * l];
    for start in (0..n).step_by(chunk) {
        let m = chunk.min(n - start);
        let images = &images[start * c_in * h * wd..(start + m) * c_in * h * wd];
        let cols = &mut cols[..k * m * l];
        conv.im2col(images, cols);
        let product = &mut product[..c_out * m * l];
        gemm_rows((c_out, m * l, k), kernel, cols, product)?;
        for (co, row) in product.chunks_exact(m * l).enumerate() {
            for (b, image) in row.chunks_exact(l).enumerate() {
                out[((start + b) * c_out + co) * l..][..l].copy_from_slice(image);
            }
        }
    }
    drop((x_storage, w_storage));
    Ok(candle_core::Tensor::from_vec(
        out,
        (n, c_out, conv.ho, conv.wo),
        &Device::Cpu,
    )?)
}

/// `dst = lhs * rhs` for row-major `m x k` and `k x n` matrices, single-threaded or on
/// candle's thread count for large products.
fn gemm_rows<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    lhs: &[T],
    rhs: &[T],
    dst: &mut [T],
) -> Result<()> {
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 && m * n * k >= 1 << 20 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    matmul_into(
        (m, n, k),
        Strided::rows(lhs, k),
        Strided::rows(rhs, n),
        dst,
        parallelism,
    )
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    /// The im2col path gives candle's conv2d for padding, stride, dilation, odd sizes and
    /// a transposed (non-contiguous) input, in f64 and f32.
    #[test]
    fn matches_candle_conv2d() -> crate::Result<()> {
        let dev = Device::Cpu;
        let cases = [
            // (n, c_in, h, w, c_out, kh, kw, padding, stride, dilation)
            (2, 3, 7, 6, 4, 3, 3, 0, 1, 1),
            (3, 2, 9, 8, 5, 3, 2, 1, 1, 1),
            (1, 2, 9, 9, 3, 3, 3, 2, 2, 1),
            (2, 1, 10, 7, 2, 2, 3, 1, 1, 2),
            (2, 2, 11, 11, 3, 3, 3, 3, 3, 2),
            (5, 3, 4, 4, 2, 4, 4, 0, 1, 1),
            // Several chunks of the batch through the column buffer.
            (5, 8, 40, 40, 2, 3, 3, 1, 1, 1),
        ];
        for (i, &(n, c, h, w, co, kh, kw, p, s, d)) in cases.iter().enumerate() {
            let x = Tensor::randn(0f64, 1.0, (c, n, h, w), &dev)?.transpose(0, 1)?;
            let k = Tensor::randn(0f64, 1.0, (co, c, kh, kw), &dev)?;
            let ours = super::conv2d(&x, &k, p, s, d)?.expect("CPU f64 takes the path");
            let theirs = x.conv2d(&k, p, s, d, 1)?;
            assert_eq!(ours.dims(), theirs.dims(), "case {i}");
            let err = (ours - &theirs)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f64>()?;
            assert!(err < 1e-12, "case {i}: {err}");
            let (x, k) = (
                x.to_dtype(candle_core::DType::F32)?,
                k.to_dtype(candle_core::DType::F32)?,
            );
            let ours = super::conv2d(&x, &k, p, s, d)?.expect("CPU f32 takes the path");
            let theirs = x.conv2d(&k, p, s, d, 1)?;
            let err = (ours - &theirs)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(err < 1e-4, "case {i} f32: {err}");
        }
        Ok(())
    }
}
