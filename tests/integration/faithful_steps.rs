//! Faithful or rejected: optimizers written with `#[differentiable_optimizer]` in every
//! way a state entry can be reached (tuples, `if let`, `let .. else`, reborrows, loops
//! with `continue`/`break`, moves to another name, helper functions, reads and `set`
//! after an in-place update, torch's `if not in state` idiom, a `match` that creates the
//! entry in every arm). Each is compared with the same algorithm written by hand on plain
//! f64s with torch's semantics (state tensors mutate in place and are shared by every
//! name bound to them), for the ordinary optimizer and for its twin, step by step.
//! Then `testing::check_optimizer` on the nine built-ins and on these, and on a step that
//! reads a float out of a hyperparameter in a helper the macro cannot see.

use std::collections::BTreeMap;

use candle_higher::optim::{
    Adadelta, Adagrad, Adam, AdamW, Adamax, Asgd, DiffOptimizer, Optimizer, Overrides, RmsProp,
    Rprop, Sgd,
};
use candle_higher::testing::{check_optimizer, CheckFailure};
use candle_higher::{
    differentiable_optimizer, DifferentiableOptimizer, Error, Result, Scalar, State, StateTensor,
    StepOptions, Tensor,
};

/// Torch semantics by hand: parameters and state entries as f64 vectors.
type Reference = fn(&mut [f64], &[f64], &mut BTreeMap<&'static str, Vec<f64>>);

const P0: [f64; 3] = [1.0, -2.0, 0.5];
const GRADS: [[f64; 3]; 4] = [
    [0.5, -1.0, 0.0],
    [0.25, 2.0, 0.0],
    [-1.5, 0.5, 1.0],
    [0.0, 0.0, 0.0],
];

fn t(v: &[f64]) -> Tensor {
    Tensor::from_vec(v.to_vec(), &[v.len()], &crate::common::device()).unwrap()
}

fn close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert!(
            (x - y).abs() <= 1e-14 * (1.0 + y.abs()),
            "{what}: {a:?} vs reference {b:?}"
        );
    }
}

/// Runs the ordinary optimizer, the twin with floats and the twin with `lr` as a tensor
/// against the reference; compares parameters after every step and tensor state entries
/// after the last.
fn agrees_with_reference<O: DifferentiableOptimizer>(opt: O, lr: f64, reference: Reference) {
    let name = std::any::type_name::<O>();
    let mut expected = P0.to_vec();
    let mut ref_state = BTreeMap::new();
    let mut ordinary = Optimizer::new(opt.clone(), 1).unwrap();
    let mut params = vec![t(&P0).to_leaf()];
    let mut twin = DiffOptimizer::new(opt.clone(), &params).unwrap();
    let mut twin_params = params.clone();
    let mut tensor_twin = DiffOptimizer::new(opt, &params).unwrap();
    let lr_leaf = Tensor::scalar(lr).to_leaf();
    tensor_twin
        .set_overrides(&Overrides::new().set("lr", lr_leaf))
        .unwrap();
    let mut tensor_params = params.clone();
    for (k, g) in GRADS.iter().enumerate() {
        reference(&mut expected, g, &mut ref_state);
        ordinary.step_grads(&mut params, &[Some(t(g))]).unwrap();
        twin_params = twin
            .step_grads(&twin_params, vec![Some(t(g))], StepOptions::new())
            .unwrap();
        tensor_params = tensor_twin
            .step_grads(&tensor_params, vec![Some(t(g))], StepOptions::new())
            .unwrap();
        for (what, p) in [
            ("ordinary", &params[0]),
            ("twin", &twin_params[0]),
            ("twin with a tensor lr", &tensor_params[0]),
        ] {
            close(
                &p.to_vec_f64().unwrap(),
                &expected,
                &format!("{name}, {what}, step {}", k + 1),
            );
        }
    }
    for states in [ordinary.states(), twin.states(), tensor_twin.states()] {
        for (key, want) in &ref_state {
            let got = states[0].tensor(key).unwrap().to_vec_f64().unwrap();
            close(&got, want, &format!("{name}, state \"{key}\""));
        }
    }
}

fn zeros() -> Vec<f64> {
    vec![0.0; 3]
}

// ------------------------------------------------------------------ tuple pattern

#[differentiable_optimizer]
pub(crate) struct TupleBound {
    pub lr: f64,
}

#[differentiable_optimizer]
impl TupleBound {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let (m, v) = (
            state.get_or_insert_with("m", || p.zeros_like())?,
            state.get_or_insert_with("v", || p.zeros_like())?,
        );
        m.mul_(0.5)?.add_(grad)?;
        v.add_(&grad.sqr()?)?;
        p.sub_(&m.div(&v.sqrt()?.add(1.0)?)?.mul(self.lr)?)?;
        Ok(())
    }
}

#[test]
fn entries_bound_through_a_tuple_are_updated() {
    agrees_with_reference(TupleBound { lr: 0.1 }, 0.1, |p, g, st| {
        let m = st.entry("m").or_insert_with(zeros);
        for (m, g) in m.iter_mut().zip(g) {
            *m = *m * 0.5 + g;
        }
        let m = m.clone();
        let v = st.entry("v").or_insert_with(zeros);
        for i in 0..3 {
            v[i] += g[i] * g[i];
            p[i] -= m[i] / (v[i].sqrt() + 1.0) * 0.1;
        }
    });
}

// ------------------------------------------------------------------ if let, let else

#[differentiable_optimizer]
pub(crate) struct IfLetBound {
    pub lr: f64,
    pub beta: f64,
}

#[differentiable_optimizer]
impl IfLetBound {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        if let Ok(m) = state.get_or_insert_with("m", || p.zeros_like()) {
            m.mul_(self.beta)?.add_(grad)?;
        }
        let Ok(total) = state.get_or_insert_with("total", || p.zeros_like()) else {
            return Ok(());
        };
        total.add_(grad)?;
        p.sub_(&state.get("m")?.add(&total)?.mul(self.lr)?)?;
        Ok(())
    }
}

#[test]
fn entries_bound_by_if_let_and_let_else_are_updated() {
    agrees_with_reference(IfLetBound { lr: 0.1, beta: 0.9 }, 0.1, |p, g, st| {
        let m = st.entry("m").or_insert_with(zeros);
        for i in 0..3 {
            m[i] = m[i] * 0.9 + g[i];
        }
        let m = m.clone();
        let total = st.entry("total").or_insert_with(zeros);
        for i in 0..3 {
            total[i] += g[i];
            p[i] -= (m[i] + total[i]) * 0.1;
        }
    });
}

// ------------------------------------------------------------------ reborrow, helper, move

#[differentiable_optimizer]
pub(crate) struct Reborrowed {
    pub lr: f64,
}

/// A helper the macro cannot see into: it updates the entry it is given.
fn decay_and_add(m: &StateTensor, g: &Tensor) -> Result<()> {
    m.mul_(0.5)?.add_(g)?;
    Ok(())
}

#[differentiable_optimizer]
impl Reborrowed {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let st = &mut *state;
        let m = st.get_or_insert_with("m", || p.zeros_like())?;
        decay_and_add(&m, grad)?;
        let velocity = m;
        velocity.add_(1.0)?;
        p.sub_(&state.get("m")?.mul(self.lr)?)?;
        Ok(())
    }
}

#[test]
fn entries_reached_through_a_reborrow_a_helper_or_a_move_are_updated() {
    agrees_with_reference(Reborrowed { lr: 0.1 }, 0.1, |p, g, st| {
        let m = st.entry("m").or_insert_with(zeros);
        for i in 0..3 {
            m[i] = m[i] * 0.5 + g[i] + 1.0;
            p[i] -= m[i] * 0.1;
        }
    });
}

// ------------------------------------------------------------------ continue / break

#[differentiable_optimizer]
pub(crate) struct Looping {
    pub lr: f64,
}

#[differentiable_optimizer]
impl Looping {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let m = state.get_or_insert_with("m", || p.zeros_like())?;
        for i in 0..4 {
            m.mul_(0.5)?;
            if i == 1 {
                continue;
            }
            m.add_(grad)?;
            if i == 2 {
                break;
            }
        }
        let mut rounds = 0;
        while rounds < 5 {
            m.add_(0.25)?;
            rounds += 1;
            if rounds == 1 {
                break;
            }
        }
        p.sub_(&m.mul(self.lr)?)?;
        Ok(())
    }
}

#[test]
fn updates_before_continue_and_break_reach_the_state() {
    agrees_with_reference(Looping { lr: 0.1 }, 0.1, |p, g, st| {
        let m = st.entry("m").or_insert_with(zeros);
        for i in 0..3 {
            // i = 0: halve, add; i = 1: halve; i = 2: halve, add, break.
            m[i] = ((m[i] * 0.5 + g[i]) * 0.5 * 0.5 + g[i]) + 0.25;
            p[i] -= m[i] * 0.1;
        }
    });
}

// ------------------------------------------------------------------ get and set after an update

#[differentiable_optimizer]
pub(crate) struct ReadsAndReplaces {
    pub lr: f64,
}

#[differentiable_optimizer]
impl ReadsAndReplaces {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let m = state.get_or_insert_with("m", || p.zeros_like())?;
        m.add_(grad)?;
        // A second handle sees the update.
        let seen = state.get("m")?;
        p.sub_(&seen.mul(self.lr)?)?;
        // torch's clone(): a copy, unaffected by what follows.
        let before = m.clone();
        // Replacing the entry detaches the old handle, as `state['m'] = ..` does.
        state.set("replaced", before.mul(2.0)?);
        let replaced = state.get("replaced")?;
        state.set("replaced", grad.clone());
        replaced.add_(100.0)?;
        m.mul_(0.5)?;
        p.sub_(&before.mul(0.01)?)?;
        Ok(())
    }
}

#[test]
fn reads_after_an_update_see_it_and_set_replaces_the_entry() {
    agrees_with_reference(ReadsAndReplaces { lr: 0.1 }, 0.1, |p, g, st| {
        let m = st.entry("m").or_insert_with(zeros);
        for i in 0..3 {
            m[i] += g[i];
            let before = m[i];
            p[i] -= before * 0.1 + before * 0.01;
            m[i] *= 0.5;
        }
        st.insert("replaced", g.to_vec());
    });
}

// ------------------------------------------------------------------ torch's idiom, match arms

#[differentiable_optimizer]
pub(crate) struct TorchIdiom {
    pub lr: f64,
    pub momentum: f64,
}

#[differentiable_optimizer]
impl TorchIdiom {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        if !state.contains("momentum_buffer") {
            state.set("momentum_buffer", grad.clone());
        } else {
            state
                .get("momentum_buffer")?
                .mul_(self.momentum)?
                .add_(grad)?;
        }
        let buf = state.get("momentum_buffer")?;
        match state.int("step") {
            None => state.set("first_grad", grad.clone()),
            Some(_) => state.set("first_grad", state.get("first_grad")?),
        }
        state.increment("step");
        let first = state.get("first_grad")?;
        p.sub_(&buf.add(&first)?.mul(self.lr)?)?;
        Ok(())
    }
}

#[test]
fn torch_idioms_that_create_an_entry_on_every_path_compile_and_agree() {
    agrees_with_reference(
        TorchIdiom {
            lr: 0.1,
            momentum: 0.9,
        },
        0.1,
        |p, g, st| {
            let buf = match st.get_mut("momentum_buffer") {
                None => g.to_vec(),
                Some(b) => b.iter().zip(g).map(|(b, g)| b * 0.9 + g).collect(),
            };
            st.insert("momentum_buffer", buf.clone());
            let first = st.entry("first_grad").or_insert_with(|| g.to_vec()).clone();
            for i in 0..3 {
                p[i] -= (buf[i] + first[i]) * 0.1;
            }
        },
    );
}

// ------------------------------------------------------------------ Scalar arithmetic

#[differentiable_optimizer]
pub(crate) struct Capped {
    pub lr: f64,
    pub lr_max: f64,
    pub shrink: f64,
}

#[differentiable_optimizer]
impl Capped {
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        let mut lr = self.lr;
        if self.lr > self.lr_max {
            lr = self.lr_max;
        }
        lr *= self.shrink;
        lr -= 0.001;
        let scale = (-self.shrink).abs().clamp(0.5, 2.0);
        p.sub_(&grad.mul(lr.min(1.0) * scale)?)?;
        Ok(())
    }
}

#[test]
fn scalar_comparisons_methods_and_compound_assignment_match_f64() {
    for (lr, lr_max) in [(0.1, 0.05), (0.1, 0.5)] {
        let opt = Capped {
            lr,
            lr_max,
            shrink: 0.8,
        };
        let reference: Reference = if lr > lr_max {
            |p, g, _| (0..3).for_each(|i| p[i] -= g[i] * ((0.05 * 0.8 - 0.001) * 0.8))
        } else {
            |p, g, _| (0..3).for_each(|i| p[i] -= g[i] * ((0.1 * 0.8 - 0.001) * 0.8))
        };
        agrees_with_reference(opt, lr, reference);
    }
}

// ------------------------------------------------------------------ the checker

#[test]
fn check_optimizer_passes_every_built_in() {
    let sgd = Sgd {
        lr: 0.05,
        momentum: 0.9,
        dampening: 0.1,
        weight_decay: 0.01,
        nesterov: false,
    };
    let nesterov = Sgd {
        dampening: 0.0,
        nesterov: true,
        ..sgd.clone()
    };
    let amsgrad = Adam {
        amsgrad: true,
        weight_decay: 0.01,
        ..Adam::new(0.05)
    };
    let centered = RmsProp {
        centered: true,
        momentum: 0.5,
        ..RmsProp::new(0.01)
    };
    let reports = [
        check_optimizer(sgd),
        check_optimizer(nesterov),
        check_optimizer(Adam::new(0.05)),
        check_optimizer(amsgrad),
        check_optimizer(AdamW::new(0.05)),
        check_optimizer(Adagrad::new(0.1)),
        check_optimizer(Adadelta::new(1.0)),
        check_optimizer(Adamax::new(0.05)),
        check_optimizer(Asgd::new(0.05)),
        check_optimizer(RmsProp::new(0.01)),
        check_optimizer(centered),
        check_optimizer(Rprop::new(0.01)),
    ];
    for r in reports {
        let r = r.unwrap_or_else(|e| panic!("{e}"));
        // Tensor hyperparameters take the ordinary optimizer's steps to the bit.
        assert_eq!(r.tensor_path_difference, 0.0, "{r}");
        // lr is checked everywhere, and the initial-parameter direction last.
        assert!(r.hypergradients.iter().any(|h| h.name == "lr"), "{r}");
        assert_eq!(r.hypergradients.last().unwrap().name, "initial parameters");
    }
}

#[test]
fn check_optimizer_passes_the_optimizers_above() {
    let reports = [
        check_optimizer(TupleBound { lr: 0.1 }),
        check_optimizer(IfLetBound { lr: 0.1, beta: 0.9 }),
        check_optimizer(Reborrowed { lr: 0.1 }),
        check_optimizer(Looping { lr: 0.1 }),
        check_optimizer(TorchIdiom {
            lr: 0.1,
            momentum: 0.9,
        }),
    ];
    for r in reports {
        let r = r.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.tensor_path_difference, 0.0, "{r}");
    }
    let report = check_optimizer(Capped {
        lr: 0.1,
        lr_max: 0.5,
        shrink: 0.8,
    })
    .unwrap();
    let names: Vec<&str> = report
        .hypergradients
        .iter()
        .map(|h| h.name.as_str())
        .collect();
    assert_eq!(names, ["lr", "lr_max", "shrink", "initial parameters"]);
    assert_eq!(report.tensor_path_difference, 0.0, "{report}");
}

/// A helper reads a float out of the learning rate: the macro cannot see it, the ordinary
/// optimizer and the twin agree step by step, and the twin's `d/d lr` misses the path.
fn scaled_by_value(g: &Tensor, lr: impl Into<Scalar>) -> Result<Tensor> {
    g.mul(lr.into().value())
}

#[differentiable_optimizer]
pub(crate) struct ReadsAFloat {
    pub lr: f64,
}

#[differentiable_optimizer]
impl ReadsAFloat {
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        p.sub_(&scaled_by_value(grad, self.lr)?)?;
        Ok(())
    }
}

/// With a tensor learning rate the runtime sees the helper read a float out of it (the
/// macro cannot): the checker reports the typed error, naming the accessor.
#[test]
fn check_optimizer_reports_a_hypergradient_lost_in_a_helper() {
    match check_optimizer(ReadsAFloat { lr: 0.1 }) {
        Err(CheckFailure::Error(Error::LeavesGraph { op, location, .. })) => {
            assert_eq!(op, "Scalar::value");
            assert!(location.contains("faithful_steps.rs"), "{location}");
        }
        other => panic!("expected the graph exit to be reported, got {other:?}"),
    }
}

/// Helpers and nested functions that leave the graph in four ways.
#[differentiable_optimizer]
pub(crate) struct Leaky {
    pub lr: f64,
    pub how: u8,
}

fn detached(t: &Tensor) -> Tensor {
    t.detach()
}

fn norm_of(t: &Tensor) -> Result<f64> {
    t.sqr()?.sum_all()?.sqrt()?.to_scalar_f64()
}

fn rewrapped(t: &Tensor) -> Tensor {
    Tensor::new(t.value().clone())
}

#[differentiable_optimizer]
impl Leaky {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        fn as_float(s: impl Into<Scalar>) -> f64 {
            s.into().value()
        }
        let m = state.get_or_insert_with("m", || p.zeros_like())?;
        m.add_(grad)?;
        let update = match self.how {
            0 => detached(&m).mul(self.lr)?,
            1 => rewrapped(grad).mul(self.lr)?,
            2 => m.mul(as_float(self.lr))?,
            _ => {
                let scale = 1.0 / (1.0 + norm_of(grad)?);
                m.mul(self.lr)?.affine(scale, 0.0)?
            }
        };
        p.sub_(&update)?;
        Ok(())
    }
}

#[test]
fn leaving_the_graph_in_a_twin_step_is_a_typed_error_that_changes_nothing() {
    for (how, op) in [
        (0, "detach"),
        (1, "value"),
        (2, "Scalar::value"),
        (3, "to_scalar_f64"),
    ] {
        let opt = Leaky { lr: 0.1, how };
        // The ordinary optimizer has no graph to leave.
        let mut params = vec![t(&P0).to_leaf()];
        Optimizer::new(opt.clone(), 1)
            .unwrap()
            .step_grads(&mut params, &[Some(t(&GRADS[0]))])
            .unwrap();
        let p0 = t(&P0).to_leaf();
        let lr = Tensor::scalar(0.1f64).to_leaf();
        let mut twin = DiffOptimizer::new(opt, std::slice::from_ref(&p0)).unwrap();
        twin.set_overrides(&Overrides::new().set("lr", lr)).unwrap();
        let loss = p0
            .sqr()
            .unwrap()
            .mul(t(&GRADS[0]))
            .unwrap()
            .sum_all()
            .unwrap();
        match twin.step_params(&loss, std::slice::from_ref(&p0)) {
            Err(Error::LeavesGraph { op: got, param, .. }) => {
                assert_eq!((got, param), (op, 0), "how = {how}");
            }
            other => panic!("how = {how}: expected LeavesGraph, got {other:?}"),
        }
        assert!(twin.states()[0].is_empty(), "how = {how}: state advanced");
        // Test mode keeps no graph: nothing to leave.
        twin.set_track_higher_grads(false);
        twin.step_params(&loss, std::slice::from_ref(&p0)).unwrap();
    }
}
