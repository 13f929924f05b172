//! Shared helpers for the gradient tests: random f64 inputs from a fixed seed, and central
//! finite-difference checks of first, second and third derivatives.

use std::rc::Rc;

use candle_higher::{grad, DType, Device, GradOptions, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A scalar-valued function of several tensors, as the checks see it.
pub(crate) type ScalarFn = Rc<dyn Fn(&[Tensor]) -> Result<Tensor>>;

/// Step of the central differences: the truncation error is about h^2 |f'''| / 6 and the
/// rounding error about 1e-16 |f| / h, both far below the 1e-6 tolerance.
pub(crate) const H: f64 = 1e-5;

/// Relative tolerance of every check (scaled by max(1, largest |FD value|)).
pub(crate) const TOL: f64 = 1e-6;

/// The device the golden and finite-difference suites run on: `CANDLE_HIGHER_DEVICE` =
/// `cpu` (the default), `cuda:N` or `metal:N` (which need the `cuda` / `metal` feature).
pub(crate) fn device() -> Device {
    candle_higher::device_from_env().unwrap_or_else(|e| panic!("CANDLE_HIGHER_DEVICE: {e}"))
}

/// The kernel switch reads the environment: `CANDLE_HIGHER_KERNELS=candle` turns the CPU
/// fast paths off for the whole run (CI runs the suite both ways).
#[test]
fn kernel_switch_follows_the_environment() {
    let forced = std::env::var("CANDLE_HIGHER_KERNELS").is_ok_and(|v| v == "candle");
    assert_eq!(candle_higher::cpu_fast_paths(), !forced);
}

/// A generator with a fixed seed, so every run sees the same inputs.
pub(crate) fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Uniform values in `[lo, hi)`, f64, on the CPU, as a constant.
pub(crate) fn uniform(rng: &mut StdRng, shape: &[usize], lo: f64, hi: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n).map(|_| rng.gen_range(lo..hi)).collect();
    Tensor::from_vec(data, shape, &device()).unwrap()
}

/// Uniform values in `[-1, 1)`.
pub(crate) fn randn(rng: &mut StdRng, shape: &[usize]) -> Tensor {
    uniform(rng, shape, -1.0, 1.0)
}

/// Values in `[-1, -0.1] U [0.1, 1]`: well away from the kink at 0 of relu, abs, ...
pub(crate) fn away_from_zero(rng: &mut StdRng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n)
        .map(|_| {
            let m = rng.gen_range(0.1..1.0);
            if rng.gen_bool(0.5) {
                m
            } else {
                -m
            }
        })
        .collect();
    Tensor::from_vec(data, shape, &device()).unwrap()
}

/// A constant f64 tensor from values.
pub(crate) fn t(data: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_slice(data, shape, &device()).unwrap()
}

/// The gradient of scalar `y` w.r.t. each of `xs`, zeros where `xs` do not reach `y`.
fn grads_or_zero(y: &Tensor, xs: &[Tensor], create_graph: bool) -> Result<Vec<Tensor>> {
    let opts = GradOptions {
        create_graph,
        allow_unused: true,
        grad_outputs: None,
    };
    let gs = grad(std::slice::from_ref(y), xs, opts)?;
    gs.into_iter()
        .zip(xs)
        .map(|(g, x)| match g {
            Some(g) => Ok(g),
            None => x.zeros_like(),
        })
        .collect()
}

/// `<f(xs), w>` with a fixed random `w` of f's output shape: turns any op into a scalar.
pub(crate) fn contracted(f: ScalarFn, xs: &[Tensor], seed: u64) -> ScalarFn {
    let leaves: Vec<Tensor> = xs.iter().map(Tensor::to_leaf).collect();
    let out = f(&leaves).expect("the function runs on the given inputs");
    let w = randn(&mut rng(seed), out.dims())
        .to_dtype(out.dtype())
        .unwrap();
    Rc::new(move |xs: &[Tensor]| f(xs)?.mul(&w)?.sum_all())
}

/// `<grad f(xs), v>` for fixed random directions `v`, computed with `create_graph` so that
/// its own gradient is the second derivative of `f` contracted with `v`.
pub(crate) fn directional(f: ScalarFn, xs: &[Tensor], seed: u64) -> ScalarFn {
    let mut r = rng(seed);
    let vs: Vec<Tensor> = xs
        .iter()
        .map(|x| randn(&mut r, x.dims()).to_dtype(x.dtype()).unwrap())
        .collect();
    Rc::new(move |xs: &[Tensor]| {
        let y = f(xs)?;
        let gs = grads_or_zero(&y, xs, true)?;
        let mut acc = Tensor::zeros(&[], xs[0].dtype(), &device())?;
        for (g, v) in gs.iter().zip(&vs) {
            acc = acc.add(&g.mul(v)?.sum_all()?)?;
        }
        Ok(acc)
    })
}

/// Evaluates the scalar `f` at `xs` (made leaves, so nested `grad` calls see them).
fn value_at(f: &ScalarFn, xs: &[Tensor]) -> f64 {
    let leaves: Vec<Tensor> = xs.iter().map(Tensor::to_leaf).collect();
    f(&leaves).unwrap().to_scalar_f64().unwrap()
}

/// Asserts that the gradient of the scalar `f` at `xs` matches central differences.
pub(crate) fn check_gradient(name: &str, f: &ScalarFn, xs: &[Tensor]) {
    let leaves: Vec<Tensor> = xs.iter().map(Tensor::to_leaf).collect();
    let y = f(&leaves).unwrap();
    let analytic = grads_or_zero(&y, &leaves, false).unwrap();
    for (i, x) in xs.iter().enumerate() {
        let base = x.to_vec_f64().unwrap();
        let a = analytic[i].to_vec_f64().unwrap();
        assert_eq!(
            a.len(),
            base.len(),
            "{name}: gradient {i} has the wrong size"
        );
        let mut fd = vec![0.0; base.len()];
        for j in 0..base.len() {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[j] += delta;
                let mut p = xs.to_vec();
                p[i] = Tensor::from_vec(v, x.dims(), &device()).unwrap();
                value_at(f, &p)
            };
            fd[j] = (at(H) - at(-H)) / (2.0 * H);
        }
        let scale = fd.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        for j in 0..base.len() {
            assert!(
                a[j].is_finite() && (a[j] - fd[j]).abs() <= TOL * scale,
                "{name}: input {i} element {j}: analytic {} vs finite differences {} \
                 (all analytic {a:?}, fd {fd:?})",
                a[j],
                fd[j]
            );
        }
    }
}

/// Checks derivatives of orders 1..=`max_order` of the op `f` at `xs` (f64) against
/// central finite differences: order 1 on `<f, w>`, order k+1 on the directional
/// derivative of order k along fixed random vectors.
pub(crate) fn check_op(
    name: &str,
    f: impl Fn(&[Tensor]) -> Result<Tensor> + 'static,
    xs: &[Tensor],
    max_order: usize,
) {
    let mut level: ScalarFn = contracted(Rc::new(f), xs, 7);
    for order in 1..=max_order {
        check_gradient(&format!("{name} (order {order})"), &level, xs);
        if order < max_order {
            level = directional(level, xs, 100 + order as u64);
        }
    }
}

/// First and second order, the default for every op.
pub(crate) fn check12(
    name: &str,
    f: impl Fn(&[Tensor]) -> Result<Tensor> + 'static,
    xs: &[Tensor],
) {
    check_op(name, f, xs, 2);
}

/// Whether every value is finite.
pub(crate) fn all_finite(t: &Tensor) -> bool {
    t.to_vec_f64().unwrap().iter().all(|v| v.is_finite())
}

/// `a` and `b` agree to `tol` relative (to max(1, |b|)).
pub(crate) fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1.0)
}

/// The f64 dtype, for brevity.
pub(crate) const F64: DType = DType::F64;
