//! Indexing: index_select and gather, and their adjoints index_add and scatter_add. Each
//! pair is the other's vector-Jacobian product, so derivatives of any order stay in the
//! family. Indices are an integer tensor (u8, u32 or i64) and never get a gradient.

use candle_core::DType;

use crate::autograd::{Backward, VjpCtx};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

fn check_indices(op: &'static str, t: &Tensor, indices: &Tensor, dim: usize) -> Result<()> {
    if !matches!(indices.dtype(), DType::U8 | DType::U32 | DType::I64) {
        return Err(Error::InvalidArgument {
            op,
            message: format!("indices must be u8, u32 or i64, got {:?}", indices.dtype()),
        });
    }
    if !t.device().same_device(indices.device()) {
        return Err(Error::DeviceMismatch {
            op,
            lhs: format!("{:?}", t.device().location()),
            rhs: format!("{:?}", indices.device().location()),
        });
    }
    if dim >= t.rank() {
        return Err(Error::InvalidArgument {
            op,
            message: format!("dimension {dim} out of range for shape {:?}", t.dims()),
        });
    }
    Ok(())
}

/// Checks every index against `size`, the length of the indexed dimension (one pass over
/// the indices, as PyTorch does), and returns them in the form candle's kernels get: candle
/// treats the largest value of the index dtype as "skip" (u32::MAX gave a zero row or a
/// dropped update), so u8 indices go in as u32 and out-of-range ones never reach it.
fn checked_indices(
    op: &'static str,
    indices: &Tensor,
    dim: usize,
    size: usize,
) -> Result<candle_core::Tensor> {
    let values = indices
        .value()
        .flatten_all()?
        .to_dtype(DType::I64)?
        .to_vec1::<i64>()?;
    let bad = values
        .iter()
        .position(|&v| v < 0 || usize::try_from(v).map_or(true, |v| v >= size));
    if let Some(position) = bad {
        return Err(Error::IndexOutOfRange {
            op,
            index: values[position],
            position,
            dim,
            size,
        });
    }
    // candle's kernels read contiguous indices only.
    let v = indices.value().contiguous()?;
    Ok(if v.dtype() == DType::U8 {
        v.to_dtype(DType::U32)?
    } else {
        v
    })
}

/// Checks that `other` has `base`'s shape except along `dim` (the rule of gather's
/// indices and of scatter's source).
fn check_same_except(
    op: &'static str,
    base: &Tensor,
    other: &[usize],
    dim: usize,
    what: &str,
) -> Result<()> {
    let ok = other.len() == base.rank()
        && other
            .iter()
            .zip(base.dims())
            .enumerate()
            .all(|(d, (a, b))| d == dim || a == b);
    if !ok {
        return Err(Error::ShapeMismatch {
            op,
            expected: format!(
                "{what} with the shape of {:?} except along dim {dim}",
                base.dims()
            ),
            got: other.to_vec(),
        });
    }
    Ok(())
}

fn check_index_vector(op: &'static str, indices: &Tensor) -> Result<()> {
    if indices.rank() != 1 {
        return Err(Error::ShapeMismatch {
            op,
            expected: "one-dimensional indices".into(),
            got: indices.dims().to_vec(),
        });
    }
    Ok(())
}

struct IndexSelect {
    indices: candle_core::Tensor,
    dim: usize,
}

impl Backward for IndexSelect {
    fn name(&self) -> &'static str {
        "index_select"
    }

    /// The adjoint of selecting rows: add each gradient row back at its index
    /// (`zeros.index_add(indices, g, dim)`; repeated indices accumulate).
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let zeros = ctx.inputs[0].zeros_like()?;
        let indices = Tensor::new(self.indices.clone());
        Ok(vec![Some(zeros.index_add(&indices, ctx.grad, self.dim)?)])
    }
}

struct IndexAdd {
    indices: candle_core::Tensor,
    dim: usize,
}

impl Backward for IndexAdd {
    fn name(&self) -> &'static str {
        "index_add"
    }

    /// d/d base = g; d/d source = g.index_select(indices, dim).
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let indices = Tensor::new(self.indices.clone());
        Ok(vec![
            ctx.needs[0].then(|| ctx.grad.clone()),
            ctx.needs[1]
                .then(|| ctx.grad.index_select(&indices, self.dim))
                .transpose()?,
        ])
    }
}

struct Gather {
    indices: candle_core::Tensor,
    dim: usize,
}

impl Backward for Gather {
    fn name(&self) -> &'static str {
        "gather"
    }

    /// The adjoint of gathering: scatter-add the gradient back to the gathered positions.
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let zeros = ctx.inputs[0].zeros_like()?;
        let indices = Tensor::new(self.indices.clone());
        Ok(vec![Some(zeros.scatter_add(&indices, ctx.grad, self.dim)?)])
    }
}

struct ScatterAdd {
    indices: candle_core::Tensor,
    dim: usize,
}

impl Backward for ScatterAdd {
    fn name(&self) -> &'static str {
        "scatter_add"
    }

    /// d/d base = g; d/d source = g.gather(indices, dim).
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let indices = Tensor::new(self.indices.clone());
        Ok(vec![
            ctx.needs[0].then(|| ctx.grad.clone()),
            ctx.needs[1]
                .then(|| ctx.grad.gather(&indices, self.dim))
                .transpose()?,
        ])
    }
}

impl Tensor {
    /// The slices at `indices` (one-dimensional) along `dim`, in that order
    /// (`torch.index_select`).
    pub fn index_select(&self, indices: &Tensor, dim: usize) -> Result<Tensor> {
        check_indices("index_select", self, indices, dim)?;
        check_index_vector("index_select", indices)?;
        let indices = checked_indices("index_select", indices, dim, self.dims()[dim])?;
        // candle selects from contiguous tensors only (index_add's backward selects from
        // the broadcast gradient of a sum).
        let value = self.value().contiguous()?.index_select(&indices, dim)?;
        Tensor::from_op(value, &[self], IndexSelect { indices, dim })
    }

    /// `self` with `source`'s slices added at `indices` (one-dimensional) along `dim`
    /// (`torch.index_add`); repeated indices accumulate.
    pub fn index_add(&self, indices: &Tensor, source: &Tensor, dim: usize) -> Result<Tensor> {
        check_indices("index_add", self, indices, dim)?;
        check_index_vector("index_add", indices)?;
        self.check_same(source, "index_add")?;
        check_same_except("index_add", self, source.dims(), dim, "source")?;
        if source.dims()[dim] != indices.elem_count() {
            return Err(Error::ShapeMismatch {
                op: "index_add",
                expected: format!(
                    "source with {} slices along dim {dim}, one per index",
                    indices.elem_count()
                ),
                got: source.dims().to_vec(),
            });
        }
        let indices = checked_indices("index_add", indices, dim, self.dims()[dim])?;
        let value =
            self.value()
                .contiguous()?
                .index_add(&indices, &source.value().contiguous()?, dim)?;
        Tensor::from_op(value, &[self, source], IndexAdd { indices, dim })
    }

    /// `out[..][i][..] = self[..][indices[..][i][..]][..]` along `dim` (`torch.gather`);
    /// `indices` has this tensor's shape except along `dim`.
    pub fn gather(&self, indices: &Tensor, dim: usize) -> Result<Tensor> {
        check_indices("gather", self, indices, dim)?;
        check_same_except("gather", self, indices.dims(), dim, "indices")?;
        let indices = checked_indices("gather", indices, dim, self.dims()[dim])?;
        // Likewise for gather (a transpose, or scatter_add's backward).
        let value = self.value().contiguous()?.gather(&indices, dim)?;
        Tensor::from_op(value, &[self], Gather { indices, dim })
    }

    /// `self` with each element of `source` added at the position `indices` names along
    /// `dim` (`torch.scatter_add`); `indices` has `source`'s shape, and `source` has this
    /// tensor's shape except along `dim`.
    pub fn scatter_add(&self, indices: &Tensor, source: &Tensor, dim: usize) -> Result<Tensor> {
        check_indices("scatter_add", self, indices, dim)?;
        self.check_same(source, "scatter_add")?;
        check_same_except("scatter_add", self, source.dims(), dim, "source")?;
        if indices.dims() != source.dims() {
            return Err(Error::ShapeMismatch {
                op: "scatter_add",
                expected: format!("indices with the source's shape {:?}", source.dims()),
                got: indices.dims().to_vec(),
            });
        }
        let indices = checked_indices("scatter_add", indices, dim, self.dims()[dim])?;
        let value = self
            .value()
            .scatter_add(&indices, &source.value().contiguous()?, dim)?;
        Tensor::from_op(value, &[self, source], ScatterAdd { indices, dim })
    }
}
