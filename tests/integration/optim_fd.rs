//! Central finite differences in f64 for every built-in optimizer variant: the twin's
//! meta-gradient w.r.t. every initial weight and every float hyperparameter (each given
//! as a leaf tensor) against `(f(v + h) - f(v - h)) / 2h`, where `f` reruns the whole
//! unroll with the *ordinary* optimizer. Also two parameter groups with per-group
//! overrides, and an override given at a step.
//!
//! `h = 1e-6` for weights and `1e-6 max(|v|, 1e-3)` for hyperparameters (as the golden
//! files; at value 0, where negative values are rejected, see `fd_hyper`). Central differences have truncation error
//! O(h^2 f''') and rounding error O(eps f / h) ~ 1e-10 here, so the tolerance is 1e-6
//! relative to the largest gradient of the same kind (weights, or that hyperparameter)
//! plus 1e-9 absolute. Measured: at most 2e-7 relative, except ASGD's `alpha`, whose
//! gradient is 2e-6 (within the absolute term).
//!
//! The twin runs in the suites' dtype on their device (`common::dtype()`, `device()`); the
//! finite differences always run on the CPU in f64 (`Case::reference`), so in f32 they are
//! an exact reference for the f32 meta-gradient, judged with `Precision::reference_fd_tol`
//! and `reference_fd_abs` (1e-6 and 1e-9 in f64).

use crate::optim_support::*;
use candle_higher::optim::{
    Adadelta, Adagrad, Adam, AdamW, Adamax, Asgd, DiffOptimizer, Optimizer, Overrides, ParamGroup,
    RmsProp, Rprop, Sgd, StepOptions,
};
use candle_higher::{
    backward, grad, DifferentiableOptimizer, GradOptions, Hyperparameters, Tensor,
};

const STEPS: usize = 3;

/// The case the twin runs on (the suites' dtype and device).
fn case() -> Case {
    Case::new("mlp_sgd_plain.json")
}

/// The same case in f64 on the CPU, for the finite differences.
fn reference() -> Case {
    Case::reference("mlp_sgd_plain.json")
}

fn leaves(values: &[Tensor]) -> Vec<Tensor> {
    values.iter().map(Tensor::to_leaf).collect()
}

/// The meta-loss after `STEPS` steps of the ordinary optimizer over `groups` from
/// `initial`; `at_step` may change the hyperparameters before a step.
fn objective<O: DifferentiableOptimizer>(
    case: &Case,
    initial: &[Tensor],
    groups: Vec<ParamGroup<O>>,
    at_step: &dyn Fn(usize, &mut Optimizer<O>),
) -> f64 {
    let mut params = leaves(initial);
    let mut opt = Optimizer::with_groups(params.len(), groups).unwrap();
    for t in 0..STEPS {
        at_step(t, &mut opt);
        let loss = case.support_loss(&params).unwrap();
        let grads = backward(&loss).unwrap();
        opt.step(&mut params, &grads).unwrap();
    }
    case.query_loss(&params).unwrap().to_scalar_f64().unwrap()
}

/// The derivative of `f` at 0 in the direction of one hyperparameter whose value is `v`:
/// the golden files' central difference with `h = 1e-6 max(|v|, 1e-3)`, except where
/// `v - h` would be negative (an unused `weight_decay` or `lr_decay` at 0, Adagrad's `eps`
/// of 1e-10). The optimizers reject negative values, as torch does, so there the
/// difference is one-sided: the three-point forward difference
/// `D(h) = (-3 f(0) + 4 f(h) - f(2h)) / 2h` (error `c2 h^2 + c3 h^3 + ..`) with two
/// Richardson steps, `R1(h) = (4 D(h/2) - D(h)) / 3` and `(8 R1(h/2) - R1(h)) / 7`
/// (error O(h^4)), at `h = 2e-6`. Adagrad's `initial_accumulator_value` at 0 is steep
/// enough (`sqrt(sum)` of small squared gradients) that one step is off by 2e-6 relative;
/// rounding noise, ~1e-9 absolute, rules out smaller `h`.
fn fd_hyper(f: &dyn Fn(f64) -> f64, v: f64) -> f64 {
    let h = 1e-6 * v.abs().max(1e-3);
    if v >= 0.0 && v < h {
        let f0 = f(0.0);
        let d = |h: f64| (-3.0 * f0 + 4.0 * f(h) - f(2.0 * h)) / (2.0 * h);
        let r1 = |h: f64| (4.0 * d(0.5 * h) - d(h)) / 3.0;
        (8.0 * r1(1e-6) - r1(2e-6)) / 7.0
    } else {
        (f(h) - f(-h)) / (2.0 * h)
    }
}

fn check(label: &str, what: &str, ours: &[f64], fd: &[f64]) {
    let scale = fd.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let err = ours
        .iter()
        .zip(fd)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f64, f64::max);
    println!("{label} {what}: max |ours - fd| = {err:.2e} (scale {scale:.2e})");
    let p = crate::common::precision();
    assert!(
        err <= p.reference_fd_tol * scale + p.reference_fd_abs,
        "{label} {what}: ours {ours:?} vs fd {fd:?}"
    );
}

/// FD of one optimizer over all weights and every float hyperparameter not in `skip`
/// (those whose value 0 selects a branch, like `momentum`, have no derivative there).
fn check_variant<O: DifferentiableOptimizer>(label: &str, opt: O, skip: &[&str]) {
    let case = case();
    let p0 = leaves(&case.initial());
    let reference = reference();
    let init = reference.initial();
    let names: Vec<&str> = O::FLOAT_NAMES
        .iter()
        .copied()
        .filter(|n| !skip.contains(n))
        .collect();
    let hypers: Vec<Tensor> = names
        .iter()
        .map(|n| Tensor::scalar(opt.float(n).unwrap()).to_leaf())
        .collect();
    let mut d = DiffOptimizer::new(opt.clone(), &p0).unwrap();
    let mut o = Overrides::new();
    for (n, t) in names.iter().zip(&hypers) {
        o = o.set(n, t.clone());
    }
    d.set_overrides(&o).unwrap();
    let mut p = p0.clone();
    for _ in 0..STEPS {
        let loss = case.support_loss(&p).unwrap();
        p = d.step_params(&loss, &p).unwrap();
    }
    let meta = case.query_loss(&p).unwrap();
    let mut inputs = p0.clone();
    inputs.extend(hypers.iter().cloned());
    let g = grad(&[meta], &inputs, GradOptions::default().allow_unused(true)).unwrap();
    let value = |i: usize| -> Vec<f64> {
        g[i].as_ref()
            .map(|t| t.to_vec_f64().unwrap())
            .unwrap_or_else(|| vec![0.0; inputs[i].elem_count()])
    };

    let one_group = |o: O| vec![ParamGroup::new(vec![0, 1, 2, 3], o)];
    let none = |_: usize, _: &mut Optimizer<O>| {};
    // Initial weights: every entry.
    let (mut ours, mut fd) = (Vec::new(), Vec::new());
    for (i, w) in init.iter().enumerate() {
        let vals = w.to_vec_f64().unwrap();
        ours.extend(value(i));
        for k in 0..vals.len() {
            let h = 1e-6;
            let shifted = |s: f64| {
                let mut v = vals.clone();
                v[k] += s;
                let mut ws = init.clone();
                ws[i] = Tensor::from_vec(v, w.dims(), w.device()).unwrap();
                objective(&reference, &ws, one_group(opt.clone()), &none)
            };
            fd.push((shifted(h) - shifted(-h)) / (2.0 * h));
        }
    }
    check(label, "initial weights", &ours, &fd);
    // Every hyperparameter.
    for (j, n) in names.iter().enumerate() {
        let v = opt.float(n).unwrap();
        let shifted = |s: f64| {
            let mut o = opt.clone();
            o.set_float(n, v + s).unwrap();
            objective(&reference, &init, one_group(o), &none)
        };
        let fd = fd_hyper(&shifted, v);
        check(label, n, &value(4 + j), &[fd]);
    }
}

macro_rules! fd_test {
    ($name:ident, $opt:expr) => {
        fd_test!($name, $opt, []);
    };
    ($name:ident, $opt:expr, [$($skip:literal),*]) => {
        #[test]
        fn $name() {
            check_variant(stringify!($name), $opt, &[$($skip),*]);
        }
    };
}

fd_test!(sgd_plain, Sgd::new(0.1), ["momentum", "dampening"]);
fd_test!(
    sgd_momentum,
    Sgd {
        momentum: 0.9,
        ..Sgd::new(0.1)
    }
);
fd_test!(
    sgd_momentum_dampening,
    Sgd {
        momentum: 0.9,
        dampening: 0.1,
        ..Sgd::new(0.1)
    }
);
fd_test!(
    sgd_nesterov_weight_decay,
    Sgd {
        momentum: 0.9,
        nesterov: true,
        weight_decay: 0.01,
        ..Sgd::new(0.1)
    },
    // Nesterov requires zero dampening (torch rejects any other value), so there is no
    // two-sided difference in it.
    ["dampening"]
);
fd_test!(adam_default, Adam::new(0.05));
fd_test!(
    adam_amsgrad,
    Adam {
        amsgrad: true,
        betas: (0.9, 0.9),
        ..Adam::new(0.05)
    }
);
fd_test!(
    adam_weight_decay,
    Adam {
        weight_decay: 0.01,
        ..Adam::new(0.05)
    }
);
fd_test!(adamw_default, AdamW::new(0.05));
fd_test!(
    adamw_amsgrad_weight_decay,
    AdamW {
        amsgrad: true,
        betas: (0.9, 0.9),
        weight_decay: 0.1,
        ..AdamW::new(0.05)
    }
);
fd_test!(adagrad_default, Adagrad::new(0.05));
fd_test!(
    adagrad_lr_decay_weight_decay_initial_accumulator,
    Adagrad {
        lr_decay: 0.01,
        weight_decay: 0.01,
        initial_accumulator_value: 0.1,
        ..Adagrad::new(0.05)
    }
);
fd_test!(adadelta_default, Adadelta::default());
fd_test!(
    adadelta_weight_decay,
    Adadelta {
        weight_decay: 0.01,
        ..Adadelta::new(0.5)
    }
);
fd_test!(adamax_default, Adamax::new(0.05));
fd_test!(
    adamax_weight_decay,
    Adamax {
        weight_decay: 0.01,
        ..Adamax::new(0.05)
    }
);
fd_test!(asgd_default, Asgd::new(0.1));
fd_test!(
    asgd_averaging_weight_decay,
    Asgd {
        t0: 1.5,
        lambd: 0.01,
        weight_decay: 0.01,
        ..Asgd::new(0.1)
    }
);
fd_test!(rmsprop_default, RmsProp::new(0.01), ["momentum"]);
fd_test!(
    rmsprop_centered,
    RmsProp {
        centered: true,
        ..RmsProp::new(0.01)
    },
    ["momentum"]
);
fd_test!(
    rmsprop_momentum,
    RmsProp {
        momentum: 0.9,
        ..RmsProp::new(0.01)
    }
);
fd_test!(
    rmsprop_centered_momentum_weight_decay,
    RmsProp {
        centered: true,
        momentum: 0.9,
        weight_decay: 0.01,
        ..RmsProp::new(0.01)
    }
);
fd_test!(rprop_default, Rprop::new(0.01));
// The step size grows 0.01 -> 0.012 where signs agree, and is clamped at 0.0115: the
// derivative w.r.t. the upper bound is non-zero.
fd_test!(
    rprop_clamped,
    Rprop {
        step_sizes: (1e-6, 0.0115),
        ..Rprop::new(0.01)
    }
);

/// Two parameter groups with their own Adam hyperparameters, each group's `lr` and `eps`
/// overridden by its own tensor and `betas.1` by one tensor shared by both.
#[test]
fn two_groups_with_per_group_overrides() {
    let case = case();
    let p0 = leaves(&case.initial());
    let reference = reference();
    let init = reference.initial();
    let (a, b) = (
        Adam::new(0.05),
        Adam {
            eps: 1e-6,
            ..Adam::new(0.02)
        },
    );
    let groups = |a: Adam, b: Adam| {
        vec![
            ParamGroup::new(vec![0, 1], a),
            ParamGroup::new(vec![2, 3], b),
        ]
    };
    let lr = [
        Tensor::scalar(0.05f64).to_leaf(),
        Tensor::scalar(0.02f64).to_leaf(),
    ];
    let eps = [
        Tensor::scalar(1e-8f64).to_leaf(),
        Tensor::scalar(1e-6f64).to_leaf(),
    ];
    let beta2 = Tensor::scalar(0.999f64).to_leaf();
    let mut d = DiffOptimizer::with_groups(&p0, groups(a.clone(), b.clone())).unwrap();
    d.set_overrides(
        &Overrides::new()
            .per_group("lr", lr.clone())
            .per_group("eps", eps.clone())
            .set("betas.1", beta2.clone()),
    )
    .unwrap();
    let mut p = p0.clone();
    for _ in 0..STEPS {
        let loss = case.support_loss(&p).unwrap();
        p = d.step_params(&loss, &p).unwrap();
    }
    let meta = case.query_loss(&p).unwrap();
    let mut inputs = p0.clone();
    inputs.extend(lr.iter().chain(&eps).cloned());
    inputs.push(beta2.clone());
    let g = grad(&[meta], &inputs, GradOptions::default()).unwrap();
    let g: Vec<f64> = g[4..]
        .iter()
        .map(|t| t.as_ref().unwrap().to_scalar_f64().unwrap())
        .collect();
    let none = |_: usize, _: &mut Optimizer<Adam>| {};
    let fd = |set: &dyn Fn(&mut Adam, &mut Adam, f64), v: f64| {
        let f = |s: f64| {
            let (mut a, mut b) = (a.clone(), b.clone());
            set(&mut a, &mut b, s);
            objective(&reference, &init, groups(a, b), &none)
        };
        fd_hyper(&f, v)
    };
    check(
        "two groups",
        "lr of group 0",
        &[g[0]],
        &[fd(&|a, _, s| a.lr += s, 0.05)],
    );
    check(
        "two groups",
        "lr of group 1",
        &[g[1]],
        &[fd(&|_, b, s| b.lr += s, 0.02)],
    );
    check(
        "two groups",
        "eps of group 0",
        &[g[2]],
        &[fd(&|a, _, s| a.eps += s, 1e-8)],
    );
    check(
        "two groups",
        "eps of group 1",
        &[g[3]],
        &[fd(&|_, b, s| b.eps += s, 1e-6)],
    );
    let both = |a: &mut Adam, b: &mut Adam, s: f64| {
        a.betas.1 += s;
        b.betas.1 += s;
    };
    check("two groups", "shared betas.1", &[g[4]], &[fd(&both, 0.999)]);
}

/// An override given at step 2 (of 3) replaces `lr` and `momentum` from then on: the
/// meta-gradient w.r.t. those tensors covers steps 2 and 3 only.
#[test]
fn override_given_at_a_step() {
    let case = case();
    let p0 = leaves(&case.initial());
    let reference = reference();
    let init = reference.initial();
    let base = Sgd {
        momentum: 0.5,
        ..Sgd::new(0.1)
    };
    let (lr, momentum) = (
        Tensor::scalar(0.07f64).to_leaf(),
        Tensor::scalar(0.8f64).to_leaf(),
    );
    let mut d = DiffOptimizer::new(base.clone(), &p0).unwrap();
    let mut p = p0.clone();
    for t in 0..STEPS {
        let loss = case.support_loss(&p).unwrap();
        let options = if t == 1 {
            StepOptions::new().overrides(
                Overrides::new()
                    .set("lr", lr.clone())
                    .set("momentum", momentum.clone()),
            )
        } else {
            StepOptions::new()
        };
        p = d.step_params_with(&loss, &p, options).unwrap();
    }
    let meta = case.query_loss(&p).unwrap();
    let g = grad(&[meta], &[lr, momentum], GradOptions::default()).unwrap();
    let g: Vec<f64> = g
        .iter()
        .map(|t| t.as_ref().unwrap().to_scalar_f64().unwrap())
        .collect();
    let fd = |name: &str, v: f64| {
        let f = |s: f64| {
            let at_step = |t: usize, opt: &mut Optimizer<Sgd>| {
                if t == 1 {
                    let hp = &mut opt.groups_mut()[0].hyperparameters;
                    hp.lr = 0.07;
                    hp.momentum = 0.8;
                    let cur = hp.float(name).unwrap();
                    hp.set_float(name, cur + s).unwrap();
                }
            };
            objective(
                &reference,
                &init,
                vec![ParamGroup::new(vec![0, 1, 2, 3], base.clone())],
                &at_step,
            )
        };
        fd_hyper(&f, v)
    };
    check("override at step 2", "lr", &[g[0]], &[fd("lr", 0.07)]);
    check(
        "override at step 2",
        "momentum",
        &[g[1]],
        &[fd("momentum", 0.8)],
    );
}
