//! The ordinary optimizer and its twin take the same steps: 5 steps on the golden MLP in
//! f64 agree to 1e-12 relative (the twin with plain floats, and with every float
//! hyperparameter given as a tensor), and the ordinary optimizers reproduce the golden
//! fast weights of every top-level golden file.

use crate::optim_support::*;
use candle_higher::optim::{
    Adadelta, Adagrad, Adam, AdamW, Adamax, Asgd, DiffOptimizer, Optimizer, Overrides, RmsProp,
    Rprop, Sgd,
};
use candle_higher::{backward, DifferentiableOptimizer, Tensor};

const STEPS: usize = 5;

fn ordinary<O: DifferentiableOptimizer>(case: &Case, opt: O, steps: usize) -> Vec<Vec<Tensor>> {
    let mut params: Vec<Tensor> = case.initial().iter().map(Tensor::to_leaf).collect();
    let mut opt = Optimizer::new(opt, params.len()).unwrap();
    let mut out = vec![params.clone()];
    for _ in 0..steps {
        let loss = case.support_loss(&params).unwrap();
        let grads = backward(&loss).unwrap();
        opt.step(&mut params, &grads).unwrap();
        out.push(params.clone());
    }
    out
}

fn twin<O: DifferentiableOptimizer>(case: &Case, opt: O, tensors: bool) -> Vec<Vec<Tensor>> {
    let p0: Vec<Tensor> = case.initial().iter().map(Tensor::to_leaf).collect();
    let mut d = DiffOptimizer::new(opt.clone(), &p0).unwrap();
    if tensors {
        let mut o = Overrides::new();
        for n in O::FLOAT_NAMES {
            o = o.set(n, Tensor::scalar(opt.float(n).unwrap()).to_leaf());
        }
        d.set_overrides(&o).unwrap();
    }
    let mut p = p0;
    let mut out = vec![p.clone()];
    for _ in 0..STEPS {
        let loss = case.support_loss(&p).unwrap();
        p = d.step_params(&loss, &p).unwrap();
        out.push(p.clone());
    }
    out
}

fn max_err(a: &[Vec<Tensor>], b: &[Vec<Tensor>]) -> f64 {
    let mut worst = 0.0f64;
    for (x, y) in a.iter().zip(b) {
        for (s, t) in x.iter().zip(y) {
            let (s, t) = (s.to_vec_f64().unwrap(), t.to_vec_f64().unwrap());
            let scale = t.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            worst = worst.max(rel_err(&s, &t, scale * 1e-6));
        }
    }
    worst
}

fn same_steps<O: DifferentiableOptimizer>(label: &str, opt: O) {
    let case = Case::new("mlp_sgd_plain.json");
    let a = ordinary(&case, opt.clone(), STEPS);
    let b = twin(&case, opt.clone(), false);
    let c = twin(&case, opt, true);
    let (e1, e2) = (max_err(&a, &b), max_err(&a, &c));
    println!("{label}: twin (floats) {e1:.1e}, twin (tensors) {e2:.1e}");
    assert!(e1 <= 1e-12 && e2 <= 1e-12, "{label}: {e1:e} {e2:e}");
    // The steps do move the weights.
    assert!(max_err(&a[..1], &a[STEPS..]) > 1e-6);
}

macro_rules! twin_test {
    ($name:ident, $opt:expr) => {
        #[test]
        fn $name() {
            same_steps(stringify!($name), $opt);
        }
    };
}

twin_test!(sgd_plain, Sgd::new(0.1));
twin_test!(
    sgd_momentum_dampening,
    Sgd {
        momentum: 0.9,
        dampening: 0.1,
        ..Sgd::new(0.1)
    }
);
twin_test!(
    sgd_nesterov_weight_decay,
    Sgd {
        momentum: 0.9,
        nesterov: true,
        weight_decay: 0.01,
        ..Sgd::new(0.1)
    }
);
twin_test!(adam_default, Adam::new(0.05));
twin_test!(
    adam_amsgrad_weight_decay,
    Adam {
        amsgrad: true,
        betas: (0.9, 0.9),
        weight_decay: 0.01,
        ..Adam::new(0.05)
    }
);
twin_test!(adamw_default, AdamW::new(0.05));
twin_test!(
    adamw_amsgrad,
    AdamW {
        amsgrad: true,
        ..AdamW::new(0.05)
    }
);
twin_test!(
    adagrad_all,
    Adagrad {
        lr_decay: 0.01,
        weight_decay: 0.01,
        initial_accumulator_value: 0.1,
        ..Adagrad::new(0.05)
    }
);
twin_test!(adadelta_default, Adadelta::default());
twin_test!(
    adamax_weight_decay,
    Adamax {
        weight_decay: 0.01,
        ..Adamax::new(0.05)
    }
);
twin_test!(
    asgd_averaging,
    Asgd {
        t0: 2.0,
        ..Asgd::new(0.1)
    }
);
twin_test!(rmsprop_default, RmsProp::new(0.01));
twin_test!(
    rmsprop_centered_momentum,
    RmsProp {
        centered: true,
        momentum: 0.9,
        weight_decay: 0.01,
        ..RmsProp::new(0.01)
    }
);
twin_test!(rprop_default, Rprop::new(0.01));

/// The ordinary optimizers reproduce every golden trajectory (the twins do too, in
/// `golden_optim.rs`).
#[test]
fn ordinary_optimizers_match_the_golden_fast_weights() {
    let mut worst = 0.0f64;
    for entry in std::fs::read_dir(GOLDEN_DIR).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if !name.starts_with("mlp_") || !name.ends_with(".json") {
            continue;
        }
        let case = Case::new(&name);
        if !case.json["error"].is_null() {
            continue; // higher 0.2.1's AdamW error records; see golden_optim.rs
        }
        let g = case.group().clone();
        let steps = case.steps;
        let run = match case.json["optimizer"]["type"].as_str().unwrap() {
            "SGD" => ordinary(&case, sgd(&g), steps),
            "Adam" => ordinary(&case, adam(&g), steps),
            "AdamW" => ordinary(&case, adamw(&g), steps),
            "Adagrad" => ordinary(&case, adagrad(&g), steps),
            "Adadelta" => ordinary(&case, adadelta(&g), steps),
            "Adamax" => ordinary(&case, adamax(&g), steps),
            "ASGD" => ordinary(&case, asgd(&g), steps),
            "RMSprop" => ordinary(&case, rmsprop(&g), steps),
            "Rprop" => ordinary(&case, rprop(&g), steps),
            other => panic!("{name}: unknown optimizer {other}"),
        };
        let golden: Vec<Vec<Tensor>> = (0..=steps)
            .map(|t| params_of(&case.json["outputs"]["fast_params"][t]))
            .collect();
        let e = max_err(&run, &golden);
        println!("{name}: {e:.1e}");
        assert!(e <= crate::common::precision().golden_tol, "{name}: {e:e}");
        worst = worst.max(e);
    }
    println!("worst: {worst:.1e}");
}
