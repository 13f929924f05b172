//! Normalisation layers: BatchNorm1d/2d and LayerNorm.

use super::{Buffer, Module, Parameters, VarBuilder, Visitor};
use crate::error::{Error, Result};
use crate::ops::channel::{batch_norm_train, channel_affine, Channels};
use crate::tensor::{no_grad, Tensor};

/// Options of a batch norm, with PyTorch's defaults (`eps = 1e-5`, `momentum = 0.1`,
/// `affine = true`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormConfig {
    /// Added to the variance; finite and `>= 0`.
    pub eps: f64,
    /// In `[0, 1]`. Running statistics move by
    /// `running = (1 - momentum) running + momentum batch`; `momentum = 1` keeps the last
    /// batch's statistics (as MAML's reference code uses). PyTorch's `momentum = None` (cumulative average) is not provided.
    pub momentum: f64,
    /// Learnable per-channel scale (`weight`) and shift (`bias`).
    pub affine: bool,
}

impl BatchNormConfig {
    /// `eps` finite and `>= 0`, `momentum` in `[0, 1]` (torch checks neither; a negative
    /// `eps` or a `momentum` past 1 gives NaN or diverging statistics, not an error).
    fn check(&self) -> Result<()> {
        let (eps, m) = (self.eps, self.momentum);
        check_eps("BatchNorm", eps)?;
        if !(0.0..=1.0).contains(&m) {
            return Err(Error::InvalidArgument {
                op: "BatchNorm",
                message: format!("momentum {m} is not in [0, 1]"),
            });
        }
        Ok(())
    }
}

/// `eps` finite and `>= 0`: it is added to a variance under a square root.
fn check_eps(op: &'static str, eps: f64) -> Result<()> {
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::InvalidArgument {
            op,
            message: format!("eps {eps} must be finite and >= 0"),
        });
    }
    Ok(())
}

impl Default for BatchNormConfig {
    fn default() -> Self {
        BatchNormConfig {
            eps: 1e-5,
            momentum: 0.1,
            affine: true,
        }
    }
}

/// Batch normalisation over the channel dim 1 (`nn.BatchNorm1d` for `[N, C]` or
/// `[N, C, L]`, `nn.BatchNorm2d` for `[N, C, H, W]`).
///
/// In training mode (the default) it normalises with the batch's statistics (biased
/// variance) and updates its buffers `running_mean` and `running_var` (unbiased variance)
/// without recording a graph; in eval mode it normalises with the buffers. PyTorch's
/// `num_batches_tracked` buffer is not kept.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    /// Per-channel scale `[C]` (ones), if affine.
    pub weight: Option<Tensor>,
    /// Per-channel shift `[C]` (zeros), if affine.
    pub bias: Option<Tensor>,
    /// Running mean `[C]`.
    pub running_mean: Buffer,
    /// Running variance `[C]`.
    pub running_var: Buffer,
    /// eps, momentum, affine.
    pub config: BatchNormConfig,
    /// Training mode.
    pub training: bool,
    num_features: usize,
    /// Accepted input ranks.
    ranks: &'static [usize],
}

fn batch_norm(
    num_features: usize,
    config: BatchNormConfig,
    vb: &VarBuilder,
    ranks: &'static [usize],
) -> Result<BatchNorm> {
    config.check()?;
    let (weight, bias) = if config.affine {
        (
            Some(vb.ones("weight", &[num_features])?),
            Some(vb.zeros("bias", &[num_features])?),
        )
    } else {
        (None, None)
    };
    Ok(BatchNorm {
        weight,
        bias,
        running_mean: Buffer::new(Tensor::zeros(&[num_features], vb.dtype(), vb.device())?),
        running_var: Buffer::new(Tensor::ones(&[num_features], vb.dtype(), vb.device())?),
        config,
        training: true,
        num_features,
        ranks,
    })
}

/// `nn.BatchNorm1d(num_features)`: inputs `[N, C]` or `[N, C, L]`.
pub fn batch_norm1d(
    num_features: usize,
    config: BatchNormConfig,
    vb: VarBuilder,
) -> Result<BatchNorm> {
    batch_norm(num_features, config, &vb, &[2, 3])
}

/// `nn.BatchNorm2d(num_features)`: inputs `[N, C, H, W]`.
pub fn batch_norm2d(
    num_features: usize,
    config: BatchNormConfig,
    vb: VarBuilder,
) -> Result<BatchNorm> {
    batch_norm(num_features, config, &vb, &[4])
}

impl Module for BatchNorm {
    /// Task-batched when the running statistics are `[T, C]` (as a task-batched fmodel
    /// keeps them; weight and bias then `[T, C]`): `x` is `[T, N, C, ..]`, and each task
    /// is normalised with its own statistics and updates its own buffers.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // The config is public: an edit after construction is checked here.
        self.config.check()?;
        let running_mean = self.running_mean.get();
        let batched = super::tasks::batched("BatchNorm", &running_mean, 1)?;
        x.check_same(&running_mean, "BatchNorm")?;
        let lead = usize::from(batched);
        let cd = 1 + lead;
        let rank_ok = self.ranks.contains(&(x.rank().saturating_sub(lead)));
        if !rank_ok || x.dims()[cd] != self.num_features {
            let task = if batched { "a task axis, then " } else { "" };
            return Err(Error::ShapeMismatch {
                op: "BatchNorm",
                expected: format!(
                    "{task}rank in {:?} with {} channels at dim 1",
                    self.ranks, self.num_features
                ),
                got: x.dims().to_vec(),
            });
        }
        let c = self.num_features;
        let stat_shape: Vec<usize> = if batched {
            let tasks = running_mean.dims()[0];
            super::tasks::check_input("BatchNorm", x, tasks, 1)?;
            vec![tasks, c]
        } else {
            vec![c]
        };
        let ch = Channels::new(x.dims(), batched, &stat_shape)?;
        if !self.training {
            // (x - running_mean) (running_var + eps)^-1/2 w + b in one pass.
            let mut scale = self
                .running_var
                .get()
                .add(self.config.eps)?
                .sqrt()?
                .powf(-1.0)?;
            if let Some(w) = &self.weight {
                scale = scale.mul(w)?;
            }
            let terms = [(x, Some(&running_mean), &scale)];
            return channel_affine(&terms, self.bias.as_ref(), &ch);
        }
        if ch.count() < 2 {
            // PyTorch raises for one value; none would make the statistics NaN.
            return Err(Error::ShapeMismatch {
                op: "BatchNorm",
                expected: "more than 1 value per channel when training".into(),
                got: x.dims().to_vec(),
            });
        }
        let (y, mean, var) = batch_norm_train(
            x,
            self.weight.as_ref(),
            self.bias.as_ref(),
            self.config.eps,
            &ch,
        )?;
        {
            let _g = no_grad();
            let m = self.config.momentum;
            let n = ch.count() as f64;
            let unbiased = var.detach().affine(n / (n - 1.0), 0.0)?;
            let rm = running_mean
                .affine(1.0 - m, 0.0)?
                .add(&mean.detach().affine(m, 0.0)?)?;
            let rv = self
                .running_var
                .get()
                .affine(1.0 - m, 0.0)?
                .add(&unbiased.affine(m, 0.0)?)?;
            self.running_mean.set(&rm);
            self.running_var.set(&rv);
        }
        Ok(y)
    }
}

impl Parameters for BatchNorm {
    fn visit(&mut self, v: &mut Visitor<'_>) -> Result<()> {
        v.opt_param("weight", &mut self.weight)?;
        v.opt_param("bias", &mut self.bias)?;
        v.buffer("running_mean", &mut self.running_mean)?;
        v.buffer("running_var", &mut self.running_var)?;
        v.training(&mut self.training)
    }
}

/// Layer normalisation over the last dims (`nn.LayerNorm(normalized_shape)`), with an
/// elementwise `weight` (ones) and `bias` (zeros), `eps = 1e-5`.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    /// Scale, shape `normalized_shape`, if elementwise-affine.
    pub weight: Option<Tensor>,
    /// Shift, shape `normalized_shape`, if elementwise-affine.
    pub bias: Option<Tensor>,
    /// Added to the variance; finite and `>= 0`.
    pub eps: f64,
    normalized_shape: Vec<usize>,
}

/// `nn.LayerNorm(normalized_shape)` with affine parameters and `eps = 1e-5`;
/// `normalized_shape` has at least one dim, as torch asks.
pub fn layer_norm(normalized_shape: &[usize], vb: VarBuilder) -> Result<LayerNorm> {
    if normalized_shape.is_empty() {
        return Err(Error::InvalidArgument {
            op: "LayerNorm",
            message: "normalized_shape [] must have at least one dim".into(),
        });
    }
    Ok(LayerNorm {
        weight: Some(vb.ones("weight", normalized_shape)?),
        bias: Some(vb.zeros("bias", normalized_shape)?),
        eps: 1e-5,
        normalized_shape: normalized_shape.to_vec(),
    })
}

impl Module for LayerNorm {
    /// Task-batched when the weight has a leading task axis `[T, ..normalized_shape]`:
    /// then `x` is `[T, .., ..normalized_shape]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        check_eps("LayerNorm", self.eps)?;
        let k = self.normalized_shape.len();
        if x.rank() < k || x.dims()[x.rank() - k..] != self.normalized_shape[..] {
            return Err(Error::ShapeMismatch {
                op: "LayerNorm",
                expected: format!("[.., {:?}]", self.normalized_shape),
                got: x.dims().to_vec(),
            });
        }
        let affine = |p: &Tensor| -> Result<Tensor> {
            if !super::tasks::batched("LayerNorm", p, k)? {
                return Ok(p.clone());
            }
            let tasks = p.dims()[0];
            super::tasks::check_input("LayerNorm", x, tasks, k + 1)?;
            let mut shape = vec![1; x.rank()];
            shape[0] = tasks;
            shape[x.rank() - k..].copy_from_slice(&self.normalized_shape);
            p.reshape(&shape)
        };
        let dims: Vec<usize> = (x.rank() - k..x.rank()).collect();
        let mean = x.mean_dims(&dims, true)?;
        let centered = x.sub(&mean)?;
        let var = centered.sqr()?.mean_dims(&dims, true)?;
        let mut y = centered.div(&var.add(self.eps)?.sqrt()?)?;
        if let Some(w) = &self.weight {
            y = y.mul(&affine(w)?)?;
        }
        if let Some(b) = &self.bias {
            y = y.add(&affine(b)?)?;
        }
        Ok(y)
    }
}

impl Parameters for LayerNorm {
    fn visit(&mut self, v: &mut Visitor<'_>) -> Result<()> {
        v.opt_param("weight", &mut self.weight)?;
        v.opt_param("bias", &mut self.bias)
    }
}

impl BatchNorm {
    /// A `BatchNorm1d` (inputs `[N, C]` or `[N, C, L]`) built from given tensors: `weight`
    /// and `bias` `[C]` (both, or neither for `affine = false`; `config.affine` follows
    /// them), and the running statistics `[C]`, e.g. loaded from a checkpoint.
    pub fn from_tensors_1d(
        weight: Option<Tensor>,
        bias: Option<Tensor>,
        running_mean: Tensor,
        running_var: Tensor,
        config: BatchNormConfig,
    ) -> Result<BatchNorm> {
        Self::from_tensors(weight, bias, running_mean, running_var, config, &[2, 3])
    }

    /// A `BatchNorm2d` (inputs `[N, C, H, W]`) built from given tensors, as
    /// [`BatchNorm::from_tensors_1d`].
    pub fn from_tensors_2d(
        weight: Option<Tensor>,
        bias: Option<Tensor>,
        running_mean: Tensor,
        running_var: Tensor,
        config: BatchNormConfig,
    ) -> Result<BatchNorm> {
        Self::from_tensors(weight, bias, running_mean, running_var, config, &[4])
    }

    fn from_tensors(
        weight: Option<Tensor>,
        bias: Option<Tensor>,
        running_mean: Tensor,
        running_var: Tensor,
        config: BatchNormConfig,
        ranks: &'static [usize],
    ) -> Result<BatchNorm> {
        const OP: &str = "BatchNorm::from_tensors";
        config.check()?;
        if running_mean.rank() != 1 {
            return Err(Error::ShapeMismatch {
                op: OP,
                expected: "running_mean [C]".into(),
                got: running_mean.dims().to_vec(),
            });
        }
        let channels = running_mean.dims()[0];
        let affine = match (&weight, &bias) {
            (Some(_), Some(_)) => true,
            (None, None) => false,
            _ => {
                return Err(Error::InvalidArgument {
                    op: OP,
                    message: "give both weight and bias (affine) or neither".into(),
                })
            }
        };
        let given = [Some(&running_var), weight.as_ref(), bias.as_ref()];
        for t in given.into_iter().flatten() {
            if t.dims() != [channels] {
                return Err(Error::ShapeMismatch {
                    op: OP,
                    expected: format!("[{channels}], the shape of running_mean"),
                    got: t.dims().to_vec(),
                });
            }
            running_mean.check_same(t, OP)?;
        }
        running_mean.require_float(OP)?;
        Ok(BatchNorm {
            weight,
            bias,
            running_mean: Buffer::new(running_mean.detach()),
            running_var: Buffer::new(running_var.detach()),
            config: BatchNormConfig { affine, ..config },
            training: true,
            num_features: channels,
            ranks,
        })
    }
}
