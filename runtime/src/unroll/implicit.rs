//! Implicit differentiation (TorchOpt's `custom_root`, jaxopt's implicit diff; iMAML,
//! Rajeswaran et al. 2019): the meta-gradient through the solution `x*` of an inner problem,
//! from an optimality condition `F(x*, theta) = 0` instead of the steps that found `x*`.
//!
//! By the implicit function theorem, `dx*/dtheta = -(dF/dx)^-1 dF/dtheta`, so for an outer
//! loss `L(x*)`:
//!
//! `dL/dtheta = -(dF/dtheta)^T v`, where `(dF/dx)^T v = dL/dx`.
//!
//! The linear system is solved without forming `dF/dx`: each product `(dF/dx)^T u` is one
//! vector-Jacobian product of `F` through the tape (`grad` with `grad_outputs = u`). When `F`
//! is the gradient of an inner objective (computed with `create_graph`), `dF/dx` is its
//! Hessian and the products are Hessian-vector products.

use candle_core::DType;

use crate::autograd::{grad, GradOptions};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

use super::{check_differentiable, dot, first_non_finite};

/// How [`implicit_grad`] solves `(dF/dx)^T v = dL/dx`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LinearSolver {
    /// Conjugate gradient: for a symmetric positive-definite `dF/dx` (the Hessian of a
    /// strongly convex inner objective). A direction of non-positive curvature is an error,
    /// unless [`ImplicitOptions::truncate_at_negative_curvature`] is set.
    ConjugateGradient,
    /// The Neumann series `v = alpha sum_k (I - alpha A^T)^k b`: converges when every
    /// eigenvalue of `alpha A` lies in (0, 2) (for a Hessian: `alpha < 2 / L`).
    Neumann {
        /// The step of the series (`1/L` for an `L`-smooth inner objective).
        alpha: f64,
    },
}

/// Options of [`implicit_grad`].
#[derive(Clone, Debug)]
pub struct ImplicitOptions {
    /// The solver.
    pub solver: LinearSolver,
    /// Stop when `||(dF/dx)^T v - dL/dx|| <= tol * ||dL/dx||`; in `[0, 1)` (`v = 0`, a
    /// zero gradient, meets 1).
    pub tol: f64,
    /// At most this many products with `(dF/dx)^T` (at least 1).
    pub max_iter: usize,
    /// Conjugate gradient only: at a direction of non-positive curvature (a nonconvex inner
    /// problem, such as a ReLU network's), stop and return the iterate so far (truncated CG,
    /// as Newton-CG does) instead of an error. The residual is reported as usual.
    pub truncate_at_negative_curvature: bool,
}

impl Default for ImplicitOptions {
    /// Conjugate gradient, relative tolerance 1e-10, at most 1000 iterations.
    fn default() -> Self {
        ImplicitOptions {
            solver: LinearSolver::ConjugateGradient,
            tol: 1e-10,
            max_iter: 1000,
            truncate_at_negative_curvature: false,
        }
    }
}

impl ImplicitOptions {
    /// Conjugate gradient with `tol` and `max_iter`.
    pub fn cg(tol: f64, max_iter: usize) -> Self {
        ImplicitOptions {
            solver: LinearSolver::ConjugateGradient,
            tol,
            max_iter,
            truncate_at_negative_curvature: false,
        }
    }

    /// A Neumann series of step `alpha` with `tol` and `max_iter`.
    pub fn neumann(alpha: f64, tol: f64, max_iter: usize) -> Self {
        ImplicitOptions {
            solver: LinearSolver::Neumann { alpha },
            tol,
            max_iter,
            truncate_at_negative_curvature: false,
        }
    }
}

/// The result of [`implicit_grad`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ImplicitGrads {
    /// `dL/dtheta`, one per `theta`; `None` where `F` does not depend on it.
    pub grads: Vec<Option<Tensor>>,
    /// The solution `v` of the linear system, one tensor per solution tensor.
    pub v: Vec<Tensor>,
    /// The relative residual `||(dF/dx)^T v - dL/dx|| / ||dL/dx||` of the returned `v`
    /// (0 when `dL/dx` is zero).
    pub residual: f64,
    /// Products with `(dF/dx)^T` the solver made.
    pub iterations: usize,
    /// Whether the residual reached the tolerance: the linear solve converged. How well the
    /// given solution solves the inner problem is [`condition_norm`](Self::condition_norm).
    pub converged: bool,
    /// `||F(x*, theta)||`, the 2-norm of the optimality condition at the given solution over
    /// all its tensors (summed in f64), in the units of `F`. The implicit function theorem
    /// holds at a root of `F`: near 0 (the rounding of `F`'s dtype) `x*` solves the inner
    /// problem and `grads` is its meta-gradient. A large value means that it does not (an
    /// inner loop stopped early or diverged): `grads` is then the derivative at a point that
    /// is not the solution (wrong, unless `dF/dx` and `dF/dtheta` do not depend on `x`, by an
    /// amount that grows with the distance to it; for the gradient of a `mu`-strongly convex
    /// objective, the true solution is within `condition_norm / mu`). It is reported, not checked (as in
    /// TorchOpt and jaxopt): compare it with the inner solver's own tolerance.
    pub condition_norm: f64,
}

/// The meta-gradient `dL/dtheta` through the solution `solution` of an inner problem whose
/// optimality condition is `condition(x, theta) = 0` (one tensor per tensor of `x`, same
/// shapes), given `dl_dx`, the gradient of the outer loss with respect to the solution. See
/// the module doc for the calculus.
///
/// `condition` is called once, on fresh leaves with the values of `solution`; it must be
/// differentiable in `x` and in `theta` (a gradient inside it needs `create_graph`). A direct
/// dependence of the outer loss on `theta` is not included: add it. A residual above the
/// tolerance after `max_iter` products is reported (`converged: false`), not an error; so is
/// a solution that does not satisfy the condition (`condition_norm`, `||F(x*, theta)||`,
/// well above 0): the gradient is computed at the point given, whatever it is.
///
/// Errors: options out of range (`tol` outside `[0, 1)`, `max_iter` 0, a Neumann `alpha`
/// that is not finite and positive); no solution tensors; `dl_dx` or the condition's output
/// of another count, shape, dtype or device; a `theta` that does not require grad
/// ([`Error::InvalidArgument`] naming `theta[i]`) or is not a float; NaN or infinite values
/// in the solution, `dl_dx` or the condition's output ([`Error::NonFinite`] naming the
/// tensor); a condition with no path on the tape to `x` (a gradient taken without
/// `create_graph`); conjugate gradient at a direction of non-positive curvature (unless
/// truncating). A `theta` listed twice gets its whole gradient at both positions.
///
/// ```
/// # use candle_higher_runtime::{grad, Device, GradOptions, Tensor, Result};
/// # use candle_higher_runtime::unroll::{implicit_grad, ImplicitOptions};
/// # fn main() -> Result<()> {
/// // x*(theta) = argmin (x - theta)^2 / 2 + x^2 / 2 = theta / 2; L = x*, so dL/dtheta = 1/2.
/// let theta = Tensor::scalar(3.0f64).to_leaf();
/// // F(x, theta) = 2 x - theta, the gradient of the objective.
/// let condition = |x: &[Tensor], th: &[Tensor]| -> Result<Vec<Tensor>> {
///     Ok(vec![x[0].sub(&th[0])?.add(&x[0])?])
/// };
/// let at = |x: f64| {
///     implicit_grad(
///         condition,
///         &[Tensor::scalar(x)],
///         &[theta.clone()],
///         &[Tensor::scalar(1.0f64)],
///         &ImplicitOptions::default(),
///     )
/// };
/// let out = at(1.5)?; // x* = theta / 2
/// assert!((out.grads[0].as_ref().unwrap().to_scalar_f64()? - 0.5).abs() < 1e-12);
/// assert!(out.converged && out.condition_norm == 0.0);
/// // x = 2 is not the solution: |F(2, 3)| = 1 is reported, not refused.
/// assert_eq!(at(2.0)?.condition_norm, 1.0);
/// # Ok(()) }
/// ```
pub fn implicit_grad(
    condition: impl FnOnce(&[Tensor], &[Tensor]) -> Result<Vec<Tensor>>,
    solution: &[Tensor],
    theta: &[Tensor],
    dl_dx: &[Tensor],
    options: &ImplicitOptions,
) -> Result<ImplicitGrads> {
    const OP: &str = "implicit_grad";
    check_options(options)?;
    if solution.is_empty() {
        return Err(Error::InvalidArgument {
            op: OP,
            message: "no solution tensors; give x*, one tensor per unknown".into(),
        });
    }
    check_matching(OP, "dl_dx", solution, dl_dx)?;
    check_differentiable(OP, "theta", theta)?;
    check_finite("solution", solution)?;
    check_finite("dl_dx", dl_dx)?;
    let x: Vec<Tensor> = solution.iter().map(|t| t.detach().to_leaf()).collect();
    let f = condition(&x, theta)?;
    check_matching(OP, "the optimality condition's output", solution, &f)?;
    if let Some(i) = first_non_finite(&f)? {
        return Err(Error::NonFinite {
            what: format!("{OP}: the optimality condition's output {i}, at a finite solution"),
        });
    }
    let condition_norm = {
        let f64s: Vec<Tensor> = f
            .iter()
            .map(|t| t.detach().to_dtype(DType::F64))
            .collect::<Result<_>>()?;
        dot(&f64s, &f64s)?.sqrt()
    };
    let b: Vec<Tensor> = dl_dx.iter().map(Tensor::detach).collect();
    // (dF/dx)^T u: a vector-Jacobian product of F.
    let product = |u: &[Tensor]| -> Result<Vec<Tensor>> {
        let g = grad(
            &f,
            &x,
            GradOptions::default()
                .allow_unused(true)
                .grad_outputs(u.to_vec()),
        )?;
        if g.iter().all(Option::is_none) {
            // Whatever u is: no path from F to x on the tape.
            return Err(Error::InvalidArgument {
                op: OP,
                message: "the optimality condition does not depend on the solution on the \
                          tape, so dF/dx is 0 and the system has no solution; compute F from \
                          the x it is given (a gradient inside it needs create_graph)"
                    .into(),
            });
        }
        g.into_iter()
            .zip(&x)
            .map(|(g, xi)| g.map_or_else(|| xi.zeros_like(), Ok))
            .collect()
    };
    let b_norm = dot(&b, &b)?.sqrt();
    let (v, residual, iterations) = if b_norm == 0.0 {
        (zeros_like(&b)?, 0.0, 0)
    } else {
        match options.solver {
            LinearSolver::ConjugateGradient => cg(&product, &b, b_norm, options)?,
            LinearSolver::Neumann { alpha } => neumann(&product, &b, b_norm, alpha, options)?,
        }
    };
    let grads = if theta.is_empty() {
        Vec::new()
    } else {
        grad(
            &f,
            theta,
            GradOptions::default()
                .allow_unused(true)
                .grad_outputs(v.clone()),
        )?
        .into_iter()
        .map(|g| g.map(|g| g.neg()).transpose())
        .collect::<Result<_>>()?
    };
    Ok(ImplicitGrads {
        grads,
        v,
        residual,
        iterations,
        converged: residual <= options.tol,
        condition_norm,
    })
}

fn check_options(options: &ImplicitOptions) -> Result<()> {
    let bad = |message: String| {
        Err(Error::InvalidArgument {
            op: "implicit_grad",
            message,
        })
    };
    // v = 0 meets a relative tolerance of 1: a zero gradient, reported as converged.
    if !(options.tol >= 0.0 && options.tol < 1.0) {
        return bad(format!(
            "tol is {}; give a relative tolerance in [0, 1) (v = 0 meets 1)",
            options.tol
        ));
    }
    if options.max_iter == 0 {
        return bad("max_iter is 0; allow at least 1 product".into());
    }
    if let LinearSolver::Neumann { alpha } = options.solver {
        if !(alpha.is_finite() && alpha > 0.0) {
            return bad(format!(
                "the Neumann step alpha is {alpha}; give a finite alpha > 0"
            ));
        }
    }
    Ok(())
}

/// NaN or an infinity in `ts` is [`Error::NonFinite`] naming the tensor.
fn check_finite(what: &str, ts: &[Tensor]) -> Result<()> {
    match first_non_finite(ts)? {
        Some(i) => Err(Error::NonFinite {
            what: format!("implicit_grad: {what} tensor {i}"),
        }),
        None => Ok(()),
    }
}

/// One tensor of `got` per tensor of `solution`, with its shape, dtype and device.
fn check_matching(op: &'static str, what: &str, solution: &[Tensor], got: &[Tensor]) -> Result<()> {
    if got.len() != solution.len() {
        return Err(Error::InvalidArgument {
            op,
            message: format!(
                "{what} has {} tensors; the solution has {}",
                got.len(),
                solution.len()
            ),
        });
    }
    for (i, (s, g)) in solution.iter().zip(got).enumerate() {
        if s.dims() != g.dims() {
            return Err(Error::ShapeMismatch {
                op,
                expected: format!("{:?} for tensor {i} of {what}", s.dims()),
                got: g.dims().to_vec(),
            });
        }
        s.check_same(g, op)?;
    }
    Ok(())
}

fn zeros_like(ts: &[Tensor]) -> Result<Vec<Tensor>> {
    ts.iter().map(Tensor::zeros_like).collect()
}

/// `a + alpha b`, elementwise over lists.
fn axpy(a: &[Tensor], alpha: f64, b: &[Tensor]) -> Result<Vec<Tensor>> {
    a.iter()
        .zip(b)
        .map(|(a, b)| a.add(&b.affine(alpha, 0.0)?))
        .collect()
}

type Product<'a> = dyn Fn(&[Tensor]) -> Result<Vec<Tensor>> + 'a;

/// Conjugate gradient from v = 0; returns v, its relative residual (recomputed from v at
/// the end, not the recursion's) and the number of products.
fn cg(
    product: &Product<'_>,
    b: &[Tensor],
    b_norm: f64,
    options: &ImplicitOptions,
) -> Result<(Vec<Tensor>, f64, usize)> {
    let mut v = zeros_like(b)?;
    let mut r = b.to_vec();
    let mut p = r.clone();
    let mut rs = dot(&r, &r)?;
    let mut iterations = 0;
    while iterations < options.max_iter && rs.sqrt() > options.tol * b_norm {
        let ap = product(&p)?;
        iterations += 1;
        let curvature = dot(&p, &ap)?;
        // NaN counts as non-positive: a NaN curvature is an error even when truncating.
        let positive = curvature > 0.0;
        if !positive && options.truncate_at_negative_curvature && curvature.is_finite() {
            break;
        }
        if !positive {
            return Err(Error::InvalidArgument {
                op: "implicit_grad (conjugate gradient)",
                message: format!(
                    "p^T (dF/dx)^T p = {curvature} at iteration {iterations}: dF/dx is not \
                     positive definite; use LinearSolver::Neumann or check the optimality condition"
                ),
            });
        }
        let step = rs / curvature;
        v = axpy(&v, step, &p)?;
        r = axpy(&r, -step, &ap)?;
        let rs_next = dot(&r, &r)?;
        p = axpy(&r, rs_next / rs, &p)?;
        rs = rs_next;
    }
    let residual_vec = axpy(b, -1.0, &product(&v)?)?;
    iterations += 1;
    let residual = dot(&residual_vec, &residual_vec)?.sqrt() / b_norm;
    Ok((v, residual, iterations))
}

/// The Neumann series: `v_k = alpha sum_{j<=k} (I - alpha A^T)^j b`, whose residual
/// `b - A^T v_k = (I - alpha A^T)^{k+1} b` is the next term over alpha.
fn neumann(
    product: &Product<'_>,
    b: &[Tensor],
    b_norm: f64,
    alpha: f64,
    options: &ImplicitOptions,
) -> Result<(Vec<Tensor>, f64, usize)> {
    let mut v = zeros_like(b)?;
    let mut term: Vec<Tensor> = b
        .iter()
        .map(|t| t.affine(alpha, 0.0))
        .collect::<Result<_>>()?;
    let mut residual = 1.0;
    let mut iterations = 0;
    while iterations < options.max_iter && residual > options.tol {
        v = axpy(&v, 1.0, &term)?;
        term = axpy(&term, -alpha, &product(&term)?)?;
        iterations += 1;
        residual = dot(&term, &term)?.sqrt() / alpha / b_norm;
        if !residual.is_finite() {
            break;
        }
    }
    Ok((v, residual, iterations))
}
