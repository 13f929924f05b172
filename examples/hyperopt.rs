//! Hyperparameter optimization through a long unroll (Maclaurin et al., 2015): the
//! learning rate and the weight decay of 100 SGD steps, learned from the validation loss
//! at the end of the unroll.
//!
//! Polynomial regression (features x, x^2, ..., x^8 of 12 noisy training points) with a
//! linear model. Both hyperparameters are tensor overrides of `Sgd::new(0.0)` (whose floats
//! are 0: an override reaches them anyway), parametrised as `exp(log_lr)` and
//! `exp(log_wd)` so they stay positive. Each outer iteration unrolls 100 differentiable SGD
//! steps from the same initial weights, takes the validation loss, and steps the two
//! log-hyperparameters with Adam. The hypergradient is checked against central finite
//! differences of the whole unroll first.
//!
//! `cargo run --release --example hyperopt`

use candle_higher::nn::{self, Parameters};
use candle_higher::optim::{Adam, Optimizer, Overrides, Sgd};
use candle_higher::{
    backward, grad, innerloop, DType, GradOptions, InnerloopOptions, Result, Tensor,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const STEPS: usize = 100;
const DEGREE: usize = 8;

/// `n` points of `sin(3x) + noise` on [-1, 1], as polynomial features `[n, DEGREE]` and
/// targets `[n, 1]`.
fn data(rng: &mut StdRng, n: usize, noise: f64) -> Result<(Tensor, Tensor)> {
    let mut features = Vec::with_capacity(n * DEGREE);
    let mut targets = Vec::with_capacity(n);
    for _ in 0..n {
        let x: f64 = rng.gen_range(-1.0..1.0);
        features.extend((1..=DEGREE).map(|p| x.powi(p as i32)));
        targets.push((3.0 * x).sin() + noise * rng.gen_range(-1.0..1.0));
    }
    Ok((
        Tensor::from_vec(features, &[n, DEGREE], &candle_higher::device_from_env()?)?,
        Tensor::from_vec(targets, &[n, 1], &candle_higher::device_from_env()?)?,
    ))
}

/// The validation loss after `STEPS` SGD steps with learning rate `exp(log_lr)` and weight
/// decay `exp(log_wd)`, differentiable in both.
fn unrolled_validation_loss(
    model: &nn::Linear,
    (log_lr, log_wd): (&Tensor, &Tensor),
    (x, y): (&Tensor, &Tensor),
    (x_val, y_val): (&Tensor, &Tensor),
) -> Result<Tensor> {
    let inner = Optimizer::new(Sgd::new(0.0), model.parameters()?.len())?;
    let overrides = Overrides::new()
        .set("lr", log_lr.exp()?)
        .set("weight_decay", log_wd.exp()?);
    let options = InnerloopOptions::new().overrides(overrides);
    let (mut fmodel, mut diffopt) = innerloop(model, &inner, options)?;
    for _ in 0..STEPS {
        let loss = nn::mse(&fmodel.forward(x)?, y)?;
        diffopt.step(&mut fmodel, &loss)?;
    }
    nn::mse(&fmodel.forward(x_val)?, y_val)
}

fn main() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(0);
    let train = data(&mut rng, 12, 0.3)?;
    let val = data(&mut rng, 200, 0.0)?;
    let (train, val) = ((&train.0, &train.1), (&val.0, &val.1));
    let model = nn::linear(
        DEGREE,
        1,
        nn::VarBuilder::new(0, DType::F64, &candle_higher::device_from_env()?),
    )?;

    let leaf = |v: f64| Tensor::scalar(v).to_leaf();
    let (lr0, wd0) = (0.1f64.ln(), 1e-3f64.ln());

    // The hypergradient against central finite differences of the whole unroll.
    let (log_lr, log_wd) = (leaf(lr0), leaf(wd0));
    let loss = unrolled_validation_loss(&model, (&log_lr, &log_wd), train, val)?;
    let g = grad(
        &[loss],
        &[log_lr.clone(), log_wd.clone()],
        GradOptions::default(),
    )?;
    let h = 1e-5;
    let at = |a: f64, b: f64| -> Result<f64> {
        unrolled_validation_loss(&model, (&Tensor::scalar(a), &Tensor::scalar(b)), train, val)?
            .to_scalar_f64()
    };
    let fd = [
        (at(lr0 + h, wd0)? - at(lr0 - h, wd0)?) / (2.0 * h),
        (at(lr0, wd0 + h)? - at(lr0, wd0 - h)?) / (2.0 * h),
    ];
    for (i, name) in ["log lr", "log weight decay"].iter().enumerate() {
        let analytic = g[i]
            .as_ref()
            .expect("both reach the loss")
            .to_scalar_f64()?;
        println!(
            "d val loss / d {name}: {analytic:.10}  finite difference {:.10}",
            fd[i]
        );
        assert!((analytic - fd[i]).abs() <= 1e-6 * (1.0 + fd[i].abs()));
    }

    // Learn both with Adam on the log-hyperparameters.
    let mut hypers = vec![log_lr, log_wd];
    let mut meta_opt = Optimizer::new(Adam::new(0.2), 2)?;
    let first = at(lr0, wd0)?;
    for _ in 0..100 {
        let loss = unrolled_validation_loss(&model, (&hypers[0], &hypers[1]), train, val)?;
        meta_opt.step(&mut hypers, &backward(&loss)?)?;
    }
    let (lr, wd) = (hypers[0].to_scalar_f64()?, hypers[1].to_scalar_f64()?);
    println!(
        "validation MSE after {STEPS} steps: {first:.4} at lr 0.1, weight decay 0.001; \
         {:.4} at lr {:.4}, weight decay {:.2e} (100 Adam steps on the hyperparameters)",
        at(lr, wd)?,
        lr.exp(),
        wd.exp()
    );
    Ok(())
}
