//! Elementwise unary ops: exp, log, sqrt (safe at zero), safe_recip, abs, sign, relu,
//! tanh, sigmoid.

use crate::autograd::{Backward, VjpCtx};
use crate::error::Result;
use crate::tensor::Tensor;

#[derive(Clone, Copy)]
enum Kind {
    Exp,
    Log,
    Sqrt,
    SafeRecip,
    Abs,
    Sign,
    Relu,
    Tanh,
    Sigmoid,
}

struct UnaryBackward(Kind);

impl Backward for UnaryBackward {
    fn name(&self) -> &'static str {
        match self.0 {
            Kind::Exp => "exp",
            Kind::Log => "log",
            Kind::Sqrt => "sqrt",
            Kind::SafeRecip => "safe_recip",
            Kind::Abs => "abs",
            Kind::Sign => "sign",
            Kind::Relu => "relu",
            Kind::Tanh => "tanh",
            Kind::Sigmoid => "sigmoid",
        }
    }

    /// exp: g y; log: g / x; sqrt: g / (2 y), 0 where y = 0; safe_recip: -g y^2;
    /// abs: g sign(x); sign: none; relu: g [x > 0]; tanh: g (1 - y^2); sigmoid: g y (1 - y).
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let (x, y, g) = (&ctx.inputs[0], ctx.output, ctx.grad);
        let gx = match self.0 {
            Kind::Exp => g.mul(y)?,
            Kind::Log => g.div(x)?,
            Kind::Sqrt => g.mul(&y.safe_recip()?)?.affine(0.5, 0.0)?,
            Kind::SafeRecip => g.mul(&y.mul(y)?)?.neg()?,
            Kind::Abs => g.mul(Tensor::new(x.value().sign()?))?,
            Kind::Sign => return Ok(vec![None]),
            Kind::Relu => relu_mask(g, y.value())?,
            Kind::Tanh => g.mul(&y.mul(y)?.affine(-1.0, 1.0)?)?,
            Kind::Sigmoid => g.mul(&y.mul(&y.affine(-1.0, 1.0)?)?)?,
        };
        Ok(vec![Some(gx)])
    }
}

/// `g [y > 0]` with `y` a relu's output: its derivative applied to `g` as one node (and,
/// on the CPU, one pass) instead of a sign and a product. The mask is constant, so the
/// node's own derivative is the same mask.
struct ReluMask {
    y: candle_core::Tensor,
}

impl Backward for ReluMask {
    fn name(&self) -> &'static str {
        "relu_backward"
    }

    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(relu_mask(ctx.grad, &self.y)?)])
    }
}

fn relu_mask(g: &Tensor, y: &candle_core::Tensor) -> Result<Tensor> {
    let value = match relu_mask_cpu(g.value(), y)? {
        Some(v) => v,
        // `sign` of a relu output is 1 where it is positive, else 0 (NaN included).
        None => g.value().mul(&y.sign()?)?,
    };
    Tensor::from_op(value, &[g], ReluMask { y: y.clone() })
}

/// `g * (y > 0 ? 1 : 0)` in one pass over contiguous CPU f32/f64 tensors of one shape
/// (the same products as `g * sign(y)`, bit for bit); `None` elsewhere.
fn relu_mask_cpu(
    g: &candle_core::Tensor,
    y: &candle_core::Tensor,
) -> Result<Option<candle_core::Tensor>> {
    use candle_core::{DType, Storage};
    let applies = g.device().is_cpu()
        && y.device().is_cpu()
        && g.is_contiguous()
        && y.is_contiguous()
        && g.dtype() == y.dtype()
        && g.dims() == y.dims()
        && matches!(g.dtype(), DType::F32 | DType::F64)
        && super::kernels::cpu_fast_paths();
    if !applies {
        return Ok(None);
    }
    let (sg, lg) = g.storage_and_layout();
    let (sy, ly) = y.storage_and_layout();
    let (Storage::Cpu(cg), Storage::Cpu(cy)) = (&*sg, &*sy) else {
        return Ok(None);
    };
    let n = g.elem_count();
    let (og, oy) = (lg.start_offset(), ly.start_offset());
    let value = match g.dtype() {
        DType::F32 => {
            let (gs, ys) = (
                &cg.as_slice::<f32>()?[og..og + n],
                &cy.as_slice::<f32>()?[oy..oy + n],
            );
            let data: Vec<f32> = gs
                .iter()
                .zip(ys)
                .map(|(&g, &y)| g * f32::from(y > 0.0))
                .collect();
            candle_core::Tensor::from_vec(data, g.shape(), g.device())?
        }
        _ => {
            let (gs, ys) = (
                &cg.as_slice::<f64>()?[og..og + n],
                &cy.as_slice::<f64>()?[oy..oy + n],
            );
            let data: Vec<f64> = gs
                .iter()
                .zip(ys)
                .map(|(&g, &y)| g * f64::from(y > 0.0))
                .collect();
            candle_core::Tensor::from_vec(data, g.shape(), g.device())?
        }
    };
    Ok(Some(value))
}

impl Tensor {
    fn unary(&self, kind: Kind, value: candle_core::Tensor) -> Result<Tensor> {
        Tensor::from_op(value, &[self], UnaryBackward(kind))
    }

    /// `e^x`.
    pub fn exp(&self) -> Result<Tensor> {
        self.require_float("exp")?;
        self.unary(Kind::Exp, self.value().exp()?)
    }

    /// Natural logarithm.
    pub fn log(&self) -> Result<Tensor> {
        self.require_float("log")?;
        self.unary(Kind::Log, self.value().log()?)
    }

    /// Square root whose derivative is defined as 0 at 0, at every order: adaptive
    /// optimizers take the root of second moments that are exactly 0 for dead units, and
    /// the usual infinite slope there turns a whole meta-gradient into NaN.
    pub fn sqrt(&self) -> Result<Tensor> {
        self.require_float("sqrt")?;
        self.unary(Kind::Sqrt, self.value().sqrt()?)
    }

    /// `1 / x` where `x != 0`, and 0 where `x == 0` (its derivative `-1/x^2` likewise).
    pub fn safe_recip(&self) -> Result<Tensor> {
        self.require_float("safe_recip")?;
        let v = self.value();
        let zero = v.eq(0.0)?;
        let denom = zero.where_cond(&v.ones_like()?, v)?;
        let value = zero.where_cond(&v.zeros_like()?, &denom.recip()?)?;
        self.unary(Kind::SafeRecip, value)
    }

    /// `|x|`; its derivative is `sign(x)` (0 at 0, as PyTorch).
    pub fn abs(&self) -> Result<Tensor> {
        self.unary(Kind::Abs, self.value().abs()?)
    }

    /// -1, 0 or 1; no gradient flows through it.
    pub fn sign(&self) -> Result<Tensor> {
        self.unary(Kind::Sign, self.value().sign()?)
    }

    /// `max(x, 0)`, NaN where `x` is NaN; derivative 0 at 0 (and at NaN), as PyTorch.
    pub fn relu(&self) -> Result<Tensor> {
        self.unary(Kind::Relu, super::nan::relu(self.value())?)
    }

    /// Hyperbolic tangent.
    pub fn tanh(&self) -> Result<Tensor> {
        self.require_float("tanh")?;
        self.unary(Kind::Tanh, self.value().tanh()?)
    }

    /// Logistic sigmoid `1 / (1 + e^-x)`.
    pub fn sigmoid(&self) -> Result<Tensor> {
        self.require_float("sigmoid")?;
        let value = candle_core::Tensor::ones_like(self.value())?
            .broadcast_div(&(self.value().neg()?.exp()? + 1.0)?)?;
        self.unary(Kind::Sigmoid, value)
    }

    /// `x^2`.
    pub fn sqr(&self) -> Result<Tensor> {
        self.powf(2.0)
    }
}
