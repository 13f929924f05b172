//! Matrix products: 2-D, and batched with broadcast batch dimensions.

use candle_core::{DType, Device, Storage, WithDType};

use super::cpu_gemm::{matmul_into, Strided};
use crate::autograd::{Backward, VjpCtx};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

struct Matmul;

impl Backward for Matmul {
    fn name(&self) -> &'static str {
        "matmul"
    }

    /// For C = A B: dA = G B^T, dB = A^T G, each summed over broadcast batch dims.
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let (a, b, g) = (&ctx.inputs[0], &ctx.inputs[1], ctx.grad);
        let ga = ctx.needs[0]
            .then(|| g.matmul(&b.t()?)?.sum_to(a.dims()))
            .transpose()?;
        let gb = ctx.needs[1]
            .then(|| a.t()?.matmul(g)?.sum_to(b.dims()))
            .transpose()?;
        Ok(vec![ga, gb])
    }
}

impl Tensor {
    /// Matrix product of the last two dims; leading (batch) dims broadcast as in PyTorch.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.check_same(rhs, "matmul")?;
        self.require_float("matmul")?;
        let (a, b) = (self.dims(), rhs.dims());
        if a.len() < 2 || b.len() < 2 || a[a.len() - 1] != b[b.len() - 2] {
            return Err(Error::ShapeMismatch {
                op: "matmul",
                expected: format!(
                    "[.., k, n] with k matching the last dim of the left operand {a:?}"
                ),
                got: b.to_vec(),
            });
        }
        if self.elem_count() == 0 || rhs.elem_count() == 0 {
            let batch =
                super::binary::broadcast_shape("matmul", &a[..a.len() - 2], &b[..b.len() - 2])?;
            let mut shape = batch;
            shape.extend_from_slice(&[a[a.len() - 2], b[b.len() - 1]]);
            return super::connected_zeros(&shape, self, &[self, rhs]);
        }
        let value = if a.len() == 2 && b.len() == 2 {
            match small_cpu_matmul(self.value(), rhs.value())? {
                Some(v) => v,
                None => self.value().matmul(rhs.value())?,
            }
        } else {
            let batch =
                super::binary::broadcast_shape("matmul", &a[..a.len() - 2], &b[..b.len() - 2])?;
            // candle's batched matmul takes one batch stride per operand, so an operand
            // stretched along some of several batch dims is materialised.
            let expand = |t: &candle_core::Tensor, d: &[usize]| -> Result<candle_core::Tensor> {
                let mut shape = batch.clone();
                shape.extend_from_slice(&d[d.len() - 2..]);
                let t = if shape == d {
                    t.clone()
                } else {
                    t.broadcast_as(shape.as_slice())?
                };
                if batch_collapses(&t) {
                    Ok(t)
                } else {
                    Ok(t.contiguous()?)
                }
            };
            let (ea, eb) = (expand(self.value(), a)?, expand(rhs.value(), b)?);
            match small_cpu_bmm(&ea, &eb)? {
                Some(v) => v,
                None => ea.matmul(&eb)?,
            }
        };
        Tensor::from_op(value, &[self, rhs], Matmul)
    }
}

/// Whether the batch dims of `t` (all but the last two) step through memory as one
/// dimension would, which candle's batched matmul requires.
fn batch_collapses(t: &candle_core::Tensor) -> bool {
    let (dims, stride) = (t.dims(), t.stride());
    let nb = dims.len().saturating_sub(2);
    (1..nb).all(|i| dims[i - 1] == 1 || stride[i - 1] == stride[i] * dims[i])
}

/// gemm runs single-threaded below this many multiply-adds (its own threshold), so candle's
/// thread-count lookup, which re-reads `/proc/cpuinfo` on each call when
/// `RAYON_NUM_THREADS` is unset (30-45 us against 1 us for 10x40 by 40x40), buys nothing.
const SMALL_MATMUL: usize = 48 * 48 * 256;

/// A 2-D CPU f32/f64 product below [`SMALL_MATMUL`], computed by calling gemm directly
/// without parallelism, exactly as candle's CPU backend calls it (same kernel, same
/// result); `None` when the fast path does not apply.
fn small_cpu_matmul(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
) -> Result<Option<candle_core::Tensor>> {
    if !a.device().is_cpu()
        || !b.device().is_cpu()
        || a.rank() != 2
        || b.rank() != 2
        || !super::kernels::cpu_fast_paths()
    {
        return Ok(None);
    }
    let ((m, k), n) = (a.dims2()?, b.dim(1)?);
    if m * n * k >= SMALL_MATMUL || m * n * k == 0 || b.dim(0)? != k {
        return Ok(None);
    }
    match a.dtype() {
        DType::F32 => gemm_no_threads::<f32>(a, b, m, n, k).map(Some),
        DType::F64 => gemm_no_threads::<f64>(a, b, m, n, k).map(Some),
        _ => Ok(None),
    }
}

/// A 3-D CPU f32/f64 batched product whose per-batch products are below
/// [`SMALL_MATMUL`], by one direct gemm call per batch entry (any strides, a stretched
/// batch included) into one buffer, as [`small_cpu_matmul`] does for 2-D; `None` when the
/// fast path does not apply.
pub(crate) fn small_cpu_bmm(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
) -> Result<Option<candle_core::Tensor>> {
    small_cpu_bmm_plus_rows(a, b, None)
}

/// [`small_cpu_bmm`] plus, when given, `rows` `[batch, n]` added to every row of entry
/// `i` (a per-task bias, added by gemm itself: the output starts as the bias rows and the
/// product accumulates onto them).
pub(crate) fn small_cpu_bmm_plus_rows(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
    rows: Option<&candle_core::Tensor>,
) -> Result<Option<candle_core::Tensor>> {
    if !a.device().is_cpu()
        || !b.device().is_cpu()
        || a.rank() != 3
        || b.rank() != 3
        || !super::kernels::cpu_fast_paths()
    {
        return Ok(None);
    }
    let ((batch, m, k), (batch_b, k_b, n)) = (a.dims3()?, b.dims3()?);
    if batch != batch_b || k != k_b || m * n * k >= SMALL_MATMUL || m * n * k == 0 {
        return Ok(None);
    }
    let rows = match rows {
        Some(r) if r.dims() != [batch, n] || !r.device().is_cpu() || r.dtype() != a.dtype() => {
            return Ok(None)
        }
        Some(r) => Some(r.contiguous()?),
        None => None,
    };
    match a.dtype() {
        DType::F32 => bmm_no_threads::<f32>(a, b, rows.as_ref(), (batch, m, n, k)).map(Some),
        DType::F64 => bmm_no_threads::<f64>(a, b, rows.as_ref(), (batch, m, n, k)).map(Some),
        _ => Ok(None),
    }
}

fn bmm_no_threads<T: WithDType>(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
    rows: Option<&candle_core::Tensor>,
    (batch, m, n, k): (usize, usize, usize, usize),
) -> Result<candle_core::Tensor> {
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (Storage::Cpu(ca), Storage::Cpu(cb)) = (&*sa, &*sb) else {
        return Ok(a.matmul(b)?);
    };
    let (lhs, rhs) = (ca.as_slice::<T>()?, cb.as_slice::<T>()?);
    let (ta, tb) = (la.stride(), lb.stride());
    let mut dst = match rows {
        Some(r) => {
            let (sr, lr) = r.storage_and_layout();
            let Storage::Cpu(cr) = &*sr else {
                return Ok(a.matmul(b)?.broadcast_add(&r.unsqueeze(1)?)?);
            };
            let r = &cr.as_slice::<T>()?[lr.start_offset()..][..batch * n];
            let mut dst = Vec::with_capacity(batch * m * n);
            for bias in r.chunks_exact(n) {
                for _ in 0..m {
                    dst.extend_from_slice(bias);
                }
            }
            dst
        }
        None => vec![T::from_f64(0.0); batch * m * n],
    };
    let accumulate = rows.is_some();
    for (i, out) in dst.chunks_exact_mut(m * n).enumerate() {
        let (oa, ob) = (la.start_offset() + i * ta[0], lb.start_offset() + i * tb[0]);
        fn view<'a, T>(data: &'a [T], offset: usize, stride: &[usize]) -> Result<Strided<'a, T>> {
            let data = data.get(offset..).ok_or_else(|| Error::InvalidArgument {
                op: "matmul",
                message: "a batch entry lies outside its storage".into(),
            })?;
            Ok(Strided {
                data,
                row_stride: stride[1],
                col_stride: stride[2],
            })
        }
        matmul_into(
            (m, n, k),
            view(lhs, oa, ta)?,
            view(rhs, ob, tb)?,
            out,
            accumulate,
            gemm::Parallelism::None,
        )?;
    }
    drop((sa, sb));
    Ok(candle_core::Tensor::from_vec(
        dst,
        (batch, m, n),
        &Device::Cpu,
    )?)
}

fn gemm_no_threads<T: WithDType>(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
    m: usize,
    n: usize,
    k: usize,
) -> Result<candle_core::Tensor> {
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (Storage::Cpu(ca), Storage::Cpu(cb)) = (&*sa, &*sb) else {
        return Ok(a.matmul(b)?);
    };
    let (lhs, rhs) = (ca.as_slice::<T>()?, cb.as_slice::<T>()?);
    let (lhs, rhs) = (&lhs[la.start_offset()..], &rhs[lb.start_offset()..]);
    let mut dst = vec![T::from_f64(0.0); m * n];
    let view = |data, stride: &[usize]| Strided {
        data,
        row_stride: stride[0],
        col_stride: stride[1],
    };
    matmul_into(
        (m, n, k),
        view(lhs, la.stride()),
        view(rhs, lb.stride()),
        &mut dst,
        false,
        gemm::Parallelism::None,
    )?;
    drop((sa, sb));
    Ok(candle_core::Tensor::from_vec(dst, (m, n), &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    /// The direct gemm call gives candle's own product, bit for bit, for plain and
    /// transposed views, in f32 and f64.
    #[test]
    fn small_matmul_equals_candle() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            for (m, k, n) in [(10, 40, 40), (1, 1, 1), (7, 3, 5), (40, 40, 1)] {
                let a = Tensor::randn(0f32, 1.0, (m, k), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let b = Tensor::randn(0f32, 1.0, (k, n), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let at = a.t().unwrap().contiguous().unwrap().t().unwrap();
                let bt = b.t().unwrap().contiguous().unwrap().t().unwrap();
                for (x, y) in [(&a, &b), (&at, &b), (&a, &bt), (&at, &bt)] {
                    let fast = super::small_cpu_matmul(x, y).unwrap().unwrap();
                    let reference = x.matmul(y).unwrap();
                    let diff = (fast - reference)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .max(0)
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap();
                    assert_eq!(diff, 0.0, "{dtype:?} {m}x{k}x{n}");
                }
            }
        }
        // Batched: each batch entry agrees with candle's 2-D product of its views to
        // rounding (gemm may block a strided entry differently), for plain, transposed and
        // stretched (stride-0) operands.
        for dtype in [DType::F32, DType::F64] {
            let a = Tensor::randn(0f32, 1.0, (3, 4, 5), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let b = Tensor::randn(0f32, 1.0, (3, 6, 5), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let bt = b.transpose(1, 2).unwrap();
            let one = Tensor::randn(0f32, 1.0, (1, 5, 2), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let stretched = one.broadcast_as((3, 5, 2)).unwrap();
            for (x, y) in [(&a, &bt), (&a, &stretched)] {
                let fast = super::small_cpu_bmm(x, y).unwrap().unwrap();
                let entries: Vec<Tensor> = (0..3)
                    .map(|i| x.get(i).unwrap().matmul(&y.get(i).unwrap()).unwrap())
                    .collect();
                let reference = Tensor::stack(&entries, 0).unwrap();
                let diff = (fast - reference)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                let tol = if dtype == DType::F32 { 1e-6 } else { 1e-14 };
                assert!(diff <= tol, "{dtype:?} batched {:?}: {diff}", y.stride());
            }
        }
        // Large products and other dtypes go to candle.
        let big = Tensor::zeros((256, 256), DType::F32, &dev).unwrap();
        assert!(super::small_cpu_matmul(&big, &big).unwrap().is_none());
        let ints = Tensor::zeros((2, 2), DType::U32, &dev).unwrap();
        assert!(super::small_cpu_matmul(&ints, &ints).unwrap().is_none());
    }
}
