//! Activations: erf, leaky_relu, elu, gelu (erf form), softplus. Their derivatives are
//! built from differentiable ops where they are not constant, so second derivatives are
//! exact.

use std::f64::consts::{FRAC_1_SQRT_2, FRAC_2_SQRT_PI};

use crate::autograd::{Backward, VjpCtx};
use crate::error::Result;
use crate::tensor::Tensor;

/// Above this input softplus returns `x` itself (PyTorch's default threshold, beta = 1).
const SOFTPLUS_THRESHOLD: f64 = 20.0;

#[derive(Clone, Copy)]
enum Kind {
    Erf,
    LeakyRelu(f64),
    Elu(f64),
    Gelu,
    Softplus,
}

struct Activation(Kind);

/// A constant 0/1 mask of `x > 0` in `x`'s dtype.
fn positive(x: &Tensor) -> Result<Tensor> {
    let v = x.value();
    Ok(Tensor::new(v.gt(0.0)?.to_dtype(v.dtype())?))
}

impl Backward for Activation {
    fn name(&self) -> &'static str {
        match self.0 {
            Kind::Erf => "erf",
            Kind::LeakyRelu(_) => "leaky_relu",
            Kind::Elu(_) => "elu",
            Kind::Gelu => "gelu",
            Kind::Softplus => "softplus",
        }
    }

    /// erf: g 2/sqrt(pi) e^(-x^2); leaky_relu: g (1 if x > 0 else slope);
    /// elu: g (1 if x > 0 else y + alpha, i.e. alpha e^x); gelu: g (Phi(x) + x phi(x)) with
    /// Phi(x) = (1 + erf(x/sqrt 2))/2 and phi(x) = e^(-x^2/2)/sqrt(2 pi);
    /// softplus: g sigmoid(x) (g where x > 20, where the output is x itself).
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let (x, y, g) = (&ctx.inputs[0], ctx.output, ctx.grad);
        let d = match self.0 {
            Kind::Erf => x.sqr()?.neg()?.exp()?.affine(FRAC_2_SQRT_PI, 0.0)?,
            Kind::LeakyRelu(slope) => {
                // A constant: 1 - (1 - slope) [x <= 0] = slope + (1 - slope) [x > 0].
                let m = positive(x)?;
                Tensor::new(m.value().affine(1.0 - slope, slope)?)
            }
            Kind::Elu(alpha) => {
                let m = positive(x)?;
                let neg = y
                    .affine(1.0, alpha)?
                    .mul(Tensor::new(m.value().affine(-1.0, 1.0)?))?;
                neg.add(&m)?
            }
            Kind::Gelu => {
                let cdf = x.affine(FRAC_1_SQRT_2, 0.0)?.erf()?.affine(0.5, 0.5)?;
                let pdf = x
                    .sqr()?
                    .affine(-0.5, 0.0)?
                    .exp()?
                    .affine(FRAC_2_SQRT_PI * FRAC_1_SQRT_2 * 0.5, 0.0)?;
                cdf.add(&x.mul(&pdf)?)?
            }
            Kind::Softplus => {
                let big = Tensor::new(x.value().gt(SOFTPLUS_THRESHOLD)?.to_dtype(x.dtype())?);
                let small = Tensor::new(big.value().affine(-1.0, 1.0)?);
                x.sigmoid()?.mul(&small)?.add(&big)?
            }
        };
        Ok(vec![Some(g.mul(&d)?)])
    }
}

impl Tensor {
    fn activation(&self, kind: Kind, value: candle_core::Tensor) -> Result<Tensor> {
        Tensor::from_op(value, &[self], Activation(kind))
    }

    /// The error function; `d erf(x)/dx = 2/sqrt(pi) e^(-x^2)`.
    pub fn erf(&self) -> Result<Tensor> {
        self.require_float("erf")?;
        self.activation(Kind::Erf, self.value().erf()?)
    }

    /// `x` for `x > 0`, `slope * x` otherwise (`torch.nn.functional.leaky_relu`, whose
    /// default slope is 0.01); the derivative at 0 is `slope`.
    pub fn leaky_relu(&self, slope: f64) -> Result<Tensor> {
        self.require_float("leaky_relu")?;
        let v = self.value();
        let m = v.gt(0.0)?.to_dtype(v.dtype())?.affine(1.0 - slope, slope)?;
        self.activation(Kind::LeakyRelu(slope), (v * m)?)
    }

    /// `x` for `x > 0`, `alpha (e^x - 1)` otherwise (`torch.nn.functional.elu`, default
    /// alpha 1.0); the derivative is `alpha e^x` for `x <= 0`.
    pub fn elu(&self, alpha: f64) -> Result<Tensor> {
        self.require_float("elu")?;
        let v = self.value();
        let m = v.gt(0.0)?.to_dtype(v.dtype())?;
        let neg = v.minimum(0.0)?.exp()?.affine(alpha, -alpha)?;
        let value = ((v * &m)? + (neg * m.affine(-1.0, 1.0)?)?)?;
        self.activation(Kind::Elu(alpha), value)
    }

    /// `x Phi(x)` with the exact normal CDF (`torch.nn.functional.gelu`, approximate =
    /// "none"); `d/dx = Phi(x) + x phi(x)`.
    pub fn gelu(&self) -> Result<Tensor> {
        self.require_float("gelu")?;
        self.activation(Kind::Gelu, self.value().gelu_erf()?)
    }

    /// `log(1 + e^x)`, and `x` itself where `x > 20` (`torch.nn.functional.softplus` with
    /// beta 1, threshold 20); `d/dx = sigmoid(x)` (1 above the threshold).
    pub fn softplus(&self) -> Result<Tensor> {
        self.require_float("softplus")?;
        let v = self.value();
        // Stable form: max(x, 0) + log(1 + e^-|x|).
        let smooth = (v.relu()? + (v.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
        let value = v.gt(SOFTPLUS_THRESHOLD)?.where_cond(v, &smooth)?;
        self.activation(Kind::Softplus, value)
    }
}
