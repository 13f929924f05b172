//! Reductions: sum, mean, max, min over dimensions, and `sum_to` (the inverse of
//! broadcasting).

use candle_core::DType;

use crate::autograd::{Backward, VjpCtx};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

fn check_dims(op: &'static str, t: &Tensor, dims: &[usize]) -> Result<()> {
    if let Some(&d) = dims.iter().find(|&&d| d >= t.rank()) {
        return Err(Error::InvalidArgument {
            op,
            message: format!("dimension {d} out of range for shape {:?}", t.dims()),
        });
    }
    // PyTorch: "dim 1 appears multiple times in the list of dims" (a mean would divide by
    // its size twice).
    let repeated = (1..dims.len()).find(|&i| dims[..i].contains(&dims[i]));
    if let Some(d) = repeated.map(|i| dims[i]) {
        return Err(Error::InvalidArgument {
            op,
            message: format!("dimension {d} appears more than once in {dims:?}"),
        });
    }
    Ok(())
}

/// A reduction with no identity (max, argmax, ...) has no value over an empty `dim`
/// (PyTorch: "Expected reduction dim 1 to have non-zero size").
pub(crate) fn check_not_empty(op: &'static str, t: &Tensor, dim: usize) -> Result<()> {
    if t.dims()[dim] == 0 {
        return Err(Error::InvalidArgument {
            op,
            message: format!("dimension {dim} of shape {:?} is empty", t.dims()),
        });
    }
    Ok(())
}

/// The shape with `dims` set to 1.
fn keepdim_shape(dims_in: &[usize], dims: &[usize]) -> Vec<usize> {
    let mut s = dims_in.to_vec();
    for &d in dims {
        s[d] = 1;
    }
    s
}

struct Sum {
    keepdim_shape: Vec<usize>,
}

impl Backward for Sum {
    fn name(&self) -> &'static str {
        "sum"
    }

    /// The gradient of a sum is the output gradient broadcast back over the summed dims.
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let g = ctx.grad.reshape(&self.keepdim_shape)?;
        Ok(vec![Some(g.broadcast_as(ctx.inputs[0].dims())?)])
    }
}

struct Extremum {
    keepdim_shape: Vec<usize>,
}

impl Backward for Extremum {
    fn name(&self) -> &'static str {
        "max/min"
    }

    /// The gradient goes to the elements equal to the extremum, shared evenly among ties
    /// (`torch.amax` semantics).
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let x = ctx.inputs[0].value();
        let y = ctx.output.value().reshape(self.keepdim_shape.as_slice())?;
        let mask = x.broadcast_eq(&y)?.to_dtype(x.dtype())?;
        let dims: Vec<usize> = (0..x.rank())
            .filter(|&d| self.keepdim_shape[d] != x.dims()[d] || x.dims()[d] == 1)
            .collect();
        let count = mask.sum_keepdim(dims)?;
        let weights = mask.broadcast_div(&count)?;
        let g = ctx.grad.reshape(&self.keepdim_shape)?;
        Ok(vec![Some(g.mul(Tensor::new(weights))?)])
    }
}

/// Sum over `dims` with kept dims, reducing the trailing run of summed dims first.
///
/// candle sums contiguous trailing dims quickly but anything else through a generic
/// strided loop (for a BatchNorm gradient, `[75, 64, 26, 26]` summed over dims 0, 2 and 3,
/// the generic loop took half of a MAML-Omniglot meta-iteration). Merging adjacent dims
/// and summing the trailing summed run first leaves only a small tensor for the rest.
fn sum_keepdim_value(v: &candle_core::Tensor, dims: &[usize]) -> Result<candle_core::Tensor> {
    let shape = v.dims().to_vec();
    let summed = |d: usize| dims.contains(&d) && shape[d] != 1;
    let last_kept = (0..shape.len()).rev().find(|&d| !summed(d));
    let trailing_start = last_kept.map_or(0, |d| d + 1);
    let leading_summed: Vec<usize> = (0..trailing_start).filter(|&d| summed(d)).collect();
    if trailing_start == shape.len() || leading_summed.is_empty() {
        return Ok(v.sum_keepdim(dims.to_vec())?);
    }
    // Sum the trailing run as one contiguous last dim, then the rest.
    let inner: usize = shape[trailing_start..].iter().product();
    let mut merged = shape[..trailing_start].to_vec();
    merged.push(inner);
    let partial = v
        .contiguous()?
        .reshape(merged)?
        .sum_keepdim(trailing_start)?;
    let mut out_shape = shape.clone();
    for d in dims {
        out_shape[*d] = 1;
    }
    let rest = partial.sum_keepdim(leading_summed)?;
    Ok(rest.reshape(out_shape)?)
}

impl Tensor {
    /// Sum over `dims`, keeping them as size 1 when `keepdim`. u8 and u32 tensors sum in
    /// i64, as PyTorch's integer sums.
    pub fn sum_dims(&self, dims: &[usize], keepdim: bool) -> Result<Tensor> {
        check_dims("sum", self, dims)?;
        if matches!(self.dtype(), DType::U8 | DType::U32) {
            // PyTorch sums integers in int64 (candle's u8 sums overflowed).
            return self.to_dtype(DType::I64)?.sum_dims(dims, keepdim);
        }
        let keep = keepdim_shape(self.dims(), dims);
        let mut value = sum_keepdim_value(self.value(), dims)?;
        if !keepdim {
            let out: Vec<usize> = (0..self.rank())
                .filter(|d| !dims.contains(d))
                .map(|d| self.dims()[d])
                .collect();
            value = value.reshape(out)?;
        }
        Tensor::from_op(
            value,
            &[self],
            Sum {
                keepdim_shape: keep,
            },
        )
    }

    /// Sum over one dimension, removing it.
    pub fn sum(&self, dim: usize) -> Result<Tensor> {
        self.sum_dims(&[dim], false)
    }

    /// Sum over one dimension, keeping it as size 1.
    pub fn sum_keepdim(&self, dim: usize) -> Result<Tensor> {
        self.sum_dims(&[dim], true)
    }

    /// Sum of all elements, as a 0-dim tensor.
    pub fn sum_all(&self) -> Result<Tensor> {
        let dims: Vec<usize> = (0..self.rank()).collect();
        self.sum_dims(&dims, false)
    }

    /// Mean over `dims` (floating point tensors only, as PyTorch).
    pub fn mean_dims(&self, dims: &[usize], keepdim: bool) -> Result<Tensor> {
        self.require_float("mean")?;
        check_dims("mean", self, dims)?;
        let n: usize = dims.iter().map(|&d| self.dims()[d]).product();
        self.sum_dims(dims, keepdim)?.affine(1.0 / n as f64, 0.0)
    }

    /// Mean over one dimension, removing it.
    pub fn mean(&self, dim: usize) -> Result<Tensor> {
        self.mean_dims(&[dim], false)
    }

    /// Mean over one dimension, keeping it as size 1.
    pub fn mean_keepdim(&self, dim: usize) -> Result<Tensor> {
        self.mean_dims(&[dim], true)
    }

    /// Mean of all elements, as a 0-dim tensor.
    pub fn mean_all(&self) -> Result<Tensor> {
        let dims: Vec<usize> = (0..self.rank()).collect();
        self.mean_dims(&dims, false)
    }

    fn extremum(&self, dim: usize, keepdim: bool, max: bool) -> Result<Tensor> {
        let op = if max { "max" } else { "min" };
        check_dims(op, self, &[dim])?;
        check_not_empty(op, self, dim)?;
        let keep = keepdim_shape(self.dims(), &[dim]);
        if self.elem_count() == 0 {
            // Another dim is empty: so is the result (candle's reduction takes no empty
            // tensor).
            let mut shape = keep;
            if !keepdim {
                shape.remove(dim);
            }
            return super::connected_zeros(&shape, self, &[self]);
        }
        let x = self.value();
        let mut value = if max {
            x.max_keepdim(dim)?
        } else {
            x.min_keepdim(dim)?
        };
        // candle skips NaN; PyTorch's max/min is NaN wherever the slice holds one.
        if super::nan::has_nan(x)? {
            let nan_in_slice = super::nan::nan_mask(x)?.max_keepdim(dim)?;
            value = super::nan::set_nan_where(&nan_in_slice, &value)?;
        }
        let value = if keepdim { value } else { value.squeeze(dim)? };
        Tensor::from_op(
            value,
            &[self],
            Extremum {
                keepdim_shape: keep,
            },
        )
    }

    /// Maximum over one dimension, removing it; ties share the gradient evenly. A slice
    /// holding a NaN gives NaN, as in PyTorch.
    pub fn max(&self, dim: usize) -> Result<Tensor> {
        self.extremum(dim, false, true)
    }

    /// Maximum over one dimension, keeping it as size 1.
    pub fn max_keepdim(&self, dim: usize) -> Result<Tensor> {
        self.extremum(dim, true, true)
    }

    /// Minimum over one dimension, removing it; ties share the gradient evenly. A slice
    /// holding a NaN gives NaN, as in PyTorch.
    pub fn min(&self, dim: usize) -> Result<Tensor> {
        self.extremum(dim, false, false)
    }

    /// Minimum over one dimension, keeping it as size 1.
    pub fn min_keepdim(&self, dim: usize) -> Result<Tensor> {
        self.extremum(dim, true, false)
    }

    /// Sums a broadcast result back to `shape` (the dims that broadcasting added or
    /// stretched); the identity when the shapes already agree.
    pub fn sum_to(&self, shape: &[usize]) -> Result<Tensor> {
        if self.dims() == shape {
            return Ok(self.clone());
        }
        let lead = self
            .rank()
            .checked_sub(shape.len())
            .ok_or_else(|| Error::ShapeMismatch {
                op: "sum_to",
                expected: format!("a shape that broadcasts to {:?}", self.dims()),
                got: shape.to_vec(),
            })?;
        let mut dims: Vec<usize> = (0..lead).collect();
        for (i, &s) in shape.iter().enumerate() {
            if s == 1 && self.dims()[lead + i] != 1 {
                dims.push(lead + i);
            } else if s != self.dims()[lead + i] {
                return Err(Error::ShapeMismatch {
                    op: "sum_to",
                    expected: format!("a shape that broadcasts to {:?}", self.dims()),
                    got: shape.to_vec(),
                });
            }
        }
        // Dims of size 1 only (one task, a batch of one): nothing to add.
        if dims.iter().all(|&d| self.dims()[d] == 1) {
            return self.reshape(shape);
        }
        let prefix = dims.iter().enumerate().all(|(i, &d)| i == d);
        if prefix && !dims.is_empty() && dims.len() < self.rank() && self.dtype().is_float() {
            let p: usize = self.dims()[..dims.len()].iter().product();
            if p > 1 {
                return self.sum_leading(p, shape);
            }
        }
        self.sum_dims(&dims, true)?.reshape(shape)
    }

    /// The sum of the `p` leading rows of `self` seen as `[p, r]`, shaped `shape` (bias,
    /// task and batch gradients): one recorded op.
    fn sum_leading(&self, p: usize, shape: &[usize]) -> Result<Tensor> {
        let value = sum_rows_value(self.value(), (1, p, self.elem_count() / p))?;
        Tensor::from_op(value.reshape(shape)?, &[self], SumRows { per_block: false })
    }

    /// The sum over the rows of each block of a `[blocks, rows, r]` tensor, `[blocks, r]`
    /// (a task-batched layer's bias gradient: each task's rows added in order, as
    /// [`Tensor::sum_to`] adds a plain layer's).
    pub(crate) fn sum_rows_per_block(&self) -> Result<Tensor> {
        let &[blocks, rows, r] = self.dims() else {
            return Err(Error::ShapeMismatch {
                op: "sum_rows_per_block",
                expected: "[blocks, rows, r]".into(),
                got: self.dims().to_vec(),
            });
        };
        let value = sum_rows_value(self.value(), (blocks, rows, r))?;
        Tensor::from_op(value, &[self], SumRows { per_block: true })
    }
}

/// `v` seen as `[blocks, p, r]` summed over `p`: `[blocks, r]`.
fn sum_rows_value(
    v: &candle_core::Tensor,
    (blocks, p, r): (usize, usize, usize),
) -> Result<candle_core::Tensor> {
    if v.device().is_cpu() && super::kernels::cpu_fast_paths() {
        match v.dtype() {
            DType::F32 => return sum_rows_cpu::<f32>(v, (blocks, p, r)),
            DType::F64 => return sum_rows_cpu::<f64>(v, (blocks, p, r)),
            _ => {}
        }
    }
    Ok(v.reshape((blocks, p, r))?.sum(1)?)
}

/// The rows of each block of a contiguous `[blocks, p, r]` view added in order (the sums
/// of the in-order chain `ones[1, p] x v` that the small product computed, bit for bit, in
/// one pass and without the ones).
fn sum_rows_cpu<T: candle_core::WithDType>(
    v: &candle_core::Tensor,
    (blocks, p, r): (usize, usize, usize),
) -> Result<candle_core::Tensor> {
    super::kernels::with_cpu_slice(v, |data: &[T]| {
        let mut acc = vec![T::zero(); blocks * r];
        if r > 0 && p > 0 {
            super::kernels::vectorized(|| {
                let per_block = data[..blocks * p * r].chunks_exact(p * r);
                for (sums, rows) in acc.chunks_exact_mut(r).zip(per_block) {
                    for row in rows.chunks_exact(r) {
                        for (a, &x) in sums.iter_mut().zip(row) {
                            *a += x;
                        }
                    }
                }
            });
        }
        Ok(candle_core::Tensor::from_vec(acc, (blocks, r), v.device())?)
    })
}

/// The node of [`Tensor::sum_to`]'s leading sum and of [`Tensor::sum_rows_per_block`]
/// (`per_block`): the gradient is the output's broadcast back over the summed rows (a view).
struct SumRows {
    per_block: bool,
}

impl Backward for SumRows {
    fn name(&self) -> &'static str {
        "sum_rows"
    }

    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let input = ctx.inputs[0].dims();
        let g = if self.per_block {
            // `[blocks, r]` to `[blocks, 1, r]`, which broadcasts to the input.
            ctx.grad.unsqueeze(1)?
        } else {
            ctx.grad.clone()
        };
        Ok(vec![Some(g.broadcast_as(input)?)])
    }
}

#[cfg(test)]
mod tests {
    use super::sum_keepdim_value;
    use crate::Tensor;

    /// A sum over leading dims adds the rows in order (the bits of the in-order chain the
    /// ones product gave), in f32 and f64, for a strided input, and for empty rows.
    #[test]
    fn leading_sums_add_the_rows_in_order() -> crate::Result<()> {
        let dev = candle_core::Device::Cpu;
        let (p, r) = (7, 37);
        let data: Vec<f64> = (0..p * r)
            .map(|i| ((i * 7919) % 1000) as f64 / 37.0 - 13.0)
            .collect();
        for dtype in [candle_core::DType::F64, candle_core::DType::F32] {
            let x = candle_core::Tensor::from_vec(data.clone(), (p, r), &dev)?.to_dtype(dtype)?;
            let rows: Vec<Vec<f64>> = x.to_dtype(candle_core::DType::F64)?.to_vec2()?;
            let want: Vec<f64> = (0..r)
                .map(|j| match dtype {
                    candle_core::DType::F32 => {
                        rows.iter().fold(0f32, |acc, row| acc + row[j] as f32) as f64
                    }
                    _ => rows.iter().fold(0f64, |acc, row| acc + row[j]),
                })
                .collect();
            let got = Tensor::new(x.clone()).sum_to(&[r])?.to_vec_f64()?;
            assert_eq!(got, want, "{dtype:?}");
            // The same sums from a transposed view of the transpose.
            let strided = Tensor::new(x.t()?.contiguous()?.t()?);
            assert_eq!(
                strided.sum_to(&[1, r])?.to_vec_f64()?,
                want,
                "{dtype:?} strided"
            );
        }
        let empty = Tensor::new(candle_core::Tensor::zeros(
            (3, 0),
            candle_core::DType::F32,
            &dev,
        )?);
        assert_eq!(empty.sum_to(&[0])?.dims(), [0]);
        Ok(())
    }

    /// Each block's rows are added in order, blocks apart; no blocks, no rows and one row
    /// give the right shapes and values.
    #[test]
    fn rows_per_block_add_in_order() -> crate::Result<()> {
        let dev = candle_core::Device::Cpu;
        let (blocks, p, r) = (3, 5, 9);
        let data: Vec<f32> = (0..blocks * p * r)
            .map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 13.0)
            .collect();
        let x = Tensor::new(candle_core::Tensor::from_vec(
            data.clone(),
            (blocks, p, r),
            &dev,
        )?);
        let got = x.sum_rows_per_block()?;
        assert_eq!(got.dims(), [blocks, r]);
        let want: Vec<f64> = (0..blocks * r)
            .map(|at| {
                let (b, j) = (at / r, at % r);
                (0..p).fold(0f32, |acc, i| acc + data[(b * p + i) * r + j]) as f64
            })
            .collect();
        assert_eq!(got.to_vec_f64()?, want);
        for (blocks, p) in [(0, 4), (2, 0), (2, 1)] {
            let x = Tensor::new(candle_core::Tensor::ones(
                (blocks, p, r),
                candle_core::DType::F64,
                &dev,
            )?);
            let sums = x.sum_rows_per_block()?;
            assert_eq!(sums.dims(), [blocks, r]);
            assert!(sums.to_vec_f64()?.iter().all(|&v| v == p as f64));
        }
        Ok(())
    }

    /// The trailing-first reduction equals candle's direct one for every pattern of summed
    /// dims of a 4-D tensor, contiguous or transposed.
    #[test]
    fn trailing_first_sum_matches_candle() {
        let n = 3 * 4 * 5 * 6;
        let data: Vec<f64> = (0..n)
            .map(|i| ((i * 37) % 101) as f64 / 7.0 - 5.0)
            .collect();
        let x =
            candle_core::Tensor::from_vec(data, (3, 4, 5, 6), &candle_core::Device::Cpu).unwrap();
        for x in [x.clone(), x.transpose(1, 3).unwrap()] {
            for mask in 1u32..16 {
                let dims: Vec<usize> = (0..4).filter(|d| mask & (1 << d) != 0).collect();
                let ours = sum_keepdim_value(&x, &dims).unwrap();
                let theirs = x.sum_keepdim(dims.clone()).unwrap();
                assert_eq!(ours.dims(), theirs.dims(), "dims {dims:?}");
                let diff = (ours - theirs)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap();
                let max = diff.max(0).unwrap().to_scalar::<f64>().unwrap();
                assert!(max < 1e-12, "dims {dims:?}: {max}");
            }
        }
    }
}
