//! Shape ops: reshape, broadcast_as, transpose, permute, narrow, pad, cat, stack,
//! squeeze, unsqueeze, flatten.

use candle_core::DType;

use crate::autograd::{Backward, VjpCtx};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

struct Reshape;

impl Backward for Reshape {
    fn name(&self) -> &'static str {
        "reshape"
    }

    /// Reshape the gradient back.
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(ctx.grad.reshape(ctx.inputs[0].dims())?)])
    }
}

struct BroadcastAs;

impl Backward for BroadcastAs {
    fn name(&self) -> &'static str {
        "broadcast_as"
    }

    /// Sum the gradient over the broadcast dims.
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(ctx.grad.sum_to(ctx.inputs[0].dims())?)])
    }
}

struct Permute {
    dims: Vec<usize>,
}

impl Backward for Permute {
    fn name(&self) -> &'static str {
        "permute"
    }

    /// Apply the inverse permutation.
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let mut inverse = vec![0; self.dims.len()];
        for (i, &d) in self.dims.iter().enumerate() {
            inverse[d] = i;
        }
        Ok(vec![Some(ctx.grad.permute(&inverse)?)])
    }
}

struct Narrow {
    dim: usize,
    start: usize,
}

impl Backward for Narrow {
    fn name(&self) -> &'static str {
        "narrow"
    }

    /// Pad the gradient with zeros back to the input's extent.
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let total = ctx.inputs[0].dims()[self.dim];
        let len = ctx.grad.dims()[self.dim];
        let right = total - self.start - len;
        Ok(vec![Some(
            ctx.grad.pad_with_zeros(self.dim, self.start, right)?,
        )])
    }
}

struct PadWithZeros {
    dim: usize,
    left: usize,
}

impl Backward for PadWithZeros {
    fn name(&self) -> &'static str {
        "pad_with_zeros"
    }

    /// Narrow the gradient to the unpadded part.
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let len = ctx.inputs[0].dims()[self.dim];
        Ok(vec![Some(ctx.grad.narrow(self.dim, self.left, len)?)])
    }
}

struct Cat {
    dim: usize,
}

impl Backward for Cat {
    fn name(&self) -> &'static str {
        "cat"
    }

    /// Each input gets its slice of the gradient.
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let mut start = 0;
        let mut out = Vec::with_capacity(ctx.inputs.len());
        for (input, &need) in ctx.inputs.iter().zip(ctx.needs) {
            let len = input.dims()[self.dim];
            out.push(
                need.then(|| ctx.grad.narrow(self.dim, start, len))
                    .transpose()?,
            );
            start += len;
        }
        Ok(out)
    }
}

fn check_dim(op: &'static str, t: &Tensor, dim: usize) -> Result<()> {
    if dim >= t.rank() {
        return Err(Error::InvalidArgument {
            op,
            message: format!("dimension {dim} out of range for shape {:?}", t.dims()),
        });
    }
    Ok(())
}

/// The number of elements of `shape`, or `None` when it cannot be laid out: the product
/// of its nonzero dims passes `usize::MAX` (candle's element counts and strides multiply
/// them even when another dim is 0, and would overflow).
pub(crate) fn checked_elem_count(shape: &[usize]) -> Option<usize> {
    let nonzero = shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |n, &d| n.checked_mul(d))?;
    Some(if shape.contains(&0) { 0 } else { nonzero })
}

/// `Err` naming `op` and `shape` when [`checked_elem_count`] refuses it.
pub(crate) fn check_layout(op: &'static str, shape: &[usize]) -> Result<()> {
    match checked_elem_count(shape) {
        Some(_) => Ok(()),
        None => Err(Error::InvalidArgument {
            op,
            message: format!("shape {shape:?} has more than usize::MAX elements"),
        }),
    }
}

/// [`check_layout`], and that a buffer of `shape` in `dtype` can be allocated at all
/// (at most `isize::MAX` bytes; beyond that Rust's allocator panics instead of failing).
pub(crate) fn check_alloc(op: &'static str, shape: &[usize], dtype: DType) -> Result<()> {
    check_layout(op, shape)?;
    let bytes = checked_elem_count(shape).and_then(|n| n.checked_mul(dtype.size_in_bytes()));
    match bytes {
        Some(b) if isize::try_from(b).is_ok() => Ok(()),
        _ => Err(Error::InvalidArgument {
            op,
            message: format!("shape {shape:?} of {dtype:?} needs more than isize::MAX bytes"),
        }),
    }
}

impl Tensor {
    /// The same elements in a new shape (same element count).
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        // Checked: a product past usize::MAX would wrap and could match the count.
        let count = checked_elem_count(shape);
        if count != Some(self.elem_count()) {
            let count = count.map_or_else(|| "more than usize::MAX".into(), |n| n.to_string());
            return Err(Error::ShapeMismatch {
                op: "reshape",
                expected: format!("{count} elements for shape {shape:?}"),
                got: self.dims().to_vec(),
            });
        }
        if self.dims() == shape {
            return Ok(self.clone());
        }
        let value = self.value().reshape(shape)?;
        Tensor::from_op(value, &[self], Reshape)
    }

    /// A broadcast view with the given shape (PyTorch's `expand`).
    pub fn broadcast_as(&self, shape: &[usize]) -> Result<Tensor> {
        if self.dims() == shape {
            return Ok(self.clone());
        }
        check_layout("broadcast_as", shape)?;
        let target = super::binary::broadcast_shape("broadcast_as", self.dims(), shape)?;
        if target != shape {
            return Err(Error::BroadcastMismatch {
                op: "broadcast_as",
                lhs: self.dims().to_vec(),
                rhs: shape.to_vec(),
            });
        }
        let value = self.value().broadcast_as(shape)?;
        Tensor::from_op(value, &[self], BroadcastAs)
    }

    /// Reorders the dimensions.
    pub fn permute(&self, dims: &[usize]) -> Result<Tensor> {
        let mut seen = vec![false; self.rank()];
        let valid = dims.len() == self.rank()
            && dims
                .iter()
                .all(|&d| d < self.rank() && !std::mem::replace(&mut seen[d], true));
        if !valid {
            return Err(Error::InvalidArgument {
                op: "permute",
                message: format!(
                    "{dims:?} is not a permutation of the dims of {:?}",
                    self.dims()
                ),
            });
        }
        let value = self.value().permute(dims)?;
        Tensor::from_op(
            value,
            &[self],
            Permute {
                dims: dims.to_vec(),
            },
        )
    }

    /// Swaps two dimensions.
    pub fn transpose(&self, dim0: usize, dim1: usize) -> Result<Tensor> {
        check_dim("transpose", self, dim0.max(dim1))?;
        let mut dims: Vec<usize> = (0..self.rank()).collect();
        dims.swap(dim0, dim1);
        self.permute(&dims)
    }

    /// Swaps the last two dimensions.
    pub fn t(&self) -> Result<Tensor> {
        if self.rank() < 2 {
            return Err(Error::ShapeMismatch {
                op: "t",
                expected: "at least 2 dims".into(),
                got: self.dims().to_vec(),
            });
        }
        self.transpose(self.rank() - 2, self.rank() - 1)
    }

    /// `len` elements along `dim` starting at `start`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        check_dim("narrow", self, dim)?;
        let end = start
            .checked_add(len)
            .filter(|&end| end <= self.dims()[dim]);
        if end.is_none() {
            return Err(Error::InvalidArgument {
                op: "narrow",
                message: format!(
                    "start {start} and length {len} are out of bounds for dim {dim} of shape {:?}",
                    self.dims()
                ),
            });
        }
        let value = self.value().narrow(dim, start, len)?;
        Tensor::from_op(value, &[self], Narrow { dim, start })
    }

    /// Pads `dim` with `left` zeros before and `right` after.
    pub fn pad_with_zeros(&self, dim: usize, left: usize, right: usize) -> Result<Tensor> {
        check_dim("pad_with_zeros", self, dim)?;
        let padded = self.dims()[dim]
            .checked_add(left)
            .and_then(|n| n.checked_add(right));
        let shape = padded.map(|p| {
            let mut shape = self.dims().to_vec();
            shape[dim] = p;
            shape
        });
        let Some(shape) = shape.filter(|s| check_alloc("pad_with_zeros", s, self.dtype()).is_ok())
        else {
            return Err(Error::InvalidArgument {
                op: "pad_with_zeros",
                message: format!(
                    "padding {left} + {right} of dim {dim} of shape {:?} gives a shape too large to lay out or allocate",
                    self.dims()
                ),
            });
        };
        if self.elem_count() == 0 {
            // candle's pad of an empty tensor sizes a buffer from its nonzero dims.
            return super::connected_zeros(&shape, self, &[self]);
        }
        let value = self.value().pad_with_zeros(dim, left, right)?;
        Tensor::from_op(value, &[self], PadWithZeros { dim, left })
    }

    /// Concatenates along `dim`; shapes must agree elsewhere.
    pub fn cat(tensors: &[Tensor], dim: usize) -> Result<Tensor> {
        let first = tensors.first().ok_or_else(|| Error::InvalidArgument {
            op: "cat",
            message: "no tensors to concatenate".into(),
        })?;
        check_dim("cat", first, dim)?;
        for t in &tensors[1..] {
            first.check_same(t, "cat")?;
            let agree = t.rank() == first.rank()
                && t.dims()
                    .iter()
                    .zip(first.dims())
                    .enumerate()
                    .all(|(d, (a, b))| d == dim || a == b);
            if !agree {
                return Err(Error::ShapeMismatch {
                    op: "cat",
                    expected: format!("{:?} except along dim {dim}", first.dims()),
                    got: t.dims().to_vec(),
                });
            }
        }
        let values: Vec<&candle_core::Tensor> = tensors.iter().map(Tensor::value).collect();
        let value = candle_core::Tensor::cat(&values, dim)?;
        let inputs: Vec<&Tensor> = tensors.iter().collect();
        Tensor::from_op(value, &inputs, Cat { dim })
    }

    /// Stacks equal-shaped tensors along a new dimension `dim`.
    pub fn stack(tensors: &[Tensor], dim: usize) -> Result<Tensor> {
        let expanded = tensors
            .iter()
            .map(|t| t.unsqueeze(dim))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&expanded, dim)
    }

    /// Inserts a dimension of size 1 at `dim`.
    pub fn unsqueeze(&self, dim: usize) -> Result<Tensor> {
        if dim > self.rank() {
            return Err(Error::InvalidArgument {
                op: "unsqueeze",
                message: format!("dimension {dim} out of range for shape {:?}", self.dims()),
            });
        }
        let mut shape = self.dims().to_vec();
        shape.insert(dim, 1);
        self.reshape(&shape)
    }

    /// Removes dimension `dim`, which must have size 1.
    pub fn squeeze(&self, dim: usize) -> Result<Tensor> {
        check_dim("squeeze", self, dim)?;
        if self.dims()[dim] != 1 {
            return Err(Error::ShapeMismatch {
                op: "squeeze",
                expected: format!("size 1 at dim {dim}"),
                got: self.dims().to_vec(),
            });
        }
        let mut shape = self.dims().to_vec();
        shape.remove(dim);
        self.reshape(&shape)
    }

    /// Flattens dims `start..` into one.
    pub fn flatten_from(&self, start: usize) -> Result<Tensor> {
        check_dim("flatten_from", self, start)?;
        let mut shape = self.dims()[..start].to_vec();
        shape.push(self.dims()[start..].iter().product());
        self.reshape(&shape)
    }

    /// Flattens to one dimension.
    pub fn flatten_all(&self) -> Result<Tensor> {
        self.reshape(&[self.elem_count()])
    }
}
