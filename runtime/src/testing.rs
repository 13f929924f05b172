//! A one-line test for an optimizer of your own: [`check_optimizer`].
//!
//! The macro translates what it can see of a step body; a step may also call helper
//! functions it cannot see. `check_optimizer` checks the result: the ordinary optimizer
//! and its differentiable twin take identical steps, and the twin's derivatives agree
//! with central finite differences of the ordinary optimizer.
//!
//! ```
//! use candle_higher_runtime::optim::Adam;
//! use candle_higher_runtime::testing::check_optimizer;
//! let report = check_optimizer(Adam::new(0.05)).unwrap();
//! assert!(report.hypergradients.iter().any(|h| h.name == "lr"));
//! ```

use std::fmt;

use candle_core::{DType, Device};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::autograd::{grad, GradOptions};
use crate::error::Error;
use crate::optim::{
    DiffOptimizer, DifferentiableOptimizer, Optimizer, Overrides, State, StateValue,
};
use crate::tensor::Tensor;

/// Settings of [`check_optimizer_with`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CheckOptions {
    /// Optimizer steps per trajectory (default 6).
    pub steps: usize,
    /// Seed of the random problem (default 0).
    pub seed: u64,
    /// Relative tolerance of a derivative against its finite difference (default 1e-5),
    /// on top of the finite difference's own round-off bound.
    pub rtol: f64,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            steps: 6,
            seed: 0,
            rtol: 1e-5,
        }
    }
}

/// One derivative that was checked.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckedDerivative {
    /// The hyperparameter's name (`lr`, `betas.0`, ...), or `initial parameters` for the
    /// directional derivative with respect to the starting point.
    pub name: String,
    /// The twin's derivative of the meta-loss.
    pub autodiff: f64,
    /// The central finite difference of the ordinary optimizer's meta-loss.
    pub finite_difference: f64,
}

/// What [`check_optimizer`] checked.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct CheckReport {
    /// Steps per trajectory.
    pub steps: usize,
    /// Shapes of the parameters of the random problem.
    pub shapes: Vec<Vec<usize>>,
    /// The derivatives with respect to the float hyperparameters, and the directional
    /// derivative with respect to the initial parameters (last).
    pub hypergradients: Vec<CheckedDerivative>,
    /// Float hyperparameters not differentiated, with the reason.
    pub skipped: Vec<(String, String)>,
    /// The largest relative difference between the ordinary trajectory and the twin's
    /// with every float hyperparameter a tensor: 0 when they are the same to the bit, as
    /// for every built-in optimizer (`Scalar` arithmetic on a tensor rounds as on an
    /// `f64`, except `Scalar::pow` with a tensor exponent, which is `exp(e ln x)`).
    pub tensor_path_difference: f64,
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} steps on parameters of shapes {:?}: ordinary and twin identical",
            self.steps, self.shapes
        )?;
        for d in &self.hypergradients {
            writeln!(
                f,
                "  d meta-loss / d {}: autodiff {:.12e}, finite difference {:.12e}",
                d.name, d.autodiff, d.finite_difference
            )?;
        }
        for (name, why) in &self.skipped {
            writeln!(f, "  {name} skipped: {why}")?;
        }
        match self.tensor_path_difference {
            0.0 => writeln!(f, "  tensor hyperparameters: the same steps to the bit"),
            d => writeln!(f, "  tensor hyperparameters: steps within {d:e} relative"),
        }
    }
}

/// The first disagreement [`check_optimizer`] found, with its numbers.
#[derive(Debug)]
#[non_exhaustive]
pub enum CheckFailure {
    /// The twin's step differs from the ordinary optimizer's.
    Trajectory {
        /// Which run of the twin: with float hyperparameters, or with each float
        /// hyperparameter given as a tensor.
        twin: &'static str,
        /// Step (1-based) and parameter position.
        step: usize,
        /// Parameter position in the problem.
        param: usize,
        /// Element index (row-major).
        index: usize,
        /// The ordinary optimizer's value.
        ordinary: f64,
        /// The twin's value.
        twin_value: f64,
    },
    /// A state entry differs between the two after the last step.
    State {
        /// Parameter position and entry name.
        param: usize,
        /// The entry.
        key: String,
        /// What differs.
        detail: String,
    },
    /// A derivative disagrees with its finite difference.
    Derivative {
        /// What was checked, with both numbers.
        checked: CheckedDerivative,
        /// The allowed absolute difference.
        tolerance: f64,
    },
    /// A value in a trajectory or derivative is NaN or infinite.
    NonFinite {
        /// Where.
        what: String,
    },
    /// The optimizer returned an error.
    Error(Error),
}

impl fmt::Display for CheckFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckFailure::Trajectory {
                twin,
                step,
                param,
                index,
                ordinary,
                twin_value,
            } => write!(
                f,
                "the twin ({twin}) differs from the ordinary optimizer at step {step}, parameter {param}, element {index}: ordinary {ordinary:e}, twin {twin_value:e}"
            ),
            CheckFailure::State { param, key, detail } => write!(
                f,
                "state entry \"{key}\" of parameter {param} differs between the ordinary optimizer and the twin: {detail}"
            ),
            CheckFailure::Derivative { checked, tolerance } => write!(
                f,
                "d meta-loss / d {}: autodiff {:e} but central finite difference {:e} (allowed difference {tolerance:e}); a path through the step leaves the graph (a float read out of a tensor, a detach) or the step is not differentiable there",
                checked.name, checked.autodiff, checked.finite_difference
            ),
            CheckFailure::NonFinite { what } => write!(f, "non-finite value: {what}"),
            CheckFailure::Error(e) => write!(f, "the optimizer failed: {e}"),
        }
    }
}

impl std::error::Error for CheckFailure {}

impl From<Error> for CheckFailure {
    fn from(e: Error) -> Self {
        CheckFailure::Error(e)
    }
}

/// [`check_optimizer_with`] with the default [`CheckOptions`].
pub fn check_optimizer<O: DifferentiableOptimizer>(
    optimizer: O,
) -> Result<CheckReport, CheckFailure> {
    check_optimizer_with(optimizer, CheckOptions::default())
}

/// Checks an optimizer on a random f64 problem: three parameters of shapes `[4]`, `[2, 3]`
/// and `[3]` (the last with an exactly zero gradient at every step, as dead units have),
/// a non-separable loss, `options.steps` steps. It checks that
///
/// 1. the twin with float hyperparameters takes bit-identical steps to the ordinary
///    optimizer, and ends with the same state;
/// 2. the twin with every float hyperparameter given as a tensor takes the same steps
///    (to 1e-12 relative; the report says how close, 0 for the same bits);
/// 3. the twin's derivative of a meta-loss (a random linear function of the last
///    parameters) with respect to each float hyperparameter, and its directional
///    derivative with respect to the initial parameters, agree with central finite
///    differences of the ordinary optimizer.
///
/// Hyperparameters whose value is exactly 0 are skipped (torch's branches treat 0 as
/// "off", e.g. momentum or weight decay, so their derivative is not defined there).
/// Returns the first disagreement with its numbers; `steps = 0`, or an `rtol` that is
/// negative, NaN or infinite, is [`CheckFailure::Error`] with [`Error::InvalidArgument`].
pub fn check_optimizer_with<O: DifferentiableOptimizer>(
    optimizer: O,
    options: CheckOptions,
) -> Result<CheckReport, CheckFailure> {
    check_options(&options)?;
    let problem = Problem::new(options.seed)?;
    let steps = options.steps;

    // 1. Ordinary against the twin with floats, bit for bit.
    let (ordinary, ordinary_states) = problem.run_ordinary(&optimizer, &problem.init, steps)?;
    let twin = DiffOptimizer::new(optimizer.clone(), &problem.init)?;
    let (twin_path, twin_opt) = problem.run_twin(twin, steps)?;
    compare_paths("float hyperparameters", &ordinary, &twin_path, 0.0)?;
    compare_states(&ordinary_states, twin_opt.states())?;

    // 2. Every float hyperparameter as a tensor leaf.
    let mut leaves = Vec::new();
    let mut skipped = Vec::new();
    let mut overrides = Overrides::new();
    for &name in O::FLOAT_NAMES {
        let Some(v) = optimizer.float(name) else {
            continue;
        };
        if v == 0.0 {
            skipped.push((
                name.to_string(),
                "its value is 0, which torch's branches treat as off".to_string(),
            ));
            continue;
        }
        let leaf = Tensor::full_scalar(v, DType::F64, &Device::Cpu)?.to_leaf();
        overrides = overrides.set(name, leaf.clone());
        leaves.push((name, v, leaf));
    }
    let mut twin = DiffOptimizer::new(optimizer.clone(), &problem.init)?;
    twin.set_overrides(&overrides)?;
    let (tensor_path, _) = problem.run_twin(twin, steps)?;
    compare_paths("tensor hyperparameters", &ordinary, &tensor_path, 1e-12)?;
    let tensor_path_difference = largest_difference(&ordinary, &tensor_path)?;

    // 3. Derivatives against central finite differences.
    let meta = problem.meta_loss(tensor_path.last().unwrap_or(&problem.init))?;
    let mut inputs: Vec<Tensor> = leaves.iter().map(|(_, _, l)| l.clone()).collect();
    inputs.extend(problem.init.iter().cloned());
    let grads = grad(
        std::slice::from_ref(&meta),
        &inputs,
        GradOptions {
            allow_unused: true,
            ..GradOptions::default()
        },
    )?;
    let meta_value = meta.to_scalar_f64()?;
    let mut hypergradients = Vec::new();
    for ((name, v, _), g) in leaves.iter().zip(&grads) {
        let autodiff = scalar_or_zero(g.as_ref())?;
        let h = 1e-4 * v.abs();
        let at = |x: f64| -> Result<f64, CheckFailure> {
            let mut o = optimizer.clone();
            o.set_float(name, x)?;
            let (path, _) = problem.run_ordinary(&o, &problem.init, steps)?;
            Ok(problem
                .meta_loss(path.last().unwrap_or(&problem.init))?
                .to_scalar_f64()?)
        };
        let fd = richardson(h, |h| Ok((at(v + h)? - at(v - h)?) / (2.0 * h)))?;
        check_derivative(name, autodiff, fd, h, meta_value, options.rtol)?;
        hypergradients.push(CheckedDerivative {
            name: name.to_string(),
            autodiff,
            finite_difference: fd,
        });
    }
    // Directional derivative along a random direction of the initial parameters.
    let mut autodiff = 0.0;
    for (g, d) in grads[leaves.len()..].iter().zip(&problem.direction) {
        if let Some(g) = g {
            autodiff += g.mul(d)?.sum_all()?.to_scalar_f64()?;
        }
    }
    let h = 1e-4;
    let shifted = |step: f64| -> Result<f64, CheckFailure> {
        let start = problem
            .init
            .iter()
            .zip(&problem.direction)
            .map(|(p, d)| Ok(p.add(&d.affine(step, 0.0)?)?.to_leaf()))
            .collect::<Result<Vec<_>, Error>>()?;
        let (path, _) = problem.run_ordinary(&optimizer, &start, steps)?;
        Ok(problem
            .meta_loss(path.last().unwrap_or(&start))?
            .to_scalar_f64()?)
    };
    let fd = richardson(h, |h| Ok((shifted(h)? - shifted(-h)?) / (2.0 * h)))?;
    check_derivative(
        "initial parameters",
        autodiff,
        fd,
        h,
        meta_value,
        options.rtol,
    )?;
    hypergradients.push(CheckedDerivative {
        name: "initial parameters".to_string(),
        autodiff,
        finite_difference: fd,
    });
    Ok(CheckReport {
        steps,
        shapes: problem.init.iter().map(|p| p.dims().to_vec()).collect(),
        hypergradients,
        skipped,
        tensor_path_difference,
    })
}

/// The largest relative difference between two trajectories' elements (0 when they are
/// the same to the bit).
fn largest_difference(a: &[Vec<Tensor>], b: &[Vec<Tensor>]) -> Result<f64, CheckFailure> {
    let mut largest = 0.0f64;
    for (a, b) in a.iter().flatten().zip(b.iter().flatten()) {
        for (x, y) in a.to_vec_f64()?.into_iter().zip(b.to_vec_f64()?) {
            if x.to_bits() != y.to_bits() {
                let relative = (x - y).abs() / x.abs().max(y.abs());
                largest = largest.max(relative.max(f64::MIN_POSITIVE));
            }
        }
    }
    Ok(largest)
}

/// No steps would check nothing (every derivative is 0 on both sides), and a NaN or
/// infinite `rtol` would pass every derivative.
fn check_options(options: &CheckOptions) -> Result<(), Error> {
    let message = if options.steps == 0 {
        "steps is 0: a trajectory of no steps checks nothing; take at least one".to_string()
    } else if !(options.rtol.is_finite() && options.rtol >= 0.0) {
        format!("rtol {}: expected a finite number >= 0", options.rtol)
    } else {
        return Ok(());
    };
    Err(Error::InvalidArgument {
        op: "check_optimizer",
        message,
    })
}

/// A random quadratic-plus-quartic problem and a linear meta-loss.
struct Problem {
    init: Vec<Tensor>,
    /// Curvature per element (0 for the parameter whose gradient is always zero).
    curvature: Vec<Tensor>,
    target: Vec<Tensor>,
    meta_weights: Vec<Tensor>,
    direction: Vec<Tensor>,
}

impl Problem {
    const SHAPES: [&'static [usize]; 3] = [&[4], &[2, 3], &[3]];

    fn new(seed: u64) -> Result<Self, Error> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut draw = |shape: &[usize], lo: f64, hi: f64| -> Result<Tensor, Error> {
            let n = shape.iter().product();
            let v: Vec<f64> = (0..n).map(|_| rng.gen_range(lo..hi)).collect();
            Tensor::from_vec(v, shape, &Device::Cpu)
        };
        let mut p = Problem {
            init: Vec::new(),
            curvature: Vec::new(),
            target: Vec::new(),
            meta_weights: Vec::new(),
            direction: Vec::new(),
        };
        for (i, shape) in Self::SHAPES.iter().enumerate() {
            p.init.push(draw(shape, -1.0, 1.0)?.to_leaf());
            let a = draw(shape, 0.5, 2.0)?;
            p.curvature.push(if i == 2 { a.zeros_like()? } else { a });
            p.target.push(draw(shape, -1.0, 1.0)?);
            p.meta_weights.push(draw(shape, -1.0, 1.0)?);
            p.direction.push(draw(shape, -1.0, 1.0)?);
        }
        Ok(p)
    }

    /// `sum a (p - b)^2 + 0.1 sum p0^4 + 0.3 (sum p1)^2`: the last parameter has an exactly
    /// zero gradient, the first two a Hessian that depends on them.
    fn loss(&self, params: &[Tensor]) -> Result<Tensor, Error> {
        let mut total = params[0].powf(4.0)?.sum_all()?.affine(0.1, 0.0)?;
        total = total.add(&params[1].sum_all()?.sqr()?.affine(0.3, 0.0)?)?;
        for ((p, a), b) in params.iter().zip(&self.curvature).zip(&self.target) {
            total = total.add(&a.mul(&p.sub(b)?.sqr()?)?.sum_all()?)?;
        }
        Ok(total)
    }

    fn meta_loss(&self, params: &[Tensor]) -> Result<Tensor, Error> {
        let mut total = Tensor::full_scalar(0.0, DType::F64, &Device::Cpu)?;
        for (p, w) in params.iter().zip(&self.meta_weights) {
            total = total.add(&p.mul(w)?.sum_all()?)?;
        }
        Ok(total)
    }

    /// The ordinary optimizer's trajectory (parameters after each step) and final states.
    fn run_ordinary<O: DifferentiableOptimizer>(
        &self,
        optimizer: &O,
        start: &[Tensor],
        steps: usize,
    ) -> Result<(Vec<Vec<Tensor>>, Vec<State>), Error> {
        let mut opt = Optimizer::new(optimizer.clone(), start.len())?;
        let mut params = start.to_vec();
        let mut path = Vec::new();
        for _ in 0..steps {
            let loss = self.loss(&params)?;
            let grads = grad(&[loss], &params, GradOptions::default())?;
            opt.step_grads(&mut params, &grads)?;
            path.push(params.clone());
        }
        Ok((path, opt.states().to_vec()))
    }

    /// The twin's trajectory from the problem's initial parameters.
    fn run_twin<O: DifferentiableOptimizer>(
        &self,
        mut opt: DiffOptimizer<O>,
        steps: usize,
    ) -> Result<(Vec<Vec<Tensor>>, DiffOptimizer<O>), Error> {
        let mut params = self.init.clone();
        let mut path = Vec::new();
        for _ in 0..steps {
            let loss = self.loss(&params)?;
            params = opt.step_params(&loss, &params)?;
            path.push(params.clone());
        }
        Ok((path, opt))
    }
}

/// Richardson extrapolation of a central difference `d(h)`: `(4 d(h/2) - d(h)) / 3`, whose
/// error is O(h^4), so that strongly curved directions (`1 - beta` near 0) stay accurate.
fn richardson(h: f64, d: impl Fn(f64) -> Result<f64, CheckFailure>) -> Result<f64, CheckFailure> {
    Ok((4.0 * d(h / 2.0)? - d(h)?) / 3.0)
}

fn scalar_or_zero(g: Option<&Tensor>) -> Result<f64, Error> {
    g.map_or(Ok(0.0), Tensor::to_scalar_f64)
}

/// Equal to `rtol` relative (0: bit for bit), and finite.
fn compare_paths(
    twin: &'static str,
    ordinary: &[Vec<Tensor>],
    other: &[Vec<Tensor>],
    rtol: f64,
) -> Result<(), CheckFailure> {
    for (step, (a, b)) in ordinary.iter().zip(other).enumerate() {
        for (param, (a, b)) in a.iter().zip(b).enumerate() {
            let (a, b) = (a.to_vec_f64()?, b.to_vec_f64()?);
            for (index, (&x, &y)) in a.iter().zip(&b).enumerate() {
                if !x.is_finite() || !y.is_finite() {
                    return Err(CheckFailure::NonFinite {
                        what: format!(
                            "step {}, parameter {param}, element {index}: ordinary {x}, twin {y}",
                            step + 1
                        ),
                    });
                }
                let same = if rtol == 0.0 {
                    x.to_bits() == y.to_bits()
                } else {
                    (x - y).abs() <= rtol * x.abs().max(y.abs())
                };
                if !same {
                    return Err(CheckFailure::Trajectory {
                        twin,
                        step: step + 1,
                        param,
                        index,
                        ordinary: x,
                        twin_value: y,
                    });
                }
            }
        }
    }
    Ok(())
}

fn compare_states(ordinary: &[State], twin: &[State]) -> Result<(), CheckFailure> {
    for (param, (a, b)) in ordinary.iter().zip(twin).enumerate() {
        let keys_a: Vec<&str> = a.entries().map(|(k, _)| k).collect();
        let keys_b: Vec<&str> = b.entries().map(|(k, _)| k).collect();
        if keys_a != keys_b {
            return Err(CheckFailure::State {
                param,
                key: String::new(),
                detail: format!("entries {keys_a:?} against {keys_b:?}"),
            });
        }
        for ((key, x), (_, y)) in a.entries().zip(b.entries()) {
            let (x, y) = (state_numbers(&x)?, state_numbers(&y)?);
            let same =
                x.len() == y.len() && x.iter().zip(&y).all(|(u, v)| u.to_bits() == v.to_bits());
            if !same {
                return Err(CheckFailure::State {
                    param,
                    key: key.to_string(),
                    detail: format!("ordinary {x:?}, twin {y:?}"),
                });
            }
        }
    }
    Ok(())
}

/// A state entry's numbers, whatever its kind.
fn state_numbers(v: &StateValue) -> Result<Vec<f64>, Error> {
    match v {
        StateValue::Tensor(t) => t.to_vec_f64(),
        StateValue::Scalar(s) => Ok(vec![s.value()]),
        StateValue::Int(n) => Ok(vec![*n as f64]),
    }
}

/// `|autodiff - fd| <= rtol * max(|autodiff|, |fd|) + round-off`, where the round-off
/// bound of a central difference with step `h` is about `eps * |meta| / h`.
fn check_derivative(
    name: &str,
    autodiff: f64,
    fd: f64,
    h: f64,
    meta: f64,
    rtol: f64,
) -> Result<(), CheckFailure> {
    let checked = CheckedDerivative {
        name: name.to_string(),
        autodiff,
        finite_difference: fd,
    };
    if !autodiff.is_finite() || !fd.is_finite() {
        return Err(CheckFailure::NonFinite {
            what: format!("d meta-loss / d {name}: autodiff {autodiff}, finite difference {fd}"),
        });
    }
    let tolerance =
        rtol * autodiff.abs().max(fd.abs()) + 256.0 * f64::EPSILON * (meta.abs() + 1.0) / h;
    if (autodiff - fd).abs() > tolerance {
        return Err(CheckFailure::Derivative { checked, tolerance });
    }
    Ok(())
}
