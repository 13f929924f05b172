//! Comparisons: `eq`, `ne`, `lt`, `le`, `gt`, `ge` against a tensor (broadcast like PyTorch)
//! or a float. Each returns a constant mask of 0s and 1s in the input's dtype: a comparison
//! is piecewise constant, so its derivative is 0 almost everywhere and no node is recorded.

use candle_core::op::CmpOp;

use super::Operand;
use crate::error::Result;
use crate::tensor::Tensor;

/// The 0/1 mask of `lhs op rhs`, in `lhs`'s dtype, broadcasting the two operands.
fn compare(lhs: &Tensor, rhs: Operand, op: CmpOp, name: &'static str) -> Result<Tensor> {
    let mask = match rhs {
        Operand::Float(v) => lhs.value().cmp(v, op)?,
        Operand::Tensor(rhs) => {
            lhs.check_same(&rhs, name)?;
            if lhs.dims() == rhs.dims() {
                lhs.value().cmp(rhs.value(), op)?
            } else {
                let shape = super::binary::broadcast_shape(name, lhs.dims(), rhs.dims())?;
                let l = lhs.value().broadcast_as(shape.as_slice())?;
                let r = rhs.value().broadcast_as(shape.as_slice())?;
                l.cmp(&r, op)?
            }
        }
    };
    Ok(Tensor::new(mask.to_dtype(lhs.dtype())?))
}

impl Tensor {
    /// `self == rhs` as a constant 0/1 mask of this tensor's dtype (no gradient).
    pub fn eq(&self, rhs: impl Into<Operand>) -> Result<Tensor> {
        compare(self, rhs.into(), CmpOp::Eq, "eq")
    }

    /// `self != rhs` as a constant 0/1 mask of this tensor's dtype (no gradient).
    pub fn ne(&self, rhs: impl Into<Operand>) -> Result<Tensor> {
        compare(self, rhs.into(), CmpOp::Ne, "ne")
    }

    /// `self < rhs` as a constant 0/1 mask of this tensor's dtype (no gradient).
    pub fn lt(&self, rhs: impl Into<Operand>) -> Result<Tensor> {
        compare(self, rhs.into(), CmpOp::Lt, "lt")
    }

    /// `self <= rhs` as a constant 0/1 mask of this tensor's dtype (no gradient).
    pub fn le(&self, rhs: impl Into<Operand>) -> Result<Tensor> {
        compare(self, rhs.into(), CmpOp::Le, "le")
    }

    /// `self > rhs` as a constant 0/1 mask of this tensor's dtype (no gradient).
    pub fn gt(&self, rhs: impl Into<Operand>) -> Result<Tensor> {
        compare(self, rhs.into(), CmpOp::Gt, "gt")
    }

    /// `self >= rhs` as a constant 0/1 mask of this tensor's dtype (no gradient).
    pub fn ge(&self, rhs: impl Into<Operand>) -> Result<Tensor> {
        compare(self, rhs.into(), CmpOp::Ge, "ge")
    }
}
