//! Shared helpers for the gradient tests: random inputs from a fixed seed on the device and
//! in the dtype of the suites (`device()`, `dtype()`), central finite-difference checks of
//! first, second and third derivatives, and the tolerances of each dtype (`precision()`).

use std::rc::Rc;

use candle_higher::{grad, DType, Device, GradOptions, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A scalar-valued function of several tensors, as the checks see it.
pub(crate) type ScalarFn = Rc<dyn Fn(&[Tensor]) -> Result<Tensor>>;

/// The device the golden and finite-difference suites run on: `CANDLE_HIGHER_DEVICE` =
/// `cpu` (the default), `cuda:N` or `metal:N` (which need the `cuda` / `metal` feature).
pub(crate) fn device() -> Device {
    candle_higher::device_from_env().unwrap_or_else(|e| panic!("CANDLE_HIGHER_DEVICE: {e}"))
}

/// The dtype the golden and finite-difference suites compute in: `CANDLE_HIGHER_TEST_DTYPE`
/// = `f64` or `f32` when set; otherwise f64, except on Metal, whose candle kernels have no
/// f64 (CUDA and the CPU have it). The f32 setting lets the CPU test the f32 path and its
/// tolerances; only the golden and finite-difference modules (the filter `golden optim_fd
/// ops_`) are written for it.
pub(crate) fn dtype() -> DType {
    match std::env::var("CANDLE_HIGHER_TEST_DTYPE").as_deref() {
        Ok("f64") => DType::F64,
        Ok("f32") => DType::F32,
        Ok(other) => panic!("CANDLE_HIGHER_TEST_DTYPE: \"{other}\": expected f64 or f32"),
        Err(_) if device().is_metal() => DType::F32,
        Err(_) => DType::F64,
    }
}

/// The tolerances of one dtype, for every golden and finite-difference check.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Precision {
    /// Step of the central differences of `check_gradient`.
    pub(crate) fd_step: f64,
    /// Tolerance of `check_gradient`, relative to max(1, largest |FD value|).
    pub(crate) fd_tol: f64,
    /// Relative tolerance against the golden files' numbers (PyTorch, float64).
    pub(crate) golden_tol: f64,
    /// Entries of a golden tensor below `golden_floor` times its largest magnitude are
    /// compared in absolute terms at that level (they are small by cancellation).
    pub(crate) golden_floor: f64,
    /// Tolerance of a meta-gradient against an f64 finite difference (the golden files'
    /// FD, or `optim_fd`'s, which runs on the CPU in f64 whatever the suites' dtype),
    /// relative to the largest gradient of its kind.
    pub(crate) reference_fd_tol: f64,
    /// Absolute slack of `optim_fd`'s comparisons (for gradients near zero).
    pub(crate) reference_fd_abs: f64,
    /// Relative tolerance of a closed-form value computed in a few roundings; in f64 each
    /// test keeps its own tighter bound (see `value_tol`).
    pub(crate) value_tol: f64,
}

/// f64: the bounds the suites were written with. The golden numbers are matched to 1e-9
/// (PyTorch computes them in float64 with other summation orders); central differences
/// with h = 1e-5 have truncation error ~h^2 |f'''| / 6 and rounding error ~1e-16 |f| / h,
/// both far below 1e-6; an f64 FD reference (h = 1e-6) carries ~1e-7 relative error.
pub(crate) const F64_PRECISION: Precision = Precision {
    fd_step: 1e-5,
    fd_tol: 1e-6,
    golden_tol: 1e-9,
    golden_floor: 1e-6,
    reference_fd_tol: 1e-6,
    reference_fd_abs: 1e-9,
    value_tol: 0.0,
};

/// f32 (eps = 1.2e-7), for devices without f64 (CANDLE_HIGHER_TEST_DTYPE=f32 on the CPU,
/// 2026-12-01, gives the measured values). The inputs are the f64 values rounded to f32, so
/// every result carries a few eps times the problem's conditioning, amplified over the
/// unrolled steps:
/// - golden numbers: at most 1.4e-4 relative (RMSprop's fast weights: its first update
///   `g / sqrt(0.01 g^2)` is ill-conditioned for tiny `g`), hence 3e-4; entries below 1% of
///   their tensor's largest are compared at that 1% (with a 0.1% floor the worst is 3.3e-4);
/// - central differences in f32 need a larger step: rounding ~eps |f| / h and truncation
///   ~h^2 |f'''| / 6 balance near h = eps^(1/3) ~ 5e-3; the worst measured error is 6.0e-4
///   of the scale (`safe_recip`, second order), hence 2e-3;
/// - an f32 meta-gradient against an f64 FD reference: at most 3.9e-4 of its kind's
///   largest (Adam's `betas.1`) and 5e-8 absolute, hence 1e-3 and 1e-7;
/// - closed-form values (a few roundings): 1e-6.
pub(crate) const F32_PRECISION: Precision = Precision {
    fd_step: 5e-3,
    fd_tol: 2e-3,
    golden_tol: 3e-4,
    golden_floor: 1e-2,
    reference_fd_tol: 1e-3,
    reference_fd_abs: 1e-7,
    value_tol: 1e-6,
};

/// The tolerances of `dtype()`.
pub(crate) fn precision() -> &'static Precision {
    if dtype() == DType::F32 {
        &F32_PRECISION
    } else {
        &F64_PRECISION
    }
}

/// The bound of a closed-form value check: `f64_tol` in f64, the rounding bound in f32.
pub(crate) fn value_tol(f64_tol: f64) -> f64 {
    f64_tol.max(precision().value_tol)
}

/// A constant tensor of `data` in `dtype()` on `device()`: built and converted on the CPU,
/// since a device without f64 cannot hold the f64 values.
pub(crate) fn from_f64(data: Vec<f64>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(data, shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype()))
        .and_then(|t| t.to_device(&device()))
        .unwrap()
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

/// Uniform values in `[lo, hi)` as a constant (`from_f64`).
pub(crate) fn uniform(rng: &mut StdRng, shape: &[usize], lo: f64, hi: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n).map(|_| rng.gen_range(lo..hi)).collect();
    from_f64(data, shape)
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
    from_f64(data, shape)
}

/// A constant tensor from values (`from_f64`).
pub(crate) fn t(data: &[f64], shape: &[usize]) -> Tensor {
    from_f64(data.to_vec(), shape)
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

/// Asserts that the gradient of the scalar `f` at `xs` matches central differences (step
/// and tolerance from `precision()`).
pub(crate) fn check_gradient(name: &str, f: &ScalarFn, xs: &[Tensor]) {
    let Precision {
        fd_step, fd_tol, ..
    } = *precision();
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
            // The input moved by `delta`, as the dtype holds it, and f there.
            let at = |delta: f64| {
                let mut v = base.clone();
                v[j] += delta;
                let mut p = xs.to_vec();
                p[i] = from_f64(v, x.dims());
                let held = p[i].to_vec_f64().unwrap()[j];
                (held, value_at(f, &p))
            };
            let ((up, f_up), (down, f_down)) = (at(fd_step), at(-fd_step));
            fd[j] = (f_up - f_down) / (up - down);
        }
        let scale = fd.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        for j in 0..base.len() {
            assert!(
                a[j].is_finite() && (a[j] - fd[j]).abs() <= fd_tol * scale,
                "{name}: input {i} element {j}: analytic {} vs finite differences {} \
                 (all analytic {a:?}, fd {fd:?})",
                a[j],
                fd[j]
            );
        }
    }
}

/// Checks derivatives of orders 1..=`max_order` of the op `f` at `xs` against
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

/// The bits of every value, as f64 (exact for f32 and f64 tensors), for comparisons to
/// the bit.
pub(crate) fn bits(t: &Tensor) -> Vec<u64> {
    t.to_vec_f64()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
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

/// Asserts that a task-batched result equals the loop over tasks: same shape, and every
/// entry within `exact` of the looped one, relative to the looped tensor's largest entry.
pub(crate) fn assert_batched_same(what: &str, got: &Tensor, want: &Tensor, exact: f64) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes");
    let (g, w) = (got.to_vec_f64().unwrap(), want.to_vec_f64().unwrap());
    let scale = w.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let diff = g
        .iter()
        .zip(&w)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff <= exact * scale,
        "{what}: batched and looped differ by {diff:e} (scale {scale:e})"
    );
}

/// The gradients of `loss` with respect to each of `xs`, zeros where it does not reach one.
pub(crate) fn grads_or_zeros(loss: &Tensor, xs: &[Tensor]) -> Vec<Tensor> {
    grad(
        std::slice::from_ref(loss),
        xs,
        GradOptions::default().allow_unused(true),
    )
    .unwrap()
    .into_iter()
    .zip(xs)
    .map(|(g, x)| g.unwrap_or_else(|| x.zeros_like().unwrap()))
    .collect()
}
