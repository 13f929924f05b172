//! Zero-order meta-gradients: evolution-strategies estimates (`unroll::es_gradient`) of the
//! gradient of a meta-loss with respect to two hyperparameters of an inner loop treated as a
//! black box, against the exact meta-gradient of the same unroll (`checkpointed_unroll`),
//! for each estimator and a growing number of samples: error against standard error.
//!
//! Inner loop: linear regression with 5 features on 40 points (f64), 100 steps of SGD with
//! learning rate `exp(h[0])` and momentum `h[1]`, at h = (ln 0.05, 0.5); meta-loss: the MSE on
//! 40 validation points. Smoothing sigma = 0.01.
//!
//! `cargo run --release --example zero_order`

use candle_higher::optim::{DiffOptimizer, Overrides, Sgd};
use candle_higher::unroll::{
    checkpointed_unroll, es_gradient, CheckpointOptions, EsMethod, EsOptions, OptimizerCarry,
};
use candle_higher::{Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const STEPS: usize = 100;

fn uniform(rng: &mut StdRng, shape: &[usize]) -> Result<Tensor> {
    let n = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &candle_higher::device_from_env()?)
}

struct Problem {
    w0: Tensor,
    x: Tensor,
    y: Tensor,
    xv: Tensor,
    yv: Tensor,
}

fn problem() -> Result<Problem> {
    let mut rng = StdRng::seed_from_u64(3);
    let w_true = uniform(&mut rng, &[5, 1])?;
    let x = uniform(&mut rng, &[40, 5])?;
    let xv = uniform(&mut rng, &[40, 5])?;
    let y = x
        .matmul(&w_true)?
        .add(&uniform(&mut rng, &[40, 1])?.affine(0.3, 0.0)?)?;
    let yv = xv
        .matmul(&w_true)?
        .add(&uniform(&mut rng, &[40, 1])?.affine(0.3, 0.0)?)?;
    Ok(Problem {
        w0: Tensor::zeros(
            &[5, 1],
            candle_higher::DType::F64,
            &candle_higher::device_from_env()?,
        )?,
        x,
        y,
        xv,
        yv,
    })
}

/// The meta-loss after the unroll at hyperparameters `h` ([2]); with `h` a leaf, also its
/// exact gradient.
fn unroll(p: &Problem, h: &Tensor) -> Result<(f64, Option<Tensor>)> {
    let lr = h.narrow(0, 0, 1)?.exp()?;
    let momentum = h.narrow(0, 1, 1)?;
    let sgd = Sgd {
        momentum: 0.5,
        ..Sgd::new(0.05)
    };
    let mut opt = DiffOptimizer::new(sgd, std::slice::from_ref(&p.w0))?;
    opt.set_overrides(&Overrides::new().set("lr", lr).set("momentum", momentum))?;
    let carry = OptimizerCarry::new(vec![p.w0.clone()], opt);
    let mse = |w: &Tensor, x: &Tensor, y: &Tensor| x.matmul(w)?.sub(y)?.sqr()?.mean_all();
    // A constant h (the zero-order estimates) is no hyperparameter to differentiate.
    let hyper = if h.requires_grad() {
        std::slice::from_ref(h)
    } else {
        &[]
    };
    let out = checkpointed_unroll(
        &carry,
        STEPS,
        hyper,
        |c, _| c.step(&mse(&c.params[0], &p.x, &p.y)?, None),
        |c| mse(&c.params[0], &p.xv, &p.yv),
        &CheckpointOptions::default(),
    )?;
    Ok((
        out.meta_loss.to_scalar_f64()?,
        out.hyper_grads.first().cloned().flatten(),
    ))
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn main() -> Result<()> {
    let p = problem()?;
    let h = Tensor::from_vec(
        vec![0.05f64.ln(), 0.5],
        &[2],
        &candle_higher::device_from_env()?,
    )?;
    let (loss, exact) = unroll(&p, &h.to_leaf())?;
    let exact = exact
        .expect("the meta-loss depends on the hyperparameters")
        .to_vec_f64()?;
    println!("meta-loss {loss:.6}, exact meta-gradient {exact:.6?}");
    println!(
        "| estimator | samples | evaluations | |error| | |std error| | |error| / |std error| |"
    );
    println!("|---|---|---|---|---|---|");
    for method in [EsMethod::Naive, EsMethod::Forward, EsMethod::Antithetic] {
        for samples in [10, 100, 1000] {
            let options = EsOptions {
                sigma: 0.01,
                samples,
                method,
                seed: 1,
            };
            let est = es_gradient(
                |hs| Tensor::scalar(unroll(&p, &hs[0])?.0).to_dtype(candle_higher::DType::F64),
                std::slice::from_ref(&h),
                &options,
            )?;
            let g = est.grads[0].to_vec_f64()?;
            let err: Vec<f64> = g.iter().zip(&exact).map(|(a, b)| a - b).collect();
            let se = norm(&est.std_errors[0].to_vec_f64()?);
            println!(
                "| {method:?} | {samples} | {} | {:.3e} | {se:.3e} | {:.2} |",
                est.evaluations,
                norm(&err),
                norm(&err) / se
            );
        }
    }
    Ok(())
}
