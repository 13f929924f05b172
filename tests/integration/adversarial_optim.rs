//! Optimizers under adversarial input (issue 9, section 5).
//!
//! - Invalid hyperparameters are rejected where torch.optim raises, for every built-in and
//!   every checked hyperparameter, on every path: `Optimizer::new` / `with_groups`,
//!   `DiffOptimizer::new` / `with_groups` / `from_optimizer`, `innerloop`, a change through
//!   `groups_mut` before the next step, and overrides (floats, tensors by their value, per
//!   group, per step, at `innerloop`). Boundary values torch accepts are accepted.
//! - Empty parameter lists and empty groups are rejected.
//! - State tensors are checked against their parameter's shape (a state made for other
//!   shapes would broadcast), at every step and when branching.
//! - A failing call changes nothing: every test that expects an error also compares the
//!   parameters, states, hyperparameters and the fmodel's time with a snapshot, bit for bit,
//!   and where it matters checks that the next successful call gives exactly what it would
//!   have given without the failure.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_higher::nn::{self, Module, Parameters, Visitor};
use candle_higher::optim::{
    grad_callback, Adadelta, Adagrad, Adam, AdamW, Adamax, Asgd, DiffOptimizer, Optimizer,
    Overrides, ParamGroup, RmsProp, Rprop, Sgd, StepOptions,
};
use candle_higher::{
    backward, differentiable_optimizer, innerloop, DType, DifferentiableOptimizer, Error,
    FunctionalModel, FunctionalOptions, Hyperparameters, InnerloopOptions, Result, State,
    StateValue, Tensor,
};

// ---------------------------------------------------------------- snapshots, bit for bit

/// A tensor's shape and the bits of its values.
type Bits = (Vec<usize>, Vec<u64>);

/// A tensor as its shape and the bits of its values (f32 values widen to f64 exactly).
fn bits(t: &Tensor) -> Bits {
    let values = t.to_vec_f64().unwrap();
    (
        t.dims().to_vec(),
        values.iter().map(|x| x.to_bits()).collect(),
    )
}

fn params_bits(params: &[Tensor]) -> Vec<Bits> {
    params.iter().map(bits).collect()
}

#[derive(Debug, PartialEq)]
enum EntryBits {
    Tensor(Vec<usize>, Vec<u64>),
    Scalar(u64),
    Int(i64),
}

fn states_bits(states: &[State]) -> Vec<Vec<(String, EntryBits)>> {
    states
        .iter()
        .map(|s| {
            s.entries()
                .map(|(k, v)| {
                    let v = match &v {
                        StateValue::Tensor(t) => {
                            let (d, b) = bits(t);
                            EntryBits::Tensor(d, b)
                        }
                        StateValue::Scalar(s) => EntryBits::Scalar(s.value().to_bits()),
                        StateValue::Int(n) => EntryBits::Int(*n),
                    };
                    (k.to_string(), v)
                })
                .collect()
        })
        .collect()
}

/// Every float hyperparameter of every group of a diffopt, by value bits.
fn twin_bits<O: DifferentiableOptimizer>(d: &DiffOptimizer<O>) -> Vec<Vec<u64>> {
    (0..d.n_groups())
        .map(|g| {
            O::FLOAT_NAMES
                .iter()
                .map(|n| d.hyperparameter(g, n).unwrap().value().to_bits())
                .collect()
        })
        .collect()
}

fn err_of<T>(result: Result<T>) -> Error {
    match result {
        Ok(_) => panic!("expected an error, got Ok"),
        Err(e) => e,
    }
}

/// `error` is `InvalidHyperparameter` for `name` with `value` (NaN matches NaN) in `group`.
fn assert_invalid(error: Error, name: &str, value: f64, group: Option<usize>) {
    match error {
        Error::InvalidHyperparameter {
            name: n,
            value: v,
            group: g,
            ..
        } => {
            assert_eq!(n, name);
            assert!(
                v.to_bits() == value.to_bits() || (v.is_nan() && value.is_nan()),
                "{name}: reported {v}, expected {value}"
            );
            assert_eq!(g, group, "{name}");
        }
        other => panic!("expected an invalid {name}, got {other}"),
    }
}

// ---------------------------------------------------------------- the problem

/// Two parameters with the shapes of `nn::linear(2, 3)`: weight `[3, 2]`, bias `[3]`.
fn params() -> Vec<Tensor> {
    let dev = crate::common::device();
    vec![
        Tensor::from_vec(vec![0.3f64, -0.2, 0.5, 0.1, -0.4, 0.25], &[3, 2], &dev)
            .unwrap()
            .to_leaf(),
        Tensor::from_vec(vec![0.05f64, -0.1, 0.2], &[3], &dev)
            .unwrap()
            .to_leaf(),
    ]
}

fn data() -> (Tensor, Tensor) {
    let dev = crate::common::device();
    let x = Tensor::from_vec(
        vec![1.0f64, -2.0, 0.5, 3.0, -1.5, 0.25, 2.0, 1.0],
        &[4, 2],
        &dev,
    )
    .unwrap();
    let y = Tensor::from_vec(
        vec![
            1.0f64, -1.0, 2.0, 0.5, 0.0, 1.5, -0.5, 1.0, 0.25, 2.0, -1.0, 0.0,
        ],
        &[4, 3],
        &dev,
    )
    .unwrap();
    (x, y)
}

/// The mean squared error of the linear model with weights `params`.
fn loss(params: &[Tensor]) -> Tensor {
    let (x, y) = data();
    let pred = x
        .matmul(&params[0].t().unwrap())
        .unwrap()
        .add(&params[1])
        .unwrap();
    nn::mse(&pred, &y).unwrap()
}

fn model() -> nn::Linear {
    let vb = nn::VarBuilder::new(7, DType::F64, &crate::common::device());
    let mut m = nn::linear(2, 3, vb).unwrap();
    m.set_parameters(&params()).unwrap();
    m
}

fn fmodel_loss<M: Module + Parameters + Clone>(f: &FunctionalModel<M>) -> Tensor {
    let (x, y) = data();
    nn::mse(&f.forward(&x).unwrap(), &y).unwrap()
}

/// An ordinary optimizer over [`params`] that has taken one step, and the parameters.
fn stepped<O: DifferentiableOptimizer>(opt: O) -> (Optimizer<O>, Vec<Tensor>) {
    let mut ps = params();
    let mut o = Optimizer::new(opt, ps.len()).unwrap();
    let g = backward(&loss(&ps)).unwrap();
    o.step(&mut ps, &g).unwrap();
    (o, ps)
}

/// A diffopt over [`params`] that has taken one step, and the parameters.
fn diff_stepped<O: DifferentiableOptimizer>(opt: O) -> (DiffOptimizer<O>, Vec<Tensor>) {
    let p0 = params();
    let mut d = DiffOptimizer::new(opt, &p0).unwrap();
    let ps = d.step_params(&loss(&p0), &p0).unwrap();
    (d, ps)
}

// ---------------------------------------------------------------- invalid hyperparameters

/// The overrides that turn `good` into `bad`: every float whose value differs.
fn overrides_to<O: Hyperparameters>(good: &O, bad: &O) -> Vec<(&'static str, f64, f64)> {
    O::FLOAT_NAMES
        .iter()
        .filter_map(|&n| {
            let (g, b) = (good.float(n).unwrap(), bad.float(n).unwrap());
            (g.to_bits() != b.to_bits()).then_some((n, g, b))
        })
        .collect()
}

/// `bad` differs from `good` (same flags) in floats only, and is invalid in `name`, which
/// is reported with `value`. Checks every way `bad` can reach an optimizer.
fn rejected_everywhere<O: DifferentiableOptimizer>(good: O, bad: O, name: &str, value: f64) {
    let label = format!("{name} = {value}");
    let n = params().len();
    // Construction.
    assert_invalid(err_of(Optimizer::new(bad.clone(), n)), name, value, Some(0));
    let two = |a: &O, b: &O| {
        vec![
            ParamGroup::new(vec![0], a.clone()),
            ParamGroup::new(vec![1], b.clone()),
        ]
    };
    assert_invalid(
        err_of(Optimizer::with_groups(n, two(&good, &bad))),
        name,
        value,
        Some(1),
    );
    assert_invalid(
        err_of(DiffOptimizer::new(bad.clone(), &params())),
        name,
        value,
        Some(0),
    );
    assert_invalid(
        err_of(DiffOptimizer::with_groups(&params(), two(&good, &bad))),
        name,
        value,
        Some(1),
    );

    // A change through groups_mut: the next step fails and changes nothing, and branching
    // from the changed optimizer fails.
    let (mut opt, mut ps) = stepped(good.clone());
    let (before_p, before_s) = (params_bits(&ps), states_bits(opt.states()));
    opt.groups_mut()[0].hyperparameters = bad.clone();
    let g = backward(&loss(&ps)).unwrap();
    assert_invalid(err_of(opt.step(&mut ps, &g)), name, value, Some(0));
    assert_eq!(
        params_bits(&ps),
        before_p,
        "{label}: params after a failed step"
    );
    assert_eq!(
        states_bits(opt.states()),
        before_s,
        "{label}: states after a failed step"
    );
    assert_invalid(
        err_of(DiffOptimizer::from_optimizer(&opt, &ps)),
        name,
        value,
        Some(0),
    );
    assert_invalid(
        err_of(innerloop(&model(), &opt, InnerloopOptions::new())),
        name,
        value,
        Some(0),
    );

    // Overrides, as floats and as tensors, for all groups, per group, per step.
    let changes = overrides_to(&good, &bad);
    assert!(
        !changes.is_empty(),
        "{label}: bad differs from good in floats"
    );
    let as_floats = changes
        .iter()
        .fold(Overrides::new(), |o, &(n, _, b)| o.set(n, b));
    let as_tensors = changes.iter().fold(Overrides::new(), |o, &(n, _, b)| {
        o.set(n, Tensor::scalar(b).to_leaf())
    });
    let per_group = changes
        .iter()
        .fold(Overrides::new(), |o, &(n, g, b)| o.per_group(n, [g, b]));
    for overrides in [&as_floats, &as_tensors] {
        let (mut d, ps) = diff_stepped(good.clone());
        let (twins, states) = (twin_bits(&d), states_bits(d.states()));
        assert_invalid(err_of(d.set_overrides(overrides)), name, value, Some(0));
        assert_eq!(
            twin_bits(&d),
            twins,
            "{label}: hyperparameters after a failed override"
        );
        assert_eq!(states_bits(d.states()), states, "{label}");

        // Per step: the step fails, the override does not persist, and the next step is
        // the one a copy taken before the failure takes.
        let mut copy = d.clone();
        let options = StepOptions::new().overrides(overrides.clone());
        assert_invalid(
            err_of(d.step_params_with(&loss(&ps), &ps, options)),
            name,
            value,
            Some(0),
        );
        assert_eq!(
            twin_bits(&d),
            twins,
            "{label}: a failed step's override persisted"
        );
        assert_eq!(
            states_bits(d.states()),
            states,
            "{label}: states after a failed step"
        );
        let next = d.step_params(&loss(&ps), &ps).unwrap();
        let expected = copy.step_params(&loss(&ps), &ps).unwrap();
        assert_eq!(params_bits(&next), params_bits(&expected), "{label}");
        assert_eq!(
            states_bits(d.states()),
            states_bits(copy.states()),
            "{label}"
        );

        // At innerloop, and at a step of the fmodel.
        let options = InnerloopOptions::new().overrides(overrides.clone());
        let base = Optimizer::new(good.clone(), n).unwrap();
        assert_invalid(
            err_of(innerloop(&model(), &base, options)),
            name,
            value,
            Some(0),
        );
        let (mut fmodel, mut diffopt) =
            innerloop(&model(), &base, InnerloopOptions::new()).unwrap();
        let l = fmodel_loss(&fmodel);
        diffopt.step(&mut fmodel, &l).unwrap();
        let (time, fast) = (fmodel.time(), params_bits(fmodel.fast_params()));
        let (twins, states) = (twin_bits(&diffopt), states_bits(diffopt.states()));
        let options = StepOptions::new().overrides(overrides.clone());
        let l = fmodel_loss(&fmodel);
        assert_invalid(
            err_of(diffopt.step_with(&mut fmodel, &l, options)),
            name,
            value,
            Some(0),
        );
        assert_eq!(fmodel.time(), time, "{label}: the fmodel's time advanced");
        assert_eq!(params_bits(fmodel.fast_params()), fast, "{label}");
        assert_eq!(twin_bits(&diffopt), twins, "{label}");
        assert_eq!(states_bits(diffopt.states()), states, "{label}");
    }
    let groups = vec![
        ParamGroup::new(vec![0], good.clone()),
        ParamGroup::new(vec![1], good.clone()),
    ];
    let mut d = DiffOptimizer::with_groups(&params(), groups).unwrap();
    let twins = twin_bits(&d);
    assert_invalid(err_of(d.set_overrides(&per_group)), name, value, Some(1));
    assert_eq!(twin_bits(&d), twins, "{label}: per-group override");
}

/// `opt` is accepted everywhere and steps.
fn accepted<O: DifferentiableOptimizer>(opt: O) {
    let (mut o, mut ps) = stepped(opt.clone());
    let g = backward(&loss(&ps)).unwrap();
    o.step(&mut ps, &g).unwrap();
    let mut d = DiffOptimizer::new(opt.clone(), &params()).unwrap();
    let same = O::FLOAT_NAMES.iter().fold(Overrides::new(), |ov, &n| {
        ov.set(n, Tensor::scalar(opt.float(n).unwrap()).to_leaf())
    });
    d.set_overrides(&same).unwrap();
    let p0 = params();
    d.step_params(&loss(&p0), &p0).unwrap();
}

#[test]
fn sgd_rejects_what_torch_rejects() {
    let good = Sgd {
        momentum: 0.9,
        weight_decay: 0.01,
        ..Sgd::new(0.1)
    };
    let nesterov = Sgd {
        nesterov: true,
        ..good.clone()
    };
    let cases = [
        (
            good.clone(),
            Sgd {
                lr: -0.1,
                ..good.clone()
            },
            "lr",
            -0.1,
        ),
        (
            good.clone(),
            Sgd {
                lr: f64::NAN,
                ..good.clone()
            },
            "lr",
            f64::NAN,
        ),
        (
            good.clone(),
            Sgd {
                momentum: -0.5,
                ..good.clone()
            },
            "momentum",
            -0.5,
        ),
        (
            good.clone(),
            Sgd {
                weight_decay: -1e-4,
                ..good.clone()
            },
            "weight_decay",
            -1e-4,
        ),
        // Not checked by torch except through the NaN check every float gets.
        (
            good.clone(),
            Sgd {
                dampening: f64::NAN,
                ..good.clone()
            },
            "dampening",
            f64::NAN,
        ),
        // Nesterov needs a momentum and zero dampening.
        (
            nesterov.clone(),
            Sgd {
                momentum: 0.0,
                ..nesterov.clone()
            },
            "momentum",
            0.0,
        ),
        (
            nesterov.clone(),
            Sgd {
                dampening: 0.1,
                ..nesterov.clone()
            },
            "dampening",
            0.1,
        ),
    ];
    for (good, bad, name, value) in cases {
        rejected_everywhere(good, bad, name, value);
    }
    accepted(Sgd::new(0.0));
    accepted(nesterov);
    accepted(Sgd {
        dampening: 1.0,
        ..good
    });
}

#[test]
fn adam_family_rejects_betas_outside_zero_one_and_negative_values() {
    let adam = Adam::new(0.01);
    for (bad, name, value) in [
        (
            Adam {
                lr: -1e-3,
                ..adam.clone()
            },
            "lr",
            -1e-3,
        ),
        (
            Adam {
                eps: -1e-8,
                ..adam.clone()
            },
            "eps",
            -1e-8,
        ),
        (
            Adam {
                betas: (1.0, 0.999),
                ..adam.clone()
            },
            "betas.0",
            1.0,
        ),
        (
            Adam {
                betas: (-0.1, 0.999),
                ..adam.clone()
            },
            "betas.0",
            -0.1,
        ),
        (
            Adam {
                betas: (0.9, 1.0),
                ..adam.clone()
            },
            "betas.1",
            1.0,
        ),
        (
            Adam {
                betas: (0.9, 1.5),
                ..adam.clone()
            },
            "betas.1",
            1.5,
        ),
        (
            Adam {
                betas: (0.9, f64::NAN),
                ..adam.clone()
            },
            "betas.1",
            f64::NAN,
        ),
        (
            Adam {
                weight_decay: -0.1,
                ..adam.clone()
            },
            "weight_decay",
            -0.1,
        ),
    ] {
        rejected_everywhere(adam.clone(), bad, name, value);
    }
    let amsgrad = Adam {
        amsgrad: true,
        ..adam.clone()
    };
    rejected_everywhere(
        amsgrad.clone(),
        Adam {
            betas: (0.9, -1e-12),
            ..amsgrad
        },
        "betas.1",
        -1e-12,
    );
    accepted(Adam {
        betas: (0.0, 0.0),
        eps: 0.0,
        ..adam
    });

    let adamw = AdamW::new(0.01);
    for (bad, name, value) in [
        (
            AdamW {
                lr: -1.0,
                ..adamw.clone()
            },
            "lr",
            -1.0,
        ),
        (
            AdamW {
                betas: (1.0, 0.999),
                ..adamw.clone()
            },
            "betas.0",
            1.0,
        ),
        (
            AdamW {
                betas: (0.9, 2.0),
                ..adamw.clone()
            },
            "betas.1",
            2.0,
        ),
        (
            AdamW {
                eps: -1.0,
                ..adamw.clone()
            },
            "eps",
            -1.0,
        ),
        (
            AdamW {
                weight_decay: -0.01,
                ..adamw.clone()
            },
            "weight_decay",
            -0.01,
        ),
    ] {
        rejected_everywhere(adamw.clone(), bad, name, value);
    }
    accepted(AdamW {
        weight_decay: 0.0,
        ..adamw
    });

    let adamax = Adamax::new(0.01);
    for (bad, name, value) in [
        (
            Adamax {
                lr: -0.01,
                ..adamax.clone()
            },
            "lr",
            -0.01,
        ),
        (
            Adamax {
                betas: (0.9, 1.0),
                ..adamax.clone()
            },
            "betas.1",
            1.0,
        ),
        (
            Adamax {
                betas: (-0.5, 0.999),
                ..adamax.clone()
            },
            "betas.0",
            -0.5,
        ),
        (
            Adamax {
                eps: -1e-8,
                ..adamax.clone()
            },
            "eps",
            -1e-8,
        ),
        (
            Adamax {
                weight_decay: -2.0,
                ..adamax.clone()
            },
            "weight_decay",
            -2.0,
        ),
    ] {
        rejected_everywhere(adamax.clone(), bad, name, value);
    }
}

#[test]
fn adagrad_adadelta_rmsprop_asgd_reject_what_torch_rejects() {
    let adagrad = Adagrad {
        lr_decay: 0.01,
        ..Adagrad::new(0.1)
    };
    for (bad, name, value) in [
        (
            Adagrad {
                lr: -0.01,
                ..adagrad.clone()
            },
            "lr",
            -0.01,
        ),
        (
            Adagrad {
                lr_decay: -0.1,
                ..adagrad.clone()
            },
            "lr_decay",
            -0.1,
        ),
        (
            Adagrad {
                initial_accumulator_value: -0.1,
                ..adagrad.clone()
            },
            "initial_accumulator_value",
            -0.1,
        ),
        (
            Adagrad {
                eps: -1e-10,
                ..adagrad.clone()
            },
            "eps",
            -1e-10,
        ),
        (
            Adagrad {
                weight_decay: -1.0,
                ..adagrad.clone()
            },
            "weight_decay",
            -1.0,
        ),
    ] {
        rejected_everywhere(adagrad.clone(), bad, name, value);
    }
    accepted(Adagrad {
        eps: 0.0,
        lr_decay: 0.0,
        ..adagrad
    });

    let adadelta = Adadelta::new(1.0);
    for (bad, name, value) in [
        (
            Adadelta {
                rho: 1.1,
                ..adadelta.clone()
            },
            "rho",
            1.1,
        ),
        (
            Adadelta {
                rho: -0.1,
                ..adadelta.clone()
            },
            "rho",
            -0.1,
        ),
        (
            Adadelta {
                lr: -1.0,
                ..adadelta.clone()
            },
            "lr",
            -1.0,
        ),
        (
            Adadelta {
                eps: -1e-6,
                ..adadelta.clone()
            },
            "eps",
            -1e-6,
        ),
        (
            Adadelta {
                weight_decay: -1.0,
                ..adadelta.clone()
            },
            "weight_decay",
            -1.0,
        ),
    ] {
        rejected_everywhere(adadelta.clone(), bad, name, value);
    }
    // rho is in the closed interval [0, 1], as torch.
    accepted(Adadelta {
        rho: 0.0,
        ..adadelta.clone()
    });
    accepted(Adadelta {
        rho: 1.0,
        ..adadelta
    });

    let rmsprop = RmsProp {
        momentum: 0.5,
        centered: true,
        ..RmsProp::new(0.01)
    };
    for (bad, name, value) in [
        (
            RmsProp {
                alpha: -0.1,
                ..rmsprop.clone()
            },
            "alpha",
            -0.1,
        ),
        (
            RmsProp {
                momentum: -0.9,
                ..rmsprop.clone()
            },
            "momentum",
            -0.9,
        ),
        (
            RmsProp {
                eps: -1.0,
                ..rmsprop.clone()
            },
            "eps",
            -1.0,
        ),
        (
            RmsProp {
                lr: -1.0,
                ..rmsprop.clone()
            },
            "lr",
            -1.0,
        ),
        (
            RmsProp {
                weight_decay: -1.0,
                ..rmsprop.clone()
            },
            "weight_decay",
            -1.0,
        ),
    ] {
        rejected_everywhere(rmsprop.clone(), bad, name, value);
    }
    accepted(RmsProp {
        alpha: 0.0,
        ..rmsprop
    });

    let asgd = Asgd::new(0.01);
    for (bad, name, value) in [
        (
            Asgd {
                lr: -0.01,
                ..asgd.clone()
            },
            "lr",
            -0.01,
        ),
        (
            Asgd {
                weight_decay: -1.0,
                ..asgd.clone()
            },
            "weight_decay",
            -1.0,
        ),
        // torch checks neither; NaN is still caught.
        (
            Asgd {
                lambd: f64::NAN,
                ..asgd.clone()
            },
            "lambd",
            f64::NAN,
        ),
        (
            Asgd {
                alpha: f64::NAN,
                ..asgd.clone()
            },
            "alpha",
            f64::NAN,
        ),
        (
            Asgd {
                t0: f64::NAN,
                ..asgd.clone()
            },
            "t0",
            f64::NAN,
        ),
    ] {
        rejected_everywhere(asgd.clone(), bad, name, value);
    }
}

#[test]
fn rprop_rejects_etas_out_of_order_and_crossed_step_sizes() {
    let rprop = Rprop::new(0.01);
    for (bad, name, value) in [
        (
            Rprop {
                lr: -0.01,
                ..rprop.clone()
            },
            "lr",
            -0.01,
        ),
        // 0 < eta_minus < 1 < eta_plus.
        (
            Rprop {
                etas: (1.0, 1.2),
                ..rprop.clone()
            },
            "etas.0",
            1.0,
        ),
        (
            Rprop {
                etas: (0.0, 1.2),
                ..rprop.clone()
            },
            "etas.0",
            0.0,
        ),
        (
            Rprop {
                etas: (-0.5, 1.2),
                ..rprop.clone()
            },
            "etas.0",
            -0.5,
        ),
        (
            Rprop {
                etas: (0.5, 1.0),
                ..rprop.clone()
            },
            "etas.1",
            1.0,
        ),
        (
            Rprop {
                etas: (0.5, 0.9),
                ..rprop.clone()
            },
            "etas.1",
            0.9,
        ),
        // 0 <= min <= max.
        (
            Rprop {
                step_sizes: (-1.0, 50.0),
                ..rprop.clone()
            },
            "step_sizes.0",
            -1.0,
        ),
        (
            Rprop {
                step_sizes: (1.0, 0.5),
                ..rprop.clone()
            },
            "step_sizes.1",
            0.5,
        ),
    ] {
        rejected_everywhere(rprop.clone(), bad, name, value);
    }
    accepted(Rprop {
        step_sizes: (0.0, 0.0),
        etas: (1e-9, 1.0 + 1e-9),
        ..rprop
    });
}

#[test]
fn hyperparameter_errors_read_like_torch() {
    let e = err_of(Optimizer::new(Sgd::new(-0.1), 1));
    assert_eq!(
        e.to_string(),
        "Sgd: invalid lr: -0.1 in parameter group 0; expected >= 0"
    );
    let e = err_of(Optimizer::new(
        Adam {
            betas: (0.9, 1.0),
            ..Adam::new(0.1)
        },
        1,
    ));
    assert_eq!(
        e.to_string(),
        "Adam: invalid betas.1: 1 in parameter group 0; expected in [0, 1)"
    );
    let e = err_of(Optimizer::new(
        Rprop {
            etas: (0.5, 1.0),
            ..Rprop::new(0.1)
        },
        1,
    ));
    assert_eq!(
        e.to_string(),
        "Rprop: invalid etas.1: 1 in parameter group 0; expected > 1"
    );
}

#[test]
fn apply_to_writes_nothing_the_ordinary_optimizer_rejects() {
    // apply_to (higher's apply_trainable_opt_params) writes the twin's floats into an
    // ordinary optimizer, whose flags may differ: momentum 0 into a Nesterov SGD is
    // invalid, and the ordinary optimizer keeps all its values (the lr too).
    let p0 = params();
    let d = DiffOptimizer::new(Sgd::new(0.3), &p0).unwrap();
    let nesterov = Sgd {
        momentum: 0.9,
        nesterov: true,
        ..Sgd::new(0.1)
    };
    let mut opt = Optimizer::new(nesterov.clone(), p0.len()).unwrap();
    assert_invalid(err_of(d.apply_to(&mut opt)), "momentum", 0.0, Some(0));
    assert!(opt.groups()[0].hyperparameters == nesterov);
}

// ---------------------------------------------------------------- empty parameter lists

#[test]
fn no_parameters_or_an_empty_group_is_rejected() {
    let no_params = |e: Error, group: Option<usize>| match e {
        Error::NoParameters { group: g, .. } => assert_eq!(g, group),
        other => panic!("expected no parameters, got {other}"),
    };
    no_params(err_of(Optimizer::new(Sgd::new(0.1), 0)), None);
    no_params(err_of(Optimizer::<Sgd>::with_groups(3, vec![])), None);
    no_params(err_of(Optimizer::<Sgd>::with_groups(0, vec![])), None);
    let with_empty = vec![
        ParamGroup::new(vec![0, 1], Sgd::new(0.1)),
        ParamGroup::new(vec![], Sgd::new(0.1)),
    ];
    no_params(
        err_of(Optimizer::with_groups(3, with_empty.clone())),
        Some(1),
    );
    no_params(err_of(DiffOptimizer::new(Adam::new(0.1), &[])), None);
    no_params(
        err_of(DiffOptimizer::<Adam>::with_groups(&params(), vec![])),
        None,
    );
    let p3 = vec![params()[1].clone(); 3];
    no_params(err_of(DiffOptimizer::with_groups(&p3, with_empty)), Some(1));
    // A model without parameters has nothing to optimize either.
    let empty = nn::seq().add(nn::Activation::Tanh);
    no_params(
        err_of(Optimizer::new(
            Sgd::new(0.1),
            empty.parameters().unwrap().len(),
        )),
        None,
    );
}

// ---------------------------------------------------------------- state shapes

fn assert_state_shape(e: Error, state: &State, param: usize, param_shape: &[usize]) {
    match e {
        Error::StateShape {
            param: i,
            entry,
            param_shape: p,
            state_shape,
            ..
        } => {
            assert_eq!(i, param);
            assert_eq!(p, param_shape);
            // The entry named exists in the state, with the shape reported.
            let held = state
                .entries()
                .find(|(k, _)| *k == entry)
                .unwrap_or_else(|| panic!("no entry {entry}"));
            match held.1 {
                StateValue::Tensor(t) => assert_eq!(t.dims(), state_shape.as_slice()),
                other => panic!("{entry} is not a tensor: {other:?}"),
            }
            assert_ne!(state_shape, param_shape);
        }
        other => panic!("expected a state shape error, got {other}"),
    }
}

fn leaf(shape: &[usize], seed: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|i| seed + 0.1 * i as f64).collect();
    Tensor::from_vec(v, shape, &crate::common::device())
        .unwrap()
        .to_leaf()
}

/// A state made on `made` stepped with parameters of shape `used`: the ordinary and the
/// differentiable optimizer reject it and change nothing.
fn state_of_other_shape_rejected<O: DifferentiableOptimizer>(
    opt: O,
    made: &[usize],
    used: &[usize],
) {
    let label = format!("{} {made:?} -> {used:?}", std::any::type_name::<O>());
    let mut ps = vec![leaf(made, 0.5)];
    let mut o = Optimizer::new(opt.clone(), 1).unwrap();
    let g = backward(&ps[0].sqr().unwrap().sum_all().unwrap()).unwrap();
    o.step(&mut ps, &g).unwrap();
    let states = states_bits(o.states());
    let mut other = vec![leaf(used, -0.5)];
    let before = params_bits(&other);
    let g = backward(&other[0].sqr().unwrap().sum_all().unwrap()).unwrap();
    let e = err_of(o.step(&mut other, &g));
    assert_state_shape(e, &o.states()[0], 0, used);
    assert_eq!(params_bits(&other), before, "{label}");
    assert_eq!(states_bits(o.states()), states, "{label}");
    // Branching from it.
    let e = err_of(DiffOptimizer::from_optimizer(&o, &other));
    assert_state_shape(e, &o.states()[0], 0, used);
    // The diffopt: its own state from `made`, then parameters of shape `used`.
    let p0 = vec![leaf(made, 0.5)];
    let mut d = DiffOptimizer::new(opt, &p0).unwrap();
    d.step_params(&p0[0].sqr().unwrap().sum_all().unwrap(), &p0)
        .unwrap();
    let states = states_bits(d.states());
    let e = err_of(d.step_params(&other[0].sqr().unwrap().sum_all().unwrap(), &other));
    assert_state_shape(e, &d.states()[0], 0, used);
    assert_eq!(states_bits(d.states()), states, "{label}");
}

#[test]
fn every_builtin_rejects_a_state_of_other_shapes() {
    // The case ([1, 4] params on a [4, 4] state), the other way round (which would
    // broadcast the state and keep the parameter's shape), and same count, other shape.
    for (made, used) in [
        (&[4, 4][..], &[1, 4][..]),
        (&[1, 4], &[4, 4]),
        (&[4], &[4, 1]),
        (&[2, 3], &[3, 2]),
    ] {
        state_of_other_shape_rejected(
            Sgd {
                momentum: 0.9,
                ..Sgd::new(0.1)
            },
            made,
            used,
        );
        state_of_other_shape_rejected(
            Adam {
                amsgrad: true,
                ..Adam::new(0.1)
            },
            made,
            used,
        );
        state_of_other_shape_rejected(AdamW::new(0.1), made, used);
        state_of_other_shape_rejected(Adamax::new(0.1), made, used);
        state_of_other_shape_rejected(Adagrad::new(0.1), made, used);
        state_of_other_shape_rejected(Adadelta::new(1.0), made, used);
        state_of_other_shape_rejected(Asgd::new(0.1), made, used);
        state_of_other_shape_rejected(
            RmsProp {
                centered: true,
                momentum: 0.5,
                ..RmsProp::new(0.1)
            },
            made,
            used,
        );
        state_of_other_shape_rejected(Rprop::new(0.1), made, used);
    }
}

#[test]
fn states_set_or_branched_from_other_shapes_are_rejected() {
    // set_states with states made for other parameters: the next step says which.
    let (other_opt, _) = stepped(Adam::new(0.1));
    let mut opt = Optimizer::new(Adam::new(0.1), 2).unwrap();
    let swapped = vec![other_opt.states()[1].clone(), other_opt.states()[0].clone()];
    opt.set_states(swapped).unwrap();
    let mut ps = params();
    let before = params_bits(&ps);
    let g = backward(&loss(&ps)).unwrap();
    let e = err_of(opt.step(&mut ps, &g));
    assert_state_shape(e, &opt.states()[0], 0, &[3, 2]);
    assert_eq!(params_bits(&ps), before);

    // innerloop from an optimizer stepped on a model of other shapes (same count).
    let vb = nn::VarBuilder::new(1, DType::F64, &crate::common::device());
    let transposed = nn::linear(3, 2, vb).unwrap();
    let mut opt = Optimizer::new(
        Sgd {
            momentum: 0.9,
            ..Sgd::new(0.1)
        },
        2,
    )
    .unwrap();
    let mut tp = transposed.parameters().unwrap();
    let x = Tensor::from_vec(vec![1.0f64, 2.0, 3.0], &[1, 3], &crate::common::device()).unwrap();
    let g = backward(&transposed.forward(&x).unwrap().sum_all().unwrap()).unwrap();
    opt.step(&mut tp, &g).unwrap();
    let e = err_of(innerloop(&model(), &opt, InnerloopOptions::new()));
    assert_state_shape(e, &opt.states()[0], 0, &[3, 2]);
}

/// Keeps a 0-dim tensor in its state (a per-parameter scalar, as torch's `step` tensor):
/// not a shape mismatch.
#[differentiable_optimizer]
pub(crate) struct NormTracking {
    pub lr: f64,
}

#[differentiable_optimizer]
impl NormTracking {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        state.set("grad_norm_sq", grad.sqr()?.sum_all()?);
        p.sub_(&grad.mul(self.lr)?)?;
        Ok(())
    }
}

/// Broadcasts a `[3]` parameter into `[3, 3]`: a step that changes its parameter's shape.
#[differentiable_optimizer]
pub(crate) struct Broadcasting {
    pub lr: f64,
}

#[differentiable_optimizer]
impl Broadcasting {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let _ = state;
        if p.dims() == [3] {
            let column = Tensor::zeros(&[3, 1], p.dtype(), p.device())?;
            p.add_(&column)?;
        }
        p.sub_(&grad.mul(self.lr)?)?;
        Ok(())
    }
}

#[test]
fn zero_dim_state_entries_are_per_parameter_scalars() {
    let (mut opt, mut ps) = stepped(NormTracking { lr: 0.1 });
    let g = backward(&loss(&ps)).unwrap();
    let expected: Vec<Vec<f64>> = ps
        .iter()
        .map(|p| {
            let gp = g.get(p).unwrap();
            p.sub(gp.mul(0.1).unwrap()).unwrap().to_vec_f64().unwrap()
        })
        .collect();
    opt.step(&mut ps, &g).unwrap();
    for (p, e) in ps.iter().zip(&expected) {
        assert_eq!(&p.to_vec_f64().unwrap(), e);
    }
    let (mut d, ps) = diff_stepped(NormTracking { lr: 0.1 });
    d.step_params(&loss(&ps), &ps).unwrap();
}

#[test]
fn a_step_that_changes_its_parameters_shape_is_rejected() {
    let mut ps = params();
    let mut opt = Optimizer::new(Broadcasting { lr: 0.1 }, 2).unwrap();
    let before = params_bits(&ps);
    let g = backward(&loss(&ps)).unwrap();
    match err_of(opt.step(&mut ps, &g)) {
        Error::ShapeMismatch { got, .. } => assert_eq!(got, vec![3, 3]),
        other => panic!("expected a shape mismatch, got {other}"),
    }
    assert_eq!(params_bits(&ps), before);
    assert!(opt.states().iter().all(State::is_empty));
    let p0 = params();
    let mut d = DiffOptimizer::new(Broadcasting { lr: 0.1 }, &p0).unwrap();
    assert!(matches!(
        err_of(d.step_params(&loss(&p0), &p0)),
        Error::ShapeMismatch { .. }
    ));
}

// ---------------------------------------------------------------- failing calls change nothing

#[test]
fn a_step_failing_at_a_later_parameter_changes_none() {
    // The second parameter's gradient has the wrong shape; the first one's step was
    // computed already and must not be committed.
    let (mut opt, mut ps) = stepped(Adam::new(0.1));
    let (before_p, before_s) = (params_bits(&ps), states_bits(opt.states()));
    let g = backward(&loss(&ps)).unwrap();
    let grads = vec![g.get(&ps[0]).cloned(), Some(leaf(&[2], 1.0))];
    assert!(matches!(
        err_of(opt.step_grads(&mut ps, &grads)),
        Error::ShapeMismatch { .. }
    ));
    assert_eq!(params_bits(&ps), before_p);
    assert_eq!(states_bits(opt.states()), before_s);

    // The same in the second of two groups, failing on its state.
    let groups = vec![
        ParamGroup::new(vec![0], Adam::new(0.1)),
        ParamGroup::new(vec![1], Adam::new(0.2)),
    ];
    let mut opt = Optimizer::with_groups(2, groups).unwrap();
    let mut ps = params();
    let g = backward(&loss(&ps)).unwrap();
    opt.step(&mut ps, &g).unwrap();
    let mut states = opt.states().to_vec();
    states[1] = stepped(Adam::new(0.1)).0.states()[0].clone();
    opt.set_states(states).unwrap();
    let (before_p, before_s) = (params_bits(&ps), states_bits(opt.states()));
    let g = backward(&loss(&ps)).unwrap();
    assert_state_shape(err_of(opt.step(&mut ps, &g)), &opt.states()[1], 1, &[3]);
    assert_eq!(params_bits(&ps), before_p);
    assert_eq!(states_bits(opt.states()), before_s);

    // A diffopt whose gradient callback fails, with an override given at that step: the
    // override does not persist and the next step is the one a copy would take.
    let (mut d, ps) = diff_stepped(Adam::new(0.1));
    let mut copy = d.clone();
    let (twins, states) = (twin_bits(&d), states_bits(d.states()));
    let failing = grad_callback(|_| {
        Err(Error::InvalidArgument {
            op: "test callback",
            message: "refuses".into(),
        })
    });
    let lr = Tensor::scalar(0.3f64).to_leaf();
    let options = StepOptions::new()
        .overrides(Overrides::new().set("lr", lr))
        .callback(failing);
    assert!(matches!(
        err_of(d.step_params_with(&loss(&ps), &ps, options)),
        Error::InvalidArgument {
            op: "test callback",
            ..
        }
    ));
    assert_eq!(twin_bits(&d), twins);
    assert_eq!(states_bits(d.states()), states);
    let next = d.step_params(&loss(&ps), &ps).unwrap();
    let expected = copy.step_params(&loss(&ps), &ps).unwrap();
    assert_eq!(params_bits(&next), params_bits(&expected));
}

#[test]
fn a_failing_step_module_changes_neither_model_nor_state() {
    let mut m = model();
    let mut opt = Optimizer::new(Adam::new(0.1), 2).unwrap();
    let meta = |m: &nn::Linear| {
        let (x, y) = data();
        nn::mse(&m.forward(&x).unwrap(), &y).unwrap()
    };
    let g = backward(&meta(&m)).unwrap();
    opt.step_module(&mut m, &g).unwrap();
    // Parameter 1's state comes from a parameter of another shape.
    let mut states = opt.states().to_vec();
    states[1] = states[0].clone();
    opt.set_states(states).unwrap();
    let before_m = params_bits(&m.parameters().unwrap());
    let before_s = states_bits(opt.states());
    let g = backward(&meta(&m)).unwrap();
    assert_state_shape(
        err_of(opt.step_module(&mut m, &g)),
        &opt.states()[1],
        1,
        &[3],
    );
    assert_eq!(params_bits(&m.parameters().unwrap()), before_m);
    assert_eq!(states_bits(opt.states()), before_s);
}

/// Turns three-element parameters into f32: a step whose result no f64 var can take.
#[differentiable_optimizer]
pub(crate) struct CastsToF32 {
    pub lr: f64,
}

#[differentiable_optimizer]
impl CastsToF32 {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        state.increment("step");
        p.sub_(&grad.mul(self.lr)?)?;
        if p.elem_count() == 3 {
            let cast = p.to_dtype(DType::F32)?;
            p.set_(&cast)?;
        }
        Ok(())
    }
}

#[test]
fn a_failing_step_vars_sets_no_var() {
    // The first var's update is fine, the second's cannot be set into an f64 var: no var is
    // set and no state advances.
    let dev = crate::common::device();
    let a = candle_core::Var::new(&[1.0f64, -2.0], &dev).unwrap();
    let b = candle_core::Var::new(&[0.5f64, 0.25, -1.0], &dev).unwrap();
    let candle_loss = || {
        let sa = a.as_tensor().sqr().unwrap().sum_all().unwrap();
        let sb = b.as_tensor().sqr().unwrap().sum_all().unwrap();
        (sa + sb).unwrap()
    };
    let mut opt = Optimizer::new(CastsToF32 { lr: 0.1 }, 2).unwrap();
    let grads = candle_loss().backward().unwrap();
    let e = err_of(opt.step_vars(&[a.clone(), b.clone()], &grads));
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    assert_eq!(a.to_vec1::<f64>().unwrap(), vec![1.0, -2.0]);
    assert_eq!(b.to_vec1::<f64>().unwrap(), vec![0.5, 0.25, -1.0]);
    assert!(opt.states().iter().all(State::is_empty));
    // The same optimizer on the first var alone steps it: the failure was the second's.
    let mut alone = Optimizer::new(CastsToF32 { lr: 0.1 }, 1).unwrap();
    alone.step_vars(std::slice::from_ref(&a), &grads).unwrap();
    assert_eq!(
        a.to_vec1::<f64>().unwrap(),
        vec![1.0 - 0.1 * 2.0, -2.0 - 0.1 * -4.0]
    );
}

#[test]
fn a_failing_forward_with_does_not_advance_time() {
    let (x, _) = data();
    let wrong = Tensor::zeros(&[4, 5], DType::F64, &crate::common::device()).unwrap();
    for track in [true, false] {
        let options = FunctionalOptions::default().track_higher_grads(track);
        let mut f = FunctionalModel::new(&model(), options).unwrap();
        let step: Vec<Tensor> = f
            .fast_params()
            .iter()
            .map(|p| p.mul(0.5).unwrap())
            .collect();
        f.forward_with(step, &x).unwrap();
        let (time, fast) = (f.time(), params_bits(f.fast_params()));
        let out = bits(&f.forward(&x).unwrap());
        let next: Vec<Tensor> = f
            .fast_params()
            .iter()
            .map(|p| p.mul(2.0).unwrap())
            .collect();
        assert!(f.forward_with(next.clone(), &wrong).is_err());
        assert_eq!(f.time(), time, "track {track}");
        assert_eq!(params_bits(f.fast_params()), fast, "track {track}");
        assert_eq!(
            bits(&f.forward(&x).unwrap()),
            out,
            "track {track}: the model's slots"
        );
        assert!(matches!(
            err_of(f.parameters(time + 1)),
            Error::TimeOutOfRange { .. }
        ));
        if track {
            assert_eq!(
                params_bits(f.parameters(time - 1).unwrap()),
                params_bits(&params())
            );
        }
        // The same weights with a good input are recorded as the next time.
        f.forward_with(next, &x).unwrap();
        assert_eq!(f.time(), time + 1);
    }
}

#[test]
fn a_failing_forward_with_puts_batch_norm_statistics_back() {
    // Batch norm updates its running statistics, then the last layer fails on the shape.
    let vb = nn::VarBuilder::new(3, DType::F64, &crate::common::device());
    let net = nn::seq()
        .add(nn::linear(2, 3, vb.pp("0")).unwrap())
        .add(nn::batch_norm1d(3, nn::BatchNormConfig::default(), vb.pp("1")).unwrap())
        .add(nn::linear(4, 1, vb.pp("2")).unwrap());
    let mut f = FunctionalModel::new(&net, FunctionalOptions::default()).unwrap();
    let buffers = |f: &FunctionalModel<nn::Sequential>| -> Vec<(String, Bits)> {
        f.buffers()
            .unwrap()
            .iter()
            .map(|(n, t)| (n.clone(), bits(t)))
            .collect()
    };
    let before = buffers(&f);
    let (x, _) = data();
    let same = f.fast_params().to_vec();
    assert!(f.forward_with(same, &x).is_err());
    assert_eq!(f.time(), 0);
    assert_eq!(buffers(&f), before);
}

/// A linear layer from `inputs` to 3 features and a batch norm (which updates its running
/// statistics), then, when `fail`, a last layer that fails on the shape (it wants 4).
fn batch_norm_stage(seed: u64, inputs: usize, fail: bool) -> nn::Sequential {
    let vb = nn::VarBuilder::new(seed, DType::F64, &crate::common::device());
    let stage = nn::seq()
        .add(nn::linear(inputs, 3, vb.pp("0")).unwrap())
        .add(nn::batch_norm1d(3, nn::BatchNormConfig::default(), vb.pp("1")).unwrap());
    if fail {
        stage.add(nn::linear(4, 1, vb.pp("2")).unwrap())
    } else {
        stage
    }
}

fn buffer_bits<M: Parameters + Clone>(m: &M) -> Vec<(String, Bits)> {
    m.named_buffers()
        .unwrap()
        .iter()
        .map(|(n, t)| (n.clone(), bits(t)))
        .collect()
}

#[test]
fn a_failing_forward_puts_batch_norm_statistics_back() {
    let (x, _) = data();
    // The base model itself, an fmodel of it, and a task-batched fmodel of it.
    let net = batch_norm_stage(3, 2, true);
    let before = buffer_bits(&net);
    assert!(net.forward(&x).is_err());
    assert_eq!(buffer_bits(&net), before, "Sequential");

    let f = FunctionalModel::new(&net, FunctionalOptions::default()).unwrap();
    assert!(f.forward(&x).is_err());
    assert!(Module::forward(&f, &x).is_err());
    assert_eq!(buffer_bits(f.model()), before, "fmodel");

    let batched = FunctionalModel::new(&net, FunctionalOptions::default().tasks(2)).unwrap();
    let before_batched = buffer_bits(batched.model());
    let xs = Tensor::stack(&[x.clone(), x.mul(2.0).unwrap()], 0).unwrap();
    assert!(batched.forward(&xs).is_err());
    assert_eq!(
        buffer_bits(batched.model()),
        before_batched,
        "task-batched fmodel"
    );

    // The statistics do move on a pass that succeeds (so the checks above can fail).
    let ok = batch_norm_stage(3, 2, false);
    assert_eq!(buffer_bits(&ok), before);
    ok.forward(&x).unwrap();
    assert_ne!(buffer_bits(&ok), before);
}

/// Two sequentials with a batch norm each, run in a hand-written forward.
#[derive(Clone)]
struct TwoStages {
    first: nn::Sequential,
    second: nn::Sequential,
    /// Whether the forward catches the second stage's error and returns the first's output.
    recover: bool,
    /// Whether the forward panics after the first stage instead of running the second.
    panic: bool,
}

impl Parameters for TwoStages {
    fn visit(&mut self, v: &mut Visitor<'_>) -> Result<()> {
        v.module("first", &mut self.first)?;
        v.module("second", &mut self.second)
    }
}

impl Module for TwoStages {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        nn::restore_buffers_on_error(|| {
            let h = self.first.forward(x)?;
            if self.panic {
                panic!("a layer panicked");
            }
            match self.second.forward(&h) {
                Err(_) if self.recover => Ok(h),
                other => other,
            }
        })
    }
}

#[test]
fn buffer_writes_are_undone_per_call_and_on_panic() {
    let (x, _) = data();
    let mut model = TwoStages {
        first: batch_norm_stage(3, 2, false),
        second: batch_norm_stage(5, 3, true),
        recover: false,
        panic: false,
    };
    let before = buffer_bits(&model);
    let first_moved = {
        let copy = model.first.clone();
        copy.forward(&x).unwrap();
        buffer_bits(&copy)
    };
    // The second stage fails after both batch norms ran: both are put back.
    assert!(model.forward(&x).is_err());
    assert_eq!(buffer_bits(&model), before);

    // Recovered inside the forward: the failed stage's writes are undone, the first
    // stage's (which succeeded, in a pass that succeeded) stand.
    model.recover = true;
    model.forward(&x).unwrap();
    let after = buffer_bits(&model);
    let values = |b: &[(String, Bits)]| b.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>();
    assert_eq!(
        values(&after[..2]),
        values(&first_moved),
        "first stage updated"
    );
    assert_eq!(after[2..], before[2..], "second stage put back");

    // A panic after the first stage's batch norm ran: it is put back as the panic unwinds.
    model.recover = false;
    model.panic = true;
    let before = buffer_bits(&model);
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.forward(&x)));
    assert!(caught.is_err());
    assert_eq!(buffer_bits(&model), before);
    // And the journal is closed: a later pass that succeeds keeps its writes.
    model.panic = false;
    model.recover = true;
    model.forward(&x).unwrap();
    assert_ne!(buffer_bits(&model), before);
}

/// A model whose parameter walk fails, after showing its parameters, while `poisoned` is
/// set: `update_params` rejects any new weights then, having written its slots.
#[derive(Clone)]
struct Poisonable {
    inner: nn::Linear,
    poisoned: Arc<AtomicBool>,
}

impl Parameters for Poisonable {
    fn visit(&mut self, v: &mut Visitor<'_>) -> Result<()> {
        v.module("inner", &mut self.inner)?;
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(Error::InvalidArgument {
                op: "Poisonable::visit",
                message: "poisoned".into(),
            });
        }
        Ok(())
    }
}

impl Module for Poisonable {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.inner.forward(x)
    }
}

#[test]
fn a_diffopt_step_the_fmodel_rejects_does_not_advance_the_state() {
    let poisoned = Arc::new(AtomicBool::new(false));
    let m = Poisonable {
        inner: model(),
        poisoned: poisoned.clone(),
    };
    let base = Optimizer::new(Adam::new(0.1), 2).unwrap();
    let (mut fmodel, mut diffopt) = innerloop(&m, &base, InnerloopOptions::new()).unwrap();
    let l = fmodel_loss(&fmodel);
    diffopt.step(&mut fmodel, &l).unwrap();
    let (mut fcopy, mut dcopy) = (fmodel.clone(), diffopt.clone());
    let (time, states, twins) = (
        fmodel.time(),
        states_bits(diffopt.states()),
        twin_bits(&diffopt),
    );
    let (x, _) = data();
    let out = bits(&fmodel.forward(&x).unwrap());
    poisoned.store(true, Ordering::SeqCst);
    let lr = Tensor::scalar(0.3f64).to_leaf();
    let options = StepOptions::new().overrides(Overrides::new().set("lr", lr));
    let l = fmodel_loss(&fmodel);
    let e = err_of(diffopt.step_with(&mut fmodel, &l, options));
    assert!(
        matches!(
            e,
            Error::InvalidArgument {
                op: "Poisonable::visit",
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(fmodel.time(), time);
    assert_eq!(
        bits(&fmodel.forward(&x).unwrap()),
        out,
        "the model's slots changed"
    );
    assert_eq!(states_bits(diffopt.states()), states);
    assert_eq!(
        twin_bits(&diffopt),
        twins,
        "the failed step's override persisted"
    );
    poisoned.store(false, Ordering::SeqCst);
    // The next step is exactly the one the copies take.
    let (l, lcopy) = (fmodel_loss(&fmodel), fmodel_loss(&fcopy));
    let next = diffopt.step(&mut fmodel, &l).unwrap();
    let expected = dcopy.step(&mut fcopy, &lcopy).unwrap();
    assert_eq!(params_bits(&next), params_bits(&expected));
    assert_eq!(states_bits(diffopt.states()), states_bits(dcopy.states()));
    assert_eq!(fmodel.time(), time + 1);
}

/// An integer tensor as a hyperparameter: converted to the parameters' float dtype when
/// its value is valid, rejected by value when not (a u32 cannot be negative, an i64 can),
/// never a panic.
#[test]
fn integer_tensor_hyperparameters_convert_or_are_rejected() {
    use candle_higher::optim::DiffOptimizer;
    let p = candle_higher::Tensor::from_vec(vec![1.0f64, 2.0], &[2], &crate::common::device())
        .unwrap()
        .to_leaf();
    let mut opt = DiffOptimizer::new(Sgd::new(0.1), std::slice::from_ref(&p)).unwrap();
    opt.set_overrides(&Overrides::new().set("lr", candle_higher::Tensor::scalar(1u32)))
        .unwrap();
    let lr = opt.hyperparameter(0, "lr").unwrap();
    assert_eq!(lr.as_tensor().unwrap().dtype(), candle_higher::DType::F64);
    let loss = p.sqr().unwrap().sum_all().unwrap();
    let new = opt.step_params(&loss, std::slice::from_ref(&p)).unwrap();
    assert_eq!(new[0].to_vec_f64().unwrap(), [-1.0, -2.0]);
    let err = opt
        .set_overrides(&Overrides::new().set("lr", candle_higher::Tensor::scalar(-3i64)))
        .unwrap_err();
    assert!(
        matches!(err, candle_higher::Error::InvalidHyperparameter { value, .. } if value == -3.0),
        "{err}"
    );
}

#[test]
fn a_loss_of_several_elements_is_refused_by_the_step_that_got_it() {
    // Unreduced squared errors, [4, 3]: with or without a graph, in full and first-order
    // modes, the step names itself (not `grad`, whose grad_outputs it does not take) and
    // changes nothing.
    let (x, y) = data();
    for first_order in [false, true] {
        let inner = Optimizer::new(Sgd::new(0.1), 2).unwrap();
        let options = InnerloopOptions::new().first_order(first_order);
        let (mut fmodel, mut diffopt) = innerloop(&model(), &inner, options).unwrap();
        let (time, fast) = (fmodel.time(), params_bits(fmodel.fast_params()));
        let per_element = fmodel.forward(&x).unwrap().sub(&y).unwrap().sqr().unwrap();
        for loss in [per_element.clone(), per_element.detach()] {
            match err_of(diffopt.step(&mut fmodel, &loss)) {
                Error::NonScalarOutput { op, shape, .. } => {
                    assert_eq!(op, "DiffOptimizer::step");
                    assert_eq!(shape, vec![4, 3]);
                }
                other => panic!("first_order {first_order}: {other:?}"),
            }
            assert_eq!(fmodel.time(), time);
            assert_eq!(params_bits(fmodel.fast_params()), fast);
        }
        let message = err_of(diffopt.step(&mut fmodel, &per_element)).to_string();
        assert!(message.contains("sum_all"), "{message}");
        assert!(!message.contains("grad_outputs"), "{message}");
        // The reduced loss steps as usual.
        diffopt
            .step(&mut fmodel, &per_element.mean_all().unwrap())
            .unwrap();
        assert_eq!(fmodel.time(), time + 1);
    }
}
