//! Matrix products: 2-D, and batched with broadcast batch dimensions.

use crate::autograd::{Backward, VjpCtx};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

struct Matmul;

impl Backward for Matmul {
    fn name(&self) -> &'static str {
        "matmul"
    }

    /// For C = A B: dA = G B^T, dB = A^T G, each summed over broadcast batch dims.
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let (a, b, g) = (&ctx.inputs[0], &ctx.inputs[1], ctx.grad);
        let ga = ctx.needs[0]
            .then(|| g.matmul(&b.t()?)?.sum_to(a.dims()))
            .transpose()?;
        let gb = ctx.needs[1]
            .then(|| a.t()?.matmul(g)?.sum_to(b.dims()))
            .transpose()?;
        Ok(vec![ga, gb])
    }
}

impl Tensor {
    /// Matrix product of the last two dims; leading (batch) dims broadcast as in PyTorch.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.check_same(rhs, "matmul")?;
        let (a, b) = (self.dims(), rhs.dims());
        if a.len() < 2 || b.len() < 2 || a[a.len() - 1] != b[b.len() - 2] {
            return Err(Error::ShapeMismatch {
                op: "matmul",
                expected: format!(
                    "[.., k, n] with k matching the last dim of the left operand {a:?}"
                ),
                got: b.to_vec(),
            });
        }
        let value = if a.len() == 2 && b.len() == 2 {
            self.value().matmul(rhs.value())?
        } else {
            let batch =
                super::binary::broadcast_shape("matmul", &a[..a.len() - 2], &b[..b.len() - 2])?;
            let expand = |t: &candle_core::Tensor, d: &[usize]| -> Result<candle_core::Tensor> {
                let mut shape = batch.clone();
                shape.extend_from_slice(&d[d.len() - 2..]);
                Ok(t.broadcast_as(shape.as_slice())?)
            };
            expand(self.value(), a)?.matmul(&expand(rhs.value(), b)?)?
        };
        Ok(Tensor::from_op(value, &[self, rhs], Matmul))
    }
}
