//! The diffopt runtime and the ordinary optimizer: groups, overrides, callbacks, frozen and
//! unused parameters, test and first-order modes, branching, reading hyperparameters
//! back, and every error path.

use crate::optim_support::*;
use candle_higher::optim::{
    grad_callback, Adam, DiffOptimizer, InnerGradMode, Optimizer, Overrides, ParamGroup, Sgd,
    StepOptions,
};
use candle_higher::{backward, grad, DType, Error, GradOptions, Hyperparameters, Scalar, Tensor};
use std::sync::{Arc, Mutex};

fn leaves(case: &Case) -> Vec<Tensor> {
    case.initial().iter().map(Tensor::to_leaf).collect()
}

fn values(ts: &[Tensor]) -> Vec<Vec<f64>> {
    ts.iter().map(|t| t.to_vec_f64().unwrap()).collect()
}

fn scalar_grad(out: &Tensor, x: &Tensor) -> f64 {
    grad(
        std::slice::from_ref(out),
        std::slice::from_ref(x),
        GradOptions::default(),
    )
    .unwrap()[0]
        .as_ref()
        .unwrap()
        .to_scalar_f64()
        .unwrap()
}

#[test]
fn two_groups_step_with_their_own_hyperparameters() {
    let case = Case::new("mlp_sgd_plain.json");
    let p0 = leaves(&case);
    let groups = vec![
        ParamGroup::new(vec![0, 1], Sgd::new(0.1)),
        ParamGroup::new(vec![2, 3], Sgd::new(0.01)),
    ];
    let mut d = DiffOptimizer::with_groups(&p0, groups).unwrap();
    let loss = case.support_loss(&p0).unwrap();
    let g = grad(std::slice::from_ref(&loss), &p0, GradOptions::default()).unwrap();
    let p1 = d.step_params(&loss, &p0).unwrap();
    for (i, lr) in [(0, 0.1), (1, 0.1), (2, 0.01), (3, 0.01)] {
        let expected = p0[i].sub(g[i].as_ref().unwrap().mul(lr).unwrap()).unwrap();
        assert_eq!(p1[i].to_vec_f64().unwrap(), expected.to_vec_f64().unwrap());
    }
}

#[test]
fn parameters_in_no_group_pass_through() {
    let case = Case::new("mlp_sgd_plain.json");
    let p0 = leaves(&case);
    let mut d =
        DiffOptimizer::with_groups(&p0, vec![ParamGroup::new(vec![0, 2], Sgd::new(0.1))]).unwrap();
    let loss = case.support_loss(&p0).unwrap();
    let p1 = d.step_params(&loss, &p0).unwrap();
    assert_eq!(p1[1].id(), p0[1].id());
    assert_eq!(p1[3].id(), p0[3].id());
    assert_ne!(p1[0].id(), p0[0].id());
}

#[test]
fn frozen_parameters_are_untouched_and_stateless() {
    let case = Case::new("mlp_adam_default_head.json");
    let p0 = leaves(&case);
    let mut d = DiffOptimizer::new(Adam::new(0.05), &p0).unwrap();
    d.set_frozen(&[false, true, false, false]).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    d.set_callback(Some(grad_callback(move |g| {
        sink.lock()
            .unwrap()
            .push(g.iter().map(Option::is_some).collect::<Vec<_>>());
        Ok(g.to_vec())
    })));
    let mut p = p0.clone();
    for _ in 0..2 {
        let loss = case.support_loss(&p).unwrap();
        p = d.step_params(&loss, &p).unwrap();
    }
    assert_eq!(p[1].id(), p0[1].id());
    assert!(d.states()[1].is_empty());
    assert_eq!(d.states()[0].int("step"), Some(2));
    // The callback sees every position, `None` for the frozen one.
    assert_eq!(seen.lock().unwrap()[0], vec![true, false, true, true]);
}

#[test]
fn a_parameter_without_gradient_is_untouched_and_its_state_not_advanced() {
    let case = Case::new("mlp_adam_default_head.json");
    let mut p0 = leaves(&case);
    let unused = Tensor::from_vec(vec![1.0f64, 2.0], &[2], &crate::common::device())
        .unwrap()
        .to_leaf();
    p0.push(unused.clone());
    let mut d = DiffOptimizer::new(Adam::new(0.05), &p0).unwrap();
    let mut p = p0.clone();
    for _ in 0..3 {
        let loss = case.support_loss(&p[..4]).unwrap();
        p = d.step_params(&loss, &p).unwrap();
    }
    assert_eq!(p[4].id(), unused.id());
    assert!(d.states()[4].is_empty());
    assert_eq!(d.states()[0].int("step"), Some(3));
}

#[test]
fn overrides_per_group_and_at_a_step_persist() {
    // w_{t+1} = w_t - lr * 2 w_t on loss = sum(w^2): one scalar per group.
    let w = |v: f64| Tensor::scalar(v).to_leaf();
    let p0 = vec![w(1.0), w(1.0)];
    let groups = vec![
        ParamGroup::new(vec![0], Sgd::new(0.1)),
        ParamGroup::new(vec![1], Sgd::new(0.1)),
    ];
    let mut d = DiffOptimizer::with_groups(&p0, groups).unwrap();
    let (lr_a, lr_b) = (w(0.2), w(0.3));
    d.set_overrides(&Overrides::new().per_group("lr", [lr_a.clone(), lr_b.clone()]))
        .unwrap();
    let loss = |p: &[Tensor]| p[0].sqr().unwrap().add(p[1].sqr().unwrap()).unwrap();
    let p1 = d.step_params(&loss(&p0), &p0).unwrap();
    assert!((p1[0].to_scalar_f64().unwrap() - 0.6).abs() < 1e-15);
    assert!((p1[1].to_scalar_f64().unwrap() - 0.4).abs() < 1e-15);
    // An override at a step: one value for both groups, and it persists.
    let lr_c = w(0.25);
    let p2 = d
        .step_params_with(
            &loss(&p1),
            &p1,
            StepOptions::new().overrides(Overrides::new().set("lr", lr_c.clone())),
        )
        .unwrap();
    let p3 = d.step_params(&loss(&p2), &p2).unwrap();
    // w3 = (1 - 2 lr_c)^2 (1 - 2 lr_a) for group 0.
    let expected = 0.5f64.powi(2) * 0.6;
    assert!((p3[0].to_scalar_f64().unwrap() - expected).abs() < 1e-15);
    assert!(d.hyperparameter(1, "lr").unwrap().as_tensor().is_some());
    // d w3 / d lr_c = 2 (1 - 2 lr_c)(-2) (1 - 2 lr_a) = -1.2 ; d w3 / d lr_a = 0.25 * -2.
    assert!((scalar_grad(&p3[0], &lr_c) + 1.2).abs() < 1e-14);
    assert!((scalar_grad(&p3[0], &lr_a) + 0.5).abs() < 1e-14);
    // lr_b was replaced by lr_c after one step: d w3[1] / d lr_b = -2 (1 - 2 lr_c)^2.
    assert!((scalar_grad(&p3[1], &lr_b) + 0.5).abs() < 1e-14);
}

#[test]
fn override_errors_are_typed() {
    let p0 = vec![Tensor::scalar(1.0f64).to_leaf()];
    let groups = vec![ParamGroup::new(vec![0], Sgd::new(0.1))];
    let mut d = DiffOptimizer::with_groups(&p0, groups).unwrap();
    let err = d
        .set_overrides(&Overrides::new().per_group("lr", [0.1, 0.2, 0.3]))
        .unwrap_err();
    match &err {
        Error::OverrideCount {
            name,
            given,
            groups,
        } => assert_eq!((name.as_str(), *given, *groups), ("lr", 3, 1)),
        other => panic!("unexpected {other}"),
    }
    assert!(err.to_string().contains("\"lr\""), "{err}");
    assert!(err.to_string().contains("1 parameter groups"), "{err}");
    let err = d
        .set_overrides(&Overrides::new().set("learning_rate", 0.1))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("learning_rate") && err.contains("lr, momentum, dampening"),
        "{err}"
    );
    // A tensor with more than one element.
    let two = Tensor::from_vec(vec![0.1f64, 0.2], &[2], &crate::common::device()).unwrap();
    assert!(matches!(
        d.set_overrides(&Overrides::new().set("lr", two)),
        Err(Error::ShapeMismatch { .. })
    ));
    // A failed override changes nothing.
    let bad = Overrides::new().set("lr", 0.5).set("nope", 1.0);
    assert!(d.set_overrides(&bad).is_err());
    assert_eq!(d.hyperparameter(0, "lr").unwrap().value(), 0.1);
    assert!(d.hyperparameter(3, "lr").is_err());
    assert!(d.hyperparameter(0, "nope").is_err());
}

#[test]
fn adam_betas_override_by_component() {
    let case = Case::new("mlp_adam_default_head.json");
    let p0 = leaves(&case);
    let mut d = DiffOptimizer::new(Adam::new(0.05), &p0).unwrap();
    let b1 = Tensor::scalar(0.9f64).to_leaf();
    d.set_overrides(&Overrides::new().set("betas.0", b1.clone()))
        .unwrap();
    assert!(d
        .hyperparameter(0, "betas.0")
        .unwrap()
        .as_tensor()
        .is_some());
    assert!(d
        .set_overrides(&Overrides::new().set("betas", 0.9))
        .is_err());
    let loss = case.support_loss(&p0).unwrap();
    let p1 = d.step_params(&loss, &p0).unwrap();
    let loss = case.support_loss(&p1).unwrap();
    let p2 = d.step_params(&loss, &p1).unwrap();
    let meta = case.query_loss(&p2).unwrap();
    assert!(scalar_grad(&meta, &b1).is_finite());
}

#[test]
fn override_tensors_are_converted_to_the_parameters_dtype_differentiably() {
    let p0 = vec![Tensor::scalar(1.0f64).to_leaf()];
    let mut d = DiffOptimizer::new(Sgd::new(0.1), &p0).unwrap();
    let lr32 = Tensor::from_vec(vec![0.25f32], &[1], &crate::common::device())
        .unwrap()
        .to_leaf();
    d.set_overrides(&Overrides::new().set("lr", lr32.clone()))
        .unwrap();
    let p1 = d.step_params(&p0[0].sqr().unwrap(), &p0).unwrap();
    assert_eq!(p1[0].dtype(), DType::F64);
    assert_eq!(p1[0].dims(), &[] as &[usize]);
    assert_eq!(p1[0].to_scalar_f64().unwrap(), 0.5);
    let g = grad(
        std::slice::from_ref(&p1[0]),
        std::slice::from_ref(&lr32),
        GradOptions::default(),
    )
    .unwrap();
    let g = g[0].as_ref().unwrap();
    assert_eq!(g.dtype(), DType::F32);
    assert_eq!(g.to_vec_f64().unwrap(), vec![-2.0]);
}

#[test]
fn callback_sees_all_gradients_and_the_steps_callback_wins() {
    let p0 = vec![
        Tensor::scalar(1.0f64).to_leaf(),
        Tensor::scalar(2.0f64).to_leaf(),
    ];
    let mut d = DiffOptimizer::new(Sgd::new(0.1), &p0).unwrap();
    // Construction callback: clip to [-1, 1] by scaling to zero (here: zero the grads).
    d.set_callback(Some(grad_callback(|g| {
        Ok(g.iter()
            .map(|g| g.as_ref().map(|g| g.mul(0.0).unwrap()))
            .collect())
    })));
    let loss = p0[0].sqr().unwrap(); // p0[1] unused: None
    let p1 = d.step_params(&loss, &p0).unwrap();
    assert_eq!(p1[0].to_scalar_f64().unwrap(), 1.0);
    let seen = Arc::new(Mutex::new(None));
    let sink = seen.clone();
    let double = grad_callback(move |g| {
        *sink.lock().unwrap() = Some(g.iter().map(Option::is_some).collect::<Vec<_>>());
        Ok(g.iter()
            .map(|g| g.as_ref().map(|g| g.mul(2.0).unwrap()))
            .collect())
    });
    let loss = p1[0].sqr().unwrap();
    let p2 = d
        .step_params_with(&loss, &p1, StepOptions::new().callback(double))
        .unwrap();
    assert_eq!(*seen.lock().unwrap(), Some(vec![true, false]));
    assert!((p2[0].to_scalar_f64().unwrap() - 0.6).abs() < 1e-15); // 1 - 0.1 * 2 * 2
                                                                   // A callback that drops a gradient is an error, and nothing changes.
    let bad = grad_callback(|g| Ok(g[..1].to_vec()));
    let err = d
        .step_params_with(&loss, &p1, StepOptions::new().callback(bad))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("callback returned 1 gradients for 2"),
        "{err}"
    );
}

#[test]
fn test_mode_keeps_no_graph_and_first_order_keeps_the_update_path() {
    let case = Case::new("mlp_sgd_plain.json");
    let lr = Tensor::scalar(0.1f64).to_leaf();
    let run = |mode| {
        let p0 = leaves(&case);
        let mut d = DiffOptimizer::new(Sgd::new(0.1), &p0).unwrap();
        d.set_mode(mode);
        d.set_overrides(&Overrides::new().set("lr", lr.clone()))
            .unwrap();
        let mut p = p0.clone();
        let mut grads = Vec::new();
        for _ in 0..3 {
            let loss = case.support_loss(&p).unwrap();
            grads.push(grad(std::slice::from_ref(&loss), &p, GradOptions::default()).unwrap());
            p = d.step_params(&loss, &p).unwrap();
        }
        (p0, p, grads)
    };
    let (_, full, _) = run(InnerGradMode::Full);
    let (p0, test, _) = run(InnerGradMode::Test);
    assert_eq!(values(&full), values(&test));
    assert!(test.iter().all(|t| t.is_leaf() && t.requires_grad()));
    let meta = case.query_loss(&test).unwrap();
    let mut inputs = p0.clone();
    inputs.push(lr.clone());
    let g = grad(&[meta], &inputs, GradOptions::default().allow_unused(true)).unwrap();
    assert!(
        g.iter().all(Option::is_none),
        "test mode: no path to θ0 or lr"
    );

    // First order: θ_T = θ0 - lr Σ g_t with the g_t constants, so d meta / d θ0 is the
    // gradient at θ_T and d meta / d lr = -Σ_t <g_t, ∇ meta(θ_T)>.
    let (p0, fo, grads) = run(InnerGradMode::FirstOrder);
    assert_eq!(values(&full), values(&fo));
    let meta = case.query_loss(&fo).unwrap();
    let mut inputs = p0.clone();
    inputs.push(lr.clone());
    let g = grad(std::slice::from_ref(&meta), &inputs, GradOptions::default()).unwrap();
    let at_t = grad(&[meta], &fo, GradOptions::default()).unwrap();
    let mut expected_lr = 0.0;
    for i in 0..4 {
        let a = g[i].as_ref().unwrap().to_vec_f64().unwrap();
        let b = at_t[i].as_ref().unwrap().to_vec_f64().unwrap();
        assert!(rel_err(&a, &b, 1e-12) < 1e-12);
        for gt in &grads {
            let gt = gt[i].as_ref().unwrap().to_vec_f64().unwrap();
            expected_lr -= gt.iter().zip(&b).map(|(x, y)| x * y).sum::<f64>();
        }
    }
    let ours = g[4].as_ref().unwrap().to_scalar_f64().unwrap();
    assert!(
        (ours - expected_lr).abs() <= 1e-12 * expected_lr.abs(),
        "{ours} vs {expected_lr}"
    );
}

#[test]
fn track_higher_grads_switches_between_test_and_full() {
    let p0 = vec![Tensor::scalar(1.0f64).to_leaf()];
    let mut d = DiffOptimizer::new(Sgd::new(0.1), &p0).unwrap();
    d.set_mode(InnerGradMode::FirstOrder);
    d.set_track_higher_grads(true);
    assert_eq!(d.mode(), InnerGradMode::FirstOrder);
    d.set_track_higher_grads(false);
    assert_eq!(d.mode(), InnerGradMode::Test);
    d.set_track_higher_grads(true);
    assert_eq!(d.mode(), InnerGradMode::Full);
}

#[test]
fn ordinary_optimizer_steps_leaves_and_keys_state_by_position() {
    let case = Case::new("mlp_adam_default_head.json");
    let mut params = leaves(&case);
    let mut opt = Optimizer::new(adam(case.group()), params.len()).unwrap();
    for t in 0..case.steps {
        let loss = case.support_loss(&params).unwrap();
        let grads = backward(&loss).unwrap();
        let before: Vec<_> = params.iter().map(Tensor::id).collect();
        opt.step(&mut params, &grads).unwrap();
        for (p, id) in params.iter().zip(before) {
            assert!(p.is_leaf() && p.requires_grad());
            assert_ne!(p.id(), id);
        }
        let golden = params_of(&case.json["outputs"]["fast_params"][t + 1]);
        for (p, g) in params.iter().zip(&golden) {
            let e = rel_err(&p.to_vec_f64().unwrap(), &g.to_vec_f64().unwrap(), 1e-6);
            assert!(e < 1e-9, "step {t}: {e:e}");
        }
    }
    assert_eq!(opt.states()[3].int("step"), Some(4));
}

#[test]
fn branching_from_an_ordinary_optimizer_copies_and_leaves_it_unchanged() {
    let case = Case::new("mlp_adam_default_head.json");
    let mut params = leaves(&case);
    let mut opt = Optimizer::new(adam(case.group()), params.len()).unwrap();
    for _ in 0..2 {
        let loss = case.support_loss(&params).unwrap();
        let grads = backward(&loss).unwrap();
        opt.step(&mut params, &grads).unwrap();
    }
    let saved: Vec<Vec<f64>> = opt
        .states()
        .iter()
        .map(|s| s.get("exp_avg").unwrap().to_vec_f64().unwrap())
        .collect();
    let mut d = DiffOptimizer::from_optimizer(&opt, &params).unwrap();
    let mut fast = params.clone();
    for _ in 0..2 {
        let loss = case.support_loss(&fast).unwrap();
        fast = d.step_params(&loss, &fast).unwrap();
    }
    // The branch continues exactly where the ordinary optimizer was: the golden steps 3, 4.
    let golden = params_of(&case.json["outputs"]["fast_params"][4]);
    for (p, g) in fast.iter().zip(&golden) {
        let e = rel_err(&p.to_vec_f64().unwrap(), &g.to_vec_f64().unwrap(), 1e-6);
        assert!(e < 1e-9, "{e:e}");
    }
    assert_eq!(d.states()[0].int("step"), Some(4));
    assert_eq!(opt.states()[0].int("step"), Some(2));
    for (s, v) in opt.states().iter().zip(&saved) {
        assert_eq!(&s.get("exp_avg").unwrap().to_vec_f64().unwrap(), v);
    }
    // Count mismatch.
    assert!(DiffOptimizer::from_optimizer(&opt, &params[..2]).is_err());
}

#[test]
fn learned_hyperparameters_read_back_into_an_ordinary_optimizer() {
    let p0 = vec![Tensor::scalar(1.0f64).to_leaf()];
    let mut d = DiffOptimizer::new(Adam::new(0.05), &p0).unwrap();
    let lr = Tensor::scalar(0.07f64).to_leaf();
    d.set_overrides(&Overrides::new().set("lr", lr).set("betas.1", 0.99))
        .unwrap();
    let h = d.hyperparameters().unwrap();
    assert_eq!(h[0].lr, 0.07);
    assert_eq!(h[0].betas, (0.9, 0.99));
    let mut opt = Optimizer::new(Adam::new(0.001), 1).unwrap();
    d.apply_to(&mut opt).unwrap();
    assert_eq!(opt.groups()[0].hyperparameters.lr, 0.07);
    assert_eq!(opt.groups()[0].hyperparameters.float("betas.1"), Some(0.99));
    let mut two = Optimizer::with_groups(
        2,
        vec![
            ParamGroup::new(vec![0], Adam::new(0.1)),
            ParamGroup::new(vec![1], Adam::new(0.1)),
        ],
    )
    .unwrap();
    assert!(d.apply_to(&mut two).is_err());
}

#[test]
fn bare_tensors_energy_model_descends_its_input() {
    // Optimize an input x of a fixed energy E(x) = sum((x - c)^2): 20 SGD steps on x
    // through step_params, then a meta-gradient of the final energy w.r.t. c.
    let c = Tensor::from_vec(vec![1.0f64, -1.0], &[2], &crate::common::device())
        .unwrap()
        .to_leaf();
    let x0 = Tensor::zeros(&[2], DType::F64, &crate::common::device())
        .unwrap()
        .to_leaf();
    let energy = |x: &Tensor| x.sub(&c).unwrap().sqr().unwrap().sum_all().unwrap();
    let mut d = DiffOptimizer::new(Sgd::new(0.1), std::slice::from_ref(&x0)).unwrap();
    let mut x = vec![x0];
    for _ in 0..20 {
        x = d.step_params(&energy(&x[0]), &x).unwrap();
    }
    let xs = x[0].to_vec_f64().unwrap();
    assert!((xs[0] - 1.0).abs() < 0.02 && (xs[1] + 1.0).abs() < 0.02);
    // x_T = c (1 - 0.8^20): d sum(x_T) / d c = (1 - 0.8^20) per entry.
    let s = x[0].sum_all().unwrap();
    let g = grad(&[s], &[c], GradOptions::default()).unwrap();
    for v in g[0].as_ref().unwrap().to_vec_f64().unwrap() {
        assert!((v - (1.0 - 0.8f64.powi(20))).abs() < 1e-12);
    }
}

#[test]
fn runtime_error_paths() {
    let p = |v: f64| Tensor::scalar(v).to_leaf();
    let p0 = vec![p(1.0), p(2.0)];
    // Groups: index out of range, parameter in two groups.
    let err = DiffOptimizer::with_groups(&p0, vec![ParamGroup::new(vec![2], Sgd::new(0.1))])
        .unwrap_err()
        .to_string();
    assert!(err.contains("names parameter 2, but there are 2"), "{err}");
    let err = DiffOptimizer::with_groups(
        &p0,
        vec![
            ParamGroup::new(vec![0], Sgd::new(0.1)),
            ParamGroup::new(vec![0], Sgd::new(0.1)),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("parameter 0 is in parameter groups 0 and 1"),
        "{err}"
    );
    assert!(Optimizer::with_groups(1, vec![ParamGroup::new(vec![1], Sgd::new(0.1))]).is_err());

    let mut d = DiffOptimizer::new(Sgd::new(0.1), &p0).unwrap();
    let loss = p0[0].mul(&p0[1]).unwrap();
    // Wrong number of parameters.
    let err = d.step_params(&loss, &p0[..1]).unwrap_err().to_string();
    assert!(err.contains("expected 2 parameters, got 1"), "{err}");
    // Wrong number and shape of explicit gradients.
    assert!(d.step_grads(&p0, vec![None], StepOptions::new()).is_err());
    let bad = Tensor::zeros(&[3], DType::F64, &crate::common::device()).unwrap();
    assert!(matches!(
        d.step_grads(&p0, vec![Some(bad.clone()), None], StepOptions::new()),
        Err(Error::ShapeMismatch { .. })
    ));
    // Frozen flags of the wrong length.
    assert!(d.set_frozen(&[true]).is_err());
    // Ordinary optimizer: wrong counts and shapes; a failed step changes nothing.
    let mut opt = Optimizer::new(Sgd::new(0.1), 2).unwrap();
    let mut params = p0.clone();
    assert!(opt.step_grads(&mut params[..1], &[None]).is_err());
    assert!(opt.step_grads(&mut params, &[None]).is_err());
    let ok = Tensor::scalar(1.0f64);
    assert!(opt.step_grads(&mut params, &[Some(ok), Some(bad)]).is_err());
    assert_eq!(params[0].id(), p0[0].id());
    assert!(opt.set_states(vec![]).is_err());
}

#[test]
fn hyperparameter_values_read_from_a_scalar() {
    let s = Scalar::from(Tensor::scalar(0.5f64));
    assert_eq!(s.value(), 0.5);
}

/// The ordinary optimizer steps a plain candle model's `Var`s with candle's own backprop,
/// exactly as it steps our tensors, and leaves a var without a gradient alone.
#[test]
fn steps_candle_vars_like_our_tensors() {
    let dev = crate::common::device();
    let x = candle_core::Tensor::new(&[[1.0f64, -2.0], [0.5, 3.0], [-1.5, 0.25]], &dev).unwrap();
    let y = candle_core::Tensor::new(&[[1.0f64], [-1.0], [2.0]], &dev).unwrap();
    let w = candle_core::Var::new(&[[0.3f64], [-0.2]], &dev).unwrap();
    let unused = candle_core::Var::new(&[4.0f64, 5.0], &dev).unwrap();
    let candle_loss = |w: &candle_core::Tensor| {
        (x.matmul(w).unwrap() - &y)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let mut on_vars = Optimizer::new(Adam::new(0.1), 2).unwrap();
    let mut ours = Optimizer::new(Adam::new(0.1), 1).unwrap();
    let mut p = vec![Tensor::new(w.as_tensor().copy().unwrap()).to_leaf()];
    let first = candle_loss(w.as_tensor()).to_scalar::<f64>().unwrap();
    for _ in 0..5 {
        let grads = candle_loss(w.as_tensor()).backward().unwrap();
        on_vars
            .step_vars(&[w.clone(), unused.clone()], &grads)
            .unwrap();
        let xt = Tensor::new(x.clone());
        let loss = xt
            .matmul(&p[0])
            .unwrap()
            .sub(Tensor::new(y.clone()))
            .unwrap();
        let loss = loss.mul(&loss).unwrap().sum_all().unwrap();
        ours.step(&mut p, &backward(&loss).unwrap()).unwrap();
        let on_var: Vec<f64> = w.flatten_all().unwrap().to_vec1().unwrap();
        for (a, b) in on_var.iter().zip(p[0].to_vec_f64().unwrap()) {
            assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
    let last = candle_loss(w.as_tensor()).to_scalar::<f64>().unwrap();
    assert!(last < first, "loss {first} -> {last}");
    assert_eq!(unused.to_vec1::<f64>().unwrap(), vec![4.0, 5.0]);
    assert!(on_vars.states()[1].is_empty());
}

/// The ordinary Adam and AdamW take one fused pass per parameter (`ops::fused::adam`);
/// under anomaly detection they run the ops one by one. Both give the same bits, in f32
/// and f64, with and without weight decay, over several steps.
#[test]
fn fused_adam_equals_its_ops_to_the_bit() {
    use candle_higher::optim::AdamW;
    use candle_higher::{detect_anomaly, Device};
    fn run<O: candle_higher::optim::OptimizerStep + Hyperparameters + Clone>(
        opt: O,
        dtype: DType,
        anomaly: bool,
    ) -> Vec<Vec<u64>> {
        let _guard = anomaly.then(detect_anomaly);
        let p0 = [0.5, -1.25, 3.0, 0.0, -0.0, 2e-3];
        let mut params = vec![Tensor::from_slice(&p0, &[2, 3], &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()];
        let mut opt = Optimizer::new(opt, 1).unwrap();
        for k in 0..4 {
            let g: Vec<f64> = (0..6)
                .map(|i| ((i * 7 + k * 3) % 5) as f64 * 0.37 - 0.6)
                .collect();
            let g = Tensor::from_slice(&g, &[2, 3], &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            opt.step_grads(&mut params, &[Some(g)]).unwrap();
        }
        let mut out = vec![params[0].to_vec_f64().unwrap()];
        for key in ["exp_avg", "exp_avg_sq"] {
            out.push(
                opt.states()[0]
                    .get(key)
                    .unwrap()
                    .tensor()
                    .to_vec_f64()
                    .unwrap(),
            );
        }
        out.iter()
            .map(|v| v.iter().map(|x| x.to_bits()).collect())
            .collect()
    }
    for dtype in [DType::F32, DType::F64] {
        let adam = Adam {
            weight_decay: 0.1,
            eps: 1e-6,
            ..Adam::new(0.05)
        };
        for opt in [Adam::new(1e-2), adam] {
            assert_eq!(
                run(opt.clone(), dtype, false),
                run(opt, dtype, true),
                "{dtype:?}"
            );
        }
        let adamw = AdamW {
            weight_decay: 0.3,
            ..AdamW::new(0.02)
        };
        assert_eq!(
            run(adamw.clone(), dtype, false),
            run(adamw, dtype, true),
            "{dtype:?}"
        );
    }
}
