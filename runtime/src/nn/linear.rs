//! Fully connected layer.

use super::{Module, Parameters, VarBuilder, Visitor};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// `y = x W^T + b` (PyTorch's `nn.Linear`): weight `[out, in]`, bias `[out]`.
#[derive(Clone, Debug)]
pub struct Linear {
    /// `[out_features, in_features]`.
    pub weight: Tensor,
    /// `[out_features]`, or none.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// A layer from existing tensors.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }
}

/// A Linear layer with a bias, initialised as PyTorch does: weight and bias uniform on
/// `(-1/sqrt(in), 1/sqrt(in))`. Parameters are named `weight` and `bias` under `vb`.
pub fn linear(in_features: usize, out_features: usize, vb: VarBuilder) -> Result<Linear> {
    linear_b(in_features, out_features, true, vb)
}

/// A Linear layer without bias.
pub fn linear_no_bias(in_features: usize, out_features: usize, vb: VarBuilder) -> Result<Linear> {
    linear_b(in_features, out_features, false, vb)
}

/// A Linear layer with or without bias.
pub fn linear_b(
    in_features: usize,
    out_features: usize,
    bias: bool,
    vb: VarBuilder,
) -> Result<Linear> {
    let weight = vb.kaiming_uniform("weight", &[out_features, in_features], in_features)?;
    let bound = super::var_builder::fan_in_bound(in_features);
    let bias = bias
        .then(|| vb.uniform("bias", &[out_features], -bound, bound))
        .transpose()?;
    Ok(Linear { weight, bias })
}

impl Module for Linear {
    /// `x W^T + b` over the last dim. Task-batched when the weight is `[T, out, in]` (bias
    /// `[T, out]`): then `x` is `[T, .., in]` and each task uses its own weights.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let batched = super::tasks::batched("Linear", &self.weight, 2)?;
        let in_features = self.weight.dims().last().copied().unwrap_or(0);
        if x.rank() == 0 || x.dims()[x.rank() - 1] != in_features {
            return Err(Error::ShapeMismatch {
                op: "Linear",
                expected: format!("[.., {in_features}]"),
                got: x.dims().to_vec(),
            });
        }
        if !batched {
            return x.linear(&self.weight, self.bias.as_ref());
        }
        let tasks = self.weight.dims()[0];
        super::tasks::check_input("Linear", x, tasks, 2)?;
        x.linear_tasks(&self.weight, self.bias.as_ref())
    }
}

impl Parameters for Linear {
    fn visit(&mut self, v: &mut Visitor<'_>) -> Result<()> {
        v.param("weight", &mut self.weight)?;
        v.opt_param("bias", &mut self.bias)
    }
}
