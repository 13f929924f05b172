//! A deep energy model: predict y by minimising a learned energy E(x, y) with a few steps
//! of a differentiable optimizer on bare tensors, and train E through that optimization.
//!
//! E is an MLP 2-64-64-1 (softplus) of the pair (x, y). A prediction starts from y = 0 and
//! takes 10 steps of SGD (lr 0.5, momentum 0.5) on `sum_i E(x_i, y_i)` with respect to the
//! y's: a `DiffOptimizer` over one bare tensor, `step_params`, no model or fmodel. The
//! steps are recorded, so the regression loss of the final y's reaches E's parameters
//! through every inner gradient (second order), and an ordinary Adam (5e-3) trains E.
//!
//! Toy 1-D task: y = sin(3x) + 0.3x on x in [-2, 2], 128 fresh points per iteration.
//! `cargo run --release --example deep_energy -- [--iters N] [--inner-steps K]`

use candle_higher::nn::{linear, mse, seq, Activation, Module, Parameters, Sequential, VarBuilder};
use candle_higher::optim::{Adam, Optimizer, Sgd};
use candle_higher::{backward, DType, DiffOptimizer, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[path = "common/args.rs"]
mod args;

const BATCH: usize = 128;

fn target(x: f32) -> f32 {
    (3.0 * x).sin() + 0.3 * x
}

/// `n` points with x uniform on [-2, 2]: ([n, 1], [n, 1]).
fn batch(rng: &mut StdRng, n: usize) -> Result<(Tensor, Tensor)> {
    let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
    let y: Vec<f32> = x.iter().map(|&x| target(x)).collect();
    Ok((
        Tensor::from_vec(x, &[n, 1], &candle_higher::device_from_env()?)?,
        Tensor::from_vec(y, &[n, 1], &candle_higher::device_from_env()?)?,
    ))
}

/// The prediction for `x` [n, 1]: `steps` differentiable SGD steps on the energy,
/// starting from y = 0. The result keeps its graph back to the energy's parameters.
fn predict(energy: &Sequential, x: &Tensor, steps: usize) -> Result<Tensor> {
    // The starting point must require grad for the inner gradient to exist.
    let y0 = Tensor::zeros(x.dims(), DType::F32, &candle_higher::device_from_env()?)?.to_leaf();
    let sgd = Sgd {
        momentum: 0.5,
        ..Sgd::new(0.5)
    };
    let mut opt = DiffOptimizer::new(sgd, std::slice::from_ref(&y0))?;
    let mut y = y0;
    for _ in 0..steps {
        // The energies of different points do not interact, so one step on their sum
        // is one step per point.
        let e = energy
            .forward(&Tensor::cat(&[x.clone(), y.clone()], 1)?)?
            .sum_all()?;
        y = opt.step_params(&e, &[y])?.remove(0);
    }
    Ok(y)
}

fn main() -> Result<()> {
    let args = args::Args::parse(&["iters", "inner-steps"], &[])?;
    let iters = args.get("iters", 1500)?;
    let steps = args.get("inner-steps", 10)?;

    let vb = VarBuilder::new(0, DType::F32, &candle_higher::device_from_env()?);
    let mut energy = seq()
        .add(linear(2, 64, vb.pp("0"))?)
        .add(Activation::Softplus)
        .add(linear(64, 64, vb.pp("2"))?)
        .add(Activation::Softplus)
        .add(linear(64, 1, vb.pp("4"))?);
    let mut opt = Optimizer::new(Adam::new(5e-3), energy.parameters()?.len())?;
    let mut rng = StdRng::seed_from_u64(0);
    let (x_test, y_test) = batch(&mut StdRng::seed_from_u64(1), 512)?;

    println!(
        "energy MLP 2-64-64-1, prediction = {steps} SGD steps on y from 0; y = sin(3x) + 0.3x"
    );
    println!("iteration | training MSE (mean since the last line) | test MSE");
    let started = std::time::Instant::now();
    let mut recent = Vec::new();
    for it in 0..=iters {
        if it % (iters / 10).max(1) == 0 {
            let test = mse(&predict(&energy, &x_test, steps)?, &y_test)?.to_scalar_f64()?;
            let train = if recent.is_empty() {
                "-".to_string()
            } else {
                format!("{:.4}", recent.iter().sum::<f64>() / recent.len() as f64)
            };
            println!("{it:>9} | {train:>8} | {test:.4}");
            recent.clear();
        }
        if it == iters {
            break;
        }
        let (x, y) = batch(&mut rng, BATCH)?;
        let loss = mse(&predict(&energy, &x, steps)?, &y)?;
        recent.push(loss.to_scalar_f64()?);
        opt.step_module(&mut energy, &backward(&loss)?)?;
    }
    println!(
        "trained {iters} iterations in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let xs: Vec<f32> = vec![-1.8, -1.2, -0.6, 0.0, 0.5, 1.0, 1.5, 1.9];
    let x = Tensor::from_vec(
        xs.clone(),
        &[xs.len(), 1],
        &candle_higher::device_from_env()?,
    )?;
    let pred = predict(&energy, &x, steps)?.to_vec_f64()?;
    println!("    x | prediction | target");
    for (x, p) in xs.iter().zip(pred) {
        println!("{x:>5.2} | {p:>10.3} | {:>6.3}", target(*x));
    }
    Ok(())
}
