//! Ops with a constant float: affine (`x * mul + add`), division and `powf`.

use candle_core::DType;

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

    /// d(x * m + a)/dx = m, applied as `g * m` exactly (`+ -0.0` keeps the sign of a zero).
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(ctx.grad.affine(self.mul, -0.0)?)])
    }
}

struct DivScalar {
    divisor: f64,
}

impl Backward for DivScalar {
    fn name(&self) -> &'static str {
        "div"
    }

    /// d(x / d)/dx = 1/d, applied as `g / d`, as torch's `DivBackward`.
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(ctx.grad.div_scalar(self.divisor)?)])
    }
}

struct Powf {
    exponent: f64,
}

impl Backward for Powf {
    fn name(&self) -> &'static str {
        "powf"
    }

    /// d x^e / dx = e x^(e-1), and exactly 0 for e = 0 (also at x = 0, where the general
    /// form would be 0 * inf = NaN; this keeps every higher derivative of an integer
    /// power finite, e.g. the third of x^2 and the fourth of x^3 at 0, as PyTorch).
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        if self.exponent == 0.0 {
            return Ok(vec![Some(ctx.grad.zeros_like()?)]);
        }
        let x = &ctx.inputs[0];
        // x^1 is x: no op for it (the square's derivative is one affine).
        let power = if self.exponent == 2.0 {
            x.clone()
        } else {
            x.powf(self.exponent - 1.0)?
        };
        let d = power.affine(self.exponent, 0.0)?;
        Ok(vec![Some(ctx.grad.mul(&d)?)])
    }
}

impl Tensor {
    /// `self * mul + add` with constant floats. An integer tensor is first converted to
    /// f32, PyTorch's default float dtype, as PyTorch promotes `int_tensor * 0.5`
    /// (candle would truncate the constants: `[1, 2, 3] u32 * 0.5` gave `[0, 0, 0]`).
    pub fn affine(&self, mul: f64, add: f64) -> Result<Tensor> {
        if !self.dtype().is_float() {
            return self.to_dtype(DType::F32)?.affine(mul, add);
        }
        // candle's affine is `v * mul + add` with both constants rounded to the dtype.
        let v = self.value();
        let value = match super::kernels::small_cpu_floats(&[v]) {
            Some(DType::F32) => {
                let (mul, add) = (mul as f32, add as f32);
                super::kernels::map_small::<f32>(v, |x| x * mul + add)?
            }
            Some(DType::F64) => super::kernels::map_small::<f64>(v, |x| x * mul + add)?,
            _ => v.affine(mul, add)?,
        };
        Tensor::from_op(value, &[self], Affine { mul })
    }

    /// `self / divisor` with a constant, each element rounded once as a division (torch's
    /// `x / 0.3`, and this crate's `x / tensor`), not as `x * (1 / divisor)`, which differs
    /// in the last bit. Integer tensors promote as [`Tensor::affine`] does.
    pub(crate) fn div_scalar(&self, divisor: f64) -> Result<Tensor> {
        if !self.dtype().is_float() {
            return self.to_dtype(DType::F32)?.div_scalar(divisor);
        }
        let v = self.value();
        let value = match super::kernels::small_cpu_floats(&[v]) {
            Some(DType::F32) => {
                let divisor = divisor as f32;
                super::kernels::map_small::<f32>(v, |x| x / divisor)?
            }
            Some(DType::F64) => super::kernels::map_small::<f64>(v, |x| x / divisor)?,
            _ => {
                let d = candle_core::Tensor::new(divisor, v.device())?.to_dtype(v.dtype())?;
                v.broadcast_div(&d)?
            }
        };
        Tensor::from_op(value, &[self], DivScalar { divisor })
    }

    /// `self ^ exponent` for a constant exponent (elementwise; negative bases give NaN
    /// unless the exponent is an integer, as in PyTorch; `0^e` is `inf` for `e < 0`).
    /// Floating point tensors only.
    pub fn powf(&self, exponent: f64) -> Result<Tensor> {
        self.require_float("powf")?;
        let value = if exponent == 2.0 {
            square(self.value())?
        } else if exponent == 1.0 {
            self.value().clone()
        } else if exponent == 0.0 {
            self.value().ones_like()?
        } else if let Some(dtype) = super::kernels::small_cpu_floats(&[self.value()]) {
            // `f64::powf` itself, the ordinary optimizer's arithmetic (the sign of `-0.0`
            // to an odd power included).
            match dtype {
                DType::F32 => {
                    let e = exponent as f32;
                    super::kernels::map_small::<f32>(self.value(), |x| x.powf(e))?
                }
                _ => super::kernels::map_small::<f64>(self.value(), |x| x.powf(exponent))?,
            }
        } else if exponent.fract() == 0.0 {
            powi(self.value(), exponent)?
        } else {
            self.value().powf(exponent)?
        };
        Tensor::from_op(value, &[self], Powf { exponent })
    }

    /// `-self`, exactly: `-0.0` for `0.0`. Computed as `self * -1 + (-0.0)`: adding `-0.0`
    /// changes nothing else (an affine `0 * -1 + 0` would give `+0.0`), and candle's affine
    /// kernel is faster than its generic unary `neg`. Integer tensors promote as
    /// [`Tensor::affine`] does.
    pub fn neg(&self) -> Result<Tensor> {
        self.affine(-1.0, -0.0)
    }
}

/// `x * x` (candle's `sqr`), in one pass on small float CPU values.
fn square(x: &candle_core::Tensor) -> Result<candle_core::Tensor> {
    match super::kernels::small_cpu_floats(&[x]) {
        Some(DType::F32) => super::kernels::map_small::<f32>(x, |v| v * v),
        Some(DType::F64) => super::kernels::map_small::<f64>(x, |v| v * v),
        _ => Ok(x.sqr()?),
    }
}

/// An integer power that keeps the sign of negative bases (candle's `powf` is
/// `exp(e ln x)`, NaN for x < 0). For odd exponents the sign is that of `x`'s sign bit,
/// as `f64::powf`'s: -1 below 0 and for `-0.0` (`(-0.0)^3 = -0.0`, `(-0.0)^-1 = -inf`),
/// +1 elsewhere, so that `0^-1` is `inf`, not `inf * sign(0) = NaN`. `-0.0` is told from
/// `+0.0` by its reciprocal, `-inf`.
fn powi(x: &candle_core::Tensor, exponent: f64) -> Result<candle_core::Tensor> {
    let magnitude = x.abs()?.powf(exponent)?;
    if exponent.rem_euclid(2.0) == 0.0 {
        Ok(magnitude)
    } else {
        let below = x.lt(0.0)?.to_dtype(x.dtype())?;
        let negative_zero = x.recip()?.lt(0.0)?.to_dtype(x.dtype())?;
        let sign = below.maximum(&negative_zero)?.affine(-2.0, 1.0)?;
        Ok((magnitude * sign)?)
    }
}

#[cfg(test)]
mod tests {
    use super::square;
    use crate::ops::binary::tests::{bits, specials};
    use crate::tensor::Tensor;
    use candle_core::DType;

    #[test]
    fn small_affine_and_square_give_candles_bits() {
        for dtype in [DType::F32, DType::F64] {
            let (a, _) = specials(dtype);
            assert_eq!(
                bits(&square(&a).unwrap()),
                bits(&a.sqr().unwrap()),
                "{dtype:?}"
            );
            for (mul, add) in [(0.3, 0.1), (-1.0, -0.0), (1e-3, 7.0), (2.0, 0.0)] {
                let fast = Tensor::new(a.clone()).affine(mul, add).unwrap();
                let candle = a.affine(mul, add).unwrap();
                assert_eq!(bits(fast.value()), bits(&candle), "{dtype:?} {mul} {add}");
            }
        }
    }
}
