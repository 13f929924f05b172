//! Zero-order gradients (TorchOpt's `zero_order`): evolution-strategies estimates of the
//! gradient of a scalar function of tensors that is treated as a black box, such as a whole
//! inner loop, from function values only.
//!
//! With `eps ~ N(0, I)` and smoothing `sigma`, the Gaussian smoothing
//! `f_sigma(x) = E f(x + sigma eps)` has gradient `E[f(x + sigma eps) eps] / sigma`. The
//! estimators average `n` samples of:
//!
//! - [`EsMethod::Naive`]: `f(x + sigma eps) eps / sigma`;
//! - [`EsMethod::Forward`]: `(f(x + sigma eps) - f(x)) eps / sigma` (a baseline, one more
//!   evaluation in all);
//! - [`EsMethod::Antithetic`]: `(f(x + sigma eps) - f(x - sigma eps)) eps / (2 sigma)`
//!   (two evaluations per sample).
//!
//! All three are unbiased for `grad f_sigma(x)`, which is `grad f(x)` for a quadratic. The
//! samples are independent, so the error of the mean is about `std / sqrt(n)` per
//! coordinate: [`EsEstimate::std_errors`] reports that, from the samples themselves.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::tensor::Tensor;

use super::{epsilon, first_non_finite};

/// `sigma` must be at least this many spacings of an input's dtype at its largest value:
/// x + sigma eps is rounded to the dtype, and a perturbation of a few spacings is mostly
/// rounding (below one, none at all: an estimate of exactly 0 with standard error 0).
const MIN_SPACINGS: f64 = 100.0;

/// Which evolution-strategies estimator [`es_gradient`] uses (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EsMethod {
    /// `f(x + sigma eps) eps / sigma`.
    Naive,
    /// `(f(x + sigma eps) - f(x)) eps / sigma`.
    Forward,
    /// `(f(x + sigma eps) - f(x - sigma eps)) eps / (2 sigma)`.
    Antithetic,
}

/// Options of [`es_gradient`].
#[derive(Clone, Debug)]
pub struct EsOptions {
    /// The smoothing scale (> 0).
    pub sigma: f64,
    /// Number of noise draws `n` (antithetic: pairs).
    pub samples: usize,
    /// The estimator.
    pub method: EsMethod,
    /// Seed of the noise, so that an estimate can be reproduced.
    pub seed: u64,
}

impl Default for EsOptions {
    /// Antithetic, `sigma = 0.01`, 100 samples, seed 0.
    fn default() -> Self {
        EsOptions {
            sigma: 0.01,
            samples: 100,
            method: EsMethod::Antithetic,
            seed: 0,
        }
    }
}

/// The result of [`es_gradient`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct EsEstimate {
    /// The estimated gradient, one tensor per input (shape, dtype and device of the input).
    pub grads: Vec<Tensor>,
    /// The standard error of each coordinate of the estimate: the sample standard deviation
    /// of the per-sample estimates over `sqrt(n)`.
    pub std_errors: Vec<Tensor>,
    /// How many times `f` was called.
    pub evaluations: usize,
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>(); // in (0, 1]
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// An evolution-strategies estimate of the gradient of `f` at `x` (see the module doc).
///
/// `f` gets constant tensors (the inputs perturbed) and returns a one-element tensor; it
/// may build and use graphs inside (an unrolled inner loop), nothing is differentiated
/// through it. Each coordinate's noise is drawn in f64, and `x + sigma eps` is rounded to
/// each input's dtype.
///
/// Errors ([`Error::InvalidArgument`] unless said): `sigma` not finite and positive, or
/// below 100 spacings of an input's dtype at its largest value (the perturbation would be
/// mostly rounding: in f32 at `|x|` up to 1, `sigma >= 1.2e-5`); fewer than 2 samples; no
/// inputs; an integer input ([`Error::UnsupportedDType`]); NaN or infinite inputs, or an
/// `f` value that is ([`Error::NonFinite`] naming the input or the sample); an `f` of
/// several elements ([`Error::NonScalarOutput`]); `f`'s own errors, as they are.
///
/// ```
/// # use candle_higher_runtime::{Device, Tensor, Result};
/// # use candle_higher_runtime::unroll::{es_gradient, EsOptions};
/// # fn main() -> Result<()> {
/// // f(x) = sum(x^2): gradient 2x = [2, -4].
/// let x = Tensor::from_vec(vec![1.0f64, -2.0], &[2], &Device::Cpu)?;
/// let opts = EsOptions { samples: 20_000, ..EsOptions::default() };
/// let est = es_gradient(|x| x[0].sqr()?.sum_all(), &[x], &opts)?;
/// let g = est.grads[0].to_vec_f64()?;
/// assert!((g[0] - 2.0).abs() < 0.2 && (g[1] + 4.0).abs() < 0.2);
/// # Ok(()) }
/// ```
pub fn es_gradient(
    mut f: impl FnMut(&[Tensor]) -> Result<Tensor>,
    x: &[Tensor],
    options: &EsOptions,
) -> Result<EsEstimate> {
    const OP: &str = "es_gradient";
    let bad = |message: String| Err(Error::InvalidArgument { op: OP, message });
    if !(options.sigma.is_finite() && options.sigma > 0.0) {
        return bad(format!(
            "sigma is {}; give a finite sigma > 0",
            options.sigma
        ));
    }
    if options.samples < 2 {
        return bad(format!(
            "{} samples; give at least 2 (the standard error needs two)",
            options.samples
        ));
    }
    if x.is_empty() {
        return bad("no inputs; give at least one tensor to perturb".into());
    }
    for t in x {
        if !t.dtype().is_float() {
            return Err(Error::UnsupportedDType {
                op: OP,
                dtype: t.dtype(),
                expected: "floating point inputs (x + sigma eps would be rounded to integers)",
            });
        }
    }
    if let Some(i) = first_non_finite(x)? {
        return Err(Error::NonFinite {
            what: format!("{OP}: input {i}"),
        });
    }
    let base: Vec<Vec<f64>> = x
        .iter()
        .map(|t| t.detach().to_vec_f64())
        .collect::<Result<_>>()?;
    for (t, b) in x.iter().zip(&base) {
        let largest = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let spacing = epsilon(t.dtype()) * largest;
        if options.sigma < MIN_SPACINGS * spacing {
            return bad(format!(
                "sigma is {}, below {MIN_SPACINGS} spacings of {:?} values at |x| up to \
                 {largest} (they are {spacing:e} apart there): x + sigma eps would be mostly \
                 rounding; use sigma >= {:e}, or convert the inputs to f64",
                options.sigma,
                t.dtype(),
                MIN_SPACINGS * spacing
            ));
        }
    }
    let mut evaluations = 0;
    // `sample` None is the baseline f(x); `side` the sign of the perturbation.
    let mut eval = |values: &[Vec<f64>], sample: Option<usize>, side: f64| -> Result<f64> {
        let inputs: Vec<Tensor> = x
            .iter()
            .zip(values)
            .map(|(t, v)| Tensor::from_vec(v.clone(), t.dims(), t.device())?.to_dtype(t.dtype()))
            .collect::<Result<_>>()?;
        let y = f(&inputs)?;
        if y.elem_count() != 1 {
            return Err(Error::NonScalarOutput {
                op: OP,
                what: "f's value".into(),
                index: 0,
                shape: y.dims().to_vec(),
                hint: "f must return one element (the gradient of a scalar function is \
                       estimated): reduce its value with sum_all or mean_all",
            });
        }
        evaluations += 1;
        let y = y.to_scalar_f64()?;
        if !y.is_finite() {
            let at = match sample {
                None => "the baseline f(x)".to_string(),
                Some(s) if side > 0.0 => format!("sample {s} (x + sigma eps)"),
                Some(s) => format!("sample {s} (x - sigma eps)"),
            };
            return Err(Error::NonFinite {
                what: format!("{OP}: f is {y} at {at}"),
            });
        }
        Ok(y)
    };
    let baseline = match options.method {
        EsMethod::Forward => eval(&base, None, 0.0)?,
        EsMethod::Naive | EsMethod::Antithetic => 0.0,
    };
    let sigma = options.sigma;
    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut sum: Vec<Vec<f64>> = base.iter().map(|b| vec![0.0; b.len()]).collect();
    let mut sum_sq = sum.clone();
    let shifted = |eps: &[Vec<f64>], sign: f64| -> Vec<Vec<f64>> {
        base.iter()
            .zip(eps)
            .map(|(b, e)| b.iter().zip(e).map(|(b, e)| b + sign * sigma * e).collect())
            .collect()
    };
    for sample in 0..options.samples {
        let eps: Vec<Vec<f64>> = base
            .iter()
            .map(|b| (0..b.len()).map(|_| normal(&mut rng)).collect())
            .collect();
        let at = Some(sample);
        let weight = match options.method {
            EsMethod::Naive => eval(&shifted(&eps, 1.0), at, 1.0)? / sigma,
            EsMethod::Forward => (eval(&shifted(&eps, 1.0), at, 1.0)? - baseline) / sigma,
            EsMethod::Antithetic => {
                let up = eval(&shifted(&eps, 1.0), at, 1.0)?;
                (up - eval(&shifted(&eps, -1.0), at, -1.0)?) / (2.0 * sigma)
            }
        };
        for ((s, q), e) in sum.iter_mut().zip(sum_sq.iter_mut()).zip(&eps) {
            for ((s, q), e) in s.iter_mut().zip(q.iter_mut()).zip(e) {
                let sample = weight * e;
                *s += sample;
                *q += sample * sample;
            }
        }
    }
    let n = options.samples as f64;
    let mut grads = Vec::with_capacity(x.len());
    let mut std_errors = Vec::with_capacity(x.len());
    for ((t, s), q) in x.iter().zip(&sum).zip(&sum_sq) {
        let mean: Vec<f64> = s.iter().map(|s| s / n).collect();
        let se: Vec<f64> = q
            .iter()
            .zip(&mean)
            .map(|(q, m)| ((q - n * m * m).max(0.0) / (n - 1.0) / n).sqrt())
            .collect();
        let to_tensor = |v: Vec<f64>| -> Result<Tensor> {
            Tensor::from_vec(v, t.dims(), t.device())?.to_dtype(t.dtype())
        };
        grads.push(to_tensor(mean)?);
        std_errors.push(to_tensor(se)?);
    }
    Ok(EsEstimate {
        grads,
        std_errors,
        evaluations,
    })
}
