//! NaN safety with exactly-zero gradients, at second and third order.
//!
//! Adaptive optimizers take the square root of a second moment that is exactly 0 wherever
//! the gradient has always been 0; `d sqrt(x)/dx` is infinite there and turns a whole
//! meta-gradient into NaN in higher (issue #125) and TorchOpt (issue #26). The runtime's
//! `sqrt` has derivative 0 at 0 at every order. Two sources of exact zeros:
//! - a dead ReLU unit (`mlp_adam_zero_grad_head.json`: `b0[0] = -100`): row 0 of `W0`,
//!   `b0[0]` and column 0 of `W2` get gradient 0 at every step;
//! - a zero first gradient: `y = s * (x w)` with `s0 = 0` gives `d/dw = 0` at step 1 only.
//!
//! For each optimizer (every float hyperparameter a tensor): every fast weight, state
//! entry and second-order meta-gradient is finite; the third-order gradient (of the
//! squared norm of the meta-gradient) is finite and agrees with finite differences.

use crate::optim_support::*;
use candle_higher::optim::{
    Adadelta, Adagrad, Adam, AdamW, Adamax, DiffOptimizer, Overrides, RmsProp,
};
use candle_higher::{grad, DifferentiableOptimizer, GradOptions, Tensor};

const STEPS: usize = 3;

fn finite(label: &str, what: &str, t: &Tensor) {
    let v = t.to_vec_f64().unwrap();
    assert!(
        v.iter().all(|x| x.is_finite()),
        "{label}: {what} has inf/NaN: {v:?}"
    );
}

/// A problem: initial parameters and a support/query loss over them.
trait Problem {
    fn initial(&self) -> Vec<Tensor>;
    fn support(&self, p: &[Tensor]) -> Tensor;
    fn query(&self, p: &[Tensor]) -> Tensor;
}

struct DeadUnit(Case);

impl Problem for DeadUnit {
    fn initial(&self) -> Vec<Tensor> {
        self.0.initial()
    }
    fn support(&self, p: &[Tensor]) -> Tensor {
        self.0.support_loss(p).unwrap()
    }
    fn query(&self, p: &[Tensor]) -> Tensor {
        self.0.query_loss(p).unwrap()
    }
}

/// `y = s * (x w)`, `s0 = 0`: the gradient of `w` is exactly 0 at the first step.
struct ZeroFirstGradient {
    x: Tensor,
    y: Tensor,
}

impl ZeroFirstGradient {
    fn new() -> Self {
        let dev = crate::common::device();
        ZeroFirstGradient {
            x: Tensor::from_vec(vec![1.0f64, 2.0, -1.0, 0.5, 0.3, -0.7], &[3, 2], &dev).unwrap(),
            y: Tensor::from_vec(vec![0.5f64, -1.0, 2.0], &[3, 1], &dev).unwrap(),
        }
    }
    fn loss(&self, p: &[Tensor]) -> Tensor {
        let pred = self.x.matmul(&p[0]).unwrap().mul(&p[1]).unwrap();
        mse(&pred, &self.y).unwrap()
    }
}

impl Problem for ZeroFirstGradient {
    fn initial(&self) -> Vec<Tensor> {
        let dev = crate::common::device();
        vec![
            Tensor::from_vec(vec![0.3f64, -0.2], &[2, 1], &dev).unwrap(),
            Tensor::from_vec(vec![0.0f64], &[1], &dev).unwrap(),
        ]
    }
    fn support(&self, p: &[Tensor]) -> Tensor {
        self.loss(p)
    }
    fn query(&self, p: &[Tensor]) -> Tensor {
        self.loss(p).mul(2.0).unwrap()
    }
}

/// The meta-loss, its meta-gradient (with a graph) w.r.t. the initial weights and every
/// float hyperparameter, and the inputs. `lr_shift` moves `lr` (for finite differences).
fn unroll<O: DifferentiableOptimizer>(
    label: &str,
    problem: &dyn Problem,
    opt: &O,
    lr_shift: f64,
) -> (Vec<Tensor>, Vec<Tensor>) {
    let p0: Vec<Tensor> = problem.initial().iter().map(Tensor::to_leaf).collect();
    let mut d = DiffOptimizer::new(opt.clone(), &p0).unwrap();
    let mut inputs = p0.clone();
    let mut o = Overrides::new();
    for n in O::FLOAT_NAMES {
        let v = opt.float(n).unwrap() + if *n == "lr" { lr_shift } else { 0.0 };
        let t = Tensor::scalar(v).to_leaf();
        o = o.set(n, t.clone());
        inputs.push(t);
    }
    d.set_overrides(&o).unwrap();
    let mut p = p0;
    for _ in 0..STEPS {
        let loss = problem.support(&p);
        p = d.step_params(&loss, &p).unwrap();
        for t in &p {
            finite(label, "fast weight", t);
        }
        for s in d.states() {
            for (k, v) in s.entries() {
                finite(
                    label,
                    k,
                    &Tensor::from_vec(
                        state_values(&v),
                        &[state_values(&v).len()],
                        &crate::common::device(),
                    )
                    .unwrap(),
                );
            }
        }
    }
    let meta = problem.query(&p);
    finite(label, "meta-loss", &meta);
    let g = grad(
        &[meta],
        &inputs,
        GradOptions::create_graph().allow_unused(true),
    )
    .unwrap();
    let g: Vec<Tensor> = g
        .into_iter()
        .zip(&inputs)
        .map(|(g, x)| g.unwrap_or_else(|| x.zeros_like().unwrap()))
        .collect();
    (g, inputs)
}

fn check<O: DifferentiableOptimizer>(label: &str, problem: &dyn Problem, opt: O) {
    let (g, inputs) = unroll(label, problem, &opt, 0.0);
    // Second order: the meta-gradient.
    for t in &g {
        finite(label, "meta-gradient", t);
    }
    // Third order: the gradient of |meta-gradient|^2.
    let mut norm = g[0].sqr().unwrap().sum_all().unwrap();
    for t in &g[1..] {
        norm = norm.add(t.sqr().unwrap().sum_all().unwrap()).unwrap();
    }
    let g3 = grad(
        &[norm.clone()],
        &inputs,
        GradOptions::default().allow_unused(true),
    )
    .unwrap();
    let lr_index =
        problem.initial().len() + O::FLOAT_NAMES.iter().position(|n| *n == "lr").unwrap();
    for t in g3.iter().flatten() {
        finite(label, "third-order gradient", t);
    }
    // The third-order derivative w.r.t. lr is exact: central differences of |g|^2.
    let sq = |s: f64| {
        let (g, _) = unroll(label, problem, &opt, s);
        g.iter()
            .map(|t| t.sqr().unwrap().sum_all().unwrap().to_scalar_f64().unwrap())
            .sum::<f64>()
    };
    let lr = opt.float("lr").unwrap();
    let h = 1e-6 * lr.abs();
    let fd = (sq(h) - sq(-h)) / (2.0 * h);
    let ours = g3[lr_index]
        .as_ref()
        .map(|t| t.to_scalar_f64().unwrap())
        .unwrap_or(0.0);
    println!("{label}: d|g|^2/dlr = {ours:.10e}, FD {fd:.10e}");
    assert!(
        (ours - fd).abs() <= 1e-5 * fd.abs().max(1e-3),
        "{label}: {ours} vs {fd}"
    );
}

fn both<O: DifferentiableOptimizer>(label: &str, opt: O) {
    let dead = DeadUnit(Case::new("mlp_adam_zero_grad_head.json"));
    check(&format!("{label} (dead unit)"), &dead, opt.clone());
    check(
        &format!("{label} (zero first gradient)"),
        &ZeroFirstGradient::new(),
        opt,
    );
}

#[test]
fn adam() {
    both("adam", Adam::new(0.05));
}

#[test]
fn adam_amsgrad() {
    both(
        "adam amsgrad",
        Adam {
            amsgrad: true,
            betas: (0.9, 0.9),
            ..Adam::new(0.05)
        },
    );
}

#[test]
fn adamw() {
    both(
        "adamw",
        AdamW {
            weight_decay: 0.1,
            ..AdamW::new(0.05)
        },
    );
}

#[test]
fn adagrad() {
    both(
        "adagrad",
        Adagrad {
            lr_decay: 0.01,
            ..Adagrad::new(0.05)
        },
    );
}

#[test]
fn rmsprop() {
    both("rmsprop", RmsProp::new(0.01));
}

#[test]
fn rmsprop_centered() {
    both(
        "rmsprop centered",
        RmsProp {
            centered: true,
            ..RmsProp::new(0.01)
        },
    );
}

#[test]
fn rmsprop_centered_momentum() {
    both(
        "rmsprop centered momentum",
        RmsProp {
            centered: true,
            momentum: 0.9,
            ..RmsProp::new(0.01)
        },
    );
}

#[test]
fn adadelta_and_adamax() {
    both("adadelta", Adadelta::default());
    both("adamax", Adamax::new(0.05));
}

/// The dead unit really gives exact zeros, and the golden file's masked meta-gradients
/// (higher's `_maybe_mask`) are what the safe `sqrt` gives (checked in full by
/// `golden_optim.rs::adam_zero_grad_head`).
#[test]
fn the_dead_unit_has_exactly_zero_gradients() {
    let case = Case::new("mlp_adam_zero_grad_head.json");
    let p: Vec<Tensor> = case.initial().iter().map(Tensor::to_leaf).collect();
    let loss = case.support_loss(&p).unwrap();
    let g = grad(&[loss], &p, GradOptions::default()).unwrap();
    let b0 = g[1].as_ref().unwrap().to_vec_f64().unwrap();
    assert_eq!(b0[0], 0.0);
    let w0 = g[0].as_ref().unwrap().to_vec_f64().unwrap();
    assert_eq!(&w0[..3], &[0.0, 0.0, 0.0]);
}
