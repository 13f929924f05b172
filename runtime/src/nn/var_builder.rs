//! `VarBuilder`: seeded, namespaced creation of parameters with PyTorch's initialisers.

use candle_core::{DType, Device};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Creates the parameters of layers: dtype, device, a seed, and a dotted name prefix
/// (`pp("encoder")`), in the style of candle-nn's `VarBuilder`.
///
/// Randomness is seeded per parameter from the builder's seed and the parameter's full
/// dotted name, so a parameter's initial value does not depend on the order in which
/// layers are built, and the same seed and names always give the same model. (The values
/// differ from PyTorch's, whose generator is not reproduced; the distributions are the
/// same.) Every tensor it makes is a leaf that requires grad.
#[derive(Clone, Debug)]
pub struct VarBuilder {
    seed: u64,
    dtype: DType,
    device: Device,
    prefix: String,
}

impl VarBuilder {
    /// A builder at the root namespace.
    pub fn new(seed: u64, dtype: DType, device: &Device) -> Self {
        VarBuilder {
            seed,
            dtype,
            device: device.clone(),
            prefix: String::new(),
        }
    }

    /// The same builder with `name` appended to the namespace.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        VarBuilder {
            prefix: self.path(&name.to_string()),
            ..self.clone()
        }
    }

    /// The full dotted name of `name` in this namespace.
    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The dtype of the tensors it makes.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device of the tensors it makes.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// A generator seeded from the builder's seed and the full name of `name`.
    pub fn rng(&self, name: &str) -> StdRng {
        // FNV-1a: stable across Rust versions, unlike std's hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for b in self.path(name).bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        StdRng::seed_from_u64(h)
    }

    /// An error naming the parameter `name`.
    fn bad(&self, name: &str, message: String) -> Error {
        Error::InvalidArgument {
            op: "VarBuilder",
            message: format!("parameter \"{}\": {message}", self.path(name)),
        }
    }

    /// `n` values from `f`, for a parameter of `shape`: an error, not a panic or an abort,
    /// for a shape whose element count passes `usize::MAX` or cannot be allocated.
    fn values(&self, name: &str, shape: &[usize], f: impl FnMut() -> f64) -> Result<Vec<f64>> {
        let n = crate::ops::shape::checked_elem_count(shape).ok_or_else(|| {
            self.bad(
                name,
                format!("shape {shape:?} has more than usize::MAX elements"),
            )
        })?;
        let mut data = Vec::new();
        data.try_reserve_exact(n)
            .map_err(|e| self.bad(name, format!("shape {shape:?} cannot be allocated: {e}")))?;
        data.extend(std::iter::repeat_with(f).take(n));
        Ok(data)
    }

    fn leaf(&self, data: Vec<f64>, shape: &[usize]) -> Result<Tensor> {
        let t = Tensor::from_vec(data, shape, &Device::Cpu)?
            .to_dtype(self.dtype)?
            .to_device(&self.device)?;
        Ok(t.to_leaf())
    }

    /// Uniform on `[lo, hi)` (`lo` everywhere when `lo == hi`); the bounds must be finite
    /// with `lo <= hi`, as torch's `uniform_` asks.
    pub fn uniform(&self, name: &str, shape: &[usize], lo: f64, hi: f64) -> Result<Tensor> {
        if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
            let why = format!("uniform bounds [{lo}, {hi}) must be finite with lo <= hi");
            return Err(self.bad(name, why));
        }
        let mut rng = self.rng(name);
        let data = self.values(name, shape, || {
            if lo < hi {
                rng.gen_range(lo..hi)
            } else {
                lo
            }
        })?;
        self.leaf(data, shape)
    }

    /// Normal with the given mean and standard deviation (Box-Muller); both finite and
    /// `std >= 0`, as torch's `normal_` asks.
    pub fn normal(&self, name: &str, shape: &[usize], mean: f64, std: f64) -> Result<Tensor> {
        if !(mean.is_finite() && std.is_finite() && std >= 0.0) {
            let why = format!("normal mean {mean} and std {std} must be finite with std >= 0");
            return Err(self.bad(name, why));
        }
        let mut rng = self.rng(name);
        let data = self.values(name, shape, || {
            let u1: f64 = 1.0 - rng.gen::<f64>();
            let u2: f64 = rng.gen::<f64>();
            mean + std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })?;
        self.leaf(data, shape)
    }

    /// PyTorch's default for weights of Linear and Conv layers: kaiming-uniform with
    /// `a = sqrt(5)`, which is uniform on `(-1/sqrt(fan_in), 1/sqrt(fan_in))`.
    pub fn kaiming_uniform(&self, name: &str, shape: &[usize], fan_in: usize) -> Result<Tensor> {
        let bound = fan_in_bound(fan_in);
        self.uniform(name, shape, -bound, bound)
    }

    /// A constant fill, as a leaf.
    pub fn constant(&self, name: &str, shape: &[usize], value: f64) -> Result<Tensor> {
        let data = self.values(name, shape, || value)?;
        self.leaf(data, shape)
    }

    /// Zeros, as a leaf.
    pub fn zeros(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.constant(name, shape, 0.0)
    }

    /// Ones, as a leaf.
    pub fn ones(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.constant(name, shape, 1.0)
    }
}

/// `1 / sqrt(fan_in)`, or 0 for an empty fan-in (PyTorch's bound for default init).
pub(crate) fn fan_in_bound(fan_in: usize) -> f64 {
    if fan_in == 0 {
        0.0
    } else {
        1.0 / (fan_in as f64).sqrt()
    }
}
