//! Zero-order gradients (`unroll::es_gradient`) on a quadratic, where every estimator is
//! unbiased for the true gradient g = A x + b and the error statistics are known.
//!
//! The bound the tests state: the n per-sample estimates are independent with covariance
//! C, so E|mean - g|^2 = tr(C) / n. The reported standard errors estimate sqrt(C_jj / n),
//! hence E|mean - g|^2 is about |se|^2 and, by Markov's inequality,
//! P(|mean - g| > 5 |se|) <= 1/25 (far less in practice: for d = 4 the error is close to
//! a chi distribution, P < 1e-8). With a fixed seed each case is deterministic. For the
//! antithetic estimator the covariance is exact: the sample is eps eps^T g, whose
//! covariance is |g|^2 I + g g^T, so E|mean - g|^2 = (d + 1) |g|^2 / n.

use candle_higher::unroll::{es_gradient, EsMethod, EsOptions};
use candle_higher::{Error, Result, Tensor};

const D: usize = 4;

/// f(x) = x^T A x / 2 + b^T x + 3 with A symmetric positive definite; x as [2, 2].
struct Quadratic {
    a: Tensor,
    b: Tensor,
    x: Tensor,
}

fn quadratic() -> Quadratic {
    let a = [
        2.0, 0.3, 0.0, -0.2, //
        0.3, 1.5, 0.1, 0.0, //
        0.0, 0.1, 1.0, 0.4, //
        -0.2, 0.0, 0.4, 3.0,
    ];
    Quadratic {
        a: Tensor::from_slice(&a, &[D, D], &crate::common::device()).unwrap(),
        b: Tensor::from_slice(
            &[0.5f64, -1.0, 0.25, 2.0],
            &[D, 1],
            &crate::common::device(),
        )
        .unwrap(),
        x: Tensor::from_slice(&[1.0f64, -0.5, 0.3, 0.8], &[2, 2], &crate::common::device())
            .unwrap(),
    }
}

impl Quadratic {
    fn value(&self, x: &Tensor) -> Result<Tensor> {
        let v = x.reshape(&[D, 1])?;
        v.t()?
            .matmul(&self.a.matmul(&v)?)?
            .affine(0.5, 3.0)?
            .add(&self.b.t()?.matmul(&v)?)?
            .reshape(&[])
    }

    fn gradient(&self) -> Vec<f64> {
        let v = self.x.reshape(&[D, 1]).unwrap();
        self.a
            .matmul(&v)
            .unwrap()
            .add(&self.b)
            .unwrap()
            .to_vec_f64()
            .unwrap()
    }
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn estimate(q: &Quadratic, method: EsMethod, samples: usize, seed: u64) -> (Vec<f64>, Vec<f64>) {
    estimate_with(q, method, samples, seed, 0.1)
}

fn estimate_with(
    q: &Quadratic,
    method: EsMethod,
    samples: usize,
    seed: u64,
    sigma: f64,
) -> (Vec<f64>, Vec<f64>) {
    let options = EsOptions {
        sigma,
        samples,
        method,
        seed,
    };
    let est = es_gradient(|x| q.value(&x[0]), std::slice::from_ref(&q.x), &options).unwrap();
    assert_eq!(est.grads[0].dims(), q.x.dims());
    let expected_calls = match method {
        EsMethod::Naive => samples,
        EsMethod::Forward => samples + 1,
        EsMethod::Antithetic => 2 * samples,
    };
    assert_eq!(est.evaluations, expected_calls);
    (
        est.grads[0].to_vec_f64().unwrap(),
        est.std_errors[0].to_vec_f64().unwrap(),
    )
}

/// For each estimator and n = 100, 1000, 10000 (and three seeds): the error is within
/// 5 reported standard errors, and the standard error shrinks like 1/sqrt(n) (a factor 10
/// from n = 100 to 10000, within [5, 20]); the error at 10000 is below that at 100.
#[test]
fn estimates_converge_within_the_stated_bound() {
    let q = quadratic();
    let g = q.gradient();
    for method in [EsMethod::Naive, EsMethod::Forward, EsMethod::Antithetic] {
        for seed in [1, 2, 3] {
            let mut errors = Vec::new();
            let mut ses = Vec::new();
            for n in [100, 1000, 10_000] {
                let (est, se) = estimate(&q, method, n, seed);
                let err: Vec<f64> = est.iter().zip(&g).map(|(e, g)| e - g).collect();
                let (err, se) = (norm(&err), norm(&se));
                assert!(
                    err <= 5.0 * se,
                    "{method:?} seed {seed} n {n}: error {err} > 5 x standard error {se}"
                );
                errors.push(err);
                ses.push(se);
            }
            let shrink = ses[0] / ses[2];
            assert!(
                (5.0..20.0).contains(&shrink),
                "{method:?}: se shrank by {shrink}"
            );
            assert!(errors[2] < errors[0], "{method:?} seed {seed}: {errors:?}");
        }
    }
}

/// Antithetic sampling on a quadratic: E|mean - g|^2 = (d + 1) |g|^2 / n exactly (see the
/// module doc), so the error is within 5 sqrt((d + 1) / n) |g| (Markov: probability at
/// least 1 - 1/25 for any distribution), and the reported standard error estimates
/// sqrt((d + 1) / n) |g| within a factor 1.5 at n = 10000.
#[test]
fn antithetic_error_matches_its_exact_variance() {
    let q = quadratic();
    let g = q.gradient();
    let g_norm = norm(&g);
    for n in [100, 1000, 10_000] {
        let (est, se) = estimate(&q, EsMethod::Antithetic, n, 11);
        let err: Vec<f64> = est.iter().zip(&g).map(|(e, g)| e - g).collect();
        let rms = ((D as f64 + 1.0) / n as f64).sqrt() * g_norm;
        assert!(
            norm(&err) <= 5.0 * rms,
            "n {n}: {} vs bound {}",
            norm(&err),
            5.0 * rms
        );
        if n == 10_000 {
            let ratio = norm(&se) / rms;
            assert!((1.0 / 1.5..1.5).contains(&ratio), "se / exact = {ratio}");
        }
    }
}

/// The baseline and the antithetic pairs reduce variance (sigma = 1, same noise): the naive
/// samples carry an extra f(x) eps / sigma (f(x) is about 7.7), the forward ones an extra
/// sigma (eps^T A eps) eps / 2 that the antithetic pairs cancel.
#[test]
fn antithetic_and_forward_have_lower_variance_than_naive() {
    let q = quadratic();
    let se = |m| norm(&estimate_with(&q, m, 2000, 5, 1.0).1);
    let (naive, forward, anti) = (
        se(EsMethod::Naive),
        se(EsMethod::Forward),
        se(EsMethod::Antithetic),
    );
    assert!(
        anti < forward && forward < naive,
        "{anti} {forward} {naive}"
    );
}

/// The same seed gives the same estimate; another seed another one.
#[test]
fn the_seed_fixes_the_estimate() {
    let q = quadratic();
    let a = estimate(&q, EsMethod::Antithetic, 50, 9).0;
    let b = estimate(&q, EsMethod::Antithetic, 50, 9).0;
    let c = estimate(&q, EsMethod::Antithetic, 50, 10).0;
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn bad_options_are_typed_errors() {
    let q = quadratic();
    let x = std::slice::from_ref(&q.x);
    for options in [
        EsOptions {
            sigma: 0.0,
            ..EsOptions::default()
        },
        EsOptions {
            sigma: f64::INFINITY,
            ..EsOptions::default()
        },
        EsOptions {
            samples: 1,
            ..EsOptions::default()
        },
    ] {
        let r = es_gradient(|x| q.value(&x[0]), x, &options);
        assert!(
            matches!(r, Err(Error::InvalidArgument { .. })),
            "{options:?}: {r:?}"
        );
    }
    let vector = es_gradient(|x| Ok(x[0].clone()), x, &EsOptions::default());
    assert!(
        matches!(vector, Err(Error::NonScalarOutput { .. })),
        "{vector:?}"
    );
}
