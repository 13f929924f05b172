//! Elementwise binary ops with PyTorch broadcasting: add, sub, mul, div, maximum, minimum,
//! and pow with a tensor exponent.

use candle_core::DType;

use super::Operand;
use crate::autograd::{Backward, VjpCtx};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The broadcast shape of two shapes (trailing dimensions aligned, 1 stretches).
pub(crate) fn broadcast_shape(
    op: &'static str,
    lhs: &[usize],
    rhs: &[usize],
) -> Result<Vec<usize>> {
    let rank = lhs.len().max(rhs.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let l = if i < rank - lhs.len() {
            1
        } else {
            lhs[i - (rank - lhs.len())]
        };
        let r = if i < rank - rhs.len() {
            1
        } else {
            rhs[i - (rank - rhs.len())]
        };
        out[i] = match (l, r) {
            (a, b) if a == b => a,
            (1, b) => b,
            (a, 1) => a,
            _ => {
                return Err(Error::BroadcastMismatch {
                    op,
                    lhs: lhs.to_vec(),
                    rhs: rhs.to_vec(),
                })
            }
        };
    }
    Ok(out)
}

#[derive(Clone, Copy)]
enum Kind {
    Add,
    Sub,
    Mul,
    Div,
    Maximum,
    Minimum,
    Pow,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Add => "add",
            Kind::Sub => "sub",
            Kind::Mul => "mul",
            Kind::Div => "div",
            Kind::Maximum => "maximum",
            Kind::Minimum => "minimum",
            Kind::Pow => "pow",
        }
    }
}

fn binary(kind: Kind, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let op = kind.name();
    a.check_same(b, op)?;
    if matches!(kind, Kind::Div) && !a.dtype().is_float() {
        // PyTorch's `/` is true division: integer operands are promoted to its default
        // float dtype (candle's integer division truncates, and panics dividing by 0).
        let f32 = candle_core::DType::F32;
        return binary(kind, &a.to_dtype(f32)?, &b.to_dtype(f32)?);
    }
    let (va, vb) = if a.dims() == b.dims() {
        (a.value().clone(), b.value().clone())
    } else {
        let shape = broadcast_shape(op, a.dims(), b.dims())?;
        (
            a.value().broadcast_as(shape.as_slice())?,
            b.value().broadcast_as(shape.as_slice())?,
        )
    };
    if let Some(value) = small_arithmetic(kind, &va, &vb)? {
        return Tensor::from_op(value, &[a, b], BinaryBackward(kind));
    }
    let value = match kind {
        Kind::Add | Kind::Sub | Kind::Mul if !va.dtype().is_float() => {
            // candle's integer kernels panic on overflow in debug builds; PyTorch wraps.
            wrapping(kind, &va, &vb)?
        }
        Kind::Add => (&va + &vb)?,
        Kind::Sub => (&va - &vb)?,
        Kind::Mul => (&va * &vb)?,
        Kind::Div => (&va / &vb)?,
        Kind::Pow => pow_value(&va, &vb)?,
        Kind::Maximum | Kind::Minimum => {
            let m = match kind {
                Kind::Maximum => va.maximum(&vb)?,
                _ => va.minimum(&vb)?,
            };
            // candle keeps the left operand when the right one is NaN; PyTorch gives NaN.
            if super::nan::has_nan(&vb)? {
                super::nan::set_nan_where(&super::nan::nan_mask(&vb)?, &m)?
            } else {
                m
            }
        }
    };
    Tensor::from_op(value, &[a, b], BinaryBackward(kind))
}

/// `+`, `-`, `*` or `/` of small float CPU values of one shape in one pass
/// (`kernels::small_cpu_floats`; the same IEEE operations as candle's kernels, so the same
/// bits); `None` for anything else.
fn small_arithmetic(
    kind: Kind,
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
) -> Result<Option<candle_core::Tensor>> {
    use super::kernels::{small_cpu_floats, zip_small};
    macro_rules! zip {
        ($t:ty) => {
            match kind {
                Kind::Add => zip_small::<$t>(a, b, |x, y| x + y)?,
                Kind::Sub => zip_small::<$t>(a, b, |x, y| x - y)?,
                Kind::Mul => zip_small::<$t>(a, b, |x, y| x * y)?,
                Kind::Div => zip_small::<$t>(a, b, |x, y| x / y)?,
                Kind::Pow => zip_small::<$t>(a, b, <$t>::powf)?,
                Kind::Maximum | Kind::Minimum => return Ok(None),
            }
        };
    }
    Ok(match small_cpu_floats(&[a, b]) {
        Some(DType::F32) => Some(zip!(f32)),
        Some(DType::F64) => Some(zip!(f64)),
        _ => None,
    })
}

/// `x^e` of same-shape float values as `powf` computes it: on the CPU (fast paths on) a
/// pass of `f32::powf` / `f64::powf` at any size; elsewhere `exp(e ln |x|)` with `powf`'s
/// special cases: the sign of `x` (its sign bit, for `-0.0` and `-inf`) for an odd
/// integral `e`, NaN for a finite negative `x` and a fractional `e`, and 1 for `e = 0`,
/// for `x = 1` and for `x = -1` with `e = ±inf`.
fn pow_value(x: &candle_core::Tensor, e: &candle_core::Tensor) -> Result<candle_core::Tensor> {
    use super::kernels::{cpu_fast_paths, zip_small};
    if cpu_fast_paths() && x.device().is_cpu() {
        match x.dtype() {
            DType::F32 => return zip_small::<f32>(x, e, f32::powf),
            DType::F64 => return zip_small::<f64>(x, e, f64::powf),
            _ => {}
        }
    }
    let magnitude = (x.abs()?.log()? * e)?.exp()?;
    let below = x.lt(0.0)?;
    let negative = below.maximum(&x.recip()?.lt(0.0)?)?;
    let integral = e.eq(&e.floor()?)?;
    let half_floor = e.affine(0.5, 0.0)?.floor()?.affine(2.0, 0.0)?;
    let odd = (e - half_floor)?.eq(1.0)?;
    let flip = (&negative * &odd)?;
    let signed = flip.where_cond(&magnitude.neg()?, &magnitude)?;
    let nan = signed.ones_like()?.affine(f64::NAN, 0.0)?;
    let finite_negative = (&below * &x.gt(f64::NEG_INFINITY)?)?;
    let fractional_of_negative = (&finite_negative * &integral.eq(0.0)?)?;
    let value = fractional_of_negative.where_cond(&nan, &signed)?;
    let one = value.ones_like()?;
    let unit_to_infinity = (&x.eq(-1.0)? * &e.abs()?.eq(f64::INFINITY)?)?;
    let ones = x
        .eq(1.0)?
        .maximum(&e.eq(0.0)?)?
        .maximum(&unit_to_infinity)?;
    Ok(ones.where_cond(&one, &value)?)
}

/// Integer `+`, `-` or `*` of same-shape values with two's-complement wrapping in their
/// dtype, as PyTorch's integer arithmetic: computed in i64 with wrapping ops, then reduced
/// modulo 2^8 or 2^32 for u8 and u32 (exact there, since the i64 results do not wrap).
fn wrapping(
    kind: Kind,
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
) -> Result<candle_core::Tensor> {
    let dtype = a.dtype();
    let as_i64 = |t: &candle_core::Tensor| -> Result<Vec<i64>> {
        Ok(t.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?)
    };
    let (xa, xb) = (as_i64(a)?, as_i64(b)?);
    let modulus: Option<i64> = match dtype {
        DType::U8 => Some(1 << 8),
        DType::U32 => Some(1 << 32),
        _ => None,
    };
    let values: Vec<i64> = xa
        .iter()
        .zip(&xb)
        .map(|(&x, &y)| {
            let v = match kind {
                Kind::Add => x.wrapping_add(y),
                Kind::Sub => x.wrapping_sub(y),
                _ => x.wrapping_mul(y),
            };
            modulus.map_or(v, |m| v.rem_euclid(m))
        })
        .collect();
    let out = candle_core::Tensor::from_vec(values, a.shape(), a.device())?;
    Ok(out.to_dtype(dtype)?)
}

struct BinaryBackward(Kind);

impl Backward for BinaryBackward {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    /// add: (g, g); sub: (g, -g); mul: (g b, g a); div: (g / b, -g a / b^2);
    /// maximum/minimum: g to the selected side, split in half at ties (as PyTorch);
    /// pow: (g e a^(e-1), 0 where e = 0; g a^e ln a, 0 where a = 0 and e >= 0), torch's
    /// `pow_backward_self` and `pow_backward_exponent`.
    /// Each is then summed back over broadcast dimensions. Only the sides in `needs` are
    /// built (a constant operand, such as a target, costs no op).
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let (a, b, g) = (&ctx.inputs[0], &ctx.inputs[1], ctx.grad);
        let (ga, gb) = match self.0 {
            Kind::Add => (Some(g.clone()), Some(g.clone())),
            Kind::Sub => (Some(g.clone()), ctx.needs[1].then(|| g.neg()).transpose()?),
            Kind::Mul => (
                ctx.needs[0].then(|| g.mul(b)).transpose()?,
                ctx.needs[1].then(|| g.mul(a)).transpose()?,
            ),
            Kind::Div => {
                let ga = g.div(b)?;
                let gb = if ctx.needs[1] {
                    Some(ga.mul(ctx.output)?.neg()?)
                } else {
                    None
                };
                (Some(ga), gb)
            }
            Kind::Pow => {
                let ga = ctx.needs[0]
                    .then(|| -> Result<Tensor> {
                        let d = b.mul(&a.pow(&b.sub(1.0)?)?)?;
                        g.mul(&b.eq(0.0)?.where_cond(&d.zeros_like()?, &d)?)
                    })
                    .transpose()?;
                let gb = ctx.needs[1]
                    .then(|| -> Result<Tensor> {
                        let d = ctx.output.mul(&a.log()?)?;
                        let at_zero = a.eq(0.0)?.mul(&b.ge(0.0)?)?;
                        g.mul(&at_zero.where_cond(&d.zeros_like()?, &d)?)
                    })
                    .transpose()?;
                (ga, gb)
            }
            Kind::Maximum | Kind::Minimum => {
                // Weights are constants: 1 where the side wins, 0.5 at ties, 0 elsewhere.
                let (va, vb) = (a.value(), b.value());
                let shape = ctx.output.dims();
                let (va, vb) = (va.broadcast_as(shape)?, vb.broadcast_as(shape)?);
                let wins = match self.0 {
                    Kind::Maximum => va.gt(&vb)?,
                    _ => va.lt(&vb)?,
                }
                .to_dtype(g.dtype())?;
                let ties = va.eq(&vb)?.to_dtype(g.dtype())?;
                let wa = (&wins + (&ties * 0.5)?)?;
                let wb = wa.affine(-1.0, 1.0)?;
                (Some(g.mul(Tensor::new(wa))?), Some(g.mul(Tensor::new(wb))?))
            }
        };
        let back = |side: Option<Tensor>, needed: bool, input: &Tensor| {
            side.filter(|_| needed)
                .map(|s| s.sum_to(input.dims()))
                .transpose()
        };
        Ok(vec![back(ga, ctx.needs[0], a)?, back(gb, ctx.needs[1], b)?])
    }
}

impl Tensor {
    fn binary_or_scalar(
        &self,
        rhs: Operand,
        kind: Kind,
        scalar: impl FnOnce(&Tensor, f64) -> Result<Tensor>,
    ) -> Result<Tensor> {
        match rhs {
            Operand::Tensor(t) => binary(kind, self, &t),
            Operand::Float(v) => scalar(self, v),
        }
    }

    /// `self + rhs`, broadcasting.
    pub fn add(&self, rhs: impl Into<Operand>) -> Result<Tensor> {
        self.binary_or_scalar(rhs.into(), Kind::Add, |t, v| t.affine(1.0, v))
    }

    /// `self - rhs`, broadcasting.
    pub fn sub(&self, rhs: impl Into<Operand>) -> Result<Tensor> {
        self.binary_or_scalar(rhs.into(), Kind::Sub, |t, v| t.affine(1.0, -v))
    }

    /// `self * rhs`, broadcasting.
    pub fn mul(&self, rhs: impl Into<Operand>) -> Result<Tensor> {
        // `+ -0.0` leaves every product as it is, `-0.0` included (`+ 0.0` made it `+0.0`).
        self.binary_or_scalar(rhs.into(), Kind::Mul, |t, v| t.affine(v, -0.0))
    }

    /// `self / rhs`, broadcasting.
    pub fn div(&self, rhs: impl Into<Operand>) -> Result<Tensor> {
        self.binary_or_scalar(rhs.into(), Kind::Div, Tensor::div_scalar)
    }

    /// `self ^ exponent` elementwise with a tensor exponent (`torch.pow(x, e)`),
    /// broadcasting; float tensors only. Its values are `powf`'s (a negative base to a
    /// fractional power is NaN, to an integral one signed), and so are its derivatives'
    /// special cases: `d/dx` is 0 where `e = 0`, `d/de` is 0 where `x = 0` and `e >= 0`
    /// (PyTorch's rules; elsewhere `d/de = x^e ln x`, NaN for a negative base).
    pub fn pow(&self, exponent: &Tensor) -> Result<Tensor> {
        self.require_float("pow")?;
        exponent.require_float("pow")?;
        binary(Kind::Pow, self, exponent)
    }

    /// Elementwise maximum (`torch.maximum`, NaN where either side is NaN); at ties the
    /// gradient is split in half.
    pub fn maximum(&self, rhs: impl Into<Operand>) -> Result<Tensor> {
        let rhs = match rhs.into() {
            Operand::Tensor(t) => t,
            Operand::Float(v) => self.full_like(v)?,
        };
        binary(Kind::Maximum, self, &rhs)
    }

    /// Elementwise minimum (`torch.minimum`, NaN where either side is NaN); at ties the
    /// gradient is split in half.
    pub fn minimum(&self, rhs: impl Into<Operand>) -> Result<Tensor> {
        let rhs = match rhs.into() {
            Operand::Tensor(t) => t,
            Operand::Float(v) => self.full_like(v)?,
        };
        binary(Kind::Minimum, self, &rhs)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::{broadcast_shape, small_arithmetic, Kind};
    use candle_core::{DType, Device, Tensor as Value};

    /// Values with every special case of IEEE arithmetic: signed zeros, infinities, NaN,
    /// subnormals, and values whose products and quotients round.
    pub(crate) fn specials(dtype: DType) -> (Value, Value) {
        let a = [
            0.0,
            -0.0,
            1.0,
            -2.5,
            f64::INFINITY,
            f64::NAN,
            1e-310,
            3.0,
            1e300,
            0.1,
        ];
        let b = [
            -0.0,
            0.0,
            3.0,
            f64::NEG_INFINITY,
            f64::INFINITY,
            2.0,
            7.0,
            0.0,
            1e10,
            0.7,
        ];
        let value = |v: &[f64]| {
            Value::from_slice(v, (2, 5), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        (value(&a), value(&b))
    }

    pub(crate) fn bits(v: &Value) -> Vec<u64> {
        let v = v.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
        v.to_vec1::<f64>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    #[test]
    fn small_arithmetic_gives_candles_bits() {
        for dtype in [DType::F32, DType::F64] {
            let (a, b) = specials(dtype);
            let cases = [
                (Kind::Add, (&a + &b).unwrap()),
                (Kind::Sub, (&a - &b).unwrap()),
                (Kind::Mul, (&a * &b).unwrap()),
                (Kind::Div, (&a / &b).unwrap()),
            ];
            for (kind, candle) in cases {
                let fast = small_arithmetic(kind, &a, &b).unwrap();
                // With CANDLE_HIGHER_KERNELS=candle nothing takes the loop.
                let Some(fast) = fast else {
                    assert!(!crate::ops::kernels::cpu_fast_paths());
                    continue;
                };
                assert_eq!(fast.dims(), candle.dims());
                assert_eq!(bits(&fast), bits(&candle), "{dtype:?} {}", kind.name());
            }
            // Not taken: a transposed (non-contiguous) operand, another dtype, integers.
            let t = a.t().unwrap();
            assert!(small_arithmetic(Kind::Add, &t, &b.t().unwrap())
                .unwrap()
                .is_none());
            let other = b.to_dtype(DType::BF16).unwrap();
            assert!(small_arithmetic(Kind::Add, &a, &other).unwrap().is_none());
            let ints = a
                .abs()
                .unwrap()
                .clamp(0.0, 9.0)
                .unwrap()
                .to_dtype(DType::U32)
                .unwrap();
            assert!(small_arithmetic(Kind::Mul, &ints, &ints).unwrap().is_none());
        }
    }

    #[test]
    fn broadcast_shapes_align_trailing_dims() {
        assert_eq!(broadcast_shape("t", &[3, 1], &[4]).unwrap(), vec![3, 4]);
        assert_eq!(broadcast_shape("t", &[], &[2, 2]).unwrap(), vec![2, 2]);
        let err = broadcast_shape("add", &[3], &[4]).unwrap_err().to_string();
        assert_eq!(err, "add: shapes [3] and [4] cannot be broadcast together");
    }
}
