//! `Scalar`: a float hyperparameter that is either a plain `f64` or a tensor the
//! meta-gradient can reach.

use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Sub, SubAssign};

use crate::error::Result;
use crate::ops::Operand;
use crate::tensor::Tensor;

/// A float hyperparameter in a differentiable twin: a constant, or a tensor with one
/// element (usually a leaf that requires grad) through which gradients flow.
///
/// Arithmetic between scalars and floats stays a plain float until a tensor takes part,
/// so an optimizer step written once costs nothing extra when nothing is overridden.
#[derive(Clone, Debug)]
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

    /// `self ^ e` for a constant exponent.
    pub fn powf(&self, e: f64) -> Scalar {
        self.map(|v| v.powf(e), |t| t.powf(e))
    }

    /// `self ^ n` for an integer exponent (a step counter). Takes `i32` like `f64::powi`,
    /// so one optimizer body compiles with `f64` and with `Scalar` hyperparameters.
    pub fn powi(&self, n: i32) -> Scalar {
        self.map(|v| v.powi(n), |t| t.powf(f64::from(n)))
    }

    /// `self ^ e` where the exponent may itself be a tensor: `exp(e ln self)`.
    pub fn pow(&self, e: &Scalar) -> Scalar {
        match (self, e) {
            (_, Scalar::Float(e)) => self.powf(*e),
            _ => (self.ln() * e.clone()).exp(),
        }
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
}
