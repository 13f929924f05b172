//! Pooling over the last two dims of an `[N, C, H, W]` tensor, without padding:
//! max_pool2d (the gradient goes to the first maximum of each window, 1 per window, unlike
//! candle's own backward) and avg_pool2d. Both backward passes are a scatter-add of the
//! output gradient into the input plane, linear in the gradient and differentiable again
//! (its adjoint is a gather).
//!
//! On the CPU fast paths (see `kernels.rs`) max pooling finds each window's maximum and its
//! position in one pass and keeps the positions for the backward; the scatter and the
//! gather of max pooling's backward are then direct loops over the planes.

use candle_core::{DType, ToUsize2};

use crate::autograd::{Backward, VjpCtx};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Window geometry of one pooling call.
#[derive(Clone, Copy)]
struct Pool {
    kernel: (usize, usize),
    stride: (usize, usize),
    /// Input `[N, C, H, W]`.
    input: [usize; 4],
    /// Output height and width.
    out: (usize, usize),
}

impl Pool {
    fn new(
        op: &'static str,
        x: &Tensor,
        kernel: (usize, usize),
        stride: (usize, usize),
    ) -> Result<Self> {
        x.require_float(op)?;
        let &[n, c, h, w] = x.dims() else {
            return Err(Error::ShapeMismatch {
                op,
                expected: "an input of shape [N, C, H, W]".into(),
                got: x.dims().to_vec(),
            });
        };
        if kernel.0 == 0 || kernel.1 == 0 || stride.0 == 0 || stride.1 == 0 {
            return Err(Error::InvalidArgument {
                op,
                message: format!("kernel {kernel:?} and stride {stride:?} must be positive"),
            });
        }
        if kernel.0 > h || kernel.1 > w {
            return Err(Error::ShapeMismatch {
                op,
                expected: format!("an input at least as large as the kernel {kernel:?}"),
                got: x.dims().to_vec(),
            });
        }
        let out = ((h - kernel.0) / stride.0 + 1, (w - kernel.1) / stride.1 + 1);
        Ok(Pool {
            kernel,
            stride,
            input: [n, c, h, w],
            out,
        })
    }

    /// Flat position in the `H * W` plane of element `(a, b)` of window `(i, j)`.
    fn position(&self, i: usize, j: usize, a: usize, b: usize) -> u32 {
        ((i * self.stride.0 + a) * self.input[3] + j * self.stride.1 + b) as u32
    }

    /// Scatters `src` (`[N, C, L]`, L positions per plane given by `positions`) into
    /// zeros of the input's shape: the differentiable core of both backward passes.
    fn scatter(&self, src: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let [n, c, h, w] = self.input;
        let zeros = Tensor::zeros(&[n, c, h * w], src.dtype(), src.device())?;
        zeros.scatter_add(positions, src, 2)?.reshape(&self.input)
    }
}

/// Max pooling's recorded op. `positions` (`[N, C, Ho, Wo]` u32, each window's maximum as a
/// flat position in its plane) is found with the values on the CPU fast path; elsewhere
/// the backward finds it.
struct MaxPool {
    pool: Pool,
    positions: Option<candle_core::Tensor>,
}

impl Backward for MaxPool {
    fn name(&self) -> &'static str {
        "max_pool2d"
    }

    /// dx = g scattered to the position of each window's maximum (the first one in
    /// row-major order at ties, as PyTorch); elsewhere 0.
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let p = &self.pool;
        let [n, c, h, w] = p.input;
        let (ho, wo) = p.out;
        let positions = match &self.positions {
            Some(positions) => positions.clone(),
            None => p.argmax(ctx.inputs[0].value())?,
        };
        let positions = positions.reshape((n, c, ho * wo))?;
        let g = ctx.grad.reshape(&[n, c, ho * wo])?;
        let dx = plane_scatter(&g, &positions, h * w)?;
        Ok(vec![Some(dx.reshape(&p.input)?)])
    }
}

/// `out[p][positions[p][j]] += src[p][j]` into zeros `[N, C, plane]`, for `src` and
/// `positions` `[N, C, L]`: max pooling's backward. Recorded; its VJP is [`plane_gather`].
fn plane_scatter(src: &Tensor, positions: &candle_core::Tensor, plane: usize) -> Result<Tensor> {
    let (n, c, _) = positions.dims3()?;
    let value = if fast_pair(src.value(), positions) {
        with_pair(
            src.value(),
            positions,
            |v, pos| scatter_cpu(v, pos, plane, (n, c)),
            |v, pos| scatter_cpu(v, pos, plane, (n, c)),
        )?
    } else {
        candle_core::Tensor::zeros((n, c, plane), src.dtype(), src.device())?.scatter_add(
            positions,
            src.value(),
            2,
        )?
    };
    Tensor::from_op(
        value,
        &[src],
        PlaneScatter {
            positions: positions.clone(),
        },
    )
}

/// `out[p][j] = src[p][positions[p][j]]` for `src` `[N, C, plane]` and `positions`
/// `[N, C, L]`. Recorded; its VJP is [`plane_scatter`].
fn plane_gather(src: &Tensor, positions: &candle_core::Tensor) -> Result<Tensor> {
    let plane = src.dims()[2];
    let value = if fast_pair(src.value(), positions) {
        let dims = positions.dims();
        with_pair(
            src.value(),
            positions,
            |v, pos| gather_cpu(v, pos, plane, dims),
            |v, pos| gather_cpu(v, pos, plane, dims),
        )?
    } else {
        src.value().contiguous()?.gather(positions, 2)?
    };
    Tensor::from_op(
        value,
        &[src],
        PlaneGather {
            positions: positions.clone(),
            plane,
        },
    )
}

struct PlaneScatter {
    positions: candle_core::Tensor,
}

impl Backward for PlaneScatter {
    fn name(&self) -> &'static str {
        "max_pool2d_scatter"
    }

    /// The adjoint of a scatter is the gather from the same positions.
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(plane_gather(ctx.grad, &self.positions)?)])
    }
}

struct PlaneGather {
    positions: candle_core::Tensor,
    plane: usize,
}

impl Backward for PlaneGather {
    fn name(&self) -> &'static str {
        "max_pool2d_gather"
    }

    /// The adjoint of a gather is the scatter-add to the same positions.
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(plane_scatter(
            ctx.grad,
            &self.positions,
            self.plane,
        )?)])
    }
}

/// Whether the direct loops run for these values and positions: CPU, f32 or f64, u32.
fn fast_pair(values: &candle_core::Tensor, positions: &candle_core::Tensor) -> bool {
    super::kernels::cpu_fast_paths()
        && values.device().is_cpu()
        && positions.dtype() == DType::U32
        && matches!(values.dtype(), DType::F32 | DType::F64)
}

/// `f` on the CPU slices of float values (f32 or f64, as `F32`/`F64` say) and u32
/// positions.
fn with_pair<R>(
    values: &candle_core::Tensor,
    positions: &candle_core::Tensor,
    f32s: impl FnOnce(&[f32], &[u32]) -> Result<R>,
    f64s: impl FnOnce(&[f64], &[u32]) -> Result<R>,
) -> Result<R> {
    use super::kernels::with_cpu_slice;
    with_cpu_slice::<u32, R>(positions, |pos| match values.dtype() {
        DType::F32 => with_cpu_slice(values, |v| f32s(v, pos)),
        _ => with_cpu_slice(values, |v| f64s(v, pos)),
    })
}

fn scatter_cpu<T: candle_core::WithDType>(
    src: &[T],
    positions: &[u32],
    plane: usize,
    (n, c): (usize, usize),
) -> Result<candle_core::Tensor> {
    // Zeroed plane by plane just before its adds, while it is in cache: zeroing the whole
    // buffer first (calloc) made a pass over memory of its own.
    let mut out = Vec::with_capacity(n * c * plane);
    let per_plane = src.len() / (n * c).max(1);
    for (src, pos) in src
        .chunks_exact(per_plane.max(1))
        .zip(positions.chunks_exact(per_plane.max(1)))
        .take(n * c)
    {
        let start = out.len();
        out.resize(start + plane, T::zero());
        let dst = &mut out[start..];
        for (&v, &at) in src.iter().zip(pos) {
            dst[at as usize] += v;
        }
    }
    out.resize(n * c * plane, T::zero());
    Ok(candle_core::Tensor::from_vec(
        out,
        (n, c, plane),
        &candle_core::Device::Cpu,
    )?)
}

fn gather_cpu<T: candle_core::WithDType>(
    src: &[T],
    positions: &[u32],
    plane: usize,
    dims: &[usize],
) -> Result<candle_core::Tensor> {
    let per_plane = dims[2];
    let mut out = Vec::with_capacity(positions.len());
    for (src, pos) in src
        .chunks_exact(plane)
        .zip(positions.chunks_exact(per_plane))
    {
        out.extend(pos.iter().map(|&at| src[at as usize]));
    }
    Ok(candle_core::Tensor::from_vec(
        out,
        dims,
        &candle_core::Device::Cpu,
    )?)
}

impl Pool {
    /// Each window's maximum and the position in its plane of its first maximum, both
    /// `[N, C, Ho, Wo]`, by one pass over the input's values (the CPU path). A window
    /// holding a NaN pools to its first NaN, as in PyTorch.
    fn max_and_argmax_cpu<T: candle_core::WithDType>(
        &self,
        x: &[T],
    ) -> Result<(candle_core::Tensor, candle_core::Tensor)> {
        let [n, c, h, w] = self.input;
        let (ho, wo) = self.out;
        let (kh, kw) = self.kernel;
        let (sh, sw) = self.stride;
        let mut values: Vec<T> = Vec::with_capacity(n * c * ho * wo);
        let mut positions: Vec<u32> = Vec::with_capacity(n * c * ho * wo);
        // Greater, or NaN over a number (`v != v`: NaN).
        #[allow(clippy::eq_op)]
        let better = |v: T, largest: T| v > largest || (v != v && largest == largest);
        if self.kernel == (2, 2) && self.stride == (2, 2) {
            // The usual case, without the window loops: the four taps in row-major order.
            for plane in x.chunks_exact(h * w) {
                for i in 0..ho {
                    let (r0, r1) = (2 * i * w, (2 * i + 1) * w);
                    let (row0, row1) = (&plane[r0..r0 + 2 * wo], &plane[r1..r1 + 2 * wo]);
                    // On AVX-512 or AVX2 a vector kernel takes the whole row.
                    #[cfg(target_arch = "x86_64")]
                    if T::DTYPE == candle_core::DType::F32 {
                        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
                        let avx2 = std::arch::is_x86_feature_detected!("avx2");
                        let rows = (row0.as_ptr().cast(), row1.as_ptr().cast());
                        values.reserve(wo);
                        positions.reserve(wo);
                        let (vl, pl) = (values.len(), positions.len());
                        let out = (
                            values.as_mut_ptr().wrapping_add(vl).cast(),
                            positions.as_mut_ptr().wrapping_add(pl),
                        );
                        // SAFETY: the rows hold `2 wo` f32 (the dtype checked), the vectors
                        // `wo` free slots, which the kernel writes; the CPU has the
                        // instruction set.
                        unsafe {
                            if avx512 {
                                pool_avx512::row_pair_f32(rows, (wo, w, r0), out.0, out.1);
                            } else if avx2 {
                                pool_avx2::row_pair_f32(rows, (wo, w, r0), out.0, out.1);
                            }
                            if avx512 || avx2 {
                                values.set_len(vl + wo);
                                positions.set_len(pl + wo);
                                continue;
                            }
                        }
                    }
                    for (j, (top, bottom)) in
                        row0.chunks_exact(2).zip(row1.chunks_exact(2)).enumerate()
                    {
                        // Selects, not branches: which tap wins is data, and mispredicted
                        // branches made this loop a seventh of an Omniglot meta-iteration.
                        let (mut best, mut largest) = (0, top[0]);
                        for (q, v) in [(1, top[1]), (w, bottom[0]), (w + 1, bottom[1])] {
                            let take = better(v, largest);
                            best = if take { q } else { best };
                            largest = if take { v } else { largest };
                        }
                        values.push(largest);
                        positions.push((r0 + 2 * j + best) as u32);
                    }
                }
            }
            let dev = candle_core::Device::Cpu;
            return Ok((
                candle_core::Tensor::from_vec(values, (n, c, ho, wo), &dev)?,
                candle_core::Tensor::from_vec(positions, (n, c, ho, wo), &dev)?,
            ));
        }
        for plane in x.chunks_exact(h * w) {
            for i in 0..ho {
                for j in 0..wo {
                    let top = i * sh * w + j * sw;
                    let (mut best, mut largest) = (top, plane[top]);
                    for a in 0..kh {
                        let row = top + a * w;
                        for (b, &v) in plane[row..row + kw].iter().enumerate() {
                            let take = better(v, largest);
                            best = if take { row + b } else { best };
                            largest = if take { v } else { largest };
                        }
                    }
                    values.push(largest);
                    positions.push(best as u32);
                }
            }
        }
        let dev = candle_core::Device::Cpu;
        Ok((
            candle_core::Tensor::from_vec(values, (n, c, ho, wo), &dev)?,
            candle_core::Tensor::from_vec(positions, (n, c, ho, wo), &dev)?,
        ))
    }

    /// The same positions with tensor ops on any device: one comparison per position in
    /// the window, keeping the earlier one at ties.
    fn argmax(&self, x: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        let (ho, wo) = self.out;
        let dev = x.device();
        let mut best: Option<(candle_core::Tensor, candle_core::Tensor)> = None;
        for a in 0..self.kernel.0 {
            let rows: Vec<u32> = (0..ho).map(|i| (i * self.stride.0 + a) as u32).collect();
            let rows = candle_core::Tensor::from_vec(rows, ho, dev)?;
            let x_rows = x.index_select(&rows, 2)?;
            for b in 0..self.kernel.1 {
                let cols: Vec<u32> = (0..wo).map(|j| (j * self.stride.1 + b) as u32).collect();
                let cols = candle_core::Tensor::from_vec(cols, wo, dev)?;
                let v = x_rows.index_select(&cols, 3)?;
                let pos: Vec<u32> = (0..ho)
                    .flat_map(|i| (0..wo).map(move |j| (i, j)))
                    .map(|(i, j)| self.position(i, j, a, b))
                    .collect();
                let pos = candle_core::Tensor::from_vec(pos, (1, 1, ho, wo), dev)?
                    .broadcast_as(v.shape())?;
                best = Some(match best {
                    None => (v, pos),
                    Some((bv, bp)) => {
                        // Greater, or NaN over a number (NaN wins, as in the forward).
                        let better = v.gt(&bv)?.maximum(&v.ne(&v)?.mul(&bv.eq(&bv)?)?)?;
                        (better.where_cond(&v, &bv)?, better.where_cond(&pos, &bp)?)
                    }
                });
            }
        }
        let (_, positions) = best.ok_or_else(|| Error::InvalidArgument {
            op: "max_pool2d",
            message: "empty kernel".into(),
        })?;
        Ok(positions.contiguous()?)
    }
}

struct AvgPool(Pool);

impl Backward for AvgPool {
    fn name(&self) -> &'static str {
        "avg_pool2d"
    }

    /// dx = g / (kh kw) spread over every element of its window (overlaps add up).
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let p = &self.0;
        let [n, c, _, _] = p.input;
        let (ho, wo) = p.out;
        let k = p.kernel.0 * p.kernel.1;
        let mut pos = Vec::with_capacity(ho * wo * k);
        for i in 0..ho {
            for j in 0..wo {
                for a in 0..p.kernel.0 {
                    for b in 0..p.kernel.1 {
                        pos.push(p.position(i, j, a, b));
                    }
                }
            }
        }
        let len = ho * wo * k;
        let positions = candle_core::Tensor::from_vec(pos, (1, 1, len), ctx.grad.device())?
            .broadcast_as((n, c, len))?
            .contiguous()?;
        let src = ctx
            .grad
            .affine(1.0 / k as f64, 0.0)?
            .reshape(&[n, c, ho * wo, 1])?
            .broadcast_as(&[n, c, ho * wo, k])?
            .reshape(&[n, c, len])?;
        Ok(vec![Some(p.scatter(&src, &Tensor::new(positions))?)])
    }
}

impl Tensor {
    /// Max pooling with stride equal to the kernel (`torch.nn.functional.max_pool2d`
    /// without padding). The kernel is a `usize` or `(h, w)`.
    pub fn max_pool2d(&self, kernel: impl ToUsize2) -> Result<Tensor> {
        let kernel = kernel.to_usize2();
        self.max_pool2d_with_stride(kernel, kernel)
    }

    /// Max pooling over `[N, C, H, W]` with the given kernel and stride; windows that do
    /// not fit are dropped. The gradient is 1 at each window's maximum. A window holding a
    /// NaN pools to NaN, as in PyTorch.
    pub fn max_pool2d_with_stride(
        &self,
        kernel: impl ToUsize2,
        stride: impl ToUsize2,
    ) -> Result<Tensor> {
        let pool = Pool::new("max_pool2d", self, kernel.to_usize2(), stride.to_usize2())?;
        let x = self.value();
        if super::kernels::cpu_fast_paths() && x.device().is_cpu() {
            use super::kernels::with_cpu_slice;
            let found = match x.dtype() {
                DType::F32 => Some(with_cpu_slice(x, |x| pool.max_and_argmax_cpu::<f32>(x))?),
                DType::F64 => Some(with_cpu_slice(x, |x| pool.max_and_argmax_cpu::<f64>(x))?),
                _ => None,
            };
            if let Some((value, positions)) = found {
                let positions = Some(positions);
                return Tensor::from_op(value, &[self], MaxPool { pool, positions });
            }
        }
        let mut value = x.max_pool2d_with_stride(pool.kernel, pool.stride)?;
        // candle skips NaN; in PyTorch a window holding a NaN pools to NaN.
        if super::nan::has_nan(x)? {
            let nan_in_window = super::nan::nan_mask(x)?
                .to_dtype(x.dtype())?
                .max_pool2d_with_stride(pool.kernel, pool.stride)?
                .gt(0.0)?;
            value = super::nan::set_nan_where(&nan_in_window, &value)?;
        }
        let positions = None;
        Tensor::from_op(value, &[self], MaxPool { pool, positions })
    }

    /// Average pooling with stride equal to the kernel (`torch.nn.functional.avg_pool2d`
    /// without padding).
    pub fn avg_pool2d(&self, kernel: impl ToUsize2) -> Result<Tensor> {
        let kernel = kernel.to_usize2();
        self.avg_pool2d_with_stride(kernel, kernel)
    }

    /// Average pooling over `[N, C, H, W]` with the given kernel and stride.
    pub fn avg_pool2d_with_stride(
        &self,
        kernel: impl ToUsize2,
        stride: impl ToUsize2,
    ) -> Result<Tensor> {
        let pool = Pool::new("avg_pool2d", self, kernel.to_usize2(), stride.to_usize2())?;
        let value = self
            .value()
            .avg_pool2d_with_stride(pool.kernel, pool.stride)?;
        Tensor::from_op(value, &[self], AvgPool(pool))
    }
}

/// The 2 x 2, stride 2 max pool of f32 on AVX-512, 16 windows at a time.
#[cfg(target_arch = "x86_64")]
mod pool_avx512 {
    use std::arch::x86_64::*;

    /// One output row: the maxima of `wo` windows over the rows `top` and `bottom` (each
    /// `2 wo` long, `top` at offset `r0` of a plane of width `w`) and each window's first
    /// maximum's position in the plane, taps in row-major order, NaN winning over numbers,
    /// as `Pool::max_and_argmax_cpu` defines them.
    ///
    /// # Safety
    /// The rows hold `2 wo` elements, `values` and `positions` `wo` writable slots; the CPU
    /// has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row_pair_f32(
        (top, bottom): (*const f32, *const f32),
        (wo, w, r0): (usize, usize, usize),
        values: *mut f32,
        positions: *mut u32,
    ) {
        let mask = |n: usize| -> __mmask16 {
            if n >= 16 {
                u16::MAX
            } else {
                (1u16 << n) - 1
            }
        };
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
        for j0 in (0..wo).step_by(16) {
            let count = (wo - j0).min(16);
            let (lo, hi) = (mask(2 * count), mask((2 * count).saturating_sub(16)));
            let split = |row: *const f32| {
                let (a, b) = (
                    _mm512_maskz_loadu_ps(lo, row.add(2 * j0)),
                    _mm512_maskz_loadu_ps(hi, row.wrapping_add(2 * j0 + 16)),
                );
                (
                    _mm512_permutex2var_ps(a, even, b),
                    _mm512_permutex2var_ps(a, odd, b),
                )
            };
            let ((t0, t1), (b0, b1)) = (split(top), split(bottom));
            let (mut largest, mut best) = (t0, _mm512_setzero_si512());
            for (v, tap) in [(t1, 1), (b0, w), (b1, w + 1)] {
                // Greater, or NaN over a number.
                let take = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, largest)
                    | (_mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v)
                        & _mm512_cmp_ps_mask::<_CMP_ORD_Q>(largest, largest));
                largest = _mm512_mask_mov_ps(largest, take, v);
                best = _mm512_mask_mov_epi32(best, take, _mm512_set1_epi32(tap as i32));
            }
            let first = _mm512_add_epi32(_mm512_set1_epi32((r0 + 2 * j0) as i32), even);
            let out = mask(count);
            _mm512_mask_storeu_ps(values.add(j0), out, largest);
            _mm512_mask_storeu_epi32(positions.add(j0).cast(), out, _mm512_add_epi32(first, best));
        }
    }
}

/// [`pool_avx512`]'s row kernel on AVX2.
#[cfg(target_arch = "x86_64")]
mod pool_avx2 {
    use std::arch::x86_64::*;

    use super::super::kernels::lane_mask32;

    /// The even and the odd elements of the first `n` (at most 16) f32 at `p`, zeros past
    /// them.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn split(p: *const f32, n: usize) -> (__m256, __m256) {
        let (a, b) = if n == 16 {
            (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
        } else {
            (
                _mm256_maskload_ps(p, lane_mask32(n.min(8))),
                _mm256_maskload_ps(p.wrapping_add(8), lane_mask32(n.saturating_sub(8))),
            )
        };
        // In-lane shuffles leave the pairs of 64 bits in the order a0 b0 a1 b1.
        let order =
            |v: __m256| _mm256_castpd_ps(_mm256_permute4x64_pd::<0xd8>(_mm256_castps_pd(v)));
        (
            order(_mm256_shuffle_ps::<0x88>(a, b)),
            order(_mm256_shuffle_ps::<0xdd>(a, b)),
        )
    }

    /// `pool_avx512::row_pair_f32` on AVX2: vectors of 8 windows, the last one partial
    /// (masked loads; its results stored through a stack buffer, as AMD's masked stores
    /// are slow).
    ///
    /// # Safety
    /// As `pool_avx512::row_pair_f32`, on a CPU with AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn row_pair_f32(
        (top, bottom): (*const f32, *const f32),
        (wo, w, r0): (usize, usize, usize),
        values: *mut f32,
        positions: *mut u32,
    ) {
        let even = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
        for j0 in (0..wo).step_by(8) {
            let count = (wo - j0).min(8);
            let (t0, t1) = split(top.add(2 * j0), 2 * count);
            let (b0, b1) = split(bottom.add(2 * j0), 2 * count);
            let (mut largest, mut best) = (t0, _mm256_setzero_si256());
            for (v, tap) in [(t1, 1), (b0, w), (b1, w + 1)] {
                // Greater, or NaN over a number.
                let take = _mm256_or_ps(
                    _mm256_cmp_ps::<_CMP_GT_OQ>(v, largest),
                    _mm256_and_ps(
                        _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v),
                        _mm256_cmp_ps::<_CMP_ORD_Q>(largest, largest),
                    ),
                );
                largest = _mm256_blendv_ps(largest, v, take);
                let tap = _mm256_castsi256_ps(_mm256_set1_epi32(tap as i32));
                best = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(best), tap, take));
            }
            let first = _mm256_add_epi32(_mm256_set1_epi32((r0 + 2 * j0) as i32), even);
            let at = _mm256_add_epi32(first, best);
            if count == 8 {
                _mm256_storeu_ps(values.add(j0), largest);
                _mm256_storeu_si256(positions.add(j0).cast(), at);
            } else {
                let (mut v, mut p) = ([0f32; 8], [0u32; 8]);
                _mm256_storeu_ps(v.as_mut_ptr(), largest);
                _mm256_storeu_si256(p.as_mut_ptr().cast(), at);
                std::ptr::copy_nonoverlapping(v.as_ptr(), values.add(j0), count);
                std::ptr::copy_nonoverlapping(p.as_ptr(), positions.add(j0), count);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Each vector row kernel the CPU has equals the 2 x 2 pool's definition (taps in
    /// row-major order, the first maximum, NaN over numbers) for every row length up to
    /// 40 windows, with ties and NaN: the AVX2 kernel is checked on AVX-512 machines too.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn row_kernels_equal_the_definition() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for wo in 1..=40 {
            let w = 2 * wo + 1;
            let plane: Vec<f32> = (0..2 * w)
                .map(|_| match rng.gen_range(0..6) {
                    5 => f32::NAN,
                    v => v as f32,
                })
                .collect();
            let r0 = 0;
            let (top, bottom) = (&plane[..w], &plane[w..]);
            let mut want = (Vec::new(), Vec::new());
            for j in 0..wo {
                let taps = [
                    (0, top[2 * j]),
                    (1, top[2 * j + 1]),
                    (w, bottom[2 * j]),
                    (w + 1, bottom[2 * j + 1]),
                ];
                let (mut best, mut largest) = taps[0];
                for &(q, v) in &taps[1..] {
                    if v > largest || (v.is_nan() && !largest.is_nan()) {
                        (best, largest) = (q, v);
                    }
                }
                want.0.push(largest.to_bits());
                want.1.push((r0 + 2 * j + best) as u32);
            }
            let rows = (top.as_ptr(), bottom.as_ptr());
            let check = |name: &str, values: &[f32], positions: &[u32]| {
                let bits: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
                assert_eq!(
                    (&bits, positions),
                    (&want.0, &want.1[..]),
                    "{name}, {wo} windows"
                );
            };
            // SAFETY (both): the rows hold `2 wo + 1` values, the outputs `wo`; the CPU has
            // the kernel's instruction set.
            if std::arch::is_x86_feature_detected!("avx2") {
                let (mut values, mut positions) = (vec![0f32; wo], vec![0u32; wo]);
                let out = (values.as_mut_ptr(), positions.as_mut_ptr());
                unsafe { pool_avx2::row_pair_f32(rows, (wo, w, r0), out.0, out.1) };
                check("AVX2", &values, &positions);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                let (mut values, mut positions) = (vec![0f32; wo], vec![0u32; wo]);
                let out = (values.as_mut_ptr(), positions.as_mut_ptr());
                unsafe { pool_avx512::row_pair_f32(rows, (wo, w, r0), out.0, out.1) };
                check("AVX-512", &values, &positions);
            }
        }
    }

    /// The CPU pass and the tensor-op path pick the same positions, ties included
    /// (values drawn from a few integers) and NaN, for overlapping and disjoint windows, in
    /// f64 and f32 (whose 2 x 2 pool has AVX-512 and AVX2 paths: rows of 19 windows span
    /// a full and a partial vector of 16, or two full and a partial vector of 8).
    #[test]
    fn cpu_argmax_matches_the_tensor_path() -> Result<()> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for dims in [[2, 3, 7, 6], [1, 2, 4, 38]] {
            // Small integers (ties) and some NaN, which wins its window on both paths.
            let data: Vec<f64> = (0..dims.iter().product::<usize>())
                .map(|_| match rng.gen_range(0..5) {
                    4 => f64::NAN,
                    v => f64::from(v),
                })
                .collect();
            let data32: Vec<f32> = data.iter().map(|&v| v as f32).collect();
            let x = Tensor::from_slice(&data, &dims, &candle_core::Device::Cpu)?;
            for (kernel, stride) in [((2, 2), (2, 2)), ((3, 2), (1, 2)), ((2, 3), (2, 1))] {
                let pool = Pool::new("max_pool2d", &x, kernel, stride)?;
                let reference = pool.argmax(x.value())?.flatten_all()?.to_vec1::<u32>()?;
                let (values, positions) = pool.max_and_argmax_cpu(&data)?;
                let (values32, positions32) = pool.max_and_argmax_cpu(&data32)?;
                let fast = positions.flatten_all()?.to_vec1::<u32>()?;
                assert_eq!(fast, reference, "kernel {kernel:?} stride {stride:?}");
                let fast32 = positions32.flatten_all()?.to_vec1::<u32>()?;
                assert_eq!(fast32, reference, "f32 {dims:?} kernel {kernel:?}");
                // Each value is the input at its position (NaN where the window holds one).
                let values = values.flatten_all()?.to_vec1::<f64>()?;
                let values32 = values32.flatten_all()?.to_vec1::<f32>()?;
                let plane = dims[2] * dims[3];
                for (i, (v, &at)) in values.iter().zip(&fast).enumerate() {
                    let per_plane = values.len() / (dims[0] * dims[1]);
                    let want = data[(i / per_plane) * plane + at as usize];
                    assert!(v.to_bits() == want.to_bits(), "value {i}: {v} vs {want}");
                    let want32 = data32[(i / per_plane) * plane + at as usize];
                    assert!(values32[i].to_bits() == want32.to_bits(), "f32 value {i}");
                }
            }
        }
        Ok(())
    }
}
