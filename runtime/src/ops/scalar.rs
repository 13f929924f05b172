//! Ops with a constant float: affine (`x * mul + add`) and `powf`.

use crate::autograd::{Backward, VjpCtx};
use crate::error::Result;
use crate::tensor::Tensor;

struct Affine {
    mul: f64,
}

impl Backward for Affine {
    fn name(&self) -> &'static str {
        "affine"
    }

    /// d(x * m + a)/dx = m.
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(ctx.grad.affine(self.mul, 0.0)?)])
    }
}

struct Powf {
    exponent: f64,
}

impl Backward for Powf {
    fn name(&self) -> &'static str {
        "powf"
    }

    /// d x^e / dx = e x^(e-1).
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let x = &ctx.inputs[0];
        let d = x.powf(self.exponent - 1.0)?.affine(self.exponent, 0.0)?;
        Ok(vec![Some(ctx.grad.mul(&d)?)])
    }
}

impl Tensor {
    /// `self * mul + add` with constant floats.
    pub fn affine(&self, mul: f64, add: f64) -> Result<Tensor> {
        let value = self.value().affine(mul, add)?;
        Ok(Tensor::from_op(value, &[self], Affine { mul }))
    }

    /// `self ^ exponent` for a constant exponent (elementwise; negative bases give NaN
    /// unless the exponent is an integer, as in PyTorch).
    pub fn powf(&self, exponent: f64) -> Result<Tensor> {
        let value = if exponent == 2.0 {
            self.value().sqr()?
        } else if exponent == 1.0 {
            self.value().clone()
        } else if exponent == 0.0 {
            self.value().ones_like()?
        } else if exponent.fract() == 0.0 {
            powi(self.value(), exponent)?
        } else {
            self.value().powf(exponent)?
        };
        Ok(Tensor::from_op(value, &[self], Powf { exponent }))
    }

    /// `-self`, exactly: `-0.0` for `0.0` (an affine `0 * -1 + 0` would give `+0.0`).
    pub fn neg(&self) -> Result<Tensor> {
        let value = self.value().neg()?;
        Ok(Tensor::from_op(value, &[self], Affine { mul: -1.0 }))
    }
}

/// An integer power that keeps the sign of negative bases (candle's `powf` is
/// `exp(e ln x)`, NaN for x < 0).
fn powi(x: &candle_core::Tensor, exponent: f64) -> Result<candle_core::Tensor> {
    let magnitude = x.abs()?.powf(exponent)?;
    if exponent.rem_euclid(2.0) == 0.0 {
        Ok(magnitude)
    } else {
        Ok((magnitude * x.sign()?)?)
    }
}
