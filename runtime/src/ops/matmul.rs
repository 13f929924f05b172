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
            // candle's batched matmul takes one batch stride per operand, so an operand
            // stretched along some of several batch dims is materialised.
            let expand = |t: &candle_core::Tensor, d: &[usize]| -> Result<candle_core::Tensor> {
                let mut shape = batch.clone();
                shape.extend_from_slice(&d[d.len() - 2..]);
                let t = if shape == d {
                    t.clone()
                } else {
                    t.broadcast_as(shape.as_slice())?
                };
                if batch_collapses(&t) {
                    Ok(t)
                } else {
                    Ok(t.contiguous()?)
                }
            };
            expand(self.value(), a)?.matmul(&expand(rhs.value(), b)?)?
        };
        Ok(Tensor::from_op(value, &[self, rhs], Matmul))
    }
}

/// Whether the batch dims of `t` (all but the last two) step through memory as one
/// dimension would, which candle's batched matmul requires.
fn batch_collapses(t: &candle_core::Tensor) -> bool {
    let (dims, stride) = (t.dims(), t.stride());
    let nb = dims.len().saturating_sub(2);
    (1..nb).all(|i| dims[i - 1] == 1 || stride[i - 1] == stride[i] * dims[i])
}
