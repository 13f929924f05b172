//! The runtime's ops and layers under adversarial input: every bad input is a typed error
//! naming what is wrong (never a panic, never a silently wrong number), zero-size inputs give
//! PyTorch's results, NaN propagates, derivatives of integer powers stay finite at 0 at every
//! order, and the opt-in anomaly mode names the first op that produced a non-finite value.

use std::collections::HashMap;

use candle_higher::nn::{self, ConvConfig, Module, Parameters};
use candle_higher::{
    detect_anomaly, grad, is_anomaly_enabled, DType, Device, Error, GradOptions, Tensor,
};

use crate::common::t;

/// The device of the suites (`CANDLE_HIGHER_DEVICE`, `common::device()`).
fn dev() -> Device {
    crate::common::device()
}

fn vb(seed: u64) -> nn::VarBuilder {
    nn::VarBuilder::new(seed, DType::F64, &dev())
}

/// The same small integer values in each integer dtype candle has.
fn integer_tensors(shape: &[usize]) -> Vec<Tensor> {
    let n: usize = shape.iter().product();
    let u8s: Vec<u8> = (0..n).map(|i| (i % 5) as u8 + 1).collect();
    let u32s: Vec<u32> = u8s.iter().map(|&v| u32::from(v)).collect();
    let i64s: Vec<i64> = u8s.iter().map(|&v| i64::from(v)).collect();
    vec![
        Tensor::from_vec(u8s, shape, &dev()).unwrap(),
        Tensor::from_vec(u32s, shape, &dev()).unwrap(),
        Tensor::from_vec(i64s, shape, &dev()).unwrap(),
    ]
}

fn vals(x: &Tensor) -> Vec<f64> {
    x.to_vec_f64().unwrap()
}

// ---------------------------------------------------------------------------------------
// Integer tensors in float-only ops.

type Op = (&'static str, fn(&Tensor) -> candle_higher::Result<Tensor>);

#[test]
fn float_only_ops_reject_every_integer_dtype_by_name() {
    let ops: Vec<Op> = vec![
        ("exp", |x| x.exp()),
        ("log", |x| x.log()),
        ("sqrt", |x| x.sqrt()),
        ("safe_recip", |x| x.safe_recip()),
        ("tanh", |x| x.tanh()),
        ("sigmoid", |x| x.sigmoid()),
        ("erf", |x| x.erf()),
        ("gelu", |x| x.gelu()),
        ("softplus", |x| x.softplus()),
        ("elu", |x| x.elu(1.0)),
        ("leaky_relu", |x| x.leaky_relu(0.01)),
        ("softmax", |x| x.softmax(1)),
        ("log_softmax", |x| x.log_softmax(1)),
        ("logsumexp", |x| x.logsumexp(1, false)),
        ("powf", |x| x.powf(3.0)),
        ("powf", |x| x.sqr()),
        ("pow", |x| x.pow(x)),
        ("mse", |x| nn::mse(x, x)),
        ("mean", |x| x.mean_all()),
        ("mean", |x| x.mean(0)),
        ("matmul", |x| x.matmul(&x.t()?)),
        ("linear", |x| x.linear(x, None)),
        ("max_pool2d", |x| x.reshape(&[1, 1, 2, 3])?.max_pool2d(2)),
        ("avg_pool2d", |x| x.reshape(&[1, 1, 2, 3])?.avg_pool2d(2)),
        ("conv2d", |x| {
            let x = x.reshape(&[1, 1, 2, 3])?;
            x.conv2d(&x.narrow(3, 0, 2)?, 0, 1, 1, 1)
        }),
    ];
    for x in integer_tensors(&[2, 3]) {
        for (name, op) in &ops {
            match op(&x) {
                Err(Error::UnsupportedDType { op, dtype, .. }) => {
                    assert_eq!((op, dtype), (*name, x.dtype()));
                }
                other => panic!(
                    "{name} on {:?}: expected UnsupportedDType, got {other:?}",
                    x.dtype()
                ),
            }
        }
    }
}

/// Layers and losses given integer inputs fail with a typed error (the float-only check of
/// the op they reach first, or the dtype mismatch with their f64 weights), never a panic.
#[test]
fn layers_and_losses_reject_integer_inputs() {
    let lin = nn::linear(3, 2, vb(0)).unwrap();
    let conv = nn::conv2d(1, 2, 2, ConvConfig::default(), vb(0)).unwrap();
    let bn = nn::batch_norm1d(3, nn::BatchNormConfig::default(), vb(0)).unwrap();
    let ln = nn::layer_norm(&[3], vb(0)).unwrap();
    let lstm = nn::lstm(3, 2, 1, vb(0)).unwrap();
    let drop = nn::dropout(0.5, vb(0)).unwrap();
    for x in integer_tensors(&[2, 3]) {
        let typed = |r: candle_higher::Result<Tensor>, what: &str| match r {
            Err(Error::UnsupportedDType { dtype, .. }) => assert_eq!(dtype, x.dtype(), "{what}"),
            Err(Error::DTypeMismatch { .. }) => {}
            other => panic!("{what} on {:?}: {other:?}", x.dtype()),
        };
        typed(lin.forward(&x), "Linear");
        typed(conv.forward(&x.reshape(&[1, 1, 2, 3]).unwrap()), "Conv2d");
        typed(bn.forward(&x), "BatchNorm");
        typed(ln.forward(&x), "LayerNorm");
        typed(lstm.forward(&x.reshape(&[2, 1, 3]).unwrap()), "LSTM");
        typed(drop.forward(&x), "Dropout");
        let labels = Tensor::from_slice(&[0u32, 2], &[2], &dev()).unwrap();
        typed(nn::cross_entropy(&x, &labels), "cross_entropy");
        typed(
            nn::binary_cross_entropy_with_logits(&x, &x),
            "bce_with_logits",
        );
    }
}

/// Unsigned arithmetic wraps as in PyTorch (candle's kernels panicked on overflow in debug
/// builds), and `/` of integer tensors is true division in f32, as PyTorch's `/` (candle
/// truncated, and panicked dividing by 0).
#[test]
fn integer_arithmetic_wraps_and_divides_as_pytorch() {
    let u8s = |v: &[u8]| Tensor::from_slice(v, &[v.len()], &dev()).unwrap();
    let u32s = |v: &[u32]| Tensor::from_slice(v, &[v.len()], &dev()).unwrap();
    let (a, b) = (u8s(&[200, 3, 16]), u8s(&[100, 5, 16]));
    assert_eq!(vals(&a.add(&b).unwrap()), vec![44.0, 8.0, 32.0]);
    assert_eq!(vals(&a.sub(&b).unwrap()), vec![100.0, 254.0, 0.0]);
    assert_eq!(vals(&a.mul(&b).unwrap()), vec![32.0, 15.0, 0.0]);
    assert_eq!(a.add(&b).unwrap().dtype(), DType::U8);
    let (c, d) = (u32s(&[u32::MAX, 0, 70_000]), u32s(&[1, 1, 70_000]));
    let want_mul = (70_000u64 * 70_000 % (1u64 << 32)) as f64;
    assert_eq!(vals(&c.add(&d).unwrap()), vec![0.0, 1.0, 140_000.0]);
    assert_eq!(
        vals(&c.sub(&d).unwrap()),
        vec![f64::from(u32::MAX - 1), f64::from(u32::MAX), 0.0]
    );
    assert_eq!(
        vals(&c.mul(&d).unwrap()),
        vec![f64::from(u32::MAX), 0.0, want_mul]
    );
    let i64s = |v: &[i64]| Tensor::from_slice(v, &[v.len()], &dev()).unwrap();
    let big = i64s(&[i64::MAX, i64::MIN, 3])
        .add(i64s(&[1, -1, -5]))
        .unwrap();
    assert_eq!(
        big.value().to_vec1::<i64>().unwrap(),
        vec![i64::MIN, i64::MAX, -2]
    );
    let prod = i64s(&[1 << 62]).mul(i64s(&[4])).unwrap();
    assert_eq!(prod.value().to_vec1::<i64>().unwrap(), vec![0]);
    // Sums of u8 and u32 are i64, as PyTorch's (a u8 sum of 200 + 100 overflowed).
    let s = a.sum_all().unwrap();
    assert_eq!((s.dtype(), vals(&s)), (DType::I64, vec![219.0]));
    let s = c.sum(0).unwrap();
    assert_eq!(
        (s.dtype(), vals(&s)),
        (DType::I64, vec![f64::from(u32::MAX) + 70_000.0])
    );
    // Broadcasting goes the same way.
    assert_eq!(vals(&a.sub(u8s(&[201])).unwrap()), vec![255.0, 58.0, 71.0]);
    for x in integer_tensors(&[3]) {
        let y = x.div(x.add(&x).unwrap()).unwrap();
        assert_eq!((y.dtype(), vals(&y)), (DType::F32, vec![0.5; 3]));
        let zero = x.sub(&x).unwrap();
        assert_eq!(vals(&x.div(&zero).unwrap()), vec![f64::INFINITY; 3]);
    }
}

#[test]
fn ops_that_are_defined_on_integers_still_work_on_them() {
    for x in integer_tensors(&[2, 3]) {
        let want = vals(&x);
        assert_eq!(vals(&x.relu().unwrap()), want);
        assert_eq!(vals(&x.abs().unwrap()), want);
        assert_eq!(
            vals(&x.add(&x).unwrap()),
            want.iter().map(|v| 2.0 * v).collect::<Vec<_>>()
        );
        let rowmax = x.max(1).unwrap();
        assert_eq!(rowmax.dtype(), x.dtype());
        assert_eq!(vals(&rowmax), vec![3.0, 5.0]);
    }
}

/// `[1, 2, 3] u32 * 0.5` gave `[0, 0, 0]`: a float constant on an integer tensor now
/// computes in f32, as PyTorch promotes `int_tensor * 0.5` to its default float dtype.
#[test]
fn float_constants_promote_integer_tensors_to_f32() {
    for x in integer_tensors(&[3]) {
        let v = vals(&x);
        let cases: Vec<(Tensor, Vec<f64>)> = vec![
            (x.mul(0.5).unwrap(), v.iter().map(|a| a * 0.5).collect()),
            (x.div(4.0).unwrap(), v.iter().map(|a| a / 4.0).collect()),
            (x.add(0.25).unwrap(), v.iter().map(|a| a + 0.25).collect()),
            (x.sub(1.5).unwrap(), v.iter().map(|a| a - 1.5).collect()),
            (
                x.affine(-0.5, 0.125).unwrap(),
                v.iter().map(|a| -0.5 * a + 0.125).collect(),
            ),
            (x.neg().unwrap(), v.iter().map(|a| -a).collect()),
        ];
        for (got, want) in cases {
            assert_eq!(got.dtype(), DType::F32, "from {:?}", x.dtype());
            assert_eq!(vals(&got), want, "from {:?}", x.dtype());
        }
    }
}

// ---------------------------------------------------------------------------------------
// Gradients and integer tensors.

#[test]
fn integer_leaves_cannot_get_gradients() {
    for x in integer_tensors(&[3]) {
        let leaf = x.to_leaf();
        let y = leaf
            .to_dtype(DType::F64)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        match grad(
            std::slice::from_ref(&y),
            std::slice::from_ref(&leaf),
            GradOptions::default(),
        ) {
            Err(Error::UnsupportedDType {
                op: "grad", dtype, ..
            }) => assert_eq!(dtype, x.dtype()),
            other => panic!("grad w.r.t. a {:?} leaf: {other:?}", x.dtype()),
        }
        match candle_higher::backward(&y) {
            Err(Error::UnsupportedDType {
                op: "backward",
                dtype,
                expected,
            }) => {
                assert_eq!(dtype, x.dtype());
                assert!(expected.contains("only floating point"), "{expected}");
            }
            other => panic!("backward through a {:?} leaf: {other:?}", x.dtype()),
        }
    }
}

#[test]
fn integer_results_of_ops_on_float_leaves_are_constants() {
    let x = t(&[0.5, 1.5, 2.5], &[3]).to_leaf();
    for dtype in [DType::U8, DType::U32, DType::I64] {
        let i = x.to_dtype(dtype).unwrap();
        assert!(!i.requires_grad(), "{dtype:?}");
        // So a float computed from it is a constant too, and x is reported unused.
        let y = i.to_dtype(DType::F64).unwrap().sum_all().unwrap();
        assert!(!y.requires_grad());
    }
}

/// `grad(y, [x, x])` gave the gradient at the first position only.
#[test]
fn an_input_listed_twice_gets_its_gradient_at_every_position() {
    let x = t(&[1.0, -2.0, 3.0], &[3]).to_leaf();
    let z = t(&[0.5], &[1]).to_leaf();
    let h = x.mul(&z).unwrap(); // an intermediate, also listed twice
    let y = h.sqr().unwrap().sum_all().unwrap(); // sum (x z)^2
    let g = grad(
        &[y],
        &[x.clone(), h.clone(), x.clone(), z.clone(), h.clone()],
        GradOptions::default(),
    )
    .unwrap();
    let g: Vec<Vec<f64>> = g.into_iter().map(|g| vals(&g.unwrap())).collect();
    // dy/dx = 2 x z^2, dy/dh = 2 h, dy/dz = 2 z sum x^2 = 2 * 0.5 * 14.
    let dx = vec![0.5, -1.0, 1.5];
    let dh = vec![1.0, -2.0, 3.0];
    assert_eq!(g, vec![dx.clone(), dh.clone(), dx, vec![14.0], dh]);
}

/// Outputs listed twice, or computed from one another, are seeded once per listing and
/// each op's VJP runs once: the gradient is that of the outputs' sum.
#[test]
fn outputs_listed_twice_or_nested_count_once_per_listing() {
    let x = t(&[1.0, -2.0, 3.0], &[3]).to_leaf();
    let a = x.sqr().unwrap().sum_all().unwrap(); // sum x^2
    let b = a.mul(3.0).unwrap();
    let g = grad(
        &[a.clone(), b, a],
        std::slice::from_ref(&x),
        GradOptions::default(),
    )
    .unwrap();
    // d/dx (a + 3a + a) = 5 * 2x.
    assert_eq!(vals(g[0].as_ref().unwrap()), vec![10.0, -20.0, 30.0]);
}

/// A diffopt over a list that holds one tensor twice steps both copies, each exactly as a
/// list holding it once would (it used to step the first copy only).
#[test]
fn a_diffopt_over_a_repeated_tensor_steps_both_copies() {
    use candle_higher::optim::{Adam, DiffOptimizer};
    let x = t(&[1.0, -2.0, 0.5], &[3]).to_leaf();
    let loss = |p: &[Tensor]| -> Tensor {
        // Depends on x once, whichever copy is read.
        p[0].sqr().unwrap().sum_all().unwrap()
    };
    let adam = Adam {
        lr: 0.1,
        ..Adam::default()
    };
    let mut once = DiffOptimizer::new(adam.clone(), std::slice::from_ref(&x)).unwrap();
    let mut twice = DiffOptimizer::new(adam, &[x.clone(), x.clone()]).unwrap();
    let (mut p1, mut p2) = (vec![x.clone()], vec![x.clone(), x.clone()]);
    let mut second_after_step_0 = None;
    for _ in 0..3 {
        p1 = once.step_params(&loss(&p1), &p1).unwrap();
        // The loss reads the first copy. At step 0 both positions hold x and both get its
        // gradient; afterwards they are separate tensors and only the first is reached.
        let l = loss(&p2);
        p2 = twice.step_params(&l, &p2).unwrap();
        assert_eq!(vals(&p2[0]), vals(&p1[0]));
        second_after_step_0.get_or_insert_with(|| (vals(&p2[1]), vals(&p1[0])));
    }
    let (second, first) = second_after_step_0.unwrap();
    assert_eq!(second, first, "the second copy took the same step 0");
    assert_ne!(second, vals(&x));
    assert_eq!(
        vals(&p2[1]),
        second,
        "not reached after step 0, so not stepped"
    );
}

// ---------------------------------------------------------------------------------------
// Out-of-range indices.

fn expect_out_of_range(r: candle_higher::Result<Tensor>, op: &str, index: i64, size: usize) {
    match r {
        Err(Error::IndexOutOfRange {
            op: o,
            index: i,
            size: s,
            ..
        }) => assert_eq!((o, i, s), (op, index, size)),
        other => panic!("{op} with index {index}: expected IndexOutOfRange, got {other:?}"),
    }
}

fn index(dtype: DType, values: &[i64]) -> Tensor {
    let v = Tensor::from_slice(values, &[values.len()], &dev()).unwrap();
    Tensor::new(v.value().to_dtype(dtype).unwrap())
}

#[test]
fn out_of_range_indices_are_errors_in_every_indexing_op() {
    let x = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 2]);
    let bad: Vec<(DType, i64)> = vec![
        (DType::U32, i64::from(u32::MAX)), // candle's "skip" value: zeros or a dropped update
        (DType::U32, 3),
        (DType::U8, 255), // selected row 0
        (DType::U8, 3),
        (DType::I64, 3),
        (DType::I64, -1),
        (DType::I64, i64::MAX),
    ];
    for (dtype, b) in bad {
        let idx = index(dtype, &[0, b]);
        expect_out_of_range(x.index_select(&idx, 0), "index_select", b, 3);
        let src = t(&[1.0; 4], &[2, 2]);
        expect_out_of_range(x.index_add(&idx, &src, 0), "index_add", b, 3);
        let idx2 = Tensor::new(idx.value().reshape((2, 1)).unwrap().repeat((1, 2)).unwrap());
        expect_out_of_range(x.gather(&idx2, 0), "gather", b, 3);
        expect_out_of_range(x.scatter_add(&idx2, &src, 0), "scatter_add", b, 3);
        // Along dim 1 the bound is 2.
        let col = Tensor::new(index(dtype, &[b, 0, 1]).value().reshape((3, 1)).unwrap());
        expect_out_of_range(x.gather(&col, 1), "gather", b, 2);
    }
}

#[test]
fn the_largest_index_of_a_dtype_selects_its_row_when_in_range() {
    // 300 rows: u8 255 is a valid index, and candle's u8 "skip" value.
    let data: Vec<f64> = (0..300).map(f64::from).collect();
    let x = Tensor::from_vec(data, &[300, 1], &dev()).unwrap().to_leaf();
    let idx = index(DType::U8, &[255, 0, 255]);
    let y = x.index_select(&idx, 0).unwrap();
    assert_eq!(vals(&y), vec![255.0, 0.0, 255.0]);
    let g = grad(&[y.sum_all().unwrap()], &[x], GradOptions::default()).unwrap()[0]
        .clone()
        .unwrap();
    let g = vals(&g);
    assert_eq!((g[255], g[0], g.iter().sum::<f64>()), (2.0, 1.0, 3.0));
    let src = t(&[1.0, 2.0, 4.0], &[3, 1]);
    let z = Tensor::zeros(&[300, 1], DType::F64, &dev()).unwrap();
    let added = vals(&z.index_add(&idx, &src, 0).unwrap());
    assert_eq!((added[255], added[0]), (5.0, 2.0));
}

#[test]
fn embedding_rejects_an_out_of_range_token() {
    let emb = nn::embedding(4, 3, vb(0)).unwrap();
    let tokens = index(DType::U32, &[1, 4]);
    match emb.forward(&tokens) {
        Err(Error::InvalidArgument {
            op: "Embedding",
            message,
        }) => {
            assert!(message.contains("label 4 at position 1"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// NaN propagates, as in PyTorch.

#[test]
fn relu_keeps_nan_and_maps_negative_infinity_to_zero() {
    for dtype in [DType::F32, DType::F64] {
        let x = t(
            &[f64::NAN, -1.0, 0.0, 2.0, f64::NEG_INFINITY, f64::INFINITY],
            &[6],
        )
        .to_dtype(dtype)
        .unwrap();
        let y = vals(&x.relu().unwrap());
        assert!(y[0].is_nan(), "{dtype:?}");
        assert_eq!(&y[1..], &[0.0, 0.0, 2.0, 0.0, f64::INFINITY]);
        // A non-contiguous view goes through the same rule.
        let xt = x.reshape(&[2, 3]).unwrap().t().unwrap();
        let yt = vals(&xt.relu().unwrap());
        assert!(yt[0].is_nan() && yt[1] == 2.0 && yt[4] == 0.0, "{yt:?}");
    }
}

#[test]
fn max_and_min_reductions_propagate_nan() {
    let x = t(&[1.0, f64::NAN, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
    for (y, clean) in [
        (x.max(1).unwrap(), 6.0),
        (x.min(1).unwrap(), 4.0),
        (x.max_keepdim(1).unwrap(), 6.0),
    ] {
        let y = vals(&y);
        assert!(y[0].is_nan(), "{y:?}");
        assert_eq!(y[1], clean);
    }
    let cols = vals(&x.max(0).unwrap());
    assert!(cols[1].is_nan());
    assert_eq!((cols[0], cols[2]), (4.0, 6.0));
}

#[test]
fn max_pool_propagates_nan_and_routes_its_gradient_there() {
    for dtype in [DType::F32, DType::F64] {
        #[rustfmt::skip]
        let x = t(&[
            1.0, 9.0, 2.0, 3.0,
            f64::NAN, 0.0, 4.0, 5.0,
        ], &[1, 1, 2, 4])
        .to_dtype(dtype)
        .unwrap()
        .to_leaf();
        let y = x.max_pool2d(2).unwrap();
        let v = vals(&y);
        assert!(v[0].is_nan(), "{dtype:?}: {v:?}");
        assert_eq!(v[1], 5.0);
        // The gradient goes to the window's NaN (PyTorch's argmax takes NaN as the maximum).
        let g = grad(
            &[y],
            &[x],
            GradOptions::default()
                .grad_outputs(vec![t(&[1.0, 1.0], &[1, 1, 1, 2]).to_dtype(dtype).unwrap()]),
        )
        .unwrap()[0]
            .clone()
            .unwrap();
        assert_eq!(
            vals(&g),
            vec![0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0],
            "{dtype:?}"
        );
    }
}

#[test]
fn maximum_and_minimum_propagate_nan_from_either_side() {
    let a = t(&[1.0, f64::NAN, 3.0], &[3]);
    let b = t(&[f64::NAN, 2.0, 1.0], &[3]);
    for (y, last) in [
        (a.maximum(&b).unwrap(), 3.0),
        (b.maximum(&a).unwrap(), 3.0),
        (a.minimum(&b).unwrap(), 1.0),
        (b.minimum(&a).unwrap(), 1.0),
    ] {
        let y = vals(&y);
        assert!(y[0].is_nan() && y[1].is_nan(), "{y:?}");
        assert_eq!(y[2], last);
    }
    // Broadcast right operand, and a NaN constant.
    let y = vals(&a.maximum(t(&[f64::NAN], &[1])).unwrap());
    assert!(y.iter().all(|v| v.is_nan()), "{y:?}");
    let y = vals(&t(&[1.0, 2.0], &[2]).minimum(f64::NAN).unwrap());
    assert!(y.iter().all(|v| v.is_nan()), "{y:?}");
    let y = vals(&a.clamp(0.0, 2.0).unwrap());
    assert!(y[1].is_nan() && y[0] == 1.0 && y[2] == 2.0, "{y:?}");
}

// ---------------------------------------------------------------------------------------
// Derivatives of integer powers at 0, at every order.

/// The derivatives of orders 1..=n of `f` at `x0`, each by our `grad` on the previous one
/// (an order whose input is no longer reached is exactly 0).
fn derivatives(f: impl Fn(&Tensor) -> Tensor, x0: f64, n: usize) -> Vec<f64> {
    let x = Tensor::scalar(x0).to_leaf();
    let mut y = f(&x);
    let mut out = Vec::new();
    for _ in 0..n {
        let g = grad(
            std::slice::from_ref(&y),
            std::slice::from_ref(&x),
            GradOptions::create_graph().allow_unused(true),
        )
        .unwrap()[0]
            .clone();
        match g {
            Some(g) => {
                out.push(g.to_scalar_f64().unwrap());
                y = g;
            }
            None => {
                out.push(0.0);
                y = Tensor::scalar(0.0f64);
            }
        }
    }
    out
}

/// Central difference of the derivative of order `k - 1` (computed by `grad`) at `x0`.
fn fd_of_order(f: &impl Fn(&Tensor) -> Tensor, x0: f64, k: usize) -> f64 {
    let h = 1e-4;
    let at = |x: f64| {
        if k == 1 {
            f(&Tensor::scalar(x)).to_scalar_f64().unwrap()
        } else {
            derivatives(f, x, k - 1)[k - 2]
        }
    };
    (at(x0 + h) - at(x0 - h)) / (2.0 * h)
}

fn check_against_fd(f: impl Fn(&Tensor) -> Tensor, x0: f64, analytic: &[f64]) {
    let got = derivatives(&f, x0, analytic.len());
    for (k, (&g, &a)) in got.iter().zip(analytic).enumerate() {
        let order = k + 1;
        assert!(g.is_finite(), "order {order} at {x0}: {g}");
        assert!(
            (g - a).abs() <= 1e-9 * a.abs().max(1.0),
            "order {order} at {x0}: {g} vs {a}"
        );
        let fd = fd_of_order(&f, x0, order);
        assert!(
            (g - fd).abs() <= 1e-6 * fd.abs().max(1.0),
            "order {order} at {x0}: {g} vs FD {fd}"
        );
    }
}

#[test]
fn integer_powers_have_finite_derivatives_of_every_order_at_zero() {
    // x^2: 2x, 2, 0, 0 (the third was NaN: 0 * 0^-1).
    check_against_fd(|x| x.sqr().unwrap(), 0.0, &[0.0, 2.0, 0.0, 0.0]);
    // x^3: 3x^2, 6x, 6, 0, 0 (the fourth was NaN).
    check_against_fd(|x| x.powf(3.0).unwrap(), 0.0, &[0.0, 0.0, 6.0, 0.0, 0.0]);
    // x^4 at 0: 0, 0, 0, 24, 0.
    check_against_fd(|x| x.powf(4.0).unwrap(), 0.0, &[0.0, 0.0, 0.0, 24.0, 0.0]);
    // x^0 = 1 everywhere: every derivative is 0, at 0 too (the first was NaN).
    for x0 in [0.0, 2.0, -3.0] {
        check_against_fd(|x| x.powf(0.0).unwrap(), x0, &[0.0, 0.0, 0.0]);
    }
    // x^3 away from 0, and x^-1 and x^-2 where they are smooth.
    check_against_fd(|x| x.powf(3.0).unwrap(), -1.5, &[6.75, -9.0, 6.0, 0.0]);
    check_against_fd(|x| x.powf(-1.0).unwrap(), 0.5, &[-4.0, 16.0, -96.0]);
    check_against_fd(|x| x.powf(-2.0).unwrap(), -0.5, &[16.0, 96.0, 768.0]);
}

/// At 0, `x^-1` is `inf` (it was `inf * sign(0) = NaN`) and its derivative `-x^-2` is
/// `-inf`, as PyTorch gives them (`torch.pow(0., -1)`, and its grad, `-inf`).
#[test]
fn reciprocal_power_at_zero_is_infinite_not_nan() {
    let x = Tensor::scalar(0.0f64).to_leaf();
    let y = x.powf(-1.0).unwrap();
    assert_eq!(y.to_scalar_f64().unwrap(), f64::INFINITY);
    let g = grad(&[y], std::slice::from_ref(&x), GradOptions::create_graph()).unwrap()[0]
        .clone()
        .unwrap();
    assert_eq!(g.to_scalar_f64().unwrap(), f64::NEG_INFINITY);
    let v = vals(&t(&[-2.0, 0.0, 2.0], &[3]).powf(-3.0).unwrap());
    assert_eq!(v, vec![-0.125, f64::INFINITY, 0.125]);
}

// ---------------------------------------------------------------------------------------
// Zero-size inputs give PyTorch's results.

#[test]
fn linear_with_no_input_features_gives_the_bias() {
    let lin = nn::linear(0, 3, vb(1)).unwrap();
    let x = Tensor::zeros(&[2, 0], DType::F64, &dev()).unwrap();
    let y = lin.forward(&x).unwrap();
    assert_eq!(y.dims(), &[2, 3]);
    let b = vals(lin.bias.as_ref().unwrap());
    assert_eq!(vals(&y), [b.clone(), b].concat());
    let w = lin.weight.clone();
    let bias = lin.bias.clone().unwrap();
    let g = grad(&[y.sum_all().unwrap()], &[w, bias], GradOptions::default()).unwrap();
    assert_eq!(g[0].as_ref().unwrap().dims(), &[3, 0]);
    assert_eq!(vals(g[1].as_ref().unwrap()), vec![2.0; 3]);
}

#[test]
fn linear_with_no_output_features_or_rows_is_empty() {
    let lin = nn::linear(4, 0, vb(1)).unwrap();
    let x = t(&[1.0; 8], &[2, 4]).to_leaf();
    let y = lin.forward(&x).unwrap();
    assert_eq!(y.dims(), &[2, 0]);
    let g = grad(&[y.sum_all().unwrap()], &[x], GradOptions::default()).unwrap()[0]
        .clone()
        .unwrap();
    assert_eq!(vals(&g), vec![0.0; 8]);
    let lin = nn::linear(4, 3, vb(1)).unwrap();
    let y = lin
        .forward(&Tensor::zeros(&[0, 4], DType::F64, &dev()).unwrap())
        .unwrap();
    assert_eq!(y.dims(), &[0, 3]);
    let e = Tensor::zeros(&[2, 0], DType::F64, &dev()).unwrap();
    let p = e
        .matmul(&Tensor::zeros(&[0, 5], DType::F64, &dev()).unwrap())
        .unwrap();
    assert_eq!((p.dims(), vals(&p)), (&[2usize, 5][..], vec![0.0; 10]));
}

#[test]
fn conv_with_no_output_channels_or_batch_is_empty() {
    let conv = nn::conv2d(2, 0, 3, ConvConfig::default(), vb(2)).unwrap();
    let x = t(&[0.5; 2 * 2 * 5 * 5], &[2, 2, 5, 5]).to_leaf();
    let y = conv.forward(&x).unwrap();
    assert_eq!(y.dims(), &[2, 0, 3, 3]);
    let g = grad(&[y.sum_all().unwrap()], &[x], GradOptions::default()).unwrap()[0]
        .clone()
        .unwrap();
    assert_eq!(vals(&g), vec![0.0; 100]);
    let conv = nn::conv2d(
        2,
        4,
        3,
        ConvConfig {
            padding: 1,
            ..Default::default()
        },
        vb(2),
    )
    .unwrap();
    let y = conv
        .forward(&Tensor::zeros(&[0, 2, 5, 5], DType::F64, &dev()).unwrap())
        .unwrap();
    assert_eq!(y.dims(), &[0, 4, 5, 5]);
    let conv = nn::conv1d(2, 0, 3, ConvConfig::default(), vb(2)).unwrap();
    let y = conv.forward(&t(&[1.0; 10], &[1, 2, 5])).unwrap();
    assert_eq!(y.dims(), &[1, 0, 3]);
}

#[test]
fn conv_with_an_empty_kernel_or_overflowing_sizes_is_an_error() {
    let x = t(&[1.0; 16], &[1, 1, 4, 4]);
    let empty = Tensor::zeros(&[1, 1, 0, 2], DType::F64, &dev()).unwrap();
    assert!(matches!(
        x.conv2d(&empty, 0, 1, 1, 1),
        Err(Error::ShapeMismatch { op: "conv2d", .. })
    ));
    let k = t(&[1.0; 4], &[1, 1, 2, 2]);
    for (padding, dilation) in [
        (usize::MAX, 1),
        (usize::MAX / 2 + 1, 1),
        (0, usize::MAX),
        (1, usize::MAX / 2),
    ] {
        match x.conv2d(&k, padding, 1, dilation, 1) {
            Err(Error::InvalidArgument {
                op: "conv2d",
                message,
            }) => {
                assert!(message.contains("overflows"), "{message}");
            }
            Err(Error::ShapeMismatch { op: "conv2d", .. }) if dilation > 1 && padding > 0 => {}
            other => panic!("padding {padding} dilation {dilation}: {other:?}"),
        }
    }
    let x1 = t(&[1.0; 4], &[1, 1, 4]);
    let k1 = t(&[1.0; 2], &[1, 1, 2]);
    assert!(x1.conv1d(&k1, usize::MAX, 1, 1, 1).is_err());
    assert!(x1.conv1d(&k1, 0, 1, usize::MAX, 1).is_err());
    // Groups whose product with the kernel's channels overflows.
    assert!(x.conv2d(&k, 0, 1, 1, usize::MAX).is_err());
    assert!(nn::conv2d(2, 4, 0, ConvConfig::default(), vb(0))
        .and_then(|c| c.forward(&t(&[1.0; 32], &[1, 2, 4, 4])))
        .is_err());
}

#[test]
fn sizes_that_overflow_are_errors() {
    let x = t(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
    for (start, len) in [
        (usize::MAX, 2),
        (1, usize::MAX),
        (usize::MAX, usize::MAX),
        (2, 1),
    ] {
        match x.narrow(0, start, len) {
            Err(Error::InvalidArgument { op: "narrow", .. }) => {}
            other => panic!("narrow({start}, {len}): {other:?}"),
        }
    }
    // [2^63, 2] has 2^64 elements, which wraps to 0 = the element count of an empty tensor.
    let empty = Tensor::zeros(&[0], DType::F64, &dev()).unwrap();
    let big = 1usize << (usize::BITS - 1);
    // Nonzero dims whose product overflows cannot be laid out either, even beside a 0.
    for shape in [
        vec![big, 2],
        vec![usize::MAX, usize::MAX],
        vec![big, 2, 0],
        vec![0, big, 2],
    ] {
        let r = empty.reshape(&shape);
        assert!(
            matches!(r, Err(Error::ShapeMismatch { op: "reshape", .. })),
            "{shape:?}"
        );
    }
    assert_eq!(empty.reshape(&[big, 0]).unwrap().dims(), &[big, 0]);
    // Views and constructors of such shapes (candle panicked computing their sizes).
    let one = t(&[1.0], &[1, 1]);
    for shape in [vec![usize::MAX, 2], vec![big, 2, 1], vec![3, big, 0, 2]] {
        let layout_error = |r: candle_higher::Result<Tensor>, op: &str| match r {
            Err(Error::InvalidArgument { op: o, message }) => {
                assert_eq!(o, op);
                assert!(
                    message.contains("more than usize::MAX elements"),
                    "{message}"
                );
            }
            other => panic!("{op} {shape:?}: {other:?}"),
        };
        layout_error(one.broadcast_as(&shape), "broadcast_as");
        layout_error(Tensor::zeros(&shape, DType::F64, &dev()), "zeros");
        layout_error(Tensor::ones(&shape, DType::F32, &dev()), "ones");
        layout_error(Tensor::full(2.0, &shape, DType::F64, &dev()), "full");
        layout_error(Tensor::from_slice(&[1.0f64], &shape, &dev()), "from_slice");
        layout_error(Tensor::from_vec(vec![1u32], &shape, &dev()), "from_vec");
    }
    // Padding the empty dim of [0, 2^62] would need 2^62 f64s; padding the other one past
    // usize::MAX cannot be laid out; padding it a little is an empty result.
    let wide = empty.reshape(&[0, big / 2]).unwrap();
    for (dim, l, r) in [(0, 1, 0), (1, big, big)] {
        match wide.pad_with_zeros(dim, l, r) {
            Err(Error::InvalidArgument {
                op: "pad_with_zeros",
                ..
            }) => {}
            other => panic!("pad {dim} {l} {r}: {other:?}"),
        }
    }
    assert_eq!(
        wide.pad_with_zeros(1, 1, 2).unwrap().dims(),
        &[0, big / 2 + 3]
    );
    // Constructors refuse what cannot be allocated instead of panicking in the allocator.
    assert!(Tensor::zeros(&[big / 4], DType::F64, &dev()).is_err());
    assert!(Tensor::ones(&[2, big / 8], DType::F32, &dev()).is_err());
    assert!(matches!(
        x.reshape(&[usize::MAX, 4]),
        Err(Error::ShapeMismatch { .. })
    ));
    for (l, r) in [
        (usize::MAX, 1),
        (1, usize::MAX),
        (usize::MAX / 2, usize::MAX / 2),
    ] {
        assert!(matches!(
            x.pad_with_zeros(1, l, r),
            Err(Error::InvalidArgument {
                op: "pad_with_zeros",
                ..
            })
        ));
    }
}

// ---------------------------------------------------------------------------------------
// Shapes of layers and their states.

#[test]
fn recurrent_layers_reject_zero_layers_or_hidden_units() {
    for build in [nn::lstm, nn::gru, nn::rnn] {
        assert!(matches!(
            build(3, 4, 0, vb(0)),
            Err(Error::InvalidArgument {
                op: "Recurrent",
                ..
            })
        ));
        assert!(matches!(
            build(3, 0, 1, vb(0)),
            Err(Error::InvalidArgument { .. })
        ));
    }
}

#[test]
fn recurrent_states_of_another_batch_or_size_are_errors() {
    let x = t(&[0.1; 5 * 2 * 3], &[5, 2, 3]); // [seq, batch 2, input 3]
    let lstm = nn::lstm(3, 4, 2, vb(0)).unwrap();
    let state = |batch: usize, hidden: usize, with_c: bool| nn::CellState {
        h: Tensor::zeros(&[batch, hidden], DType::F64, &dev()).unwrap(),
        c: with_c.then(|| Tensor::zeros(&[batch, hidden], DType::F64, &dev()).unwrap()),
    };
    let ok = lstm.forward_with_state(&x, Some(vec![state(2, 4, true), state(2, 4, true)]));
    assert!(ok.is_ok());
    for bad in [
        vec![state(1, 4, true), state(2, 4, true)], // batch 1 broadcast silently
        vec![state(2, 4, true), state(3, 4, true)],
        vec![state(2, 5, true), state(2, 4, true)],
        vec![
            nn::CellState {
                h: Tensor::zeros(&[2, 4], DType::F64, &dev()).unwrap(),
                c: Some(Tensor::zeros(&[1, 4], DType::F64, &dev()).unwrap()),
            },
            state(2, 4, true),
        ],
        vec![state(2, 4, false), state(2, 4, true)],
    ] {
        let err = lstm.forward_with_state(&x, Some(bad)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::ShapeMismatch {
                    op: "RecurrentCell",
                    ..
                } | Error::InvalidArgument {
                    op: "RecurrentCell",
                    ..
                }
            ),
            "{err}"
        );
    }
    let gru = nn::gru(3, 4, 1, vb(0)).unwrap();
    assert!(gru
        .forward_with_state(&x, Some(vec![state(2, 4, true)]))
        .is_err());
    assert!(gru
        .forward_with_state(&x, Some(vec![state(1, 4, false)]))
        .is_err());
    let cell = nn::lstm_cell(3, 4, vb(0)).unwrap();
    assert!(cell
        .step(&t(&[0.0; 6], &[2, 3]), &state(1, 4, true))
        .is_err());
}

#[test]
fn batch_norm_in_training_needs_more_than_one_value_per_channel() {
    let bn1 = nn::batch_norm1d(3, nn::BatchNormConfig::default(), vb(0)).unwrap();
    let bn2 = nn::batch_norm2d(3, nn::BatchNormConfig::default(), vb(0)).unwrap();
    let running = |bn: &nn::BatchNorm| (vals(&bn.running_mean.get()), vals(&bn.running_var.get()));
    let before = (running(&bn1), running(&bn2));
    for (bn, shape) in [
        (&bn1, vec![1, 3]),
        (&bn1, vec![0, 3]),
        (&bn1, vec![1, 3, 1]),
        (&bn2, vec![1, 3, 1, 1]),
        (&bn2, vec![0, 3, 2, 2]),
    ] {
        let x = Tensor::ones(&shape, DType::F64, &dev()).unwrap();
        match bn.forward(&x) {
            Err(Error::ShapeMismatch {
                op: "BatchNorm",
                expected,
                got,
            }) => {
                assert!(
                    expected.contains("more than 1 value per channel"),
                    "{expected}"
                );
                assert_eq!(got, shape);
            }
            other => panic!("{shape:?}: {other:?}"),
        }
    }
    // Nothing moved, nothing became NaN.
    assert_eq!((running(&bn1), running(&bn2)), before);
    // Two values per channel are enough: one sample of length 2, or a 1x2 image.
    assert!(bn1
        .forward(&t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[1, 3, 2]))
        .is_ok());
    assert!(bn2
        .forward(&t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[1, 3, 1, 2]))
        .is_ok());
    // In eval mode one sample is fine, as in PyTorch.
    let mut bn = nn::batch_norm1d(3, nn::BatchNormConfig::default(), vb(0)).unwrap();
    bn.train(false).unwrap();
    assert!(bn.forward(&t(&[1.0, 2.0, 3.0], &[1, 3])).is_ok());
}

// ---------------------------------------------------------------------------------------
// Non-finite values: detect_anomaly, and loading.

fn non_finite_message(r: candle_higher::Result<Tensor>) -> String {
    match r {
        Err(e @ Error::NonFinite { .. }) => e.to_string(),
        other => panic!("expected NonFinite, got {other:?}"),
    }
}

#[test]
fn anomaly_mode_is_off_by_default_and_scoped() {
    assert!(!is_anomaly_enabled());
    let zero = t(&[0.0, 1.0], &[2]);
    assert!(zero.log().is_ok());
    {
        let _outer = detect_anomaly();
        assert!(is_anomaly_enabled());
        {
            let _inner = detect_anomaly();
        }
        assert!(
            is_anomaly_enabled(),
            "an inner guard restores the outer mode"
        );
        // Other threads are not affected.
        std::thread::spawn(|| assert!(!is_anomaly_enabled()))
            .join()
            .unwrap();
        assert!(zero.log().is_err());
    }
    assert!(!is_anomaly_enabled());
    assert!(zero.log().is_ok());
}

#[test]
fn anomaly_mode_names_the_first_forward_op_with_its_shapes() {
    let _guard = detect_anomaly();
    let x = t(&[1.0, 0.0, 2.0, 3.0], &[2, 2]).to_leaf();
    let msg = non_finite_message(x.log());
    assert!(
        msg.contains("forward of log") && msg.contains("[2, 2]"),
        "{msg}"
    );
    let msg = non_finite_message(x.div(t(&[1.0, 0.0], &[2])));
    assert!(
        msg.contains("div") && msg.contains("[[2, 2], [2]]"),
        "{msg}"
    );
    let msg = non_finite_message(x.affine(1e308, 0.0).and_then(|y| y.mul(10.0)));
    assert!(msg.contains("affine"), "{msg}");
    // Finite results pass, in every dtype; integer results are never flagged.
    assert!(x.exp().is_ok());
    assert!(t(&[1.0], &[1]).to_dtype(DType::F32).unwrap().sqrt().is_ok());
    assert!(Tensor::from_slice(&[1u32, 2], &[2], &dev())
        .unwrap()
        .add(1.5)
        .is_ok());
    // Also without recording (constants, no_grad).
    let _ng = candle_higher::no_grad();
    assert!(t(&[-1.0], &[1]).sqrt().is_err());
}

#[test]
fn anomaly_mode_names_the_backward_op_that_made_a_gradient_non_finite() {
    let x = t(&[0.0, 4.0], &[2]).to_leaf();
    // x^0.5 is finite at 0; its derivative 0.5 x^-0.5 is not.
    let y = x.powf(0.5).unwrap().sum_all().unwrap();
    // Off: the inf passes silently.
    let g = grad(
        std::slice::from_ref(&y),
        std::slice::from_ref(&x),
        GradOptions::default(),
    )
    .unwrap()[0]
        .clone()
        .unwrap();
    assert_eq!(vals(&g)[0], f64::INFINITY);
    let _guard = detect_anomaly();
    for create_graph in [false, true] {
        let opts = GradOptions {
            create_graph,
            ..GradOptions::default()
        };
        let err = grad(std::slice::from_ref(&y), std::slice::from_ref(&x), opts).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::NonFinite { .. }), "{msg}");
        assert!(msg.contains("backward of powf"), "{msg}");
        assert!(msg.contains("[2]"), "{msg}");
    }
    assert!(candle_higher::backward(&y).is_err());
    // The safe sqrt stays finite at 0 at every order, so anomaly mode is quiet.
    let z = x.sqrt().unwrap().sum_all().unwrap();
    let dz = grad(&[z], std::slice::from_ref(&x), GradOptions::create_graph()).unwrap()[0]
        .clone()
        .unwrap();
    assert!(grad(&[dz.sum_all().unwrap()], &[x], GradOptions::default()).is_ok());
}

#[test]
fn loading_non_finite_weights_is_an_error_naming_them_and_loads_nothing() {
    let mut model = nn::seq()
        .add(nn::linear(2, 3, vb(0).pp("0")).unwrap())
        .add(nn::batch_norm1d(3, nn::BatchNormConfig::default(), vb(0).pp("1")).unwrap());
    let before = model.parameters().unwrap();
    let good = nn::state_dict(&model).unwrap();
    let mut bad: HashMap<String, candle_core::Tensor> = good.clone();
    let poison = |v: f64, shape: &[usize]| {
        let n: usize = shape.iter().product();
        let mut data = vec![0.5; n];
        data[n - 1] = v;
        candle_core::Tensor::from_vec(data, shape, &dev()).unwrap()
    };
    bad.insert("0.weight".into(), poison(f64::NAN, &[3, 2]));
    bad.insert("1.running_var".into(), poison(f64::INFINITY, &[3]));
    let err = nn::load_state_dict(&mut model, &bad, "ckpt.safetensors").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::NonFinite { .. }), "{msg}");
    assert!(
        msg.contains("0.weight") && msg.contains("1.running_var"),
        "{msg}"
    );
    assert!(
        msg.contains("ckpt.safetensors") && !msg.contains("0.bias"),
        "{msg}"
    );
    let after = model.parameters().unwrap();
    for (a, b) in before.iter().zip(&after) {
        assert_eq!(a.id(), b.id(), "nothing was replaced");
    }
    // Also from a file, through save and load.
    let dir = std::env::temp_dir().join(format!("adversarial_ops_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.safetensors");
    candle_core::safetensors::save(&bad, &path).unwrap();
    assert!(matches!(
        nn::load_safetensors(&mut model, &path),
        Err(Error::NonFinite { .. })
    ));
    std::fs::remove_dir_all(&dir).ok();
    assert!(nn::load_state_dict(&mut model, &good, "good").is_ok());
}
