//! The fused affine map of a linear layer, `x W^T + b`: one node instead of a transpose,
//! a matmul and a broadcast add, and a backward with no transposed copies.

use crate::autograd::{Backward, VjpCtx};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

struct Linear {
    has_bias: bool,
}

impl Backward for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    /// For Y = X W^T + b with X flattened to [n, in]: dX = G W, dW = G^T X, db = G's rows
    /// summed.
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let (x, w) = (&ctx.inputs[0], &ctx.inputs[1]);
        let out = w.dims()[0];
        let g = ctx.grad.reshape(&[ctx.grad.elem_count() / out, out])?;
        let gx = ctx.needs[0]
            .then(|| g.matmul(w)?.reshape(x.dims()))
            .transpose()?;
        let gw = ctx.needs[1]
            .then(|| g.matmul_t(&flatten_rows(x)?, true, false))
            .transpose()?;
        let mut grads = vec![gx, gw];
        if self.has_bias {
            let gb = ctx.needs[2].then(|| g.sum_to(&[out])).transpose()?;
            grads.push(gb);
        }
        Ok(grads)
    }
}

/// `x` as a matrix [rows, last dim].
fn flatten_rows(x: &Tensor) -> Result<Tensor> {
    let last = x.dims()[x.rank() - 1];
    x.reshape(&[x.elem_count() / last, last])
}

impl Tensor {
    /// `self W^T + b` over the last dimension (`torch.nn.functional.linear`): `self` is
    /// `[.., in]`, `weight` `[out, in]`, `bias` `[out]`.
    pub fn linear(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        self.check_same(weight, "linear")?;
        self.require_float("linear")?;
        let wd = weight.dims();
        let fits = wd.len() == 2 && self.rank() >= 1 && self.dims()[self.rank() - 1] == wd[1];
        if !fits {
            return Err(Error::ShapeMismatch {
                op: "linear",
                expected: format!(
                    "[.., {}] to match the weight {wd:?}",
                    wd.get(1).copied().unwrap_or(0)
                ),
                got: self.dims().to_vec(),
            });
        }
        if let Some(b) = bias {
            self.check_same(b, "linear")?;
            if b.dims() != [wd[0]] {
                return Err(Error::ShapeMismatch {
                    op: "linear (bias)",
                    expected: format!("[{}]", wd[0]),
                    got: b.dims().to_vec(),
                });
            }
        }
        let mut out_shape = self.dims().to_vec();
        *out_shape.last_mut().expect("rank >= 1") = wd[0];
        if self.elem_count() == 0 || weight.elem_count() == 0 {
            // No input features: the output is the bias alone; no rows or no outputs: empty.
            let zeros = super::connected_zeros(&out_shape, self, &[self, weight])?;
            return match bias {
                Some(b) => zeros.add(b),
                None => Ok(zeros),
            };
        }
        let x2 = self.value().reshape((self.elem_count() / wd[1], wd[1]))?;
        let mut y = super::matmul::cpu_or_candle_matmul(&x2, &weight.value().t()?)?;
        if let Some(b) = bias {
            y = y.broadcast_add(b.value())?;
        }
        let value = y.reshape(out_shape)?;
        match bias {
            Some(b) => Tensor::from_op(value, &[self, weight, b], Linear { has_bias: true }),
            None => Tensor::from_op(value, &[self, weight], Linear { has_bias: false }),
        }
    }
}

struct LinearTasks {
    has_bias: bool,
}

impl Backward for LinearTasks {
    fn name(&self) -> &'static str {
        "linear_tasks"
    }

    /// Per task t, with X_t flattened to [n, in]: dX_t = G_t W_t, dW_t = G_t^T X_t
    /// (batched products over the task axis), db_t = G_t's rows summed.
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let (x, w) = (&ctx.inputs[0], &ctx.inputs[1]);
        let (tasks, out) = (w.dims()[0], w.dims()[1]);
        let rows = ctx.grad.elem_count() / (tasks * out);
        let g = ctx.grad.reshape(&[tasks, rows, out])?;
        let gx = ctx.needs[0]
            .then(|| g.matmul(w)?.reshape(x.dims()))
            .transpose()?;
        let gw = ctx.needs[1]
            .then(|| {
                let x3 = x.reshape(&[tasks, rows, w.dims()[2]])?;
                g.matmul_t(&x3, true, false)
            })
            .transpose()?;
        let mut grads = vec![gx, gw];
        if self.has_bias {
            let gb = ctx.needs[2].then(|| g.sum_rows_per_block()).transpose()?;
            grads.push(gb);
        }
        Ok(grads)
    }
}

impl Tensor {
    /// The task-batched [`Tensor::linear`]: `self` is `[T, .., in]`, `weight` `[T, out,
    /// in]`, `bias` `[T, out]`; task `t` computes `self[t] weight[t]^T + bias[t]`.
    pub fn linear_tasks(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        self.check_same(weight, "linear_tasks")?;
        self.require_float("linear_tasks")?;
        let wd = weight.dims();
        let fits = wd.len() == 3
            && self.rank() >= 2
            && self.dims()[0] == wd[0]
            && self.dims()[self.rank() - 1] == wd[2];
        if !fits {
            return Err(Error::ShapeMismatch {
                op: "linear_tasks",
                expected: format!(
                    "[{}, .., {}] to match the weight {wd:?}",
                    wd.first().copied().unwrap_or(0),
                    wd.get(2).copied().unwrap_or(0)
                ),
                got: self.dims().to_vec(),
            });
        }
        let (tasks, out, inp) = (wd[0], wd[1], wd[2]);
        if let Some(b) = bias {
            self.check_same(b, "linear_tasks")?;
            if b.dims() != [tasks, out] {
                return Err(Error::ShapeMismatch {
                    op: "linear_tasks (bias)",
                    expected: format!("[{tasks}, {out}]"),
                    got: b.dims().to_vec(),
                });
            }
        }
        let mut out_shape = self.dims().to_vec();
        *out_shape.last_mut().expect("rank >= 2") = out;
        if self.elem_count() == 0 || weight.elem_count() == 0 {
            // No tasks, rows, inputs or outputs (the rows per task would divide by zero):
            // each task's output is its bias alone, or empty, as in `linear`.
            let zeros = super::connected_zeros(&out_shape, self, &[self, weight])?;
            return match bias {
                Some(b) => {
                    let mut shape = vec![1; out_shape.len()];
                    (shape[0], shape[out_shape.len() - 1]) = (tasks, out);
                    zeros.add(&b.reshape(&shape)?)
                }
                None => Ok(zeros),
            };
        }
        let rows = self.elem_count() / (tasks * inp);
        let x3 = self.value().reshape((tasks, rows, inp))?;
        let wt = weight.value().t()?;
        let y = match super::matmul::small_cpu_bmm_plus_rows(&x3, &wt, bias.map(Tensor::value))? {
            Some(y) => y,
            None => {
                let y = x3.matmul(&wt)?;
                match bias {
                    Some(b) => y.broadcast_add(&b.value().unsqueeze(1)?)?,
                    None => y,
                }
            }
        };
        let value = y.reshape(out_shape)?;
        match bias {
            Some(b) => Tensor::from_op(value, &[self, weight, b], LinearTasks { has_bias: true }),
            None => Tensor::from_op(value, &[self, weight], LinearTasks { has_bias: false }),
        }
    }
}
