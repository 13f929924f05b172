//! Meta-SGD: learning the inner loop's learning rates (one per parameter tensor, or one per
//! element) by differentiating through the unroll, with hyperparameter overrides.
//!
//! Task family: sinusoid regression (y = A sin(x - phase), A in [0.1, 5], phase in [0, pi],
//! x in [-5, 5], K = 10 support and 10 query points), model MLP 1-40-40-1 (ReLU), one
//! inner SGD step. The inner optimizer has one parameter group per tensor, and each group's
//! `lr` is overridden by `exp(log_lr)`, a tensor computed from a leaf, so the meta-gradient
//! reaches `log_lr`. An ordinary Adam optimizer (lr 1e-2) updates the log learning rates
//! and another (lr 1e-3) the initial weights, as Meta-SGD does (`--lrs-only` keeps the
//! weights fixed: then only the learning rates make the adapted model better).
//!
//! With `--per-element`, every weight gets its own learning rate (Meta-SGD proper): the
//! group `lr` is 1 and a gradient callback multiplies each gradient elementwise by
//! `exp(log_lr)`, a tensor of the parameter's shape.
//!
//! `cargo run --release --example learned_lr -- [--iters N] [--inner-steps K] [--lrs-only] [--per-element]`

use candle_higher::nn::{linear, mse, seq, Activation, Parameters, Sequential, VarBuilder};
use candle_higher::optim::{grad_callback, Adam, Optimizer, Sgd};
use candle_higher::{
    backward, innerloop, no_grad, DType, GradStore, InitialWeights, InnerloopOptions, Overrides,
    ParamGroup, Result, Tensor,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[path = "common/args.rs"]
mod args;

const META_BATCH: usize = 10;
const K: usize = 10;
const INITIAL_LR: f64 = 0.01;

/// A sinusoid task's support and query sets: ([K, 1] x, [K, 1] y) each.
fn task(rng: &mut StdRng, n_query: usize) -> Result<[Tensor; 4]> {
    let amp: f64 = rng.gen_range(0.1..5.0);
    let phase: f64 = rng.gen_range(0.0..std::f64::consts::PI);
    let mut points = |n: usize| -> Result<(Tensor, Tensor)> {
        let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-5.0f32..5.0)).collect();
        let y: Vec<f32> = x
            .iter()
            .map(|&x| (amp * (f64::from(x) - phase).sin()) as f32)
            .collect();
        Ok((
            Tensor::from_vec(x, &[n, 1], &candle_higher::device_from_env()?)?,
            Tensor::from_vec(y, &[n, 1], &candle_higher::device_from_env()?)?,
        ))
    };
    let (xs, ys) = points(K)?;
    let (xq, yq) = points(n_query)?;
    Ok([xs, ys, xq, yq])
}

/// The learned learning rates, as the log of a per-tensor scalar or a per-element tensor.
struct LearnedLrs {
    log_lrs: Vec<Tensor>,
    per_element: bool,
}

impl LearnedLrs {
    fn new(params: &[Tensor], per_element: bool) -> Result<Self> {
        let log_lrs = params
            .iter()
            .map(|p| {
                let shape: &[usize] = if per_element { p.dims() } else { &[] };
                Ok(Tensor::full(
                    INITIAL_LR.ln(),
                    shape,
                    DType::F32,
                    &candle_higher::device_from_env()?,
                )?
                .to_leaf())
            })
            .collect::<Result<_>>()?;
        Ok(LearnedLrs {
            log_lrs,
            per_element,
        })
    }

    /// `steps` differentiable SGD steps on the support set from the model's own weights;
    /// returns the query loss (differentiable w.r.t. the weights and the log-lrs).
    fn adapt(&self, model: &Sequential, data: &[Tensor; 4], steps: usize) -> Result<Tensor> {
        let [xs, ys, xq, yq] = data;
        let n = self.log_lrs.len();
        // One parameter group per tensor, so each can have its own `lr`.
        let groups = (0..n).map(|i| ParamGroup::new(vec![i], Sgd::new(INITIAL_LR)));
        let inner_opt = Optimizer::with_groups(n, groups.collect())?;
        let lrs: Vec<Tensor> = self
            .log_lrs
            .iter()
            .map(Tensor::exp)
            .collect::<Result<_>>()?;
        let mut options = InnerloopOptions::new().initial_weights(InitialWeights::BaseParameters);
        if self.per_element {
            // lr 1 in every group; the callback scales each gradient by its own rates.
            options = options
                .overrides(Overrides::new().set("lr", 1.0))
                .callback(grad_callback(move |grads| {
                    grads
                        .iter()
                        .zip(&lrs)
                        .map(|(g, lr)| g.as_ref().map(|g| g.mul(lr)).transpose())
                        .collect()
                }));
        } else {
            options = options.overrides(Overrides::new().per_group("lr", lrs));
        }
        let (mut fmodel, mut diffopt) = innerloop(model, &inner_opt, options)?;
        for _ in 0..steps {
            let loss = mse(&fmodel.forward(xs)?, ys)?;
            diffopt.step(&mut fmodel, &loss)?;
        }
        mse(&fmodel.forward(xq)?, yq)
    }

    /// The learning rates in a line: the value per tensor, or the mean (and range) per
    /// tensor with per-element rates.
    fn describe(&self) -> Result<String> {
        let parts: Vec<String> = self
            .log_lrs
            .iter()
            .map(|l| {
                let v: Vec<f64> = l.exp()?.to_vec_f64()?;
                Ok(if self.per_element {
                    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = v.iter().copied().fold(0.0, f64::max);
                    let mean = v.iter().sum::<f64>() / v.len() as f64;
                    format!("{mean:.1e} [{lo:.0e}, {hi:.0e}]")
                } else {
                    format!("{:.2e}", v[0])
                })
            })
            .collect::<Result<_>>()?;
        Ok(parts.join("  "))
    }
}

fn mlp(seed: u64) -> Result<Sequential> {
    let vb = VarBuilder::new(seed, DType::F32, &candle_higher::device_from_env()?);
    Ok(seq()
        .add(linear(1, 40, vb.pp("0"))?)
        .add(Activation::Relu)
        .add(linear(40, 40, vb.pp("2"))?)
        .add(Activation::Relu)
        .add(linear(40, 1, vb.pp("4"))?))
}

/// Mean query MSE over `tasks` after adaptation with `lrs` (no graph kept).
fn evaluate(
    lrs: &LearnedLrs,
    model: &Sequential,
    tasks: &[[Tensor; 4]],
    steps: usize,
) -> Result<f64> {
    let mut total = 0.0;
    for t in tasks {
        // The inner step needs gradients; only the query loss is not differentiated.
        let q = lrs.adapt(model, t, steps)?;
        let _guard = no_grad();
        total += q.to_scalar_f64()?;
    }
    Ok(total / tasks.len() as f64)
}

fn main() -> Result<()> {
    let args = args::Args::parse(&["iters", "inner-steps"], &["lrs-only", "per-element"])?;
    let iters = args.get("iters", 10000)?;
    let inner_steps = args.get("inner-steps", 1)?;
    let lrs_only = args.has("lrs-only");
    let per_element = args.has("per-element");

    let mut rng = StdRng::seed_from_u64(3);
    let mut model = mlp(0)?;
    let names: Vec<String> = model
        .named_parameters()?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut lrs = LearnedLrs::new(&model.parameters()?, per_element)?;
    let untouched = LearnedLrs::new(&model.parameters()?, per_element)?;
    let initial_model = model.clone();
    let mut lr_opt = Optimizer::new(Adam::new(1e-2), lrs.log_lrs.len())?;
    let mut weight_opt = Optimizer::new(Adam::new(1e-3), lrs.log_lrs.len())?;

    let mut test_rng = StdRng::seed_from_u64(999);
    let test_tasks: Vec<[Tensor; 4]> = (0..100)
        .map(|_| task(&mut test_rng, 100))
        .collect::<Result<_>>()?;

    println!(
        "Meta-SGD on sinusoids: {} learning rates ({}), {inner_steps} inner step(s), meta-batch {META_BATCH}, {} learned",
        if per_element { "per-element" } else { "per-tensor" },
        names.join(", "),
        if lrs_only { "learning rates only" } else { "learning rates and initial weights" }
    );
    println!("iteration | query MSE after adaptation (training tasks, mean since the last line) | learned lrs");
    let started = std::time::Instant::now();
    let mut recent = Vec::new();
    for it in 0..=iters {
        if it % (iters / 10).max(1) == 0 {
            let mean = if recent.is_empty() {
                "-".to_string()
            } else {
                format!("{:.3}", recent.iter().sum::<f64>() / recent.len() as f64)
            };
            println!("{it:>9} | {mean:>8} | {}", lrs.describe()?);
            recent.clear();
        }
        if it == iters {
            break;
        }
        let mut grads = GradStore::default();
        let mut query = 0.0;
        for _ in 0..META_BATCH {
            let q = lrs
                .adapt(&model, &task(&mut rng, K)?, inner_steps)?
                .affine(1.0 / META_BATCH as f64, 0.0)?;
            query += q.to_scalar_f64()?;
            grads.accumulate(&backward(&q)?)?;
        }
        recent.push(query);
        lr_opt.step(&mut lrs.log_lrs, &grads)?;
        if !lrs_only {
            weight_opt.step_module(&mut model, &grads)?;
        }
    }
    println!(
        "trained {iters} iterations in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    println!("meta-test on 100 new tasks (100 query points each), query MSE after {inner_steps} step(s):");
    let before = evaluate(&untouched, &initial_model, &test_tasks, inner_steps)?;
    println!("  initial weights, lr {INITIAL_LR} everywhere: {before:.3}");
    if !lrs_only {
        let learned_init = evaluate(&untouched, &model, &test_tasks, inner_steps)?;
        println!("  learned weights, lr {INITIAL_LR} everywhere: {learned_init:.3}");
    }
    let after = evaluate(&lrs, &model, &test_tasks, inner_steps)?;
    println!(
        "  {} weights, learned lrs:           {after:.3}",
        if lrs_only { "initial" } else { "learned" }
    );
    Ok(())
}
