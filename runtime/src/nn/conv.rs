//! Convolutions and pooling: Conv1d, Conv2d, MaxPool2d, AvgPool2d.
//!
//! Until the engine's `conv2d`/`max_pool2d` ops are in, these layers compute with a
//! private im2col made of differentiable shape ops (strided slices, stack, matmul), so
//! every order of derivative is exact.

use super::{Module, Parameters, VarBuilder, Visitor};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Options of a convolution (PyTorch's defaults: padding 0, stride 1, dilation 1,
/// groups 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvConfig {
    /// Zeros added on every side of each spatial dim.
    pub padding: usize,
    /// Step between windows.
    pub stride: usize,
    /// Spacing between kernel elements.
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

/// `count` elements of `dim` starting at `start`, `step` apart.
fn strided(x: &Tensor, dim: usize, start: usize, count: usize, step: usize) -> Result<Tensor> {
    let span = (count - 1) * step + 1;
    let t = x.narrow(dim, start, span)?;
    if step == 1 {
        return Ok(t);
    }
    let t = t.pad_with_zeros(dim, 0, count * step - span)?;
    let mut shape = t.dims().to_vec();
    shape[dim] = count;
    shape.insert(dim + 1, step);
    t.reshape(&shape)?.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)
}

fn out_len(op: &'static str, len: usize, k: usize, cfg: &ConvConfig) -> Result<usize> {
    let reach = cfg.dilation * (k - 1) + 1;
    let padded = len + 2 * cfg.padding;
    if padded < reach || cfg.stride == 0 {
        return Err(Error::InvalidArgument {
            op,
            message: format!(
                "input length {len} with padding {} is smaller than the dilated kernel {reach} (or stride is 0)",
                cfg.padding
            ),
        });
    }
    Ok((padded - reach) / cfg.stride + 1)
}

/// 2-D convolution of `x` `[N, C, H, W]` with `w` `[O, C/groups, kh, kw]`, by im2col.
fn conv2d_im2col(x: &Tensor, w: &Tensor, cfg: &ConvConfig) -> Result<Tensor> {
    let (xd, wd) = (x.dims().to_vec(), w.dims().to_vec());
    if xd.len() != 4
        || wd.len() != 4
        || cfg.groups == 0
        || xd[1] != wd[1] * cfg.groups
        || wd[0] % cfg.groups != 0
    {
        return Err(Error::ShapeMismatch {
            op: "conv2d",
            expected: format!(
                "input [N, {}, H, W] for a kernel {wd:?} with {} groups",
                wd.get(1).copied().unwrap_or(0) * cfg.groups,
                cfg.groups
            ),
            got: xd,
        });
    }
    let (n, c) = (xd[0], xd[1]);
    let (o, kh, kw) = (wd[0], wd[2], wd[3]);
    let ho = out_len("conv2d", xd[2], kh, cfg)?;
    let wo = out_len("conv2d", xd[3], kw, cfg)?;
    let mut xp = x.clone();
    if cfg.padding > 0 {
        xp = xp
            .pad_with_zeros(2, cfg.padding, cfg.padding)?
            .pad_with_zeros(3, cfg.padding, cfg.padding)?;
    }
    let mut patches = Vec::with_capacity(kh * kw);
    for i in 0..kh {
        let rows = strided(&xp, 2, i * cfg.dilation, ho, cfg.stride)?;
        for j in 0..kw {
            patches.push(strided(&rows, 3, j * cfg.dilation, wo, cfg.stride)?);
        }
    }
    // [N, C, kh*kw, Ho, Wo] -> [N, C*kh*kw, Ho*Wo], matching w's [O, C/g, kh, kw] layout.
    let cols = Tensor::stack(&patches, 2)?.reshape(&[n, c * kh * kw, ho * wo])?;
    let g = cfg.groups;
    let (cg, og) = (c / g, o / g);
    let mut outs = Vec::with_capacity(g);
    for gi in 0..g {
        let wg = w.narrow(0, gi * og, og)?.reshape(&[og, cg * kh * kw])?;
        let colg = if g == 1 {
            cols.clone()
        } else {
            cols.narrow(1, gi * cg * kh * kw, cg * kh * kw)?
        };
        outs.push(wg.matmul(&colg)?);
    }
    let out = if g == 1 {
        outs.remove(0)
    } else {
        Tensor::cat(&outs, 1)?
    };
    out.reshape(&[n, o, ho, wo])
}

fn pool2d(
    op: &'static str,
    x: &Tensor,
    kernel: (usize, usize),
    stride: (usize, usize),
    max: bool,
) -> Result<Tensor> {
    if x.rank() != 4 || kernel.0 == 0 || kernel.1 == 0 {
        return Err(Error::ShapeMismatch {
            op,
            expected: "[N, C, H, W] and a non-empty kernel".into(),
            got: x.dims().to_vec(),
        });
    }
    let cfg = |s| ConvConfig {
        stride: s,
        ..ConvConfig::default()
    };
    let ho = out_len(op, x.dims()[2], kernel.0, &cfg(stride.0))?;
    let wo = out_len(op, x.dims()[3], kernel.1, &cfg(stride.1))?;
    let mut acc: Option<Tensor> = None;
    for i in 0..kernel.0 {
        let rows = strided(x, 2, i, ho, stride.0)?;
        for j in 0..kernel.1 {
            let p = strided(&rows, 3, j, wo, stride.1)?;
            acc = Some(match acc {
                None => p,
                Some(a) if max => a.maximum(&p)?,
                Some(a) => a.add(&p)?,
            });
        }
    }
    let acc = acc.ok_or_else(|| Error::InvalidArgument {
        op,
        message: "empty kernel".into(),
    })?;
    if max {
        Ok(acc)
    } else {
        acc.affine(1.0 / (kernel.0 * kernel.1) as f64, 0.0)
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

fn conv_params(vb: &VarBuilder, shape: &[usize], bias: bool) -> Result<(Tensor, Option<Tensor>)> {
    let fan_in: usize = shape[1..].iter().product();
    let weight = vb.kaiming_uniform("weight", shape, fan_in)?;
    let bound = super::var_builder::fan_in_bound(fan_in);
    let bias = bias
        .then(|| vb.uniform("bias", &[shape[0]], -bound, bound))
        .transpose()?;
    Ok((weight, bias))
}

fn check_groups(op: &'static str, i: usize, o: usize, cfg: &ConvConfig) -> Result<()> {
    if cfg.groups == 0 || i % cfg.groups != 0 || o % cfg.groups != 0 {
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
    check_groups("conv2d", in_channels, out_channels, &config)?;
    let shape = [
        out_channels,
        in_channels / config.groups,
        kernel_size,
        kernel_size,
    ];
    let (weight, bias) = conv_params(&vb, &shape, true)?;
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
    check_groups("conv1d", in_channels, out_channels, &config)?;
    let shape = [out_channels, in_channels / config.groups, kernel_size];
    let (weight, bias) = conv_params(&vb, &shape, true)?;
    Ok(Conv1d {
        weight,
        bias,
        config,
    })
}

fn add_channel_bias(y: Tensor, bias: &Option<Tensor>) -> Result<Tensor> {
    match bias {
        None => Ok(y),
        Some(b) => {
            let mut shape = vec![1; y.rank()];
            shape[1] = b.elem_count();
            y.add(&b.reshape(&shape)?)
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        add_channel_bias(conv2d_impl(x, &self.weight, &self.config)?, &self.bias)
    }
}

impl Module for Conv1d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.rank() != 3 {
            return Err(Error::ShapeMismatch {
                op: "Conv1d",
                expected: "[N, C, L]".into(),
                got: x.dims().to_vec(),
            });
        }
        // A 1-D convolution is a 2-D one of height 1 (no padding along the height).
        let d = x.dims();
        let x4 = x.reshape(&[d[0], d[1], 1, d[2]])?;
        let w = self.weight.dims();
        let w4 = self.weight.reshape(&[w[0], w[1], 1, w[2]])?;
        let p = self.config.padding;
        let x4 = if p > 0 {
            x4.pad_with_zeros(3, p, p)?
        } else {
            x4
        };
        let cfg = ConvConfig {
            padding: 0,
            ..self.config
        };
        let y = conv2d_impl(&x4, &w4, &cfg)?;
        let yd = y.dims().to_vec();
        add_channel_bias(y.reshape(&[yd[0], yd[1], yd[3]])?, &self.bias)
    }
}

fn conv2d_impl(x: &Tensor, w: &Tensor, cfg: &ConvConfig) -> Result<Tensor> {
    conv2d_im2col(x, w, cfg)
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
/// that do not fit are dropped. At tied maxima the gradient is shared.
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
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        pool2d("max_pool2d", x, self.kernel, self.stride, true)
    }
}

impl Module for AvgPool2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        pool2d("avg_pool2d", x, self.kernel, self.stride, false)
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
