//! softmax, log_softmax and logsumexp over one dimension, numerically stable (the maximum
//! is subtracted before exponentiating).

use crate::autograd::{Backward, VjpCtx};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

fn check_dim(op: &'static str, t: &Tensor, dim: usize) -> Result<()> {
    if dim >= t.rank() {
        return Err(Error::InvalidArgument {
            op,
            message: format!("dimension {dim} out of range for shape {:?}", t.dims()),
        });
    }
    Ok(())
}

/// `x - max(x, dim)` on candle values (the max is a constant shift).
fn shifted(x: &candle_core::Tensor, dim: usize) -> Result<candle_core::Tensor> {
    Ok(x.broadcast_sub(&x.max_keepdim(dim)?)?)
}

#[derive(Clone, Copy)]
enum Kind {
    Softmax,
    LogSoftmax,
    LogSumExp { keepdim: bool },
}

struct SoftmaxBackward {
    kind: Kind,
    dim: usize,
}

impl Backward for SoftmaxBackward {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Softmax => "softmax",
            Kind::LogSoftmax => "log_softmax",
            Kind::LogSumExp { .. } => "logsumexp",
        }
    }

    /// softmax: y (g - sum(g y)); log_softmax: g - e^y sum(g);
    /// logsumexp: g e^(x - y) (the softmax of x), g broadcast over `dim`.
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let (x, y, g, dim) = (&ctx.inputs[0], ctx.output, ctx.grad, self.dim);
        let gx = match self.kind {
            Kind::Softmax => y.mul(&g.sub(&g.mul(y)?.sum_keepdim(dim)?)?)?,
            Kind::LogSoftmax => g.sub(&y.exp()?.mul(&g.sum_keepdim(dim)?)?)?,
            Kind::LogSumExp { keepdim } => {
                let (y, g) = if keepdim {
                    (y.clone(), g.clone())
                } else {
                    (y.unsqueeze(dim)?, g.unsqueeze(dim)?)
                };
                x.sub(&y)?.exp()?.mul(&g)?
            }
        };
        Ok(vec![Some(gx)])
    }
}

impl Tensor {
    /// `e^x / sum(e^x)` along `dim`.
    pub fn softmax(&self, dim: usize) -> Result<Tensor> {
        self.require_float("softmax")?;
        check_dim("softmax", self, dim)?;
        if self.elem_count() == 0 {
            // candle's max reduction takes no empty tensor; PyTorch gives the empty input.
            return super::connected_zeros(self.dims(), self, &[self]);
        }
        let e = shifted(self.value(), dim)?.exp()?;
        let value = e.broadcast_div(&e.sum_keepdim(dim)?)?;
        Tensor::from_op(
            value,
            &[self],
            SoftmaxBackward {
                kind: Kind::Softmax,
                dim,
            },
        )
    }

    /// `x - logsumexp(x)` along `dim`.
    pub fn log_softmax(&self, dim: usize) -> Result<Tensor> {
        self.require_float("log_softmax")?;
        check_dim("log_softmax", self, dim)?;
        if self.elem_count() == 0 {
            // candle's max reduction takes no empty tensor; PyTorch gives the empty input.
            return super::connected_zeros(self.dims(), self, &[self]);
        }
        let s = shifted(self.value(), dim)?;
        let value = s.broadcast_sub(&s.exp()?.sum_keepdim(dim)?.log()?)?;
        Tensor::from_op(
            value,
            &[self],
            SoftmaxBackward {
                kind: Kind::LogSoftmax,
                dim,
            },
        )
    }

    /// `log(sum(e^x))` along `dim`, keeping it as size 1 when `keepdim`. As in PyTorch, an
    /// empty `dim` gives -inf (the log of an empty sum), a slice of -inf gives -inf and one
    /// holding +inf gives +inf.
    pub fn logsumexp(&self, dim: usize, keepdim: bool) -> Result<Tensor> {
        self.require_float("logsumexp")?;
        check_dim("logsumexp", self, dim)?;
        if self.elem_count() == 0 {
            // candle's max reduction takes no empty tensor.
            let mut shape = self.dims().to_vec();
            if keepdim {
                shape[dim] = 1;
            } else {
                shape.remove(dim);
            }
            return super::connected_full(&shape, f64::NEG_INFINITY, self, &[self]);
        }
        let m = self.value().max_keepdim(dim)?;
        // Shifted by 0 where the maximum is infinite (PyTorch's rule): `inf - inf` is NaN.
        let m = m
            .abs()?
            .eq(f64::INFINITY)?
            .where_cond(&m.zeros_like()?, &m)?;
        let s = self.value().broadcast_sub(&m)?;
        let mut value = (s.exp()?.sum_keepdim(dim)?.log()? + m)?;
        if !keepdim {
            value = value.squeeze(dim)?;
        }
        Tensor::from_op(
            value,
            &[self],
            SoftmaxBackward {
                kind: Kind::LogSumExp { keepdim },
                dim,
            },
        )
    }
}
