//! A learned learning rate through a 10,000-step unroll that fits in memory: the exact
//! meta-gradient of a checkpointed unroll (`unroll::checkpointed_unroll`), which keeps
//! ceil(sqrt(T)) carries and recomputes each segment in the backward pass, against the
//! plain unroll that holds every step's graph.
//!
//! Task: regress y = sin(2x) + x / 2 on 20 fixed points of [-3, 3] with an MLP 1-40-40-1
//! (ReLU, f32), SGD with momentum 0.9 for T full-batch steps; the learning rate is
//! `exp(log_lr)`, a tensor override, and the meta-loss is the MSE on 20 other points after
//! the last step. A few outer iterations move `log_lr` against the sign of its
//! meta-gradient. The peak resident memory of the process (VmHWM, Linux) is printed.
//!
//! `cargo run --release --example checkpointed_unroll -- [--steps T] [--mode checkpointed|plain|both] [--checkpoints K] [--outer N]`
//!
//! `--bench` runs T = 100, 1,000 and 10,000, plain and checkpointed, each in a child process
//! (so each peak is its own) and prints a table; `--quick` runs T = 10 and 100 only, to check
//! that the harness works.

use std::process::Command;
use std::time::Instant;

use candle_higher::optim::{DiffOptimizer, Overrides, Sgd};
use candle_higher::unroll::{
    checkpointed_unroll, plain_unroll, CheckpointOptions, OptimizerCarry, UnrollGrads,
};
use candle_higher::{Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[path = "common/args.rs"]
mod args;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const HIDDEN: usize = 40;

/// A value of /proc/self/status in MiB (`VmHWM`: peak resident memory; `VmRSS`: now).
fn status_mib(key: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn points(n: usize, rng: &mut StdRng) -> Result<(Tensor, Tensor)> {
    let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
    let y: Vec<f32> = x.iter().map(|&x| (2.0 * x).sin() + x / 2.0).collect();
    Ok((
        Tensor::from_vec(x, &[n, 1], &candle_higher::device_from_env()?)?,
        Tensor::from_vec(y, &[n, 1], &candle_higher::device_from_env()?)?,
    ))
}

/// PyTorch's default initialisation of a linear layer: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
fn linear_init(rng: &mut StdRng, fan_in: usize, fan_out: usize) -> Result<[Tensor; 2]> {
    let bound = 1.0 / (fan_in as f32).sqrt();
    let mut u = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-bound..bound)).collect() };
    Ok([
        Tensor::from_vec(
            u(fan_in * fan_out),
            &[fan_in, fan_out],
            &candle_higher::device_from_env()?,
        )?,
        Tensor::from_vec(u(fan_out), &[fan_out], &candle_higher::device_from_env()?)?,
    ])
}

fn mlp(p: &[Tensor], x: &Tensor) -> Result<Tensor> {
    let h = x.matmul(&p[0])?.add(&p[1])?.relu()?;
    let h = h.matmul(&p[2])?.add(&p[3])?.relu()?;
    h.matmul(&p[4])?.add(&p[5])
}

fn mse(p: &[Tensor], x: &Tensor, y: &Tensor) -> Result<Tensor> {
    mlp(p, x)?.sub(y)?.sqr()?.mean_all()
}

struct Problem {
    init: Vec<Tensor>,
    train: (Tensor, Tensor),
    val: (Tensor, Tensor),
}

fn problem() -> Result<Problem> {
    let mut rng = StdRng::seed_from_u64(0);
    let mut init = Vec::new();
    for (i, o) in [(1, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, 1)] {
        init.extend(linear_init(&mut rng, i, o)?);
    }
    Ok(Problem {
        init,
        train: points(20, &mut rng)?,
        val: points(20, &mut rng)?,
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Plain,
    Checkpointed,
}

/// One unroll of `steps` steps at `log_lr`; returns the meta-gradient.
fn unroll(
    p: &Problem,
    log_lr: &Tensor,
    steps: usize,
    mode: Mode,
    checkpoints: Option<usize>,
) -> Result<UnrollGrads<OptimizerCarry<Sgd>>> {
    let sgd = Sgd {
        momentum: 0.9,
        ..Sgd::new(0.01)
    };
    let mut opt = DiffOptimizer::new(sgd, &p.init)?;
    opt.set_overrides(&Overrides::new().set("lr", log_lr.exp()?))?;
    let carry = OptimizerCarry::new(p.init.clone(), opt);
    let (xt, yt) = &p.train;
    let (xv, yv) = &p.val;
    let step = |c: &OptimizerCarry<Sgd>, _t: usize| c.step(&mse(&c.params, xt, yt)?, None);
    let meta = |c: &OptimizerCarry<Sgd>| mse(&c.params, xv, yv);
    let hyper = std::slice::from_ref(log_lr);
    match mode {
        Mode::Plain => plain_unroll(&carry, steps, hyper, step, meta),
        Mode::Checkpointed => checkpointed_unroll(
            &carry,
            steps,
            hyper,
            step,
            meta,
            &CheckpointOptions { checkpoints },
        ),
    }
}

/// Runs each configuration in a child process and prints a table of the lines they report.
fn bench(quick: bool) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let exe = std::env::current_exe()?;
    let sizes: &[usize] = if quick {
        &[10, 100]
    } else {
        &[100, 1000, 10_000]
    };
    println!("| T | mode | checkpoints | peak RSS (MiB) | time (s) | d meta / d log_lr |");
    println!("|---|---|---|---|---|---|");
    for &t in sizes {
        for mode in ["plain", "checkpointed"] {
            let out = Command::new(&exe)
                .args([
                    "--steps",
                    &t.to_string(),
                    "--mode",
                    mode,
                    "--outer",
                    "1",
                    "--report",
                ])
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            match text.lines().find_map(|l| l.strip_prefix("REPORT ")) {
                Some(line) => println!("| {t} | {mode} | {line} |"),
                None => println!(
                    "| {t} | {mode} | failed: {} |",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            }
        }
    }
    Ok(())
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let args = args::Args::parse(
        &["steps", "outer", "checkpoints", "mode"],
        &["bench", "quick", "report"],
    )?;
    if args.has("bench") || args.has("quick") {
        return bench(args.has("quick"));
    }
    let steps: usize = args.get("steps", 10_000)?;
    let outer: usize = args.get("outer", 3)?;
    let checkpoints: Option<usize> = args.get_opt("checkpoints")?;
    let mode: String = args.get("mode", "checkpointed".to_string())?;
    let report = args.has("report");
    let p = problem()?;
    let start_rss = status_mib("VmRSS:");
    let mut log_lr = Tensor::scalar(0.01f32.ln()).to_leaf();
    for it in 0..outer {
        let t0 = Instant::now();
        let out = match mode.as_str() {
            "plain" => unroll(&p, &log_lr, steps, Mode::Plain, None)?,
            "checkpointed" => unroll(&p, &log_lr, steps, Mode::Checkpointed, checkpoints)?,
            "both" => {
                let a = unroll(&p, &log_lr, steps, Mode::Plain, None)?;
                let b = unroll(&p, &log_lr, steps, Mode::Checkpointed, checkpoints)?;
                let (ga, gb) = (
                    a.hyper_grads[0]
                        .as_ref()
                        .map_or(Ok(0.0), Tensor::to_scalar_f64)?,
                    b.hyper_grads[0]
                        .as_ref()
                        .map_or(Ok(0.0), Tensor::to_scalar_f64)?,
                );
                println!("plain {ga:.6e}, checkpointed {gb:.6e} (f32; they differ only in summation order)");
                b
            }
            other => {
                eprintln!("--mode {other}: use checkpointed, plain or both");
                std::process::exit(2);
            }
        };
        let secs = t0.elapsed().as_secs_f64();
        let g = out.hyper_grads[0]
            .as_ref()
            .map_or(Ok(0.0), Tensor::to_scalar_f64)?;
        let peak = status_mib("VmHWM:").unwrap_or(f64::NAN);
        if report {
            println!(
                "REPORT {} | {peak:.1} | {secs:.2} | {g:.4e}",
                out.checkpoints
            );
            return Ok(());
        }
        println!(
            "outer {it}: lr {:.5}, meta-loss after {steps} steps {:.5}, d/d log_lr {g:.4e}, \
             {} checkpoints, {secs:.2} s",
            log_lr.exp()?.to_scalar_f64()?,
            out.meta_loss.to_scalar_f64()?,
            out.checkpoints
        );
        // A sign step on log_lr: the gradient's size varies by orders of magnitude with T.
        let next = log_lr.to_scalar_f64()? - 0.2 * g.signum();
        log_lr = Tensor::scalar(next as f32).to_leaf();
    }
    println!(
        "peak resident memory {:.1} MiB (at start {:.1} MiB)",
        status_mib("VmHWM:").unwrap_or(f64::NAN),
        start_rss.unwrap_or(f64::NAN)
    );
    Ok(())
}
