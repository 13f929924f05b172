//! Convolutions (cross-correlations, as in PyTorch): conv1d and conv2d with stride,
//! padding, dilation and groups.
//!
//! Three recorded ops close the family under differentiation. For `y = conv(x, w)` and
//! the bilinear form `B(x, w, g) = <g, conv(x, w)>`:
//! - `conv(x, w)`, whose VJP is `(input_grad(g, w), weight_grad(x, g))`;
//! - `input_grad(g, w) = dB/dx` (a transposed convolution), whose VJP for an upstream `G`
//!   is `(conv(G, w), weight_grad(G, g))`;
//! - `weight_grad(x, g) = dB/dw`, whose VJP is `(input_grad(g, G), conv(x, G))`.
//!
//! So every order of derivative is again made of these three.

use candle_core::Tensor as Value;

use super::channel::{channel_sum, Channels};
use super::im2col;
use crate::autograd::{Backward, VjpCtx};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Parameters of one 2-D convolution, plus the input and kernel sizes the adjoints need.
#[derive(Clone, Copy, Debug)]
struct Geom {
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
    /// Height and width of the convolution's input `x`.
    in_hw: (usize, usize),
    /// Height and width of the kernel.
    k_hw: (usize, usize),
    /// Task-batched: every operand has a leading task axis `[T, ...]` and task `t`'s
    /// convolution uses only the operands' entry `t`.
    tasks: bool,
}

impl Geom {
    /// The geometry of the CPU kernels, for `tasks` (a task axis) or none, a batch of `n`
    /// and the given channels.
    fn im2col(&self, tasks: Option<usize>, n: usize, c_in: usize, c_out: usize) -> im2col::Conv {
        im2col::Conv {
            tasks,
            n,
            c_in,
            h: self.in_hw.0,
            w: self.in_hw.1,
            c_out,
            kh: self.k_hw.0,
            kw: self.k_hw.1,
            padding: self.padding,
            stride: self.stride,
            dilation: self.dilation,
        }
    }
}

fn conv_value(x: &Value, w: &Value, bias: Option<&Value>, g: &Geom) -> Result<Value> {
    if g.groups == 1 {
        let geometry = (g.padding, g.stride, g.dilation);
        if let Some(y) = im2col::conv2d(x, w, bias, geometry, g.tasks)? {
            return Ok(y);
        }
    }
    // Our im2col was tried above where it applies; candle's conv otherwise.
    let y = if g.tasks {
        per_task(x, w, |x, w| conv_value(x, w, None, &g.single()))?
    } else {
        x.conv2d(w, g.padding, g.stride, g.dilation, g.groups)?
    };
    match bias {
        Some(b) => Ok(y.broadcast_add(&b.reshape(bias_view(b.dims(), y.rank(), g.tasks))?)?),
        None => Ok(y),
    }
}

/// The shape that broadcasts a bias (`[C]`, or `[T, C]` with tasks) against a rank-`rank`
/// convolution output.
fn bias_view(bias: &[usize], rank: usize, tasks: bool) -> Vec<usize> {
    let mut shape = vec![1; rank];
    if tasks {
        shape[0] = bias[0];
        shape[2] = bias[1];
    } else {
        shape[1] = bias.iter().product();
    }
    shape
}

impl Geom {
    /// The geometry of one task's convolution.
    fn single(&self) -> Geom {
        Geom {
            tasks: false,
            ..*self
        }
    }
}

/// `f` on entry `t` of both operands for each task `t`, stacked on a new task axis.
fn per_task(a: &Value, b: &Value, f: impl Fn(&Value, &Value) -> Result<Value>) -> Result<Value> {
    let outputs = (0..a.dim(0)?)
        .map(|t| f(&a.get(t)?, &b.get(t)?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Value::stack(&outputs, 0)?)
}

/// candle's `conv2d`, through our im2col on CPU where it applies.
fn conv2d_value(
    x: &Value,
    w: &Value,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> Result<Value> {
    if groups == 1 {
        if let Some(y) = im2col::conv2d(x, w, None, (padding, stride, dilation), false)? {
            return Ok(y);
        }
    }
    Ok(x.conv2d(w, padding, stride, dilation, groups)?)
}

/// Reverses `dim`.
fn flip(t: &Value, dim: usize) -> Result<Value> {
    let n = t.dim(dim)?;
    let idx: Vec<u32> = (0..n as u32).rev().collect();
    let idx = Value::from_vec(idx, n, t.device())?;
    Ok(t.index_select(&idx, dim)?)
}

/// Pads `dim` with `q` zeros on both sides, or removes `-q` entries from both ends.
fn pad_or_crop(t: Value, dim: usize, q: isize) -> Result<Value> {
    Ok(match q {
        0 => t,
        q if q > 0 => t.pad_with_zeros(dim, q as usize, q as usize)?,
        q => {
            let c = (-q) as usize;
            let len = t.dim(dim)?;
            t.narrow(dim, c, len - 2 * c)?
        }
    })
}

/// `dB/dx` for `B = <gy, conv(x, w)>`: the input gradient, shape `[N, C_in, H, W]`.
fn input_grad_value(gy: &Value, w: &Value, g: &Geom) -> Result<Value> {
    if g.tasks {
        if g.groups == 1 {
            let (tasks, n, c_out, cin_g) = (gy.dim(0)?, gy.dim(1)?, w.dim(1)?, w.dim(2)?);
            let conv = g.im2col(Some(tasks), n, cin_g, c_out);
            if let Some(dx) = im2col::input_grad(&conv, gy, w)? {
                return Ok(dx);
            }
        }
        return per_task(gy, w, |gy, w| input_grad_value(gy, w, &g.single()));
    }
    let (c_out, cin_g, kh, kw) = w.dims4()?;
    if g.groups == 1 {
        let conv = g.im2col(None, gy.dim(0)?, cin_g, c_out);
        if let Some(dx) = im2col::input_grad(&conv, gy, w)? {
            return Ok(dx);
        }
    }
    let groups = g.groups;
    let cout_g = c_out / groups;
    let out = if g.stride == 1 {
        // A stride-1 transposed convolution is a convolution with the kernel flipped in
        // space and its channel axes swapped per group, padded by d (k - 1) - p. candle's
        // conv2d is several times faster than its conv_transpose2d.
        let wt = w
            .reshape((groups, cout_g, cin_g, kh, kw))?
            .transpose(1, 2)?
            .reshape((groups * cin_g, cout_g, kh, kw))?;
        let wt = flip(&flip(&wt, 2)?, 3)?;
        let qh = (g.dilation * (kh - 1)) as isize - g.padding as isize;
        let qw = (g.dilation * (kw - 1)) as isize - g.padding as isize;
        if qh == qw && qh >= 0 {
            conv2d_value(gy, &wt, qh as usize, 1, g.dilation, groups)?
        } else {
            let gy = pad_or_crop(pad_or_crop(gy.clone(), 2, qh)?, 3, qw)?;
            conv2d_value(&gy, &wt, 0, 1, g.dilation, groups)?
        }
    } else {
        // The plain transposed convolution covers (i - 1) s + d (k - 1) + 1 - 2p rows; the
        // rest of the input (up to s - 1 rows, partly reached through the right padding)
        // comes from the output padding, one value for both dims, so the extra is cut.
        let (h, wd) = g.in_hw;
        let (ho, wo) = (gy.dim(2)?, gy.dim(3)?);
        let reach = |i: usize, k: usize| (i - 1) * g.stride + g.dilation * (k - 1) + 1;
        let extra_h = (h + 2 * g.padding).saturating_sub(reach(ho, kh));
        let extra_w = (wd + 2 * g.padding).saturating_sub(reach(wo, kw));
        let output_padding = extra_h.max(extra_w);
        let blocks = (0..groups)
            .map(|j| {
                let gy_j = gy.narrow(1, j * cout_g, cout_g)?;
                let w_j = w.narrow(0, j * cout_g, cout_g)?;
                gy_j.conv_transpose2d(&w_j, g.padding, output_padding, g.stride, g.dilation)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Value::cat(&blocks, 1)?
    };
    let (h, wd) = g.in_hw;
    let (oh, ow) = (out.dim(2)?, out.dim(3)?);
    let out = if oh > h { out.narrow(2, 0, h)? } else { out };
    let out = if ow > wd { out.narrow(3, 0, wd)? } else { out };
    // Trailing rows and columns that no window reached get zero gradient.
    Ok(out
        .pad_with_zeros(2, 0, h.saturating_sub(oh))?
        .pad_with_zeros(3, 0, wd.saturating_sub(ow))?)
}

/// `dB/dw` for `B = <gy, conv(x, w)>`: the kernel gradient, shape `[C_out, C_in/groups,
/// kh, kw]`. Per group it is a convolution of `x` (batch and channels swapped) with `gy`
/// as the kernel, stride and dilation exchanged.
fn weight_grad_value(x: &Value, gy: &Value, g: &Geom) -> Result<Value> {
    if g.tasks {
        if g.groups == 1 {
            let (tasks, n, c_in, c_out) = (x.dim(0)?, x.dim(1)?, x.dim(2)?, gy.dim(2)?);
            let conv = g.im2col(Some(tasks), n, c_in, c_out);
            if let Some(dw) = im2col::weight_grad(&conv, x, gy)? {
                return Ok(dw);
            }
        }
        return per_task(x, gy, |x, gy| weight_grad_value(x, gy, &g.single()));
    }
    if g.groups == 1 {
        let conv = g.im2col(None, x.dim(0)?, x.dim(1)?, gy.dim(1)?);
        if let Some(dw) = im2col::weight_grad(&conv, x, gy)? {
            return Ok(dw);
        }
    }
    let groups = g.groups;
    let cin_g = x.dim(1)? / groups;
    let cout_g = gy.dim(1)? / groups;
    let (kh, kw) = g.k_hw;
    let blocks = (0..groups)
        .map(|j| -> Result<Value> {
            let x_j = x.narrow(1, j * cin_g, cin_g)?.transpose(0, 1)?;
            let gy_j = gy.narrow(1, j * cout_g, cout_g)?.transpose(0, 1)?;
            let r = conv2d_value(&x_j, &gy_j, g.padding, g.dilation, g.stride, 1)?;
            Ok(r.transpose(0, 1)?.narrow(2, 0, kh)?.narrow(3, 0, kw)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Value::cat(&blocks, 0)?.contiguous()?)
}

fn conv_op(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, g: Geom) -> Result<Tensor> {
    if x.elem_count() == 0 || w.elem_count() == 0 {
        let y = empty_conv(x, w, &g)?;
        return match bias {
            Some(b) => y.add(&b.reshape(&bias_view(b.dims(), y.rank(), g.tasks))?),
            None => Ok(y),
        };
    }
    let value = conv_value(x.value(), w.value(), bias.map(Tensor::value), &g)?;
    let mut inputs = vec![x, w];
    inputs.extend(bias);
    Tensor::from_op(value, &inputs, Conv(g))
}

fn input_grad_op(gy: &Tensor, w: &Tensor, g: Geom) -> Result<Tensor> {
    let value = input_grad_value(gy.value(), w.value(), &g)?;
    Tensor::from_op(value, &[gy, w], ConvInputGrad(g))
}

fn weight_grad_op(x: &Tensor, gy: &Tensor, g: Geom) -> Result<Tensor> {
    let value = weight_grad_value(x.value(), gy.value(), &g)?;
    Tensor::from_op(value, &[x, gy], ConvWeightGrad(g))
}

/// The result of a convolution with no batch, no input channels or no output channels:
/// zeros of the output's shape, as in PyTorch.
fn empty_conv(x: &Tensor, w: &Tensor, g: &Geom) -> Result<Tensor> {
    // `validate` has checked that these sizes neither overflow nor underflow.
    let out =
        |len: usize, k: usize| (len + 2 * g.padding - g.dilation * (k - 1) - 1) / g.stride + 1;
    let lead = usize::from(g.tasks);
    let mut shape = x.dims()[..=lead].to_vec();
    shape.extend([
        w.dims()[lead],
        out(g.in_hw.0, g.k_hw.0),
        out(g.in_hw.1, g.k_hw.1),
    ]);
    super::connected_zeros(&shape, x, &[x, w])
}

struct Conv(Geom);

impl Backward for Conv {
    fn name(&self) -> &'static str {
        "conv2d"
    }

    /// dx = input_grad(g, w) (a transposed convolution), dw = weight_grad(x, g), and for
    /// a bias db = g summed per (task and) channel.
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let (x, w, g) = (&ctx.inputs[0], &ctx.inputs[1], ctx.grad);
        let mut out = vec![
            ctx.needs[0]
                .then(|| input_grad_op(g, w, self.0))
                .transpose()?,
            ctx.needs[1]
                .then(|| weight_grad_op(x, g, self.0))
                .transpose()?,
        ];
        if let Some(b) = ctx.inputs.get(2) {
            out.push(if ctx.needs[2] {
                let ch = Channels::new(g.dims(), self.0.tasks, b.dims())?;
                Some(channel_sum(g, &ch)?)
            } else {
                None
            });
        }
        Ok(out)
    }
}

struct ConvInputGrad(Geom);

impl Backward for ConvInputGrad {
    fn name(&self) -> &'static str {
        "conv2d_input_grad"
    }

    /// For the upstream G: d/d gy = conv(G, w), d/dw = weight_grad(G, gy).
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let (gy, w, g) = (&ctx.inputs[0], &ctx.inputs[1], ctx.grad);
        Ok(vec![
            ctx.needs[0]
                .then(|| conv_op(g, w, None, self.0))
                .transpose()?,
            ctx.needs[1]
                .then(|| weight_grad_op(g, gy, self.0))
                .transpose()?,
        ])
    }
}

struct ConvWeightGrad(Geom);

impl Backward for ConvWeightGrad {
    fn name(&self) -> &'static str {
        "conv2d_weight_grad"
    }

    /// For the upstream G: d/dx = input_grad(gy, G), d/d gy = conv(x, G).
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let (x, gy, g) = (&ctx.inputs[0], &ctx.inputs[1], ctx.grad);
        Ok(vec![
            ctx.needs[0]
                .then(|| input_grad_op(gy, g, self.0))
                .transpose()?,
            ctx.needs[1]
                .then(|| conv_op(x, g, None, self.0))
                .transpose()?,
        ])
    }
}

fn shape_error(op: &'static str, x: &Tensor, w: &Tensor, why: String) -> Error {
    Error::ShapeMismatch {
        op,
        expected: format!("{why}; kernel has shape {:?} and input", w.dims()),
        got: x.dims().to_vec(),
    }
}

/// Validates a convolution's arguments, with spatial dims `spatial` (1 or 2).
#[allow(clippy::too_many_arguments)]
fn validate(
    op: &'static str,
    x: &Tensor,
    w: &Tensor,
    spatial: usize,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> Result<()> {
    x.check_same(w, op)?;
    x.require_float(op)?;
    if x.rank() != spatial + 2 || w.rank() != spatial + 2 {
        let layout = if spatial == 1 {
            "input [N, C_in, L] and kernel [C_out, C_in/groups, K]"
        } else {
            "input [N, C_in, H, W] and kernel [C_out, C_in/groups, kH, kW]"
        };
        return Err(shape_error(op, x, w, layout.to_string()));
    }
    if stride == 0 || dilation == 0 || groups == 0 {
        return Err(Error::InvalidArgument {
            op,
            message: format!(
                "stride ({stride}), dilation ({dilation}) and groups ({groups}) must be positive"
            ),
        });
    }
    let (c_in, c_out, cin_g) = (x.dims()[1], w.dims()[0], w.dims()[1]);
    if cin_g.checked_mul(groups) != Some(c_in) || c_out % groups != 0 {
        return Err(shape_error(
            op,
            x,
            w,
            format!(
                "{cin_g} x groups = {groups} input channels and output channels divisible by groups"
            ),
        ));
    }
    for d in 0..spatial {
        let k = w.dims()[2 + d];
        if k == 0 {
            return Err(shape_error(
                op,
                x,
                w,
                format!("a kernel of positive size along spatial dim {d}"),
            ));
        }
        // Checked: padding or dilation near usize::MAX must not wrap around.
        let size = padding
            .checked_mul(2)
            .and_then(|p| p.checked_add(x.dims()[2 + d]));
        let reach = dilation.checked_mul(k - 1).and_then(|r| r.checked_add(1));
        let (Some(size), Some(reach)) = (size, reach) else {
            return Err(Error::InvalidArgument {
                op,
                message: format!(
                    "padding {padding} or dilation {dilation} overflows usize for input {:?} and kernel {:?}",
                    x.dims(),
                    w.dims()
                ),
            });
        };
        if reach > size {
            return Err(shape_error(
                op,
                x,
                w,
                format!(
                    "a padded input no smaller than the dilated kernel ({reach} along spatial dim {d})"
                ),
            ));
        }
    }
    Ok(())
}

impl Tensor {
    /// 2-D convolution of `[N, C_in, H, W]` with a kernel `[C_out, C_in/groups, kH, kW]`
    /// (`torch.nn.functional.conv2d`; argument order as candle's `conv2d`). `padding`
    /// zeros are added on every side.
    pub fn conv2d(
        &self,
        kernel: &Tensor,
        padding: usize,
        stride: usize,
        dilation: usize,
        groups: usize,
    ) -> Result<Tensor> {
        conv2d_with_bias(
            self,
            kernel,
            None,
            (padding, stride, dilation, groups),
            false,
        )
    }

    /// The task-batched [`Tensor::conv2d`]: `self` is `[T, N, C_in, H, W]`, `kernel` `[T,
    /// C_out, C_in/groups, kH, kW]`, the output `[T, N, C_out, H', W']`; task `t` convolves
    /// `self[t]` with `kernel[t]`. One recorded op (and one per adjoint), whatever `T`.
    pub fn conv2d_tasks(
        &self,
        kernel: &Tensor,
        padding: usize,
        stride: usize,
        dilation: usize,
        groups: usize,
    ) -> Result<Tensor> {
        conv2d_with_bias(
            self,
            kernel,
            None,
            (padding, stride, dilation, groups),
            true,
        )
    }

    /// The task-batched [`Tensor::conv1d`]: `self` is `[T, N, C_in, L]`, `kernel` `[T,
    /// C_out, C_in/groups, K]`.
    pub fn conv1d_tasks(
        &self,
        kernel: &Tensor,
        padding: usize,
        stride: usize,
        dilation: usize,
        groups: usize,
    ) -> Result<Tensor> {
        conv1d_with_bias(
            self,
            kernel,
            None,
            (padding, stride, dilation, groups),
            true,
        )
    }

    /// 1-D convolution of `[N, C_in, L]` with a kernel `[C_out, C_in/groups, K]`
    /// (`torch.nn.functional.conv1d`). Computed as a 2-D convolution of height 1.
    pub fn conv1d(
        &self,
        kernel: &Tensor,
        padding: usize,
        stride: usize,
        dilation: usize,
        groups: usize,
    ) -> Result<Tensor> {
        conv1d_with_bias(
            self,
            kernel,
            None,
            (padding, stride, dilation, groups),
            false,
        )
    }
}

/// [`Tensor::conv2d`] (or `conv2d_tasks` with `tasks`) plus a per-channel `bias` (`[C_out]`,
/// or `[T, C_out]` with tasks), as the layers call it: one recorded op that adds the bias
/// while writing the output.
pub(crate) fn conv2d_with_bias(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    (padding, stride, dilation, groups): (usize, usize, usize, usize),
    tasks: bool,
) -> Result<Tensor> {
    check_conv(x, kernel, 2, (padding, stride, dilation, groups), tasks)?;
    let lead = usize::from(tasks);
    let (d, k) = (x.dims(), kernel.dims());
    let geom = Geom {
        padding,
        stride,
        dilation,
        groups,
        in_hw: (d[lead + 2], d[lead + 3]),
        k_hw: (k[lead + 2], k[lead + 3]),
        tasks,
    };
    if let Some(b) = bias {
        b.check_same(x, "conv2d bias")?;
        if b.dims() != &k[..=lead] {
            return Err(Error::ShapeMismatch {
                op: "conv2d bias",
                expected: format!("{:?} (one value per output channel)", &k[..=lead]),
                got: b.dims().to_vec(),
            });
        }
    }
    conv_op(x, kernel, bias, geom)
}

/// [`conv2d_with_bias`] for [`Tensor::conv1d`] and `conv1d_tasks`.
pub(crate) fn conv1d_with_bias(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    (padding, stride, dilation, groups): (usize, usize, usize, usize),
    tasks: bool,
) -> Result<Tensor> {
    check_conv(x, kernel, 1, (padding, stride, dilation, groups), tasks)?;
    let spatial = 2 + usize::from(tasks);
    let x = if padding > 0 {
        x.pad_with_zeros(spatial, padding, padding)?
    } else {
        x.clone()
    };
    conv2d_with_bias(
        &x.unsqueeze(spatial)?,
        &kernel.unsqueeze(spatial)?,
        bias,
        (0, stride, dilation, groups),
        tasks,
    )?
    .squeeze(spatial)
}

/// The checks of a convolution with `spatial` (1 or 2) spatial dims, task-batched or not.
fn check_conv(
    x: &Tensor,
    kernel: &Tensor,
    spatial: usize,
    config: (usize, usize, usize, usize),
    tasks: bool,
) -> Result<()> {
    let (padding, stride, dilation, groups) = config;
    match (tasks, spatial) {
        (false, 1) => validate("conv1d", x, kernel, 1, padding, stride, dilation, groups),
        (false, _) => validate("conv2d", x, kernel, 2, padding, stride, dilation, groups),
        (true, 1) => check_tasks(
            "conv1d_tasks",
            x,
            kernel,
            1,
            config,
            "input [T, N, C_in, L] and kernel [T, C_out, C_in/groups, K] with the same T > 0",
        ),
        (true, _) => check_tasks(
            "conv2d_tasks",
            x,
            kernel,
            2,
            config,
            "input [T, N, C_in, H, W] and kernel [T, C_out, C_in/groups, kH, kW] with the same \
             T > 0",
        ),
    }
}

/// The checks of a task-batched convolution: `x` `[T, N, C_in, ..]` and `kernel`
/// `[T, C_out, C_in/groups, ..]` with `spatial` trailing dims and the same `T > 0`, one dtype
/// and device, and one task's operands valid for the plain convolution.
fn check_tasks(
    op: &'static str,
    x: &Tensor,
    kernel: &Tensor,
    spatial: usize,
    (padding, stride, dilation, groups): (usize, usize, usize, usize),
    expected: &str,
) -> Result<()> {
    let (d, k) = (x.dims(), kernel.dims());
    let rank = spatial + 3;
    if d.len() != rank || k.len() != rank || d[0] != k[0] || d[0] == 0 {
        return Err(shape_error(op, x, kernel, expected.into()));
    }
    x.check_same(kernel, op)?;
    // One task's operands, as views without a graph.
    let (x0, w0) = (
        Tensor::new(x.value().get(0)?),
        Tensor::new(kernel.value().get(0)?),
    );
    validate(op, &x0, &w0, spatial, padding, stride, dilation, groups)
}
