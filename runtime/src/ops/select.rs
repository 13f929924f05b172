//! Selection by mask: `where_cond` (PyTorch's `torch.where`) and `clamp`.

use super::Operand;
use crate::autograd::{Backward, VjpCtx};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

struct Where {
    /// 1 where the true branch was taken, 0 elsewhere; the output's shape and dtype.
    mask: candle_core::Tensor,
}

impl Backward for Where {
    fn name(&self) -> &'static str {
        "where_cond"
    }

    /// d/d on_true = g [mask], d/d on_false = g [!mask], each summed back over the dims
    /// the branch was broadcast along. The mask is a constant.
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let g = ctx.grad;
        let t = ctx.needs[0]
            .then(|| {
                g.mul(Tensor::new(self.mask.clone()))?
                    .sum_to(ctx.inputs[0].dims())
            })
            .transpose()?;
        let f = ctx.needs[1]
            .then(|| {
                g.mul(Tensor::new(self.mask.affine(-1.0, 1.0)?))?
                    .sum_to(ctx.inputs[1].dims())
            })
            .transpose()?;
        Ok(vec![t, f])
    }
}

struct Clamp {
    min: f64,
    max: f64,
}

impl Backward for Clamp {
    fn name(&self) -> &'static str {
        "clamp"
    }

    /// d clamp(x, lo, hi)/dx = 1 where lo <= x <= hi, else 0 (PyTorch's convention at the
    /// bounds).
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let x = ctx.inputs[0].value();
        let inside =
            (x.ge(self.min)?.to_dtype(x.dtype())? * x.le(self.max)?.to_dtype(x.dtype())?)?;
        Ok(vec![Some(ctx.grad.mul(Tensor::new(inside))?)])
    }
}

impl Tensor {
    /// `on_true` where this tensor (the mask) is nonzero, `on_false` elsewhere
    /// (`torch.where(mask, on_true, on_false)`; candle's `mask.where_cond(t, f)`). The three
    /// shapes broadcast together; the mask may have any dtype and gets no gradient.
    pub fn where_cond(&self, on_true: &Tensor, on_false: &Tensor) -> Result<Tensor> {
        on_true.check_same(on_false, "where_cond")?;
        if !self.device().same_device(on_true.device()) {
            return Err(Error::DeviceMismatch {
                op: "where_cond",
                lhs: format!("{:?}", self.device().location()),
                rhs: format!("{:?}", on_true.device().location()),
            });
        }
        let shape = super::binary::broadcast_shape("where_cond", on_true.dims(), on_false.dims())?;
        let shape = super::binary::broadcast_shape("where_cond", self.dims(), &shape)?;
        let pred = self.value().broadcast_as(shape.as_slice())?.ne(0.0)?;
        let value = pred.where_cond(
            &on_true.value().broadcast_as(shape.as_slice())?,
            &on_false.value().broadcast_as(shape.as_slice())?,
        )?;
        let mask = pred.to_dtype(on_true.dtype())?;
        Tensor::from_op(value, &[on_true, on_false], Where { mask })
    }

    /// Limits every element to `[min, max]` (`torch.clamp`); the bounds are floats or
    /// tensors that broadcast. Where `min > max` the result is `max`, as in PyTorch. The
    /// gradient passes to `self` where `min <= x <= max`, and to a tensor bound where it
    /// was selected.
    pub fn clamp(&self, min: impl Into<Operand>, max: impl Into<Operand>) -> Result<Tensor> {
        match (min.into(), max.into()) {
            (Operand::Float(lo), Operand::Float(hi)) => {
                let value = self.value().clamp(lo, hi)?;
                Tensor::from_op(value, &[self], Clamp { min: lo, max: hi })
            }
            (lo, hi) => {
                let bound = |b: Operand| -> Result<Tensor> {
                    match b {
                        Operand::Float(v) => self.full_like(v),
                        Operand::Tensor(t) => Ok(t),
                    }
                };
                let (lo, hi) = (bound(lo)?, bound(hi)?);
                let raised = self.lt(&lo)?.where_cond(&lo, self)?;
                raised.gt(&hi)?.where_cond(&hi, &raised)
            }
        }
    }
}
