//! Two optimizers that PyTorch `higher` does not ship, written with
//! `#[differentiable_optimizer]`: Lion (Chen et al. 2023) and AdaBelief (Zhuang et al.
//! 2020). For each: the ordinary form trains a least-squares model; the twin takes the
//! same steps; the twin's meta-gradients agree with central finite differences.

use candle_higher::optim::TwinHyperparameters;
use candle_higher::{
    differentiable_optimizer, grad, GradOptions, Hyperparameters, OptimizerStep, Result, Scalar,
    State, Tensor,
};

#[differentiable_optimizer]
pub(crate) struct Lion {
    pub lr: f64,
    pub betas: (f64, f64),
    pub weight_decay: f64,
}

#[differentiable_optimizer]
impl Lion {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let exp_avg = state.get_or_insert_with("exp_avg", || p.zeros_like())?;
        p.mul_(1.0 - self.lr * self.weight_decay)?;
        let update = (exp_avg.mul(self.betas.0)? + grad.mul(1.0 - self.betas.0)?)?.sign()?;
        p.sub_(&update.mul(self.lr)?)?;
        exp_avg
            .mul_(self.betas.1)?
            .add_(&grad.mul(1.0 - self.betas.1)?)?;
        Ok(())
    }
}

/// AdaBelief with optional decoupled weight decay (a flag) and a step counter.
#[differentiable_optimizer]
pub(crate) struct AdaBelief {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    pub decoupled: bool,
}

#[differentiable_optimizer]
impl AdaBelief {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let step = i32::try_from(state.increment("step")).unwrap_or(i32::MAX);
        let mut g = grad.clone();
        if self.weight_decay != 0.0 {
            if self.decoupled {
                p.mul_(1.0 - self.lr * self.weight_decay)?;
            } else {
                g.add_(&p.mul(self.weight_decay)?)?;
            }
        }
        let exp_avg = state.get_or_insert_with("exp_avg", || p.zeros_like())?;
        let exp_avg_var = state.get_or_insert_with("exp_avg_var", || p.zeros_like())?;
        exp_avg.lerp_(&g, 1.0 - self.betas.0)?;
        let diff = g.sub(&exp_avg)?;
        exp_avg_var
            .mul_(self.betas.1)?
            .addcmul_(&diff, &diff, 1.0 - self.betas.1)?
            .add_(self.eps)?;
        let bias_correction1 = 1.0 - self.betas.0.powi(step);
        let bias_correction2 = 1.0 - self.betas.1.powi(step);
        let denom = (exp_avg_var.div(bias_correction2)?.sqrt()? + self.eps)?;
        p.addcdiv_(&exp_avg, &denom, -self.lr / bias_correction1)?;
        Ok(())
    }
}

/// A small least-squares problem: `X w ≈ y` with `X` 12x3, plus a validation set.
struct Problem {
    x: Tensor,
    y: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    w0: Vec<f64>,
}

fn lcg(seed: &mut u64) -> f64 {
    *seed = seed
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
}

fn problem() -> Problem {
    let dev = crate::common::device();
    let mut seed = 7;
    let w_true = [0.8, -1.3, 0.5];
    let mut data = |n: usize| {
        let x: Vec<f64> = (0..n * 3).map(|_| lcg(&mut seed)).collect();
        let y: Vec<f64> = (0..n)
            .map(|i| (0..3).map(|j| x[i * 3 + j] * w_true[j]).sum::<f64>() + 0.05 * lcg(&mut seed))
            .collect();
        (
            Tensor::from_vec(x, &[n, 3], &dev).unwrap(),
            Tensor::from_vec(y, &[n, 1], &dev).unwrap(),
        )
    };
    let (x, y) = data(12);
    let (x_val, y_val) = data(6);
    Problem {
        x,
        y,
        x_val,
        y_val,
        w0: vec![0.1, 0.2, -0.3],
    }
}

fn loss(w: &Tensor, x: &Tensor, y: &Tensor) -> Result<Tensor> {
    x.matmul(w)?.sub(y)?.sqr()?.mean_all()
}

/// `steps` steps of `opt` from `w`; with `create_graph` the inner gradients are recorded
/// (the twin's unrolled loop), otherwise each step starts from a fresh leaf.
fn run<O: OptimizerStep>(
    opt: &O,
    pb: &Problem,
    w: &Tensor,
    steps: usize,
    create_graph: bool,
) -> Result<Vec<Tensor>> {
    let mut w = w.clone();
    let mut state = State::new();
    let mut trajectory = Vec::new();
    for _ in 0..steps {
        let l = loss(&w, &pb.x, &pb.y)?;
        let options = if create_graph {
            GradOptions::create_graph()
        } else {
            GradOptions::default()
        };
        let g = grad(&[l], &[w.clone()], options)?[0].clone().expect("used");
        opt.step(&mut w, &g, &mut state)?;
        if !create_graph {
            w = w.detach().to_leaf();
        }
        trajectory.push(w.clone());
    }
    Ok(trajectory)
}

fn leaf(values: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_vec(values.to_vec(), shape, &crate::common::device())
        .unwrap()
        .to_leaf()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64().unwrap()
}

/// The ordinary form trains: the training loss falls by at least `factor`.
fn trains<O: OptimizerStep>(opt: &O, steps: usize, factor: f64) {
    let pb = problem();
    let w0 = leaf(&pb.w0, &[3, 1]);
    let before = loss(&w0, &pb.x, &pb.y).unwrap().to_scalar_f64().unwrap();
    let w = run(opt, &pb, &w0, steps, false).unwrap().pop().unwrap();
    let after = loss(&w, &pb.x, &pb.y).unwrap().to_scalar_f64().unwrap();
    assert!(
        after < before / factor,
        "loss went from {before} to {after} in {steps} steps"
    );
}

/// The twin, with every float hyperparameter a leaf tensor, takes the same steps as the
/// ordinary form (to 1e-12 over 5 steps).
fn twin_matches<O: Hyperparameters + OptimizerStep>(opt: &O) {
    let pb = problem();
    let ordinary = run(opt, &pb, &leaf(&pb.w0, &[3, 1]), 5, false).unwrap();
    let (twin, _) = tensor_twin(opt);
    let unrolled = run(&twin, &pb, &leaf(&pb.w0, &[3, 1]), 5, true).unwrap();
    for (step, (a, b)) in ordinary.iter().zip(&unrolled).enumerate() {
        for (x, y) in values(a).iter().zip(values(b)) {
            assert!((x - y).abs() <= 1e-12, "step {step}: {x} vs {y}");
        }
    }
}

/// The twin with every float hyperparameter replaced by a leaf tensor of its value.
fn tensor_twin<O: Hyperparameters>(opt: &O) -> (O::Twin, Vec<Tensor>) {
    let mut twin = opt.twin();
    let leaves: Vec<Tensor> = O::FLOAT_NAMES
        .iter()
        .map(|name| {
            let t = Tensor::scalar(opt.float(name).unwrap()).to_leaf();
            twin.set(name, Scalar::Tensor(t.clone())).unwrap();
            t
        })
        .collect();
    (twin, leaves)
}

/// Meta-gradients of the validation loss after 5 unrolled steps, w.r.t. the initial
/// weights and every float hyperparameter, against central differences of the ordinary
/// form: `dL/dθ ≈ (L(θ + h) - L(θ - h)) / 2h`, error O(h²).
fn meta_gradients_match_fd<O: Hyperparameters + OptimizerStep>(opt: &O) {
    const STEPS: usize = 5;
    let pb = problem();
    let meta_loss = |o: &O, w0: &[f64]| -> f64 {
        let w = run(o, &pb, &leaf(w0, &[3, 1]), STEPS, false)
            .unwrap()
            .pop()
            .unwrap();
        loss(&w, &pb.x_val, &pb.y_val)
            .unwrap()
            .to_scalar_f64()
            .unwrap()
    };
    let (twin, hyper_leaves) = tensor_twin(opt);
    let w0 = leaf(&pb.w0, &[3, 1]);
    let w = run(&twin, &pb, &w0, STEPS, true).unwrap().pop().unwrap();
    let meta = loss(&w, &pb.x_val, &pb.y_val).unwrap();
    let mut inputs = vec![w0.clone()];
    inputs.extend(hyper_leaves.iter().cloned());
    let grads = grad(&[meta], &inputs, GradOptions::default().allow_unused(true)).unwrap();
    let zero = |g: &Option<Tensor>, n: usize| g.as_ref().map_or(vec![0.0; n], values);

    let h = 1e-6;
    let close = |analytic: f64, fd: f64, what: &str| {
        assert!(
            (analytic - fd).abs() <= 1e-6 * (1.0 + fd.abs()),
            "{what}: analytic {analytic} vs finite differences {fd}"
        );
    };
    for (i, analytic) in zero(&grads[0], 3).into_iter().enumerate() {
        let (mut plus, mut minus) = (pb.w0.clone(), pb.w0.clone());
        plus[i] += h;
        minus[i] -= h;
        let fd = (meta_loss(opt, &plus) - meta_loss(opt, &minus)) / (2.0 * h);
        close(analytic, fd, &format!("w0[{i}]"));
    }
    for (k, name) in O::FLOAT_NAMES.iter().enumerate() {
        let analytic = zero(&grads[k + 1], 1)[0];
        let value = opt.float(name).unwrap();
        let (mut plus, mut minus) = (opt.clone(), opt.clone());
        plus.set_float(name, value + h).unwrap();
        minus.set_float(name, value - h).unwrap();
        let fd = (meta_loss(&plus, &pb.w0) - meta_loss(&minus, &pb.w0)) / (2.0 * h);
        close(analytic, fd, name);
    }
}

fn lion() -> Lion {
    Lion {
        lr: 0.02,
        betas: (0.9, 0.99),
        weight_decay: 0.1,
    }
}

fn adabelief(decoupled: bool) -> AdaBelief {
    AdaBelief {
        lr: 0.05,
        betas: (0.9, 0.999),
        eps: 1e-3,
        weight_decay: 0.01,
        decoupled,
    }
}

#[test]
fn float_names_flatten_tuples() {
    assert_eq!(
        Lion::FLOAT_NAMES,
        ["lr", "betas.0", "betas.1", "weight_decay"]
    );
    let mut lion = lion();
    lion.set_float("betas.1", 0.5).unwrap();
    assert_eq!(lion.float("betas.1"), Some(0.5));
    let err = lion.set_float("beta", 0.5).unwrap_err().to_string();
    assert!(err.contains("lr, betas.0, betas.1, weight_decay"), "{err}");
    assert!(lion.twin().get("betas.1").is_some());
}

#[test]
fn lion_trains() {
    trains(&lion(), 150, 20.0);
}

#[test]
fn adabelief_trains() {
    trains(&adabelief(false), 150, 20.0);
    trains(&adabelief(true), 150, 20.0);
}

#[test]
fn lion_twin_matches_ordinary() {
    twin_matches(&lion());
}

#[test]
fn adabelief_twin_matches_ordinary() {
    twin_matches(&adabelief(false));
    twin_matches(&adabelief(true));
}

#[test]
fn lion_meta_gradients_match_finite_differences() {
    meta_gradients_match_fd(&lion());
}

#[test]
fn adabelief_meta_gradients_match_finite_differences() {
    meta_gradients_match_fd(&adabelief(false));
    meta_gradients_match_fd(&adabelief(true));
}

/// The state alias is written back: after a step the state holds the updated moment.
#[test]
fn state_alias_is_written_back() {
    let opt = lion();
    let mut p = leaf(&[1.0, -2.0], &[2]);
    let g = leaf(&[0.5, -0.5], &[2]);
    let mut state = State::new();
    opt.step(&mut p, &g, &mut state).unwrap();
    // exp_avg = 0.99 * 0 + 0.01 * g
    let m = values(&state.get("exp_avg").unwrap());
    assert!(
        (m[0] - 0.005).abs() < 1e-15 && (m[1] + 0.005).abs() < 1e-15,
        "{m:?}"
    );
}
