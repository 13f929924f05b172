//! One-pass forms of `addcmul_` and `addcdiv_` for steps that record nothing: the
//! ordinary optimizer steps under `no_grad`, where each of these was three candle ops (a
//! product or quotient, a scaling, a sum), about a third of an outer Adam step's ops.
//! The pass rounds as the three ops do, so the results are the same to the bit; where a
//! step records (a twin's), or the operands need broadcasting, another dtype or device,
//! the three ops run as before.

use candle_core::{DType, Device, WithDType};

use super::kernels::{cpu_fast_paths, with_cpu_slice};
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
        .all(|t| t.dims() == base.dims() && t.dtype() == base.dtype() && t.device().is_cpu());
    if records || !alike || is_anomaly_enabled() || !cpu_fast_paths() {
        return Ok(None);
    }
    match base.dtype() {
        DType::F32 => pass::<f32>(operands, value as f32, combine).map(Some),
        DType::F64 => pass::<f64>(operands, value, combine).map(Some),
        _ => Ok(None),
    }
}

/// The pass: `t1 op t2`, times `value` plus `+0.0` (the scaling is an affine, which turns
/// `-0.0` into `+0.0`), then added to `base`, each rounded to `T` as candle's ops round.
fn pass<T>([base, t1, t2]: [&Tensor; 3], value: T, combine: Combine) -> Result<Tensor>
where
    T: WithDType + std::ops::Mul<Output = T> + std::ops::Div<Output = T>,
{
    let zero = T::zero();
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
                        .map(|(&b, c)| b + (c * value + zero))
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
