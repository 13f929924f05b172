//! Convolutions and pooling: Conv1d, Conv2d, MaxPool2d, AvgPool2d.
//!
//! The layers call the engine's differentiable `conv1d`/`conv2d`/pooling ops, whose
//! backward passes are themselves recorded, so every order of derivative is exact.

use super::{Module, Parameters, VarBuilder, Visitor};
use crate::error::{Error, Result};
use crate::ops::conv::{conv1d_with_bias, conv2d_with_bias};
use crate::tensor::Tensor;

/// Options of a convolution (PyTorch's defaults: padding 0, stride 1, dilation 1,
/// groups 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvConfig {
    /// Zeros added on every side of each spatial dim.
    pub padding: usize,
    /// Step between windows; positive.
    pub stride: usize,
    /// Spacing between kernel elements; positive.
    pub dilation: usize,
    /// Channel groups; `in` and `out` channels must both be divisible by it.
    pub groups: usize,
}

impl Default for ConvConfig {
    fn default() -> Self {
        ConvConfig {
            padding: 0,
            stride: 1,
            dilation: 1,
            groups: 1,
        }
    }
}

/// 2-D convolution layer (`nn.Conv2d`): weight `[out, in/groups, k, k]`, bias `[out]`.
#[derive(Clone, Debug)]
pub struct Conv2d {
    /// `[out, in/groups, kh, kw]`.
    pub weight: Tensor,
    /// `[out]`, or none.
    pub bias: Option<Tensor>,
    /// Padding, stride, dilation, groups.
    pub config: ConvConfig,
}

/// 1-D convolution layer (`nn.Conv1d`): weight `[out, in/groups, k]`, bias `[out]`.
#[derive(Clone, Debug)]
pub struct Conv1d {
    /// `[out, in/groups, k]`.
    pub weight: Tensor,
    /// `[out]`, or none.
    pub bias: Option<Tensor>,
    /// Padding, stride, dilation, groups.
    pub config: ConvConfig,
}

fn conv_params(
    op: &'static str,
    vb: &VarBuilder,
    shape: &[usize],
    bias: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let fan_in = crate::ops::shape::checked_elem_count(&shape[1..]).ok_or_else(|| {
        Error::InvalidArgument {
            op,
            message: format!("a weight of shape {shape:?} has more than usize::MAX elements"),
        }
    })?;
    let weight = vb.kaiming_uniform("weight", shape, fan_in)?;
    let bound = super::var_builder::fan_in_bound(fan_in);
    let bias = bias
        .then(|| vb.uniform("bias", &[shape[0]], -bound, bound))
        .transpose()?;
    Ok((weight, bias))
}

/// The checks of a convolution's construction: a positive kernel, stride and dilation (torch
/// raises for them at the first forward), and groups that divide both channel counts.
fn check_config(op: &'static str, i: usize, o: usize, k: usize, cfg: &ConvConfig) -> Result<()> {
    for (name, v) in [
        ("kernel_size", k),
        ("stride", cfg.stride),
        ("dilation", cfg.dilation),
    ] {
        if v == 0 {
            return Err(Error::InvalidArgument {
                op,
                message: format!("{name} {v} must be positive"),
            });
        }
    }
    if cfg.groups == 0 || !i.is_multiple_of(cfg.groups) || !o.is_multiple_of(cfg.groups) {
        return Err(Error::InvalidArgument {
            op,
            message: format!(
                "in_channels {i} and out_channels {o} must be divisible by groups {}",
                cfg.groups
            ),
        });
    }
    Ok(())
}

/// A Conv2d with a bias and a square kernel, PyTorch's default init (kaiming-uniform
/// `a = sqrt(5)` weight, bias uniform on `(-1/sqrt(fan_in), 1/sqrt(fan_in))`).
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    config: ConvConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    check_config("conv2d", in_channels, out_channels, kernel_size, &config)?;
    let shape = [
        out_channels,
        in_channels / config.groups,
        kernel_size,
        kernel_size,
    ];
    let (weight, bias) = conv_params("conv2d", &vb, &shape, true)?;
    Ok(Conv2d {
        weight,
        bias,
        config,
    })
}

/// A Conv1d with a bias, PyTorch's default init.
pub fn conv1d(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    config: ConvConfig,
    vb: VarBuilder,
) -> Result<Conv1d> {
    check_config("conv1d", in_channels, out_channels, kernel_size, &config)?;
    let shape = [out_channels, in_channels / config.groups, kernel_size];
    let (weight, bias) = conv_params("conv1d", &vb, &shape, true)?;
    Ok(Conv1d {
        weight,
        bias,
        config,
    })
}

impl Module for Conv2d {
    /// Task-batched when the weight is `[T, out, in/groups, kh, kw]` (bias `[T, out]`):
    /// then `x` is `[T, N, in, H, W]` and the output `[T, N, out, H', W']`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = self.config;
        let w = &self.weight;
        let batched = super::tasks::batched("Conv2d", w, 4)?;
        if batched {
            super::tasks::check_input("Conv2d", x, w.dims()[0], 5)?;
        }
        let config = (c.padding, c.stride, c.dilation, c.groups);
        conv2d_with_bias(x, w, self.bias.as_ref(), config, batched)
    }
}

impl Module for Conv1d {
    /// Task-batched when the weight is `[T, out, in/groups, k]` (bias `[T, out]`): then `x`
    /// is `[T, N, in, L]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = self.config;
        let w = &self.weight;
        let batched = super::tasks::batched("Conv1d", w, 3)?;
        if batched {
            super::tasks::check_input("Conv1d", x, w.dims()[0], 4)?;
        }
        let config = (c.padding, c.stride, c.dilation, c.groups);
        conv1d_with_bias(x, w, self.bias.as_ref(), config, batched)
    }
}

/// Applies a pooling of `[N, C, H, W]` to a task-batched `[T, N, C, H, W]` by folding the
/// task axis into the batch.
fn pool_folding_tasks(x: &Tensor, pool: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    if x.rank() != 5 {
        return pool(x);
    }
    let d = x.dims().to_vec();
    let y = pool(&x.reshape(&[d[0] * d[1], d[2], d[3], d[4]])?)?;
    let yd = y.dims().to_vec();
    y.reshape(&[d[0], d[1], yd[1], yd[2], yd[3]])
}

impl Parameters for Conv2d {
    fn visit(&mut self, v: &mut Visitor<'_>) -> Result<()> {
        v.param("weight", &mut self.weight)?;
        v.opt_param("bias", &mut self.bias)
    }
}

impl Parameters for Conv1d {
    fn visit(&mut self, v: &mut Visitor<'_>) -> Result<()> {
        v.param("weight", &mut self.weight)?;
        v.opt_param("bias", &mut self.bias)
    }
}

/// Max pooling over `[N, C, H, W]` (`nn.MaxPool2d`, no padding, floor mode): windows
/// that do not fit are dropped. The gradient goes to each window's maximum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxPool2d {
    /// Window `(h, w)`.
    pub kernel: (usize, usize),
    /// Step `(h, w)`; PyTorch's default is the kernel.
    pub stride: (usize, usize),
}

/// Average pooling over `[N, C, H, W]` (`nn.AvgPool2d`, no padding, floor mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AvgPool2d {
    /// Window `(h, w)`.
    pub kernel: (usize, usize),
    /// Step `(h, w)`; PyTorch's default is the kernel.
    pub stride: (usize, usize),
}

/// A square MaxPool2d with stride equal to the kernel.
pub fn max_pool2d(kernel: usize) -> MaxPool2d {
    MaxPool2d {
        kernel: (kernel, kernel),
        stride: (kernel, kernel),
    }
}

/// A square AvgPool2d with stride equal to the kernel.
pub fn avg_pool2d(kernel: usize) -> AvgPool2d {
    AvgPool2d {
        kernel: (kernel, kernel),
        stride: (kernel, kernel),
    }
}

impl Module for MaxPool2d {
    /// A rank-5 input `[T, N, C, H, W]` (task-batched) is pooled per image.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        pool_folding_tasks(x, |x| x.max_pool2d_with_stride(self.kernel, self.stride))
    }
}

impl Module for AvgPool2d {
    /// A rank-5 input `[T, N, C, H, W]` (task-batched) is pooled per image.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        pool_folding_tasks(x, |x| x.avg_pool2d_with_stride(self.kernel, self.stride))
    }
}

impl Parameters for MaxPool2d {
    fn visit(&mut self, _v: &mut Visitor<'_>) -> Result<()> {
        Ok(())
    }
}

impl Parameters for AvgPool2d {
    fn visit(&mut self, _v: &mut Visitor<'_>) -> Result<()> {
        Ok(())
    }
}
