//! Moving values between dtypes and devices.

use candle_core::{DType, Device};

use crate::autograd::{Backward, VjpCtx};
use crate::error::Result;
use crate::tensor::Tensor;

struct ToDType;

impl Backward for ToDType {
    fn name(&self) -> &'static str {
        "to_dtype"
    }

    /// The gradient converts back to the input's dtype.
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(ctx.grad.to_dtype(ctx.inputs[0].dtype())?)])
    }
}

struct ToDevice;

impl Backward for ToDevice {
    fn name(&self) -> &'static str {
        "to_device"
    }

    /// The gradient moves back to the input's device.
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(ctx.grad.to_device(ctx.inputs[0].device())?)])
    }
}

pub(crate) fn to_dtype(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        return Ok(t.clone());
    }
    Tensor::from_op(t.value().to_dtype(dtype)?, &[t], ToDType)
}

pub(crate) fn to_device(t: &Tensor, device: &Device) -> Result<Tensor> {
    if t.device().same_device(device) {
        return Ok(t.clone());
    }
    Tensor::from_op(t.value().to_device(device)?, &[t], ToDevice)
}
