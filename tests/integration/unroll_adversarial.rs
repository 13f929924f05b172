//! `unroll` (checkpointed and plain unrolls, implicit differentiation, zero-order estimates)
//! and `innerloop` under adversarial input.
//!
//! - Bad input (zero counts, tolerances, sigma, NaN data, empty lists, tensors that do not
//!   require grad, non-scalar or failing closures, a non-deterministic step) is a typed
//!   error that names what is wrong, never a panic or a silently wrong number.
//! - A failing call leaves what it was given as it was: the tests compare ids and bits.
//! - Where an input is legal but unusual (tied carry tensors, a repeated hyperparameter,
//!   integer carry tensors), the result is checked against a hand-written unroll, the
//!   plain unroll (1e-12 in f64) or central finite differences (f64, h = 1e-6).

use std::cell::Cell;

use candle_higher::nn::{self, Module, Parameters};
use candle_higher::optim::{grad_callback, Adam, DiffOptimizer, Optimizer, Overrides, Sgd};
use candle_higher::unroll::{
    checkpointed_unroll, es_gradient, implicit_grad, plain_unroll, Carry, CheckpointOptions,
    EsMethod, EsOptions, ImplicitOptions, OptimizerCarry, UnrollGrads,
};
use candle_higher::{
    grad, innerloop, DType, Error, GradOptions, GradStore, Hyperparameters, InnerloopOptions,
    OptimizerStep, Result, State, StateValue, StepOptions, Tensor, TensorId,
};

use crate::common::{device, randn, rng};

// ---------------------------------------------------------------- helpers

/// A constant f64 tensor on the test device.
fn f64s(data: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_slice(data, shape, &device()).unwrap()
}

/// A 0-dim f64 leaf on the test device.
fn leaf(v: f64) -> Tensor {
    f64s(&[v], &[]).to_leaf()
}

fn bits(t: &Tensor) -> Vec<u64> {
    t.to_vec_f64()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// Every tensor of a carry by id and bits, and every state entry (tensor ids and bits,
/// counters), to compare a carry before and after a failing call.
type Snapshot = (Vec<(TensorId, Vec<u64>)>, Vec<Vec<String>>);

fn snapshot<C: Carry>(c: &C, states: &[State]) -> Snapshot {
    let tensors = c.tensors().iter().map(|t| (t.id(), bits(t))).collect();
    let states = states
        .iter()
        .map(|s| {
            s.entries()
                .map(|(k, v)| match v {
                    StateValue::Tensor(t) => format!("{k} {:?} {:?}", t.id(), bits(&t)),
                    StateValue::Scalar(s) => format!("{k} {s:?}"),
                    StateValue::Int(n) => format!("{k} {n}"),
                })
                .collect()
        })
        .collect();
    (tensors, states)
}

fn max_abs(t: &Tensor) -> f64 {
    t.to_vec_f64()
        .unwrap()
        .iter()
        .fold(0.0, |m, v| m.max(v.abs()))
}

/// `got` equals `want` to `tol` relative to `want`'s largest entry (which must not be 0).
fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes");
    let scale = max_abs(want);
    assert!(
        scale > 0.0,
        "{what}: a zero reference makes the test vacuous"
    );
    let err = max_abs(&got.sub(want).unwrap());
    assert!(
        err <= tol * scale,
        "{what}: differs by {err:e} (scale {scale:e}): {:?} vs {:?}",
        got.to_vec_f64().unwrap(),
        want.to_vec_f64().unwrap()
    );
}

/// Every gradient of `got` equals `want`'s to `tol`, and the meta-losses are equal.
fn assert_same<C>(what: &str, got: &UnrollGrads<C>, want: &UnrollGrads<C>, tol: f64) {
    assert_eq!(
        got.meta_loss.to_scalar_f64().unwrap(),
        want.meta_loss.to_scalar_f64().unwrap(),
        "{what}: meta-losses"
    );
    let pairs = got
        .initial_grads
        .iter()
        .zip(&want.initial_grads)
        .chain(got.hyper_grads.iter().zip(&want.hyper_grads));
    assert_eq!(got.initial_grads.len(), want.initial_grads.len(), "{what}");
    assert_eq!(got.hyper_grads.len(), want.hyper_grads.len(), "{what}");
    for (i, pair) in pairs.enumerate() {
        match pair {
            (Some(g), Some(w)) => assert_close(&format!("{what}: gradient {i}"), g, w, tol),
            (None, None) => {}
            _ => panic!("{what}: gradient {i} is Some on one side only"),
        }
    }
}

/// A central difference of `f` at `x`, step 1e-6.
fn fd(f: impl Fn(f64) -> f64, x: f64) -> f64 {
    let h = 1e-6;
    (f(x + h) - f(x - h)) / (2.0 * h)
}

fn invalid(r: &Result<impl std::fmt::Debug>, op: &str, needle: &str) {
    match r {
        Err(Error::InvalidArgument { op: o, message }) => assert!(
            *o == op && message.contains(needle),
            "expected {op}: ...{needle}..., got {o}: {message}"
        ),
        other => panic!("expected InvalidArgument from {op} naming {needle:?}, got {other:?}"),
    }
}

fn non_finite(r: &Result<impl std::fmt::Debug>, needles: &[&str]) {
    match r {
        Err(Error::NonFinite { what }) => assert!(
            needles.iter().all(|n| what.contains(n)),
            "NonFinite should name {needles:?}: {what}"
        ),
        other => panic!("expected NonFinite naming {needles:?}, got {other:?}"),
    }
}

// ---------------------------------------------------------------- unroll fixtures

struct Data {
    x: Tensor,
    y: Tensor,
    xv: Tensor,
    yv: Tensor,
}

fn data() -> Data {
    let mut r = rng(31);
    Data {
        x: randn(&mut r, &[5, 3]),
        y: randn(&mut r, &[5, 2]),
        xv: randn(&mut r, &[4, 3]),
        yv: randn(&mut r, &[4, 2]),
    }
}

/// mean (tanh(X W + b) - Y)^2 for W [3, 2], b [2].
fn loss(p: &[Tensor], x: &Tensor, y: &Tensor) -> Result<Tensor> {
    x.matmul(&p[0])?
        .add(&p[1])?
        .tanh()?
        .sub(y)?
        .sqr()?
        .mean_all()
}

fn params() -> Vec<Tensor> {
    let mut r = rng(32);
    vec![randn(&mut r, &[3, 2]), randn(&mut r, &[2])]
}

/// SGD with momentum 0.9 and a tensor learning rate.
fn sgd_carry(p: Vec<Tensor>, lr: &Tensor) -> OptimizerCarry<Sgd> {
    let sgd = Sgd {
        momentum: 0.9,
        ..Sgd::new(0.2)
    };
    let mut opt = DiffOptimizer::new(sgd, &p).unwrap();
    opt.set_overrides(&Overrides::new().set("lr", lr.clone()))
        .unwrap();
    OptimizerCarry::new(p, opt)
}

/// A carry whose optimizer has stepped once (so it holds momentum buffers), detached.
fn warm_carry(d: &Data, lr: &Tensor) -> Result<OptimizerCarry<Sgd>> {
    let leaves: Vec<Tensor> = params().iter().map(Tensor::to_leaf).collect();
    let warm = sgd_step(&sgd_carry(leaves, lr), d)?;
    let detached: Vec<Tensor> = warm.tensors().iter().map(Tensor::detach).collect();
    assert_eq!(detached.len(), 4, "W, b, and their momentum buffers");
    warm.with_tensors(&detached)
}

fn sgd_step(c: &OptimizerCarry<Sgd>, d: &Data) -> Result<OptimizerCarry<Sgd>> {
    c.step(&loss(&c.params, &d.x, &d.y)?, None)
}

fn sgd_meta(c: &OptimizerCarry<Sgd>, d: &Data) -> Result<Tensor> {
    loss(&c.params, &d.xv, &d.yv)
}

/// The bare-list problem w <- w lr (elementwise), meta-loss sum(w_T).
fn scale_step(c: &[Tensor], lr: &Tensor) -> Result<Vec<Tensor>> {
    Ok(vec![c[0].mul(lr)?])
}

fn w0() -> Vec<Tensor> {
    vec![f64s(&[1.0, -2.0, 0.5], &[3])]
}

// ---------------------------------------------------------------- checkpointed_unroll

/// 0 checkpoints is an error naming the count, found before any step runs.
#[test]
fn zero_checkpoints_is_an_error_before_any_step() {
    let lr = leaf(0.9);
    let calls = Cell::new(0);
    let r = checkpointed_unroll(
        &w0(),
        5,
        std::slice::from_ref(&lr),
        |c, _| {
            calls.set(calls.get() + 1);
            scale_step(c, &lr)
        },
        |c| c[0].sum_all(),
        &CheckpointOptions::checkpoints(0),
    );
    invalid(&r, "checkpointed_unroll", "0 checkpoints");
    assert_eq!(calls.get(), 0);
}

/// More checkpoints than steps: "at most" that many, so one per step (7), and the
/// gradient is the plain one; w_T = lr^T w0, d sum(w_T)/d lr = T lr^(T-1) sum(w0).
#[test]
fn more_checkpoints_than_steps_are_clamped() -> Result<()> {
    let lr = leaf(0.9);
    let hyper = std::slice::from_ref(&lr);
    let out = checkpointed_unroll(
        &w0(),
        7,
        hyper,
        |c, _| scale_step(c, &lr),
        |c| c[0].sum_all(),
        &CheckpointOptions::checkpoints(1000),
    )?;
    assert_eq!((out.checkpoints, out.recomputed_steps), (7, 7));
    let want = 7.0 * 0.9f64.powi(6) * -0.5;
    let got = out.hyper_grads[0].as_ref().unwrap().to_scalar_f64()?;
    assert!((got - want).abs() <= 1e-12 * want.abs(), "{got} vs {want}");
    Ok(())
}

/// 0 steps with checkpoints asked for: one checkpoint (the initial carry), nothing
/// recomputed, the step never called; the gradient of sum(w) is ones and lr gets none.
#[test]
fn zero_steps_never_call_the_step() -> Result<()> {
    let lr = leaf(0.9);
    let calls = Cell::new(0);
    let out = checkpointed_unroll(
        &w0(),
        0,
        std::slice::from_ref(&lr),
        |c, _| {
            calls.set(calls.get() + 1);
            scale_step(c, &lr)
        },
        |c| c[0].sum_all(),
        &CheckpointOptions::checkpoints(3),
    )?;
    assert_eq!(calls.get(), 0);
    assert_eq!((out.checkpoints, out.recomputed_steps), (1, 0));
    assert_eq!(
        out.initial_grads[0].as_ref().unwrap().to_vec_f64()?,
        [1.0; 3]
    );
    assert!(out.hyper_grads[0].is_none());
    Ok(())
}

/// A meta-loss of several elements is `NonScalarOutput` with its shape, in both unrolls;
/// the message names the unroll and says to reduce the meta-loss (there is no
/// `grad_outputs` to give).
#[test]
fn non_scalar_meta_loss_is_typed() {
    let lr = leaf(0.9);
    let hyper = std::slice::from_ref(&lr);
    let ck = checkpointed_unroll(
        &w0(),
        3,
        hyper,
        |c, _| scale_step(c, &lr),
        |c| Ok(c[0].clone()),
        &CheckpointOptions::default(),
    );
    assert!(
        matches!(&ck, Err(Error::NonScalarOutput { shape, .. }) if shape == &[3]),
        "{ck:?}"
    );
    let plain = plain_unroll(
        &w0(),
        3,
        hyper,
        |c, _| scale_step(c, &lr),
        |c| Ok(c[0].clone()),
    );
    assert!(
        matches!(&plain, Err(Error::NonScalarOutput { shape, .. }) if shape == &[3]),
        "{plain:?}"
    );
    for (r, op) in [(ck, "checkpointed_unroll"), (plain, "plain_unroll")] {
        let msg = r.unwrap_err().to_string();
        assert!(
            msg.starts_with(&format!("{op}: the meta-loss has shape [3];"))
                && msg.contains("meta_loss")
                && msg.contains("sum_all")
                && !msg.contains("grad_outputs"),
            "{msg}"
        );
    }
}

/// A one-element meta-loss of rank 2 ([1, 1]) is a scalar loss: the same gradients.
#[test]
fn one_element_meta_loss_of_rank_two_is_accepted() -> Result<()> {
    let lr = leaf(0.9);
    let hyper = std::slice::from_ref(&lr);
    let run = |shape: &'static [usize]| {
        checkpointed_unroll(
            &w0(),
            4,
            hyper,
            |c, _| scale_step(c, &lr),
            move |c| c[0].sum_all()?.reshape(shape),
            &CheckpointOptions::checkpoints(2),
        )
    };
    assert_same("[1, 1] against []", &run(&[1, 1])?, &run(&[])?, 0.0);
    Ok(())
}

/// An error from the meta-loss closure comes back as it was, and the carry (its tensors,
/// the optimizer's states) is untouched.
#[test]
fn meta_loss_error_passes_through_and_changes_nothing() -> Result<()> {
    let d = data();
    let lr = leaf(0.2);
    let warm = warm_carry(&d, &lr)?;
    let before = snapshot(&warm, warm.opt.states());
    for checkpointed in [true, false] {
        let meta = |_: &OptimizerCarry<Sgd>| -> Result<Tensor> {
            Err(Error::InvalidArgument {
                op: "my meta-loss",
                message: "no validation data".into(),
            })
        };
        let r = if checkpointed {
            checkpointed_unroll(
                &warm,
                6,
                std::slice::from_ref(&lr),
                |c, _| sgd_step(c, &d),
                meta,
                &CheckpointOptions::default(),
            )
        } else {
            plain_unroll(
                &warm,
                6,
                std::slice::from_ref(&lr),
                |c, _| sgd_step(c, &d),
                meta,
            )
        };
        invalid(&r, "my meta-loss", "no validation data");
        assert_eq!(snapshot(&warm, warm.opt.states()), before);
    }
    Ok(())
}

/// A step that fails at t = 4 in the first pass: its error, no later step is run, and the
/// carry is untouched.
#[test]
fn step_error_in_the_first_pass_stops_the_unroll() -> Result<()> {
    let d = data();
    let lr = leaf(0.2);
    let carry = sgd_carry(params(), &lr);
    let before = snapshot(&carry, carry.opt.states());
    let last = Cell::new(0);
    let r = checkpointed_unroll(
        &carry,
        10,
        std::slice::from_ref(&lr),
        |c, t| {
            last.set(t);
            if t == 4 {
                return Err(Error::InvalidArgument {
                    op: "my step",
                    message: "batch 4 is missing".into(),
                });
            }
            sgd_step(c, &d)
        },
        |c| sgd_meta(c, &d),
        &CheckpointOptions::default(),
    );
    invalid(&r, "my step", "batch 4");
    assert_eq!(last.get(), 4);
    assert_eq!(snapshot(&carry, carry.opt.states()), before);
    Ok(())
}

/// A step that fails only when it is run again (in the backward pass): its error.
#[test]
fn step_error_in_the_recompute_passes_through() {
    let lr = leaf(0.9);
    let calls = Cell::new(0);
    let r = checkpointed_unroll(
        &w0(),
        6,
        std::slice::from_ref(&lr),
        |c, _| {
            calls.set(calls.get() + 1);
            if calls.get() > 6 {
                return Err(Error::InvalidArgument {
                    op: "my step",
                    message: "second run".into(),
                });
            }
            scale_step(c, &lr)
        },
        |c| c[0].sum_all(),
        &CheckpointOptions::checkpoints(2),
    );
    invalid(&r, "my step", "second run");
}

/// A step that computes something else when it runs again (fresh noise, a counter): the
/// recomputed graph is not the one that produced the carry, so the meta-gradient would be
/// wrong. It is an error naming the steps and the carry tensor; the plain unroll, which
/// runs each step once, is fine.
#[test]
fn nondeterministic_step_is_an_error_not_a_wrong_gradient() -> Result<()> {
    let lr = leaf(0.9);
    let calls = Cell::new(0);
    let noisy = |c: &Vec<Tensor>, _: usize| -> Result<Vec<Tensor>> {
        calls.set(calls.get() + 1);
        Ok(vec![c[0]
            .mul(&lr)?
            .affine(1.0, 1e-3 * calls.get() as f64)?])
    };
    let r = checkpointed_unroll(
        &w0(),
        6,
        std::slice::from_ref(&lr),
        noisy,
        |c| c[0].sqr()?.sum_all(),
        &CheckpointOptions::checkpoints(2),
    );
    invalid(&r, "checkpointed_unroll", "not deterministic");
    invalid(&r, "checkpointed_unroll", "carry tensor 0");
    calls.set(0);
    plain_unroll(&w0(), 6, std::slice::from_ref(&lr), noisy, |c| {
        c[0].sqr()?.sum_all()
    })?;
    Ok(())
}

/// A step whose carry has another number of tensors when run again: an error (the
/// cotangents would be matched to the wrong tensors).
#[test]
fn recomputed_carry_with_another_structure_is_an_error() {
    let lr = leaf(0.9);
    let calls = Cell::new(0);
    let r = checkpointed_unroll(
        &w0(),
        4,
        std::slice::from_ref(&lr),
        |c, _| {
            calls.set(calls.get() + 1);
            let w = c[0].mul(&lr)?;
            if calls.get() > 4 {
                Ok(vec![w.clone(), w])
            } else {
                Ok(vec![w])
            }
        },
        |c| c[0].sum_all(),
        &CheckpointOptions::checkpoints(2),
    );
    invalid(&r, "checkpointed_unroll", "not deterministic");
    invalid(&r, "checkpointed_unroll", "2 tensors");
}

/// A meta-loss that is NaN from a finite carry: `NonFinite` naming the meta-loss.
#[test]
fn nan_meta_loss_is_non_finite() {
    let lr = leaf(0.9);
    let hyper = std::slice::from_ref(&lr);
    let meta = |c: &Vec<Tensor>| c[0].sum_all()?.affine(1.0, f64::NAN);
    let ck = checkpointed_unroll(
        &w0(),
        4,
        hyper,
        |c, _| scale_step(c, &lr),
        meta,
        &CheckpointOptions::default(),
    );
    non_finite(
        &ck,
        &["checkpointed_unroll", "meta-loss", "final carry is finite"],
    );
    let plain = plain_unroll(&w0(), 4, hyper, |c, _| scale_step(c, &lr), meta);
    non_finite(
        &plain,
        &["plain_unroll", "meta-loss", "final carry is finite"],
    );
}

/// A step that turns the carry NaN part-way (step 5 of 9): `NonFinite` naming that step
/// and the carry tensor, in both unrolls, with every checkpoint count.
#[test]
fn nan_part_way_names_the_step() {
    let lr = leaf(0.9);
    let hyper = std::slice::from_ref(&lr);
    let step = |c: &Vec<Tensor>, t: usize| -> Result<Vec<Tensor>> {
        let w = c[0].mul(&lr)?;
        let bad = if t == 5 { f64::NAN } else { 0.0 };
        Ok(vec![c[1].clone(), w.affine(1.0, bad)?])
    };
    let start = vec![f64s(&[1.0], &[1]), f64s(&[2.0, 3.0], &[2])];
    // The NaN lands in tensor 1 (w), then moves to tensor 0.
    let meta = |c: &Vec<Tensor>| c[0].sum_all()?.add(&c[1].sum_all()?);
    for checkpoints in [None, Some(1), Some(3), Some(9)] {
        let r = checkpointed_unroll(
            &start,
            9,
            hyper,
            step,
            meta,
            &CheckpointOptions { checkpoints },
        );
        non_finite(&r, &["checkpointed_unroll", "step 5", "carry tensor 1"]);
    }
    let r = plain_unroll(&start, 9, hyper, step, meta);
    non_finite(&r, &["plain_unroll", "step 5", "carry tensor 1"]);
}

/// A hyperparameter that does not require grad can get no gradient (torch.autograd.grad
/// refuses it too): an error naming its position, before any step runs.
#[test]
fn hyperparameter_without_grad_is_an_error() {
    let lr = leaf(0.9);
    let constant = f64s(&[0.5], &[]);
    let hyper = [lr.clone(), constant];
    let calls = Cell::new(0);
    let step = |c: &Vec<Tensor>, _: usize| {
        calls.set(calls.get() + 1);
        scale_step(c, &lr)
    };
    let ck = checkpointed_unroll(
        &w0(),
        3,
        &hyper,
        step,
        |c| c[0].sum_all(),
        &CheckpointOptions::default(),
    );
    invalid(&ck, "checkpointed_unroll", "hyper[1]");
    let plain = plain_unroll(&w0(), 3, &hyper, step, |c| c[0].sum_all());
    invalid(&plain, "plain_unroll", "hyper[1]");
    assert_eq!(calls.get(), 0);
}

/// An integer hyperparameter (a leaf) cannot be differentiated: `UnsupportedDType`.
#[test]
fn integer_hyperparameter_is_unsupported() {
    let lr = leaf(0.9);
    let int = Tensor::from_slice(&[3u32], &[1], &device())
        .unwrap()
        .to_leaf();
    let r = checkpointed_unroll(
        &w0(),
        3,
        &[lr.clone(), int],
        |c, _| scale_step(c, &lr),
        |c| c[0].sum_all(),
        &CheckpointOptions::default(),
    );
    assert!(
        matches!(
            r,
            Err(Error::UnsupportedDType {
                dtype: DType::U32,
                ..
            })
        ),
        "{r:?}"
    );
}

/// The same hyperparameter twice gets the whole gradient at both positions (as
/// `torch.autograd.grad` does with a repeated input); checkpointed equals plain.
#[test]
fn repeated_hyperparameter_gets_the_gradient_at_both_positions() -> Result<()> {
    let lr = leaf(0.9);
    let once = plain_unroll(
        &w0(),
        5,
        std::slice::from_ref(&lr),
        |c, _| scale_step(c, &lr),
        |c| c[0].sqr()?.sum_all(),
    )?;
    let twice_hyper = [lr.clone(), lr.clone()];
    let plain = plain_unroll(
        &w0(),
        5,
        &twice_hyper,
        |c, _| scale_step(c, &lr),
        |c| c[0].sqr()?.sum_all(),
    )?;
    let ck = checkpointed_unroll(
        &w0(),
        5,
        &twice_hyper,
        |c, _| scale_step(c, &lr),
        |c| c[0].sqr()?.sum_all(),
        &CheckpointOptions::checkpoints(2),
    )?;
    let g = once.hyper_grads[0].as_ref().unwrap();
    for out in [&plain, &ck] {
        for h in &out.hyper_grads {
            assert_close("repeated lr", h.as_ref().unwrap(), g, 1e-12);
        }
    }
    assert_same("repeated lr, checkpointed", &ck, &plain, 1e-12);
    Ok(())
}

/// A hyperparameter that is also a carry tensor: the carry starts from a fresh leaf, so the
/// gradient is in `initial_grads` and the hyperparameter's entry is `None` (as documented).
#[test]
fn hyperparameter_that_is_a_carry_tensor_gets_none() -> Result<()> {
    let lr = leaf(0.9);
    let w = f64s(&[1.0, 2.0], &[2]).to_leaf();
    let out = checkpointed_unroll(
        &vec![w.clone()],
        3,
        &[w, lr.clone()],
        |c, _| scale_step(c, &lr),
        |c| c[0].sum_all(),
        &CheckpointOptions::default(),
    )?;
    assert!(out.hyper_grads[0].is_none());
    assert_eq!(
        out.initial_grads[0].as_ref().unwrap().to_vec_f64()?,
        [0.9f64.powi(3); 2]
    );
    assert!(out.hyper_grads[1].is_some());
    Ok(())
}

/// The same tensor twice in the initial carry (tied weights) is one tensor, as in a
/// hand-written unroll: the inner gradient of a loss of both positions is the total one at
/// each, and the meta-gradient is the total one at each position (as `grad` with a
/// repeated input). Loss `sum(a p0 p1) + |p0|^2 / 2`, so partial and total derivatives
/// differ.
#[test]
fn tied_initial_carry_matches_a_hand_written_unroll() -> Result<()> {
    let a = f64s(&[0.5, -1.0, 2.0], &[3]);
    let c = f64s(&[1.0, 0.3, -0.7], &[3]);
    let lr = leaf(0.1);
    let w = f64s(&[0.4, -0.2, 0.9], &[3]).to_leaf();
    let inner = |p: &[Tensor]| -> Result<Tensor> {
        p[0].mul(&p[1])?
            .mul(&a)?
            .sum_all()?
            .add(&p[0].sqr()?.sum_all()?.affine(0.5, 0.0)?)
    };
    let meta =
        |p: &[Tensor]| -> Result<Tensor> { p[0].mul(&c)?.sum_all()?.add(&p[1].sqr()?.sum_all()?) };
    let tied = vec![w.clone(), w.clone()];
    let mut opt = DiffOptimizer::new(
        Sgd {
            momentum: 0.5,
            ..Sgd::new(0.1)
        },
        &tied,
    )?;
    opt.set_overrides(&Overrides::new().set("lr", lr.clone()))?;
    // By hand: the optimizer steps the list [w, w] itself.
    let steps = 5;
    let mut by_hand_opt = opt.clone();
    let mut p = tied.clone();
    for _ in 0..steps {
        p = by_hand_opt.step_params(&inner(&p)?, &p)?;
    }
    let m = meta(&p)?;
    let want = grad(
        std::slice::from_ref(&m),
        &[w.clone(), w.clone(), lr.clone()],
        GradOptions::default(),
    )?;
    let carry = OptimizerCarry::new(tied, opt);
    let hyper = std::slice::from_ref(&lr);
    let step = |c: &OptimizerCarry<Sgd>, _: usize| c.step(&inner(&c.params)?, None);
    let plain = plain_unroll(&carry, steps, hyper, step, |c| meta(&c.params))?;
    let ck = checkpointed_unroll(
        &carry,
        steps,
        hyper,
        step,
        |c| meta(&c.params),
        &CheckpointOptions::checkpoints(2),
    )?;
    for (name, out) in [("plain", &plain), ("checkpointed", &ck)] {
        assert_eq!(
            out.meta_loss.to_scalar_f64()?,
            m.to_scalar_f64()?,
            "{name}: meta-loss"
        );
        for (i, g) in out.initial_grads.iter().enumerate() {
            assert_close(
                &format!("{name}: w at {i}"),
                g.as_ref().unwrap(),
                want[i].as_ref().unwrap(),
                1e-12,
            );
        }
        let g = out.hyper_grads[0].as_ref().unwrap();
        assert_close(&format!("{name}: lr"), g, want[2].as_ref().unwrap(), 1e-12);
    }
    Ok(())
}

/// A step that returns the same tensor twice (ties made along the unroll), followed by a
/// step whose inner gradient sees the tie: the checkpointed unroll must keep the tie in
/// its checkpoints, so it equals the plain unroll, whose lr-gradient matches finite
/// differences.
#[test]
fn ties_made_by_the_step_survive_checkpoints() -> Result<()> {
    let a = f64s(&[0.5, -1.0], &[2]);
    let step_with = |c: &Vec<Tensor>, lr: &Tensor| -> Result<Vec<Tensor>> {
        let l = c[0]
            .mul(&c[1])?
            .mul(&a)?
            .sum_all()?
            .add(&c[0].sqr()?.sum_all()?.affine(0.5, 0.0)?)?;
        let g = grad(&[l], &c[..1], GradOptions::create_graph())?;
        let x = c[0].sub(&g[0].as_ref().unwrap().mul(lr)?)?;
        Ok(vec![x.clone(), x])
    };
    let meta = |c: &Vec<Tensor>| c[0].sqr()?.sum_all()?.add(&c[1].sum_all()?);
    let start = vec![f64s(&[0.7, -0.4], &[2]), f64s(&[0.2, 0.9], &[2])];
    let value = |lr: f64| -> f64 {
        let lr = f64s(&[lr], &[]);
        plain_unroll(&start, 7, &[], |c, _| step_with(c, &lr), meta)
            .unwrap()
            .meta_loss
            .to_scalar_f64()
            .unwrap()
    };
    let lr = leaf(0.3);
    let hyper = std::slice::from_ref(&lr);
    let plain = plain_unroll(&start, 7, hyper, |c, _| step_with(c, &lr), meta)?;
    for checkpoints in [None, Some(2), Some(7)] {
        let ck = checkpointed_unroll(
            &start,
            7,
            hyper,
            |c, _| step_with(c, &lr),
            meta,
            &CheckpointOptions { checkpoints },
        )?;
        assert_same(&format!("ties, {checkpoints:?}"), &ck, &plain, 1e-12);
    }
    let g = plain.hyper_grads[0].as_ref().unwrap().to_scalar_f64()?;
    let f = fd(value, 0.3);
    assert!((g - f).abs() <= 1e-6 * f.abs().max(1.0), "{g} vs FD {f}");
    Ok(())
}

/// Integer tensors in a carry (a step counter) ride along: no gradient, carried by value.
#[test]
fn integer_carry_tensors_ride_along() -> Result<()> {
    let lr = leaf(0.9);
    let one = Tensor::from_slice(&[1u32], &[1], &device())?;
    let start = vec![
        f64s(&[1.0, 2.0], &[2]),
        Tensor::from_slice(&[0u32], &[1], &device())?,
    ];
    let step = |c: &Vec<Tensor>, _: usize| -> Result<Vec<Tensor>> {
        Ok(vec![c[0].mul(&lr)?, c[1].add(&one)?])
    };
    let hyper = std::slice::from_ref(&lr);
    let plain = plain_unroll(&start, 5, hyper, step, |c| c[0].sum_all())?;
    let ck = checkpointed_unroll(
        &start,
        5,
        hyper,
        step,
        |c| c[0].sum_all(),
        &CheckpointOptions::checkpoints(2),
    )?;
    assert_same("integer carry", &ck, &plain, 1e-12);
    assert!(ck.initial_grads[1].is_none());
    assert_eq!(ck.final_carry[1].to_vec_f64()?, [5.0]);
    Ok(())
}

/// The meta-gradient w.r.t. every entry of the initial weights (not only the
/// hyperparameters) matches central differences of the unroll, with momentum state
/// created at step 1 and uneven segments (7 steps, 3 checkpoints: 3 + 3 + 1).
#[test]
fn initial_weight_gradient_matches_finite_differences() -> Result<()> {
    let d = data();
    let lr = leaf(0.2);
    let p = params();
    let out = checkpointed_unroll(
        &sgd_carry(p.clone(), &lr),
        7,
        std::slice::from_ref(&lr),
        |c, _| sgd_step(c, &d),
        |c| sgd_meta(c, &d),
        &CheckpointOptions::checkpoints(3),
    )?;
    assert_eq!(out.checkpoints, 3);
    for (i, base) in p.iter().enumerate() {
        let values = base.to_vec_f64()?;
        let g = out.initial_grads[i].as_ref().unwrap().to_vec_f64()?;
        for j in 0..values.len() {
            let at = |v: f64| -> f64 {
                let mut moved = values.clone();
                moved[j] = v;
                let mut q = p.clone();
                q[i] = f64s(&moved, base.dims());
                let lr = f64s(&[0.2], &[]);
                plain_unroll(
                    &sgd_carry(q, &lr),
                    7,
                    &[],
                    |c, _| sgd_step(c, &d),
                    |c| sgd_meta(c, &d),
                )
                .unwrap()
                .meta_loss
                .to_scalar_f64()
                .unwrap()
            };
            let f = fd(at, values[j]);
            assert!(
                (g[j] - f).abs() <= 1e-6 * f.abs().max(1e-2),
                "tensor {i} entry {j}: {} vs FD {f}",
                g[j]
            );
        }
    }
    Ok(())
}

/// An empty carry is legal: the meta-loss then depends on the hyperparameters only
/// (3 lr^2: gradient 6 lr).
#[test]
fn empty_carry_differentiates_the_hyperparameters() -> Result<()> {
    let lr = leaf(0.5);
    let out = checkpointed_unroll(
        &Vec::<Tensor>::new(),
        4,
        std::slice::from_ref(&lr),
        |c, _| Ok(c.clone()),
        |_| lr.sqr()?.affine(3.0, 0.0),
        &CheckpointOptions::default(),
    )?;
    assert!(out.initial_grads.is_empty());
    assert_eq!(out.hyper_grads[0].as_ref().unwrap().to_scalar_f64()?, 3.0);
    Ok(())
}

// ---------------------------------------------------------------- carries

/// `OptimizerCarry::with_tensors` checks each replacement against the tensor it replaces:
/// a wrong count is `ParamCount`, a wrong shape `ParamShape` naming the slot, a wrong
/// dtype `DTypeMismatch`; the carry is unchanged.
#[test]
fn optimizer_carry_with_tensors_checks_every_replacement() -> Result<()> {
    let d = data();
    let lr = leaf(0.2);
    let warm = warm_carry(&d, &lr)?;
    let before = snapshot(&warm, warm.opt.states());
    let good = warm.tensors();
    let count = warm.with_tensors(&good[..3]);
    assert!(
        matches!(
            count,
            Err(Error::ParamCount {
                expected: 4,
                got: 3,
                ..
            })
        ),
        "{count:?}"
    );
    let mut shape = good.clone();
    shape[3] = f64s(&[1.0, 2.0, 3.0], &[3]);
    match warm.with_tensors(&shape) {
        Err(Error::ParamShape {
            op,
            position,
            name,
            expected,
            got,
        }) => {
            assert_eq!(op, "OptimizerCarry::with_tensors");
            assert_eq!(position, 3);
            assert!(
                name.contains("carry tensor 3") && name.contains("parameter 1"),
                "{name}"
            );
            assert_eq!((expected, got), (vec![2], vec![3]));
        }
        other => panic!("{other:?}"),
    }
    let mut dtype = good.clone();
    dtype[0] = good[0].to_dtype(DType::F32)?;
    let r = warm.with_tensors(&dtype);
    assert!(
        matches!(
            r,
            Err(Error::DTypeMismatch {
                op: "OptimizerCarry::with_tensors",
                ..
            })
        ),
        "{r:?}"
    );
    assert_eq!(snapshot(&warm, warm.opt.states()), before);
    Ok(())
}

/// `OptimizerCarry::step` with a buffer list of another length is `ParamCount` naming the
/// buffers; the carry is unchanged.
#[test]
fn optimizer_carry_step_with_wrong_buffer_count() -> Result<()> {
    let d = data();
    let lr = leaf(0.2);
    let carry = sgd_carry(params(), &lr).with_buffers(vec![f64s(&[0.0], &[1])]);
    let before = snapshot(&carry, carry.opt.states());
    let r = carry.step(
        &loss(&carry.params, &d.x, &d.y)?,
        Some(vec![f64s(&[0.0], &[1]), f64s(&[0.0], &[1])]),
    );
    assert!(
        matches!(
            r,
            Err(Error::ParamCount {
                op: "OptimizerCarry::step (buffers)",
                expected: 1,
                got: 2,
                ..
            })
        ),
        "{r:?}"
    );
    assert_eq!(snapshot(&carry, carry.opt.states()), before);
    Ok(())
}

/// A bare list refuses a replacement list of another length.
#[test]
fn vec_carry_with_tensors_wrong_count() {
    let r = w0().with_tensors(&[f64s(&[1.0], &[1]), f64s(&[1.0], &[1])]);
    assert!(
        matches!(
            r,
            Err(Error::ParamCount {
                expected: 1,
                got: 2,
                ..
            })
        ),
        "{r:?}"
    );
}

// ---------------------------------------------------------------- implicit_grad

/// F(x, theta) = x + theta x^3 - c (elementwise, x and theta [2]): dF/dx = diag(1 + 3 theta
/// x^2) is positive definite for theta > 0. L = sum(w x*^2).
struct Cubic {
    c: Vec<f64>,
    w: Vec<f64>,
}

impl Cubic {
    fn new() -> Self {
        Cubic {
            c: vec![1.5, -0.8],
            w: vec![1.0, 2.0],
        }
    }

    /// x*(theta) by Newton's method, per coordinate.
    fn solve(&self, theta: &[f64]) -> Vec<f64> {
        self.c
            .iter()
            .zip(theta)
            .map(|(&c, &th)| {
                let mut x = c;
                for _ in 0..100 {
                    x -= (x + th * x * x * x - c) / (1.0 + 3.0 * th * x * x);
                }
                x
            })
            .collect()
    }

    fn outer(&self, theta: &[f64]) -> f64 {
        self.solve(theta)
            .iter()
            .zip(&self.w)
            .map(|(x, w)| w * x * x)
            .sum()
    }

    fn condition(&self, x: &[Tensor], th: &[Tensor]) -> Result<Vec<Tensor>> {
        let c = f64s(&self.c, &[2]);
        Ok(vec![x[0].add(&th[0].mul(&x[0].powf(3.0)?)?)?.sub(&c)?])
    }

    fn dl_dx(&self, x: &[f64]) -> Tensor {
        let g: Vec<f64> = x.iter().zip(&self.w).map(|(x, w)| 2.0 * w * x).collect();
        f64s(&g, &[2])
    }
}

/// Both solvers against central differences of the solution map L(x*(theta)) (f64).
#[test]
fn implicit_gradient_matches_finite_differences() -> Result<()> {
    let p = Cubic::new();
    let theta = [0.7, 0.3];
    let x = p.solve(&theta);
    let th = f64s(&theta, &[2]).to_leaf();
    for options in [
        ImplicitOptions::cg(1e-13, 10),
        ImplicitOptions::neumann(0.2, 1e-13, 5000),
    ] {
        let out = implicit_grad(
            |x, t| p.condition(x, t),
            &[f64s(&x, &[2])],
            std::slice::from_ref(&th),
            &[p.dl_dx(&x)],
            &options,
        )?;
        assert!(out.converged, "{options:?}: {out:?}");
        let g = out.grads[0].as_ref().unwrap().to_vec_f64()?;
        for j in 0..2 {
            let f = fd(
                |v| {
                    let mut t = theta;
                    t[j] = v;
                    p.outer(&t)
                },
                theta[j],
            );
            assert!(
                (g[j] - f).abs() <= 1e-7 * f.abs().max(1.0),
                "{:?} theta {j}: {} vs FD {f}",
                options.solver,
                g[j]
            );
        }
    }
    Ok(())
}

fn cubic_call(options: &ImplicitOptions) -> Result<candle_higher::unroll::ImplicitGrads> {
    let p = Cubic::new();
    let x = p.solve(&[0.7, 0.3]);
    implicit_grad(
        |x, t| p.condition(x, t),
        &[f64s(&x, &[2])],
        &[f64s(&[0.7, 0.3], &[2]).to_leaf()],
        &[p.dl_dx(&x)],
        options,
    )
}

/// max_iter = 0 allows no product, so v = 0 and a zero gradient: an error.
#[test]
fn zero_iterations_is_an_error() {
    for options in [
        ImplicitOptions::cg(1e-8, 0),
        ImplicitOptions::neumann(0.2, 1e-8, 0),
    ] {
        invalid(&cubic_call(&options), "implicit_grad", "max_iter is 0");
    }
}

/// Tolerances: NaN, negative and infinite are errors, and so is a relative tolerance of 1
/// or more, which v = 0 (a zero gradient) meets without a single product.
#[test]
fn tolerances_outside_zero_one_are_errors() {
    for tol in [f64::NAN, -1e-8, f64::INFINITY, 1.0, 2.5] {
        for options in [
            ImplicitOptions::cg(tol, 10),
            ImplicitOptions::neumann(0.2, tol, 10),
        ] {
            invalid(&cubic_call(&options), "implicit_grad", "tol is");
        }
    }
    // 0 is a legal tolerance: iterate to max_iter (or an exact solve).
    let out = cubic_call(&ImplicitOptions::cg(0.0, 5)).unwrap();
    assert!(out.residual < 1e-12, "{out:?}");
}

/// The Neumann step: NaN, negative, zero and infinite are errors naming alpha.
#[test]
fn neumann_step_must_be_finite_and_positive() {
    for alpha in [f64::NAN, -0.1, 0.0, f64::INFINITY] {
        invalid(
            &cubic_call(&ImplicitOptions::neumann(alpha, 1e-8, 10)),
            "implicit_grad",
            "alpha",
        );
    }
}

/// NaN in dL/dx: `NonFinite` naming it (it was a silent zero gradient, `v = 0`).
#[test]
fn nan_outer_gradient_is_non_finite() {
    let p = Cubic::new();
    let x = p.solve(&[0.7, 0.3]);
    for options in [
        ImplicitOptions::cg(1e-8, 10),
        ImplicitOptions::neumann(0.2, 1e-8, 10),
    ] {
        let r = implicit_grad(
            |x, t| p.condition(x, t),
            &[f64s(&x, &[2])],
            &[f64s(&[0.7, 0.3], &[2]).to_leaf()],
            &[f64s(&[f64::NAN, 1.0], &[2])],
            &options,
        );
        non_finite(&r, &["implicit_grad", "dl_dx tensor 0"]);
    }
}

/// NaN in the solution: `NonFinite` naming it, not a "not positive definite" error.
#[test]
fn nan_solution_is_non_finite() {
    let p = Cubic::new();
    for options in [
        ImplicitOptions::cg(1e-8, 10),
        ImplicitOptions::neumann(0.2, 1e-8, 10),
    ] {
        let r = implicit_grad(
            |x, t| p.condition(x, t),
            &[f64s(&[f64::NAN, 1.0], &[2])],
            &[f64s(&[0.7, 0.3], &[2]).to_leaf()],
            &[f64s(&[1.0, 1.0], &[2])],
            &options,
        );
        non_finite(&r, &["implicit_grad", "solution tensor 0"]);
    }
}

/// An optimality condition that is NaN at a finite solution (log of a negative number):
/// `NonFinite` naming the condition's output.
#[test]
fn nan_optimality_condition_is_non_finite() {
    let theta = leaf(1.0);
    let r = implicit_grad(
        |x, t| Ok(vec![x[0].affine(1.0, -10.0)?.log()?.mul(&t[0])?]),
        &[f64s(&[1.0, 2.0], &[2])],
        std::slice::from_ref(&theta),
        &[f64s(&[1.0, 1.0], &[2])],
        &ImplicitOptions::default(),
    );
    non_finite(&r, &["implicit_grad", "optimality condition", "output 0"]);
}

/// A condition that does not depend on the solution through the graph (here x is
/// detached; the usual cause is a gradient taken without `create_graph`): dF/dx is 0 for
/// the tape, so the system has no solution. An error saying so, for both solvers.
#[test]
fn condition_without_a_path_to_the_solution_is_an_error() {
    let theta = leaf(2.0);
    for options in [
        ImplicitOptions::cg(1e-8, 10),
        ImplicitOptions::neumann(0.2, 1e-8, 10),
    ] {
        let r = implicit_grad(
            |x, t| Ok(vec![x[0].detach().mul(&t[0])?.affine(1.0, -1.0)?]),
            &[f64s(&[0.5], &[1])],
            std::slice::from_ref(&theta),
            &[f64s(&[1.0], &[1])],
            &options,
        );
        invalid(&r, "implicit_grad", "does not depend on the solution");
    }
}

/// A singular dF/dx = 1 1^T with dL/dx = [1, -1] in its null space: conjugate gradient
/// meets zero curvature and says dF/dx is not positive definite; the Neumann series makes
/// no progress and reports it (residual 1, not converged).
#[test]
fn singular_system() -> Result<()> {
    let theta = leaf(1.0);
    let ones = f64s(&[1.0, 1.0], &[2]);
    let cond = |x: &[Tensor], t: &[Tensor]| Ok(vec![ones.mul(&x[0].sum_all()?.sub(&t[0])?)?]);
    let call = |options: ImplicitOptions| {
        implicit_grad(
            cond,
            &[f64s(&[0.4, 0.6], &[2])],
            std::slice::from_ref(&theta),
            &[f64s(&[1.0, -1.0], &[2])],
            &options,
        )
    };
    invalid(
        &call(ImplicitOptions::cg(1e-8, 10)),
        "implicit_grad (conjugate gradient)",
        "not positive definite",
    );
    let n = call(ImplicitOptions::neumann(0.2, 1e-8, 20))?;
    assert!(!n.converged && (n.residual - 1.0).abs() < 1e-12, "{n:?}");
    Ok(())
}

/// A theta that does not require grad gets no gradient: an error naming its position.
#[test]
fn theta_without_grad_is_an_error() {
    let p = Cubic::new();
    let x = p.solve(&[0.7, 0.3]);
    let r = implicit_grad(
        |x, t| p.condition(x, t),
        &[f64s(&x, &[2])],
        &[f64s(&[0.7, 0.3], &[2])],
        &[p.dl_dx(&x)],
        &ImplicitOptions::default(),
    );
    invalid(&r, "implicit_grad", "theta[0]");
}

/// No solution tensors: nothing to solve for, an error.
#[test]
fn empty_solution_is_an_error() {
    let theta = leaf(1.0);
    let r = implicit_grad(
        |_, _| Ok(vec![]),
        &[],
        std::slice::from_ref(&theta),
        &[],
        &ImplicitOptions::default(),
    );
    invalid(&r, "implicit_grad", "no solution tensors");
}

/// dL/dx in another dtype or count, and a condition output of another shape: typed.
#[test]
fn mismatched_outer_gradient_and_condition() {
    let p = Cubic::new();
    let x = p.solve(&[0.7, 0.3]);
    let th = f64s(&[0.7, 0.3], &[2]).to_leaf();
    let solution = [f64s(&x, &[2])];
    let dtype = implicit_grad(
        |x, t| p.condition(x, t),
        &solution,
        std::slice::from_ref(&th),
        &[p.dl_dx(&x).to_dtype(DType::F32).unwrap()],
        &ImplicitOptions::default(),
    );
    assert!(
        matches!(
            dtype,
            Err(Error::DTypeMismatch {
                op: "implicit_grad",
                ..
            })
        ),
        "{dtype:?}"
    );
    let count = implicit_grad(
        |x, t| p.condition(x, t),
        &solution,
        std::slice::from_ref(&th),
        &[p.dl_dx(&x), p.dl_dx(&x)],
        &ImplicitOptions::default(),
    );
    invalid(
        &count,
        "implicit_grad",
        "dl_dx has 2 tensors; the solution has 1",
    );
    let shape = implicit_grad(
        |x, _| Ok(vec![x[0].sum_all()?]),
        &solution,
        std::slice::from_ref(&th),
        &[p.dl_dx(&x)],
        &ImplicitOptions::default(),
    );
    assert!(
        matches!(&shape, Err(Error::ShapeMismatch { op: "implicit_grad", got, .. }) if got.is_empty()),
        "{shape:?}"
    );
}

/// The condition's own error comes back unchanged.
#[test]
fn condition_error_passes_through() {
    let theta = leaf(1.0);
    let r = implicit_grad(
        |_, _| {
            Err(Error::InvalidArgument {
                op: "my condition",
                message: "boom".into(),
            })
        },
        &[f64s(&[1.0], &[1])],
        std::slice::from_ref(&theta),
        &[f64s(&[1.0], &[1])],
        &ImplicitOptions::default(),
    );
    invalid(&r, "my condition", "boom");
}

/// The same theta twice gets the whole gradient at both positions.
#[test]
fn repeated_theta_gets_the_gradient_at_both_positions() -> Result<()> {
    let p = Cubic::new();
    let x = p.solve(&[0.7, 0.3]);
    let th = f64s(&[0.7, 0.3], &[2]).to_leaf();
    let once = cubic_call(&ImplicitOptions::default())?;
    let out = implicit_grad(
        |x, t| p.condition(x, &t[..1]),
        &[f64s(&x, &[2])],
        &[th.clone(), th],
        &[p.dl_dx(&x)],
        &ImplicitOptions::default(),
    )?;
    let want = once.grads[0].as_ref().unwrap();
    for g in &out.grads {
        assert_close("repeated theta", g.as_ref().unwrap(), want, 1e-12);
    }
    Ok(())
}

/// dL/dx = 0: v = 0 with residual 0, converged without a product, and a zero gradient.
#[test]
fn zero_outer_gradient_is_a_zero_gradient() -> Result<()> {
    let p = Cubic::new();
    let x = p.solve(&[0.7, 0.3]);
    let out = implicit_grad(
        |x, t| p.condition(x, t),
        &[f64s(&x, &[2])],
        &[f64s(&[0.7, 0.3], &[2]).to_leaf()],
        &[f64s(&[0.0, 0.0], &[2])],
        &ImplicitOptions::default(),
    )?;
    assert!(out.converged && out.residual == 0.0 && out.iterations == 0);
    assert_eq!(out.grads[0].as_ref().unwrap().to_vec_f64()?, [0.0, 0.0]);
    Ok(())
}

// ---------------------------------------------------------------- es_gradient

fn quad(x: &[Tensor]) -> Result<Tensor> {
    x[0].sqr()?.sum_all()
}

fn es(sigma: f64, samples: usize) -> EsOptions {
    EsOptions {
        sigma,
        samples,
        method: EsMethod::Antithetic,
        seed: 3,
    }
}

/// sigma NaN, negative, 0, infinite; 0 or 1 samples: errors naming them.
#[test]
fn es_bad_sigma_and_sample_counts() {
    let x = [f64s(&[1.0, 2.0], &[2])];
    for sigma in [f64::NAN, -0.1, 0.0, f64::INFINITY] {
        invalid(
            &es_gradient(quad, &x, &es(sigma, 10)),
            "es_gradient",
            "sigma is",
        );
    }
    for samples in [0, 1] {
        invalid(
            &es_gradient(quad, &x, &es(0.1, samples)),
            "es_gradient",
            &format!("{samples} samples"),
        );
    }
}

/// No inputs: nothing to estimate, an error (f is never called).
#[test]
fn es_no_inputs_is_an_error() {
    let calls = Cell::new(0);
    let r = es_gradient(
        |_| {
            calls.set(calls.get() + 1);
            Ok(Tensor::scalar(1.0f64))
        },
        &[],
        &es(0.1, 10),
    );
    invalid(&r, "es_gradient", "no inputs");
    assert_eq!(calls.get(), 0);
}

/// Integer inputs cannot be perturbed by sigma eps (the perturbed values would be
/// rounded back to integers): `UnsupportedDType`.
#[test]
fn es_integer_inputs_are_unsupported() {
    let x = [Tensor::from_slice(&[1u32, 2], &[2], &device()).unwrap()];
    let r = es_gradient(|x| x[0].to_dtype(DType::F64)?.sum_all(), &x, &es(0.1, 10));
    assert!(
        matches!(
            r,
            Err(Error::UnsupportedDType {
                op: "es_gradient",
                dtype: DType::U32,
                ..
            })
        ),
        "{r:?}"
    );
}

/// NaN in an input: `NonFinite` naming the input.
#[test]
fn es_nan_input_is_non_finite() {
    let x = [f64s(&[1.0], &[1]), f64s(&[1.0, f64::NAN], &[2])];
    let r = es_gradient(|x| x[0].sum_all(), &x, &es(0.1, 10));
    non_finite(&r, &["es_gradient", "input 1"]);
}

/// f NaN at one evaluation (the 7th: sample 3's x + sigma eps): `NonFinite` naming the
/// sample, and no further evaluation (it was a NaN estimate with standard errors of 0).
#[test]
fn es_nan_function_value_is_non_finite() {
    let calls = Cell::new(0);
    let r = es_gradient(
        |x| {
            calls.set(calls.get() + 1);
            let v = quad(x)?;
            if calls.get() == 7 {
                v.affine(1.0, f64::NAN)
            } else {
                Ok(v)
            }
        },
        &[f64s(&[1.0, 2.0], &[2])],
        &es(0.1, 10),
    );
    non_finite(&r, &["es_gradient", "sample 3", "x + sigma eps"]);
    assert_eq!(calls.get(), 7);
    // The forward estimator's baseline f(x).
    let r = es_gradient(
        |x| quad(x)?.affine(1.0, f64::INFINITY),
        &[f64s(&[1.0, 2.0], &[2])],
        &EsOptions {
            method: EsMethod::Forward,
            ..es(0.1, 10)
        },
    );
    non_finite(&r, &["es_gradient", "baseline"]);
}

/// An `f` of several elements is `NonScalarOutput` naming es_gradient and f, with the
/// advice to reduce its value (there is no `grad_outputs` to give).
#[test]
fn es_non_scalar_function_value_names_es_gradient() {
    let r = es_gradient(
        |x| Ok(x[0].clone()),
        &[f64s(&[1.0, 2.0], &[2])],
        &es(0.1, 10),
    );
    assert!(
        matches!(&r, Err(Error::NonScalarOutput { shape, .. }) if shape == &[2]),
        "{r:?}"
    );
    let msg = r.unwrap_err().to_string();
    assert!(
        msg.starts_with("es_gradient: f's value has shape [2];")
            && msg.contains("sum_all")
            && !msg.contains("grad_outputs"),
        "{msg}"
    );
}

/// f's own error comes back unchanged, and f is not called again.
#[test]
fn es_function_error_passes_through() {
    let calls = Cell::new(0);
    let r = es_gradient(
        |_| {
            calls.set(calls.get() + 1);
            Err::<Tensor, _>(Error::InvalidArgument {
                op: "my f",
                message: "diverged".into(),
            })
        },
        &[f64s(&[1.0], &[1])],
        &es(0.1, 10),
    );
    invalid(&r, "my f", "diverged");
    assert_eq!(calls.get(), 1);
}

/// f32 inputs with sigma below their resolution: x + sigma eps rounds back to x (or to a
/// few steps of it), which made an estimate of exactly 0 with standard error 0. An error
/// naming sigma and the dtype; a sigma well above the resolution works.
#[test]
fn es_sigma_below_the_dtype_resolution_is_an_error() -> Result<()> {
    let x = [f64s(&[1000.0, -2.0], &[2]).to_dtype(DType::F32)?];
    let f = |x: &[Tensor]| x[0].to_dtype(DType::F64)?.sqr()?.sum_all();
    let r = es_gradient(f, &x, &es(1e-6, 10));
    invalid(&r, "es_gradient", "F32");
    invalid(&r, "es_gradient", "sigma");
    let ok = es_gradient(f, &x, &es(1.0, 4000))?;
    let g = ok.grads[0].to_vec_f64()?;
    let se = ok.std_errors[0].to_vec_f64()?;
    assert_eq!(ok.grads[0].dtype(), DType::F32);
    for (j, want) in [2000.0, -4.0].iter().enumerate() {
        assert!((g[j] - want).abs() <= 5.0 * se[j], "{g:?} ± {se:?}");
    }
    Ok(())
}

// ---------------------------------------------------------------- innerloop

fn small_model(seed: u64) -> nn::Sequential {
    let vb = nn::VarBuilder::new(seed, DType::F64, &device());
    nn::seq().add(nn::linear(3, 2, vb.pp("0")).unwrap())
}

fn batch() -> (Tensor, Tensor) {
    let mut r = rng(40);
    (randn(&mut r, &[4, 3]), randn(&mut r, &[4, 2]))
}

fn mse(out: &Tensor, y: &Tensor) -> Result<Tensor> {
    out.sub(y)?.sqr()?.mean_all()
}

fn innerloop_err(options: InnerloopOptions) -> Error {
    innerloop(
        &small_model(1),
        &Optimizer::new(Sgd::new(0.1), 2).unwrap(),
        options,
    )
    .unwrap_err()
}

/// innerloop's overrides are checked: an unknown name (listing the known ones), NaN,
/// a tensor of several elements without task batching, a per-task tensor of the wrong
/// length; and a task count of 0.
#[test]
fn innerloop_rejects_bad_overrides_and_task_counts() {
    let e = innerloop_err(InnerloopOptions::new().overrides(Overrides::new().set("lrr", 0.1)));
    assert!(
        matches!(&e, Error::InvalidArgument { message, .. } if message.contains("\"lrr\"") && message.contains("lr")),
        "{e}"
    );
    let e = innerloop_err(InnerloopOptions::new().overrides(Overrides::new().set("lr", f64::NAN)));
    assert!(
        matches!(&e, Error::InvalidHyperparameter { name, value, .. } if name == "lr" && value.is_nan()),
        "{e}"
    );
    let e = innerloop_err(
        InnerloopOptions::new().overrides(Overrides::new().set("lr", f64s(&[0.1, 0.2], &[2]))),
    );
    assert!(
        matches!(&e, Error::ShapeMismatch { got, .. } if got == &[2]),
        "{e}"
    );
    let e = innerloop_err(
        InnerloopOptions::new()
            .tasks(2)
            .overrides(Overrides::new().set("lr", f64s(&[0.1, 0.2, 0.3], &[3]))),
    );
    assert!(
        matches!(&e, Error::ShapeMismatch { got, .. } if got == &[3]),
        "{e}"
    );
    let e = innerloop_err(InnerloopOptions::new().tasks(0));
    assert!(e.to_string().contains("tasks = 0"), "{e}");
}

/// An optimizer whose state was made for another model (same count, other shapes) is
/// `StateShape` naming the parameter and the entry, and it is left as it was.
#[test]
fn innerloop_refuses_state_of_another_model() -> Result<()> {
    let vb = nn::VarBuilder::new(5, DType::F64, &device());
    let mut other = nn::seq().add(nn::linear(2, 3, vb.pp("0"))?);
    let mut opt = Optimizer::new(Adam::new(0.1), 2)?;
    let x = f64s(&[0.1, 0.2, 0.3, 0.4], &[2, 2]);
    let l = other.forward(&x)?.sqr()?.mean_all()?;
    opt.step_module(&mut other, &candle_higher::backward(&l)?)?;
    let before = format!("{:?}", opt.states());
    let e = innerloop(&small_model(1), &opt, InnerloopOptions::new()).unwrap_err();
    assert!(
        matches!(&e, Error::StateShape { param: 0, entry, .. } if entry == "exp_avg"),
        "{e}"
    );
    assert_eq!(format!("{:?}", opt.states()), before);
    Ok(())
}

/// The fmodel's fast weights, time and the optimizer's states, by id and bits.
fn inner_snapshot(
    f: &candle_higher::FunctionalModel<nn::Sequential>,
    d: &DiffOptimizer<Sgd>,
) -> (usize, Snapshot) {
    (f.time(), snapshot(&f.fast_params().to_vec(), d.states()))
}

/// Failing inner steps change neither the fmodel nor the optimizer: a loss that does not
/// reach the fast weights (computed from the base model), a non-scalar loss, an invalid
/// per-step override, a callback's error. The next good step then gives what it would have
/// given without them.
#[test]
fn failing_inner_steps_change_nothing() -> Result<()> {
    let (x, y) = batch();
    let base = small_model(1);
    let opt = Optimizer::new(
        Sgd {
            momentum: 0.9,
            ..Sgd::new(0.1)
        },
        2,
    )?;
    let (mut f, mut d) = innerloop(&base, &opt, InnerloopOptions::new())?;
    let (mut f_ref, mut d_ref) = innerloop(&base, &opt, InnerloopOptions::new())?;
    let l = mse(&f.forward(&x)?, &y)?;
    d.step(&mut f, &l)?;
    let l = mse(&f_ref.forward(&x)?, &y)?;
    d_ref.step(&mut f_ref, &l)?;
    let before = inner_snapshot(&f, &d);

    let from_base = mse(&base.forward(&x)?, &y)?;
    let e = d.step(&mut f, &from_base).unwrap_err();
    assert!(matches!(e, Error::NoGradient { trainable: 2, .. }), "{e}");
    assert_eq!(inner_snapshot(&f, &d), before);

    let per_row = f.forward(&x)?.sub(&y)?.sqr()?;
    let e = d.step(&mut f, &per_row).unwrap_err();
    assert!(
        matches!(&e, Error::NonScalarOutput { shape, .. } if shape == &[4, 2]),
        "{e}"
    );
    assert_eq!(inner_snapshot(&f, &d), before);

    let l = mse(&f.forward(&x)?, &y)?;
    let bad_lr = StepOptions::new().overrides(Overrides::new().set("lr", -1.0));
    let e = d.step_with(&mut f, &l, bad_lr).unwrap_err();
    assert!(
        matches!(&e, Error::InvalidHyperparameter { name, value, .. } if name == "lr" && *value == -1.0),
        "{e}"
    );
    assert_eq!(inner_snapshot(&f, &d), before);

    let failing = StepOptions::new().callback(grad_callback(|_| {
        Err(Error::InvalidArgument {
            op: "my clip",
            message: "norm is NaN".into(),
        })
    }));
    let e = d.step_with(&mut f, &l, failing).unwrap_err();
    assert!(
        matches!(&e, Error::InvalidArgument { op: "my clip", .. }),
        "{e}"
    );
    assert_eq!(inner_snapshot(&f, &d), before);

    d.step(&mut f, &l)?;
    let l_ref = mse(&f_ref.forward(&x)?, &y)?;
    d_ref.step(&mut f_ref, &l_ref)?;
    for (a, b) in f.fast_params().iter().zip(f_ref.fast_params()) {
        assert_eq!(bits(a), bits(b));
    }
    assert_eq!(f.time(), 2);
    Ok(())
}

/// A differentiable optimizer used on an fmodel of another model (other parameter count)
/// is an error naming both counts, and the fmodel is unchanged.
#[test]
fn diffopt_on_another_fmodel_is_a_count_error() -> Result<()> {
    let (x, _) = batch();
    let (_, mut d) = innerloop(
        &small_model(1),
        &Optimizer::new(Sgd::new(0.1), 2)?,
        InnerloopOptions::new(),
    )?;
    let vb = nn::VarBuilder::new(2, DType::F64, &device());
    let bigger = nn::seq()
        .add(nn::linear(3, 4, vb.pp("0"))?)
        .add(nn::Activation::Tanh)
        .add(nn::linear(4, 2, vb.pp("2"))?);
    let (mut g, _) = innerloop(
        &bigger,
        &Optimizer::new(Sgd::new(0.1), 4)?,
        InnerloopOptions::new(),
    )?;
    let ids: Vec<TensorId> = g.fast_params().iter().map(Tensor::id).collect();
    let l = g.forward(&x)?.sqr()?.mean_all()?;
    let e = d.step(&mut g, &l).unwrap_err();
    assert!(
        matches!(
            &e,
            Error::ParamCount {
                op: "DiffOptimizer::step",
                what: "parameters",
                expected: 2,
                got: 4
            }
        ),
        "{e}"
    );
    assert_eq!(
        g.fast_params().iter().map(Tensor::id).collect::<Vec<_>>(),
        ids
    );
    assert_eq!(g.time(), 0);
    Ok(())
}

/// The ids of `model`'s parameter tensors: a step that changed nothing leaves the same ones.
fn param_ids<M: Parameters + Clone>(model: &M) -> Result<Vec<TensorId>> {
    Ok(model.parameters()?.iter().map(Tensor::id).collect())
}

/// `model` holds the parameter tensors `ids` and `opt` has no state: a failed step's mark.
fn assert_untouched<M: Parameters + Clone, O: Hyperparameters + OptimizerStep>(
    model: &M,
    ids: &[TensorId],
    opt: &Optimizer<O>,
) -> Result<()> {
    assert_eq!(param_ids(model)?, ids);
    assert!(opt.states().iter().all(State::is_empty));
    Ok(())
}

/// `step_module` with a store holding no gradient of the model (a detached inner loop's
/// meta-loss) is `NoGradient`; the model and the optimizer are unchanged.
#[test]
fn step_module_without_gradients_changes_nothing() -> Result<()> {
    let mut model = small_model(1);
    let mut opt = Optimizer::new(Adam::new(0.1), 2)?;
    let ids = param_ids(&model)?;
    let e = opt
        .step_module(&mut model, &GradStore::default())
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::NoGradient {
                op: "Optimizer::step_module",
                ..
            }
        ),
        "{e}"
    );
    assert_untouched(&model, &ids, &opt)
}

/// `step_module` with a gradient of another shape or dtype than its parameter (a store
/// filled by hand) is a typed error, before anything changes: it would broadcast.
#[test]
fn step_module_with_a_mis_shaped_or_mis_typed_gradient() -> Result<()> {
    let mut model = small_model(1);
    let mut opt = Optimizer::new(Adam::new(0.1), 2)?;
    let params = model.parameters()?;
    let ids = param_ids(&model)?;
    let mut store = GradStore::default();
    store.insert(&params[0], f64s(&[1.0], &[1]));
    let e = opt.step_module(&mut model, &store).unwrap_err();
    assert!(
        matches!(&e, Error::ShapeMismatch { got, .. } if got == &[1]),
        "{e}"
    );
    let mut store = GradStore::default();
    store.insert(&params[1], params[1].ones_like()?.to_dtype(DType::F32)?);
    let e = opt.step_module(&mut model, &store).unwrap_err();
    assert!(matches!(&e, Error::DTypeMismatch { .. }), "{e}");
    assert_untouched(&model, &ids, &opt)
}

/// The base model's buffers (batch-norm running statistics) are the base model's: an inner
/// loop that moves the model to a device and steps in training mode, and an `innerloop` call
/// that fails, leave them as they were, bit for bit.
#[test]
fn innerloop_leaves_the_base_model_buffers_alone() -> Result<()> {
    let (x, y) = batch();
    let vb = nn::VarBuilder::new(3, DType::F64, &device());
    let base = nn::seq()
        .add(nn::linear(3, 2, vb.pp("0"))?)
        .add(nn::batch_norm1d(
            2,
            nn::BatchNormConfig::default(),
            vb.pp("1"),
        )?);
    let buffers = |m: &nn::Sequential| -> Vec<(String, Vec<u64>)> {
        m.named_buffers()
            .unwrap()
            .iter()
            .map(|(n, t)| (n.clone(), bits(t)))
            .collect()
    };
    let before = buffers(&base);
    assert!(!before.is_empty());
    let opt = Optimizer::new(Sgd::new(0.1), base.parameters()?.len())?;
    let options = InnerloopOptions::new()
        .device(&device())
        .initial_weights(candle_higher::InitialWeights::BaseParameters);
    let (mut f, mut d) = innerloop(&base, &opt, options.clone())?;
    for _ in 0..2 {
        let l = mse(&f.forward(&x)?, &y)?;
        d.step(&mut f, &l)?;
    }
    assert_ne!(
        f.buffers()?[0].1.to_vec_f64()?,
        base.named_buffers()?[0].1.to_vec_f64()?
    );
    assert_eq!(buffers(&base), before);
    let bad = options.overrides(Overrides::new().set("lr", -0.1));
    assert!(matches!(
        innerloop(&base, &opt, bad),
        Err(Error::InvalidHyperparameter { .. })
    ));
    assert_eq!(buffers(&base), before);
    Ok(())
}
