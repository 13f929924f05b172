//! The CPU convolution kernels behind the three conv ops of `conv.rs` (for `groups == 1`,
//! f32 and f64), by im2col and gemm:
//! - forward: `y_b = W cols(x_b)`, the batch chunked through a reused column buffer;
//! - input gradient: `dx_b = col2im(W^T gy_b)`, the adjoint of im2col;
//! - weight gradient: `dW = sum_b gy_b cols(x_b)^T`, accumulated in place.
//!
//! 3x3 stride-1 convolutions with enough channels go to the Winograd kernels of
//! `winograd.rs` instead (fewer multiplications), and come back here when a result is not
//! finite.
//!
//! Rows are copied whole where the stride is 1, and `W^T` and `cols^T` are strided views
//! handed to gemm, not copies. candle's CPU conv2d gathers its columns one element at a time and spent a third of
//! a MAML-Omniglot iteration there.

use candle_core::{DType, Device, Storage, WithDType};

use super::cpu_gemm::{matmul_into, matmul_into_uninit, Strided};
use super::winograd;
use crate::error::Result;

/// Elements of the column buffer per chunk of the batch (1 MiB in f32): large enough for
/// one gemm to be efficient, small enough to stay in cache and to avoid page faults.
const COLUMN_BUDGET: usize = 1 << 18;

/// Output positions per image from which the forward writes each image's product in
/// place (one product per image), rather than one product per chunk copied out: below
/// it (9 positions in the CNN's last layer) a product per image runs at half the speed.
const DIRECT_POSITIONS: usize = 64;

/// The input gradient's column buffer per chunk (256 KiB in f32): col2im reads it back
/// after the product, so it stays within a core's L2 (chunks of [`COLUMN_BUDGET`] made the
/// CNN about 10% slower on Zen 3, whose L2 is 512 KiB).
const INPUT_GRAD_BUDGET: usize = 1 << 16;

/// The geometry of one convolution: input `[n, c_in, h, w]`, kernel `[c_out, c_in, kh,
/// kw]`, output `[n, c_out, ho, wo]`; with `tasks > 1`, `tasks` such convolutions with a
/// leading task axis on every operand (`[tasks, n, c_in, h, w]` etc.), task `t` using only
/// entry `t` of each, computed into one output buffer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Conv {
    /// Independent convolutions along a leading task axis, or `None` for a plain one.
    pub(crate) tasks: Option<usize>,
    /// Images per task.
    pub(crate) n: usize,
    pub(crate) c_in: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) c_out: usize,
    pub(crate) kh: usize,
    pub(crate) kw: usize,
    pub(crate) padding: usize,
    pub(crate) stride: usize,
    pub(crate) dilation: usize,
}

/// `conv2d(x, w)` as candle computes it (cross-correlation, `groups == 1`), plus `bias`
/// per output channel when given; `None` where this path does not apply (another device
/// or dtype) and candle's own conv should run. With `tasks`, `x` is `[T, n, c_in, h, w]`,
/// `w` `[T, c_out, c_in, kh, kw]` and `bias` `[T, c_out]`, and task `t` convolves `x[t]`
/// with `w[t]`.
pub(crate) fn conv2d(
    x: &candle_core::Tensor,
    w: &candle_core::Tensor,
    bias: Option<&candle_core::Tensor>,
    (padding, stride, dilation): (usize, usize, usize),
    tasks: bool,
) -> Result<Option<candle_core::Tensor>> {
    let lead = usize::from(tasks);
    let Some(dtype) = cpu_float(&[x, w], 4 + lead) else {
        return Ok(None);
    };
    let (xd, wd) = (x.dims(), w.dims());
    let conv = Conv {
        tasks: tasks.then_some(xd[0]),
        n: xd[lead],
        c_in: xd[lead + 1],
        h: xd[lead + 2],
        w: xd[lead + 3],
        c_out: wd[lead],
        kh: wd[lead + 2],
        kw: wd[lead + 3],
        padding,
        stride,
        dilation,
    };
    if bias.is_some_and(|b| b.dtype() != dtype || !b.device().is_cpu()) {
        return Ok(None);
    }
    match dtype {
        DType::F32 => conv.forward::<f32>(x, w, bias).map(Some),
        _ => conv.forward::<f64>(x, w, bias).map(Some),
    }
}

/// The gradient of `<gy, conv(x, w)>` with respect to `x`, shape `[n, c_in, h, w]`.
pub(crate) fn input_grad(
    conv: &Conv,
    gy: &candle_core::Tensor,
    w: &candle_core::Tensor,
) -> Result<Option<candle_core::Tensor>> {
    match cpu_float(&[gy, w], conv.rank()) {
        Some(DType::F32) => conv.input_grad::<f32>(gy, w).map(Some),
        Some(_) => conv.input_grad::<f64>(gy, w).map(Some),
        None => Ok(None),
    }
}

/// The gradient of `<gy, conv(x, w)>` with respect to `w`, shape `[c_out, c_in, kh, kw]`.
pub(crate) fn weight_grad(
    conv: &Conv,
    x: &candle_core::Tensor,
    gy: &candle_core::Tensor,
) -> Result<Option<candle_core::Tensor>> {
    match cpu_float(&[x, gy], conv.rank()) {
        Some(DType::F32) => conv.weight_grad::<f32>(x, gy).map(Some),
        Some(_) => conv.weight_grad::<f64>(x, gy).map(Some),
        None => Ok(None),
    }
}

/// The common dtype of CPU tensors of rank `rank` when it is f32 or f64.
fn cpu_float(ts: &[&candle_core::Tensor], rank: usize) -> Option<DType> {
    let dtype = ts[0].dtype();
    let ok = ts
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == dtype && t.rank() == rank);
    (ok && matches!(dtype, DType::F32 | DType::F64) && super::kernels::cpu_fast_paths())
        .then_some(dtype)
}

thread_local! {
    /// This thread's column and product buffers, reused from call to call (8-byte words):
    /// megabyte buffers made fresh at every call were zeroed and, whenever the allocator had
    /// handed their pages back, faulted in again.
    static SCRATCH: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on a buffer of `len` elements reused across calls on this thread (a fresh one
/// if the thread's is in use); it holds whatever the last call left there.
pub(super) fn with_scratch<T: WithDType, R>(len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut words) => {
            let need = (len * std::mem::size_of::<T>()).div_ceil(8);
            if words.len() < need {
                words.resize(need, 0);
            }
            // SAFETY: the words hold `len` elements of `T` (a plain number type: any bits are
            // a value, and its alignment is at most 8), borrowed exclusively here.
            let buf =
                unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<T>(), len) };
            f(buf)
        }
        Err(_) => f(&mut vec![T::zero(); len]),
    })
}

/// Runs `f` on the elements of contiguous CPU tensors.
fn with_slices<T: WithDType, R>(
    ts: [&candle_core::Tensor; 2],
    f: impl FnOnce(&[T], &[T]) -> Result<R>,
) -> Result<R> {
    let (a, b) = (ts[0].contiguous()?, ts[1].contiguous()?);
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (Storage::Cpu(ca), Storage::Cpu(cb)) = (&*sa, &*sb) else {
        return Err(crate::Error::InvalidArgument {
            op: "conv2d",
            message: "the CPU kernel was given a tensor off the CPU".into(),
        });
    };
    let a = &ca.as_slice::<T>()?[la.start_offset()..][..a.elem_count()];
    let b = &cb.as_slice::<T>()?[lb.start_offset()..][..b.elem_count()];
    f(a, b)
}

impl Conv {
    /// Rank of the operands: 4, or 5 with a task axis.
    pub(crate) fn rank(&self) -> usize {
        4 + usize::from(self.tasks.is_some())
    }

    /// The number of convolutions: the tasks, or 1.
    pub(super) fn count(&self) -> usize {
        self.tasks.unwrap_or(1)
    }

    /// A tensor of per-task dims `dims` (with the task axis when there is one).
    fn tensor<T: WithDType>(&self, data: Vec<T>, dims: [usize; 4]) -> Result<candle_core::Tensor> {
        let shape: Vec<usize> = self.tasks.into_iter().chain(dims).collect();
        Ok(candle_core::Tensor::from_vec(data, shape, &Device::Cpu)?)
    }

    /// Whether every column entry is written by [`Conv::im2col`] (no padding: every tap of
    /// every window lies inside the image), so the buffer needs no zeroing.
    fn covers_columns(&self) -> bool {
        self.padding == 0
    }

    pub(super) fn ho(&self) -> usize {
        (self.h + 2 * self.padding - self.dilation * (self.kh - 1) - 1) / self.stride + 1
    }

    pub(super) fn wo(&self) -> usize {
        (self.w + 2 * self.padding - self.dilation * (self.kw - 1) - 1) / self.stride + 1
    }

    /// Rows of the column matrix: `c_in kh kw`.
    fn k(&self) -> usize {
        self.c_in * self.kh * self.kw
    }

    /// Images per chunk so that a `k x (chunk l)` column buffer stays within the budget.
    fn chunk(&self) -> usize {
        (COLUMN_BUDGET / (self.k() * self.ho() * self.wo()).max(1)).clamp(1, self.n.max(1))
    }

    /// Output positions `[lo, hi)` along one axis whose input index
    /// `o * stride + tap * dilation - padding` falls inside `0..len`.
    fn valid(&self, tap: usize, len: usize, out: usize) -> (usize, usize) {
        let shift = tap * self.dilation;
        let lo = self.padding.saturating_sub(shift).div_ceil(self.stride);
        let hi = (len + self.padding)
            .checked_sub(shift)
            .map_or(0, |reach| reach.div_ceil(self.stride))
            .min(out);
        (lo.min(hi), hi)
    }

    /// For every row `(c, ky, kx)` of the column matrix and every output row `oy` with an
    /// input row inside the image: the input offset of the first valid tap, the output
    /// columns `[ox_lo, ox_hi)` it covers, and the row's offset in the column matrix.
    // Inlined so that each caller's per-run work compiles into its loop (with the
    // caller's target features), not a call per run.
    #[inline(always)]
    fn for_each_run(&self, mut f: impl FnMut(usize, usize, usize, usize, usize)) {
        let (ho, wo) = (self.ho(), self.wo());
        for c in 0..self.c_in {
            for ky in 0..self.kh {
                let (oy_lo, oy_hi) = self.valid(ky, self.h, ho);
                for kx in 0..self.kw {
                    let (ox_lo, ox_hi) = self.valid(kx, self.w, wo);
                    let r = (c * self.kh + ky) * self.kw + kx;
                    for oy in oy_lo..oy_hi {
                        let iy = oy * self.stride + ky * self.dilation - self.padding;
                        let ix = ox_lo * self.stride + kx * self.dilation - self.padding;
                        f(r, (c * self.h + iy) * self.w + ix, oy * wo, ox_lo, ox_hi);
                    }
                }
            }
        }
    }

    /// Writes the columns of one image (`c_in h w`, contiguous) into a column matrix of
    /// `row_len` columns, starting at column `col0`; entries no tap reaches are left as
    /// they are (the caller zeroes the buffer).
    fn im2col<T: WithDType>(&self, image: &[T], cols: &mut [T], row_len: usize, col0: usize) {
        #[cfg(target_arch = "x86_64")]
        if let (1, Some(image), Some(cols)) = (self.stride, as_f32(image), as_f32_mut(cols)) {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F.
                unsafe { runs_avx512::im2col(self, image, cols, row_len, col0) };
                return;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2.
                unsafe { runs_avx2::im2col(self, image, cols, row_len, col0) };
                return;
            }
        }
        self.im2col_scalar(image, cols, row_len, col0);
    }

    /// [`Conv::im2col`] element by element (any dtype and stride).
    fn im2col_scalar<T: WithDType>(
        &self,
        image: &[T],
        cols: &mut [T],
        row_len: usize,
        col0: usize,
    ) {
        self.for_each_run(|r, src, out_row, lo, hi| {
            let dst = &mut cols[r * row_len + col0 + out_row..][lo..hi];
            let src = &image[src..];
            if self.stride == 1 {
                dst.copy_from_slice(&src[..dst.len()]);
            } else {
                for (d, s) in dst.iter_mut().zip(src.iter().step_by(self.stride)) {
                    *d = *s;
                }
            }
        });
    }

    /// The adjoint of [`Conv::im2col`] for one image: adds each entry of its `k x l`
    /// columns (in a column matrix of `row_len` columns, from column `col0`) into the
    /// input position it was read from.
    fn col2im<T: WithDType>(&self, cols: &[T], image: &mut [T], row_len: usize, col0: usize) {
        #[cfg(target_arch = "x86_64")]
        if let (1, Some(cols), Some(image)) = (self.stride, as_f32(cols), as_f32_mut(image)) {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F.
                unsafe { runs_avx512::col2im(self, cols, image, row_len, col0) };
                return;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2.
                unsafe { runs_avx2::col2im(self, cols, image, row_len, col0) };
                return;
            }
        }
        self.col2im_scalar(cols, image, row_len, col0);
    }

    /// [`Conv::col2im`] element by element (any dtype and stride).
    fn col2im_scalar<T: WithDType>(
        &self,
        cols: &[T],
        image: &mut [T],
        row_len: usize,
        col0: usize,
    ) {
        self.for_each_run(|r, dst, out_row, lo, hi| {
            let src = &cols[r * row_len + col0 + out_row..][lo..hi];
            let dst = &mut image[dst..];
            if self.stride == 1 {
                for (d, s) in dst.iter_mut().zip(src) {
                    *d += *s;
                }
            } else {
                for (d, s) in dst.iter_mut().step_by(self.stride).zip(src) {
                    *d += *s;
                }
            }
        });
    }

    /// The convolution, with `bias` (`c_out` values per task) added as the products are
    /// copied out: the same sums as a separate broadcast add, without its pass and tensor.
    fn forward<T: WithDType>(
        &self,
        x: &candle_core::Tensor,
        w: &candle_core::Tensor,
        bias: Option<&candle_core::Tensor>,
    ) -> Result<candle_core::Tensor> {
        let (k, l, c_out) = (self.k(), self.ho() * self.wo(), self.c_out);
        let bias: Option<Vec<T>> = bias.map(|b| b.flatten_all()?.to_vec1()).transpose()?;
        if bias
            .as_ref()
            .is_some_and(|b| b.len() != self.count() * c_out)
        {
            return Err(crate::Error::InvalidArgument {
                op: "conv2d",
                message: format!("a bias needs {} values", self.count() * c_out),
            });
        }
        let dims = [self.n, c_out, self.ho(), self.wo()];
        if winograd::applies(self) {
            let bias = bias.as_deref();
            let y = with_slices([x, w], |x: &[T], w| winograd::forward(self, x, w, bias))?;
            if let Some(y) = y {
                return self.tensor(y, dims);
            }
        }
        let image = self.c_in * self.h * self.w;
        let chunk = self.chunk();
        let total = self.count() * self.n * c_out * l;
        let mut out: Vec<T> = Vec::with_capacity(total);
        let slots = &mut out.spare_capacity_mut()[..total];
        with_scratch(k * chunk * l + c_out * chunk * l, |scratch: &mut [T]| {
            let (cols, product) = scratch.split_at_mut(k * chunk * l);
            with_slices([x, w], |images, kernels| {
                let per_task = images
                    .chunks_exact(self.n * image)
                    .zip(kernels.chunks_exact(c_out * k))
                    .zip(slots.chunks_exact_mut(self.n * c_out * l));
                for (t, ((images, kernel), out)) in per_task.enumerate() {
                    let bias = bias.as_ref().map(|b| &b[t * c_out..][..c_out]);
                    for start in (0..self.n).step_by(chunk) {
                        let m = chunk.min(self.n - start);
                        let cols = &mut cols[..k * m * l];
                        if !self.covers_columns() {
                            cols.fill(T::from_f64(0.0));
                        }
                        for b in 0..m {
                            let src = &images[(start + b) * image..][..image];
                            self.im2col(src, cols, m * l, b * l);
                        }
                        if l >= DIRECT_POSITIONS {
                            for b in 0..m {
                                let dst = &mut out[(start + b) * c_out * l..][..c_out * l];
                                self.product_into(kernel, cols, (b, m), dst, bias)?;
                            }
                            continue;
                        }
                        let product = &mut product[..c_out * m * l];
                        let parallelism = parallelism(c_out * m * l * k);
                        let (lhs, rhs) = (Strided::rows(kernel, k), Strided::rows(cols, m * l));
                        matmul_into((c_out, m * l, k), lhs, rhs, product, false, parallelism)?;
                        for (co, row) in product.chunks_exact(m * l).enumerate() {
                            for (b, y) in row.chunks_exact(l).enumerate() {
                                let dst = &mut out[((start + b) * c_out + co) * l..][..l];
                                match bias {
                                    Some(bias) => {
                                        for (d, &v) in dst.iter_mut().zip(y) {
                                            d.write(v + bias[co]);
                                        }
                                    }
                                    None => {
                                        for (d, &v) in dst.iter_mut().zip(y) {
                                            d.write(v);
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                Ok(())
            })
        })?;
        // SAFETY: the loops above wrote every one of the `total` slots: each task's images
        // are covered by its chunks, and each image's `c_out` rows of `l` by the copies or
        // by its product in place.
        unsafe { out.set_len(total) };
        self.tensor(out, dims)
    }

    /// Image `b`'s output (`c_out x l`) of a chunk of `m` images, with `bias` added, written
    /// straight into its place: the product of `W` and the image's columns of `cols`.
    fn product_into<T: WithDType>(
        &self,
        kernel: &[T],
        cols: &[T],
        (b, m): (usize, usize),
        dst: &mut [std::mem::MaybeUninit<T>],
        bias: Option<&[T]>,
    ) -> Result<()> {
        let (k, l, c_out) = (self.k(), self.ho() * self.wo(), self.c_out);
        let columns = Strided {
            data: &cols[b * l..],
            row_stride: m * l,
            col_stride: 1,
        };
        let parallelism = parallelism(c_out * l * k);
        matmul_into_uninit(
            (c_out, l, k),
            Strided::rows(kernel, k),
            columns,
            dst,
            parallelism,
        )?;
        if let Some(bias) = bias {
            // SAFETY: the product initialised all `c_out * l` elements of `dst`.
            let dst = unsafe { &mut *(std::ptr::from_mut(dst) as *mut [T]) };
            for (row, &bias) in dst.chunks_exact_mut(l).zip(bias) {
                for y in row {
                    *y += bias;
                }
            }
        }
        Ok(())
    }

    /// `col2im(W^T gy)` per chunk of images (as in the forward): one product over a chunk's
    /// positions runs faster than one per image, most on small images (9 positions in the
    /// CNN's last layer: 14 against 29 GFMA/s on Zen 3); `gy`'s rows of the chunk are
    /// gathered into `[c_out, m l]` for it.
    fn input_grad<T: WithDType>(
        &self,
        gy: &candle_core::Tensor,
        w: &candle_core::Tensor,
    ) -> Result<candle_core::Tensor> {
        let dims = [self.n, self.c_in, self.h, self.w];
        if winograd::applies(self) {
            if let Some(dx) = with_slices([gy, w], |gy: &[T], w| winograd::input_grad(self, gy, w))?
            {
                return self.tensor(dx, dims);
            }
        }
        let (k, l, c_out) = (self.k(), self.ho() * self.wo(), self.c_out);
        let image = self.c_in * self.h * self.w;
        let chunk = (INPUT_GRAD_BUDGET / (k * l).max(1)).clamp(1, self.n.max(1));
        let mut dx = vec![T::from_f64(0.0); self.count() * self.n * image];
        // `cols` is written whole by each product.
        with_scratch(k * chunk * l + c_out * chunk * l, |scratch: &mut [T]| {
            let (cols, rows) = scratch.split_at_mut(k * chunk * l);
            with_slices([gy, w], |gy, kernels| {
                let per_task = gy
                    .chunks_exact(self.n * c_out * l)
                    .zip(kernels.chunks_exact(c_out * k))
                    .zip(dx.chunks_exact_mut(self.n * image));
                for ((gy, kernel), dx) in per_task {
                    // W^T as a view of W: element (r, co) at co * k + r.
                    let kernel_t = Strided {
                        data: kernel,
                        row_stride: 1,
                        col_stride: k,
                    };
                    for start in (0..self.n).step_by(chunk) {
                        let m = chunk.min(self.n - start);
                        let gy_rows = self.chunk_rows(gy, start, m, rows);
                        let cols = &mut cols[..k * m * l];
                        let parallelism = parallelism(k * m * l * c_out);
                        matmul_into(
                            (k, m * l, c_out),
                            kernel_t,
                            gy_rows,
                            cols,
                            false,
                            parallelism,
                        )?;
                        for b in 0..m {
                            let dx_b = &mut dx[(start + b) * image..][..image];
                            self.col2im(cols, dx_b, m * l, b * l);
                        }
                    }
                }
                Ok(())
            })
        })?;
        self.tensor(dx, dims)
    }

    /// The rows of `gy` (one task's `[n, c_out, l]`) for images `start..start + m`, as a
    /// `[c_out, m l]` matrix: the image's own rows when `m` is 1, else gathered into `rows`.
    fn chunk_rows<'a, T: WithDType>(
        &self,
        gy: &'a [T],
        start: usize,
        m: usize,
        rows: &'a mut [T],
    ) -> Strided<'a, T> {
        let (l, c_out) = (self.ho() * self.wo(), self.c_out);
        if m == 1 {
            return Strided::rows(&gy[start * c_out * l..][..c_out * l], l);
        }
        for b in 0..m {
            let gy_b = &gy[(start + b) * c_out * l..][..c_out * l];
            for (co, row) in gy_b.chunks_exact(l).enumerate() {
                rows[co * m * l + b * l..][..l].copy_from_slice(row);
            }
        }
        Strided::rows(&rows[..c_out * m * l], m * l)
    }

    /// `gy cols^T` summed over the images. Images with few positions go a chunk per product
    /// (as in the forward), so that the product's depth is the chunk's positions rather
    /// than one image's (9 for the CNN's last layer: 4.7 ms to 3.7 ms for 150 images);
    /// `gy`'s rows of the chunk are gathered into `[c_out, m l]` for it.
    fn weight_grad<T: WithDType>(
        &self,
        x: &candle_core::Tensor,
        gy: &candle_core::Tensor,
    ) -> Result<candle_core::Tensor> {
        let dims = [self.c_out, self.c_in, self.kh, self.kw];
        if winograd::applies(self) {
            if let Some(dw) =
                with_slices([x, gy], |x: &[T], gy| winograd::weight_grad(self, x, gy))?
            {
                return self.tensor(dw, dims);
            }
        }
        let (k, l, c_out) = (self.k(), self.ho() * self.wo(), self.c_out);
        let image = self.c_in * self.h * self.w;
        // One image per product where an image has enough positions (gathering `gy`
        // would cost more than it gains).
        let chunk = if l >= 64 { 1 } else { self.chunk() };
        let mut dw = vec![T::from_f64(0.0); self.count() * c_out * k];
        with_scratch(k * chunk * l + c_out * chunk * l, |scratch: &mut [T]| {
            let (cols, rows) = scratch.split_at_mut(k * chunk * l);
            with_slices([x, gy], |images, gy| {
                let per_task = images
                    .chunks_exact(self.n * image)
                    .zip(gy.chunks_exact(self.n * c_out * l))
                    .zip(dw.chunks_exact_mut(c_out * k));
                for ((images, gy), dw) in per_task {
                    for start in (0..self.n).step_by(chunk) {
                        let m = chunk.min(self.n - start);
                        let cols = &mut cols[..k * m * l];
                        if !self.covers_columns() {
                            cols.fill(T::from_f64(0.0));
                        }
                        for b in 0..m {
                            let src = &images[(start + b) * image..][..image];
                            self.im2col(src, cols, m * l, b * l);
                        }
                        // cols^T as a view: element (j, r) at r * (m l) + j.
                        let cols_t = Strided {
                            data: &*cols,
                            row_stride: 1,
                            col_stride: m * l,
                        };
                        let parallelism = parallelism(c_out * k * m * l);
                        let gy_rows = self.chunk_rows(gy, start, m, rows);
                        let accumulate = start > 0;
                        matmul_into(
                            (c_out, k, m * l),
                            gy_rows,
                            cols_t,
                            dw,
                            accumulate,
                            parallelism,
                        )?;
                    }
                }
                Ok(())
            })
        })?;
        self.tensor(dw, dims)
    }
}

/// `xs` as f32, when that is its element type.
#[cfg(target_arch = "x86_64")]
fn as_f32<T: WithDType>(xs: &[T]) -> Option<&[f32]> {
    // SAFETY: T is f32 (checked), so the slice is one of f32.
    (T::DTYPE == DType::F32)
        .then(|| unsafe { std::slice::from_raw_parts(xs.as_ptr().cast(), xs.len()) })
}

/// `xs` as mutable f32, when that is its element type.
#[cfg(target_arch = "x86_64")]
fn as_f32_mut<T: WithDType>(xs: &mut [T]) -> Option<&mut [f32]> {
    // SAFETY: T is f32 (checked), so the slice is one of f32, borrowed exclusively.
    (T::DTYPE == DType::F32)
        .then(|| unsafe { std::slice::from_raw_parts_mut(xs.as_mut_ptr().cast(), xs.len()) })
}

/// `d[j..n] += s[j..n]` (raw f32 pointers) by 256- and 128-bit pieces and a scalar tail, in
/// a function with AVX enabled.
#[cfg(target_arch = "x86_64")]
macro_rules! add_pieces {
    ($d:ident, $s:ident, $n:ident, $j:ident) => {
        while $j + 8 <= $n {
            let sum = _mm256_add_ps(_mm256_loadu_ps($d.add($j)), _mm256_loadu_ps($s.add($j)));
            _mm256_storeu_ps($d.add($j), sum);
            $j += 8;
        }
        if $j + 4 <= $n {
            let sum = _mm_add_ps(_mm_loadu_ps($d.add($j)), _mm_loadu_ps($s.add($j)));
            _mm_storeu_ps($d.add($j), sum);
            $j += 4;
        }
        while $j < $n {
            *$d.add($j) += *$s.add($j);
            $j += 1;
        }
    };
}

/// `fn col2im`, [`Conv::col2im`] at stride 1, for the instruction set `$feature`: in each
/// run, `$wide` adds from `$j` on the raw pointers `$d`, `$s` (`$n` elements), then
/// [`add_pieces`] adds the rest.
#[cfg(target_arch = "x86_64")]
macro_rules! col2im_runs {
    ($feature:literal, |$d:ident, $s:ident, $n:ident, $j:ident| $wide:block) => {
        /// [`Conv::col2im`] at stride 1.
        ///
        /// # Safety
        /// The CPU has the instruction set this function is compiled for.
        #[target_feature(enable = $feature)]
        pub(super) unsafe fn col2im(
            conv: &Conv,
            cols: &[f32],
            image: &mut [f32],
            row_len: usize,
            col0: usize,
        ) {
            conv.for_each_run(|r, dst, out_row, lo, hi| {
                let src = &cols[r * row_len + col0 + out_row..][lo..hi];
                let dst = &mut image[dst..][..src.len()];
                #[allow(unused_mut)]
                let ($n, mut $j) = (src.len(), 0);
                // SAFETY: every piece lies inside both slices (bounds checked above).
                unsafe {
                    let ($d, $s) = (dst.as_mut_ptr(), src.as_ptr());
                    $wide
                    add_pieces!($d, $s, $n, $j);
                }
            });
        }
    };
}

/// im2col and col2im of f32 at stride 1 on AVX-512: a run (one output row's taps of one
/// kernel position, 3 to 28 elements in the Omniglot CNN) is copied with 16-lane masked
/// loads and stores (28% faster than a memcpy call per run, measured on the Omniglot CNN's
/// second layer), or added in vector pieces. Each element is added once per run, in the
/// same run order: the results are bitwise those of the scalar path.
#[cfg(target_arch = "x86_64")]
mod runs_avx512 {
    use std::arch::x86_64::*;

    use super::Conv;

    /// Lanes `0..n` of a 16-lane mask (all for `n >= 16`).
    #[inline]
    fn mask(n: usize) -> __mmask16 {
        if n >= 16 {
            u16::MAX
        } else {
            (1u16 << n) - 1
        }
    }

    /// [`Conv::im2col`] at stride 1.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn im2col(
        conv: &Conv,
        image: &[f32],
        cols: &mut [f32],
        row_len: usize,
        col0: usize,
    ) {
        conv.for_each_run(|r, src, out_row, lo, hi| {
            let dst = &mut cols[r * row_len + col0 + out_row..][lo..hi];
            let src = &image[src..][..dst.len()];
            for j in (0..dst.len()).step_by(16) {
                let m = mask(dst.len() - j);
                // SAFETY: lanes of `m` lie inside both slices (bounds checked above).
                unsafe {
                    let v = _mm512_maskz_loadu_ps(m, src.as_ptr().add(j));
                    _mm512_mask_storeu_ps(dst.as_mut_ptr().add(j), m, v);
                }
            }
        });
    }

    // The adds use no masked stores: on AMD Zen 4 a load of what a masked store just wrote
    // stalls (measured: 5x slower than the scalar loop); 512-, 256- and 128-bit pieces and a
    // scalar tail instead (about 20% faster).
    col2im_runs!("avx512f", |d, s, n, j| {
        while j + 16 <= n {
            let sum = _mm512_add_ps(_mm512_loadu_ps(d.add(j)), _mm512_loadu_ps(s.add(j)));
            _mm512_storeu_ps(d.add(j), sum);
            j += 16;
        }
    });
}

/// [`runs_avx512`]'s kernels on AVX2: im2col copies each run inline in 256-, 128- or 64-bit
/// pieces, the last one overlapping the one before (as memcpy does, without a call per run
/// of a few values: 10-40% faster convolutions on Zen 3); col2im adds the runs in 256- and
/// 128-bit pieces and a scalar tail.
#[cfg(target_arch = "x86_64")]
mod runs_avx2 {
    use std::arch::x86_64::*;

    use super::Conv;

    /// [`Conv::im2col`] at stride 1.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn im2col(
        conv: &Conv,
        image: &[f32],
        cols: &mut [f32],
        row_len: usize,
        col0: usize,
    ) {
        conv.for_each_run(|r, src, out_row, lo, hi| {
            let dst = &mut cols[r * row_len + col0 + out_row..][lo..hi];
            let src = &image[src..][..dst.len()];
            let (n, s, d) = (dst.len(), src.as_ptr(), dst.as_mut_ptr());
            // SAFETY: every piece lies inside `0..n` of both slices (bounds checked above);
            // an overlapping piece writes the values the one before wrote there.
            unsafe {
                if n >= 8 {
                    let mut j = 0;
                    while j + 8 < n {
                        _mm256_storeu_ps(d.add(j), _mm256_loadu_ps(s.add(j)));
                        j += 8;
                    }
                    _mm256_storeu_ps(d.add(n - 8), _mm256_loadu_ps(s.add(n - 8)));
                } else if n >= 4 {
                    _mm_storeu_ps(d, _mm_loadu_ps(s));
                    _mm_storeu_ps(d.add(n - 4), _mm_loadu_ps(s.add(n - 4)));
                } else if n >= 2 {
                    // Two 64-bit pieces (pairs of values), the second ending at `n`.
                    let pair = |at: usize| s.add(at).cast::<u64>().read_unaligned();
                    let (first, last) = (pair(0), pair(n - 2));
                    d.cast::<u64>().write_unaligned(first);
                    d.add(n - 2).cast::<u64>().write_unaligned(last);
                } else if n == 1 {
                    *d = *s;
                }
            }
        });
    }

    col2im_runs!("avx2", |d, s, n, j| {});
}

/// Single-threaded, or the library's cached thread count for products of a million
/// multiply-adds.
pub(super) fn parallelism(multiply_adds: usize) -> gemm::Parallelism {
    crate::threads::gemm_parallelism(multiply_adds, 1 << 20)
}

#[cfg(test)]
mod tests {
    use super::Conv;
    use candle_core::{DType, Device, Tensor};

    /// Largest absolute difference between two tensors of the same shape.
    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.dims(), b.dims());
        let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
        d.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Forward, input gradient and weight gradient agree with candle (its conv2d, and
    /// candle's own backprop through it) for padding, stride, dilation, odd sizes, a
    /// transposed input and several chunks of the batch, in f64 and f32.
    #[test]
    fn matches_candle() -> crate::Result<()> {
        let dev = Device::Cpu;
        let cases = [
            // (n, c_in, h, w, c_out, kh, kw, padding, stride, dilation)
            (2, 3, 7, 6, 4, 3, 3, 0, 1, 1),
            (3, 2, 9, 8, 5, 3, 2, 1, 1, 1),
            (1, 2, 9, 9, 3, 3, 3, 2, 2, 1),
            (2, 1, 10, 7, 2, 2, 3, 1, 1, 2),
            (2, 2, 11, 11, 3, 3, 3, 3, 3, 2),
            (5, 3, 4, 4, 2, 4, 4, 0, 1, 1),
            (5, 8, 40, 40, 2, 3, 3, 1, 1, 1),
            // Few positions per image: the weight gradient goes by chunks (18, 18, 18, 6).
            (60, 64, 5, 5, 4, 3, 3, 1, 1, 1),
            // Many: the forward writes each image's product in place, in two chunks.
            (50, 1, 28, 28, 4, 3, 3, 0, 1, 1),
        ];
        for (i, &(n, c_in, h, w, c_out, kh, kw, padding, stride, dilation)) in
            cases.iter().enumerate()
        {
            let conv = Conv {
                tasks: None,
                n,
                c_in,
                h,
                w,
                c_out,
                kh,
                kw,
                padding,
                stride,
                dilation,
            };
            for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-3)] {
                let x = Tensor::randn(0f64, 1.0, (c_in, n, h, w), &dev)?
                    .transpose(0, 1)?
                    .to_dtype(dtype)?;
                let k = Tensor::randn(0f64, 1.0, (c_out, c_in, kh, kw), &dev)?.to_dtype(dtype)?;
                let theirs = x.conv2d(&k, padding, stride, dilation, 1)?;
                let geometry = (padding, stride, dilation);
                let ours = super::conv2d(&x, &k, None, geometry, false)?.expect("CPU");
                assert!(max_diff(&ours, &theirs) < tol, "case {i} {dtype:?} forward");
                // The bias added on the way out equals a broadcast add, bit for bit.
                let b = Tensor::randn(0f64, 1.0, c_out, &dev)?.to_dtype(dtype)?;
                let biased = super::conv2d(&x, &k, Some(&b), geometry, false)?.expect("CPU");
                let added = ours.broadcast_add(&b.reshape((1, c_out, 1, 1))?)?;
                assert_eq!(max_diff(&biased, &added), 0.0, "case {i} {dtype:?} bias");

                let gy = Tensor::randn(0f64, 1.0, theirs.dims(), &dev)?.to_dtype(dtype)?;
                let (xv, kv) = (
                    candle_core::Var::from_tensor(&x)?,
                    candle_core::Var::from_tensor(&k)?,
                );
                let y = xv.conv2d(&kv, padding, stride, dilation, 1)?;
                let grads = (y * &gy)?.sum_all()?.backward()?;
                let dx = super::input_grad(&conv, &gy, &k)?.expect("CPU");
                let dw = super::weight_grad(&conv, &x, &gy)?.expect("CPU");
                let scale = |t: &Tensor| max_diff(t, &t.zeros_like().unwrap()).max(1.0);
                let (dx_ref, dw_ref) = (grads.get(&xv).unwrap(), grads.get(&kv).unwrap());
                assert!(
                    max_diff(&dx, dx_ref) < tol * scale(dx_ref),
                    "case {i} {dtype:?} dx"
                );
                assert!(
                    max_diff(&dw, dw_ref) < tol * scale(dw_ref),
                    "case {i} {dtype:?} dw"
                );
            }
        }
        Ok(())
    }

    /// With a task axis, each task's forward, input gradient and weight gradient are the
    /// plain kernels' on that task's operands, bit for bit (f64 and f32; with and without
    /// padding, which decides whether the column buffer is zeroed).
    #[test]
    fn tasks_match_each_task_alone() -> crate::Result<()> {
        let dev = Device::Cpu;
        let (tasks, n, c_in, c_out, kh, kw) = (3, 4, 2, 3, 3, 2);
        // 8 x 8 = 64 output positions without padding: products written in place.
        for (h, w, padding) in [(7, 6, 0), (7, 6, 1), (10, 9, 0)] {
            for dtype in [DType::F64, DType::F32] {
                let x = Tensor::randn(0f64, 1.0, (tasks, n, c_in, h, w), &dev)?.to_dtype(dtype)?;
                let k = Tensor::randn(0f64, 1.0, (tasks, c_out, c_in, kh, kw), &dev)?
                    .to_dtype(dtype)?;
                let geometry = |tasks: Option<usize>| Conv {
                    tasks,
                    n,
                    c_in,
                    h,
                    w,
                    c_out,
                    kh,
                    kw,
                    padding,
                    stride: 1,
                    dilation: 1,
                };
                let b = Tensor::randn(0f64, 1.0, (tasks, c_out), &dev)?.to_dtype(dtype)?;
                let y = super::conv2d(&x, &k, Some(&b), (padding, 1, 1), true)?.expect("CPU");
                let gy = Tensor::randn(0f64, 1.0, y.dims(), &dev)?.to_dtype(dtype)?;
                let dx = super::input_grad(&geometry(Some(tasks)), &gy, &k)?.expect("CPU");
                let dw = super::weight_grad(&geometry(Some(tasks)), &x, &gy)?.expect("CPU");
                for t in 0..tasks {
                    let (xt, kt, gyt) = (x.get(t)?, k.get(t)?, gy.get(t)?);
                    let alone = geometry(None);
                    let y1 = super::conv2d(&xt, &kt, Some(&b.get(t)?), (padding, 1, 1), false)?
                        .expect("CPU");
                    let dx1 = super::input_grad(&alone, &gyt, &kt)?.expect("CPU");
                    let dw1 = super::weight_grad(&alone, &xt, &gyt)?.expect("CPU");
                    for (what, a, b) in [("y", &y, y1), ("dx", &dx, dx1), ("dw", &dw, dw1)] {
                        let a = a
                            .get(t)?
                            .flatten_all()?
                            .to_dtype(DType::F64)?
                            .to_vec1::<f64>()?;
                        let b = b.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                        assert_eq!(a, b, "task {t} {what} padding {padding} {dtype:?}");
                    }
                }
            }
        }
        Ok(())
    }

    /// im2col and col2im of f32 (AVX-512 runs at stride 1 where the CPU has it) equal the
    /// element-by-element definitions bit for bit: runs shorter and longer than a vector,
    /// padding that clips them, dilation, and a column offset.
    #[test]
    fn f32_runs_match_the_scalar_definitions() {
        let cases = [
            // (c_in, h, w, kh, kw, padding, dilation)
            (2, 5, 3, 3, 3, 1, 1),
            (3, 14, 14, 3, 3, 1, 1),
            (1, 28, 28, 3, 3, 1, 1),
            (2, 9, 40, 3, 2, 2, 2),
            (1, 7, 17, 1, 1, 0, 1),
            // Runs of 1, 4, 6, 8, 10 and 16 values: every branch of the AVX2 copy.
            (1, 4, 1, 1, 1, 0, 1),
            (2, 6, 6, 3, 3, 0, 1),
            (1, 3, 7, 1, 2, 0, 1),
            (1, 5, 9, 3, 2, 0, 1),
            (1, 4, 12, 1, 3, 0, 1),
            (1, 3, 18, 1, 3, 0, 1),
        ];
        for &(c_in, h, w, kh, kw, padding, dilation) in &cases {
            let conv = Conv {
                tasks: None,
                n: 2,
                c_in,
                h,
                w,
                c_out: 1,
                kh,
                kw,
                padding,
                stride: 1,
                dilation,
            };
            let (k, l) = (conv.k(), conv.ho() * conv.wo());
            let value = |i: usize| ((i * 7919) % 1000) as f32 / 37.0 - 13.0;
            let image: Vec<f32> = (0..c_in * h * w).map(value).collect();
            let (mut fast, mut slow) = (vec![0.5f32; k * 3 * l], vec![0.5f32; k * 3 * l]);
            conv.im2col(&image, &mut fast, 3 * l, l);
            conv.im2col_scalar(&image, &mut slow, 3 * l, l);
            assert_eq!(fast, slow, "im2col {:?}", (c_in, h, w, kh, kw));
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                let mut avx2 = vec![0.5f32; k * 3 * l];
                // SAFETY: the CPU has AVX2.
                unsafe { super::runs_avx2::im2col(&conv, &image, &mut avx2, 3 * l, l) };
                assert_eq!(avx2, slow, "AVX2 im2col {:?}", (c_in, h, w, kh, kw));
            }
            let cols: Vec<f32> = (0..k * 3 * l).map(|i| value(i + 5)).collect();
            let (mut fast, mut slow) = (image.clone(), image.clone());
            conv.col2im(&cols, &mut fast, 3 * l, l);
            conv.col2im_scalar(&cols, &mut slow, 3 * l, l);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&fast),
                bits(&slow),
                "col2im {:?}",
                (c_in, h, w, kh, kw)
            );
            // The AVX2 kernel too where the dispatch above took AVX-512.
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                let mut avx2 = image.clone();
                // SAFETY: the CPU has AVX2.
                unsafe { super::runs_avx2::col2im(&conv, &cols, &mut avx2, 3 * l, l) };
                assert_eq!(bits(&avx2), bits(&slow), "AVX2 col2im {:?}", (c_in, h, w));
            }
        }
    }
}
