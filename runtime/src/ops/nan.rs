//! NaN propagation where candle drops it: candle's relu, max/min reductions, max pooling
//! and the right operand of maximum/minimum skip NaN (`f64::max` semantics), while PyTorch
//! propagates it. These helpers give PyTorch's result.

use candle_core::{DType, Storage, Tensor as Value};

use crate::error::Result;

/// Whether `v` holds a NaN: one pass over the values of a float tensor (integer tensors
/// cannot), no allocation on the CPU.
pub(crate) fn has_nan(v: &Value) -> Result<bool> {
    if !v.dtype().is_float() || v.elem_count() == 0 {
        return Ok(false);
    }
    if cpu_float_slice(v) {
        let (storage, layout) = v.storage_and_layout();
        if let Storage::Cpu(cpu) = &*storage {
            let range = layout.start_offset()..layout.start_offset() + v.elem_count();
            return Ok(match v.dtype() {
                DType::F32 => cpu.as_slice::<f32>()?[range].iter().any(|x| x.is_nan()),
                _ => cpu.as_slice::<f64>()?[range].iter().any(|x| x.is_nan()),
            });
        }
    }
    Ok(v.ne(v)?.flatten_all()?.max(0)?.to_scalar::<u8>()? != 0)
}

/// Whether `v` is a contiguous f32/f64 CPU tensor that the direct loops may read.
fn cpu_float_slice(v: &Value) -> bool {
    v.device().is_cpu()
        && v.is_contiguous()
        && matches!(v.dtype(), DType::F32 | DType::F64)
        && super::kernels::cpu_fast_paths()
}

/// A 0/1 mask (u8) of the NaN elements of `v`.
pub(crate) fn nan_mask(v: &Value) -> Result<Value> {
    Ok(v.ne(v)?)
}

/// `value` with NaN wherever `mask` (same shape, any dtype) is nonzero.
pub(crate) fn set_nan_where(mask: &Value, value: &Value) -> Result<Value> {
    let nan = Value::full(f64::NAN, value.shape(), value.device())?.to_dtype(value.dtype())?;
    Ok(mask.where_cond(&nan, value)?)
}

/// `max(x, 0)` that keeps NaN (candle's relu maps NaN to 0).
pub(crate) fn relu(v: &Value) -> Result<Value> {
    if !v.dtype().is_float() {
        return Ok(v.relu()?);
    }
    if cpu_float_slice(v) {
        let (storage, layout) = v.storage_and_layout();
        if let Storage::Cpu(cpu) = &*storage {
            let range = layout.start_offset()..layout.start_offset() + v.elem_count();
            // `x > 0 || x != x` keeps positive values and NaN; -inf and -0.0 become +0.0.
            let out = match v.dtype() {
                DType::F32 => {
                    let data: Vec<f32> = cpu.as_slice::<f32>()?[range]
                        .iter()
                        .map(|&x| if x > 0.0 || x.is_nan() { x } else { 0.0 })
                        .collect();
                    Value::from_vec(data, v.shape(), v.device())?
                }
                _ => {
                    let data: Vec<f64> = cpu.as_slice::<f64>()?[range]
                        .iter()
                        .map(|&x| if x > 0.0 || x.is_nan() { x } else { 0.0 })
                        .collect();
                    Value::from_vec(data, v.shape(), v.device())?
                }
            };
            return Ok(out);
        }
    }
    // candle's maximum keeps its left operand unless it is smaller: NaN stays.
    Ok(v.maximum(0.0)?)
}
