//! Pieces shared by the built-in optimizers, written once. Each takes its hyperparameters
//! as `impl Into<Scalar>`, so the same call serves the ordinary optimizer (`f64`) and its
//! twin ([`Scalar`], possibly a tensor the meta-gradient reaches).

use super::Scalar;
use crate::error::Result;
use crate::tensor::Tensor;

/// Coupled L2 weight decay, `g + weight_decay * p` (`weight_decay` of torch.optim's SGD,
/// Adam, Adagrad, Adadelta, Adamax, ASGD, RMSprop).
///
/// A constant 0 returns the gradient itself, as torch skips the term; a tensor is always
/// applied, even at value 0, so that `d/d weight_decay` is reported there too (the values
/// are the same either way).
pub(crate) fn weight_decay(
    grad: &Tensor,
    p: &Tensor,
    weight_decay: impl Into<Scalar>,
) -> Result<Tensor> {
    match weight_decay.into() {
        Scalar::Float(0.0) => Ok(grad.clone()),
        wd => grad.add(&p.mul(wd)?),
    }
}

/// SGD's `1 - dampening`, except for the tasks of a per-task `momentum` whose value is
/// exactly 0: torch keeps no buffer there and steps with the gradient itself, undamped,
/// as each task's own loop does. Per-task momenta that differ all take the momentum
/// branch (they read as NaN, so `!= 0` holds); a buffer `0 * buf + 1 * g` is then that
/// gradient. Elsewhere (floats, one value for all tasks) it is `1 - dampening`.
pub(crate) fn sgd_damping(
    momentum: impl Into<Scalar>,
    dampening: impl Into<Scalar>,
) -> Result<Scalar> {
    let dampening = dampening.into();
    match momentum.into() {
        Scalar::Tensor(m) if m.elem_count() > 1 => {
            let v = m.value();
            let moving = Tensor::new(v.ne(0.0)?.to_dtype(v.dtype())?);
            Ok(1.0 - dampening * Scalar::Tensor(moving))
        }
        _ => Ok(1.0 - dampening),
    }
}

/// A hyperparameter as a [`Scalar`] (for the ordinary optimizer's `f64` and the twin's
/// `Scalar` alike), to call `Scalar`'s methods (`pow`, `max_f64`, `recip`) in a step body.
pub(crate) fn scalar(x: impl Into<Scalar>) -> Scalar {
    x.into()
}

/// `base ^ step` for a step counter: `1 - beta^t` bias corrections. Computed with `powf`
/// (as Python's `beta ** t`), differentiable in `base` when it is a tensor.
pub(crate) fn pow_step(base: impl Into<Scalar>, step: i64) -> Scalar {
    base.into().powf(step as f64)
}

/// `1 - beta ^ step`: the bias correction of a moment estimate after `step` updates.
pub(crate) fn bias_correction(beta: impl Into<Scalar>, step: i64) -> Scalar {
    1.0 - pow_step(beta, step)
}

/// A tensor of `p`'s shape filled with `value` (a constant, or a tensor broadcast so that
/// the result depends on it: Rprop's initial step size `lr`, Adagrad's initial sum).
pub(crate) fn full_like(p: &Tensor, value: impl Into<Scalar>) -> Result<Tensor> {
    match value.into() {
        Scalar::Float(v) => p.full_like(v),
        Scalar::Tensor(t) => p.zeros_like()?.add(&t),
    }
}

/// Constant masks of where `x > 0` and where `x < 0` (1.0 / 0.0 in `x`'s dtype).
pub(crate) fn sign_masks(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let v = x.value();
    let pos = v.gt(0.0)?.to_dtype(v.dtype())?;
    let neg = v.lt(0.0)?.to_dtype(v.dtype())?;
    Ok((Tensor::new(pos), Tensor::new(neg)))
}

/// `x` clamped to `[min, max]` with `torch.clamp`'s derivative: the gradient goes to `x`
/// where `min <= x <= max`, to `min` where `x < min` and to `max` where `x > max` (the
/// bounds may be tensors).
pub(crate) fn clamp(x: &Tensor, min: impl Into<Scalar>, max: impl Into<Scalar>) -> Result<Tensor> {
    let (min, max) = (min.into(), max.into());
    let v = x.value();
    let below = v.lt(min.value())?.to_dtype(v.dtype())?;
    let above = v.gt(max.value())?.to_dtype(v.dtype())?;
    let inside = below.add(&above)?.affine(-1.0, 1.0)?;
    let (below, above, inside) = (Tensor::new(below), Tensor::new(above), Tensor::new(inside));
    x.mul(&inside)?.add(&below.mul(min)?)?.add(&above.mul(max)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::{grad, GradOptions};
    use candle_core::Device;

    #[test]
    fn clamp_matches_torch_values_and_derivative() -> Result<()> {
        let x = Tensor::from_vec(vec![-1.0f64, 0.5, 3.0, 1.0], &[4], &Device::Cpu)?.to_leaf();
        let lo = Tensor::scalar(0.0f64).to_leaf();
        let y = clamp(&x, Scalar::Tensor(lo.clone()), 1.0)?;
        assert_eq!(y.to_vec_f64()?, vec![0.0, 0.5, 1.0, 1.0]);
        let g = grad(&[y.sum_all()?], &[x, lo], GradOptions::default())?;
        // d/dx: 1 inside [0, 1] (bounds included, as torch), 0 outside; d/dmin: one entry below.
        assert_eq!(
            g[0].as_ref().unwrap().to_vec_f64()?,
            vec![0.0, 1.0, 0.0, 1.0]
        );
        assert_eq!(g[1].as_ref().unwrap().to_scalar_f64()?, 1.0);
        Ok(())
    }

    #[test]
    fn weight_decay_keeps_a_zero_tensor_differentiable() -> Result<()> {
        let g = Tensor::from_vec(vec![1.0f64, 2.0], &[2], &Device::Cpu)?;
        let p = Tensor::from_vec(vec![3.0f64, 4.0], &[2], &Device::Cpu)?;
        let wd = Tensor::scalar(0.0f64).to_leaf();
        let out = weight_decay(&g, &p, Scalar::Tensor(wd.clone()))?;
        assert_eq!(out.to_vec_f64()?, vec![1.0, 2.0]);
        let d = grad(&[out.sum_all()?], &[wd], GradOptions::default())?;
        assert_eq!(d[0].as_ref().unwrap().to_scalar_f64()?, 7.0); // sum(p)
        Ok(())
    }
}
