//! iMAML (Rajeswaran et al. 2019) on sinusoid regression, beside second-order MAML: the
//! meta-gradient through the solution of a proximal inner problem by implicit
//! differentiation (`unroll::implicit_grad`), with no graph of the inner steps held.
//!
//! Tasks as in `maml_sine` (y = A sin(x - phase), A in [0.1, 5], phase in [0, pi],
//! x in [-5, 5], K = 10 support and 10 query points), MLP 1-40-40-1 (ReLU, f32), meta-batch
//! 25, outer Adam 1e-3, both methods from the same initialisation and tasks.
//!
//! - MAML: one differentiable SGD step (lr 0.01) on the support set; the query loss is
//!   differentiated through it.
//! - iMAML: the inner problem is `min_x L_support(x) + lambda/2 |x - theta|^2`, solved
//!   approximately by `--inner-steps` gradient steps (`--prox-lr`, halved while a step would
//!   increase the objective) from `x = theta` without a graph; its optimality condition `F(x, theta) = grad L_support(x) + lambda (x - theta)`
//!   gives `dL_query/dtheta = lambda v` with `(H + lambda I) v = grad L_query(x*)`, solved by
//!   conjugate gradient (`--cg-iters`) on Hessian-vector products, truncated where the
//!   network's Hessian has negative curvature; each task's meta-gradient is clipped to norm 10.
//!
//! Meta-test: 100 new tasks, the query MSE after 0, 1, 5 and 10 SGD steps (lr 0.01) on the
//! support set, for both learned initialisations.
//!
//! `cargo run --release --example imaml_sine -- [--iters N] [--inner-steps K] [--prox-lr LR] [--lambda L] [--cg-iters M]`

use candle_higher::optim::{Adam, Optimizer};
use candle_higher::unroll::{implicit_grad, ImplicitOptions};
use candle_higher::{grad, no_grad, GradOptions, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[path = "common/args.rs"]
mod args;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const META_BATCH: usize = 25;
const K: usize = 10;
const INNER_LR: f64 = 0.01;

struct Task {
    amp: f32,
    phase: f32,
}

impl Task {
    fn sample(rng: &mut StdRng) -> Self {
        Task {
            amp: rng.gen_range(0.1..5.0),
            phase: rng.gen_range(0.0..std::f32::consts::PI),
        }
    }

    fn points(&self, n: usize, rng: &mut StdRng) -> Result<(Tensor, Tensor)> {
        let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-5.0f32..5.0)).collect();
        let y: Vec<f32> = x
            .iter()
            .map(|&x| self.amp * (x - self.phase).sin())
            .collect();
        Ok((
            Tensor::from_vec(x, &[n, 1], &candle_higher::device_from_env()?)?,
            Tensor::from_vec(y, &[n, 1], &candle_higher::device_from_env()?)?,
        ))
    }
}

/// MLP 1-40-40-1 with PyTorch's default initialisation, as leaves.
fn init(seed: u64) -> Result<Vec<Tensor>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut params = Vec::new();
    for (i, o) in [(1, 40), (40, 40), (40, 1)] {
        let bound = 1.0 / (i as f32).sqrt();
        let mut u =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-bound..bound)).collect() };
        params.push(
            Tensor::from_vec(u(i * o), &[i, o], &candle_higher::device_from_env()?)?.to_leaf(),
        );
        params.push(Tensor::from_vec(u(o), &[o], &candle_higher::device_from_env()?)?.to_leaf());
    }
    Ok(params)
}

fn mse(p: &[Tensor], x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let h = x.matmul(&p[0])?.add(&p[1])?.relu()?;
    let h = h.matmul(&p[2])?.add(&p[3])?.relu()?;
    h.matmul(&p[4])?.add(&p[5])?.sub(y)?.sqr()?.mean_all()
}

fn grads(loss: &Tensor, p: &[Tensor], create_graph: bool) -> Result<Vec<Tensor>> {
    let options = GradOptions {
        create_graph,
        allow_unused: true,
        grad_outputs: None,
    };
    grad(std::slice::from_ref(loss), p, options)?
        .into_iter()
        .zip(p)
        .map(|(g, p)| g.map_or_else(|| p.zeros_like(), Ok))
        .collect()
}

/// `steps` plain SGD steps (no graph kept): the adapted parameters as leaves.
fn sgd(p: &[Tensor], x: &Tensor, y: &Tensor, steps: usize, lr: f64) -> Result<Vec<Tensor>> {
    let mut p: Vec<Tensor> = p.iter().map(|t| t.detach().to_leaf()).collect();
    for _ in 0..steps {
        let g = grads(&mse(&p, x, y)?, &p, false)?;
        let _guard = no_grad();
        p = p
            .iter()
            .zip(&g)
            .map(|(p, g)| Ok(p.sub(&g.affine(lr, 0.0)?)?.to_leaf()))
            .collect::<Result<_>>()?;
    }
    Ok(p)
}

/// The inner problem of iMAML, `min_x L(x) + lambda/2 |x - theta|^2`, by `steps` gradient
/// steps from `x = theta` (no graph kept), halving the step while it would increase the
/// objective, so the solve cannot diverge where the curvature exceeds 2 / lr.
fn prox_solve(
    theta: &[Tensor],
    x: &Tensor,
    y: &Tensor,
    steps: usize,
    lr: f64,
    lambda: f64,
) -> Result<Vec<Tensor>> {
    let objective = |p: &[Tensor]| -> Result<f64> {
        let mut prox = 0.0;
        for (p, t) in p.iter().zip(theta) {
            prox += p.sub(t)?.sqr()?.sum_all()?.to_scalar_f64()?;
        }
        Ok(mse(p, x, y)?.to_scalar_f64()? + lambda / 2.0 * prox)
    };
    let mut p: Vec<Tensor> = theta.iter().map(|t| t.detach().to_leaf()).collect();
    let mut current = objective(&p)?;
    let mut lr = lr;
    for _ in 0..steps {
        let g = grads(&mse(&p, x, y)?, &p, false)?;
        let _guard = no_grad();
        let g: Vec<Tensor> = g
            .iter()
            .zip(p.iter().zip(theta))
            .map(|(g, (p, t))| g.add(&p.sub(t)?.affine(lambda, 0.0)?))
            .collect::<Result<_>>()?;
        for _ in 0..30 {
            let next: Vec<Tensor> = p
                .iter()
                .zip(&g)
                .map(|(p, g)| Ok(p.sub(&g.affine(lr, 0.0)?)?.to_leaf()))
                .collect::<Result<_>>()?;
            let value = objective(&next)?;
            if value <= current {
                p = next;
                current = value;
                break;
            }
            lr /= 2.0;
        }
    }
    Ok(p)
}

/// MAML's meta-gradient for one task: one differentiable SGD step.
fn maml_grads(theta: &[Tensor], task: &[(Tensor, Tensor); 2]) -> Result<Vec<Tensor>> {
    let [(xs, ys), (xq, yq)] = task;
    let g = grads(&mse(theta, xs, ys)?, theta, true)?;
    let fast: Vec<Tensor> = theta
        .iter()
        .zip(&g)
        .map(|(p, g)| p.sub(&g.affine(INNER_LR, 0.0)?))
        .collect::<Result<_>>()?;
    grads(&mse(&fast, xq, yq)?, theta, false)
}

/// iMAML's meta-gradient for one task, with the CG residual and iterations and the norm of
/// the optimality condition at the inner solution (how far the 40 steps are from solving it).
fn imaml_grads(
    theta: &[Tensor],
    task: &[(Tensor, Tensor); 2],
    inner_steps: usize,
    prox_lr: f64,
    lambda: f64,
    cg_iters: usize,
) -> Result<(Vec<Tensor>, f64, usize, f64)> {
    let [(xs, ys), (xq, yq)] = task;
    let x_star = prox_solve(theta, xs, ys, inner_steps, prox_lr, lambda)?;
    let dl_dx = grads(&mse(&x_star, xq, yq)?, &x_star, false)?;
    let condition = |x: &[Tensor], th: &[Tensor]| -> Result<Vec<Tensor>> {
        let g = grads(&mse(x, xs, ys)?, x, true)?;
        g.iter()
            .zip(x.iter().zip(th))
            .map(|(g, (x, t))| g.add(&x.sub(t)?.affine(lambda, 0.0)?))
            .collect()
    };
    let out = implicit_grad(
        condition,
        &x_star,
        theta,
        &dl_dx,
        // ReLU networks are not convex: CG stops at a direction of negative curvature.
        &ImplicitOptions {
            truncate_at_negative_curvature: true,
            ..ImplicitOptions::cg(1e-6, cg_iters)
        },
    )?;
    let g = out
        .grads
        .into_iter()
        .zip(theta)
        .map(|(g, t)| g.map_or_else(|| t.zeros_like(), Ok))
        .collect::<Result<_>>()?;
    Ok((g, out.residual, out.iterations, out.condition_norm))
}

fn meta_test(theta: &[Tensor], tasks: &[[(Tensor, Tensor); 2]]) -> Result<[f64; 4]> {
    let mut out = [0.0; 4];
    for (i, steps) in [0usize, 1, 5, 10].into_iter().enumerate() {
        let mut total = 0.0;
        for [(xs, ys), (xq, yq)] in tasks {
            let p = sgd(theta, xs, ys, steps, INNER_LR)?;
            total += mse(&p, xq, yq)?.to_scalar_f64()?;
        }
        out[i] = total / tasks.len() as f64;
    }
    Ok(out)
}

fn main() -> Result<()> {
    let args = args::Args::parse(
        &["iters", "inner-steps", "prox-lr", "lambda", "cg-iters"],
        &[],
    )?;
    let iters: usize = args.get("iters", 1000)?;
    let inner_steps: usize = args.get("inner-steps", 40)?;
    let prox_lr: f64 = args.get("prox-lr", 0.005)?;
    let lambda: f64 = args.get("lambda", 20.0)?;
    let cg_iters: usize = args.get("cg-iters", 5)?;

    let mut maml = init(0)?;
    let mut imaml = init(0)?;
    let mut maml_opt = Optimizer::new(Adam::new(1e-3), maml.len())?;
    let mut imaml_opt = Optimizer::new(Adam::new(1e-3), imaml.len())?;
    let mut rng = StdRng::seed_from_u64(7);
    let (mut maml_secs, mut imaml_secs) = (0.0, 0.0);
    let (mut residuals, mut cg_total, mut skipped) = (0.0, 0, 0usize);
    let mut condition_norms = 0.0;
    for it in 0..iters {
        let tasks: Vec<[(Tensor, Tensor); 2]> = (0..META_BATCH)
            .map(|_| {
                let t = Task::sample(&mut rng);
                Ok([t.points(K, &mut rng)?, t.points(K, &mut rng)?])
            })
            .collect::<Result<_>>()?;
        let mut sum_maml: Vec<Tensor> =
            maml.iter().map(Tensor::zeros_like).collect::<Result<_>>()?;
        let mut sum_imaml = sum_maml.clone();
        let t0 = std::time::Instant::now();
        for task in &tasks {
            for (s, g) in sum_maml.iter_mut().zip(maml_grads(&maml, task)?) {
                *s = s.add(&g.affine(1.0 / META_BATCH as f64, 0.0)?)?;
            }
        }
        let t1 = std::time::Instant::now();
        for task in &tasks {
            let (g, res, n, f_norm) =
                imaml_grads(&imaml, task, inner_steps, prox_lr, lambda, cg_iters)?;
            cg_total += n;
            // A solve that ended no better than v = 0 (residual >= 1), or an inner loop that
            // failed (residual NaN), gives no usable gradient.
            if res.is_nan() || res >= 1.0 {
                skipped += 1;
                continue;
            }
            residuals += res;
            condition_norms += f_norm;
            // Clip the task's meta-gradient to norm 10: where the Hessian is nearly singular
            // (a negative eigenvalue near -lambda), v is huge.
            let norm = g
                .iter()
                .map(|g| g.sqr()?.sum_all()?.to_scalar_f64())
                .sum::<Result<f64>>()?
                .sqrt();
            let scale = (10.0 / norm).min(1.0) / META_BATCH as f64;
            for (s, g) in sum_imaml.iter_mut().zip(g) {
                *s = s.add(&g.affine(scale, 0.0)?)?;
            }
        }
        imaml_secs += t1.elapsed().as_secs_f64();
        maml_secs += (t1 - t0).as_secs_f64();
        let to_opt = |v: Vec<Tensor>| v.into_iter().map(Some).collect::<Vec<_>>();
        maml_opt.step_grads(&mut maml, &to_opt(sum_maml))?;
        imaml_opt.step_grads(&mut imaml, &to_opt(sum_imaml))?;
        if (it + 1) % 200 == 0 {
            println!("meta-iteration {}/{iters}", it + 1);
        }
    }
    let solves = (iters * META_BATCH).max(1) as f64;
    let used = (solves - skipped as f64).max(1.0);
    println!(
        "trained {iters} meta-iterations: MAML {maml_secs:.1} s, iMAML {imaml_secs:.1} s \
         ({inner_steps} proximal steps of lr {prox_lr}, lambda {lambda}, mean |F(x*, theta)| {:.2e}; \
         CG: mean relative residual {:.2e}, {:.1} Hessian-vector products per task, \
         {skipped} of {} solves skipped)",
        condition_norms / used,
        residuals / used,
        cg_total as f64 / solves,
        iters * META_BATCH
    );
    let mut test_rng = StdRng::seed_from_u64(999);
    let tasks: Vec<[(Tensor, Tensor); 2]> = (0..100)
        .map(|_| {
            let t = Task::sample(&mut test_rng);
            Ok([t.points(K, &mut test_rng)?, t.points(100, &mut test_rng)?])
        })
        .collect::<Result<_>>()?;
    let a = meta_test(&maml, &tasks)?;
    let b = meta_test(&imaml, &tasks)?;
    println!("meta-test on 100 new tasks, query MSE after k SGD steps (lr {INNER_LR}, K = {K}):");
    println!("| steps | MAML | iMAML |");
    println!("|---|---|---|");
    for (i, steps) in [0, 1, 5, 10].iter().enumerate() {
        println!("| {steps} | {:.3} | {:.3} |", a[i], b[i]);
    }
    // iMAML's own adaptation: the proximal inner solve it was trained with.
    let mut total = 0.0;
    for [(xs, ys), (xq, yq)] in &tasks {
        let p = prox_solve(&imaml, xs, ys, inner_steps, prox_lr, lambda)?;
        total += mse(&p, xq, yq)?.to_scalar_f64()?;
    }
    let mut maml_total = 0.0;
    for [(xs, ys), (xq, yq)] in &tasks {
        let p = sgd(&maml, xs, ys, inner_steps, INNER_LR)?;
        maml_total += mse(&p, xq, yq)?.to_scalar_f64()?;
    }
    println!(
        "iMAML after its own inner solve ({inner_steps} proximal steps, lambda {lambda}): query MSE {:.3}; \
         MAML after {inner_steps} SGD steps: {:.3}",
        total / tasks.len() as f64,
        maml_total / tasks.len() as f64
    );
    Ok(())
}
