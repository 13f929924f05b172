//! Implicit differentiation (`unroll::implicit_grad`): the ridge-regression hypergradient
//! against its closed form, agreement with a long differentiated unroll on a strongly
//! convex problem, both solvers, what is reported when a solve fails, and the norm of the
//! optimality condition at exact and wrong solutions.

use candle_higher::unroll::{implicit_grad, ImplicitOptions, LinearSolver};
use candle_higher::{grad, Error, GradOptions, Result, Tensor};

use crate::common::{randn, rng};

/// Solves `m x = b` by Gaussian elimination with partial pivoting (m small, well posed).
fn solve(mut m: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for c in 0..n {
        let p = (c..n)
            .max_by(|&i, &j| m[i][c].abs().total_cmp(&m[j][c].abs()))
            .unwrap();
        m.swap(c, p);
        b.swap(c, p);
        let (pivot_row, pivot_b) = (m[c].clone(), b[c]);
        for (row, br) in m.iter_mut().zip(b.iter_mut()).skip(c + 1) {
            let f = row[c] / pivot_row[c];
            for (x, p) in row.iter_mut().zip(&pivot_row).skip(c) {
                *x -= f * p;
            }
            *br -= f * pivot_b;
        }
    }
    let mut x = vec![0.0; n];
    for r in (0..n).rev() {
        let s: f64 = (r + 1..n).map(|k| m[r][k] * x[k]).sum();
        x[r] = (b[r] - s) / m[r][r];
    }
    x
}

fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    let (r, c) = (t.dims()[0], t.dims()[1]);
    let v = t.to_vec_f64().unwrap();
    (0..r).map(|i| v[i * c..(i + 1) * c].to_vec()).collect()
}

fn col(v: &[f64]) -> Tensor {
    Tensor::from_slice(v, &[v.len(), 1], &crate::common::device()).unwrap()
}

struct Ridge {
    a: Tensor,
    y: Tensor,
    b: Tensor,
    z: Tensor,
}

fn ridge() -> Ridge {
    let mut r = rng(3);
    Ridge {
        a: randn(&mut r, &[8, 5]),
        y: randn(&mut r, &[8, 1]),
        b: randn(&mut r, &[6, 5]),
        z: randn(&mut r, &[6, 1]),
    }
}

impl Ridge {
    /// H = A^T A + lam I, as rows.
    fn hessian(&self, lam: f64) -> Vec<Vec<f64>> {
        let mut h = rows(&self.a.t().unwrap().matmul(&self.a).unwrap());
        for (i, row) in h.iter_mut().enumerate() {
            row[i] += lam;
        }
        h
    }

    /// x*(lam) = H^-1 A^T y.
    fn solution(&self, lam: f64) -> Vec<f64> {
        let aty = self
            .a
            .t()
            .unwrap()
            .matmul(&self.y)
            .unwrap()
            .to_vec_f64()
            .unwrap();
        solve(self.hessian(lam), aty)
    }

    /// dL/dx = B^T (B x - z) for L = |B x - z|^2 / 2.
    fn outer_grad(&self, x: &[f64]) -> Vec<f64> {
        let r = self.b.matmul(&col(x)).unwrap().sub(&self.z).unwrap();
        self.b
            .t()
            .unwrap()
            .matmul(&r)
            .unwrap()
            .to_vec_f64()
            .unwrap()
    }

    /// The optimality condition: the gradient of |A x - y|^2 / 2 + lam |x|^2 / 2, taken
    /// through the tape with create_graph so that it can be differentiated again.
    fn condition(&self, x: &[Tensor], theta: &[Tensor]) -> Result<Vec<Tensor>> {
        let inner = self
            .a
            .matmul(&x[0])?
            .sub(&self.y)?
            .sqr()?
            .sum_all()?
            .affine(0.5, 0.0)?
            .add(&x[0].sqr()?.sum_all()?.mul(&theta[0])?.affine(0.5, 0.0)?)?;
        Ok(grad(&[inner], &x[..1], GradOptions::create_graph())?
            .into_iter()
            .map(Option::unwrap)
            .collect())
    }
}

/// Ridge regression: dx*/dlam = -H^-1 x*, so dL/dlam = -(B^T (B x* - z))^T H^-1 x*,
/// computed here by a direct solve; both solvers must match it to 1e-8.
#[test]
fn ridge_hypergradient_matches_closed_form() -> Result<()> {
    let p = ridge();
    let lam = 0.5;
    let x = p.solution(lam);
    let g = p.outer_grad(&x);
    let h_inv_x = solve(p.hessian(lam), x.clone());
    let closed: f64 = -g.iter().zip(&h_inv_x).map(|(a, b)| a * b).sum::<f64>();
    assert!(
        closed.abs() > 1e-3,
        "a vacuous test: the hypergradient is {closed}"
    );
    let trace: f64 = (0..5).map(|i| p.hessian(lam)[i][i]).sum();
    for options in [
        ImplicitOptions::cg(1e-12, 100),
        ImplicitOptions::neumann(1.0 / trace, 1e-12, 20_000),
    ] {
        let theta = Tensor::scalar(lam).to_leaf();
        let out = implicit_grad(
            |x, th| p.condition(x, th),
            &[col(&x)],
            &[theta],
            &[col(&g)],
            &options,
        )?;
        let got = out.grads[0].as_ref().unwrap().to_scalar_f64()?;
        assert!(
            (got - closed).abs() <= 1e-8 * closed.abs(),
            "{:?}: {got} vs closed form {closed}",
            options.solver
        );
        assert!(out.converged && out.residual <= 1e-12, "{out:?}");
        // x* from a direct solve: |A^T (A x* - y) + lam x*| is rounding.
        assert!(out.condition_norm < 1e-10, "{out:?}");
        if options.solver == LinearSolver::ConjugateGradient {
            // CG on a 5x5 SPD system: at most 5 directions, plus the residual check.
            assert!(out.iterations <= 6 + 2, "{} iterations", out.iterations);
        }
    }
    Ok(())
}

/// iMAML's inner problem, strongly convex: g(x, theta) = mean softplus(-y_i a_i^T x) plus
/// |x - theta|^2 / 2. Gradient descent from x_0 = theta for 300 steps (contraction
/// about 0.5 per step), differentiated through the tape, gives dL/dtheta for
/// L = |x_T - c|^2 / 2; the implicit gradient at x_T must agree to 1e-8.
#[test]
fn implicit_agrees_with_a_long_unroll() -> Result<()> {
    let mut r = rng(5);
    let a = randn(&mut r, &[20, 4]);
    let signs = randn(&mut r, &[20, 1]).sign()?;
    let c = randn(&mut r, &[4, 1]);
    let theta = randn(&mut r, &[4, 1]).to_leaf();
    let grad_inner = |x: &Tensor, th: &Tensor| -> Result<Tensor> {
        let g = a
            .matmul(x)?
            .mul(&signs)?
            .neg()?
            .softplus()?
            .mean_all()?
            .add(&x.sub(th)?.sqr()?.sum_all()?.affine(0.5, 0.0)?)?;
        Ok(
            grad(&[g], std::slice::from_ref(x), GradOptions::create_graph())?[0]
                .clone()
                .unwrap(),
        )
    };
    let mut x = theta.clone();
    for _ in 0..300 {
        x = x.sub(&grad_inner(&x, &theta)?.affine(0.5, 0.0)?)?;
    }
    let outer = x.sub(&c)?.sqr()?.sum_all()?.affine(0.5, 0.0)?;
    let unrolled = grad(
        &[outer],
        std::slice::from_ref(&theta),
        GradOptions::default(),
    )?[0]
        .clone()
        .unwrap()
        .to_vec_f64()?;
    let dl_dx = x.sub(&c)?.detach();
    for options in [
        ImplicitOptions::cg(1e-12, 100),
        ImplicitOptions::neumann(0.5, 1e-12, 1000),
    ] {
        let out = implicit_grad(
            |x, th| Ok(vec![grad_inner(&x[0], &th[0])?]),
            &[x.detach()],
            std::slice::from_ref(&theta),
            std::slice::from_ref(&dl_dx),
            &options,
        )?;
        assert!(out.converged, "{out:?}");
        // 300 steps contracting by about 0.5 each: the gradient at x_T is rounding.
        assert!(out.condition_norm < 1e-10, "{out:?}");
        let got = out.grads[0].as_ref().unwrap().to_vec_f64()?;
        let scale = unrolled.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(scale > 1e-3);
        for (g, u) in got.iter().zip(&unrolled) {
            assert!(
                (g - u).abs() <= 1e-8 * scale,
                "{:?}: implicit {got:?} vs unrolled {unrolled:?}",
                options.solver
            );
        }
    }
    Ok(())
}

/// The reported residual is the true one: with too few iterations the solve is not
/// converged, says so, and its residual is what a direct check gives.
#[test]
fn unconverged_solves_are_reported() -> Result<()> {
    let p = ridge();
    let lam = 0.5;
    let x = p.solution(lam);
    let g = p.outer_grad(&x);
    let out = implicit_grad(
        |x, th| p.condition(x, th),
        &[col(&x)],
        &[Tensor::scalar(lam).to_leaf()],
        &[col(&g)],
        &ImplicitOptions::neumann(0.01, 1e-12, 3),
    )?;
    assert!(!out.converged);
    assert_eq!(out.iterations, 3);
    // residual = |H v - g| / |g|, recomputed here from the returned v.
    let hv: Vec<f64> = p
        .hessian(lam)
        .iter()
        .map(|row| {
            row.iter()
                .zip(out.v[0].to_vec_f64().unwrap())
                .map(|(a, b)| a * b)
                .sum()
        })
        .collect();
    let num: f64 = hv
        .iter()
        .zip(&g)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = g.iter().map(|v| v * v).sum::<f64>().sqrt();
    assert!(
        (out.residual - num / den).abs() <= 1e-10,
        "{} vs {}",
        out.residual,
        num / den
    );
    // A Neumann step beyond 2 / L diverges: not converged, and no panic.
    let diverged = implicit_grad(
        |x, th| p.condition(x, th),
        &[col(&x)],
        &[Tensor::scalar(lam).to_leaf()],
        &[col(&g)],
        &ImplicitOptions::neumann(10.0, 1e-12, 50),
    )?;
    assert!(!diverged.converged && diverged.residual > 1.0);
    Ok(())
}

#[test]
fn bad_inputs_are_typed_errors() -> Result<()> {
    let x = col(&[1.0, 2.0]);
    let theta = Tensor::scalar(1.0f64).to_leaf();
    let cond = |x: &[Tensor], th: &[Tensor]| Ok(vec![x[0].mul(&th[0])?]);
    let run = |dl: Tensor, options: ImplicitOptions| {
        implicit_grad(
            cond,
            std::slice::from_ref(&x),
            std::slice::from_ref(&theta),
            &[dl],
            &options,
        )
    };
    let wrong_shape = run(col(&[1.0, 2.0, 3.0]), ImplicitOptions::default());
    assert!(
        matches!(wrong_shape, Err(Error::ShapeMismatch { .. })),
        "{wrong_shape:?}"
    );
    let bad_alpha = run(col(&[1.0, 1.0]), ImplicitOptions::neumann(0.0, 1e-8, 10));
    assert!(
        matches!(bad_alpha, Err(Error::InvalidArgument { .. })),
        "{bad_alpha:?}"
    );
    let bad_tol = run(col(&[1.0, 1.0]), ImplicitOptions::cg(f64::NAN, 10));
    assert!(
        matches!(bad_tol, Err(Error::InvalidArgument { .. })),
        "{bad_tol:?}"
    );
    let wrong_count = implicit_grad(
        |x, _| Ok(vec![x[0].clone(), x[0].clone()]),
        std::slice::from_ref(&x),
        &[],
        &[col(&[1.0, 1.0])],
        &ImplicitOptions::default(),
    );
    assert!(
        matches!(wrong_count, Err(Error::InvalidArgument { .. })),
        "{wrong_count:?}"
    );
    // dF/dx = -I is negative definite: conjugate gradient refuses it.
    let negative = implicit_grad(
        |x, th| Ok(vec![x[0].mul(&th[0])?.neg()?]),
        std::slice::from_ref(&x),
        std::slice::from_ref(&theta),
        &[col(&[1.0, 1.0])],
        &ImplicitOptions::default(),
    );
    assert!(
        matches!(negative, Err(Error::InvalidArgument { .. })),
        "{negative:?}"
    );
    // Truncated CG stops there instead, at v = 0: residual 1, not converged.
    let truncated = implicit_grad(
        |x, th| Ok(vec![x[0].mul(&th[0])?.neg()?]),
        std::slice::from_ref(&x),
        std::slice::from_ref(&theta),
        &[col(&[1.0, 1.0])],
        &ImplicitOptions {
            truncate_at_negative_curvature: true,
            ..ImplicitOptions::default()
        },
    )?;
    assert!(
        !truncated.converged && (truncated.residual - 1.0).abs() < 1e-15,
        "{truncated:?}"
    );
    assert_eq!(truncated.v[0].to_vec_f64()?, [0.0, 0.0]);
    Ok(())
}

/// The quadratic g(a, c) = a^T H a / 2 - theta^T a + 2 (c - 1)^2, H = [[2, 1], [1, 3]], in
/// two unknown tensors: F = (H a - theta, 4 (c - 1)), taken through the tape. At theta =
/// (1, -2) the solution is a* = (1, -1) (H a* = (2 - 1, 1 - 3)), c* = 1, and
/// condition_norm is 0 to rounding. At a = (2, 0), c = 4, not a solution, F = ((4, 2) -
/// (1, -2), 12) = (3, 4, 12), whose 2-norm over both tensors is sqrt(9 + 16 + 144) = 13:
/// reported, and the gradient still computed.
#[test]
fn condition_norm_is_the_norm_of_the_condition_at_the_given_solution() -> Result<()> {
    let h = Tensor::from_slice(&[2.0, 1.0, 1.0, 3.0], &[2, 2], &crate::common::device())?;
    let theta = col(&[1.0, -2.0]).to_leaf();
    let condition = |x: &[Tensor], th: &[Tensor]| -> Result<Vec<Tensor>> {
        let (a, c) = (&x[0], &x[1]);
        let g = a
            .mul(&h.matmul(a)?)?
            .sum_all()?
            .affine(0.5, 0.0)?
            .sub(&th[0].mul(a)?.sum_all()?)?
            .add(&c.affine(1.0, -1.0)?.sqr()?.affine(2.0, 0.0)?)?;
        Ok(grad(&[g], x, GradOptions::create_graph())?
            .into_iter()
            .map(Option::unwrap)
            .collect())
    };
    // L = sum(a) + c: dL/dtheta = -(dF/dtheta)^T v = v_a = H^-1 (1, 1) = (2, 1) / 5.
    let dl_dx = [col(&[1.0, 1.0]), Tensor::scalar(1.0f64)];
    let at = |a: &[f64], c: f64| {
        implicit_grad(
            condition,
            &[col(a), Tensor::scalar(c)],
            std::slice::from_ref(&theta),
            &dl_dx,
            &ImplicitOptions::default(),
        )
    };
    let exact = at(&[1.0, -1.0], 1.0)?;
    assert!(exact.condition_norm < 1e-10, "{exact:?}");
    let g = exact.grads[0].as_ref().unwrap().to_vec_f64()?;
    assert!(
        (g[0] - 0.4).abs() < 1e-12 && (g[1] - 0.2).abs() < 1e-12,
        "{g:?}"
    );
    let wrong = at(&[2.0, 0.0], 4.0)?;
    assert!(
        (wrong.condition_norm - 13.0).abs() < 1e-12,
        "{}",
        wrong.condition_norm
    );
    assert!(wrong.converged && wrong.grads[0].is_some(), "{wrong:?}");
    Ok(())
}
