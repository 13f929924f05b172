//! Fused elementwise updates of optimizer steps, each rounding as the ops it replaces do,
//! so the results are the same to the bit:
//! - `addcmul_` and `addcdiv_` with a constant, in steps that record nothing (the ordinary
//!   optimizer, under `no_grad`): one pass instead of three candle ops (a product or
//!   quotient, a scaling, a sum), about a third of an outer Adam step's ops. Where a step
//!   records (a twin's), or the operands need broadcasting, another dtype or device, the
//!   three ops run as before.
//! - [`Tensor::sub_scaled`], `p - alpha * g` with a constant `alpha` (the SGD update): one
//!   recorded op instead of a scaling and a difference, and one op instead of two in its
//!   VJP, at every inner step of an unroll.
//! - [`adam`]: a whole Adam (and AdamW) update of one parameter in one pass, in steps that
//!   record nothing and with constant hyperparameters: the outer step of a meta-training
//!   loop, which runs alone between meta-batches (on two threads, while the other waits).

use candle_core::{DType, Device, WithDType};

use super::kernels::{cpu_fast_paths, with_cpu_slice};
use super::Operand;
use crate::autograd::{Backward, VjpCtx};
use crate::error::Result;
use crate::tensor::{is_anomaly_enabled, is_grad_enabled, Tensor};

/// How `t1` and `t2` combine before the scaling.
#[derive(Clone, Copy)]
pub(crate) enum Combine {
    /// `t1 * t2` (`addcmul`).
    Mul,
    /// `t1 / t2` (`addcdiv`).
    Div,
}

/// `base + (t1 op t2) * value` in one pass, or `None` where the pass does not apply (see
/// the module docs). With anomaly detection on the ops run one by one, so that a
/// non-finite value is reported at the op that made it.
pub(crate) fn add_combined(
    base: &Tensor,
    (t1, t2): (&Tensor, &Tensor),
    value: f64,
    combine: Combine,
) -> Result<Option<Tensor>> {
    let operands = [base, t1, t2];
    let records = is_grad_enabled() && operands.iter().any(|t| t.requires_grad());
    let alike = operands
        .iter()
        .all(|t| t.dims() == base.dims() && t.dtype() == base.dtype());
    if records || !alike || is_anomaly_enabled() || !fast_cpu(&operands) {
        return Ok(None);
    }
    match base.dtype() {
        DType::F32 => pass::<f32>(operands, value as f32, combine).map(Some),
        DType::F64 => pass::<f64>(operands, value, combine).map(Some),
        _ => Ok(None),
    }
}

/// The pass: `t1 op t2`, times `value`, then added to `base`, each rounded to `T` as
/// candle's ops round.
fn pass<T>([base, t1, t2]: [&Tensor; 3], value: T, combine: Combine) -> Result<Tensor>
where
    T: WithDType + std::ops::Mul<Output = T> + std::ops::Div<Output = T>,
{
    let out = with_cpu_slice::<T, _>(base.value(), |b| {
        with_cpu_slice::<T, _>(t1.value(), |x| {
            with_cpu_slice::<T, _>(t2.value(), |y| {
                let combined = |(&x, &y): (&T, &T)| match combine {
                    Combine::Mul => x * y,
                    Combine::Div => x / y,
                };
                Ok(super::kernels::vectorized(|| {
                    b.iter()
                        .zip(x.iter().zip(y).map(combined))
                        .map(|(&b, c)| b + c * value)
                        .collect::<Vec<T>>()
                }))
            })
        })
    })?;
    Ok(Tensor::new(candle_core::Tensor::from_vec(
        out,
        base.dims(),
        &Device::Cpu,
    )?))
}

/// The VJP of `p - alpha * g`: `(grad, -alpha grad)`.
struct ScaledSub {
    alpha: f64,
}

impl Backward for ScaledSub {
    fn name(&self) -> &'static str {
        "sub_scaled"
    }

    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let g = ctx.grad;
        Ok(vec![
            ctx.needs[0].then(|| g.clone()),
            ctx.needs[1].then(|| g.mul(-self.alpha)).transpose()?,
        ])
    }
}

impl Tensor {
    /// `self - alpha * other` (`torch.Tensor.add(other, alpha=-alpha)`, the SGD update).
    /// With a constant `alpha` and float operands of one shape, dtype and device it is one
    /// recorded op, equal to the bit to `self.sub(&other.mul(alpha)?)`; otherwise it is
    /// that (its promotions and errors included).
    pub fn sub_scaled(&self, other: &Tensor, alpha: impl Into<Operand>) -> Result<Tensor> {
        let alike = other.dims() == self.dims()
            && other.dtype() == self.dtype()
            && self.dtype().is_float()
            && other.device().same_device(self.device());
        let alpha = match alpha.into() {
            Operand::Float(a) if alike => a,
            // Anything else (a tensor alpha, broadcasting, integers, a mismatch) is the
            // composed ops, with their promotions and their errors.
            alpha => return self.sub(&other.mul(alpha)?),
        };
        let value = match self.dtype() {
            DType::F32 if fast_cpu(&[self, other]) => {
                scaled_sub_pass::<f32>(self, other, alpha as f32)?
            }
            DType::F64 if fast_cpu(&[self, other]) => scaled_sub_pass::<f64>(self, other, alpha)?,
            _ => (self.value() - other.value().affine(alpha, -0.0)?)?,
        };
        Tensor::from_op(value, &[self, other], ScaledSub { alpha })
    }
}

/// Adam's constant hyperparameters for one step: `lr`, `(beta1, beta2)`, `eps`, and the
/// step count `t` (bias corrections `1 - beta^t`).
pub(crate) struct AdamStep {
    pub(crate) lr: f64,
    pub(crate) betas: (f64, f64),
    pub(crate) eps: f64,
    pub(crate) step: i64,
}

/// One Adam update of `p` with gradient `g` and moments `(m, v)` in one pass: the new
/// `(p, m, v)`, or `None` where the pass does not apply (something records, anomaly
/// detection is on, or the operands differ in shape, dtype or device). Each value rounds
/// as the ops of `optim::adam::adam_update` do, in their order (see the test):
/// `m = m b1 + g (1 - b1)`, `v = v b2 + g g (1 - b2)`,
/// `p = p + m / (sqrt(v) / sqrt(1 - b2^t) + eps) (-lr / (1 - b1^t))`, each product and
/// quotient with a constant rounded once.
pub(crate) fn adam(
    p: &Tensor,
    g: &Tensor,
    (m, v): (&Tensor, &Tensor),
    hyper: &AdamStep,
) -> Result<Option<[Tensor; 3]>> {
    let operands = [p, g, m, v];
    let records = is_grad_enabled() && operands.iter().any(|t| t.requires_grad());
    let alike = operands
        .iter()
        .all(|t| t.dims() == p.dims() && t.dtype() == p.dtype());
    if records || !alike || is_anomaly_enabled() || !fast_cpu(&operands) {
        return Ok(None);
    }
    let (b1, b2) = hyper.betas;
    let t = hyper.step as f64;
    let (bc1, bc2) = (1.0 - b1.powf(t), 1.0 - b2.powf(t));
    // The f64 constants of the ops, as `Scalar` arithmetic makes them.
    let k = [
        b1,
        1.0 - b1,
        b2,
        1.0 - b2,
        bc2.sqrt(),
        hyper.eps,
        -(hyper.lr / bc1),
    ];
    let out = match p.dtype() {
        DType::F32 => adam_pass::<f32>(operands, k.map(|x| x as f32))?,
        DType::F64 => adam_pass::<f64>(operands, k)?,
        _ => return Ok(None),
    };
    Ok(Some(out.map(Tensor::new)))
}

/// A float that has a correctly rounded square root.
trait Sqrt: Copy {
    fn sqrt(self) -> Self;
}

impl Sqrt for f32 {
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}

impl Sqrt for f64 {
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
}

/// [`adam`]'s pass over `[p, g, m, v]` with constants `[b1, 1 - b1, b2, 1 - b2,
/// sqrt(bc2), eps, -lr / bc1]` in `T`.
fn adam_pass<T>(
    [p, g, m, v]: [&Tensor; 4],
    [b1, c1, b2, c2, inv, eps, step]: [T; 7],
) -> Result<[candle_core::Tensor; 3]>
where
    T: WithDType + Sqrt + std::ops::Mul<Output = T> + std::ops::Div<Output = T>,
{
    let n = p.elem_count();
    // Written into zeroed buffers element by element, so the loop vectorizes.
    let (mut po, mut mo, mut vo) = (vec![T::zero(); n], vec![T::zero(); n], vec![T::zero(); n]);
    with_cpu_slice::<T, _>(p.value(), |p| {
        with_cpu_slice::<T, _>(g.value(), |g| {
            with_cpu_slice::<T, _>(m.value(), |m| {
                with_cpu_slice::<T, _>(v.value(), |v| {
                    let k = [b1, c1, b2, c2, inv, eps, step];
                    adam_rows_dispatch([p, g, m, v], [&mut po, &mut mo, &mut vo], k);
                    Ok(())
                })
            })
        })
    })?;
    let tensor = |values| candle_core::Tensor::from_vec(values, p.dims(), &Device::Cpu);
    Ok([tensor(po)?, tensor(mo)?, tensor(vo)?])
}

/// [`adam_rows`] compiled for the widest vectors the CPU has (the same arithmetic: Rust
/// never contracts a multiply and an add).
fn adam_rows_dispatch<T>(inputs: [&[T]; 4], outputs: [&mut [T]; 3], k: [T; 7])
where
    T: WithDType + Sqrt + std::ops::Mul<Output = T> + std::ops::Div<Output = T>,
{
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { adam_rows_avx512(inputs, outputs, k) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { adam_rows_avx2(inputs, outputs, k) };
        }
    }
    adam_rows(inputs, outputs, k)
}

/// [`adam_rows`] with AVX-512.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn adam_rows_avx512<T>(inputs: [&[T]; 4], outputs: [&mut [T]; 3], k: [T; 7])
where
    T: WithDType + Sqrt + std::ops::Mul<Output = T> + std::ops::Div<Output = T>,
{
    adam_rows(inputs, outputs, k)
}

/// [`adam_rows`] with AVX2.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn adam_rows_avx2<T>(inputs: [&[T]; 4], outputs: [&mut [T]; 3], k: [T; 7])
where
    T: WithDType + Sqrt + std::ops::Mul<Output = T> + std::ops::Div<Output = T>,
{
    adam_rows(inputs, outputs, k)
}

/// [`adam_pass`]'s loop: `[p, g, m, v]` in, `[p, m, v]` out, all of one length.
#[inline(always)]
fn adam_rows<T>(
    [p, g, m, v]: [&[T]; 4],
    [po, mo, vo]: [&mut [T]; 3],
    [b1, c1, b2, c2, root_bc2, eps, step]: [T; 7],
) where
    T: WithDType + Sqrt + std::ops::Mul<Output = T> + std::ops::Div<Output = T>,
{
    let n = po.len();
    let (p, g, m, v, mo, vo) = (
        &p[..n],
        &g[..n],
        &m[..n],
        &v[..n],
        &mut mo[..n],
        &mut vo[..n],
    );
    for i in 0..n {
        let mi = m[i] * b1 + g[i] * c1;
        let vi = v[i] * b2 + (g[i] * g[i]) * c2;
        let denom = vi.sqrt() / root_bc2 + eps;
        po[i] = p[i] + (mi / denom) * step;
        mo[i] = mi;
        vo[i] = vi;
    }
}

/// Whether the one-pass CPU kernels may run on these tensors.
fn fast_cpu(tensors: &[&Tensor]) -> bool {
    cpu_fast_paths() && tensors.iter().all(|t| t.device().is_cpu())
}

/// `p - g * alpha` in one pass.
fn scaled_sub_pass<T>(p: &Tensor, g: &Tensor, alpha: T) -> Result<candle_core::Tensor>
where
    T: WithDType + std::ops::Mul<Output = T> + std::ops::Sub<Output = T>,
{
    let out = with_cpu_slice::<T, _>(p.value(), |p| {
        with_cpu_slice::<T, _>(g.value(), |g| {
            Ok(super::kernels::vectorized(|| {
                p.iter()
                    .zip(g)
                    .map(|(&p, &g)| p - g * alpha)
                    .collect::<Vec<T>>()
            }))
        })
    })?;
    Ok(candle_core::Tensor::from_vec(out, p.dims(), &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::no_grad;

    fn tensor(values: &[f64], dtype: DType) -> Tensor {
        let t = candle_core::Tensor::from_slice(values, values.len(), &Device::Cpu).unwrap();
        Tensor::new(t.to_dtype(dtype).unwrap())
    }

    fn bits(t: &Tensor) -> Vec<u64> {
        let v = t
            .value()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn the_pass_equals_the_three_ops_to_the_bit() {
        let base = [0.5, -0.0, 0.0, 3.25, -1e-30, 7.0, 1e30, -2.5];
        let t1 = [0.1, -0.0, 2.0, -3.0, 1e-20, 0.0, 3.0, -0.7];
        let t2 = [0.3, 4.0, -0.0, 1e-3, 2e-20, -5.0, 1e-9, 0.11];
        for dtype in [DType::F32, DType::F64] {
            let (b, x, y) = (tensor(&base, dtype), tensor(&t1, dtype), tensor(&t2, dtype));
            for value in [-0.37, 0.0, -0.0, 1.0, 1e-8] {
                for (combine, three) in [
                    (Combine::Mul, x.mul(&y).unwrap()),
                    (Combine::Div, x.div(&y).unwrap()),
                ] {
                    let expected = b.add(three.mul(value).unwrap()).unwrap();
                    let _guard = no_grad();
                    let fused = add_combined(&b, (&x, &y), value, combine).unwrap();
                    let fused = fused.expect("constants of one shape take the pass");
                    assert_eq!(bits(&fused), bits(&expected), "{dtype:?}, value {value}");
                }
            }
        }
    }

    #[test]
    fn sub_scaled_equals_the_scaling_and_the_difference_to_the_bit() {
        let p = [0.5, -0.0, 3.25, -1e-30, 7.0, 1e30, -2.5, 0.0];
        let g = [0.1, -0.0, -3.0, 1e-20, 0.0, 3.0, -0.7, 1e-12];
        for dtype in [DType::F32, DType::F64] {
            let (p, g) = (tensor(&p, dtype), tensor(&g, dtype));
            for alpha in [0.01, -0.37, 0.0, 1e8] {
                let expected = p.sub(g.mul(alpha).unwrap()).unwrap();
                let fused = p.sub_scaled(&g, alpha).unwrap();
                assert_eq!(bits(&fused), bits(&expected), "{dtype:?}, alpha {alpha}");
                let leaf = p.to_leaf();
                let recorded = leaf.sub_scaled(&g, alpha).unwrap();
                assert!(recorded.requires_grad());
                assert_eq!(bits(&recorded), bits(&expected), "{dtype:?}, alpha {alpha}");
            }
        }
    }

    #[test]
    fn recording_or_broadcasting_operands_take_the_three_ops() {
        let x = tensor(&[1.0, 2.0], DType::F64);
        let leaf = x.to_leaf();
        assert!(add_combined(&leaf, (&x, &x), 0.5, Combine::Mul)
            .unwrap()
            .is_none());
        let one = tensor(&[3.0], DType::F64);
        assert!(add_combined(&x, (&one, &x), 0.5, Combine::Div)
            .unwrap()
            .is_none());
        // Under no_grad nothing records, so a leaf takes the pass.
        let _guard = no_grad();
        assert!(add_combined(&leaf, (&x, &x), 0.5, Combine::Mul)
            .unwrap()
            .is_some());
    }
}
