//! Faithful or rejected, from the adversary's side: step bodies a PyTorch user would write
//! (shadowing, reassignment, in-place ops on clones, aliases of state entries, control
//! flow, helpers, `std::mem`, integer counters, ...). Each is written once and expanded
//! twice: with `#[differentiable_optimizer]`, and as a plain `OptimizerStep` impl of the
//! same tokens without the macro. The macro's ordinary optimizer must take the plain
//! code's steps bit for bit (the macro's rewrite changes nothing the user can see), and
//! `testing::check_optimizer` must pass (the twin takes the same steps and its
//! derivatives match finite differences). The rejected constructs are in `tests/ui`.

use candle_higher::testing::check_optimizer;
use candle_higher::{
    differentiable_optimizer, no_grad, Device, DifferentiableOptimizer, Operand, OptimizerStep,
    Result, Scalar, State, StateTensor, StateValue, Tensor,
};

/// One step body, two expansions: `$name` through the macro, `$plain` by hand (the same
/// tokens in an `impl OptimizerStep`), and `$plain::from(&$name)`.
macro_rules! case {
    ($name:ident / $plain:ident { $($field:ident : $ty:ty),* $(,)? } $($step:tt)*) => {
        #[differentiable_optimizer]
        pub(crate) struct $name {
            $(pub(crate) $field: $ty,)*
        }

        #[differentiable_optimizer]
        impl $name {
            $($step)*
        }

        pub(crate) struct $plain {
            $($field: $ty,)*
        }

        impl From<&$name> for $plain {
            fn from(o: &$name) -> Self {
                $plain { $($field: o.$field,)* }
            }
        }

        // The lints the macro allows on its expansion, for the same tokens.
        #[allow(clippy::clone_on_copy, clippy::useless_conversion)]
        impl OptimizerStep for $plain {
            $($step)*
        }
    };
}

/// Six steps of the macro's ordinary step and of the plain code on three parameters (the
/// last with an exactly zero gradient, as `check_optimizer` has), compared bit for bit:
/// parameters after every step, every state entry after the last.
fn same_as_plain(opt: &impl OptimizerStep, plain: &impl OptimizerStep) {
    let _guard = no_grad();
    let dev = Device::Cpu;
    let inits: [&[f64]; 3] = [
        &[0.5, -1.25, 2.0, 0.75],
        &[1.5, -0.5, 0.25, -2.0, 1.0, 0.125],
        &[0.3, -0.7, 1.1],
    ];
    for (i, init) in inits.iter().enumerate() {
        let p0 = Tensor::from_vec(init.to_vec(), &[init.len()], &dev).unwrap();
        let (mut a, mut b) = (p0.clone(), p0);
        let (mut sa, mut sb) = (State::new(), State::new());
        for step in 1..=6 {
            // A gradient that depends on the parameter: curvature 1.5, target 0.2.
            let g = |p: &Tensor| -> Tensor {
                if i == 2 {
                    p.zeros_like().unwrap()
                } else {
                    p.sub(0.2).unwrap().mul(1.5).unwrap()
                }
            };
            let (ga, gb) = (g(&a), g(&b));
            opt.step(&mut a, &ga, &mut sa).unwrap();
            plain.step(&mut b, &gb, &mut sb).unwrap();
            assert_eq!(
                bits(&a),
                bits(&b),
                "parameter {i}, step {step}: macro {:?}, plain {:?}",
                a.to_vec_f64().unwrap(),
                b.to_vec_f64().unwrap()
            );
        }
        let keys = |s: &State| s.entries().map(|(k, _)| k.to_string()).collect::<Vec<_>>();
        assert_eq!(keys(&sa), keys(&sb), "parameter {i}: state entries");
        for ((k, x), (_, y)) in sa.entries().zip(sb.entries()) {
            assert_eq!(
                state_bits(&x),
                state_bits(&y),
                "parameter {i}: state entry \"{k}\""
            );
        }
    }
}

fn bits(t: &Tensor) -> Vec<u64> {
    t.to_vec_f64()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn state_bits(v: &StateValue) -> Vec<u64> {
    match v {
        StateValue::Tensor(t) => bits(t),
        StateValue::Scalar(s) => vec![s.value().to_bits()],
        StateValue::Int(n) => vec![*n as u64],
    }
}

/// The macro's optimizer agrees with the plain code and passes `check_optimizer`.
fn faithful<O: DifferentiableOptimizer, P>(opt: O)
where
    for<'a> P: OptimizerStep + From<&'a O>,
{
    same_as_plain(&opt, &P::from(&opt));
    if let Err(e) = check_optimizer(opt) {
        panic!("{}: {e}", std::any::type_name::<O>());
    }
}

// ------------------------------------------------------------------ the parameter

case! {
    ShadowsTheParameter / PlainShadowsTheParameter { lr: f64, mix: f64 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let _ = state;
        let old = p.clone();
        p.sub_(&grad.mul(self.lr)?)?;
        let new = p.clone();
        let p = &mut *p;
        p.add_(&old.sub(&new)?.mul(self.mix)?)?;
        // A `let` that shadows the parameter binds a new tensor and leaves it alone.
        let p = p.mul(100.0)?;
        let _ = p;
        Ok(())
    }
}

#[test]
fn a_copy_of_the_parameter_keeps_its_old_value() {
    faithful::<_, PlainShadowsTheParameter>(ShadowsTheParameter { lr: 0.1, mix: 0.25 });
}

case! {
    ReassignsTheParameter / PlainReassignsTheParameter { lr: f64, weight_decay: f64 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        *p = p.sub(&grad.mul(self.lr)?)?;
        *p = (&*p * (1.0 - self.lr * self.weight_decay))?;
        let q: &mut Tensor = p;
        *q = (q.clone() - grad.mul(self.lr * 0.5)?)?;
        Ok(())
    }
}

#[test]
fn reassigning_the_parameter_through_deref_updates_it() {
    faithful::<_, PlainReassignsTheParameter>(ReassignsTheParameter {
        lr: 0.1,
        weight_decay: 0.01,
    });
}

case! {
    ChainsAndCopies / PlainChainsAndCopies { lr: f64, weight_decay: f64 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        p.mul_(1.0 - self.lr * self.weight_decay)?
            .sub_(&grad.mul(self.lr)?)?
            .clamp_(-self.lr * 20.0, 20.0)?;
        let new = p.sub(&grad.mul(self.lr)?)?;
        p.set_(&new)?;
        let keep = p.clone();
        p.zero_()?.add_(&keep)?.sub_scaled_(grad, self.lr)?;
        Ok(())
    }
}

#[test]
fn chained_in_place_ops_set_and_zero_on_the_parameter() {
    faithful::<_, PlainChainsAndCopies>(ChainsAndCopies {
        lr: 0.05,
        weight_decay: 0.01,
    });
}

case! {
    MemSwapReplace / PlainMemSwapReplace { lr: f64, mix: f64 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        let mut a = grad.clone();
        let mut b = p.mul(self.lr)?;
        std::mem::swap(&mut a, &mut b);
        let new = p.sub(&b.mul(self.lr)?)?.sub(&a.mul(0.1)?)?;
        let old = std::mem::replace(p, new);
        p.add_(&old.sub(&*p)?.mul(self.mix)?)?;
        Ok(())
    }
}

#[test]
fn mem_swap_and_replace_on_tensors() {
    faithful::<_, PlainMemSwapReplace>(MemSwapReplace { lr: 0.1, mix: 0.5 });
}

// ------------------------------------------------------------------ the gradient

case! {
    CopiesTheGradient / PlainCopiesTheGradient { lr: f64, scale: f64, weight_decay: f64 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        let mut g = grad.clone();
        g.mul_(self.scale)?;
        g.add_(&p.mul(self.weight_decay)?)?;
        p.sub_(&g.mul(self.lr)?)?;
        // The gradient itself is unchanged.
        p.sub_(&grad.mul(self.lr * 0.1)?)?;
        Ok(())
    }
}

#[test]
fn in_place_ops_on_a_copy_of_the_gradient() {
    faithful::<_, PlainCopiesTheGradient>(CopiesTheGradient {
        lr: 0.1,
        scale: 2.0,
        weight_decay: 0.01,
    });
}

case! {
    MaximizeFlag / PlainMaximizeFlag { lr: f64, maximize: bool }
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        let g = if self.maximize { grad.neg()? } else { grad.clone() };
        let g = (g * 2.0)?;
        let g = (&g + &*p)?;
        p.sub_(&g.mul(self.lr)?)?;
        Ok(())
    }
}

#[test]
fn a_gradient_chosen_by_a_flag_and_combined_by_operators() {
    faithful::<_, PlainMaximizeFlag>(MaximizeFlag {
        lr: 0.1,
        maximize: true,
    });
}

// ------------------------------------------------------------------ state entries

case! {
    RereadsAnEntry / PlainRereadsAnEntry { lr: f64, beta: f64 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let m = state.get_or_insert_with("m", || p.zeros_like())?;
        m.mul_(self.beta)?.add_(grad)?;
        // The entry exists: the initializer does not run and the handle is the entry.
        let again = state.get_or_insert_with("m", || p.ones_like())?;
        let seen = state.tensor("m")?;
        again.mul_(0.5)?;
        p.sub_(&m.add(&seen)?.mul(self.lr)?)?;
        Ok(())
    }
}

#[test]
fn an_entry_read_again_after_an_in_place_update() {
    faithful::<_, PlainRereadsAnEntry>(RereadsAnEntry { lr: 0.1, beta: 0.9 });
}

case! {
    InsertsAfterUpdating / PlainInsertsAfterUpdating { lr: f64 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let m = state.get_or_insert_with("m", || p.zeros_like())?;
        m.add_(grad)?;
        state.insert("m_copy", StateValue::Tensor(m.tensor()));
        m.mul_(0.5)?;
        // Replacing the entry detaches the handle: the last update is lost, as in torch.
        state.insert("m", StateValue::Tensor(m.mul(2.0)?));
        m.add_(1.0)?;
        p.sub_(&state.get("m")?.add(&state.get("m_copy")?)?.mul(self.lr)?)?;
        Ok(())
    }
}

#[test]
fn insert_after_an_update_replaces_the_entry() {
    faithful::<_, PlainInsertsAfterUpdating>(InsertsAfterUpdating { lr: 0.1 });
}

case! {
    TwoHandles / PlainTwoHandles { lr: f64, beta: f64 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let a = state.get_or_insert_with("m", || p.zeros_like())?;
        let b = state.get("m")?;
        a.mul_(self.beta)?;
        b.add_(grad)?;
        let c = Clone::clone(&a);
        c.mul_(0.5)?;
        if !state.contains("alias") {
            // One entry under two names, from now on and in later steps.
            state.set("alias", Clone::clone(&a));
        }
        state.get("alias")?.add_(0.125)?;
        p.sub_(&a.add(&b)?.mul(self.lr)?)?;
        Ok(())
    }
}

#[test]
fn two_handles_and_two_keys_for_one_entry() {
    faithful::<_, PlainTwoHandles>(TwoHandles { lr: 0.1, beta: 0.9 });
}

case! {
    ShadowsAnEntry / PlainShadowsAnEntry { lr: f64 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let m = state.get_or_insert_with("m", || p.zeros_like())?;
        m.add_(grad)?;
        // A new local: in-place ops on it leave the entry alone.
        let mut m = m.mul(0.5)?;
        m.add_(1.0)?;
        p.sub_(&m.mul(self.lr)?)?;
        // `set` with a handle names the same entry; with a copy it makes a new one.
        let v = state.get_or_insert_with("v", || p.zeros_like())?;
        state.set("v", Clone::clone(&v));
        v.add_(&grad.sqr()?)?;
        state.set("v_copy", v.clone());
        v.mul_(0.5)?;
        p.sub_(&state.get("v")?.add(&state.get("v_copy")?)?.mul(self.lr * 0.01)?)?;
        Ok(())
    }
}

#[test]
fn a_shadowed_entry_and_set_with_a_handle_or_a_copy() {
    faithful::<_, PlainShadowsAnEntry>(ShadowsAnEntry { lr: 0.1 });
}

case! {
    LoopsOverEntries / PlainLoopsOverEntries { lr: f64, beta1: f64, beta2: f64 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        for (key, beta) in [("m", self.beta1), ("v", self.beta2)] {
            let entry = state.get_or_insert_with(key, || p.zeros_like())?;
            entry.mul_(beta)?.add_(grad)?;
        }
        let mut total = p.zeros_like()?;
        for key in ["m", "v"] {
            total.add_(&state.get(key)?)?;
        }
        p.sub_(&total.mul(self.lr)?)?;
        Ok(())
    }
}

#[test]
fn a_for_loop_over_several_entries() {
    faithful::<_, PlainLoopsOverEntries>(LoopsOverEntries {
        lr: 0.05,
        beta1: 0.9,
        beta2: 0.5,
    });
}

case! {
    InitFromHyperparameter / PlainInitFromHyperparameter { lr: f64, init: f64 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let acc = state.get_or_insert_with("acc", || p.ones_like()?.mul(self.init))?;
        acc.add_(&grad.sqr()?)?;
        p.sub_(&grad.div(&acc.sqrt()?)?.mul(self.lr)?)?;
        Ok(())
    }
}

#[test]
fn an_entry_initialized_from_a_hyperparameter() {
    faithful::<_, PlainInitFromHyperparameter>(InitFromHyperparameter { lr: 0.1, init: 0.5 });
}

case! {
    ReadsTheUpdatedParameter / PlainReadsTheUpdatedParameter { lr: f64 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let first = state.get_or_insert_with("first", || Ok(p.clone()))?;
        p.sub_(&grad.mul(self.lr)?)?;
        state.set("last", p.clone());
        let drift = p.sub(&first)?;
        p.sub_(&drift.mul(self.lr * 0.1)?)?;
        Ok(())
    }
}

#[test]
fn the_parameter_read_after_its_update() {
    faithful::<_, PlainReadsTheUpdatedParameter>(ReadsTheUpdatedParameter { lr: 0.1 });
}

case! {
    Lookahead / PlainLookahead { lr: f64, alpha: f64, k: u32 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let step = state.increment("step");
        let slow = state.get_or_insert_with("slow", || Ok(p.clone()))?;
        p.sub_(&grad.mul(self.lr)?)?;
        if step % i64::from(self.k) == 0 {
            slow.lerp_(p, self.alpha)?;
            p.set_(&slow)?;
        }
        Ok(())
    }
}

#[test]
fn lookahead_with_lerp_and_set_on_a_counter() {
    faithful::<_, PlainLookahead>(Lookahead {
        lr: 0.1,
        alpha: 0.5,
        k: 2,
    });
}

case! {
    TemporaryHandles / PlainTemporaryHandles { lr: f64, beta: f64 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        state.get_or_insert_with("m", || p.zeros_like())?;
        state.get("m")?.mul_(self.beta)?.add_(grad)?;
        let m = match state.value("m") {
            Some(StateValue::Tensor(t)) => t,
            _ => grad.clone(),
        };
        p.sub_(&m.mul(self.lr)?)?;
        Ok(())
    }
}

#[test]
fn temporary_handles_and_state_values() {
    faithful::<_, PlainTemporaryHandles>(TemporaryHandles { lr: 0.1, beta: 0.9 });
}

// ------------------------------------------------------------------ control flow

case! {
    MatchesTheCounter / PlainMatchesTheCounter { lr: f64, mode: u8 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let step = state.increment("step");
        match (step % 3, self.mode) {
            (0, _) => {
                p.sub_(&grad.mul(self.lr)?)?;
            }
            (1, 0) => {
                p.sub_(&grad.sign()?.mul(self.lr)?)?;
            }
            (1, _) => return Ok(()),
            _ => {
                let n = state.int("skipped").unwrap_or(0);
                state.set_int("skipped", n + step);
            }
        }
        Ok(())
    }
}

#[test]
fn match_on_the_step_counter_and_a_flag() {
    faithful::<_, PlainMatchesTheCounter>(MatchesTheCounter { lr: 0.1, mode: 0 });
    faithful::<_, PlainMatchesTheCounter>(MatchesTheCounter { lr: 0.1, mode: 1 });
}

case! {
    InnerLoop / PlainInnerLoop { lr: f64, inner: u32 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        for _ in 0..self.inner {
            p.sub_(&grad.mul(self.lr / f64::from(self.inner))?)?;
        }
        let mut left = self.inner;
        while left > 0 {
            left -= 1;
            if left.is_multiple_of(2) {
                continue;
            }
            p.mul_(0.99)?;
        }
        let scaled = 'pick: {
            if self.inner > 2 {
                break 'pick grad.mul(self.lr * 0.01)?;
            }
            grad.mul(self.lr * 0.02)?
        };
        p.sub_(&scaled)?;
        Ok(())
    }
}

#[test]
fn loops_bounded_by_an_integer_flag_and_a_labeled_block() {
    faithful::<_, PlainInnerLoop>(InnerLoop { lr: 0.1, inner: 3 });
}

case! {
    EarlyReturns / PlainEarlyReturns { lr: f64, beta: f64 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let m = state.get_or_insert_with("m", || p.zeros_like())?;
        m.mul_(self.beta)?.add_(grad)?;
        if state.int("step").is_none() {
            state.set_int("step", 1);
            p.sub_(&grad.mul(self.lr)?)?;
            return Ok(());
        }
        if let Ok(v) = state.get("v") {
            v.add_(&grad.sqr()?)?;
        } else {
            state.set("v", grad.sqr()?);
        }
        let v = state.get("v")?;
        p.sub_(&m.div(&v.sqrt()?.add(1.0)?)?.mul(self.lr)?)?;
        Ok(())
    }
}

#[test]
fn early_returns_and_question_marks_inside_branches() {
    faithful::<_, PlainEarlyReturns>(EarlyReturns { lr: 0.1, beta: 0.9 });
}

case! {
    BranchesOnHyperparameters / PlainBranchesOnHyperparameters {
        lr: f64,
        min_lr: f64,
        warmup: u32,
        bound: f64,
    }
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let step = state.increment("step");
        let lr = if step <= i64::from(self.warmup) {
            self.lr * 0.1
        } else {
            self.lr
        };
        let lr = lr.max(self.min_lr).min(1.0);
        let decay = 1.0 - lr.clone() * 0.01;
        p.mul_(decay.clone())?;
        p.mul_(decay)?;
        if self.lr > self.min_lr && 0.0 < self.bound {
            p.sub_(&grad.mul(-(-lr))?)?;
        }
        p.clamp_(-self.bound, self.bound)?;
        Ok(())
    }
}

#[test]
fn branches_on_hyperparameters_and_scalar_methods() {
    faithful::<_, PlainBranchesOnHyperparameters>(BranchesOnHyperparameters {
        lr: 0.1,
        min_lr: 0.02,
        warmup: 2,
        bound: 1.5,
    });
}

case! {
    BlockExpressions / PlainBlockExpressions { lr: f64, weight_decay: f64 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        let update = {
            let a = grad.mul(self.lr)?;
            let b = p.mul(self.lr * self.weight_decay)?;
            a.add(&b)?
        };
        p.sub_(&update)?;
        Ok(())
    }
}

#[test]
fn an_update_computed_in_a_block() {
    faithful::<_, PlainBlockExpressions>(BlockExpressions {
        lr: 0.1,
        weight_decay: 0.01,
    });
}

// ------------------------------------------------------------------ helpers

fn apply_update(p: &mut Tensor, d: &Tensor, lr: impl Into<Operand>) -> Result<()> {
    p.sub_(&d.mul(lr)?)?;
    Ok(())
}

fn decayed(g: &Tensor, p: &Tensor, wd: impl Into<Operand>) -> Result<Tensor> {
    g.add(&p.mul(wd)?)
}

fn accumulate(m: &StateTensor, g: &Tensor, beta: impl Into<Operand>) -> Result<()> {
    m.mul_(beta)?.add_(g)?;
    Ok(())
}

fn scalar_step_size(lr: impl Into<Scalar>, step: i64) -> Scalar {
    lr.into() / (step as f64).sqrt()
}

case! {
    Helpers / PlainHelpers { lr: f64, weight_decay: f64, beta: f64 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let step = state.increment("step");
        let g = decayed(grad, p, self.weight_decay)?;
        let m = state.get_or_insert_with("m", || p.zeros_like())?;
        accumulate(&m, &g, self.beta)?;
        let lr = scalar_step_size(self.lr, step);
        apply_update(p, &m, lr)?;
        Ok(())
    }
}

#[test]
fn helpers_called_with_mut_tensors_handles_and_scalars() {
    faithful::<_, PlainHelpers>(Helpers {
        lr: 0.1,
        weight_decay: 0.01,
        beta: 0.9,
    });
}

// ------------------------------------------------------------------ counters and scalars

case! {
    Counters / PlainCounters { lr: f64, beta: f64, decay: f64 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let step = state.increment("step");
        let n = state.int("n").unwrap_or(0);
        state.set_int("n", n + step);
        let bias_correction = 1.0 - self.beta.powi(i32::try_from(step).unwrap_or(i32::MAX));
        let t = step as f64;
        let root = self.beta.powf(t);
        let eta = state.scalar_or_insert_with("eta", || Scalar::from(self.lr))?;
        p.sub_(&grad.mul(eta.clone() * bias_correction * (2.0 - root))?)?;
        state.set_scalar("eta", eta * self.decay);
        Ok(())
    }
}

#[test]
fn integer_counters_and_scalar_entries() {
    faithful::<_, PlainCounters>(Counters {
        lr: 0.1,
        beta: 0.9,
        decay: 0.95,
    });
}

case! {
    FusedUpdates / PlainFusedUpdates { lr: f64, beta: f64, eps: f64 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let m = state.get_or_insert_with("m", || p.zeros_like())?;
        let v = state.get_or_insert_with("v", || p.zeros_like())?;
        m.lerp_(grad, 1.0 - self.beta)?;
        v.mul_(self.beta)?.addcmul_(grad, grad, 1.0 - self.beta)?;
        let denom = v.sqrt()?.add(self.eps)?;
        p.addcdiv_(&m, &denom, -self.lr)?;
        p.addcmul_(&m, grad, -self.lr * 0.01)?;
        p.maximum_(-2.0)?;
        Ok(())
    }
}

#[test]
fn lerp_addcmul_addcdiv_and_maximum_with_scalars() {
    faithful::<_, PlainFusedUpdates>(FusedUpdates {
        lr: 0.05,
        beta: 0.9,
        eps: 1e-8,
    });
}

// ------------------------------------------------------------------ the macro's rewrite

case! {
    TakesTheState / PlainTakesTheState { lr: f64 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        // Moving the state out and back keeps its entries (and the handles to them).
        let mut st = std::mem::take(state);
        let m = st.get_or_insert_with("m", || p.zeros_like())?;
        *state = st;
        m.add_(grad)?;
        p.sub_(&state.get("m")?.mul(self.lr)?)?;
        Ok(())
    }
}

#[test]
fn the_state_moved_out_and_back_keeps_its_entries() {
    faithful::<_, PlainTakesTheState>(TakesTheState { lr: 0.1 });
}

case! {
    PassesTheState / PlainPassesTheState { lr: f64 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        fn count(st: &mut State) -> i64 {
            st.increment("step")
        }
        let st = state;
        let step = count(st);
        let mut entries = 0;
        let it = st.entries();
        for (_key, _value) in it {
            entries += 1;
        }
        p.sub_(&grad.mul(self.lr * f64::from(entries) / (step as f64))?)?;
        Ok(())
    }
}

#[test]
fn the_state_moved_to_a_local_and_its_iterator() {
    faithful::<_, PlainPassesTheState>(PassesTheState { lr: 0.1 });
}

case! {
    MatchesAResult / PlainMatchesAResult { lr: f64, beta: f64 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let buf = state.get("momentum_buffer");
        match buf {
            Ok(b) => {
                b.mul_(self.beta)?.add_(grad)?;
            }
            Err(_) => state.set("momentum_buffer", grad.clone()),
        }
        let maybe = state.get("momentum_buffer").ok();
        if let Some(b) = maybe {
            p.sub_(&b.mul(self.lr)?)?;
        }
        Ok(())
    }
}

#[test]
fn a_state_lookup_kept_as_a_result() {
    faithful::<_, PlainMatchesAResult>(MatchesAResult { lr: 0.1, beta: 0.9 });
}

case! {
    OptionalTarget / PlainOptionalTarget { lr: f64, flag: bool }
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        let target: Option<&mut Tensor> = if self.flag { Some(p) } else { None };
        if let Some(t) = target {
            t.sub_(&grad.mul(self.lr)?)?;
        }
        Ok(())
    }
}

#[test]
fn an_update_through_an_optional_mut_reference() {
    faithful::<_, PlainOptionalTarget>(OptionalTarget {
        lr: 0.1,
        flag: true,
    });
}

case! {
    HyperparametersInVec / PlainHyperparametersInVec { lr: f64, weight_decay: f64 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        let mut rates = vec![self.lr, self.lr * 0.5];
        rates.push(self.lr * 0.25);
        let mut terms = vec![grad.clone(), p.mul(self.weight_decay)?];
        terms.push(p.zeros_like()?);
        for (rate, term) in rates.iter().zip(&terms) {
            p.sub_(&term.mul(rate.clone())?)?;
        }
        let (lr, wd) = (self.lr, self.weight_decay);
        p.mul_(1.0 - lr * wd)?;
        let halves = [self.lr, self.lr * 0.5];
        for lr in halves {
            p.sub_(&grad.mul(lr)?)?;
        }
        Ok(())
    }
}

#[test]
fn hyperparameters_in_vec_tuples_and_arrays() {
    faithful::<_, PlainHyperparametersInVec>(HyperparametersInVec {
        lr: 0.05,
        weight_decay: 0.01,
    });
}

case! {
    ReferencesToHyperparameters / PlainReferencesToHyperparameters {
        lr: f64,
        weight_decay: f64,
        init: f64,
    }
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let Self {
            lr, weight_decay, ..
        } = self;
        p.mul_(1.0 - *lr * *weight_decay)?;
        let rate = &self.lr;
        p.sub_(&grad.mul(*rate)?)?;
        let eta = state.scalar_or_insert_with("eta", || self.init.into())?;
        p.sub_(&grad.mul(eta.clone())?)?;
        state.set_scalar("eta", eta * 0.5);
        Ok(())
    }
}

#[test]
fn hyperparameters_destructured_borrowed_and_converted() {
    faithful::<_, PlainReferencesToHyperparameters>(ReferencesToHyperparameters {
        lr: 0.1,
        weight_decay: 0.01,
        init: 0.05,
    });
}

case! {
    ShadowsTheGradient / PlainShadowsTheGradient { lr: f64, weight_decay: f64, maximize: bool }
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        // torch's `grad = grad.add(p, alpha=weight_decay)`, then in place on the new tensor.
        let mut grad = grad.clone();
        grad.add_(&p.mul(self.weight_decay)?)?;
        if self.maximize {
            grad = grad.neg()?;
        }
        p.sub_(&grad.mul(self.lr)?)?;
        Ok(())
    }
}

#[test]
fn a_local_that_shadows_the_gradient_is_a_new_tensor() {
    faithful::<_, PlainShadowsTheGradient>(ShadowsTheGradient {
        lr: 0.1,
        weight_decay: 0.01,
        maximize: true,
    });
}

// ------------------------------------------------------------------ hyperparameters as values

case! {
    FloatsChosenByHyperparameters / PlainFloatsChosenByHyperparameters {
        lr: f64,
        betas: (f64, f64),
        flag: bool,
    }
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        // Plain `f64`s in both forms: a hyperparameter only decides which.
        let sign: f64 = if self.lr > 0.0 { 1.0 } else { -1.0 };
        let scale = if self.flag { 0.5 } else { 2.0 };
        let betas = self.betas;
        let mix = betas.0 * scale + betas.1 * sign;
        p.sub_(&grad.mul(self.lr)?.mul(mix)?)?;
        // A slice's `to_vec` is not a graph exit.
        let dims = p.dims().to_vec();
        assert_eq!(dims.len(), p.rank(), "{:?}", self.lr);
        Ok(())
    }
}

#[test]
fn floats_chosen_by_a_hyperparameter_stay_floats() {
    faithful::<_, PlainFloatsChosenByHyperparameters>(FloatsChosenByHyperparameters {
        lr: 0.1,
        betas: (0.9, 0.5),
        flag: true,
    });
}

// ------------------------------------------------------------------ torch-style updates

case! {
    AmsgradAndMasks / PlainAmsgradAndMasks { lr: f64, beta: f64, eta_plus: f64, amsgrad: bool }
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let v = state.get_or_insert_with("v", || p.zeros_like())?;
        v.mul_(self.beta)?.addcmul_(grad, grad, 1.0 - self.beta)?;
        // An entry initialized from another one (the closure reads the handle).
        let first_v = state.get_or_insert_with("first_v", || v.sqrt())?;
        let v_hat = if self.amsgrad {
            let max_v = state.get_or_insert_with("max_v", || p.zeros_like())?;
            max_v.maximum_(&v)?;
            max_v.tensor()
        } else {
            v.tensor()
        };
        let prev = state.get_or_insert_with("prev", || Ok(grad.clone()))?;
        let agree = prev.mul(grad)?.gt(0.0)?;
        let step = agree.where_cond(&grad.mul(self.eta_plus)?, grad)?;
        prev.set_(grad)?;
        p.sub_(&step.div(&v_hat.sqrt()?.add(&first_v)?.add(1e-8)?)?.mul(self.lr)?)?;
        Ok(())
    }
}

#[test]
fn amsgrad_branch_and_sign_masks() {
    for amsgrad in [true, false] {
        faithful::<_, PlainAmsgradAndMasks>(AmsgradAndMasks {
            lr: 0.05,
            beta: 0.9,
            eta_plus: 1.2,
            amsgrad,
        });
    }
}

case! {
    LoopsOverHyperparameters / PlainLoopsOverHyperparameters {
        lr: f64,
        weight_decay: f64,
        betas: (f64, f64),
    }
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        // A loop variable holding a hyperparameter is used twice (`f64` is `Copy`).
        for lr in [self.lr, self.lr * 0.5] {
            p.sub_(&grad.mul(lr)?)?;
            p.mul_(1.0 - lr * self.weight_decay)?;
        }
        let mut rates = vec![self.lr; 2];
        rates.push(self.lr * 0.25);
        for lr in &rates {
            p.sub_(&grad.mul(*lr)?.mul(*lr * 10.0)?)?;
        }
        match self.betas {
            (b1, b2) if b1 > b2 => {
                p.mul_(b1 / b2)?;
                p.mul_(b2 / b1)?;
            }
            _ => {}
        }
        if let Some(beta) = Some(self.betas.0) {
            p.sub_(&grad.mul(self.lr * (1.0 - beta))?.mul(beta)?)?;
        }
        let mut terms = vec![grad.mul(self.lr)?, p.mul(self.weight_decay)?];
        for t in terms.iter_mut() {
            t.mul_(0.5)?;
            *t = t.clone();
        }
        for t in &terms {
            p.sub_(t)?;
        }
        Ok(())
    }
}

#[test]
fn hyperparameters_bound_by_for_match_and_if_let() {
    faithful::<_, PlainLoopsOverHyperparameters>(LoopsOverHyperparameters {
        lr: 0.05,
        weight_decay: 0.01,
        betas: (0.9, 0.5),
    });
}

// ------------------------------------------------------------------ methods and Scalar's API

/// A user's own method on `Tensor` that takes `&mut self` (named without torch's trailing
/// underscore, which the macro keeps for its supported in-place methods).
trait DecayInPlace {
    fn decay_by(&mut self, factor: impl Into<Operand>) -> Result<&mut Self>;
}

impl DecayInPlace for Tensor {
    fn decay_by(&mut self, factor: impl Into<Operand>) -> Result<&mut Self> {
        *self = self.mul(factor)?;
        Ok(self)
    }
}

#[differentiable_optimizer]
pub(crate) struct MethodsAndShadowedState {
    pub(crate) lr: f64,
    pub(crate) weight_decay: f64,
    pub(crate) beta: f64,
}

#[differentiable_optimizer]
impl MethodsAndShadowedState {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        p.decay_by(1.0 - self.lr * self.weight_decay)?;
        let state = &mut *state;
        let m = state.get_or_insert_with("m", || p.zeros_like())?;
        let moved = m;
        moved.mul_(self.beta)?.add_(grad)?;
        // `m` was moved: the macro clones handles, so it is still the entry.
        m.mul_(0.5)?;
        let view: &Tensor = &m;
        p.sub_(&view.mul(self.lr)?)?;
        Ok(())
    }
}

#[test]
fn a_users_mut_method_a_shadowed_state_and_a_moved_handle() {
    let opt = MethodsAndShadowedState {
        lr: 0.1,
        weight_decay: 0.01,
        beta: 0.9,
    };
    // Plain Rust would not compile (`m` is used after the move): the entry saw both
    // updates, as in Python, where `moved = m` is another name for it.
    let mut p = Tensor::from_vec(vec![1.0f64, 2.0], &[2], &Device::Cpu).unwrap();
    let g = Tensor::from_vec(vec![0.5f64, -1.0], &[2], &Device::Cpu).unwrap();
    let mut state = State::new();
    opt.step(&mut p, &g, &mut state).unwrap();
    let m = state.tensor("m").unwrap().to_vec_f64().unwrap();
    assert_eq!(m, [0.25, -0.5]);
    check_optimizer(opt).unwrap_or_else(|e| panic!("{e}"));
}

case! {
    ScalarMethods / PlainScalarMethods { lr: f64, beta: f64, floor: f64 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let step = state.increment("step");
        let n = i32::try_from(step).unwrap_or(i32::MAX);
        let decay = (-self.beta).exp() * self.beta.ln().abs() + self.beta.tanh();
        let warm = (1.0 - self.beta.powi(n)).sqrt().recip();
        let lr = (self.lr * decay * warm).max(self.floor).min(self.lr * 10.0);
        let lr = lr.clamp(self.floor, 1.0) / 2.0;
        p.sub_(&grad.mul(lr)?)?;
        Ok(())
    }
}

#[test]
fn scalar_methods_match_f64_and_differentiate() {
    faithful::<_, PlainScalarMethods>(ScalarMethods {
        lr: 0.1,
        beta: 0.9,
        floor: 0.001,
    });
}

case! {
    FlagConversions / PlainFlagConversions { lr: f64, n: u32 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        // An integer flag converted with `f64::from` is a plain `f64` in both forms, so the
        // `f64`-only APIs take it.
        let cap = 0.5_f64.min(f64::from(self.n) * 0.1);
        let scaled = grad.affine(f64::from(self.n), 0.0)?;
        let base = Tensor::full_scalar(f64::from(self.n) + 1.0, p.dtype(), p.device())?;
        let shift: f64 = f64::from(self.n) / 10.0;
        p.sub_(&scaled.div(&base)?.mul(self.lr * cap)?.add(shift * 0.0)?)?;
        Ok(())
    }
}

#[test]
fn integer_flags_converted_to_floats() {
    faithful::<_, PlainFlagConversions>(FlagConversions { lr: 0.1, n: 3 });
}

case! {
    WideFlagCasts / PlainWideFlagCasts { lr: f64, steps: u64, window: usize, offset: i64 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        // Flags wider than 32 bits, which `f64::from` does not take, cast with `as` in both
        // forms, also inside arithmetic, a `let` typed `f64` and an `f64`-only API.
        let steps: f64 = self.steps as f64;
        let window = (self.window as f64).max(1.0);
        let offset = self.offset as f32;
        let scaled = grad.affine(1.0 / window, f64::from(offset) * 0.0)?;
        p.sub_(&scaled.mul(self.lr / steps)?)?;
        Ok(())
    }
}

#[test]
fn wide_integer_flags_cast_with_as() {
    faithful::<_, PlainWideFlagCasts>(WideFlagCasts {
        lr: 0.1,
        steps: 1 << 40,
        window: 7,
        offset: -3,
    });
}

case! {
    PoweredRate / PlainPoweredRate { lr: f64, gamma: f64, base: f64 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        // A hyperparameter raised to a hyperparameter, and a constant base raised to one
        // (written from the hyperparameter's side), in both forms.
        let step = state.increment("step");
        let lr = self.lr.powf(self.gamma) * self.base.powf(self.gamma * (step as f64));
        p.sub_(&grad.mul(lr)?)?;
        Ok(())
    }
}

/// The twin with tensor hyperparameters takes the ordinary optimizer's steps to the bit on
/// the CPU: `Scalar::powf` with a tensor exponent has `f64::powf`'s value, not
/// `exp(e ln x)`'s.
#[test]
fn a_hyperparameter_exponent_is_faithful_to_the_bit() {
    // Values whose `exp(e ln x)` is off `f64::powf` in the last bit (0.1^1.7, 0.9^6.8).
    let opt = PoweredRate {
        lr: 0.1,
        gamma: 1.7,
        base: 0.9,
    };
    same_as_plain(&opt, &PlainPoweredRate::from(&opt));
    let report = check_optimizer(opt).unwrap_or_else(|e| panic!("{e}"));
    // With candle's kernels (the path other devices take) a tensor power is
    // `exp(e ln x)`, within rounding; `check_optimizer` passing bounds it by 1e-12.
    if candle_higher::cpu_fast_paths() {
        assert_eq!(report.tensor_path_difference, 0.0, "{report}");
    }
    let names: Vec<&str> = report
        .hypergradients
        .iter()
        .map(|h| h.name.as_str())
        .collect();
    assert_eq!(names, ["lr", "gamma", "base", "initial parameters"]);
}

// ------------------------------------------------------------------ hyperparameters beside tensors

case! {
    HyperparameterOnTheLeft / PlainHyperparameterOnTheLeft {
        lr: f64, weight_decay: f64, shift: f64, scale: f64
    }
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        // A hyperparameter on the left of a tensor is a `Result<Tensor>` in both forms, as
        // `f64 * &Tensor` is; `+ - * /`, a negated one, an owned tensor, a product of floats.
        let decay = (-self.weight_decay * &*p)?;
        let mut lr = self.lr;
        lr *= 0.5;
        let damped = (self.scale / (grad.sqr()? + 1.0)?)?;
        let shifted = (self.shift - grad)?;
        let offset = (self.shift + grad.sign()?)?;
        p.add_(&decay)?;
        p.sub_(&(lr * grad)?)?;
        p.sub_(&damped.mul(&shifted)?.mul(0.01)?)?;
        p.add_(&(2.0 * self.lr * offset)?.mul(0.001)?)?;
        Ok(())
    }
}

#[test]
fn a_hyperparameter_on_the_left_of_a_tensor() {
    faithful::<_, PlainHyperparameterOnTheLeft>(HyperparameterOnTheLeft {
        lr: 0.1,
        weight_decay: 0.01,
        shift: 0.3,
        scale: 0.7,
    });
}

/// The twin keeps a tensor learning rate written on the left on the tape:
/// p1 = p0 - wd p0 - (lr / 2) g - 0.01 scale (shift - g) / (g^2 + 1) + 0.002 lr (shift + sign g),
/// so d sum(p1) / d lr = -sum(g) / 2 + 0.002 sum(shift + sign g).
#[test]
fn a_tensor_learning_rate_on_the_left_gets_its_gradient() -> Result<()> {
    use candle_higher::{grad, GradOptions, Hyperparameters};
    let opt = HyperparameterOnTheLeft {
        lr: 0.1,
        weight_decay: 0.01,
        shift: 0.3,
        scale: 0.7,
    };
    let lr = Tensor::scalar(0.1f64).to_leaf();
    let mut twin = opt.twin();
    twin.lr = Scalar::Tensor(lr.clone());
    let dev = Device::Cpu;
    let g = Tensor::from_vec(vec![0.5f64, -1.5, 0.0], &[3], &dev)?;
    let mut p = Tensor::from_vec(vec![1.0f64, 2.0, -3.0], &[3], &dev)?;
    let mut plain = p.clone();
    twin.step(&mut p, &g, &mut State::new())?;
    {
        let _guard = no_grad();
        opt.step(&mut plain, &g, &mut State::new())?;
    }
    assert_eq!(bits(&p), bits(&plain));
    let d = grad(&[p.sum_all()?], &[lr], GradOptions::default())?;
    let d = d[0]
        .as_ref()
        .expect("lr reaches the update")
        .to_scalar_f64()?;
    let expected = -(0.5 - 1.5 + 0.0) / 2.0 + 0.002 * ((0.3 + 1.0) + (0.3 - 1.0) + 0.3);
    assert!((d - expected).abs() < 1e-15, "{d} != {expected}");
    Ok(())
}

thread_local! {
    static PRINTED: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn record(text: String) {
    PRINTED.with(|p| p.borrow_mut().push(text));
}

fn take_printed() -> Vec<String> {
    PRINTED.with(|p| std::mem::take(&mut *p.borrow_mut()))
}

case! {
    PrintsHyperparameters / PlainPrintsHyperparameters { lr: f64, betas: (f64, f64), n: u32 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        // Printing reads a hyperparameter's value; it is not a branch on it, and the text
        // is the same in both forms.
        let lr = self.lr * 0.5;
        record(format!(
            "{} {:.3} {:>12.2e} {:E} {lr} {}",
            self.lr, self.betas.0, self.lr, self.betas.1, self.n
        ));
        record(format!("{:?} {:?} {lr:?}", self.lr, self.betas));
        record(self.lr.to_string());
        p.sub_(&grad.mul(lr)?)?;
        Ok(())
    }
}

#[test]
fn hyperparameters_print_the_same_in_both_forms() -> Result<()> {
    use candle_higher::Hyperparameters;
    let opt = PrintsHyperparameters {
        lr: 0.1,
        betas: (0.9, 0.999),
        n: 3,
    };
    let dev = Device::Cpu;
    let g = Tensor::from_vec(vec![0.5f64, -1.5], &[2], &dev)?;
    let p0 = Tensor::from_vec(vec![1.0f64, 2.0], &[2], &dev)?;
    let printed = |step: &dyn Fn(&mut Tensor) -> Result<()>| -> Result<Vec<String>> {
        take_printed();
        step(&mut p0.clone())?;
        Ok(take_printed())
    };
    let ordinary = printed(&|p| opt.step(p, &g, &mut State::new()))?;
    assert_eq!(
        ordinary,
        [
            "0.1 0.900      1.00e-1 9.99E-1 0.05 3",
            "0.1 (0.9, 0.999) 0.05",
            "0.1"
        ]
    );
    let twin = opt.twin();
    assert_eq!(printed(&|p| twin.step(p, &g, &mut State::new()))?, ordinary);
    // Tensors print their values; `Debug` shows that they are tensors.
    let mut tensors = opt.twin();
    tensors.lr = Scalar::Tensor(Tensor::scalar(0.1f64).to_leaf());
    tensors.betas.0 = Scalar::Tensor(Tensor::scalar(0.9f64));
    let text = printed(&|p| tensors.step(p, &g, &mut State::new()))?;
    assert_eq!((&text[0], &text[2]), (&ordinary[0], &ordinary[2]));
    assert!(text[1].starts_with("Tensor("), "{}", text[1]);
    faithful::<_, PlainPrintsHyperparameters>(opt);
    Ok(())
}

case! {
    ValidatedWithArithmetic / PlainValidatedWithArithmetic { lr: f64, warmup: f64, steps: u32 }
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        p.sub_(&(self.lr * grad)?)?;
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        // Arithmetic on hyperparameters and `f64::from` of a flag, as in the step.
        if self.lr * self.warmup > 1.0 || f64::from(self.steps) * self.lr > 10.0 {
            return Err(candle_higher::Error::InvalidArgument {
                op: "ValidatedWithArithmetic",
                message: format!("lr {} too large for warmup {}", self.lr, self.warmup),
            });
        }
        Ok(())
    }
}

#[test]
fn validate_computes_with_hyperparameters_in_both_forms() {
    use candle_higher::Hyperparameters;
    for (lr, warmup, steps) in [(0.1, 2.0, 5), (0.6, 2.0, 5), (0.1, 2.0, 500)] {
        let opt = ValidatedWithArithmetic { lr, warmup, steps };
        let ordinary = opt.validate().map_err(|e| e.to_string());
        let twin = opt.twin().validate().map_err(|e| e.to_string());
        let mut tensors = opt.twin();
        tensors.lr = Scalar::Tensor(Tensor::scalar(lr).to_leaf());
        let tensors = tensors.validate().map_err(|e| e.to_string());
        assert_eq!(ordinary, twin, "lr {lr}, warmup {warmup}, steps {steps}");
        assert_eq!(ordinary, tensors, "lr {lr}, warmup {warmup}, steps {steps}");
    }
    faithful::<_, PlainValidatedWithArithmetic>(ValidatedWithArithmetic {
        lr: 0.1,
        warmup: 2.0,
        steps: 5,
    });
}
