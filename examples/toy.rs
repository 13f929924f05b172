//! The toy example from higher's docs: gradients of a loss after 5 unrolled SGD steps with
//! respect to the initial weight, the learning rate and the momentum (all as tensors).
//!
//! A 1x1 linear model without bias, data y = 3.5 x (x: 100 samples of N(0, 1), drawn here
//! from a fixed seed), initial weight 0.940106003613106 (the weight in higher's golden
//! run), inner optimizer SGD(lr = 0.3, momentum = 0.5) with both hyperparameters overridden
//! by leaf tensors, 5 steps of `((w x - y)^2).mean()`, meta-loss `(w_5 - 3.5)^2`. Everything
//! is f64, and the meta-gradient for the initial weight is checked against a central
//! finite difference of the whole unroll.
//!
//! `cargo run --release --example toy [-- --golden]`: with `--golden`, x is read from
//! `tests/golden/seed_toy.json` (higher 0.2.1's data) and the reference values recorded
//! there are printed beside ours.

use candle_higher::nn::{linear_no_bias, mse, Linear, Parameters, VarBuilder};
use candle_higher::optim::{Optimizer, Sgd};
use candle_higher::{
    grad, innerloop, DType, GradOptions, InitialWeights, InnerloopOptions, Overrides, Result,
    Tensor,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[path = "common/args.rs"]
mod args;

const W0: f64 = 0.940106003613106;
const STEPS: usize = 5;

/// 100 samples of N(0, 1) (Box-Muller from a seeded generator).
fn normal_samples(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let u1: f64 = 1.0 - rng.gen::<f64>();
            let u2: f64 = rng.gen();
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
        .collect()
}

/// The golden file's x and its reference outputs (only with `--golden`).
fn golden() -> std::result::Result<(Vec<f64>, serde_json::Value), Box<dyn std::error::Error>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/seed_toy.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let x = json["data"]["x"]
        .as_array()
        .ok_or("data.x is not an array")?
        .iter()
        .map(|row| row[0].as_f64().ok_or("data.x holds a non-number"))
        .collect::<std::result::Result<_, _>>()?;
    Ok((x, json))
}

/// The model with weight `w0` (a leaf, so the meta-gradient reaches it).
fn model(w0: f64) -> Result<Linear> {
    let mut m = linear_no_bias(
        1,
        1,
        VarBuilder::new(0, DType::F64, &candle_higher::device_from_env()?),
    )?;
    m.set_parameters(&[
        Tensor::from_vec(vec![w0], &[1, 1], &candle_higher::device_from_env()?)?.to_leaf(),
    ])?;
    Ok(m)
}

/// Runs the 5-step unroll from `model` with learning rate and momentum `lr`, `momentum`
/// (tensors of shape [1]); returns the weights w_0..w_5 and the meta-loss.
fn unroll(
    model: &Linear,
    x: &Tensor,
    y: &Tensor,
    lr: &Tensor,
    momentum: &Tensor,
) -> Result<(Vec<Tensor>, Tensor)> {
    // The hyperparameters given to the ordinary optimizer are placeholders: the overrides
    // replace them with the tensors (higher's `override=`).
    let opt = Optimizer::new(
        Sgd {
            momentum: 0.5,
            ..Sgd::new(0.3)
        },
        1,
    )?;
    let options = InnerloopOptions::new()
        .initial_weights(InitialWeights::BaseParameters)
        .overrides(
            Overrides::new()
                .set("lr", lr.clone())
                .set("momentum", momentum.clone()),
        );
    let (mut fmodel, mut diffopt) = innerloop(model, &opt, options)?;
    let mut weights = vec![fmodel.fast_params()[0].clone()];
    for _ in 0..STEPS {
        let loss = mse(&fmodel.forward(x)?, y)?;
        let new = diffopt.step(&mut fmodel, &loss)?;
        weights.push(new[0].clone());
    }
    let meta_loss = weights[STEPS].affine(1.0, -3.5)?.sqr()?.sum_all()?;
    Ok((weights, meta_loss))
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let use_golden = args::Args::parse(&[], &["golden"])?.has("golden");
    let (xs, reference) = if use_golden {
        let (x, json) = golden()?;
        (x, Some(json))
    } else {
        (normal_samples(100, 0), None)
    };
    let dev = candle_higher::device_from_env()?;
    let x = Tensor::from_vec(xs.clone(), &[xs.len(), 1], &dev)?;
    let y = x.mul(3.5)?;
    let lr = Tensor::from_vec(vec![0.3f64], &[1], &dev)?.to_leaf();
    let momentum = Tensor::from_vec(vec![0.5f64], &[1], &dev)?.to_leaf();

    let started = std::time::Instant::now();
    let base = model(W0)?;
    let w0 = base.parameters()?[0].clone();
    let (weights, meta_loss) = unroll(&base, &x, &y, &lr, &momentum)?;
    for (t, w) in weights.iter().enumerate() {
        println!("w_{t} = {:.15}", w.to_scalar_f64()?);
    }
    let meta = meta_loss.to_scalar_f64()?;
    println!("meta-loss (w_5 - 3.5)^2 = {meta:.15}");
    let g = grad(
        &[meta_loss],
        &[w0, lr.clone(), momentum.clone()],
        GradOptions::default(),
    )?;
    let g: Vec<f64> = g
        .iter()
        .map(|g| g.as_ref().expect("every input is used").to_scalar_f64())
        .collect::<Result<_>>()?;
    println!("d meta-loss / d w_0      = {:+.15}", g[0]);
    println!("d meta-loss / d lr       = {:+.15}", g[1]);
    println!("d meta-loss / d momentum = {:+.15}", g[2]);

    // Central finite difference over the whole unroll, in f64.
    let h = 1e-6;
    let meta_at = |w0: f64| -> Result<f64> {
        let (_, m) = unroll(&model(w0)?, &x, &y, &lr, &momentum)?;
        m.to_scalar_f64()
    };
    let fd = (meta_at(W0 + h)? - meta_at(W0 - h)?) / (2.0 * h);
    println!(
        "meta-gradient vs finite difference: {:.12e} VS {:.12e}",
        g[0], fd
    );
    println!(
        "relative difference {:.1e}; {:.1} ms in all",
        (g[0] - fd).abs() / fd.abs(),
        1e3 * started.elapsed().as_secs_f64()
    );

    if let Some(json) = reference {
        let o = &json["outputs"];
        println!("higher 0.2.1 on the same data (golden file):");
        println!(
            "  w_5 = {}, meta-loss = {}, d/d w_0 = {}, d/d lr = {}, d/d momentum = {}",
            o["w"][STEPS][0][0],
            o["meta_loss"],
            o["d_meta_loss_d_w0"][0][0],
            o["d_meta_loss_d_lr"][0],
            o["d_meta_loss_d_momentum"][0]
        );
    }
    Ok(())
}
