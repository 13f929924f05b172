//! An adversary against the autodiff API: `grad` / `backward` / `GradOptions` with odd
//! lists and seeds, custom ops whose forward or vjp misbehave, `GradStore` and
//! `testing::check_optimizer_with` with bad settings. Each bad input is a typed error that
//! names what is wrong and changes nothing the caller had; where torch.autograd defines a
//! behaviour, ours is the same.

use candle_higher::candle;
use candle_higher::optim::Sgd;
use candle_higher::testing::{check_optimizer_with, CheckFailure, CheckOptions};
use candle_higher::{
    apply_custom_op, backward, detect_anomaly, grad, grad_one, is_grad_enabled, no_grad, CustomOp,
    DType, Error, GradOptions, GradStore, Result, Tensor,
};

use crate::common::{bits, device, t};

fn vals(x: &Tensor) -> Vec<f64> {
    x.to_vec_f64().unwrap()
}

fn grad1(outputs: &[Tensor], inputs: &[Tensor], options: GradOptions) -> Vec<Vec<f64>> {
    grad(outputs, inputs, options)
        .unwrap()
        .iter()
        .map(|g| vals(g.as_ref().expect("a gradient")))
        .collect()
}

// ---------------------------------------------------------------------------------------
// grad: lists, seeds, options

/// torch: the gradient of an output with respect to itself is the seed (ones, or the given
/// `grad_outputs`), and the op that made it is not differentiated.
#[test]
fn the_gradient_of_an_output_with_respect_to_itself_is_the_seed() {
    let x = t(&[1.0, 2.0, 3.0], &[3]).to_leaf();
    let y = x.sqr().unwrap();
    let s = y.sum_all().unwrap();
    assert_eq!(
        grad1(
            std::slice::from_ref(&s),
            std::slice::from_ref(&s),
            GradOptions::default()
        ),
        vec![vec![1.0]]
    );
    let v = t(&[0.5, -1.0, 2.0], &[3]);
    let got = grad1(
        std::slice::from_ref(&y),
        std::slice::from_ref(&y),
        GradOptions::default().grad_outputs(vec![v.clone()]),
    );
    assert_eq!(got, vec![vals(&v)]);
    // The op that made the output is not run backward: here its vjp would fail (it
    // was run, and its error returned).
    let out = apply_custom_op(Broken(Bad::Fails), &[&x]).unwrap();
    let g = grad(
        std::slice::from_ref(&out),
        std::slice::from_ref(&out),
        GradOptions::default().grad_outputs(vec![v.clone()]),
    )
    .unwrap();
    assert_eq!(vals(g[0].as_ref().unwrap()), vals(&v));
}

/// An input that is also upstream of another output gets the seed plus that path.
#[test]
fn an_output_that_is_an_input_and_feeds_another_output_gets_both() {
    let x = t(&[1.0, -2.0], &[2]).to_leaf();
    let h = x.sqr().unwrap().sum_all().unwrap(); // sum x^2 = 5
    let y = h.sqr().unwrap(); // h^2: dy/dh = 2h = 10
    assert_eq!(
        grad1(&[h.clone(), y], &[h, x], GradOptions::default()),
        // d(h + h^2)/dh = 1 + 2h; d/dx = (1 + 2h) 2x = 11 * 2x.
        vec![vec![11.0], vec![22.0, -44.0]]
    );
}

/// One output listed twice with different `grad_outputs`: the seeds add.
#[test]
fn an_output_listed_twice_adds_its_seeds() {
    let x = t(&[1.0, 2.0], &[2]).to_leaf();
    let y = x.mul(3.0).unwrap();
    let got = grad1(
        &[y.clone(), y],
        &[x],
        GradOptions::default().grad_outputs(vec![t(&[1.0, 0.0], &[2]), t(&[0.5, 2.0], &[2])]),
    );
    // 3 (v1 + v2).
    assert_eq!(got, vec![vec![4.5, 6.0]]);
}

/// torch: "grad requires non-empty inputs". It used to return an empty list, so a
/// caller that built the list from an empty filter got no gradient and no error.
#[test]
fn no_inputs_is_an_error() {
    let x = t(&[1.0], &[1]).to_leaf();
    let y = x.sum_all().unwrap();
    for allow_unused in [false, true] {
        match grad(
            std::slice::from_ref(&y),
            &[],
            GradOptions::default().allow_unused(allow_unused),
        ) {
            Err(Error::InvalidArgument {
                op: "grad",
                message,
            }) => {
                assert!(message.contains("no inputs"), "{message}")
            }
            other => panic!("grad with no inputs: {other:?}"),
        }
    }
}

/// No outputs reach nothing: every input is unused (torch), or `None` with allow_unused.
#[test]
fn no_outputs_leave_every_input_unused() {
    let x = t(&[1.0, 2.0], &[2]).to_leaf();
    match grad(&[], std::slice::from_ref(&x), GradOptions::default()) {
        Err(Error::UnusedInput { index: 0, shape }) => assert_eq!(shape, vec![2]),
        other => panic!("{other:?}"),
    }
    let g = grad(
        &[],
        std::slice::from_ref(&x),
        GradOptions::default()
            .allow_unused(true)
            .grad_outputs(vec![]),
    )
    .unwrap();
    assert!(g[0].is_none());
}

/// An output that does not require grad (a constant, or the first-order gradient of a
/// linear function) is not an error of its own (torch: "element 0 of tensors does not
/// require grad"): its inputs are unused, as DESIGN §9 says.
#[test]
fn a_constant_output_leaves_its_inputs_unused() {
    let x = t(&[1.0, 2.0], &[2]).to_leaf();
    let c = t(&[3.0], &[1]);
    match grad(
        std::slice::from_ref(&c),
        std::slice::from_ref(&x),
        GradOptions::default(),
    ) {
        Err(Error::UnusedInput { index: 0, .. }) => {}
        other => panic!("{other:?}"),
    }
    // d/dx sum(3x) = 3, a constant: its own gradient reaches x nowhere.
    let y = x.mul(3.0).unwrap().sum_all().unwrap();
    let d = grad_one(&y, &x, GradOptions::create_graph()).unwrap();
    assert!(!d.requires_grad());
    let d = d.sum_all().unwrap();
    assert!(matches!(
        grad_one(&d, &x, GradOptions::default()),
        Err(Error::UnusedInput { index: 0, .. })
    ));
    let g = grad(&[d], &[x], GradOptions::default().allow_unused(true)).unwrap();
    assert!(g[0].is_none());
}

/// An integer constant input does not require grad (`InputDoesNotRequireGrad`); an
/// integer leaf cannot, even with allow_unused (torch refuses `requires_grad` on one).
#[test]
fn integer_inputs_are_refused_by_kind() {
    let x = t(&[1.0, 2.0], &[2]).to_leaf();
    let y = x.sum_all().unwrap();
    let int = Tensor::from_slice(&[1i64, 2], &[2], &device()).unwrap();
    match grad(
        std::slice::from_ref(&y),
        &[x.clone(), int.clone()],
        GradOptions::default(),
    ) {
        Err(Error::InputDoesNotRequireGrad { index: 1, shape }) => assert_eq!(shape, vec![2]),
        other => panic!("{other:?}"),
    }
    let leaf = int.to_leaf();
    for allow_unused in [false, true] {
        match grad(
            std::slice::from_ref(&y),
            &[x.clone(), leaf.clone()],
            GradOptions::default().allow_unused(allow_unused),
        ) {
            Err(Error::UnsupportedDType {
                op: "grad",
                dtype: DType::I64,
                ..
            }) => {}
            other => panic!("allow_unused {allow_unused}: {other:?}"),
        }
    }
    // A 0-d integer leaf as the output of `backward`.
    let scalar = Tensor::scalar(3u32).to_leaf();
    assert!(matches!(
        backward(&scalar),
        Err(Error::UnsupportedDType {
            op: "backward",
            dtype: DType::U32,
            ..
        })
    ));
}

/// A 0-size output is not a scalar; a one-element output of any rank is.
#[test]
fn one_element_outputs_of_any_rank_are_scalars_and_empty_ones_are_not() {
    let x = t(&[2.0], &[1, 1]).to_leaf();
    let y = x.sqr().unwrap(); // [1, 1]
    assert_eq!(grad1(&[y], &[x], GradOptions::default()), vec![vec![4.0]]);
    let e = Tensor::zeros(&[0], DType::F64, &device())
        .unwrap()
        .to_leaf();
    let ye = e.sqr().unwrap();
    match grad(&[ye], &[e], GradOptions::default()) {
        Err(Error::NonScalarOutput {
            index: 0, shape, ..
        }) => assert_eq!(shape, vec![0]),
        other => panic!("{other:?}"),
    }
}

/// The non-scalar error names the function that was called and what to do there: `grad`
/// takes grad_outputs, `backward` has none to take.
#[test]
fn non_scalar_output_messages_name_grad_and_backward() {
    let x = t(&[1.0, 2.0], &[2]).to_leaf();
    let y = x.sqr().unwrap();
    let msg = grad(std::slice::from_ref(&y), &[x], GradOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with("grad: output 0 has shape [2];") && msg.contains("grad_outputs"),
        "{msg}"
    );
    let msg = backward(&y).unwrap_err().to_string();
    assert!(
        msg.starts_with("backward: the output has shape [2];") && msg.contains("sum_all"),
        "{msg}"
    );
}

/// 0-size inputs get 0-size gradients.
#[test]
fn empty_inputs_get_empty_gradients() {
    let e = Tensor::zeros(&[0, 3], DType::F64, &device())
        .unwrap()
        .to_leaf();
    let x = t(&[2.0], &[1]).to_leaf();
    let y = e
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .add(x.sum_all().unwrap())
        .unwrap();
    let g = grad(&[y], &[e, x], GradOptions::default()).unwrap();
    assert_eq!(g[0].as_ref().unwrap().dims(), &[0, 3]);
    assert_eq!(vals(g[1].as_ref().unwrap()), vec![1.0]);
}

/// `grad_outputs` of another count, a broadcastable but different shape, a scalar for a
/// `[1]` output, or another dtype: each an error naming both sides, and nothing changes.
#[test]
fn grad_outputs_must_match_outputs_exactly() {
    let x = t(&[1.0, 2.0, 3.0], &[3]).to_leaf();
    let y = x.sqr().unwrap();
    let before = bits(&x);
    let call = |go: Vec<Tensor>| {
        grad(
            std::slice::from_ref(&y),
            std::slice::from_ref(&x),
            GradOptions::default().grad_outputs(go),
        )
        .unwrap_err()
    };
    let v = t(&[1.0, 1.0, 1.0], &[3]);
    assert!(matches!(
        call(vec![v.clone(), v.clone()]),
        Error::GradOutputsLength {
            outputs: 1,
            grad_outputs: 2
        }
    ));
    match call(vec![t(&[1.0], &[1])]) {
        Error::ShapeMismatch { expected, got, .. } => {
            assert!(expected.contains("[3]"), "{expected}");
            assert_eq!(got, vec![1]);
        }
        other => panic!("{other:?}"),
    }
    match call(vec![Tensor::ones(&[3], DType::I64, &device()).unwrap()]) {
        Error::DTypeMismatch { lhs, rhs, .. } => {
            assert_eq!((lhs, rhs), (DType::F64, DType::I64))
        }
        other => panic!("{other:?}"),
    }
    let s = x.sum_all().unwrap().reshape(&[1]).unwrap();
    match grad(
        &[s],
        std::slice::from_ref(&x),
        GradOptions::default().grad_outputs(vec![Tensor::scalar(1.0f64)]),
    ) {
        Err(Error::ShapeMismatch { got, .. }) => assert!(got.is_empty()),
        other => panic!("{other:?}"),
    }
    assert_eq!(bits(&x), before);
}

/// A NaN in `grad_outputs` gives NaN where it reaches (torch), and anomaly mode names
/// the backward op that produced it.
#[test]
fn a_nan_seed_propagates_and_anomaly_mode_names_it() {
    let x = t(&[1.0, 2.0], &[2]).to_leaf();
    let y = x.sqr().unwrap();
    let v = t(&[f64::NAN, 1.0], &[2]);
    let g = grad1(
        std::slice::from_ref(&y),
        std::slice::from_ref(&x),
        GradOptions::default().grad_outputs(vec![v.clone()]),
    );
    assert!(g[0][0].is_nan());
    assert_eq!(g[0][1], 4.0);
    let _guard = detect_anomaly();
    match grad(&[y], &[x], GradOptions::default().grad_outputs(vec![v])) {
        Err(Error::NonFinite { what }) => assert!(what.contains("backward"), "{what}"),
        other => panic!("{other:?}"),
    }
}

/// `grad_outputs` that require grad, with create_graph: the result is differentiable with
/// respect to them (the double-backward trick for a Jacobian-vector product).
#[test]
fn grad_outputs_that_require_grad_are_differentiated() {
    // y = x^2 elementwise, g(v) = J^T v = 2 x v; d <g(v), u> / dv = 2 x u.
    let x = t(&[1.0, -2.0], &[2]).to_leaf();
    let v = t(&[0.5, 0.25], &[2]).to_leaf();
    let u = t(&[3.0, 1.0], &[2]);
    let y = x.sqr().unwrap();
    let g = grad(
        &[y],
        std::slice::from_ref(&x),
        GradOptions::create_graph().grad_outputs(vec![v.clone()]),
    )
    .unwrap()[0]
        .clone()
        .unwrap();
    assert_eq!(vals(&g), vec![1.0, -1.0]);
    let dot = g.mul(&u).unwrap().sum_all().unwrap();
    assert_eq!(
        grad1(&[dot], &[v, x], GradOptions::default()),
        // d/dx <2 x v, u> = 2 v u.
        vec![vec![6.0, -4.0], vec![3.0, 0.5]]
    );
}

/// allow_unused gives `None` for an unreached leaf and for a constant, the gradient
/// elsewhere; `grad_one` ignores it (it has no `None` to return).
#[test]
fn allow_unused_gives_none_only_where_nothing_arrives() {
    let x = t(&[1.0], &[1]).to_leaf();
    let unused = t(&[1.0], &[1]).to_leaf();
    let constant = t(&[1.0], &[1]);
    let y = x.mul(2.0).unwrap().sum_all().unwrap();
    let g = grad(
        std::slice::from_ref(&y),
        &[unused.clone(), x.clone(), constant.clone()],
        GradOptions::default().allow_unused(true),
    )
    .unwrap();
    assert!(g[0].is_none() && g[2].is_none());
    assert_eq!(vals(g[1].as_ref().unwrap()), vec![2.0]);
    match grad(
        std::slice::from_ref(&y),
        &[x, constant],
        GradOptions::default(),
    ) {
        Err(Error::InputDoesNotRequireGrad { index: 1, .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        grad_one(&y, &unused, GradOptions::default().allow_unused(true)),
        Err(Error::UnusedInput { index: 0, .. })
    ));
}

/// A leaf created after the output, and a fresh leaf made from an intermediate with
/// `to_leaf`, are not upstream of the output.
#[test]
fn later_leaves_and_re_leafed_tensors_are_unused() {
    let x = t(&[1.0], &[1]).to_leaf();
    let h = x.mul(2.0).unwrap();
    let y = h.sqr().unwrap().sum_all().unwrap();
    let later = t(&[1.0], &[1]).to_leaf();
    let cut = h.to_leaf();
    for (i, input) in [later, cut].into_iter().enumerate() {
        match grad(std::slice::from_ref(&y), &[input], GradOptions::default()) {
            Err(Error::UnusedInput { index: 0, .. }) => {}
            other => panic!("case {i}: {other:?}"),
        }
    }
}

/// `detach` inside a graph is a constant there: d(detach(x) x)/dx = x, not 2x.
#[test]
fn detach_inside_a_graph_is_a_constant() {
    let x = t(&[3.0, -1.0], &[2]).to_leaf();
    let y = x.detach().mul(&x).unwrap().sum_all().unwrap();
    assert_eq!(
        grad1(&[y], std::slice::from_ref(&x), GradOptions::default()),
        vec![vec![3.0, -1.0]]
    );
}

/// Without create_graph the gradient is a constant; with it, second and third order
/// exist; the graph is not consumed by any of the calls (no retain_graph).
#[test]
fn create_graph_combinations_and_third_order() {
    let x = Tensor::scalar(2.0f64).to_leaf();
    let y = x.powf(4.0).unwrap(); // x^4
    let plain = grad_one(&y, &x, GradOptions::default()).unwrap();
    assert!(!plain.requires_grad());
    assert_eq!(plain.to_scalar_f64().unwrap(), 32.0); // 4 x^3
    let d1 = grad_one(&y, &x, GradOptions::create_graph()).unwrap();
    let d2 = grad_one(&d1, &x, GradOptions::create_graph()).unwrap(); // 12 x^2
    let d3 = grad_one(&d2, &x, GradOptions::default()).unwrap(); // 24 x
    assert_eq!(
        [d1, d2, d3].map(|d| d.to_scalar_f64().unwrap()),
        [32.0, 48.0, 48.0]
    );
    // The same graph again, after a grad without create_graph.
    assert_eq!(
        grad_one(&y, &x, GradOptions::default())
            .unwrap()
            .to_scalar_f64()
            .unwrap(),
        32.0
    );
}

/// A failing `grad` leaves grad mode as it was, on and under `no_grad`; create_graph
/// records even under `no_grad` (torch runs the backward in grad mode = create_graph).
#[test]
fn grad_mode_is_restored_after_a_failing_grad() {
    let x = t(&[1.0], &[1]).to_leaf();
    let y = apply_custom_op(Broken(Bad::Fails), &[&x])
        .unwrap()
        .sum_all()
        .unwrap();
    assert!(grad_one(&y, &x, GradOptions::create_graph()).is_err());
    assert!(is_grad_enabled());
    let z = x.sqr().unwrap().sum_all().unwrap();
    {
        let _off = no_grad();
        assert!(grad_one(&y, &x, GradOptions::create_graph()).is_err());
        assert!(!is_grad_enabled());
        let d = grad_one(&z, &x, GradOptions::create_graph()).unwrap();
        assert!(d.requires_grad());
        assert!(!is_grad_enabled());
    }
    assert!(is_grad_enabled());
}

/// `backward` of a leaf is ones; of a constant, an empty store (README: a loss that
/// does not reach the base model gives it nothing).
#[test]
fn backward_of_a_leaf_and_of_a_constant() {
    let x = t(&[5.0], &[1]).to_leaf();
    let store = backward(&x).unwrap();
    assert_eq!(vals(store.get(&x).unwrap()), vec![1.0]);
    let store = backward(&t(&[5.0], &[1])).unwrap();
    assert!(store.is_empty());
}

// ---------------------------------------------------------------------------------------
// Custom ops

/// What [`Broken`]'s vjp does.
#[derive(Clone, Copy)]
enum Bad {
    /// One gradient too many.
    TooMany,
    /// A `[1]` gradient for a `[n]` input (candle would broadcast it).
    Broadcastable,
    /// An f32 gradient for an f64 input.
    OtherDType,
    /// NaN of the right shape.
    Nan,
    /// An error of its own.
    Fails,
    /// A panic.
    Panics,
    /// A gradient cut from the graph (not differentiable again).
    Detached,
    /// A wrong-shaped gradient for the second input, which does not need one.
    WrongShapeWhereUnneeded,
}

/// The identity with a vjp that misbehaves as told.
struct Broken(Bad);

impl CustomOp for Broken {
    fn name(&self) -> &'static str {
        "broken"
    }
    fn forward(&self, inputs: &[&candle::Tensor]) -> Result<candle::Tensor> {
        Ok(inputs[0].clone())
    }
    fn vjp(&self, inputs: &[Tensor], _: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let one = |g: Tensor| {
            let mut v = vec![Some(g)];
            v.resize(inputs.len(), None);
            v
        };
        Ok(match self.0 {
            Bad::TooMany => vec![Some(grad.clone()); inputs.len() + 1],
            Bad::Broadcastable => one(grad.sum_all()?.reshape(&[1])?),
            Bad::OtherDType => one(grad.to_dtype(DType::F32)?),
            Bad::Nan => one(grad.mul(f64::NAN)?),
            Bad::Fails => {
                return Err(Error::InvalidArgument {
                    op: "broken",
                    message: "my own failure".into(),
                })
            }
            Bad::Panics => panic!("vjp exploded"),
            Bad::Detached => one(grad.mul(&inputs[0])?.detach()),
            Bad::WrongShapeWhereUnneeded => {
                vec![Some(grad.clone()), Some(Tensor::scalar(1.0f64))]
            }
        })
    }
}

fn broken_grad(bad: Bad, x: &Tensor) -> Result<Tensor> {
    let y = apply_custom_op(Broken(bad), &[x])?.sum_all()?;
    grad_one(&y, x, GradOptions::default())
}

#[test]
fn a_vjp_with_one_gradient_too_many_is_an_error_naming_the_op() {
    let x = t(&[1.0, 2.0, 3.0], &[3]).to_leaf();
    match broken_grad(Bad::TooMany, &x) {
        Err(Error::InvalidArgument {
            op: "broken",
            message,
        }) => assert!(message.contains("2 gradients for 1 inputs"), "{message}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_vjp_gradient_that_would_broadcast_is_a_shape_error() {
    let x = t(&[1.0, 2.0, 3.0], &[3]).to_leaf();
    match broken_grad(Bad::Broadcastable, &x) {
        Err(Error::ShapeMismatch {
            op: "broken",
            expected,
            got,
        }) => {
            assert!(expected.contains("input 0") && expected.contains("[3]"));
            assert_eq!(got, vec![1]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_vjp_gradient_of_another_dtype_is_a_dtype_error() {
    let x = t(&[1.0, 2.0], &[2]).to_leaf();
    match broken_grad(Bad::OtherDType, &x) {
        Err(Error::DTypeMismatch {
            op: "broken",
            lhs: DType::F64,
            rhs: DType::F32,
        }) => {}
        other => panic!("{other:?}"),
    }
}

/// A NaN gradient propagates (torch); anomaly mode names the op.
#[test]
fn a_nan_vjp_propagates_and_anomaly_mode_names_the_op() {
    let x = t(&[1.0, 2.0], &[2]).to_leaf();
    assert!(vals(&broken_grad(Bad::Nan, &x).unwrap())
        .iter()
        .all(|v| v.is_nan()));
    let _guard = detect_anomaly();
    match broken_grad(Bad::Nan, &x) {
        Err(Error::NonFinite { what }) => assert!(what.contains("broken"), "{what}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_vjp_error_reaches_the_caller_unchanged() {
    let x = t(&[1.0], &[1]).to_leaf();
    match broken_grad(Bad::Fails, &x) {
        Err(Error::InvalidArgument {
            op: "broken",
            message,
        }) => assert_eq!(message, "my own failure"),
        other => panic!("{other:?}"),
    }
}

/// A panic in a vjp or a forward is an error naming the op, not a panic of `grad` (it
/// unwound through the caller).
#[test]
fn a_panicking_vjp_or_forward_is_an_error_naming_the_op() {
    let x = t(&[1.0, 2.0], &[2]).to_leaf();
    let before = bits(&x);
    for create_graph in [false, true] {
        let y = apply_custom_op(Broken(Bad::Panics), &[&x])
            .unwrap()
            .sum_all()
            .unwrap();
        let options = GradOptions {
            create_graph,
            ..GradOptions::default()
        };
        match grad_one(&y, &x, options) {
            Err(Error::InvalidArgument {
                op: "broken",
                message,
            }) => assert!(
                message.contains("vjp panicked") && message.contains("vjp exploded"),
                "{message}"
            ),
            other => panic!("{other:?}"),
        }
        assert!(is_grad_enabled());
        match backward(&y) {
            Err(Error::InvalidArgument { op: "broken", .. }) => {}
            other => panic!("{other:?}"),
        }
    }
    match apply_custom_op(PanickingForward, &[&x]) {
        Err(Error::InvalidArgument {
            op: "panicking_forward",
            message,
        }) => assert!(
            message.contains("forward panicked") && message.contains("index 7"),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(bits(&x), before);
}

struct PanickingForward;

impl CustomOp for PanickingForward {
    fn name(&self) -> &'static str {
        "panicking_forward"
    }
    fn forward(&self, _: &[&candle::Tensor]) -> Result<candle::Tensor> {
        let v: Vec<f64> = Vec::new();
        let i = 7;
        panic!("index {i} of {}", v.len())
    }
    fn vjp(&self, _: &[Tensor], _: &Tensor, _: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![None])
    }
}

/// A forward error reaches the caller unchanged.
#[test]
fn a_forward_error_reaches_the_caller() {
    struct Fails;
    impl CustomOp for Fails {
        fn name(&self) -> &'static str {
            "fails"
        }
        fn forward(&self, inputs: &[&candle::Tensor]) -> Result<candle::Tensor> {
            Ok(inputs[0].matmul(inputs[0])?) // [2] x [2]: candle refuses
        }
        fn vjp(&self, _: &[Tensor], _: &Tensor, _: &Tensor) -> Result<Vec<Option<Tensor>>> {
            Ok(vec![None])
        }
    }
    let x = t(&[1.0, 2.0], &[2]).to_leaf();
    assert!(matches!(
        apply_custom_op(Fails, &[&x]),
        Err(Error::Candle(_))
    ));
}

/// A gradient for an input that needs none is dropped unchecked (torch skips inputs
/// that do not require grad).
#[test]
fn a_gradient_for_an_input_that_needs_none_is_ignored() {
    let x = t(&[1.0, 2.0], &[2]).to_leaf();
    let c = t(&[1.0, 1.0], &[2]);
    let y = apply_custom_op(Broken(Bad::WrongShapeWhereUnneeded), &[&x, &c])
        .unwrap()
        .sum_all()
        .unwrap();
    assert_eq!(
        grad1(&[y], &[x], GradOptions::default()),
        vec![vec![1.0, 1.0]]
    );
}

/// A vjp cut from the graph is first-order only: its second derivative is unused (an
/// error), not a silent zero.
#[test]
fn a_detached_vjp_has_no_second_derivative() {
    let x = t(&[1.0, 2.0], &[2]).to_leaf();
    let y = apply_custom_op(Broken(Bad::Detached), &[&x])
        .unwrap()
        .sum_all()
        .unwrap();
    let d = grad_one(&y, &x, GradOptions::create_graph()).unwrap();
    assert_eq!(vals(&d), vec![1.0, 2.0]);
    assert!(matches!(
        grad_one(&d.sum_all().unwrap(), &x, GradOptions::default()),
        Err(Error::UnusedInput { .. })
    ));
}

/// `x * y` by hand: its vjp is recorded, so it has every order.
struct Mul;

impl CustomOp for Mul {
    fn name(&self) -> &'static str {
        "my_mul"
    }
    fn forward(&self, inputs: &[&candle::Tensor]) -> Result<candle::Tensor> {
        Ok((inputs[0] * inputs[1])?)
    }
    fn vjp(&self, inputs: &[Tensor], _: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![
            Some(grad.mul(&inputs[1])?),
            Some(grad.mul(&inputs[0])?),
        ])
    }
}

/// One tensor at both positions of a custom op gets both gradients; the op works at
/// second and third order.
#[test]
fn a_custom_op_on_a_repeated_input_at_every_order() {
    let x = Tensor::scalar(3.0f64).to_leaf();
    let sq = apply_custom_op(Mul, &[&x, &x]).unwrap(); // x^2
    let cube = apply_custom_op(Mul, &[&sq, &x]).unwrap(); // x^3
    let d1 = grad_one(&cube, &x, GradOptions::create_graph()).unwrap(); // 3 x^2
    let d2 = grad_one(&d1, &x, GradOptions::create_graph()).unwrap(); // 6 x
    let d3 = grad_one(&d2, &x, GradOptions::default()).unwrap(); // 6
    assert_eq!(
        [d1, d2, d3].map(|d| d.to_scalar_f64().unwrap()),
        [27.0, 18.0, 6.0]
    );
}

/// An integer result is a constant (as every op's), and a custom op of no inputs too.
#[test]
fn a_custom_op_with_an_integer_result_or_no_inputs_is_a_constant() {
    struct Round;
    impl CustomOp for Round {
        fn name(&self) -> &'static str {
            "round_to_i64"
        }
        fn forward(&self, inputs: &[&candle::Tensor]) -> Result<candle::Tensor> {
            if inputs.is_empty() {
                return Ok(candle::Tensor::new(&[1i64, 2], &candle::Device::Cpu)?);
            }
            Ok(inputs[0].round()?.to_dtype(DType::I64)?)
        }
        fn vjp(&self, _: &[Tensor], _: &Tensor, _: &Tensor) -> Result<Vec<Option<Tensor>>> {
            panic!("never run: the result is a constant")
        }
    }
    let x = t(&[1.4, 2.6], &[2]).to_leaf();
    let r = apply_custom_op(Round, &[&x]).unwrap();
    assert!(!r.requires_grad());
    assert_eq!(vals(&r), vec![1.0, 3.0]);
    let none = apply_custom_op(Round, &[]).unwrap();
    assert!(!none.requires_grad());
}

// ---------------------------------------------------------------------------------------
// GradStore

/// A NaN or infinite factor used to turn every gradient into NaN without a word.
#[test]
fn scaling_a_store_by_a_non_finite_factor_is_an_error_and_changes_nothing() {
    let a = t(&[1.0, 2.0], &[2]).to_leaf();
    let mut store = backward(&a.sqr().unwrap().sum_all().unwrap()).unwrap();
    let before = bits(store.get(&a).unwrap());
    for factor in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        match store.scale(factor) {
            Err(Error::InvalidArgument {
                op: "GradStore::scale",
                message,
            }) => assert!(message.contains(&factor.to_string()), "{message}"),
            other => panic!("{factor}: {other:?}"),
        }
        assert_eq!(bits(store.get(&a).unwrap()), before);
    }
    store.scale(0.5).unwrap();
    assert_eq!(vals(store.get(&a).unwrap()), vec![1.0, 2.0]);
}

/// A mismatched accumulation changes nothing, even for the leaves that did match.
#[test]
fn a_failing_accumulate_changes_no_leaf() {
    let a = t(&[1.0, 2.0], &[2]).to_leaf();
    let b = t(&[1.0], &[1]).to_leaf();
    let mut store = GradStore::default();
    store.insert(&a, t(&[1.0, 1.0], &[2]));
    store.insert(&b, t(&[1.0], &[1]));
    let mut other = GradStore::default();
    other.insert(&a, t(&[1.0, 1.0], &[2]));
    other.insert(&b, t(&[1.0, 1.0, 1.0], &[3]));
    match store.accumulate(&other) {
        Err(Error::ShapeMismatch { got, .. }) => assert_eq!(got, vec![3]),
        other => panic!("{other:?}"),
    }
    assert_eq!(vals(store.get(&a).unwrap()), vec![1.0, 1.0]);
    assert_eq!(vals(store.get(&b).unwrap()), vec![1.0]);
    // remove, get_id and ids agree with what is held.
    assert_eq!(store.get_id(a.id()).map(vals), Some(vec![1.0, 1.0]));
    assert!(store.remove(&a).is_some() && store.remove(&a).is_none());
    assert_eq!(store.ids().collect::<Vec<_>>(), vec![b.id()]);
}

// ---------------------------------------------------------------------------------------
// testing::check_optimizer_with

fn expect_invalid_check(options: CheckOptions, what: &str) {
    match check_optimizer_with(Sgd::new(0.1), options) {
        Err(CheckFailure::Error(Error::InvalidArgument {
            op: "check_optimizer",
            message,
        })) => assert!(message.contains(what), "{message}"),
        other => panic!("{options:?}: {other:?}"),
    }
}

/// No steps checked nothing and passed; a NaN or infinite rtol passed every derivative
/// (`diff > NaN` is false), and a negative one could never pass.
#[test]
fn check_optimizer_refuses_settings_that_check_nothing() {
    let base = CheckOptions::default();
    expect_invalid_check(CheckOptions { steps: 0, ..base }, "steps is 0");
    for rtol in [f64::NAN, f64::INFINITY, -1e-5] {
        expect_invalid_check(CheckOptions { rtol, ..base }, "rtol");
    }
    // rtol 0 leaves the round-off bound, which a correct optimizer meets.
    let report = check_optimizer_with(Sgd::new(0.1), CheckOptions { rtol: 0.0, ..base });
    assert!(report.is_ok(), "{report:?}");
}
