//! Constructors and conversions between `Tensor`, candle tensors and Rust values.

use candle_core::{DType, Device, WithDType};

use super::Tensor;
use crate::error::Result;
use crate::ops::shape::{check_alloc, check_layout};

impl Tensor {
    /// A tensor from a slice and a shape.
    pub fn from_slice<T: WithDType>(data: &[T], shape: &[usize], device: &Device) -> Result<Self> {
        check_layout("from_slice", shape)?;
        Ok(Self::new(candle_core::Tensor::from_slice(
            data, shape, device,
        )?))
    }

    /// A tensor from a vector and a shape.
    pub fn from_vec<T: WithDType>(data: Vec<T>, shape: &[usize], device: &Device) -> Result<Self> {
        check_layout("from_vec", shape)?;
        Ok(Self::new(candle_core::Tensor::from_vec(
            data, shape, device,
        )?))
    }

    /// A 0-dim tensor on the CPU; its dtype follows `T`.
    pub fn scalar<T: WithDType>(value: T) -> Self {
        Self::new(candle_core::Tensor::new(value, &Device::Cpu).expect("a scalar on the CPU"))
    }

    /// A 0-dim tensor of the given dtype and device.
    pub fn full_scalar(value: f64, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self::new(
            candle_core::Tensor::new(value, device)?.to_dtype(dtype)?,
        ))
    }

    /// A tensor filled with `value`.
    pub fn full(value: f64, shape: &[usize], dtype: DType, device: &Device) -> Result<Self> {
        check_alloc("full", shape, dtype)?;
        Ok(Self::new(
            candle_core::Tensor::ones(shape, dtype, device)?.affine(0.0, value)?,
        ))
    }

    /// Zeros.
    pub fn zeros(shape: &[usize], dtype: DType, device: &Device) -> Result<Self> {
        check_alloc("zeros", shape, dtype)?;
        Ok(Self::new(candle_core::Tensor::zeros(shape, dtype, device)?))
    }

    /// Ones.
    pub fn ones(shape: &[usize], dtype: DType, device: &Device) -> Result<Self> {
        check_alloc("ones", shape, dtype)?;
        Ok(Self::new(candle_core::Tensor::ones(shape, dtype, device)?))
    }

    /// Zeros with this tensor's shape, dtype and device (a constant).
    pub fn zeros_like(&self) -> Result<Self> {
        Ok(Self::new(self.value().zeros_like()?))
    }

    /// Ones with this tensor's shape, dtype and device (a constant).
    pub fn ones_like(&self) -> Result<Self> {
        Ok(Self::new(self.value().ones_like()?))
    }

    /// `value` everywhere, with this tensor's shape, dtype and device (a constant).
    pub fn full_like(&self, value: f64) -> Result<Self> {
        Ok(Self::new(self.value().ones_like()?.affine(0.0, value)?))
    }

    /// The detached candle value (a cheap clone), e.g. to hand results to candle code.
    #[track_caller]
    pub fn to_candle(&self) -> candle_core::Tensor {
        super::graph_exit::note(
            "to_candle",
            self.requires_grad(),
            std::panic::Location::caller(),
        );
        self.value().clone()
    }

    /// Converts to another dtype; the gradient converts back.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        crate::ops::cast::to_dtype(self, dtype)
    }

    /// Copies to another device; the gradient copies back.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        crate::ops::cast::to_device(self, device)
    }

    /// The single value of a tensor with one element, as f64.
    #[track_caller]
    pub fn to_scalar_f64(&self) -> Result<f64> {
        super::graph_exit::note(
            "to_scalar_f64",
            self.requires_grad(),
            std::panic::Location::caller(),
        );
        // Copied to the CPU before the cast: Metal has no f64.
        let v = self
            .value()
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?;
        if v.elem_count() != 1 {
            return Err(crate::Error::ShapeMismatch {
                op: "to_scalar_f64",
                expected: "one element".into(),
                got: self.dims().to_vec(),
            });
        }
        Ok(v.to_vec1::<f64>()?[0])
    }

    /// All values in row-major order, as f64 (cast on the CPU, so any device works).
    #[track_caller]
    pub fn to_vec_f64(&self) -> Result<Vec<f64>> {
        super::graph_exit::note(
            "to_vec_f64",
            self.requires_grad(),
            std::panic::Location::caller(),
        );
        Ok(self
            .value()
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?)
    }
}
