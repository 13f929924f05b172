//! `Scalar`: a float hyperparameter that is either a plain `f64` or a tensor the
//! meta-gradient can reach.

use std::fmt;
use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Sub, SubAssign};

use crate::error::Result;
use crate::ops::Operand;
use crate::tensor::Tensor;

/// A float hyperparameter in a differentiable twin: a constant, or a tensor with one
/// element (usually a leaf that requires grad) through which gradients flow.
///
/// Arithmetic between scalars and floats stays a plain float until a tensor takes part,
/// so an optimizer step written once costs nothing extra when nothing is overridden.
/// `lr * grad` (and `+`, `-`, `/`) with a tensor on the right is a `Result<Tensor>`, as
/// for `f64`. It prints as an `f64` does (`{}`, `{:e}`, `{:E}`; a tensor by its value),
/// and `{:?}` of a float is the float's.
#[derive(Clone)]
pub enum Scalar {
    /// A constant.
    Float(f64),
    /// A one-element tensor.
    Tensor(Tensor),
}

impl Scalar {
    /// The current value as f64 (reads the tensor; for branches, never for gradients). A
    /// per-task tensor (one value per task) reads as its value when all tasks agree, and
    /// as NaN otherwise (so `!= 0.0` holds and `> 0.0` does not). Inside a differentiable
    /// twin's step, on a tensor that requires grad, this is reported as
    /// [`crate::Error::LeavesGraph`]; comparisons (`self.lr > 0.0`) read the value without
    /// it, since a branch carries no gradient.
    #[track_caller]
    pub fn value(&self) -> f64 {
        if let Scalar::Tensor(t) = self {
            crate::tensor::graph_exit::note(
                "Scalar::value",
                t.requires_grad(),
                std::panic::Location::caller(),
            );
        }
        self.read()
    }

    /// The value, for branches inside this crate.
    fn read(&self) -> f64 {
        match self {
            Scalar::Float(v) => *v,
            Scalar::Tensor(t) => match t.to_vec_f64() {
                Ok(v) if !v.is_empty() && v.iter().all(|&x| x == v[0]) => v[0],
                _ => f64::NAN,
            },
        }
    }

    /// The tensor, if this scalar is one.
    pub fn as_tensor(&self) -> Option<&Tensor> {
        match self {
            Scalar::Float(_) => None,
            Scalar::Tensor(t) => Some(t),
        }
    }

    fn map(&self, f: impl Fn(f64) -> f64, t: impl Fn(&Tensor) -> Result<Tensor>) -> Scalar {
        match self {
            Scalar::Float(v) => Scalar::Float(f(*v)),
            Scalar::Tensor(x) => Scalar::Tensor(infallible(t(x))),
        }
    }

    /// `self ^ e`, with the bits of `f64::powf` whether `e` is a constant or a
    /// hyperparameter (`self.beta.powf(self.gamma)` compiles in both forms of a step); a
    /// tensor exponent is [`Tensor::pow`], a constant base becoming a constant tensor.
    pub fn powf(&self, e: impl Into<Scalar>) -> Scalar {
        // As the arithmetic: a tensor exponent takes the base's dtype, device and shape.
        combine(self.clone(), e.into(), f64::powf, |x, e| match e {
            Operand::Float(e) => x.powf(e),
            Operand::Tensor(e) => x.pow(&e),
        })
    }

    /// `self ^ n` for an integer exponent (a step counter). Takes `i32` like `f64::powi`,
    /// so one optimizer body compiles with `f64` and with `Scalar` hyperparameters; a
    /// tensor takes the products `f64::powi` takes, so it has the same bits.
    pub fn powi(&self, n: i32) -> Scalar {
        self.map(|v| v.powi(n), |t| powi_by_squaring(t, n))
    }

    /// `self ^ e` where the exponent may itself be a tensor: [`Scalar::powf`].
    pub fn pow(&self, e: &Scalar) -> Scalar {
        self.powf(e.clone())
    }

    /// Square root (safe at zero, see [`Tensor::sqrt`]).
    pub fn sqrt(&self) -> Scalar {
        self.map(f64::sqrt, Tensor::sqrt)
    }

    /// `e^self`.
    pub fn exp(&self) -> Scalar {
        self.map(f64::exp, Tensor::exp)
    }

    /// Natural logarithm.
    pub fn ln(&self) -> Scalar {
        self.map(f64::ln, Tensor::log)
    }

    /// `1 / self`.
    pub fn recip(&self) -> Scalar {
        Scalar::Float(1.0) / self.clone()
    }

    /// The larger of `self` and a constant; the gradient follows the winner.
    pub fn max_f64(&self, other: f64) -> Scalar {
        self.max(other)
    }

    /// The larger of `self` and `other` (`f64::max`: a NaN loses to a number); the
    /// gradient follows the winner, and `self` wins ties.
    pub fn max(&self, other: impl Into<Scalar>) -> Scalar {
        let other = other.into();
        let (a, b) = (self.value(), other.value());
        if a >= b || b.is_nan() {
            self.clone()
        } else {
            other
        }
    }

    /// The smaller of `self` and `other` (`f64::min`: a NaN loses to a number); the
    /// gradient follows the winner, and `self` wins ties.
    pub fn min(&self, other: impl Into<Scalar>) -> Scalar {
        let other = other.into();
        let (a, b) = (self.value(), other.value());
        if a <= b || b.is_nan() {
            self.clone()
        } else {
            other
        }
    }

    /// `self` limited to `[min, max]` (`f64::clamp`, NaN stays NaN); the gradient follows
    /// the value chosen.
    pub fn clamp(&self, min: impl Into<Scalar>, max: impl Into<Scalar>) -> Scalar {
        if self.value().is_nan() {
            return self.clone();
        }
        self.max(min).min(max)
    }

    /// Absolute value (`f64::abs`); derivative `sign(self)`, 0 at 0 as torch's.
    pub fn abs(&self) -> Scalar {
        self.map(f64::abs, Tensor::abs)
    }

    /// Hyperbolic tangent.
    pub fn tanh(&self) -> Scalar {
        self.map(f64::tanh, Tensor::tanh)
    }

    /// `f64::from(x)` in a step body, as `#[differentiable_optimizer]` rewrites it when `x`
    /// comes from a hyperparameter: the same conversion for flags (and for the ordinary
    /// form's `f64`), a compile error that says what to write for the twin's `Scalar`.
    #[doc(hidden)]
    pub fn __f64_from<T: FloatFlag>(x: T) -> f64 {
        x.to_f64()
    }

    /// `x as f64` in a step body, as `#[differentiable_optimizer]` rewrites it when `x`
    /// comes from a hyperparameter: the same cast for integer flags of every width (and
    /// for the ordinary form's floats), a compile error for the twin's `Scalar`.
    #[doc(hidden)]
    pub fn __as_f64<T: CastFlag>(x: T) -> f64 {
        x.cast_f64()
    }

    /// `x as f32`, as [`Scalar::__as_f64`].
    #[doc(hidden)]
    pub fn __as_f32<T: CastFlag>(x: T) -> f32 {
        x.cast_f32()
    }
}

/// What `f64::from` converts in a step body: `bool` and integer flags of up to 32 bits
/// (and `f32`, `f64`), exactly as `f64::from` does. A `Scalar` converts to no float: that
/// would cut a tensor hyperparameter out of the graph, and its meta-gradient would be
/// silently lost.
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "`f64::from` of a `{Self}` in an optimizer step",
    label = "`f64::from` here converts `bool` and integer flags, not a float hyperparameter",
    note = "in the differentiable twin a float hyperparameter is a `Scalar`, possibly a tensor the meta-gradient must reach; an `f64` read out of it would silently cut that path",
    note = "use the hyperparameter itself: in tensor arithmetic (`grad.mul(self.lr)?` or `(self.lr * grad)?`), in `Scalar` arithmetic and methods (`self.lr * 0.5`, `self.lr.max(1e-8)`), and in comparisons for branches (`if self.lr > 0.0 {{ .. }}`)"
)]
pub trait FloatFlag {
    /// `f64::from(self)`.
    fn to_f64(self) -> f64;
}

macro_rules! float_flag {
    ($($t:ty),*) => {
        $(impl FloatFlag for $t {
            fn to_f64(self) -> f64 {
                f64::from(self)
            }
        })*
    };
}

float_flag!(bool, u8, u16, u32, i8, i16, i32, f32, f64);

/// What `as f64` and `as f32` cast in a step body: integer flags of every width (`u64`,
/// `usize`, .. which `f64::from` does not take) and `f32`, `f64`, exactly as `as` casts
/// them. A `Scalar` casts to no float, for the reason of [`FloatFlag`].
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "`as` cast of a `{Self}` to a float in an optimizer step",
    label = "`as` here casts integer flags, not a float hyperparameter",
    note = "in the differentiable twin a float hyperparameter is a `Scalar`, possibly a tensor the meta-gradient must reach; an `f64` read out of it would silently cut that path",
    note = "use the hyperparameter itself: in tensor arithmetic (`grad.mul(self.lr)?` or `(self.lr * grad)?`), in `Scalar` arithmetic and methods (`self.lr * 0.5`, `self.lr.max(1e-8)`), and in comparisons for branches (`if self.lr > 0.0 {{ .. }}`)"
)]
pub trait CastFlag {
    /// `self as f64`.
    fn cast_f64(self) -> f64;
    /// `self as f32`.
    fn cast_f32(self) -> f32;
}

macro_rules! cast_flag {
    ($($t:ty),*) => {
        $(impl CastFlag for $t {
            fn cast_f64(self) -> f64 {
                self as f64
            }
            fn cast_f32(self) -> f32 {
                self as f32
            }
        })*
    };
}

cast_flag!(u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize, f32, f64);

/// `t ^ n` by the multiplications of `f64::powi` (LLVM's expansion and compiler-rt's
/// `__powidf2` alike): square and multiply from the lowest bit of `|n|`, then one
/// reciprocal for `n < 0`. Each product is recorded, so the derivative is exact.
fn powi_by_squaring(t: &Tensor, n: i32) -> Result<Tensor> {
    let (mut square, mut bits, mut product) = (t.clone(), n.unsigned_abs(), None::<Tensor>);
    while bits != 0 {
        if bits & 1 == 1 {
            product = Some(match product {
                Some(p) => Tensor::mul(&p, &square)?,
                None => square.clone(),
            });
        }
        bits >>= 1;
        if bits != 0 {
            square = Tensor::mul(&square, &square)?;
        }
    }
    let product = match product {
        Some(p) => p,
        None => t.ones_like()?,
    };
    if n < 0 {
        1.0 / &product
    } else {
        Ok(product)
    }
}

/// Ops on one-element tensors of one dtype and device fail only on allocation failure,
/// which candle itself treats as fatal; `Scalar` arithmetic aligns dtypes and devices
/// before it combines two tensors.
fn infallible(r: Result<Tensor>) -> Tensor {
    r.unwrap_or_else(|e| panic!("scalar hyperparameter arithmetic failed: {e}"))
}

fn combine(
    a: Scalar,
    b: Scalar,
    f: fn(f64, f64) -> f64,
    t: fn(&Tensor, Operand) -> Result<Tensor>,
) -> Scalar {
    match (a, b) {
        (Scalar::Float(x), Scalar::Float(y)) => Scalar::Float(f(x, y)),
        (Scalar::Tensor(x), Scalar::Float(y)) => {
            Scalar::Tensor(infallible(t(&x, Operand::Float(y))))
        }
        (Scalar::Float(x), Scalar::Tensor(y)) => {
            let x = infallible(y.full_like(x));
            Scalar::Tensor(infallible(t(&x, Operand::Tensor(y))))
        }
        (Scalar::Tensor(x), Scalar::Tensor(y)) => {
            let y = infallible(y.to_dtype(x.dtype()).and_then(|y| y.to_device(x.device())));
            // Same element count: align the shapes; otherwise (a per-task `[T, 1, ..]`
            // value against a shared one) the op broadcasts both ways.
            let y = if y.elem_count() == x.elem_count() {
                infallible(y.reshape(x.dims()))
            } else {
                y
            };
            Scalar::Tensor(infallible(t(&x, Operand::Tensor(y))))
        }
    }
}

macro_rules! scalar_op {
    ($trait:ident, $fn:ident, $op:tt) => {
        impl $trait<Scalar> for Scalar {
            type Output = Scalar;
            fn $fn(self, rhs: Scalar) -> Scalar {
                combine(self, rhs, |a, b| a $op b, |t, o| Tensor::$fn(t, o))
            }
        }
        impl $trait<f64> for Scalar {
            type Output = Scalar;
            fn $fn(self, rhs: f64) -> Scalar {
                combine(self, Scalar::Float(rhs), |a, b| a $op b, |t, o| Tensor::$fn(t, o))
            }
        }
        impl $trait<Scalar> for f64 {
            type Output = Scalar;
            fn $fn(self, rhs: Scalar) -> Scalar {
                combine(Scalar::Float(self), rhs, |a, b| a $op b, |t, o| Tensor::$fn(t, o))
            }
        }
        impl $trait<&Scalar> for Scalar {
            type Output = Scalar;
            fn $fn(self, rhs: &Scalar) -> Scalar {
                self $op rhs.clone()
            }
        }
        impl $trait<Scalar> for &Scalar {
            type Output = Scalar;
            fn $fn(self, rhs: Scalar) -> Scalar {
                self.clone() $op rhs
            }
        }
        impl $trait<f64> for &Scalar {
            type Output = Scalar;
            fn $fn(self, rhs: f64) -> Scalar {
                self.clone() $op rhs
            }
        }
        impl $trait<&Scalar> for f64 {
            type Output = Scalar;
            fn $fn(self, rhs: &Scalar) -> Scalar {
                self $op rhs.clone()
            }
        }
    };
}

scalar_op!(Add, add, +);
scalar_op!(Sub, sub, -);
scalar_op!(Mul, mul, *);
scalar_op!(Div, div, /);

macro_rules! scalar_tensor_op {
    ($trait:ident, $fn:ident) => {
        /// `lr op grad`, as `f64 op &Tensor` is (a `Result`); a tensor hyperparameter takes
        /// part in the op, so its gradient flows.
        impl $trait<&Tensor> for Scalar {
            type Output = Result<Tensor>;
            fn $fn(self, rhs: &Tensor) -> Result<Tensor> {
                match self {
                    Scalar::Float(v) => $trait::$fn(v, rhs),
                    Scalar::Tensor(t) => Tensor::$fn(&t, rhs),
                }
            }
        }
        impl $trait<Tensor> for Scalar {
            type Output = Result<Tensor>;
            fn $fn(self, rhs: Tensor) -> Result<Tensor> {
                $trait::$fn(self, &rhs)
            }
        }
    };
}

scalar_tensor_op!(Add, add);
scalar_tensor_op!(Sub, sub);
scalar_tensor_op!(Mul, mul);
scalar_tensor_op!(Div, div);

/// Exact negation: `-Float(0.0)` is `-0.0`, as for `f64` (not `0.0 - x`).
impl Neg for Scalar {
    type Output = Scalar;
    fn neg(self) -> Scalar {
        self.map(|v| -v, Tensor::neg)
    }
}

impl Neg for &Scalar {
    type Output = Scalar;
    fn neg(self) -> Scalar {
        self.map(|v| -v, Tensor::neg)
    }
}

macro_rules! scalar_assign_op {
    ($trait:ident, $fn:ident, $op:tt) => {
        /// Compound assignment, so `lr *= 0.5` compiles for `f64` and `Scalar` alike.
        impl<T: Into<Scalar>> $trait<T> for Scalar {
            fn $fn(&mut self, rhs: T) {
                *self = self.clone() $op rhs.into();
            }
        }
    };
}

scalar_assign_op!(AddAssign, add_assign, +);
scalar_assign_op!(SubAssign, sub_assign, -);
scalar_assign_op!(MulAssign, mul_assign, *);
scalar_assign_op!(DivAssign, div_assign, /);

impl From<f64> for Scalar {
    fn from(v: f64) -> Self {
        Scalar::Float(v)
    }
}

impl From<Tensor> for Scalar {
    fn from(t: Tensor) -> Self {
        Scalar::Tensor(t)
    }
}

impl From<Scalar> for Operand {
    fn from(s: Scalar) -> Self {
        match s {
            Scalar::Float(v) => Operand::Float(v),
            Scalar::Tensor(t) => Operand::Tensor(t),
        }
    }
}

impl From<&Scalar> for Operand {
    fn from(s: &Scalar) -> Self {
        s.clone().into()
    }
}

/// Compares values (reads a tensor): for branches such as `if self.momentum != 0.0`.
impl PartialEq<f64> for Scalar {
    fn eq(&self, other: &f64) -> bool {
        self.value() == *other
    }
}

/// Orders by value (reads a tensor): for branches on a hyperparameter.
impl PartialOrd<f64> for Scalar {
    fn partial_cmp(&self, other: &f64) -> Option<std::cmp::Ordering> {
        self.value().partial_cmp(other)
    }
}

/// The same comparison written the other way round: `0.0 != self.momentum`.
impl PartialEq<Scalar> for f64 {
    fn eq(&self, other: &Scalar) -> bool {
        *self == other.value()
    }
}

/// Compares two hyperparameters by value: `self.lr < self.lr_max`.
impl PartialEq for Scalar {
    fn eq(&self, other: &Scalar) -> bool {
        self.value() == other.value()
    }
}

/// Orders two hyperparameters by value.
impl PartialOrd for Scalar {
    fn partial_cmp(&self, other: &Scalar) -> Option<std::cmp::Ordering> {
        self.value().partial_cmp(&other.value())
    }
}

/// The same ordering written the other way round: `0.0 < self.lr`.
impl PartialOrd<Scalar> for f64 {
    fn partial_cmp(&self, other: &Scalar) -> Option<std::cmp::Ordering> {
        self.partial_cmp(&other.value())
    }
}

/// A tensor's value as its dtype prints it: `f64`, or `f32` for the narrower float types
/// (exact for them, and with `f32`'s shortest form: an f32 `0.1` prints `0.1`).
enum Printed {
    F64(f64),
    F32(f32),
}

/// Writes the value with `f64`'s own formatting (`f32`'s for a tensor of a narrower
/// dtype) and the caller's flags, so `{}`, `{:.3}` and `{:e}` print what they print for
/// the ordinary optimizer's `f64`. A per-task tensor prints its values in brackets.
/// Reading the tensor is not an exit from the graph: nothing computed depends on the text.
fn format(
    s: &Scalar,
    f: &mut fmt::Formatter<'_>,
    f64_fmt: fn(&f64, &mut fmt::Formatter<'_>) -> fmt::Result,
    f32_fmt: fn(&f32, &mut fmt::Formatter<'_>) -> fmt::Result,
) -> fmt::Result {
    use candle_core::{DType, Device};
    let t = match s {
        Scalar::Float(v) => return f64_fmt(v, f),
        Scalar::Tensor(t) => t,
    };
    let values = t
        .value()
        .flatten_all()
        .and_then(|v| v.to_device(&Device::Cpu))
        .and_then(|v| match v.dtype() {
            DType::F64 => Ok(v.to_vec1::<f64>()?.into_iter().map(Printed::F64).collect()),
            _ => Ok(v
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?
                .into_iter()
                .map(Printed::F32)
                .collect::<Vec<_>>()),
        });
    let values = match values {
        Ok(values) => values,
        Err(e) => return write!(f, "<unreadable tensor: {e}>"),
    };
    let one = |v: &Printed, f: &mut fmt::Formatter<'_>| match v {
        Printed::F64(x) => f64_fmt(x, f),
        Printed::F32(x) => f32_fmt(x, f),
    };
    match values.as_slice() {
        [v] => one(v, f),
        values => {
            f.write_str("[")?;
            for (i, v) in values.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                one(v, f)?;
            }
            f.write_str("]")
        }
    }
}

/// The value, as `f64` prints it.
impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        format(self, f, fmt::Display::fmt, fmt::Display::fmt)
    }
}

/// A float as `f64` debug-prints it (so a twin prints as its optimizer does), a tensor as
/// `Tensor(..)` with the tensor's own `Debug`.
impl fmt::Debug for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Float(v) => fmt::Debug::fmt(v, f),
            Scalar::Tensor(t) => f.debug_tuple("Tensor").field(t).finish(),
        }
    }
}

/// The value, as `f64` prints it with `{:e}`.
impl fmt::LowerExp for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        format(self, f, fmt::LowerExp::fmt, fmt::LowerExp::fmt)
    }
}

/// The value, as `f64` prints it with `{:E}`.
impl fmt::UpperExp for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        format(self, f, fmt::UpperExp::fmt, fmt::UpperExp::fmt)
    }
}

#[cfg(test)]
mod tests {
    use super::Scalar;
    use crate::tensor::Tensor;

    /// Comparisons read the value, from either side, for floats and tensors alike, so a
    /// branch on a hyperparameter compiles and behaves the same in both forms of a step.
    #[test]
    fn compares_with_floats_from_either_side() {
        use std::cmp::Ordering::{Equal, Greater, Less};
        for s in [Scalar::Float(0.5), Scalar::Tensor(Tensor::scalar(0.5f64))] {
            assert_eq!(s.partial_cmp(&0.0), Some(Greater));
            assert_eq!(0.0.partial_cmp(&s), Some(Less));
            assert_eq!(0.5.partial_cmp(&s), Some(Equal));
            assert!(PartialEq::eq(&s, &0.5) && PartialEq::eq(&0.5, &s));
            assert!(PartialEq::ne(&1.0, &s));
            assert!(s < Scalar::Float(0.75) && Scalar::Float(0.25) < s);
            assert_eq!(
                s.partial_cmp(&Scalar::Tensor(Tensor::scalar(0.5f64))),
                Some(Equal)
            );
        }
    }

    fn read(s: &Scalar) -> f64 {
        s.value()
    }

    /// Negation is exact for floats and tensors: `-0.0` keeps its sign, so a step that
    /// divides by `-x` at `x = 0` gives the same infinity in both forms.
    #[test]
    fn negation_is_exact() {
        let neg_zero = read(&-Scalar::Float(0.0));
        assert!(neg_zero == 0.0 && neg_zero.is_sign_negative());
        let t = -Scalar::Tensor(Tensor::scalar(0.0f64));
        assert!(read(&t).is_sign_negative());
        assert_eq!(1.0 / read(&-&Scalar::Float(0.0)), f64::NEG_INFINITY);
        assert_eq!(read(&-Scalar::Float(2.5)), -2.5);
    }

    /// The f64 methods a step body may call on a hyperparameter exist on `Scalar` with the
    /// same results, and compound assignment works on both.
    #[test]
    fn float_methods_and_compound_assignment_match_f64() {
        let same = |a: f64, b: f64| a == b || (a.is_nan() && b.is_nan());
        for x in [-1.5f64, 0.0, 2.0, f64::NAN] {
            for s in [Scalar::Float(x), Scalar::Tensor(Tensor::scalar(x))] {
                assert!(same(read(&s.max(f64::NAN)), x.max(f64::NAN)), "{x}");
                assert!(same(read(&s.min(f64::NAN)), x.min(f64::NAN)), "{x}");
                assert!(same(read(&s.max(0.5)), x.max(0.5)), "{x}");
                assert!(same(read(&s.min(0.5)), x.min(0.5)), "{x}");
                assert!(same(read(&s.clamp(-1.0, 1.0)), x.clamp(-1.0, 1.0)), "{x}");
                if x.is_nan() {
                    continue;
                }
                assert_eq!(read(&s.abs()), x.abs());
                assert_eq!(read(&s.tanh()), x.tanh());
                let (mut a, mut b) = (s.clone(), x);
                a *= 0.5;
                b *= 0.5;
                a += Scalar::Float(1.0);
                b += 1.0;
                a -= 0.25;
                b -= 0.25;
                a /= 2.0;
                b /= 2.0;
                assert_eq!(read(&a), b);
            }
        }
    }

    /// A tensor's powers, roots, logarithms and divisions have the bits of the f64
    /// methods (the ordinary optimizer's arithmetic), and `powi` differentiates exactly.
    #[test]
    fn tensor_arithmetic_has_the_bits_of_f64() {
        use crate::autograd::{grad, GradOptions};
        for x in [0.9f64, 0.999, -1.7, 1e-3, 3.0, -0.0, 0.37] {
            let t = Scalar::Tensor(Tensor::scalar(x));
            for n in -9..=40 {
                let (a, b) = (read(&t.powi(n)), x.powi(n));
                assert!(
                    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                    "{x}^{n}"
                );
            }
            for e in [0.5, 2.0, 3.0, -1.0, 1.5, 7.0] {
                let (a, b) = (read(&t.powf(e)), x.powf(e));
                assert!(
                    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                    "{x}^{e}"
                );
            }
            let pairs = [
                (t.sqrt(), x.sqrt()),
                (t.exp(), x.exp()),
                (t.ln(), x.ln()),
                (t.recip(), x.recip()),
                (t.clone() / 0.3, x / 0.3),
                (0.3 / t.clone(), 0.3 / x),
                (t.clone() * 0.3, x * 0.3),
                (1.0 - t.clone(), 1.0 - x),
            ];
            for (i, (a, b)) in pairs.into_iter().enumerate() {
                let a = read(&a);
                assert!(
                    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                    "{x}: {i}"
                );
            }
        }
        let leaf = Tensor::scalar(0.9f64).to_leaf();
        for n in [-3, 0, 1, 5, 12] {
            let Scalar::Tensor(y) = Scalar::Tensor(leaf.clone()).powi(n) else {
                unreachable!()
            };
            let d = grad(
                &[y],
                std::slice::from_ref(&leaf),
                GradOptions::default().allow_unused(true),
            )
            .unwrap()[0]
                .as_ref()
                .map_or(0.0, |d| d.to_vec_f64().unwrap()[0]);
            let exact = f64::from(n) * 0.9f64.powi(n - 1);
            assert!((d - exact).abs() <= 1e-14 * exact.abs(), "d/dx x^{n}: {d}");
        }
    }

    /// A hyperparameter exponent: `f64::powf`'s bits for a tensor base, a tensor exponent
    /// or both (and `f32::powf`'s for f32 tensors), and the derivatives of `x^e`:
    /// d/dx = e x^(e-1), d/de = x^e ln x, and d2/de2 = x^e ln(x)^2.
    #[test]
    fn a_tensor_exponent_has_the_bits_of_f64_powf_and_its_derivatives() {
        use crate::autograd::{grad, GradOptions};
        let bases = [0.9f64, 0.999, 1.7, 1e-3, 3.0, 0.37, 12.5];
        let exponents = [0.5f64, 2.0, -1.0, 1.5, 7.3, 0.75, -0.3];
        let mut corrected = 0;
        for &x in &bases {
            for &e in &exponents {
                let want = x.powf(e);
                let cases = [
                    (Scalar::Float(x), Scalar::Tensor(Tensor::scalar(e))),
                    (
                        Scalar::Tensor(Tensor::scalar(x)),
                        Scalar::Tensor(Tensor::scalar(e)),
                    ),
                ];
                for (base, exponent) in cases {
                    let got = read(&base.powf(exponent.clone()));
                    assert_eq!(got.to_bits(), want.to_bits(), "{x}^{e}");
                    let composite = read(&(base.ln() * exponent).exp());
                    corrected += usize::from(composite.to_bits() != want.to_bits());
                }
                let x32 = Scalar::Tensor(Tensor::scalar(x as f32));
                let e32 = Scalar::Tensor(Tensor::scalar(e as f32));
                let want32 = f64::from((x as f32).powf(e as f32));
                assert_eq!(
                    read(&x32.powf(e32)).to_bits(),
                    want32.to_bits(),
                    "f32 {x}^{e}"
                );
            }
        }
        // Tensors of other dtypes and shapes meet as in the arithmetic (the base's win).
        let base = Scalar::Tensor(
            Tensor::from_vec(vec![0.9f32, 0.5], &[2, 1], &candle_core::Device::Cpu).unwrap(),
        );
        let exponent = Scalar::Tensor(
            Tensor::from_vec(vec![1.5f64, 2.0], &[2], &candle_core::Device::Cpu).unwrap(),
        );
        let Scalar::Tensor(y) = base.powf(exponent) else {
            unreachable!()
        };
        assert_eq!(
            (y.dtype(), y.dims()),
            (candle_core::DType::F32, &[2, 1][..])
        );
        assert_eq!(y.to_vec_f64().unwrap(), [f64::from(0.9f32.powf(1.5)), 0.25]);
        // `exp(e ln x)`, what `Scalar::pow` computed before, is off in the last bit for some
        // of these pairs, so the test tells the two apart.
        assert!(corrected > 0);
        let (x, e) = (
            Tensor::scalar(0.9f64).to_leaf(),
            Tensor::scalar(1.5f64).to_leaf(),
        );
        let Scalar::Tensor(y) = Scalar::Tensor(x.clone()).powf(Scalar::Tensor(e.clone())) else {
            unreachable!()
        };
        let opts = GradOptions::create_graph();
        let d = grad(&[y], &[x, e.clone()], opts.clone()).unwrap();
        let (dx, de) = (d[0].clone().unwrap(), d[1].clone().unwrap());
        let value = |t: &Tensor| t.to_vec_f64().unwrap()[0];
        let (p, ln) = (0.9f64.powf(1.5), 0.9f64.ln());
        assert!((value(&dx) - 1.5 * 0.9f64.powf(0.5)).abs() < 1e-15);
        assert!((value(&de) - p * ln).abs() < 1e-15);
        let dee = grad(&[de], &[e], opts).unwrap()[0].clone().unwrap();
        assert!((value(&dee) - p * ln * ln).abs() < 1e-15);
    }

    /// `lr op grad` is `f64 op &Tensor` for a float, bit for bit, and for a tensor the
    /// same values with the tensor on the tape: d/dlr sum(lr * g) = sum(g),
    /// d/dlr sum(lr - g) = n, d/dlr sum(lr / g) = sum(1 / g), d/dlr sum(lr + g) = n.
    #[test]
    fn arithmetic_with_a_tensor_on_the_right_matches_f64_and_differentiates() {
        use crate::autograd::{grad, GradOptions};
        let g = Tensor::from_vec(
            vec![0.3f64, -1.7, 2.0, -0.0],
            &[4],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let bits = |t: &Tensor| -> Vec<u64> {
            t.to_vec_f64()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        let lr = 0.1f64;
        type Case = (
            fn(f64, &Tensor) -> crate::error::Result<Tensor>,
            fn(Scalar, &Tensor) -> crate::error::Result<Tensor>,
            f64,
        );
        let cases: [Case; 4] = [
            (|a, g| a * g, |a, g| a * g, 0.6),
            (|a, g| a - g, |a, g| a - g.clone(), 4.0),
            (
                |a, g| a / g,
                |a, g| a / g,
                1.0 / 0.3 - 1.0 / 1.7 + 0.5 + f64::NEG_INFINITY,
            ),
            (|a, g| a + g, |a, g| a + g.clone(), 4.0),
        ];
        for (plain, scalar, d_lr) in cases {
            let expected = plain(lr, &g).unwrap();
            assert_eq!(
                bits(&scalar(Scalar::Float(lr), &g).unwrap()),
                bits(&expected)
            );
            let leaf = Tensor::scalar(lr).to_leaf();
            let out = scalar(Scalar::Tensor(leaf.clone()), &g).unwrap();
            assert_eq!(bits(&out), bits(&expected));
            let d = grad(&[out.sum_all().unwrap()], &[leaf], GradOptions::default()).unwrap();
            let d = d[0].as_ref().unwrap().to_scalar_f64().unwrap();
            assert!(d == d_lr || (d - d_lr).abs() < 1e-12, "{d} != {d_lr}");
        }
        // Negation first, as in `-self.lr * grad`.
        let neg = (-Scalar::Float(lr) * &g).unwrap();
        assert_eq!(bits(&neg), bits(&(-lr * &g).unwrap()));
    }

    /// A scalar prints as the `f64` it stands for, with the caller's flags, so a step that
    /// prints a hyperparameter prints the same in both forms.
    #[test]
    fn prints_as_the_f64() {
        for x in [
            0.1f64,
            -0.0,
            2.5,
            1e-300,
            f64::NAN,
            f64::INFINITY,
            12345.678,
        ] {
            let float = Scalar::Float(x);
            let tensor = Scalar::Tensor(Tensor::scalar(x));
            for s in [&float, &tensor] {
                assert_eq!(format!("{s}"), format!("{x}"));
                assert_eq!(format!("{s:.3}"), format!("{x:.3}"));
                assert_eq!(format!("{s:>12.2}"), format!("{x:>12.2}"));
                assert_eq!(format!("{s:e}"), format!("{x:e}"));
                assert_eq!(format!("{s:E}"), format!("{x:E}"));
                assert_eq!(s.to_string(), x.to_string());
            }
            assert_eq!(format!("{float:?}"), format!("{x:?}"));
            assert_eq!(format!("{float:#?}"), format!("{x:#?}"));
            assert!(format!("{tensor:?}").starts_with("Tensor("));
        }
        // A narrower dtype prints its own shortest form; per-task values in brackets.
        assert_eq!(Scalar::Tensor(Tensor::scalar(0.1f32)).to_string(), "0.1");
        let per_task =
            Tensor::from_vec(vec![0.1f64, 0.25], &[2, 1], &candle_core::Device::Cpu).unwrap();
        assert_eq!(format!("{:.2}", Scalar::Tensor(per_task)), "[0.10, 0.25]");
    }

    /// `f64::from` in a step converts what `f64::from` converts, to the same value.
    #[test]
    fn float_flags_convert_as_f64_from() {
        assert_eq!(Scalar::__f64_from(true), 1.0);
        assert_eq!(Scalar::__f64_from(7u32), 7.0);
        assert_eq!(Scalar::__f64_from(-3i16), -3.0);
        assert_eq!(Scalar::__f64_from(0.1f32), f64::from(0.1f32));
        assert_eq!(Scalar::__f64_from(0.1f64).to_bits(), 0.1f64.to_bits());
    }

    /// `as f64` and `as f32` in a step cast as `as` does, rounding included.
    #[test]
    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
    fn cast_flags_cast_as_as_does() {
        let wide = (1u64 << 60) + 1;
        assert_eq!(Scalar::__as_f64(wide).to_bits(), (wide as f64).to_bits());
        assert_eq!(Scalar::__as_f32(wide).to_bits(), (wide as f32).to_bits());
        assert_eq!(Scalar::__as_f64(usize::MAX), usize::MAX as f64);
        assert_eq!(Scalar::__as_f64(i64::MIN), -(2f64.powi(63)));
        assert_eq!(Scalar::__as_f64(u128::MAX), u128::MAX as f64);
        assert_eq!(Scalar::__as_f32(0.1f64).to_bits(), 0.1f32.to_bits());
        assert_eq!(Scalar::__as_f64(0.1f32), f64::from(0.1f32));
    }
}
