//! Checkpointed unrolls (`unroll::checkpointed_unroll`): the meta-gradient equals the plain
//! unroll's to 1e-12 (f64) with respect to the initial weights, the optimizer state's
//! initial values, buffers and tensor hyperparameters, for SGD with momentum and Adam, for
//! every checkpoint count (uneven last segments included); the plain unroll itself is
//! checked against central finite differences.

use candle_higher::optim::{Adam, DiffOptimizer, Overrides, Sgd};
use candle_higher::unroll::{
    checkpointed_unroll, plain_unroll, Carry, CheckpointOptions, OptimizerCarry, UnrollGrads,
};
use candle_higher::{DifferentiableOptimizer, Error, Result, StateValue, Tensor};

use crate::common::{randn, rng};

/// The data of step `t`: inputs X_t = X (1 + 0.05 sin t) and targets Y, so every step differs.
struct Data {
    x: Tensor,
    y: Tensor,
    x_val: Tensor,
    y_val: Tensor,
}

fn data() -> Data {
    let mut r = rng(12);
    Data {
        x: randn(&mut r, &[6, 3]),
        y: randn(&mut r, &[6, 2]),
        x_val: randn(&mut r, &[4, 3]),
        y_val: randn(&mut r, &[4, 2]),
    }
}

/// A 3-2 tanh layer, W [3, 2] and b [2]: mean squared error of tanh(X W + b) against Y.
fn loss(params: &[Tensor], x: &Tensor, y: &Tensor) -> Result<Tensor> {
    x.matmul(&params[0])?
        .add(&params[1])?
        .tanh()?
        .sub(y)?
        .sqr()?
        .mean_all()
}

fn step_data(d: &Data, t: usize) -> Result<Tensor> {
    d.x.affine(1.0 + 0.05 * (t as f64).sin(), 0.0)
}

/// One optimizer step on the step-`t` training loss; the buffer (a running mean of the
/// layer's pre-activation, like BatchNorm's) is updated and shifts the inputs of the loss.
fn step<O: DifferentiableOptimizer>(
    c: &OptimizerCarry<O>,
    t: usize,
    d: &Data,
) -> Result<OptimizerCarry<O>> {
    let x = step_data(d, t)?;
    if c.buffers.is_empty() {
        return c.step(&loss(&c.params, &x, &d.y)?, None);
    }
    let pre = x.matmul(&c.params[0])?;
    let running = c.buffers[0]
        .affine(0.9, 0.0)?
        .add(&pre.mean(0)?.affine(0.1, 0.0)?)?;
    let l = pre
        .sub(&running)?
        .add(&c.params[1])?
        .tanh()?
        .sub(&d.y)?
        .sqr()?
        .mean_all()?;
    c.step(&l, Some(vec![running]))
}

fn meta_loss<O: DifferentiableOptimizer>(c: &OptimizerCarry<O>, d: &Data) -> Result<Tensor> {
    let l = loss(&c.params, &d.x_val, &d.y_val)?;
    match c.buffers.first() {
        Some(b) => l.add(&b.sqr()?.sum_all()?),
        None => Ok(l),
    }
}

fn params() -> Vec<Tensor> {
    let mut r = rng(7);
    vec![
        randn(&mut r, &[3, 2]),
        randn(&mut r, &[2]).affine(0.1, 0.0).unwrap(),
    ]
}

fn max_abs(t: &Tensor) -> f64 {
    t.to_vec_f64()
        .unwrap()
        .iter()
        .fold(0.0, |m, v| m.max(v.abs()))
}

/// Every gradient of `got` equals `want`'s to `tol` relative to the largest entry.
fn assert_same_grads<C>(got: &UnrollGrads<C>, want: &UnrollGrads<C>, tol: f64, what: &str) {
    let pairs = got
        .initial_grads
        .iter()
        .zip(&want.initial_grads)
        .chain(got.hyper_grads.iter().zip(&want.hyper_grads));
    assert_eq!(got.initial_grads.len(), want.initial_grads.len());
    assert_eq!(got.hyper_grads.len(), want.hyper_grads.len());
    for (i, (g, w)) in pairs.enumerate() {
        match (g, w) {
            (Some(g), Some(w)) => {
                let scale = max_abs(w);
                assert!(
                    scale > 0.0,
                    "{what}: gradient {i} is zero, the test is vacuous"
                );
                let err = max_abs(&g.sub(w).unwrap());
                assert!(
                    err <= tol * scale,
                    "{what}: gradient {i} differs by {err:e} (scale {scale:e})"
                );
            }
            (None, None) => {}
            _ => panic!("{what}: gradient {i} is Some on one side only"),
        }
    }
    let (a, b) = (
        got.meta_loss.to_scalar_f64().unwrap(),
        want.meta_loss.to_scalar_f64().unwrap(),
    );
    assert_eq!(a, b, "{what}: meta-losses differ");
}

/// Runs the plain unroll and the checkpointed one for several checkpoint counts.
fn compare<O: DifferentiableOptimizer>(
    carry: &OptimizerCarry<O>,
    steps: usize,
    hyper: &[Tensor],
    name: &str,
) -> Result<UnrollGrads<OptimizerCarry<O>>> {
    let d = data();
    let plain = plain_unroll(
        carry,
        steps,
        hyper,
        |c, t| step(c, t, &d),
        |c| meta_loss(c, &d),
    )?;
    // None: ceil(sqrt(23)) = 5 segments of 5 (the last of 3); 4: segments of 6, last of 5;
    // 1: one segment; steps: one step per segment; more than steps: clamped.
    for checkpoints in [None, Some(4), Some(1), Some(steps), Some(steps + 10)] {
        let options = CheckpointOptions { checkpoints };
        let ck = checkpointed_unroll(
            carry,
            steps,
            hyper,
            |c, t| step(c, t, &d),
            |c| meta_loss(c, &d),
            &options,
        )?;
        assert_eq!(
            ck.recomputed_steps, steps,
            "{name}: every step recomputed once"
        );
        let expected_checkpoints = match checkpoints {
            None => 5,
            Some(4) => 4,
            Some(n) => n.min(steps),
        };
        assert_eq!(
            ck.checkpoints, expected_checkpoints,
            "{name} {checkpoints:?}"
        );
        assert_same_grads(
            &ck,
            &plain,
            1e-12,
            &format!("{name}, {checkpoints:?} checkpoints"),
        );
        let (fp, fc) = (plain.final_carry.tensors(), ck.final_carry.tensors());
        assert_eq!(fp.len(), fc.len());
        for (a, b) in fp.iter().zip(&fc) {
            assert_eq!(
                a.to_vec_f64()?,
                b.to_vec_f64()?,
                "{name}: final carries differ"
            );
        }
    }
    Ok(plain)
}

/// The meta-loss of the plain unroll at `hyper` values (for finite differences).
fn meta_value<O: DifferentiableOptimizer>(
    make: &dyn Fn(&[Tensor]) -> Result<OptimizerCarry<O>>,
    hyper: &[Tensor],
    steps: usize,
) -> Result<f64> {
    let d = data();
    let carry = make(hyper)?;
    let out = plain_unroll(
        &carry,
        steps,
        &[],
        |c, t| step(c, t, &d),
        |c| meta_loss(c, &d),
    )?;
    out.meta_loss.to_scalar_f64()
}

/// Central finite differences of the meta-loss in each scalar hyperparameter.
fn assert_hyper_grads_match_fd<O: DifferentiableOptimizer>(
    make: &dyn Fn(&[Tensor]) -> Result<OptimizerCarry<O>>,
    values: &[f64],
    grads: &[Option<Tensor>],
    steps: usize,
) -> Result<()> {
    let h = 1e-6;
    for (i, g) in grads.iter().enumerate().take(values.len()) {
        let at = |delta: f64| -> Result<f64> {
            let hyper: Vec<Tensor> = values
                .iter()
                .enumerate()
                .map(|(j, &v)| Tensor::scalar(if i == j { v + delta } else { v }))
                .collect();
            meta_value(make, &hyper, steps)
        };
        let fd = (at(h)? - at(-h)?) / (2.0 * h);
        let g = g
            .as_ref()
            .expect("hyperparameter gradient")
            .to_scalar_f64()?;
        assert!(
            (g - fd).abs() <= 1e-6 * fd.abs().max(1e-3),
            "hyperparameter {i}: grad {g} vs finite differences {fd}"
        );
    }
    Ok(())
}

fn sgd_carry(hyper: &[Tensor], buffers: bool) -> Result<OptimizerCarry<Sgd>> {
    let p = params();
    let sgd = Sgd {
        momentum: 0.9,
        ..Sgd::new(0.3)
    };
    let mut opt = DiffOptimizer::new(sgd, &p)?;
    opt.set_overrides(
        &Overrides::new()
            .set("lr", hyper[0].clone())
            .set("momentum", hyper[1].clone()),
    )?;
    let c = OptimizerCarry::new(p, opt);
    Ok(if buffers {
        c.with_buffers(vec![Tensor::from_slice(
            &[0.2f64, -0.1],
            &[2],
            &crate::common::device(),
        )?])
    } else {
        c
    })
}

fn adam_carry(hyper: &[Tensor]) -> Result<OptimizerCarry<Adam>> {
    let p = params();
    let mut opt = DiffOptimizer::new(Adam::new(0.05), &p)?;
    opt.set_overrides(
        &Overrides::new()
            .set("lr", hyper[0].clone())
            .set("betas.0", hyper[1].clone()),
    )?;
    Ok(OptimizerCarry::new(p, opt))
}

fn leaves(values: &[f64]) -> Vec<Tensor> {
    values
        .iter()
        .map(|&v| Tensor::scalar(v).to_leaf())
        .collect()
}

/// SGD with momentum: the momentum buffer is created at step 1 and must be restored from
/// each checkpoint; gradients w.r.t. W0, b0, lr and momentum.
#[test]
fn sgd_momentum_checkpointed_equals_plain() -> Result<()> {
    let values = [0.3, 0.9];
    let hyper = leaves(&values);
    let carry = sgd_carry(&hyper, false)?;
    let plain = compare(&carry, 23, &hyper, "sgd momentum")?;
    assert_eq!(
        plain.initial_grads.len(),
        2,
        "no state before the first step"
    );
    assert_hyper_grads_match_fd(&|h| sgd_carry(h, false), &values, &plain.hyper_grads, 23)
}

/// Adam: its step counter sets the bias corrections, so a checkpoint that lost it would
/// change every recomputed step; gradients w.r.t. W0, b0, lr and beta1.
#[test]
fn adam_checkpointed_equals_plain() -> Result<()> {
    let values = [0.05, 0.8];
    let hyper = leaves(&values);
    let carry = adam_carry(&hyper)?;
    let plain = compare(&carry, 23, &hyper, "adam")?;
    for s in plain.final_carry.opt.states() {
        assert!(matches!(s.value("step"), Some(StateValue::Int(23))));
    }
    assert_hyper_grads_match_fd(&|h| adam_carry(h), &values, &plain.hyper_grads, 23)
}

/// Starting from an optimizer that has already stepped: the initial carry holds state
/// tensors (momentum buffers), and their gradients are reported too, in carry order.
#[test]
fn gradients_reach_the_initial_optimizer_state() -> Result<()> {
    let hyper = leaves(&[0.3, 0.9]);
    let d = data();
    let start = sgd_carry(&hyper, false)?;
    let start = start.with_tensors(
        &start
            .tensors()
            .iter()
            .map(|t| t.to_leaf())
            .collect::<Vec<_>>(),
    )?;
    let warm = step(&start, 100, &d)?;
    let warm = warm.with_tensors(
        &warm
            .tensors()
            .iter()
            .map(|t| t.detach())
            .collect::<Vec<_>>(),
    )?;
    assert_eq!(warm.tensors().len(), 4, "W, b and two momentum buffers");
    let plain = compare(&warm, 23, &hyper, "warm sgd")?;
    assert!(plain.initial_grads[2].is_some() && plain.initial_grads[3].is_some());
    Ok(())
}

/// A carry with a buffer that the step updates from the parameters and the loss reads:
/// its cotangent must flow back through the checkpoints too.
#[test]
fn buffers_are_carried_and_differentiated() -> Result<()> {
    let values = [0.3, 0.9];
    let hyper = leaves(&values);
    let carry = sgd_carry(&hyper, true)?;
    let plain = compare(&carry, 23, &hyper, "sgd with buffer")?;
    assert_eq!(plain.initial_grads.len(), 3);
    assert!(
        plain.initial_grads[2].is_some(),
        "the initial buffer reaches the meta-loss"
    );
    assert_hyper_grads_match_fd(&|h| sgd_carry(h, true), &values, &plain.hyper_grads, 23)
}

/// Zero steps: the meta-gradient of the meta-loss at the initial carry.
#[test]
fn zero_steps_is_the_gradient_at_the_start() -> Result<()> {
    let hyper = leaves(&[0.3, 0.9]);
    let carry = sgd_carry(&hyper, false)?;
    let d = data();
    let out = checkpointed_unroll(
        &carry,
        0,
        &hyper,
        |c, t| step(c, t, &d),
        |c| meta_loss(c, &d),
        &CheckpointOptions::default(),
    )?;
    let p: Vec<Tensor> = params().iter().map(|t| t.to_leaf()).collect();
    let want = candle_higher::grad(
        &[loss(&p, &d.x_val, &d.y_val)?],
        &p,
        candle_higher::GradOptions::default(),
    )?;
    assert_eq!(
        out.initial_grads[0].as_ref().unwrap().to_vec_f64()?,
        want[0].as_ref().unwrap().to_vec_f64()?
    );
    assert!(out.hyper_grads.iter().all(Option::is_none));
    Ok(())
}

#[test]
fn bad_arguments_are_typed_errors() -> Result<()> {
    let hyper = leaves(&[0.3, 0.9]);
    let carry = sgd_carry(&hyper, false)?;
    let d = data();
    let zero = checkpointed_unroll(
        &carry,
        5,
        &hyper,
        |c, t| step(c, t, &d),
        |c| meta_loss(c, &d),
        &CheckpointOptions::checkpoints(0),
    );
    assert!(
        matches!(zero, Err(Error::InvalidArgument { .. })),
        "{zero:?}"
    );
    let vector_loss = checkpointed_unroll(
        &carry,
        5,
        &hyper,
        |c, t| step(c, t, &d),
        |c| Ok(c.params[1].clone()),
        &CheckpointOptions::default(),
    );
    assert!(
        matches!(vector_loss, Err(Error::NonScalarOutput { .. })),
        "{vector_loss:?}"
    );
    let wrong = carry.with_tensors(&carry.tensors()[..1]);
    assert!(
        matches!(
            wrong,
            Err(Error::ParamCount {
                expected: 2,
                got: 1,
                ..
            })
        ),
        "{wrong:?}"
    );
    Ok(())
}

/// A bare `Vec<Tensor>` carry with a stateless step w <- w - 2 lr a w (elementwise):
/// w_T = (1 - 2 a lr)^T w_0, so d sum(w_T) / d w_0 = (1 - 2 a lr)^T and
/// d sum(w_T) / d lr = sum(-2 a T (1 - 2 a lr)^(T - 1) w_0); 37 steps in 7 segments.
#[test]
fn vec_carry_matches_the_closed_form() -> Result<()> {
    let dev = crate::common::device();
    let a = [0.5f64, 1.0, 2.0];
    let w0 = [1.0f64, -2.0, 0.5];
    let lr_value = 0.1;
    let a_t = Tensor::from_slice(&a, &[3], &dev)?;
    let lr = Tensor::scalar(lr_value).to_leaf();
    let steps = 37;
    let out = checkpointed_unroll(
        &vec![Tensor::from_slice(&w0, &[3], &dev)?],
        steps,
        std::slice::from_ref(&lr),
        |c, _| Ok(vec![c[0].sub(&c[0].mul(&a_t)?.mul(&lr)?.affine(2.0, 0.0)?)?]),
        |c| c[0].sum_all(),
        &CheckpointOptions::checkpoints(7),
    )?;
    assert_eq!(out.checkpoints, 7);
    let t = steps as i32;
    let d_w0: Vec<f64> = a
        .iter()
        .map(|a| (1.0 - 2.0 * a * lr_value).powi(t))
        .collect();
    let d_lr: f64 = a
        .iter()
        .zip(&w0)
        .map(|(a, w)| -2.0 * a * f64::from(t) * (1.0 - 2.0 * a * lr_value).powi(t - 1) * w)
        .sum();
    let got_w0 = out.initial_grads[0].as_ref().unwrap().to_vec_f64()?;
    for (g, w) in got_w0.iter().zip(&d_w0) {
        assert!((g - w).abs() <= 1e-12 * w.abs(), "{got_w0:?} vs {d_w0:?}");
    }
    let got_lr = out.hyper_grads[0].as_ref().unwrap().to_scalar_f64()?;
    assert!(
        (got_lr - d_lr).abs() <= 1e-12 * d_lr.abs(),
        "{got_lr} vs {d_lr}"
    );
    Ok(())
}

/// ASGD keeps `eta` and `mu` as scalar state entries that depend on the learning rate (tensors
/// when lr is one): the carry lists them, and their cotangents must reach lr.
#[test]
fn asgd_scalar_state_entries_are_carried() -> Result<()> {
    use candle_higher::optim::Asgd;
    let make = |h: &[Tensor]| -> Result<OptimizerCarry<Asgd>> {
        let p = params();
        let mut opt = DiffOptimizer::new(
            Asgd {
                t0: 5.0,
                ..Asgd::new(0.2)
            },
            &p,
        )?;
        opt.set_overrides(&Overrides::new().set("lr", h[0].clone()))?;
        Ok(OptimizerCarry::new(p, opt))
    };
    let values = [0.2];
    let hyper = leaves(&values);
    let plain = compare(&make(&hyper)?, 23, &hyper, "asgd")?;
    let carried = plain.final_carry.tensors().len();
    assert!(
        carried > 4,
        "W, b, their averages and eta/mu tensors: {carried}"
    );
    assert_hyper_grads_match_fd(&make, &values, &plain.hyper_grads, 23)
}

/// First-order mode (inner gradients as constants) is recomputed the same way.
#[test]
fn first_order_mode_checkpointed_equals_plain() -> Result<()> {
    let hyper = leaves(&[0.3, 0.9]);
    let mut carry = sgd_carry(&hyper, false)?;
    carry.opt.set_mode(candle_higher::InnerGradMode::FirstOrder);
    compare(&carry, 23, &hyper, "first-order sgd")?;
    Ok(())
}

/// A hyperparameter that reaches the optimizer through a computation (lr = exp(log_lr), as
/// in the learned-learning-rate example): every segment's pull-back walks through the shared
/// `exp` node to `log_lr`, and the segment contributions add up to the plain gradient.
#[test]
fn hyperparameters_behind_a_computation() -> Result<()> {
    let log_lr = Tensor::scalar(0.3f64.ln()).to_leaf();
    let momentum = Tensor::scalar(0.9f64).to_leaf();
    let carry = sgd_carry(&[log_lr.exp()?, momentum.clone()], false)?;
    compare(&carry, 23, &[log_lr, momentum], "sgd, lr = exp(log_lr)")?;
    Ok(())
}
