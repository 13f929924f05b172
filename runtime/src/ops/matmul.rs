//! Matrix products: 2-D, and batched with broadcast batch dimensions.

use candle_core::{DType, Device, Storage, WithDType};

use super::cpu_gemm::{matmul_into, products, Strided};
use crate::autograd::{Backward, VjpCtx};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// `C = op(A) op(B)`, where `op` transposes the last two dims of an operand whose flag is
/// set; the inputs are kept as stored, so no transposed view becomes a node of the tape
/// (its gradient would be a strided view, and adding strided views is candle's slow path).
struct Matmul {
    transpose_a: bool,
    transpose_b: bool,
}

impl Backward for Matmul {
    fn name(&self) -> &'static str {
        "matmul"
    }

    /// dop(A) = G op(B)^T and dop(B) = op(A)^T G, each written as one product of the stored
    /// operands and summed over broadcast batch dims.
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let (a, b, g) = (&ctx.inputs[0], &ctx.inputs[1], ctx.grad);
        let (ta, tb) = (self.transpose_a, self.transpose_b);
        let ga = ctx.needs[0]
            .then(|| {
                if ta {
                    b.matmul_t(g, tb, true)?.sum_to(a.dims())
                } else {
                    g.matmul_t(b, false, !tb)?.sum_to(a.dims())
                }
            })
            .transpose()?;
        let gb = ctx.needs[1]
            .then(|| {
                if tb {
                    g.matmul_t(a, true, ta)?.sum_to(b.dims())
                } else {
                    a.matmul_t(g, !ta, false)?.sum_to(b.dims())
                }
            })
            .transpose()?;
        Ok(vec![ga, gb])
    }
}

impl Tensor {
    /// Matrix product of the last two dims; leading (batch) dims broadcast as in PyTorch.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.matmul_t(rhs, false, false)
    }

    /// `op(self) op(rhs)`, `op` transposing the last two dims of an operand whose flag is
    /// set (`self.t()?.matmul(rhs)` without a transposed view on the tape).
    pub(crate) fn matmul_t(
        &self,
        rhs: &Tensor,
        transpose_a: bool,
        transpose_b: bool,
    ) -> Result<Tensor> {
        self.check_same(rhs, "matmul")?;
        self.require_float("matmul")?;
        let op_dims = |t: &Tensor, transpose: bool| {
            let mut d = t.dims().to_vec();
            if transpose && d.len() >= 2 {
                let r = d.len();
                d.swap(r - 2, r - 1);
            }
            d
        };
        let (a, b) = (op_dims(self, transpose_a), op_dims(rhs, transpose_b));
        let (a, b) = (a.as_slice(), b.as_slice());
        if a.len() < 2 || b.len() < 2 || a[a.len() - 1] != b[b.len() - 2] {
            return Err(Error::ShapeMismatch {
                op: "matmul",
                expected: format!(
                    "[.., k, n] with k matching the last dim of the left operand {a:?}"
                ),
                got: b.to_vec(),
            });
        }
        let node = Matmul {
            transpose_a,
            transpose_b,
        };
        if self.elem_count() == 0 || rhs.elem_count() == 0 {
            let batch =
                super::binary::broadcast_shape("matmul", &a[..a.len() - 2], &b[..b.len() - 2])?;
            let mut shape = batch;
            shape.extend_from_slice(&[a[a.len() - 2], b[b.len() - 1]]);
            return super::connected_zeros(&shape, self, &[self, rhs]);
        }
        let view = |t: &Tensor, transpose: bool| -> Result<candle_core::Tensor> {
            Ok(if transpose {
                t.value().t()?
            } else {
                t.value().clone()
            })
        };
        let (va, vb) = (view(self, transpose_a)?, view(rhs, transpose_b)?);
        let value = if a.len() == 2 && b.len() == 2 {
            cpu_or_candle_matmul(&va, &vb)?
        } else {
            let batch =
                super::binary::broadcast_shape("matmul", &a[..a.len() - 2], &b[..b.len() - 2])?;
            let expand = |t: &candle_core::Tensor, d: &[usize]| -> Result<candle_core::Tensor> {
                let mut shape = batch.clone();
                shape.extend_from_slice(&d[d.len() - 2..]);
                Ok(if shape == d {
                    t.clone()
                } else {
                    t.broadcast_as(shape.as_slice())?
                })
            };
            let (ea, eb) = (expand(&va, a)?, expand(&vb, b)?);
            match cpu_batched_matmul(&ea, &eb)? {
                Some(v) => v,
                None => {
                    // candle's batched matmul takes one batch stride per operand, so an
                    // operand stretched along some of several batch dims is materialised.
                    let collapse = |t: candle_core::Tensor| -> Result<candle_core::Tensor> {
                        if batch_collapses(&t) {
                            Ok(t)
                        } else {
                            Ok(t.contiguous()?)
                        }
                    };
                    collapse(ea)?.matmul(&collapse(eb)?)?
                }
            }
        };
        Tensor::from_op(value, &[self, rhs], node)
    }
}

/// Whether the batch dims of `t` (all but the last two) step through memory as one
/// dimension would, which candle's batched matmul requires.
fn batch_collapses(t: &candle_core::Tensor) -> bool {
    let (dims, stride) = (t.dims(), t.stride());
    let nb = dims.len().saturating_sub(2);
    (1..nb).all(|i| dims[i - 1] == 1 || stride[i - 1] == stride[i] * dims[i])
}

/// gemm runs single-threaded below this many multiply-adds (its own threshold), so no
/// thread count is asked for below it.
const SMALL_MATMUL: usize = 48 * 48 * 256;

/// A 2-D product: through gemm on the CPU (f32/f64, fast paths on), else candle's.
pub(crate) fn cpu_or_candle_matmul(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
) -> Result<candle_core::Tensor> {
    match cpu_matmul(a, b)? {
        Some(v) => Ok(v),
        None => Ok(a.matmul(b)?),
    }
}

/// A 2-D CPU f32/f64 product computed by calling gemm directly, exactly as candle's CPU
/// backend calls it (same kernel, same result), with the library's cached thread count
/// instead of candle's per-call lookup (which re-reads `/proc/cpuinfo` on each call when
/// `RAYON_NUM_THREADS` is unset: 30-45 us against 1 us for 10x40 by 40x40); `None` when
/// the fast path does not apply.
fn cpu_matmul(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
) -> Result<Option<candle_core::Tensor>> {
    if a.rank() != 2 || b.rank() != 2 || !fast_path_applies(a, b) {
        return Ok(None);
    }
    let ((m, k), n) = (a.dims2()?, b.dim(1)?);
    if m * n * k == 0 || b.dim(0)? != k {
        return Ok(None);
    }
    match a.dtype() {
        DType::F32 => gemm_batches::<f32>(a, b, (1, m, n, k)).map(Some),
        DType::F64 => gemm_batches::<f64>(a, b, (1, m, n, k)).map(Some),
        _ => Ok(None),
    }
}

/// A batched CPU f32/f64 product of `[batch.., m, k]` by `[batch.., k, n]` (the same batch
/// dims, any strides, broadcast ones included), one gemm call per batch entry, with the
/// cached thread count; `None` when the fast path does not apply.
fn cpu_batched_matmul(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
) -> Result<Option<candle_core::Tensor>> {
    let rank = a.rank();
    if rank < 3 || b.rank() != rank || !fast_path_applies(a, b) {
        return Ok(None);
    }
    let (m, k, n) = (a.dims()[rank - 2], a.dims()[rank - 1], b.dims()[rank - 1]);
    if a.dims()[..rank - 2] != b.dims()[..rank - 2] || b.dims()[rank - 2] != k {
        return Ok(None);
    }
    let batches: usize = a.dims()[..rank - 2].iter().product();
    if batches * m * n * k == 0 {
        return Ok(None);
    }
    let rhs_invariant = b.dims()[..rank - 2]
        .iter()
        .zip(b.stride())
        .all(|(&d, &s)| d == 1 || s == 0);
    if rhs_invariant && a.is_contiguous() {
        // One product: the batches of `a` stack into the rows of a `[batches * m, k]`
        // matrix (as candle folds them), times the one matrix of `b`.
        // The one matrix as a view (squeezing keeps its strides; a reshape would copy a
        // transposed one).
        let mut single = b.clone();
        for _ in 0..rank - 2 {
            single = single.narrow(0, 0, 1)?.squeeze(0)?;
        }
        let product = cpu_or_candle_matmul(&a.reshape((batches * m, k))?, &single)?;
        let mut shape = a.dims()[..rank - 2].to_vec();
        shape.extend_from_slice(&[m, n]);
        return Ok(Some(product.reshape(shape)?));
    }
    match a.dtype() {
        DType::F32 => gemm_batches::<f32>(a, b, (batches, m, n, k)).map(Some),
        DType::F64 => gemm_batches::<f64>(a, b, (batches, m, n, k)).map(Some),
        _ => Ok(None),
    }
}

fn fast_path_applies(a: &candle_core::Tensor, b: &candle_core::Tensor) -> bool {
    a.device().is_cpu()
        && b.device().is_cpu()
        && a.dtype() == b.dtype()
        && super::kernels::cpu_fast_paths()
}

/// The offset of batch entry `index` (row-major over the batch dims) in a tensor's layout.
fn batch_offset(dims: &[usize], stride: &[usize], mut index: usize) -> usize {
    let nb = dims.len() - 2;
    let mut offset = 0;
    for d in (0..nb).rev() {
        offset += (index % dims[d]) * stride[d];
        index /= dims[d];
    }
    offset
}

fn gemm_batches<T: WithDType>(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
    (batches, m, n, k): (usize, usize, usize, usize),
) -> Result<candle_core::Tensor> {
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (Storage::Cpu(ca), Storage::Cpu(cb)) = (&*sa, &*sb) else {
        return Ok(a.matmul(b)?);
    };
    let (lhs, rhs) = (ca.as_slice::<T>()?, cb.as_slice::<T>()?);
    let (da, db) = (a.dims(), b.dims());
    let (ta, tb) = (la.stride(), lb.stride());
    let rank = da.len();
    let parallelism = crate::threads::gemm_parallelism(m * n * k, SMALL_MATMUL);
    let dst = products(
        batches,
        (m, n, k),
        |i| {
            let lhs = Strided {
                data: &lhs[la.start_offset() + batch_offset(da, ta, i)..],
                row_stride: ta[rank - 2],
                col_stride: ta[rank - 1],
            };
            let rhs = Strided {
                data: &rhs[lb.start_offset() + batch_offset(db, tb, i)..],
                row_stride: tb[rank - 2],
                col_stride: tb[rank - 1],
            };
            Ok((lhs, rhs))
        },
        parallelism,
    )?;
    drop((sa, sb));
    let mut shape = da[..rank - 2].to_vec();
    shape.extend_from_slice(&[m, n]);
    Ok(candle_core::Tensor::from_vec(dst, shape, &Device::Cpu)?)
}

/// A 3-D CPU f32/f64 batched product whose per-batch products are below
/// [`SMALL_MATMUL`], plus, when given, `rows` `[batch, n]` added to every row of entry `i`
/// (the task-batched linear's per-task bias, added by gemm itself: the output starts as the
/// bias rows and the product accumulates onto them); `None` when the fast path does not
/// apply.
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
        Some(r) => r.contiguous()?,
        // Without rows it is the plain batched product (single-threaded at this size).
        None => return cpu_batched_matmul(a, b),
    };
    match a.dtype() {
        DType::F32 => bmm_plus_rows::<f32>(a, b, &rows, (batch, m, n, k)).map(Some),
        DType::F64 => bmm_plus_rows::<f64>(a, b, &rows, (batch, m, n, k)).map(Some),
        _ => Ok(None),
    }
}

/// `a b` plus `rows[i]` added to every row of entry `i`: the output starts as the rows and
/// gemm accumulates each product onto them, one thread.
fn bmm_plus_rows<T: WithDType>(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
    rows: &candle_core::Tensor,
    (batch, m, n, k): (usize, usize, usize, usize),
) -> Result<candle_core::Tensor> {
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (sr, lr) = rows.storage_and_layout();
    let (Storage::Cpu(ca), Storage::Cpu(cb), Storage::Cpu(cr)) = (&*sa, &*sb, &*sr) else {
        return Ok(a.matmul(b)?.broadcast_add(&rows.unsqueeze(1)?)?);
    };
    let (lhs, rhs) = (ca.as_slice::<T>()?, cb.as_slice::<T>()?);
    let (ta, tb) = (la.stride(), lb.stride());
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
    let r = &cr.as_slice::<T>()?[lr.start_offset()..][..batch * n];
    let mut dst = Vec::with_capacity(batch * m * n);
    for bias in r.chunks_exact(n) {
        for _ in 0..m {
            dst.extend_from_slice(bias);
        }
    }
    for (i, out) in dst.chunks_exact_mut(m * n).enumerate() {
        let (oa, ob) = (la.start_offset() + i * ta[0], lb.start_offset() + i * tb[0]);
        let (lhs, rhs) = (view(lhs, oa, ta)?, view(rhs, ob, tb)?);
        matmul_into((m, n, k), lhs, rhs, out, true, gemm::Parallelism::None)?;
    }
    drop((sa, sb, sr));
    Ok(candle_core::Tensor::from_vec(
        dst,
        (batch, m, n),
        &Device::Cpu,
    )?)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
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
            .unwrap()
    }

    fn randn(shape: &[usize], dtype: DType) -> Tensor {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// Transposed in memory, same values: a view with swapped strides.
    fn transposed_view(t: &Tensor) -> Tensor {
        let r = t.rank();
        t.transpose(r - 2, r - 1)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(r - 2, r - 1)
            .unwrap()
    }

    /// Within rounding of candle's product, the same bits in either orientation
    /// (`(b^T a^T)^T`) and memory layout, in f32 and f64, small and large (threaded when the
    /// cached count says so). The small products' exact bits are the in-order definition
    /// (`small_gemm`'s own test).
    #[test]
    fn cpu_matmul_equals_candle() {
        for dtype in [DType::F32, DType::F64] {
            let eps = if dtype == DType::F32 { 1e-5 } else { 1e-13 };
            // The small AVX-512 kernel's shapes (any row count, widths around its
            // vector blocks, depths up to its limit) and gemm's (deep, large).
            for (m, k, n) in [
                (10, 40, 40),
                (1, 1, 1),
                (7, 3, 5),
                (40, 40, 1),
                (96, 300, 64),
                (1, 40, 40),
                (40, 1, 40),
                (13, 7, 8),
                (5, 100, 33),
                (4, 128, 16),
                (3, 129, 17),
                (9, 64, 47),
                (2, 5, 4),
                (16, 2, 4),
                (2, 2, 16),
                (4, 2, 16),
                (2, 3, 16),
                (1, 10, 40),
                (40, 10, 1),
                (10, 40, 1),
            ] {
                let a = randn(&[m, k], dtype);
                let b = randn(&[k, n], dtype);
                let (at, bt) = (transposed_view(&a), transposed_view(&b));
                let t = |x: &Tensor| x.t().unwrap();
                let mut first: Option<Tensor> = None;
                for (x, y) in [(&a, &b), (&at, &b), (&a, &bt), (&at, &bt)] {
                    let fast = super::cpu_matmul(x, y).unwrap().unwrap();
                    let reference = x.matmul(y).unwrap();
                    let scale = reference.abs().unwrap().max_all().unwrap();
                    let scale = scale
                        .to_dtype(DType::F64)
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap();
                    let d = max_diff(&fast, &reference);
                    assert!(d <= eps * scale.max(1.0), "{dtype:?} {m}x{k}x{n}: {d}");
                    // The transposed orientation, on the same memory.
                    let flipped = super::cpu_matmul(&t(y), &t(x)).unwrap().unwrap();
                    let flipped = flipped.t().unwrap();
                    let exact = first.get_or_insert_with(|| fast.clone());
                    if k <= 128 && m * n * k <= 48 * 48 * 256 {
                        assert_eq!(max_diff(&fast, exact), 0.0, "{dtype:?} {m}x{k}x{n} layout");
                        assert_eq!(
                            max_diff(&flipped, exact),
                            0.0,
                            "{dtype:?} {m}x{k}x{n} flipped"
                        );
                    }
                }
            }
        }
        let ints = Tensor::zeros((2, 2), DType::U32, &Device::Cpu).unwrap();
        assert!(super::cpu_matmul(&ints, &ints).unwrap().is_none());
    }

    /// The batched product, one gemm call per batch entry, equals candle's within rounding
    /// and each unbatched product exactly, with broadcast (stride 0) and transposed
    /// operands and two batch dims.
    #[test]
    fn cpu_batched_matmul_equals_candle() {
        // candle on the same layouts where it takes them (one batch stride per operand).
        let layout = |t: &Tensor| {
            if super::batch_collapses(t) {
                t.clone()
            } else {
                t.contiguous().unwrap()
            }
        };
        for dtype in [DType::F32, DType::F64] {
            let a = randn(&[3, 2, 5, 4], dtype);
            let b = randn(&[3, 2, 4, 6], dtype);
            let shared = randn(&[1, 2, 4, 6], dtype)
                .broadcast_as((3, 2, 4, 6))
                .unwrap();
            let invariant = randn(&[4, 6], dtype).broadcast_as((3, 2, 4, 6)).unwrap();
            let wide = randn(&[3, 2, 4, 19], dtype);
            let cases = [
                (a.clone(), wide.clone()),
                (transposed_view(&a), wide),
                (a.clone(), invariant),
                (a.clone(), b.clone()),
                (transposed_view(&a), b.clone()),
                (a.clone(), transposed_view(&b)),
                (a.clone(), shared.clone()),
            ];
            let eps = if dtype == DType::F32 { 1e-5 } else { 1e-13 };
            for (case, (x, y)) in cases.iter().enumerate() {
                let fast = super::cpu_batched_matmul(x, y).unwrap().unwrap();
                let reference = layout(x).matmul(&layout(y)).unwrap();
                assert_eq!(fast.dims(), reference.dims());
                assert!(
                    max_diff(&fast, &reference) <= eps * 10.0,
                    "{dtype:?} case {case}"
                );
                // Each batch entry is the unbatched product, bit for bit.
                for i in 0..x.dim(0).unwrap() {
                    for j in 0..x.dim(1).unwrap() {
                        let (xi, yi) = (
                            x.get(i).unwrap().get(j).unwrap(),
                            y.get(i).unwrap().get(j).unwrap(),
                        );
                        let alone = super::cpu_matmul(&xi, &yi).unwrap().unwrap();
                        let entry = fast.get(i).unwrap().get(j).unwrap();
                        assert_eq!(
                            max_diff(&entry, &alone),
                            0.0,
                            "{dtype:?} case {case} entry {i},{j}"
                        );
                    }
                }
            }
        }
    }
}
