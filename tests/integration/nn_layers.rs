//! Layers: names, initialisation, forward against candle's kernels, buffers, train/eval,
//! losses, safetensors.

use std::collections::HashMap;

use candle_higher::nn::{self, ConvConfig, Module, Parameters};
use candle_higher::{grad, DType, Error, GradOptions, Tensor};

fn vb(seed: u64) -> nn::VarBuilder {
    nn::VarBuilder::new(seed, DType::F64, &crate::common::device())
}

fn input(shape: &[usize], seed: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n).map(|i| ((i as f64 + seed) * 0.713).sin()).collect();
    Tensor::from_vec(data, shape, &crate::common::device()).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    a.to_vec_f64()
        .unwrap()
        .iter()
        .zip(b.to_vec_f64().unwrap())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn names<M: Parameters + Clone>(m: &M) -> Vec<String> {
    m.named_parameters()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

#[test]
fn init_is_seeded_and_within_pytorch_bounds() {
    let a = nn::linear(16, 8, vb(1).pp("fc")).unwrap();
    let b = nn::linear(16, 8, vb(1).pp("fc")).unwrap();
    let c = nn::linear(16, 8, vb(2).pp("fc")).unwrap();
    assert_eq!(max_abs_diff(&a.weight, &b.weight), 0.0);
    assert!(max_abs_diff(&a.weight, &c.weight) > 0.0);
    let bound = 1.0 / 4.0;
    for t in [&a.weight, a.bias.as_ref().unwrap()] {
        let v = t.to_vec_f64().unwrap();
        assert!(v.iter().all(|x| x.abs() <= bound));
        assert!(v.iter().any(|x| x.abs() > bound / 2.0));
        assert!(t.is_leaf() && t.requires_grad());
    }
    let conv = nn::conv2d(4, 6, 3, ConvConfig::default(), vb(1)).unwrap();
    let bound = 1.0 / 6.0; // fan_in = 4 * 3 * 3
    assert!(conv
        .weight
        .to_vec_f64()
        .unwrap()
        .iter()
        .all(|x| x.abs() <= bound));
}

#[test]
fn conv2d_matches_candle() {
    for (cfg, cin, cout) in [
        (ConvConfig::default(), 3, 4),
        (
            ConvConfig {
                padding: 1,
                stride: 2,
                dilation: 1,
                groups: 1,
            },
            3,
            4,
        ),
        (
            ConvConfig {
                padding: 2,
                stride: 1,
                dilation: 2,
                groups: 1,
            },
            2,
            3,
        ),
        (
            ConvConfig {
                padding: 1,
                stride: 1,
                dilation: 1,
                groups: 2,
            },
            4,
            6,
        ),
    ] {
        let conv = nn::conv2d(cin, cout, 3, cfg, vb(3)).unwrap();
        let x = input(&[2, cin, 7, 6], 0.5);
        let y = conv.forward(&x).unwrap();
        let expect = x
            .value()
            .conv2d(
                conv.weight.value(),
                cfg.padding,
                cfg.stride,
                cfg.dilation,
                cfg.groups,
            )
            .unwrap()
            .broadcast_add(
                &conv
                    .bias
                    .as_ref()
                    .unwrap()
                    .value()
                    .reshape((1, cout, 1, 1))
                    .unwrap(),
            )
            .unwrap();
        assert!(max_abs_diff(&y, &Tensor::new(expect)) < 1e-12, "{cfg:?}");
    }
}

#[test]
fn conv1d_matches_candle() {
    let cfg = ConvConfig {
        padding: 1,
        stride: 2,
        dilation: 1,
        groups: 1,
    };
    let conv = nn::conv1d(3, 5, 3, cfg, vb(4)).unwrap();
    let x = input(&[2, 3, 9], 0.1);
    let y = conv.forward(&x).unwrap();
    let expect = x
        .value()
        .conv1d(conv.weight.value(), 1, 2, 1, 1)
        .unwrap()
        .broadcast_add(
            &conv
                .bias
                .as_ref()
                .unwrap()
                .value()
                .reshape((1, 5, 1))
                .unwrap(),
        )
        .unwrap();
    assert!(max_abs_diff(&y, &Tensor::new(expect)) < 1e-12);
}

#[test]
fn pools_match_candle() {
    let x = input(&[2, 3, 7, 9], 0.3);
    let y = nn::max_pool2d(2).forward(&x).unwrap();
    assert_eq!(y.dims(), [2, 3, 3, 4]);
    let e = x.value().max_pool2d(2).unwrap();
    assert_eq!(max_abs_diff(&y, &Tensor::new(e)), 0.0);
    let y = nn::avg_pool2d(3).forward(&x).unwrap();
    let e = x.value().avg_pool2d(3).unwrap();
    assert!(max_abs_diff(&y, &Tensor::new(e)) < 1e-12);
    // Max pool gradient is 1 at each window's max ([[1, 2], [3, 4]] -> 1 at the 4).
    let x = Tensor::from_vec(
        vec![1.0f64, 2.0, 3.0, 4.0],
        &[1, 1, 2, 2],
        &crate::common::device(),
    )
    .unwrap()
    .to_leaf();
    let y = nn::max_pool2d(2).forward(&x).unwrap().sum_all().unwrap();
    let g = grad(&[y], &[x], GradOptions::default()).unwrap()[0]
        .clone()
        .unwrap();
    assert_eq!(g.to_vec_f64().unwrap(), [0.0, 0.0, 0.0, 1.0]);
}

#[test]
fn batch_norm_train_eval_and_running_stats() {
    let mut bn = nn::batch_norm1d(3, nn::BatchNormConfig::default(), vb(0)).unwrap();
    assert_eq!(names(&bn), ["weight", "bias"]);
    let bufs: Vec<String> = bn
        .named_buffers()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(bufs, ["running_mean", "running_var"]);
    let x = input(&[5, 3], 0.0);
    let y = bn.forward(&x).unwrap();
    // Normalised per channel: mean 0, biased variance 1 (up to eps).
    let m = y.mean(0).unwrap().to_vec_f64().unwrap();
    assert!(m.iter().all(|v| v.abs() < 1e-12));
    let v = y.sqr().unwrap().mean(0).unwrap().to_vec_f64().unwrap();
    assert!(v.iter().all(|v| (v - 1.0).abs() < 1e-3));
    // running = 0.9 * init + 0.1 * batch (unbiased var).
    let xm = x.mean(0).unwrap().to_vec_f64().unwrap();
    let rm = bn.running_mean.get().to_vec_f64().unwrap();
    for (r, b) in rm.iter().zip(&xm) {
        assert!((r - 0.1 * b).abs() < 1e-12);
    }
    let xv = x
        .sub(x.mean_keepdim(0).unwrap())
        .unwrap()
        .sqr()
        .unwrap()
        .sum(0)
        .unwrap();
    let rv = bn.running_var.get().to_vec_f64().unwrap();
    for (r, v) in rv.iter().zip(xv.to_vec_f64().unwrap()) {
        assert!((r - (0.9 + 0.1 * v / 4.0)).abs() < 1e-12);
    }
    // Eval uses the running statistics.
    bn.eval().unwrap();
    let ye = bn.forward(&x).unwrap();
    let expect = x
        .sub(bn.running_mean.get())
        .unwrap()
        .div(bn.running_var.get().add(1e-5).unwrap().sqrt().unwrap())
        .unwrap();
    assert!(max_abs_diff(&ye, &expect) < 1e-12);
    // A clone has its own statistics.
    let mut c = bn.clone();
    c.train(true).unwrap();
    c.forward(&input(&[4, 3], 9.0)).unwrap();
    assert!(max_abs_diff(&c.running_mean.get(), &bn.running_mean.get()) > 0.0);
}

#[test]
fn batch_norm_momentum_one_keeps_last_batch() {
    let cfg = nn::BatchNormConfig {
        momentum: 1.0,
        ..Default::default()
    };
    let bn = nn::batch_norm2d(2, cfg, vb(0)).unwrap();
    let x = input(&[3, 2, 4, 4], 1.0);
    bn.forward(&x).unwrap();
    let mean = x.mean_dims(&[0, 2, 3], false).unwrap();
    assert!(max_abs_diff(&bn.running_mean.get(), &mean) < 1e-12);
}

/// With a non-trivial scale and shift, training-mode output is
/// `w (x - mean) / sqrt(var + eps) + b` per channel, computed here by hand.
#[test]
fn batch_norm_affine_output_matches_the_formula() {
    let mut bn = nn::batch_norm2d(2, nn::BatchNormConfig::default(), vb(0)).unwrap();
    bn.weight = Some(Tensor::from_slice(&[1.5f64, -0.5], &[2], &crate::common::device()).unwrap());
    bn.bias = Some(Tensor::from_slice(&[0.25f64, 2.0], &[2], &crate::common::device()).unwrap());
    let x = input(&[3, 2, 2, 2], 1.0);
    let y = bn.forward(&x).unwrap().to_vec_f64().unwrap();
    let xs = x.to_vec_f64().unwrap();
    let (w, b) = ([1.5, -0.5], [0.25, 2.0]);
    for c in 0..2 {
        let idx: Vec<usize> = (0..3)
            .flat_map(|n| (0..4).map(move |i| (n * 2 + c) * 4 + i))
            .collect();
        let mean = idx.iter().map(|&i| xs[i]).sum::<f64>() / 12.0;
        let var = idx.iter().map(|&i| (xs[i] - mean).powi(2)).sum::<f64>() / 12.0;
        for &i in &idx {
            let expect = w[c] * (xs[i] - mean) / (var + 1e-5).sqrt() + b[c];
            assert!(
                (y[i] - expect).abs() < 1e-12,
                "channel {c}: {} vs {expect}",
                y[i]
            );
        }
    }
}

#[test]
fn layer_norm_normalises_last_dims() {
    let ln = nn::layer_norm(&[4], vb(0)).unwrap();
    let y = ln.forward(&input(&[3, 4], 0.0)).unwrap();
    assert!(y
        .mean(1)
        .unwrap()
        .to_vec_f64()
        .unwrap()
        .iter()
        .all(|v| v.abs() < 1e-12));
}

#[test]
fn dropout_is_seeded_and_off_in_eval() {
    let mut d = nn::dropout(0.5, vb(3)).unwrap();
    let x = input(&[50], 0.0).add(2.0).unwrap();
    let y1 = d.clone().forward(&x).unwrap();
    let y2 = d.clone().forward(&x).unwrap();
    assert_eq!(max_abs_diff(&y1, &y2), 0.0, "same seed, same mask");
    let y3 = d.forward(&x).unwrap();
    let y4 = d.forward(&x).unwrap();
    assert!(max_abs_diff(&y3, &y4) > 0.0, "the generator advances");
    let v = y1.to_vec_f64().unwrap();
    let xs = x.to_vec_f64().unwrap();
    assert!(v
        .iter()
        .zip(&xs)
        .all(|(y, x)| *y == 0.0 || (y - 2.0 * x).abs() < 1e-12));
    d.eval().unwrap();
    assert_eq!(max_abs_diff(&d.forward(&x).unwrap(), &x), 0.0);
}

#[test]
fn embedding_looks_up_rows() {
    let e = nn::embedding(5, 3, vb(0)).unwrap();
    let ids = Tensor::from_vec(vec![4u32, 0, 4], &[3], &crate::common::device()).unwrap();
    let y = e.forward(&ids).unwrap();
    assert_eq!(y.dims(), [3, 3]);
    let w = e.weight.to_vec_f64().unwrap();
    let v = y.to_vec_f64().unwrap();
    assert_eq!(&v[0..3], &w[12..15]);
    assert_eq!(&v[3..6], &w[0..3]);
    let bad = Tensor::from_vec(vec![5u32], &[1], &crate::common::device()).unwrap();
    assert!(e.forward(&bad).unwrap_err().to_string().contains("0..5"));
}

#[test]
fn recurrent_names_and_shapes() {
    let l = nn::lstm(3, 4, 2, vb(0)).unwrap();
    assert_eq!(
        names(&l),
        [
            "weight_ih_l0",
            "weight_hh_l0",
            "bias_ih_l0",
            "bias_hh_l0",
            "weight_ih_l1",
            "weight_hh_l1",
            "bias_ih_l1",
            "bias_hh_l1"
        ]
    );
    let x = input(&[5, 2, 3], 0.0);
    let (y, states) = l.forward_with_state(&x, None).unwrap();
    assert_eq!(y.dims(), [5, 2, 4]);
    assert_eq!(states.len(), 2);
    // The last output is the top layer's final h.
    let last = y.narrow(0, 4, 1).unwrap().squeeze(0).unwrap();
    assert_eq!(max_abs_diff(&last, &states[1].h), 0.0);
    for m in [
        nn::gru(3, 4, 1, vb(0)).unwrap(),
        nn::rnn(3, 4, 1, vb(0)).unwrap(),
    ] {
        assert_eq!(m.forward(&x).unwrap().dims(), [5, 2, 4]);
    }
    // A GRU cell by hand: h' = (1 - z) n + z h.
    let c = nn::gru_cell(3, 2, vb(1)).unwrap();
    let x = input(&[1, 3], 0.2);
    let h = c.forward(&x).unwrap();
    let lin =
        |w: &Tensor, b: &Tensor, v: &Tensor| v.matmul(&w.t().unwrap()).unwrap().add(b).unwrap();
    let gi = lin(&c.weight_ih, &c.bias_ih, &x);
    let gh = c.bias_hh.reshape(&[1, 6]).unwrap();
    let part = |t: &Tensor, k: usize| t.narrow(1, 2 * k, 2).unwrap();
    let r = part(&gi, 0).add(part(&gh, 0)).unwrap().sigmoid().unwrap();
    let z = part(&gi, 1).add(part(&gh, 1)).unwrap().sigmoid().unwrap();
    let n = part(&gi, 2)
        .add(r.mul(part(&gh, 2)).unwrap())
        .unwrap()
        .tanh()
        .unwrap();
    let expect = z.affine(-1.0, 1.0).unwrap().mul(&n).unwrap();
    assert!(max_abs_diff(&h, &expect) < 1e-14);
}

#[test]
fn losses_match_hand_computation() {
    let logits = Tensor::from_vec(
        vec![1.0f64, 2.0, 0.5, -1.0, 0.0, 3.0],
        &[2, 3],
        &crate::common::device(),
    )
    .unwrap();
    let labels = Tensor::from_vec(vec![1u32, 2], &[2], &crate::common::device()).unwrap();
    let ce = nn::cross_entropy(&logits, &labels)
        .unwrap()
        .to_scalar_f64()
        .unwrap();
    let lse = |v: &[f64]| v.iter().map(|x| x.exp()).sum::<f64>().ln();
    let expect = ((lse(&[1.0, 2.0, 0.5]) - 2.0) + (lse(&[-1.0, 0.0, 3.0]) - 3.0)) / 2.0;
    assert!((ce - expect).abs() < 1e-14);
    let bad = Tensor::from_vec(vec![3u32, 0], &[2], &crate::common::device()).unwrap();
    assert!(nn::cross_entropy(&logits, &bad).is_err());
    let t = Tensor::from_vec(
        vec![1.0f64, 0.0, 0.0, 1.0, 1.0, 0.0],
        &[2, 3],
        &crate::common::device(),
    )
    .unwrap();
    let bce = nn::binary_cross_entropy_with_logits(&logits, &t)
        .unwrap()
        .to_scalar_f64()
        .unwrap();
    let lv = logits.to_vec_f64().unwrap();
    let tv = t.to_vec_f64().unwrap();
    let expect: f64 = lv
        .iter()
        .zip(&tv)
        .map(|(x, y)| {
            let s = 1.0 / (1.0 + (-x).exp());
            -(y * s.ln() + (1.0 - y) * (1.0 - s).ln())
        })
        .sum::<f64>()
        / 6.0;
    assert!((bce - expect).abs() < 1e-12);
    let m = nn::mse(&logits, &t).unwrap().to_scalar_f64().unwrap();
    let expect: f64 = lv
        .iter()
        .zip(&tv)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        / 6.0;
    assert!((m - expect).abs() < 1e-14);
}

fn small_net() -> nn::Sequential {
    let vb = vb(5);
    nn::seq()
        .add(nn::linear(3, 4, vb.pp("0")).unwrap())
        .add(nn::batch_norm1d(4, nn::BatchNormConfig::default(), vb.pp("1")).unwrap())
        .add(nn::Activation::Relu)
        .add(nn::linear(4, 2, vb.pp("3")).unwrap())
}

#[test]
fn safetensors_round_trip() {
    let dir = std::env::temp_dir().join(format!("candle_higher_nn_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("round_trip.safetensors");
    let a = small_net();
    a.forward(&input(&[6, 3], 0.0)).unwrap(); // move the running stats
    nn::save_safetensors(&a, &path).unwrap();
    let mut b = {
        let vb = vb(99);
        nn::seq()
            .add(nn::linear(3, 4, vb.pp("0")).unwrap())
            .add(nn::batch_norm1d(4, nn::BatchNormConfig::default(), vb.pp("1")).unwrap())
            .add(nn::Activation::Relu)
            .add(nn::linear(4, 2, vb.pp("3")).unwrap())
    };
    nn::load_safetensors(&mut b, &path).unwrap();
    for ((na, ta), (nb, tb)) in a
        .named_parameters()
        .unwrap()
        .iter()
        .zip(b.named_parameters().unwrap().iter())
    {
        assert_eq!(na, nb);
        assert_eq!(max_abs_diff(ta, tb), 0.0);
        assert!(tb.is_leaf() && tb.requires_grad());
    }
    for ((_, ta), (_, tb)) in a
        .named_buffers()
        .unwrap()
        .iter()
        .zip(b.named_buffers().unwrap().iter())
    {
        assert_eq!(max_abs_diff(ta, tb), 0.0);
    }
    let mut a = a;
    a.eval().unwrap();
    b.eval().unwrap();
    let x = input(&[2, 3], 1.0);
    assert_eq!(
        max_abs_diff(&a.forward(&x).unwrap(), &b.forward(&x).unwrap()),
        0.0
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn load_errors_name_every_problem_and_load_nothing() {
    let mut model = small_net();
    let before = model.parameters().unwrap();
    let good = nn::state_dict(&small_net()).unwrap();
    let check =
        |tensors: HashMap<String, candle_core::Tensor>, model: &mut nn::Sequential| -> String {
            let err = nn::load_state_dict(model, &tensors, "test.safetensors").unwrap_err();
            assert!(matches!(err, Error::LoadMismatch { .. }));
            err.to_string()
        };
    // Missing.
    let mut t = good.clone();
    t.remove("3.bias");
    let msg = check(t, &mut model);
    assert!(
        msg.contains("missing: 3.bias") && msg.contains("nothing changed"),
        "{msg}"
    );
    // Extra.
    let mut t = good.clone();
    t.insert(
        "4.weight".into(),
        candle_core::Tensor::zeros(2, DType::F64, &crate::common::device()).unwrap(),
    );
    let msg = check(t, &mut model);
    assert!(msg.contains("unexpected: 4.weight"), "{msg}");
    // Mis-shaped, together with a missing buffer: both reported at once.
    let mut t = good.clone();
    t.insert(
        "0.weight".into(),
        candle_core::Tensor::zeros((3, 4), DType::F64, &crate::common::device()).unwrap(),
    );
    t.remove("1.running_var");
    let msg = check(t, &mut model);
    assert!(
        msg.contains("0.weight (model [4, 3], source [3, 4])")
            && msg.contains("missing: 1.running_var"),
        "{msg}"
    );
    // Nothing was replaced.
    for (a, b) in before.iter().zip(model.parameters().unwrap()) {
        assert_eq!(a.id(), b.id());
    }
    // A missing file is a candle error, not a panic.
    assert!(nn::load_safetensors(&mut model, "/nonexistent/x.safetensors").is_err());
}

/// A user model holding a Vec of layers and an optional head.
#[derive(Clone)]
struct Stack {
    layers: Vec<nn::Linear>,
    head: Option<nn::Linear>,
}

impl Parameters for Stack {
    fn visit(&mut self, v: &mut nn::Visitor<'_>) -> candle_higher::Result<()> {
        v.module("layers", &mut self.layers)?;
        v.module("head", &mut self.head)
    }
}

#[test]
fn vec_and_option_children_are_named_by_position() {
    let vb = vb(0);
    let mut s = Stack {
        layers: (0..2)
            .map(|i| nn::linear(2, 2, vb.pp("layers").pp(i)).unwrap())
            .collect(),
        head: None,
    };
    assert_eq!(
        names(&s),
        [
            "layers.0.weight",
            "layers.0.bias",
            "layers.1.weight",
            "layers.1.bias"
        ]
    );
    s.head = Some(nn::linear_no_bias(2, 1, vb.pp("head")).unwrap());
    assert_eq!(names(&s).last().unwrap(), "head.weight");
}

#[test]
fn activations_match_their_formulas() {
    let x = input(&[7], 0.0).affine(3.0, 0.0).unwrap();
    let xs = x.to_vec_f64().unwrap();
    let check = |a: nn::Activation, f: &dyn Fn(f64) -> f64| {
        let y = a.forward(&x).unwrap().to_vec_f64().unwrap();
        for (yi, xi) in y.iter().zip(&xs) {
            assert!(
                (yi - f(*xi)).abs() < 1e-12,
                "{a:?} at {xi}: {yi} vs {}",
                f(*xi)
            );
        }
    };
    check(nn::Activation::Relu, &|v| v.max(0.0));
    check(nn::Activation::LeakyRelu(0.1), &|v| {
        if v > 0.0 {
            v
        } else {
            0.1 * v
        }
    });
    check(nn::Activation::Elu(1.5), &|v| {
        if v > 0.0 {
            v
        } else {
            1.5 * (v.exp() - 1.0)
        }
    });
    check(nn::Activation::Softplus, &|v| (1.0 + v.exp()).ln());
    check(nn::Activation::Silu, &|v| v / (1.0 + (-v).exp()));
    check(nn::Activation::Sigmoid, &|v| 1.0 / (1.0 + (-v).exp()));
    check(nn::Activation::Tanh, &f64::tanh);
}

/// torch accepts a drop probability in [0, 1]: at 1 everything is dropped (zeros, zero
/// gradient), and the eval mode stays the identity; outside [0, 1] (or NaN) is an error
/// naming the probability, for `dropout` and `weight_dropout` alike.
#[test]
fn dropout_probability_one_drops_everything_and_outside_is_rejected() {
    let mut d = nn::dropout(1.0, vb(5)).unwrap();
    let x = input(&[3, 4], 0.5).to_leaf();
    let y = d.forward(&x).unwrap();
    assert!(y.to_vec_f64().unwrap().iter().all(|v| *v == 0.0));
    let g = grad(
        &[y.sum_all().unwrap()],
        std::slice::from_ref(&x),
        GradOptions::default(),
    )
    .unwrap();
    let g = g[0].as_ref().unwrap().to_vec_f64().unwrap();
    assert!(g.iter().all(|v| *v == 0.0));
    d.eval().unwrap();
    assert_eq!(max_abs_diff(&d.forward(&x).unwrap(), &x), 0.0);
    for p in [-0.1, 1.0 + 1e-12, 2.0, f64::NAN] {
        match nn::dropout(p, vb(5)) {
            Err(Error::InvalidArgument { op, message }) => {
                assert_eq!(op, "dropout");
                assert!(message.contains("not in [0, 1]"), "{message}");
            }
            other => panic!("p = {p}: {other:?}"),
        }
    }
    let lin = nn::linear(3, 2, vb(1)).unwrap();
    assert!(matches!(
        nn::weight_dropout(lin, &["weight"], 1.5, vb(2)),
        Err(Error::InvalidArgument {
            op: "weight_dropout",
            ..
        })
    ));
}

/// `Sequential` runs a ReLU followed by a max pool as the pool followed by the ReLU. The
/// two orders agree exactly: values, gradients and second derivatives, on inputs full of
/// ties (small integers, zeros of both signs, all-negative windows) and NaN, plain and
/// task-batched.
#[test]
fn relu_then_max_pool_in_sequential_is_exact() {
    let values = [-2.0, -1.0, -0.0, 0.0, 0.0, 1.0, 1.0, 2.0, f64::NAN];
    for shape in [vec![2, 3, 6, 5], vec![2, 2, 3, 4, 4]] {
        let n: usize = shape.iter().product();
        let data: Vec<f64> = (0..n).map(|i| values[(i * 5 + i * i % 7) % 9]).collect();
        let x = Tensor::from_vec(data, shape.as_slice(), &crate::common::device())
            .unwrap()
            .to_leaf();
        let weights = input(&shape, 0.3).to_leaf();
        let net = nn::seq().add(nn::Activation::Relu).add(nn::max_pool2d(2));
        // f = sum(c * y^2) with y the pooled output of x * w: a Hessian that is not zero.
        let run = |order: &dyn Fn(&Tensor) -> Tensor| -> Vec<Vec<f64>> {
            let y = order(&x.mul(&weights).unwrap());
            let c = input(y.dims(), 1.7);
            let f = y.sqr().unwrap().mul(&c).unwrap().sum_all().unwrap();
            let g = grad(&[f], std::slice::from_ref(&x), GradOptions::create_graph()).unwrap();
            let gx = g[0].clone().unwrap();
            let v = input(gx.dims(), 2.9);
            let s = gx.mul(&v).unwrap().sum_all().unwrap();
            let h = grad(&[s], &[x.clone(), weights.clone()], GradOptions::default()).unwrap();
            [y, gx, h[0].clone().unwrap(), h[1].clone().unwrap()]
                .iter()
                .map(|t| t.to_vec_f64().unwrap())
                .collect()
        };
        let fused = run(&|z| net.forward(z).unwrap());
        let pool = nn::max_pool2d(2);
        let in_order = run(&|z| pool.forward(&z.relu().unwrap()).unwrap());
        for (what, (a, b)) in ["value", "gradient", "d2/dx2", "d2/dxdw"]
            .iter()
            .zip(fused.iter().zip(&in_order))
        {
            let same = a
                .iter()
                .zip(b)
                .all(|(p, q)| p == q || (p.is_nan() && q.is_nan()));
            assert!(same, "{what} differs for {shape:?}: {a:?} vs {b:?}");
        }
        assert!(fused[0].iter().any(|v| v.is_nan()), "the inputs hold NaN");
    }
}

/// A linear layer and a batch norm: the statistics a wrapper's forward must update.
fn linear_batch_norm(seed: u64) -> nn::Sequential {
    let vb = vb(seed);
    nn::seq()
        .add(nn::linear(2, 3, vb.pp("0")).unwrap())
        .add(nn::batch_norm1d(3, nn::BatchNormConfig::default(), vb.pp("1")).unwrap())
}

fn buffer_values<M: Parameters + Clone>(m: &M) -> Vec<Vec<f64>> {
    m.named_buffers()
        .unwrap()
        .iter()
        .map(|(_, t)| t.to_vec_f64().unwrap())
        .collect()
}

#[test]
fn reparametrized_layers_update_the_wrapped_layers_buffers() {
    // Weight norm and weight dropout run a copy of the layer with the weights replaced;
    // the copy's batch norm must write the layer's own statistics.
    let x = input(&[5, 2], 0.3);
    let plain = linear_batch_norm(40);
    let before = buffer_values(&plain);
    plain.forward(&x).unwrap();
    let moved = buffer_values(&plain);
    assert_ne!(moved, before);

    // Dropout with p = 0 runs the raw weights unchanged: the same statistics, bit for bit.
    let dropped = nn::weight_dropout(linear_batch_norm(40), &["0.weight"], 0.0, vb(41)).unwrap();
    dropped.forward(&x).unwrap();
    assert_eq!(buffer_values(&dropped), moved);

    // Weight norm recomputes the weight as g v / ||v||: the statistics to rounding.
    let normed = nn::weight_norm(linear_batch_norm(40), "0.weight").unwrap();
    assert_eq!(buffer_values(&normed), before);
    normed.forward(&x).unwrap();
    for (got, want) in buffer_values(&normed).iter().zip(&moved) {
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= 1e-12 * w.abs().max(1.0), "{g} vs {w}");
        }
    }
}
