//! Finite-difference checks (first and second order, in the suites' dtype: f64 unless
//! `common::dtype()` says f32) of convolutions, pooling, softmax and indexing, plus the
//! values and errors that pin their semantics.

use crate::common::*;
use candle_higher::{grad, DType, Error, GradOptions, Tensor};

fn idx(v: &[u32]) -> Tensor {
    Tensor::from_slice(v, &[v.len()], &device()).unwrap()
}

#[test]
fn linear_plain_and_task_batched() {
    let mut r = rng(29);
    // Plain: rows over two leading dims, with and without the bias.
    let xs = [
        randn(&mut r, &[2, 3, 4]),
        randn(&mut r, &[5, 4]),
        randn(&mut r, &[5]),
    ];
    check12("linear", |x| x[0].linear(&x[1], Some(&x[2]))?.sqr(), &xs);
    check12(
        "linear no bias",
        |x| x[0].linear(&x[1], None)?.tanh(),
        &xs[..2],
    );
    // Task-batched: 3 tasks of 4 rows, and of 1 row (a bias gradient of one row per task).
    for rows in [4, 1] {
        let xs = [
            randn(&mut r, &[3, rows, 2]),
            randn(&mut r, &[3, 5, 2]),
            randn(&mut r, &[3, 5]),
        ];
        check12(
            "linear_tasks",
            |x| x[0].linear_tasks(&x[1], Some(&x[2]))?.sqr(),
            &xs,
        );
    }
}

#[test]
fn conv2d_plain() {
    let mut r = rng(30);
    let xs = [randn(&mut r, &[1, 2, 5, 5]), randn(&mut r, &[3, 2, 3, 3])];
    check12("conv2d", |x| x[0].conv2d(&x[1], 0, 1, 1, 1), &xs);
}

#[test]
fn conv2d_padding_stride_nonsquare() {
    let mut r = rng(31);
    // Height 6 with stride 2 leaves a remainder row no window reaches.
    let xs = [randn(&mut r, &[2, 2, 6, 5]), randn(&mut r, &[2, 2, 3, 2])];
    check12("conv2d p1 s2", |x| x[0].conv2d(&x[1], 1, 2, 1, 1), &xs);
    check12("conv2d p0 s3", |x| x[0].conv2d(&x[1], 0, 3, 1, 1), &xs);
}

/// 16 channels in and out, 3x3 at stride 1, with few enough tiles: on the CPU these run
/// through the Winograd kernels (`ops::winograd`), whose gradients are the adjoints of
/// their own forward.
#[test]
fn conv2d_winograd_sized() {
    let mut r = rng(34);
    let xs = [
        randn(&mut r, &[1, 16, 6, 6]),
        randn(&mut r, &[16, 16, 3, 3]),
    ];
    check12("conv2d winograd", |x| x[0].conv2d(&x[1], 0, 1, 1, 1), &xs);
    check12(
        "conv2d winograd p1",
        |x| x[0].conv2d(&x[1], 1, 1, 1, 1),
        &xs,
    );
}

#[test]
fn conv2d_dilation_and_large_padding() {
    let mut r = rng(32);
    let xs = [randn(&mut r, &[1, 2, 6, 6]), randn(&mut r, &[2, 2, 2, 3])];
    check12("conv2d p2 d2", |x| x[0].conv2d(&x[1], 2, 1, 2, 1), &xs);
    check12("conv2d p1 s2 d2", |x| x[0].conv2d(&x[1], 1, 2, 2, 1), &xs);
    // padding 2 > d (k - 1) = 1: the input gradient crops instead of padding.
    let ys = [randn(&mut r, &[1, 1, 4, 4]), randn(&mut r, &[1, 1, 2, 2])];
    check12("conv2d p2 k2", |x| x[0].conv2d(&x[1], 2, 1, 1, 1), &ys);
}

#[test]
fn conv2d_groups() {
    let mut r = rng(33);
    let xs = [randn(&mut r, &[1, 4, 5, 5]), randn(&mut r, &[4, 2, 3, 3])];
    check12("conv2d g2", |x| x[0].conv2d(&x[1], 1, 1, 1, 2), &xs);
    check12("conv2d g2 s2", |x| x[0].conv2d(&x[1], 1, 2, 1, 2), &xs);
    let dw = [randn(&mut r, &[1, 3, 4, 4]), randn(&mut r, &[6, 1, 2, 2])];
    check12(
        "conv2d depthwise x2",
        |x| x[0].conv2d(&x[1], 0, 1, 1, 3),
        &dw,
    );
}

#[test]
fn conv2d_third_order() {
    let mut r = rng(34);
    let xs = [randn(&mut r, &[1, 1, 4, 4]), randn(&mut r, &[2, 1, 2, 2])];
    check_op(
        "conv2d tanh",
        |x| x[0].conv2d(&x[1], 1, 2, 1, 1)?.tanh(),
        &xs,
        3,
    );
}

#[test]
fn conv1d() {
    let mut r = rng(35);
    let xs = [randn(&mut r, &[2, 2, 7]), randn(&mut r, &[4, 1, 3])];
    check12("conv1d p1 s2 g2", |x| x[0].conv1d(&x[1], 1, 2, 1, 2), &xs);
    let ys = [randn(&mut r, &[1, 2, 8]), randn(&mut r, &[3, 2, 3])];
    check12("conv1d p2 d2", |x| x[0].conv1d(&x[1], 2, 1, 2, 1), &ys);
}

/// The layers add their bias inside the convolution's op (one recorded op): its
/// derivatives in the input, weight and bias, plain and task-batched, with and without
/// groups, and through Conv1d.
#[test]
fn conv_layers_with_bias() {
    use candle_higher::nn::{Conv1d, Conv2d, ConvConfig, Module};
    let mut r = rng(36);
    let config = |padding, stride, groups| ConvConfig {
        padding,
        stride,
        dilation: 1,
        groups,
    };
    let conv2 = |c: ConvConfig| {
        move |x: &[Tensor]| {
            Conv2d {
                weight: x[1].clone(),
                bias: Some(x[2].clone()),
                config: c,
            }
            .forward(&x[0])
        }
    };
    let plain = [
        randn(&mut r, &[2, 2, 5, 4]),
        randn(&mut r, &[3, 2, 3, 3]),
        randn(&mut r, &[3]),
    ];
    check12("Conv2d bias", conv2(config(0, 1, 1)), &plain);
    check12("Conv2d bias p1 s2", conv2(config(1, 2, 1)), &plain);
    let grouped = [
        randn(&mut r, &[1, 4, 4, 4]),
        randn(&mut r, &[4, 2, 2, 2]),
        randn(&mut r, &[4]),
    ];
    check12("Conv2d bias g2", conv2(config(0, 1, 2)), &grouped);
    let tasks = [
        randn(&mut r, &[2, 2, 2, 4, 4]),
        randn(&mut r, &[2, 3, 2, 3, 3]),
        randn(&mut r, &[2, 3]),
    ];
    check12("Conv2d bias tasks", conv2(config(1, 1, 1)), &tasks);
    let c1 = config(1, 2, 1);
    let conv1 = move |x: &[Tensor]| {
        Conv1d {
            weight: x[1].clone(),
            bias: Some(x[2].clone()),
            config: c1,
        }
        .forward(&x[0])
    };
    let xs = [
        randn(&mut r, &[2, 2, 7]),
        randn(&mut r, &[3, 2, 3]),
        randn(&mut r, &[3]),
    ];
    check12("Conv1d bias", conv1, &xs);
    let ts = [
        randn(&mut r, &[2, 1, 2, 7]),
        randn(&mut r, &[2, 3, 2, 3]),
        randn(&mut r, &[2, 3]),
    ];
    check12("Conv1d bias tasks", conv1, &ts);
}

/// A bias of the wrong length is an error naming both shapes, not a panic in the kernel.
#[test]
fn conv_layer_bias_of_the_wrong_length_is_an_error() {
    use candle_higher::nn::{Conv2d, ConvConfig, Module};
    let mut r = rng(37);
    let layer = Conv2d {
        weight: randn(&mut r, &[3, 2, 3, 3]),
        bias: Some(randn(&mut r, &[4])),
        config: ConvConfig::default(),
    };
    let err = layer.forward(&randn(&mut r, &[1, 2, 5, 5])).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{text}");
    assert!(text.contains("[3]") && text.contains("[4]"), "{text}");
}

/// An empty task-batched convolution keeps the task axis: `[T, 0, C_out, H', W']`, plus the
/// bias where the layer has one.
#[test]
fn empty_task_batched_conv_keeps_its_shape() {
    use candle_higher::nn::{Conv2d, ConvConfig, Module};
    let mut r = rng(38);
    let x = Tensor::zeros(&[2, 0, 2, 5, 5], dtype(), &device()).unwrap();
    let w = randn(&mut r, &[2, 3, 2, 3, 3]);
    let y = x.conv2d_tasks(&w, 0, 1, 1, 1).unwrap();
    assert_eq!(y.dims(), &[2, 0, 3, 3, 3]);
    let layer = Conv2d {
        weight: w,
        bias: Some(randn(&mut r, &[2, 3])),
        config: ConvConfig::default(),
    };
    assert_eq!(layer.forward(&x).unwrap().dims(), &[2, 0, 3, 3, 3]);
}

#[test]
fn conv_values() {
    // A 1x1x3x3 input with a 2x2 kernel of ones sums each 2x2 window:
    // [[1,2,3],[4,5,6],[7,8,9]] -> [[12,16],[24,28]].
    let x = t(&[1., 2., 3., 4., 5., 6., 7., 8., 9.], &[1, 1, 3, 3]);
    let w = t(&[1., 1., 1., 1.], &[1, 1, 2, 2]);
    let y = x.conv2d(&w, 0, 1, 1, 1).unwrap();
    assert_eq!(y.to_vec_f64().unwrap(), vec![12., 16., 24., 28.]);
    // d sum(y) / dx counts the windows covering each input: [[1,2,1],[2,4,2],[1,2,1]].
    let x = x.to_leaf();
    let y = x.conv2d(&w, 0, 1, 1, 1).unwrap().sum_all().unwrap();
    let g = grad(&[y], &[x], GradOptions::default()).unwrap()[0]
        .clone()
        .unwrap();
    assert_eq!(
        g.to_vec_f64().unwrap(),
        vec![1., 2., 1., 2., 4., 2., 1., 2., 1.]
    );
}

#[test]
fn conv_errors_name_both_shapes() {
    let zeros = |shape: &[usize], dtype: DType| Tensor::zeros(shape, dtype, &device()).unwrap();
    let x = zeros(&[1, 5, 4, 4], dtype());
    let w = zeros(&[4, 2, 3, 3], dtype());
    let err = x.conv2d(&w, 0, 1, 1, 2).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("[1, 5, 4, 4]") && msg.contains("[4, 2, 3, 3]"),
        "{msg}"
    );
    let small = zeros(&[1, 4, 2, 2], dtype());
    assert!(matches!(
        small.conv2d(&w, 0, 1, 1, 2),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        x.conv2d(&w, 0, 0, 1, 1),
        Err(Error::InvalidArgument { .. })
    ));
    // A weight of another dtype (f16 where the suites run in f32: every device has it).
    let other = if dtype() == DType::F32 {
        DType::F16
    } else {
        DType::F32
    };
    let w_other = zeros(&[4, 5, 3, 3], other);
    assert!(matches!(
        x.conv2d(&w_other, 0, 1, 1, 1),
        Err(Error::DTypeMismatch { .. })
    ));
    let x1 = zeros(&[1, 5, 4], dtype());
    assert!(matches!(
        x1.conv1d(&w, 0, 1, 1, 1),
        Err(Error::ShapeMismatch { .. })
    ));
}

#[test]
fn max_pool_gradient_goes_to_the_maximum() {
    // One 2x2 window [[1,2],[3,4]]: the maximum 4 gets gradient 1, the rest 0
    // (candle's own backward gives 0.25 there).
    let x = t(&[1., 2., 3., 4.], &[1, 1, 2, 2]).to_leaf();
    let y = x.max_pool2d(2).unwrap();
    assert_eq!(y.to_vec_f64().unwrap(), vec![4.0]);
    let g = grad(&[y.sum_all().unwrap()], &[x], GradOptions::default()).unwrap()[0]
        .clone()
        .unwrap();
    assert_eq!(g.to_vec_f64().unwrap(), vec![0., 0., 0., 1.]);
    // Overlapping windows (stride 1) each send their gradient to their own maximum:
    // [[1,5,2],[3,4,0]] -> windows [[1,5],[3,4]] and [[5,2],[4,0]] both pick the 5.
    let x = t(&[1., 5., 2., 3., 4., 0.], &[1, 1, 2, 3]).to_leaf();
    let y = x.max_pool2d_with_stride(2, 1).unwrap().sum_all().unwrap();
    let g = grad(&[y], &[x], GradOptions::default()).unwrap()[0]
        .clone()
        .unwrap();
    assert_eq!(g.to_vec_f64().unwrap(), vec![0., 2., 0., 0., 0., 0.]);
}

/// Pooling's gradient through finite differences: the 80 inputs are distinct values 1/40
/// apart in a fixed random order, so no difference step (5e-3 in f32) moves an input past
/// another and switches a window's maximum.
#[test]
fn pooling_fd() {
    use rand::seq::SliceRandom;
    let mut values: Vec<f64> = (0..80).map(|k| (f64::from(k) - 39.5) / 40.0).collect();
    values.shuffle(&mut rng(36));
    let xs = [from_f64(values, &[2, 2, 4, 5])];
    check12("max_pool2d 2", |x| x[0].max_pool2d(2)?.sqr(), &xs);
    check12(
        "max_pool2d (2,3) s1",
        |x| x[0].max_pool2d_with_stride((2, 3), 1)?.sqr(),
        &xs,
    );
    check12("avg_pool2d 2", |x| x[0].avg_pool2d(2)?.sqr(), &xs);
    check12(
        "avg_pool2d (2,3) s(1,2)",
        |x| x[0].avg_pool2d_with_stride((2, 3), (1, 2))?.sqr(),
        &xs,
    );
    let err = xs[0].max_pool2d(6).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
}

#[test]
fn softmax_family() {
    let mut r = rng(37);
    let xs = [uniform(&mut r, &[3, 4], -2.0, 2.0)];
    check12("softmax 1", |x| x[0].softmax(1), &xs);
    check12("softmax 0", |x| x[0].softmax(0), &xs);
    check12("log_softmax 1", |x| x[0].log_softmax(1), &xs);
    check12("log_softmax 0", |x| x[0].log_softmax(0), &xs);
    check12("logsumexp 1", |x| x[0].logsumexp(1, false), &xs);
    check12(
        "logsumexp 0 keepdim",
        |x| x[0].logsumexp(0, true)?.mul(&x[0]),
        &xs,
    );
    check_op("log_softmax third order", |x| x[0].log_softmax(1), &xs, 3);
}

#[test]
fn softmax_is_stable() {
    // softmax([1000, 1001]) = (1, e) / (1 + e); logsumexp = 1001 + ln(1 + e^-1).
    let x = t(&[1000.0, 1001.0], &[1, 2]);
    let s = x.softmax(1).unwrap().to_vec_f64().unwrap();
    let e = std::f64::consts::E;
    let tight = value_tol(1e-15);
    assert!(close(s[0], 1.0 / (1.0 + e), tight) && close(s[1], e / (1.0 + e), tight));
    let l = x.logsumexp(1, false).unwrap().to_vec_f64().unwrap();
    assert!(close(l[0], 1001.0 + (1.0 + (-1.0f64).exp()).ln(), tight));
    let ls = x.log_softmax(1).unwrap().to_vec_f64().unwrap();
    assert!(close(
        ls[1],
        -(1.0 + (-1.0f64).exp()).ln(),
        value_tol(1e-12)
    ));
}

#[test]
fn index_select_and_index_add() {
    let mut r = rng(38);
    let xs = [randn(&mut r, &[4, 3]), randn(&mut r, &[4, 5])];
    let rows = idx(&[2, 0, 2]);
    let i1 = rows.clone();
    check12(
        "index_select 0",
        move |x| x[0].index_select(&i1, 0)?.sqr(),
        &xs,
    );
    let cols = idx(&[1, 1, 0, 2]);
    check12(
        "index_select 1",
        move |x| x[0].index_select(&cols, 1)?.sqr(),
        &xs,
    );
    let add = [randn(&mut r, &[4, 3]), randn(&mut r, &[3, 3])];
    check12(
        "index_add",
        move |x| x[0].index_add(&rows, &x[1], 0)?.sqr(),
        &add,
    );
    // Repeated indices accumulate: rows 2, 0, 2 of ones added into zeros -> [1, 0, 2, 0].
    let z = Tensor::zeros(&[4, 1], dtype(), &device()).unwrap();
    let s = Tensor::ones(&[3, 1], dtype(), &device()).unwrap();
    let y = z.index_add(&idx(&[2, 0, 2]), &s, 0).unwrap();
    assert_eq!(y.to_vec_f64().unwrap(), vec![1., 0., 2., 0.]);
}

#[test]
fn gather_and_scatter_add() {
    let mut r = rng(39);
    let x = [randn(&mut r, &[3, 4])];
    let ind = Tensor::from_slice(&[3u32, 0, 0, 1, 2, 2], &[3, 2], &device()).unwrap();
    let i1 = ind.clone();
    check12("gather 1", move |x| x[0].gather(&i1, 1)?.sqr(), &x);
    let i64s = Tensor::from_slice(&[2i64, 0, 1, 1, 0, 2, 2, 1], &[2, 4], &device()).unwrap();
    check12("gather 0 (i64)", move |x| x[0].gather(&i64s, 0)?.sqr(), &x);
    let sc = [randn(&mut r, &[3, 4]), randn(&mut r, &[3, 2])];
    check12(
        "scatter_add 1",
        move |x| x[0].scatter_add(&ind, &x[1], 1)?.sqr(),
        &sc,
    );
    // gather picks x[i][ind[i][j]]: rows of [[0,1,2,3],[4,5,6,7],[8,9,10,11]].
    let v = from_f64((0..12).map(f64::from).collect(), &[3, 4]);
    let ind = Tensor::from_slice(&[3u32, 0, 0, 1, 2, 2], &[3, 2], &device()).unwrap();
    assert_eq!(
        v.gather(&ind, 1).unwrap().to_vec_f64().unwrap(),
        vec![3., 0., 4., 5., 10., 10.]
    );
    // Errors: float indices, an index out of range, a shape that does not fit.
    let bad = t(&[0.0], &[1]);
    assert!(matches!(
        v.index_select(&bad, 0),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(v.index_select(&idx(&[7]), 0).is_err());
    let wrong = Tensor::from_slice(&[0u32; 4], &[2, 2], &device()).unwrap();
    let err = v.gather(&wrong, 1).unwrap_err().to_string();
    assert!(err.contains("[3, 4]") && err.contains("[2, 2]"), "{err}");
}

/// A training-mode BatchNorm for inputs of `rank` (1d for 2 and 3, 2d for 4 and 5) with the
/// given weight and bias `[C]` or `[T, C]` (task-batched: then the statistics are `[T, C]`).
fn batch_norm_with(
    rank: usize,
    channels: &[usize],
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    training: bool,
) -> candle_higher::nn::BatchNorm {
    use candle_higher::nn::{BatchNorm, BatchNormConfig, Buffer};
    let c = *channels.last().unwrap();
    let stats = |v: f64| Tensor::full(v, &[c], dtype(), &device()).unwrap();
    let (w1, b1) = (weight.map(|_| stats(1.0)), bias.map(|_| stats(0.0)));
    let config = BatchNormConfig::default();
    let mut bn = if rank <= 3 {
        BatchNorm::from_tensors_1d(w1, b1, stats(0.5), stats(2.0), config)
    } else {
        BatchNorm::from_tensors_2d(w1, b1, stats(0.5), stats(2.0), config)
    }
    .unwrap();
    if channels.len() == 2 {
        let full = |v: f64| Buffer::new(Tensor::full(v, channels, dtype(), &device()).unwrap());
        bn.running_mean = full(0.5);
        bn.running_var = full(2.0);
    }
    bn.weight = weight.cloned();
    bn.bias = bias.cloned();
    bn.training = training;
    bn
}

/// BatchNorm in training mode (the fused op: batch statistics, normalisation and affine as
/// one recorded op, its backward a fused pass) and in eval mode, first and second order in
/// the input, weight and bias, for inputs [N, C], [N, C, L], [N, C, H, W] and task-batched
/// [T, N, C, H, W] (statistics per task), with and without affine parameters.
#[test]
fn batch_norm_fd() {
    use candle_higher::nn::Module;
    let mut r = rng(40);
    let cases: [(&[usize], &[usize]); 4] = [
        (&[5, 3], &[3]),
        (&[3, 2, 5], &[2]),
        (&[2, 3, 3, 2], &[3]),
        (&[2, 3, 2, 3, 2], &[2, 2]),
    ];
    for (dims, channels) in cases {
        let rank = dims.len();
        // Inputs with a mean away from zero: the centering matters.
        let x = randn(&mut r, dims).add(0.7).unwrap();
        let w = uniform(&mut r, channels, 0.5, 1.5);
        let b = randn(&mut r, channels);
        let ch = channels.to_vec();
        for training in [true, false] {
            let mode = if training { "train" } else { "eval" };
            let ch2 = ch.clone();
            check12(
                &format!("batch_norm {dims:?} {mode}"),
                move |x| {
                    batch_norm_with(rank, &ch2, Some(&x[1]), Some(&x[2]), training).forward(&x[0])
                },
                &[x.clone(), w.clone(), b.clone()],
            );
            let ch2 = ch.clone();
            check12(
                &format!("batch_norm {dims:?} {mode} no affine"),
                move |x| batch_norm_with(rank, &ch2, None, None, training).forward(&x[0]),
                std::slice::from_ref(&x),
            );
        }
    }
}

/// The third derivative of training-mode BatchNorm (through the VJP of its VJP), with the
/// weight and bias, task-batched.
#[test]
fn batch_norm_third_order() {
    use candle_higher::nn::Module;
    let mut r = rng(41);
    let xs = [
        randn(&mut r, &[2, 3, 2, 2, 2]).add(0.4).unwrap(),
        uniform(&mut r, &[2, 2], 0.5, 1.5),
        randn(&mut r, &[2, 2]),
    ];
    check_op(
        "batch_norm third order",
        |x| {
            batch_norm_with(5, &[2, 2], Some(&x[1]), Some(&x[2]), true)
                .forward(&x[0])?
                .tanh()
        },
        &xs,
        3,
    );
}

/// The f32 kernels agree with the f64 ones to f32 precision (statistics accumulate in f64),
/// forward and backward, for a layer-sized input.
#[test]
fn batch_norm_f32_matches_f64() {
    use candle_higher::nn::Module;
    let mut r = rng(42);
    let x = randn(&mut r, &[2, 6, 4, 7, 5]).add(3.0).unwrap();
    let g = randn(&mut r, &[2, 6, 4, 7, 5]);
    let w = uniform(&mut r, &[2, 4], 0.5, 1.5);
    let b = randn(&mut r, &[2, 4]);
    let run = |dtype: candle_higher::DType| {
        let cast = |t: &Tensor| t.to_dtype(dtype).unwrap();
        let (x, w, b) = (cast(&x).to_leaf(), cast(&w).to_leaf(), cast(&b).to_leaf());
        let mut bn = batch_norm_with(5, &[2, 4], Some(&w), Some(&b), true);
        bn.running_mean = candle_higher::nn::Buffer::new(cast(&bn.running_mean.get()));
        bn.running_var = candle_higher::nn::Buffer::new(cast(&bn.running_var.get()));
        let y = bn.forward(&x).unwrap();
        let loss = y.mul(cast(&g)).unwrap().sum_all().unwrap();
        let grads = grad(&[loss], &[x, w, b], GradOptions::default()).unwrap();
        let mut out = vec![y.to_vec_f64().unwrap()];
        out.extend(grads.into_iter().map(|g| g.unwrap().to_vec_f64().unwrap()));
        out
    };
    let (single, double) = (run(candle_higher::DType::F32), run(F64));
    for (what, (a, b)) in ["y", "dx", "dw", "db"]
        .iter()
        .zip(single.iter().zip(&double))
    {
        let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        for (u, v) in a.iter().zip(b) {
            assert!((u - v).abs() <= 1e-5 * scale, "{what}: f32 {u} vs f64 {v}");
        }
    }
}
