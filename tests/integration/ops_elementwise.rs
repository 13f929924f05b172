//! Finite-difference checks (first and second order, in the suites' dtype: f64 unless
//! `common::dtype()` says f32) of the elementwise ops, including PyTorch broadcasting, and
//! the safe square root at and near zero.

use crate::common::*;
use candle_higher::{grad, GradOptions};

#[test]
fn arithmetic_same_shape() {
    let mut r = rng(1);
    let xs = [randn(&mut r, &[2, 3]), uniform(&mut r, &[2, 3], 0.5, 2.0)];
    check12("add", |x| x[0].add(&x[1]), &xs);
    check12("sub", |x| x[0].sub(&x[1]), &xs);
    check12("mul", |x| x[0].mul(&x[1]), &xs);
    check12("div", |x| x[0].div(&x[1]), &xs);
    // The SGD update as one op, and its second order through products.
    check12("sub_scaled", |x| x[0].sub_scaled(&x[1], 0.3), &xs);
    check12(
        "sub_scaled squared",
        |x| x[0].sub_scaled(&x[1].mul(&x[0])?, -1.7)?.sqr(),
        &xs,
    );
    // A tensor alpha (a learned rate) keeps its path: the composed ops.
    let with_rate = [xs[0].clone(), xs[1].clone(), uniform(&mut r, &[], 0.1, 0.5)];
    check12(
        "sub_scaled by a tensor",
        |x| x[0].sub_scaled(&x[1], x[2].clone())?.sqr(),
        &with_rate,
    );
    // Other operands take the composed ops: broadcasting, and their errors.
    let row = uniform(&mut r, &[3], 0.5, 2.0);
    let composed = xs[0].sub(row.mul(0.3).unwrap()).unwrap();
    let broadcast = xs[0].sub_scaled(&row, 0.3).unwrap();
    assert_eq!(
        broadcast.to_vec_f64().unwrap(),
        composed.to_vec_f64().unwrap()
    );
    let ints = candle_higher::Tensor::from_slice(&[1u32, 2, 3], &[3], &candle_higher::Device::Cpu)
        .unwrap();
    let as_values = |t: candle_higher::Result<candle_higher::Tensor>| {
        t.map(|t| t.to_vec_f64().unwrap())
            .map_err(|e| e.to_string())
    };
    assert_eq!(
        as_values(ints.sub_scaled(&ints, 0.5)),
        as_values(ints.sub(ints.mul(0.5).unwrap()))
    );
    let wrong = uniform(&mut r, &[4], 0.5, 2.0);
    let err = xs[0].sub_scaled(&wrong, 0.3).unwrap_err();
    assert_eq!(
        err.to_string(),
        xs[0].sub(wrong.mul(0.3).unwrap()).unwrap_err().to_string()
    );
}

#[test]
fn arithmetic_scalar_vs_matrix() {
    let mut r = rng(2);
    let xs = [
        uniform(&mut r, &[], 0.5, 2.0),
        uniform(&mut r, &[2, 3], 0.5, 2.0),
    ];
    check12("add [] [2,3]", |x| x[0].add(&x[1]), &xs);
    check12("sub [2,3] []", |x| x[1].sub(&x[0]), &xs);
    check12("mul [] [2,3]", |x| x[0].mul(&x[1]), &xs);
    check12("div [] [2,3]", |x| x[0].div(&x[1]), &xs);
    check12("div [2,3] []", |x| x[1].div(&x[0]), &xs);
}

#[test]
fn arithmetic_column_vs_row() {
    let mut r = rng(3);
    let xs = [
        uniform(&mut r, &[3, 1], 0.5, 2.0),
        uniform(&mut r, &[4], 0.5, 2.0),
    ];
    check12("add [3,1] [4]", |x| x[0].add(&x[1]), &xs);
    check12("sub [4] [3,1]", |x| x[1].sub(&x[0]), &xs);
    check12("mul [3,1] [4]", |x| x[0].mul(&x[1]), &xs);
    check12("div [3,1] [4]", |x| x[0].div(&x[1]), &xs);
    check12("div [4] [3,1]", |x| x[1].div(&x[0]), &xs);
}

#[test]
fn float_operands_and_operators() {
    let mut r = rng(4);
    let xs = [uniform(&mut r, &[2, 3], 0.5, 2.0)];
    check12("add f", |x| x[0].add(1.5), &xs);
    check12("sub f", |x| x[0].sub(1.5), &xs);
    check12("mul f", |x| x[0].mul(-2.5), &xs);
    check12("div f", |x| x[0].div(4.0), &xs);
    check12("f - x", |x| 2.0 - &x[0], &xs);
    check12("f / x", |x| 2.0 / &x[0], &xs);
    check12("neg", |x| x[0].neg(), &xs);
    check12("affine", |x| x[0].affine(-1.5, 0.25), &xs);
}

/// A float operand rounds as a tensor operand does (and as torch's `x / 0.3`): `x / d` is
/// one division, not `x * (1 / d)`, and `x * d` keeps the sign of a zero; the same for
/// their derivatives. f32 and f64, below and above the size where candle's kernels take
/// over from the crate's loops.
#[test]
fn float_operands_round_as_tensor_operands() {
    use candle_higher::{DType, Device, Tensor};
    let values = [-0.0, 0.0, 1.0, -3.0, 0.1, 7.3, 1e-30, -123.456, 2.5e7];
    for dtype in [DType::F64, DType::F32] {
        for len in [values.len(), 70_000] {
            let data: Vec<f64> = values.iter().cycle().take(len).copied().collect();
            let x = Tensor::from_vec(data, &[len], &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
                .to_leaf();
            for d in [0.3, 3.0, -0.7, 1e-3, 49.0] {
                let dt = Tensor::full_scalar(d, dtype, &Device::Cpu).unwrap();
                for (op, by_float, by_tensor) in [
                    ("div", x.div(d).unwrap(), x.div(&dt).unwrap()),
                    ("mul", x.mul(d).unwrap(), x.mul(&dt).unwrap()),
                ] {
                    let what = format!("{op} by {d} ({dtype:?}, {len} elements)");
                    assert_eq!(bits(&by_float), bits(&by_tensor), "{what}");
                    // The VJP with an upstream of signed zeros and other values.
                    let upstream = x.detach();
                    let gf = grad(
                        std::slice::from_ref(&by_float),
                        std::slice::from_ref(&x),
                        GradOptions::default().grad_outputs(vec![upstream.clone()]),
                    )
                    .unwrap();
                    let gt = grad(
                        std::slice::from_ref(&by_tensor),
                        std::slice::from_ref(&x),
                        GradOptions::default().grad_outputs(vec![upstream.clone()]),
                    )
                    .unwrap();
                    assert_eq!(
                        bits(gf[0].as_ref().unwrap()),
                        bits(gt[0].as_ref().unwrap()),
                        "d/dx of {what}"
                    );
                }
            }
            let q = x.div(0.3).unwrap().to_vec_f64().unwrap();
            let expected: Vec<f64> = x
                .to_vec_f64()
                .unwrap()
                .iter()
                .map(|&v| match dtype {
                    DType::F32 => f64::from(v as f32 / 0.3f32),
                    _ => v / 0.3,
                })
                .collect();
            let same = q
                .iter()
                .zip(&expected)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "x / 0.3 is one rounding of the quotient ({dtype:?})");
            let negated_zero = x.mul(2.0).unwrap().to_vec_f64().unwrap()[0];
            assert!(negated_zero == 0.0 && negated_zero.is_sign_negative());
        }
    }
}

#[test]
fn powf() {
    let mut r = rng(5);
    let pos = [uniform(&mut r, &[2, 3], 0.5, 2.0)];
    let any = [away_from_zero(&mut r, &[2, 3])];
    check12("powf 2", |x| x[0].powf(2.0), &any);
    check12("powf 3", |x| x[0].powf(3.0), &any);
    check12("powf 0.5", |x| x[0].powf(0.5), &pos);
    check12("powf -1.5", |x| x[0].powf(-1.5), &pos);
    check12("sqr", |x| x[0].sqr(), &any);
    // x^3 keeps the sign of x: (-2)^3 = -8.
    let y = t(&[-2.0], &[1]).powf(3.0).unwrap();
    assert_eq!(y.to_vec_f64().unwrap(), vec![-8.0]);
}

/// A tensor exponent (`Tensor::pow`) gives `f64::powf`'s values: to the bit on the CPU
/// pass, and with candle's kernels (the path other devices take) its special cases exactly
/// and the rest within rounding; broadcasting a `[2, 1]` base against a `[3]` exponent.
#[test]
fn a_tensor_exponent_gives_powf() {
    let bases = [
        -2.0,
        -1.0,
        -0.5,
        -0.0,
        0.0,
        0.5,
        1.0,
        3.0,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
        1e-300,
    ];
    let exponents = [
        0.0,
        1.0,
        2.0,
        3.0,
        -1.0,
        -3.0,
        0.5,
        -0.5,
        2.5,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
    ];
    let (xs, es): (Vec<f64>, Vec<f64>) = bases
        .iter()
        .flat_map(|&x| exponents.iter().map(move |&e| (x, e)))
        .unzip();
    let n = xs.len();
    let (x, e) = (t(&xs, &[n]), t(&es, &[n]));
    let got = x.pow(&e).unwrap().to_vec_f64().unwrap();
    let exact = candle_higher::cpu_fast_paths();
    // `powf` in the tensors' dtype (f32 in the suite's f32 run), of the values they hold.
    let f32 = x.dtype() == candle_higher::DType::F32;
    let (xs, es) = (x.to_vec_f64().unwrap(), e.to_vec_f64().unwrap());
    for ((&x, &e), &g) in xs.iter().zip(&es).zip(&got) {
        let want = if f32 {
            f64::from((x as f32).powf(e as f32))
        } else {
            x.powf(e)
        };
        let same = if exact || want == 0.0 || !want.is_finite() {
            g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan())
        } else {
            close(g, want, value_tol(1e-12))
        };
        assert!(same, "{x}^{e}: {g}, f64::powf {want}");
    }
    let base = t(&[2.0, 0.5], &[2, 1]);
    let y = base.pow(&t(&[1.0, -2.0, 0.5], &[3])).unwrap();
    assert_eq!(y.dims(), &[2, 3]);
    let want = [2.0, 0.25, 2f64.sqrt(), 0.5, 4.0, 0.5f64.sqrt()];
    for (g, w) in y.to_vec_f64().unwrap().iter().zip(want) {
        assert!(close(*g, w, value_tol(1e-12)), "{g} against {w}");
    }
}

/// `x^e` with both sides differentiable, at first and second order, against finite
/// differences; at `x = 0` the derivatives follow PyTorch (`d/de = 0` for `e >= 0`, and
/// `d/dx = 0` for `e = 0`).
#[test]
fn a_tensor_exponent_differentiates() {
    let mut r = rng(8);
    let inputs = [
        uniform(&mut r, &[2, 3], 0.5, 2.0),
        uniform(&mut r, &[2, 3], -1.5, 2.5),
    ];
    check12("pow", |x| x[0].pow(&x[1]), &inputs);
    let broadcast = [
        uniform(&mut r, &[2, 1], 0.5, 2.0),
        uniform(&mut r, &[3], -1.0, 2.0),
    ];
    check12("pow broadcast", |x| x[0].pow(&x[1]), &broadcast);
    let x = t(&[0.0, 0.0, 2.0], &[3]).to_leaf();
    let e = t(&[2.0, 0.0, 0.0], &[3]).to_leaf();
    let y = x.pow(&e).unwrap().sum_all().unwrap();
    let g = candle_higher::grad(&[y], &[x, e], Default::default()).unwrap();
    let (dx, de) = (
        g[0].as_ref().unwrap().to_vec_f64().unwrap(),
        g[1].as_ref().unwrap().to_vec_f64().unwrap(),
    );
    // d/dx: 2 * 0^1 = 0, 0 (e = 0), 0 (e = 0); d/de: 0, 0 (x = 0, e >= 0), 2^0 ln 2.
    assert_eq!(dx, vec![0.0, 0.0, 0.0]);
    assert_eq!(de[..2], [0.0, 0.0]);
    assert!(close(de[2], 2f64.ln(), value_tol(1e-12)));
}

/// An integer power has `f64::powf`'s sign and special values at every size: small CPU
/// tensors take `f64::powf` itself, larger ones (and candle's kernels) `|x|^n` with the
/// sign of `x`'s sign bit, so `(-0.0)^3` is `-0.0` and `(-0.0)^-3` is `-inf` there too.
#[test]
fn integer_powers_keep_the_sign_of_negative_zero() {
    let specials = [
        -0.0,
        0.0,
        f64::NEG_INFINITY,
        f64::INFINITY,
        -2.0,
        2.0,
        -0.5,
        f64::NAN,
    ];
    for len in [specials.len(), 70_000] {
        let xs: Vec<f64> = specials.iter().copied().cycle().take(len).collect();
        let x = t(&xs, &[len]);
        for e in [3.0, -3.0, 2.0, -2.0, 1.0, -1.0, 5.0] {
            let got = x.powf(e).unwrap().to_vec_f64().unwrap();
            for (&v, &g) in xs.iter().zip(&got) {
                let want = v.powf(e);
                let same = if want.is_nan() {
                    g.is_nan()
                } else if want == 0.0 || want.is_infinite() {
                    g.to_bits() == want.to_bits()
                } else {
                    g.is_sign_negative() == want.is_sign_negative()
                        && close(g, want, value_tol(1e-12))
                };
                assert!(same, "{v}^{e} at {len} elements: {g}, f64::powf {want}");
            }
        }
    }
}

#[test]
fn unary_smooth() {
    let mut r = rng(6);
    let any = [randn(&mut r, &[2, 3])];
    let pos = [uniform(&mut r, &[2, 3], 0.2, 3.0)];
    check12("exp", |x| x[0].exp(), &any);
    check12("log", |x| x[0].log(), &pos);
    check12("sqrt", |x| x[0].sqrt(), &pos);
    check12("tanh", |x| x[0].tanh(), &any);
    check12("sigmoid", |x| x[0].sigmoid(), &any);
    check12("erf", |x| x[0].erf(), &any);
    check12("gelu", |x| x[0].affine(2.0, 0.0)?.gelu(), &any);
    check12("elu", |x| x[0].affine(2.0, 0.0)?.elu(0.7), &any);
    check12("safe_recip", |x| x[0].safe_recip(), &pos);
}

#[test]
fn unary_piecewise() {
    let mut r = rng(7);
    let xs = [away_from_zero(&mut r, &[2, 4])];
    check12("abs", |x| x[0].abs(), &xs);
    check12("relu", |x| x[0].relu(), &xs);
    check12("leaky_relu", |x| x[0].leaky_relu(0.1), &xs);
    check12("sign (no gradient)", |x| x[0].sign()?.mul(&x[0]), &xs);
    check12("softplus", |x| x[0].affine(3.0, 0.0)?.softplus(), &xs);
    // Inputs on both sides of softplus's threshold (20): x itself above it.
    let wide = [t(&[-30.0, -5.0, 0.3, 19.0, 21.0, 40.0], &[6])];
    check12("softplus wide", |x| x[0].softplus(), &wide);
}

#[test]
fn activation_values() {
    let x = t(&[-1.0, 0.0, 2.0], &[3]);
    // leaky_relu(x, 0.1) = (-0.1, 0, 2); elu(x, 1) = (e^-1 - 1, 0, 2).
    let leaky = x.leaky_relu(0.1).unwrap().to_vec_f64().unwrap();
    assert!(close(leaky[0], -0.1, value_tol(0.0)) && leaky[1..] == [0.0, 2.0]);
    let elu = x.elu(1.0).unwrap().to_vec_f64().unwrap();
    let elu_at_minus_one = (-1.0f64).exp() - 1.0;
    assert!(close(elu[0], elu_at_minus_one, value_tol(1e-15)) && elu[1] == 0.0 && elu[2] == 2.0);
    // gelu(x) = x (1 + erf(x / sqrt 2)) / 2; gelu(2) = 1.9544997361036416 (erf(sqrt 2)
    // = 0.9544997361036416).
    let gelu = x.gelu().unwrap().to_vec_f64().unwrap();
    assert!(
        close(gelu[2], 1.954_499_736_103_641_6, value_tol(1e-12)),
        "{gelu:?}"
    );
    // softplus(0) = ln 2; above the threshold the value is x itself.
    let sp = t(&[0.0, 25.0], &[2])
        .softplus()
        .unwrap()
        .to_vec_f64()
        .unwrap();
    assert!(close(sp[0], std::f64::consts::LN_2, value_tol(1e-15)) && sp[1] == 25.0);
}

#[test]
fn third_order_tanh() {
    let mut r = rng(8);
    check_op("tanh", |x| x[0].tanh(), &[randn(&mut r, &[3])], 3);
    check_op("gelu", |x| x[0].gelu(), &[randn(&mut r, &[3])], 3);
}

#[test]
fn maximum_minimum() {
    let mut r = rng(9);
    let xs = [randn(&mut r, &[3, 1]), randn(&mut r, &[4])];
    check12("maximum [3,1] [4]", |x| x[0].maximum(&x[1]), &xs);
    check12("minimum [3,1] [4]", |x| x[0].minimum(&x[1]), &xs);
    let ys = [away_from_zero(&mut r, &[2, 3])];
    check12("maximum f", |x| x[0].maximum(0.0), &ys);
    check12("minimum f", |x| x[0].minimum(0.0), &ys);
    // At a tie the gradient is split in half between the two sides (PyTorch).
    let a = t(&[1.0], &[1]).to_leaf();
    let b = t(&[1.0], &[1]).to_leaf();
    let y = a.maximum(&b).unwrap().sum_all().unwrap();
    let g = grad(&[y], &[a, b], GradOptions::default()).unwrap();
    assert_eq!(g[0].as_ref().unwrap().to_vec_f64().unwrap(), vec![0.5]);
    assert_eq!(g[1].as_ref().unwrap().to_vec_f64().unwrap(), vec![0.5]);
}

#[test]
fn clamp_and_where() {
    let mut r = rng(10);
    let xs = [away_from_zero(&mut r, &[3, 4])];
    check12("clamp f", |x| x[0].clamp(-0.5, 0.5)?.mul(&x[0]), &xs);
    let bounds = [
        away_from_zero(&mut r, &[3, 4]),
        uniform(&mut r, &[3, 1], -0.6, -0.4),
        uniform(&mut r, &[4], 0.4, 0.6),
    ];
    check12("clamp tensors", |x| x[0].clamp(&x[1], &x[2]), &bounds);
    let mask = t(&[1.0, 0.0, 0.0, 1.0], &[4]);
    let branches = [randn(&mut r, &[3, 4]), randn(&mut r, &[3, 1])];
    check12(
        "where_cond",
        move |x| mask.where_cond(&x[0], &x[1])?.mul(&x[0]),
        &branches,
    );
    // torch semantics at the bounds: the gradient passes where min <= x <= max.
    let x = t(&[-1.0, -0.5, 0.0, 0.5, 1.0], &[5]).to_leaf();
    let y = x.clamp(-0.5, 0.5).unwrap().sum_all().unwrap();
    let g = grad(&[y], &[x], GradOptions::default()).unwrap()[0]
        .clone()
        .unwrap();
    assert_eq!(g.to_vec_f64().unwrap(), vec![0.0, 1.0, 1.0, 1.0, 0.0]);
    // The in-place form rebinds the handle to the clamped value.
    let mut z = t(&[-2.0, 0.25, 3.0], &[3]);
    z.clamp_(-1.0, 1.0).unwrap();
    assert_eq!(z.to_vec_f64().unwrap(), vec![-1.0, 0.25, 1.0]);
}

#[test]
fn comparisons_make_constant_masks() {
    let a = t(&[1.0, 2.0, 3.0], &[3]).to_leaf();
    let b = t(&[2.0], &[1]);
    assert_eq!(a.eq(&b).unwrap().to_vec_f64().unwrap(), vec![0.0, 1.0, 0.0]);
    assert_eq!(
        a.ne(2.0).unwrap().to_vec_f64().unwrap(),
        vec![1.0, 0.0, 1.0]
    );
    assert_eq!(a.lt(&b).unwrap().to_vec_f64().unwrap(), vec![1.0, 0.0, 0.0]);
    assert_eq!(
        a.le(2.0).unwrap().to_vec_f64().unwrap(),
        vec![1.0, 1.0, 0.0]
    );
    assert_eq!(a.gt(&b).unwrap().to_vec_f64().unwrap(), vec![0.0, 0.0, 1.0]);
    assert_eq!(
        a.ge(2.0).unwrap().to_vec_f64().unwrap(),
        vec![0.0, 1.0, 1.0]
    );
    let m = a.gt(1.5).unwrap();
    assert!(!m.requires_grad());
    assert_eq!(m.dtype(), a.dtype());
    // Broadcasting [3,1] against [2] gives a [3,2] mask.
    let col = t(&[1.0, 2.0, 3.0], &[3, 1]);
    let row = t(&[1.5, 2.5], &[2]);
    let m = col.lt(&row).unwrap();
    assert_eq!(m.dims(), &[3, 2]);
    assert_eq!(m.to_vec_f64().unwrap(), vec![1.0, 1.0, 0.0, 1.0, 0.0, 0.0]);
}

/// d/dx sqrt(x) = 1/(2 sqrt x) = 0.5 / sqrt(x), d2 = -1/(4 x^1.5), d3 = 3/(8 x^2.5);
/// at 0 every derivative is defined as 0.
#[test]
fn safe_sqrt_at_and_near_zero() {
    let derivs = |x0: f64| -> Vec<f64> {
        let x = t(&[x0], &[1]).to_leaf();
        let mut y = x.sqrt().unwrap();
        let mut out = vec![y.to_vec_f64().unwrap()[0]];
        for _ in 0..3 {
            let y1 = y.sum_all().unwrap();
            y = grad(
                &[y1],
                std::slice::from_ref(&x),
                GradOptions::create_graph().allow_unused(true),
            )
            .unwrap()[0]
                .clone()
                .unwrap_or_else(|| x.zeros_like().unwrap());
            out.push(y.to_vec_f64().unwrap()[0]);
        }
        out
    };
    assert_eq!(derivs(0.0), vec![0.0, 0.0, 0.0, 0.0]);
    // f32 holds neither 1e-100 nor the derivatives at it (3/(8 x^2.5) overflows f32 below
    // x = 3e-16), so the f32 run starts at 1e-12.
    let near_zero: &[f64] = if dtype() == candle_higher::DType::F32 {
        &[1e-12, 1e-6, 0.25]
    } else {
        &[1e-100, 1e-12, 1e-6, 0.25]
    };
    for &x0 in near_zero {
        let d = derivs(x0);
        let expect = [
            x0.sqrt(),
            0.5 / x0.sqrt(),
            -0.25 / x0.powf(1.5),
            0.375 / x0.powf(2.5),
        ];
        for (k, (a, e)) in d.iter().zip(expect).enumerate() {
            assert!(
                a.is_finite() && (a - e).abs() <= value_tol(1e-12) * e.abs(),
                "order {k} at {x0}: {a} vs {e}"
            );
        }
    }
    // Third order by finite differences away from 0, and no inf/NaN in a vector with zeros.
    let mut r = rng(11);
    check_op(
        "sqrt",
        |x| x[0].sqrt(),
        &[uniform(&mut r, &[3], 0.3, 2.0)],
        3,
    );
    let x = t(&[0.0, 0.0, 4.0], &[3]).to_leaf();
    let y = x.sqrt().unwrap().sum_all().unwrap();
    let g1 = grad(&[y], std::slice::from_ref(&x), GradOptions::create_graph()).unwrap()[0]
        .clone()
        .unwrap();
    assert_eq!(g1.to_vec_f64().unwrap(), vec![0.0, 0.0, 0.25]);
    let g2 = grad(
        &[g1.sum_all().unwrap()],
        std::slice::from_ref(&x),
        GradOptions::create_graph(),
    )
    .unwrap()[0]
        .clone()
        .unwrap();
    let g3 = grad(
        &[g2.sum_all().unwrap()],
        std::slice::from_ref(&x),
        GradOptions::default(),
    )
    .unwrap()[0]
        .clone()
        .unwrap();
    assert!(all_finite(&g2) && all_finite(&g3));
    // d2 at 4 = -1/(4 * 8) = -1/32; d3 at 4 = 3/(8 * 32) = 3/256.
    assert_eq!(g2.to_vec_f64().unwrap(), vec![0.0, 0.0, -1.0 / 32.0]);
    assert_eq!(g3.to_vec_f64().unwrap(), vec![0.0, 0.0, 3.0 / 256.0]);
}
