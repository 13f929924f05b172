//! Layer construction and forward passes under adversarial configurations and inputs, as
//! torch.nn raises for them: convolutions, pooling, normalisation, dropout, embedding,
//! recurrent layers, losses, `Linear`, `VarBuilder` and the device named by the
//! environment. Every bad input is a typed error naming what is wrong, and a failing call
//! changes nothing the caller had.

use std::process::Command;

use candle_higher::nn::{self, BatchNormConfig, ConvConfig, Module, Parameters, Reduction};
use candle_higher::{parse_device, DType, Error, Tensor};

use crate::common::{device, t};

fn vb(seed: u64) -> nn::VarBuilder {
    nn::VarBuilder::new(seed, DType::F64, &device())
}

fn vals(x: &Tensor) -> Vec<f64> {
    x.to_vec_f64().unwrap()
}

fn ones(shape: &[usize]) -> Tensor {
    Tensor::ones(shape, DType::F64, &device()).unwrap()
}

fn ids_u32(v: &[u32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape, &device()).unwrap()
}

fn ids_i64(v: &[i64], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape, &device()).unwrap()
}

/// The op and message of an `InvalidArgument`, or a panic naming what came instead.
fn invalid<T: std::fmt::Debug>(r: candle_higher::Result<T>) -> (&'static str, String) {
    match r {
        Err(Error::InvalidArgument { op, message }) => (op, message),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

/// The op, expected text and actual dims of a `ShapeMismatch`.
fn shape<T: std::fmt::Debug>(r: candle_higher::Result<T>) -> (&'static str, String, Vec<usize>) {
    match r {
        Err(Error::ShapeMismatch { op, expected, got }) => (op, expected, got),
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Convolutions

#[test]
fn conv_construction_rejects_zero_kernel_stride_and_dilation() {
    let cfg = |stride, dilation| ConvConfig {
        stride,
        dilation,
        ..ConvConfig::default()
    };
    for (k, c, what) in [
        (0, cfg(1, 1), "kernel_size 0"),
        (3, cfg(0, 1), "stride 0"),
        (3, cfg(1, 0), "dilation 0"),
    ] {
        let (op, m) = invalid(nn::conv2d(2, 4, k, c, vb(0)));
        assert_eq!(op, "conv2d");
        assert!(m.contains(what), "{m}");
        let (op, m) = invalid(nn::conv1d(2, 4, k, c, vb(0)));
        assert_eq!(op, "conv1d");
        assert!(m.contains(what), "{m}");
    }
}

#[test]
fn conv_construction_rejects_groups_that_do_not_divide_the_channels() {
    for (i, o, g) in [(4, 6, 0), (3, 6, 2), (4, 3, 2)] {
        let c = ConvConfig {
            groups: g,
            ..ConvConfig::default()
        };
        let (op, m) = invalid(nn::conv2d(i, o, 3, c, vb(0)));
        assert_eq!(op, "conv2d");
        assert!(
            m.contains(&format!("in_channels {i} and out_channels {o}"))
                && m.contains(&format!("groups {g}")),
            "{m}"
        );
        assert_eq!(invalid(nn::conv1d(i, o, 3, c, vb(0))).0, "conv1d");
    }
}

#[test]
fn conv_with_no_input_channels_gives_the_bias() {
    // torch: nn.Conv2d(0, 3, 2)(torch.zeros(1, 0, 4, 4)) is the bias at every position.
    let conv = nn::conv2d(0, 3, 2, ConvConfig::default(), vb(1)).unwrap();
    let y = conv
        .forward(&Tensor::zeros(&[1, 0, 4, 4], DType::F64, &device()).unwrap())
        .unwrap();
    assert_eq!(y.dims(), &[1, 3, 3, 3]);
    // fan_in 0: PyTorch's bound is 0, so the bias is 0.
    assert!(vals(&y).iter().all(|v| *v == 0.0), "{:?}", vals(&y));
    let conv = nn::conv1d(2, 0, 2, ConvConfig::default(), vb(1)).unwrap();
    assert_eq!(conv.forward(&ones(&[3, 2, 5])).unwrap().dims(), &[3, 0, 4]);
}

#[test]
fn conv_padding_larger_than_the_kernel_is_plain_zero_padding() {
    // torch allows it: 1x1 kernel, padding 2 on a 1x1 input gives 5x5, zero but the centre.
    let c = ConvConfig {
        padding: 2,
        ..ConvConfig::default()
    };
    let mut conv = nn::conv2d(1, 1, 1, c, vb(2)).unwrap();
    conv.weight = t(&[2.0], &[1, 1, 1, 1]);
    conv.bias = Some(t(&[0.0], &[1]));
    let y = vals(&conv.forward(&t(&[3.0], &[1, 1, 1, 1])).unwrap());
    assert_eq!(y.len(), 25);
    assert_eq!(y[12], 6.0);
    assert_eq!(y.iter().filter(|v| **v != 0.0).count(), 1);
}

#[test]
fn conv_forward_rejects_inputs_smaller_than_the_dilated_kernel() {
    let c = ConvConfig {
        dilation: 2,
        ..ConvConfig::default()
    };
    // Reach 2 * (3 - 1) + 1 = 5 > 4.
    let conv = nn::conv2d(1, 1, 3, c, vb(3)).unwrap();
    let (op, e, got) = shape(conv.forward(&ones(&[1, 1, 4, 4])));
    assert_eq!((op, got), ("conv2d", vec![1, 1, 4, 4]));
    assert!(e.contains("dilated kernel (5"), "{e}");
    let conv = nn::conv1d(1, 1, 3, c, vb(3)).unwrap();
    let (op, e, _) = shape(conv.forward(&ones(&[1, 1, 4])));
    assert_eq!(op, "conv1d");
    assert!(e.contains("dilated kernel (5"), "{e}");
}

#[test]
fn conv_forward_rejects_wrong_rank_and_channel_count() {
    let conv = nn::conv2d(3, 2, 2, ConvConfig::default(), vb(4)).unwrap();
    // An unbatched [C, H, W] input (torch accepts it; we ask for the batch dim).
    let (op, _, got) = shape(conv.forward(&ones(&[3, 5, 5])));
    assert_eq!((op, got), ("conv2d", vec![3, 5, 5]));
    let (op, e, got) = shape(conv.forward(&ones(&[1, 4, 5, 5])));
    assert_eq!((op, got), ("conv2d", vec![1, 4, 5, 5]));
    assert!(e.contains("3 x groups = 1 input channels"), "{e}");
    let conv = nn::conv1d(3, 2, 2, ConvConfig::default(), vb(4)).unwrap();
    assert_eq!(shape(conv.forward(&ones(&[1, 3, 5, 5]))).0, "conv1d");
    assert_eq!(shape(conv.forward(&ones(&[2, 2, 5]))).2, vec![2, 2, 5]);
}

#[test]
fn conv_forward_rejects_a_config_edited_to_zero() {
    // The config is public: an edit after construction is checked by the op.
    let mut conv = nn::conv2d(1, 1, 2, ConvConfig::default(), vb(5)).unwrap();
    conv.config.stride = 0;
    let (op, m) = invalid(conv.forward(&ones(&[1, 1, 4, 4])));
    assert_eq!(op, "conv2d");
    assert!(m.contains("stride (0)"), "{m}");
    conv.config = ConvConfig {
        groups: 0,
        ..ConvConfig::default()
    };
    assert!(invalid(conv.forward(&ones(&[1, 1, 4, 4])))
        .1
        .contains("groups (0)"));
}

#[test]
fn conv_construction_with_a_fan_in_past_usize_max_is_an_error() {
    // in_channels * k * k overflows: torch would fail to allocate; we must not panic.
    let (op, m) = invalid(nn::conv2d(
        usize::MAX / 2,
        1,
        4,
        ConvConfig::default(),
        vb(0),
    ));
    assert_eq!(op, "conv2d");
    assert!(m.contains("usize::MAX"), "{m}");
}

// ---------------------------------------------------------------------------------------
// Pooling

#[test]
fn pools_reject_zero_kernels_and_strides() {
    let x = ones(&[1, 1, 4, 4]);
    for (kernel, stride) in [((0, 2), (2, 2)), ((2, 2), (0, 1)), ((2, 0), (1, 1))] {
        let mp = nn::MaxPool2d { kernel, stride };
        let (op, m) = invalid(mp.forward(&x));
        assert_eq!(op, "max_pool2d");
        assert!(m.contains("must be positive"), "{m}");
        let ap = nn::AvgPool2d { kernel, stride };
        assert_eq!(invalid(ap.forward(&x)).0, "avg_pool2d");
    }
    assert_eq!(invalid(nn::max_pool2d(0).forward(&x)).0, "max_pool2d");
}

#[test]
fn pools_reject_inputs_smaller_than_the_window_and_wrong_ranks() {
    let (op, e, got) = shape(nn::max_pool2d(3).forward(&ones(&[1, 1, 2, 5])));
    assert_eq!((op, got), ("max_pool2d", vec![1, 1, 2, 5]));
    assert!(e.contains("at least as large as the kernel (3, 3)"), "{e}");
    assert_eq!(
        shape(nn::avg_pool2d(3).forward(&ones(&[1, 1, 5, 2]))).0,
        "avg_pool2d"
    );
    for dims in [&[4, 4][..], &[1, 4, 4], &[1, 1, 1, 4, 4, 1]] {
        assert_eq!(shape(nn::max_pool2d(2).forward(&ones(dims))).2, dims);
    }
}

#[test]
fn pools_of_an_empty_batch_are_empty() {
    // torch: max_pool2d of [0, C, H, W] is [0, C, H', W'].
    let y = nn::max_pool2d(2)
        .forward(&Tensor::zeros(&[0, 2, 4, 4], DType::F64, &device()).unwrap())
        .unwrap();
    assert_eq!(y.dims(), &[0, 2, 2, 2]);
}

// ---------------------------------------------------------------------------------------
// BatchNorm and LayerNorm

fn bn_config(eps: f64, momentum: f64) -> BatchNormConfig {
    BatchNormConfig {
        eps,
        momentum,
        affine: true,
    }
}

#[test]
fn batch_norm_rejects_bad_eps_and_momentum_at_construction() {
    for (eps, momentum, name) in [
        (-1e-5, 0.1, "eps"),
        (f64::NAN, 0.1, "eps"),
        (f64::INFINITY, 0.1, "eps"),
        (1e-5, -0.1, "momentum"),
        (1e-5, 1.5, "momentum"),
        (1e-5, f64::NAN, "momentum"),
    ] {
        for r in [
            nn::batch_norm1d(3, bn_config(eps, momentum), vb(0)),
            nn::batch_norm2d(3, bn_config(eps, momentum), vb(0)),
            nn::BatchNorm::from_tensors_1d(
                None,
                None,
                t(&[0.0; 3], &[3]),
                t(&[1.0; 3], &[3]),
                bn_config(eps, momentum),
            ),
        ] {
            let (op, m) = invalid(r);
            assert_eq!(op, "BatchNorm", "{m}");
            assert!(m.contains(name), "{m}");
        }
    }
    // The edges of the ranges are fine: eps = 0 (torch accepts it), momentum 0 and 1.
    for (eps, momentum) in [(0.0, 0.0), (1e-5, 1.0)] {
        nn::batch_norm1d(3, bn_config(eps, momentum), vb(0)).unwrap();
    }
}

#[test]
fn batch_norm_edited_to_a_bad_config_fails_and_keeps_its_statistics() {
    let mut bn = nn::batch_norm1d(2, BatchNormConfig::default(), vb(0)).unwrap();
    let x = t(&[1.0, 2.0, 3.0, 5.0, 0.0, -1.0], &[3, 2]);
    bn.forward(&x).unwrap();
    let before = (vals(&bn.running_mean.get()), vals(&bn.running_var.get()));
    for cfg in [bn_config(-1.0, 0.1), bn_config(1e-5, 2.0)] {
        bn.config = cfg;
        for training in [true, false] {
            bn.training = training;
            assert_eq!(invalid(bn.forward(&x)).0, "BatchNorm");
            let after = (vals(&bn.running_mean.get()), vals(&bn.running_var.get()));
            assert_eq!(after, before);
        }
    }
}

#[test]
fn batch_norm_rejects_wrong_channels_and_ranks() {
    let bn = nn::batch_norm2d(3, BatchNormConfig::default(), vb(0)).unwrap();
    let (op, e, got) = shape(bn.forward(&ones(&[2, 4, 2, 2])));
    assert_eq!((op, got), ("BatchNorm", vec![2, 4, 2, 2]));
    assert!(e.contains("3 channels"), "{e}");
    assert_eq!(shape(bn.forward(&ones(&[2, 3, 4]))).2, vec![2, 3, 4]);
    let bn = nn::batch_norm1d(3, BatchNormConfig::default(), vb(0)).unwrap();
    assert_eq!(shape(bn.forward(&ones(&[3]))).2, vec![3]);
    assert_eq!(shape(bn.forward(&ones(&[2, 3, 2, 2]))).2, vec![2, 3, 2, 2]);
}

#[test]
fn batch_norm_one_value_per_channel_fails_in_training_and_works_in_eval() {
    // [1, C, 1]: one value per channel (torch: "Expected more than 1 value per channel").
    let mut bn = nn::batch_norm1d(2, BatchNormConfig::default(), vb(0)).unwrap();
    let x = t(&[4.0, -2.0], &[1, 2, 1]);
    let (_, e, _) = shape(bn.forward(&x));
    assert!(e.contains("more than 1 value per channel"), "{e}");
    assert_eq!(vals(&bn.running_mean.get()), vec![0.0, 0.0]);
    bn.eval().unwrap();
    let y = vals(&bn.forward(&x).unwrap());
    let s = (1.0f64 + 1e-5).sqrt();
    assert!(
        (y[0] - 4.0 / s).abs() < 1e-12 && (y[1] + 2.0 / s).abs() < 1e-12,
        "{y:?}"
    );
}

#[test]
fn layer_norm_rejects_an_empty_normalized_shape_and_mismatching_inputs() {
    // torch: "Expected normalized_shape to be at least 1-dimensional".
    let (op, m) = invalid(nn::layer_norm(&[], vb(0)));
    assert_eq!(op, "LayerNorm");
    assert!(m.contains("normalized_shape"), "{m}");
    let ln = nn::layer_norm(&[2, 3], vb(0)).unwrap();
    for dims in [&[4, 3, 2][..], &[3], &[2, 4]] {
        let (op, e, got) = shape(ln.forward(&ones(dims)));
        assert_eq!((op, got.as_slice()), ("LayerNorm", dims));
        assert!(e.contains("[2, 3]"), "{e}");
    }
}

#[test]
fn layer_norm_with_a_bad_eps_is_an_error() {
    let mut ln = nn::layer_norm(&[3], vb(0)).unwrap();
    let x = t(&[1.0, 1.0, 1.0], &[1, 3]);
    for eps in [-1e-5, f64::NAN, f64::INFINITY] {
        ln.eps = eps;
        let (op, m) = invalid(ln.forward(&x));
        assert_eq!(op, "LayerNorm");
        assert!(m.contains("eps"), "{m}");
    }
}

// ---------------------------------------------------------------------------------------
// Dropout

#[test]
fn dropout_rejects_infinite_probabilities() {
    for p in [f64::INFINITY, f64::NEG_INFINITY, -0.0 - 1e-300] {
        assert_eq!(invalid(nn::dropout(p, vb(0))).0, "dropout");
    }
    // -0.0 and 0.0 are fine: the identity.
    let d = nn::dropout(-0.0, vb(0)).unwrap();
    assert_eq!(vals(&d.forward(&t(&[1.5], &[1])).unwrap()), vec![1.5]);
}

#[test]
fn dropout_with_p_edited_out_of_range_is_an_error_not_nan() {
    let mut d = nn::dropout(0.5, vb(0)).unwrap();
    let x = ones(&[4, 4]);
    for p in [f64::NAN, -0.5, 1.5] {
        d.p = p;
        let (op, m) = invalid(d.forward(&x));
        assert_eq!(op, "dropout");
        assert!(m.contains("not in [0, 1]"), "{m}");
    }
}

#[test]
fn dropout_with_p_one_gives_zeros_for_finite_input() {
    let d = nn::dropout(1.0, vb(0)).unwrap();
    let y = vals(&d.forward(&t(&[1e300, -3.0, 0.0], &[3])).unwrap());
    assert_eq!(y, vec![0.0, 0.0, 0.0]);
}

// ---------------------------------------------------------------------------------------
// Embedding

#[test]
fn embedding_rejects_out_of_range_negative_and_fractional_indices() {
    let emb = nn::embedding(4, 2, vb(0)).unwrap();
    let cases: Vec<(Tensor, &str)> = vec![
        (ids_u32(&[0, 4], &[2]), "label 4 at position 1"),
        (ids_i64(&[1, 2, -1], &[3]), "label -1 at position 2"),
        (t(&[0.0, 1.5], &[2]), "label 1.5 at position 1"),
        (t(&[f64::NAN], &[1]), "label NaN at position 0"),
    ];
    for (ids, want) in cases {
        let (op, m) = invalid(emb.forward(&ids));
        assert_eq!(op, "Embedding");
        assert!(m.contains(want), "{m}");
    }
    // No rows at all: every index is out of range.
    let empty = nn::embedding(0, 2, vb(0)).unwrap();
    assert!(invalid(empty.forward(&ids_u32(&[0], &[1])))
        .1
        .contains("0..0"));
}

#[test]
fn embedding_of_an_empty_index_tensor_is_empty() {
    // torch: nn.Embedding(4, 2)(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, 2).
    let emb = nn::embedding(4, 2, vb(0)).unwrap();
    assert_eq!(emb.forward(&ids_u32(&[], &[0])).unwrap().dims(), &[0, 2]);
    assert_eq!(
        emb.forward(&ids_i64(&[], &[2, 0])).unwrap().dims(),
        &[2, 0, 2]
    );
    let empty = nn::embedding(0, 2, vb(0)).unwrap();
    assert_eq!(empty.forward(&ids_u32(&[], &[0])).unwrap().dims(), &[0, 2]);
}

#[test]
fn embedding_takes_whole_float_indices_as_documented() {
    let emb = nn::embedding(3, 2, vb(0)).unwrap();
    let a = vals(&emb.forward(&t(&[2.0, 0.0], &[2])).unwrap());
    let b = vals(&emb.forward(&ids_u32(&[2, 0], &[2])).unwrap());
    assert_eq!(a, b);
}

// ---------------------------------------------------------------------------------------
// RNN, LSTM, GRU

#[test]
fn recurrent_cells_reject_zero_hidden_units() {
    // torch's nn.RNN raises "hidden_size must be greater than zero"; the cells follow.
    for r in [
        nn::rnn_cell(3, 0, vb(0)),
        nn::lstm_cell(3, 0, vb(0)),
        nn::gru_cell(3, 0, vb(0)),
    ] {
        let (op, m) = invalid(r);
        assert_eq!(op, "RecurrentCell");
        assert!(m.contains("hidden size (0)"), "{m}");
    }
}

#[test]
fn recurrent_layers_reject_input_features_rank_and_empty_sequences() {
    let mut lstm = nn::lstm(3, 4, 2, vb(0)).unwrap();
    let (op, e, got) = shape(lstm.forward(&ones(&[5, 2, 4])));
    assert_eq!((op, got), ("RecurrentCell", vec![2, 4]));
    assert!(e.contains("[batch, 3]"), "{e}");
    for dims in [&[2, 3][..], &[1, 5, 2, 3]] {
        assert_eq!(shape(lstm.forward(&ones(dims))).0, "Recurrent");
    }
    let (_, e, _) = shape(lstm.forward(&ones(&[0, 2, 3])));
    assert!(e.contains("at least one step at dim 0"), "{e}");
    lstm.batch_first = true;
    let (_, e, _) = shape(lstm.forward(&ones(&[2, 0, 3])));
    assert!(e.contains("at least one step at dim 1"), "{e}");
    // batch_first puts the batch first in the output too.
    assert_eq!(lstm.forward(&ones(&[2, 5, 3])).unwrap().dims(), &[2, 5, 4]);
}

#[test]
fn recurrent_layers_reject_initial_states_of_the_wrong_shape_or_count() {
    let gru = nn::gru(3, 4, 2, vb(0)).unwrap();
    let x = ones(&[5, 2, 3]);
    let state = |b, h| nn::CellState {
        h: ones(&[b, h]),
        c: None,
    };
    // A state of batch 1 would broadcast to batch 2.
    let (op, e, got) = shape(gru.forward_with_state(&x, Some(vec![state(1, 4), state(2, 4)])));
    assert_eq!((op, got), ("RecurrentCell", vec![1, 4]));
    assert!(e.contains("state h of shape [2, 4]"), "{e}");
    assert_eq!(
        shape(gru.forward_with_state(&x, Some(vec![state(2, 4), state(2, 5)]))).2,
        vec![2, 5]
    );
    let (op, m) = invalid(gru.forward_with_state(&x, Some(vec![state(2, 4)])));
    assert_eq!(op, "Recurrent");
    assert!(m.contains("1 initial states for 2 layers"), "{m}");
    // An LSTM state needs c; a GRU state has none.
    let lstm = nn::lstm(3, 4, 1, vb(0)).unwrap();
    let (_, m) = invalid(lstm.forward_with_state(&x, Some(vec![state(2, 4)])));
    assert!(m.contains("needs a cell state c"), "{m}");
    let with_c = nn::CellState {
        h: ones(&[2, 4]),
        c: Some(ones(&[2, 4])),
    };
    let (_, m) = invalid(gru.forward_with_state(&x, Some(vec![with_c.clone(), with_c])));
    assert!(m.contains("a Gru cell's state has no cell state c"), "{m}");
}

// ---------------------------------------------------------------------------------------
// Losses

#[test]
fn class_losses_reject_labels_of_the_wrong_shape() {
    let logits = ones(&[3, 4]);
    for labels in [ids_u32(&[0, 1], &[2]), ids_u32(&[0, 1, 2], &[3, 1])] {
        let (op, _, got) = shape(nn::cross_entropy(&logits, &labels));
        assert_eq!((op, got), ("nll", vec![3, 4]));
        assert_eq!(
            shape(nn::cross_entropy_with(&logits, &labels, Reduction::Sum)).0,
            "nll"
        );
    }
    let (op, e, _) = shape(nn::cross_entropy(&logits, &ones(&[3, 4])));
    assert_eq!(op, "cross_entropy");
    assert!(e.contains("soft_cross_entropy"), "{e}");
    assert_eq!(
        shape(nn::cross_entropy(
            &ones(&[2, 3, 4]),
            &ids_u32(&[0, 1], &[2])
        ))
        .0,
        "cross_entropy"
    );
}

#[test]
fn class_losses_reject_labels_out_of_range() {
    let logits = ones(&[2, 3]);
    for (labels, want) in [
        (ids_u32(&[0, 3], &[2]), "label 3 at position 1"),
        (ids_i64(&[-1, 0], &[2]), "label -1 at position 0"),
        (t(&[0.5, 1.0], &[2]), "label 0.5 at position 0"),
    ] {
        for r in [
            nn::cross_entropy(&logits, &labels),
            nn::nll(&logits, &labels),
            nn::cross_entropy_with(&logits, &labels, Reduction::None),
        ] {
            let (op, m) = invalid(r);
            assert!(op == "nll" || op == "cross_entropy", "{op}");
            assert!(m.contains(want) && m.contains("0..3"), "{m}");
        }
    }
}

#[test]
fn cross_entropy_of_an_empty_batch_is_nan_as_torch() {
    // torch: F.cross_entropy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) is nan.
    let logits = Tensor::zeros(&[0, 3], DType::F64, &device()).unwrap();
    let labels = ids_u32(&[], &[0]);
    assert!(nn::cross_entropy(&logits, &labels)
        .unwrap()
        .to_scalar_f64()
        .unwrap()
        .is_nan());
    let sum = nn::cross_entropy_with(&logits, &labels, Reduction::Sum).unwrap();
    assert_eq!(sum.to_scalar_f64().unwrap(), 0.0);
}

#[test]
fn elementwise_losses_reject_targets_of_another_shape_or_dtype() {
    let logits = ones(&[2, 3]);
    let (op, _, got) = shape(nn::binary_cross_entropy_with_logits(&logits, &ones(&[3])));
    assert_eq!((op, got), ("binary_cross_entropy_with_logits", vec![3]));
    assert_eq!(
        shape(nn::soft_cross_entropy(
            &logits,
            &ones(&[2, 4]),
            Reduction::Mean
        ))
        .2,
        vec![2, 3]
    );
    let int_targets = ids_u32(&[0, 1, 1, 0, 1, 0], &[2, 3]);
    match nn::binary_cross_entropy_with_logits(&logits, &int_targets) {
        Err(Error::DTypeMismatch { .. }) | Err(Error::UnsupportedDType { .. }) => {}
        other => panic!("{other:?}"),
    }
    // A pred that is not float.
    match nn::mse(&int_targets, &logits) {
        Err(Error::UnsupportedDType { op: "mse", .. }) => {}
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Linear

#[test]
fn linear_with_zero_features_follows_torch() {
    // torch: nn.Linear(0, 2) gives its bias (zero: bound 0); nn.Linear(3, 0) is empty.
    let lin = nn::linear(0, 2, vb(0)).unwrap();
    let y = lin
        .forward(&Tensor::zeros(&[4, 0], DType::F64, &device()).unwrap())
        .unwrap();
    assert_eq!(y.dims(), &[4, 2]);
    assert!(vals(&y).iter().all(|v| *v == 0.0));
    let lin = nn::linear(3, 0, vb(0)).unwrap();
    assert_eq!(lin.forward(&ones(&[4, 3])).unwrap().dims(), &[4, 0]);
}

#[test]
fn linear_rejects_wrong_features_and_scalars() {
    let lin = nn::linear(3, 2, vb(0)).unwrap();
    for dims in [&[4, 2][..], &[]] {
        let (op, e, got) = shape(lin.forward(&ones(dims)));
        assert_eq!((op, got.as_slice()), ("Linear", dims));
        assert!(e.contains("[.., 3]"), "{e}");
    }
}

#[test]
fn linear_with_a_weight_past_usize_max_is_an_error() {
    let (op, m) = invalid(nn::linear(usize::MAX, 2, vb(0)));
    assert_eq!(op, "VarBuilder");
    assert!(m.contains("weight") && m.contains("usize::MAX"), "{m}");
}

// ---------------------------------------------------------------------------------------
// VarBuilder

#[test]
fn var_builder_rejects_bad_distribution_parameters() {
    let b = vb(0);
    for (lo, hi) in [(1.0, 0.0), (f64::NAN, 1.0), (0.0, f64::INFINITY)] {
        let (op, m) = invalid(b.uniform("w", &[3], lo, hi));
        assert_eq!(op, "VarBuilder");
        assert!(m.contains("\"w\"") && m.contains("uniform"), "{m}");
    }
    for (mean, std) in [(0.0, -1.0), (0.0, f64::NAN), (f64::INFINITY, 1.0)] {
        let (_, m) = invalid(b.normal("w", &[3], mean, std));
        assert!(m.contains("normal"), "{m}");
    }
    // lo == hi is a constant, as torch's uniform_(a, a).
    assert_eq!(
        vals(&b.uniform("w", &[2], 0.5, 0.5).unwrap()),
        vec![0.5, 0.5]
    );
    assert_eq!(
        vals(&b.normal("w", &[2], 0.5, 0.0).unwrap()),
        vec![0.5, 0.5]
    );
}

#[test]
fn var_builder_rejects_shapes_that_cannot_be_allocated() {
    let b = vb(0);
    for r in [
        b.zeros("big", &[usize::MAX, 2]),
        b.uniform("big", &[1 << 62, 4], -1.0, 1.0),
        b.normal("big", &[1 << 61], 0.0, 1.0),
    ] {
        let (op, m) = invalid(r);
        assert_eq!(op, "VarBuilder");
        assert!(m.contains("\"big\""), "{m}");
    }
    assert_eq!(invalid(nn::embedding(usize::MAX, 2, vb(0))).0, "VarBuilder");
}

#[test]
fn var_builder_values_follow_the_seed_and_the_full_name() {
    let a = vals(&vb(7).pp("x").uniform("w", &[4], -1.0, 1.0).unwrap());
    assert_eq!(
        a,
        vals(&vb(7).pp("x").uniform("w", &[4], -1.0, 1.0).unwrap())
    );
    assert_ne!(
        a,
        vals(&vb(8).pp("x").uniform("w", &[4], -1.0, 1.0).unwrap())
    );
    assert_ne!(
        a,
        vals(&vb(7).pp("y").uniform("w", &[4], -1.0, 1.0).unwrap())
    );
    // The builder keeps no registry: one name asked twice, with another shape, is a fresh
    // draw from the same stream (its values start alike), not an error.
    let longer = vals(&vb(7).pp("x").uniform("w", &[6], -1.0, 1.0).unwrap());
    assert_eq!(&longer[..4], &a[..]);
}

// ---------------------------------------------------------------------------------------
// Activations and Flatten

#[test]
fn flatten_past_the_rank_is_an_error() {
    let f = nn::Flatten { start_dim: 3 };
    assert!(f.forward(&ones(&[2, 3])).is_err());
}

// ---------------------------------------------------------------------------------------
// The device named by CANDLE_HIGHER_DEVICE

#[test]
fn device_names_that_are_not_devices_say_which_names_are() {
    for spec in ["", "tpu", "CPU", " cpu", "cpu ", "gpu:0", "cuda0"] {
        let (op, m) = invalid(parse_device(spec));
        assert_eq!(op, "device");
        assert!(m.contains(&format!("\"{spec}\"")), "{m}");
        assert!(m.contains("cpu, cuda:N or metal:N"), "{m}");
    }
    for spec in [
        "cuda:",
        "cuda:-1",
        "cuda:x",
        "cuda:0:1",
        "metal:1.5",
        "cpu:x",
    ] {
        let (op, m) = invalid(parse_device(spec));
        assert_eq!(op, "device");
        assert!(
            m.contains(&format!("\"{spec}\"")) && m.contains("not a number"),
            "{m}"
        );
    }
    assert!(parse_device("cpu").unwrap().is_cpu());
    assert!(parse_device("cpu:0").unwrap().is_cpu());
}

#[test]
fn a_cuda_device_that_does_not_exist_is_an_error() {
    for spec in ["cuda:4096", "metal:4096"] {
        let (op, m) = invalid(parse_device(spec));
        assert_eq!(op, "device");
        assert!(m.contains(&format!("\"{spec}\" cannot be opened")), "{m}");
    }
}

const DEVICE_PROBE: &str = "CANDLE_HIGHER_NN_ADVERSARIAL_DEVICE_PROBE";

/// `device_from_env` reads the process environment: each value is tried in a child process
/// of this test binary, so no other test sees it.
#[test]
fn device_from_env_rejects_empty_unknown_and_non_unicode_values() {
    use std::ffi::OsString;
    let mut values: Vec<(OsString, &str)> = vec![
        ("".into(), "device: \"\": expected cpu, cuda:N or metal:N"),
        (
            "npu:1".into(),
            "device: \"npu:1\": expected cpu, cuda:N or metal:N",
        ),
        ("cuda:4096".into(), "device: \"cuda:4096\" cannot be opened"),
        ("cpu".into(), "ok cpu"),
    ];
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStringExt;
        values.push((
            OsString::from_vec(vec![b'c', 0xff, b'u']),
            "device: CANDLE_HIGHER_DEVICE is not valid unicode (\"c\\xFFu\"); expected cpu",
        ));
    }
    for (value, want) in values {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "nn_adversarial::device_probe", "--ignored"])
            .args(["--test-threads=1", "--nocapture"])
            .env(DEVICE_PROBE, "1")
            .env("CANDLE_HIGHER_DEVICE", &value)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{value:?}: {stdout}\n{stderr}"
        );
        assert!(
            stdout.contains(&format!("probe: {want}")),
            "{value:?}: {stdout}"
        );
    }
}

#[test]
#[ignore = "run in a process of its own by device_from_env_rejects_empty_unknown_and_non_unicode_values"]
fn device_probe() {
    if std::env::var_os(DEVICE_PROBE).is_none() {
        return; // --include-ignored: other tests share this process
    }
    match candle_higher::device_from_env() {
        Ok(d) if d.is_cpu() => println!("probe: ok cpu"),
        Ok(d) => println!("probe: ok {d:?}"),
        Err(e @ Error::InvalidArgument { op: "device", .. }) => println!("probe: {e}"),
        Err(e) => println!("probe: another error {e:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Zero-size layers and sizes past usize::MAX

#[test]
fn norms_of_zero_features_are_empty() {
    // torch: nn.BatchNorm1d(0)(torch.zeros(4, 0)) and nn.LayerNorm(0)(torch.zeros(2, 0)).
    let bn = nn::batch_norm1d(0, BatchNormConfig::default(), vb(0)).unwrap();
    let y = bn
        .forward(&Tensor::zeros(&[4, 0], DType::F64, &device()).unwrap())
        .unwrap();
    assert_eq!(y.dims(), &[4, 0]);
    let ln = nn::layer_norm(&[0], vb(0)).unwrap();
    let y = ln
        .forward(&Tensor::zeros(&[2, 0], DType::F64, &device()).unwrap())
        .unwrap();
    assert_eq!(y.dims(), &[2, 0]);
}

#[test]
fn cross_entropy_over_zero_classes_is_an_error() {
    // torch: "Target 0 is out of bounds."
    let logits = Tensor::zeros(&[2, 0], DType::F64, &device()).unwrap();
    let (_, m) = invalid(nn::cross_entropy(&logits, &ids_u32(&[0, 0], &[2])));
    assert!(
        m.contains("label 0 at position 0") && m.contains("0..0"),
        "{m}"
    );
}

#[test]
fn recurrent_cells_with_sizes_past_usize_max_are_errors() {
    // 4 gates * hidden overflows.
    let (op, m) = invalid(nn::lstm_cell(3, usize::MAX / 2, vb(0)));
    assert_eq!(op, "RecurrentCell");
    assert!(m.contains("usize::MAX"), "{m}");
    // [gates * hidden, input] overflows.
    let (op, m) = invalid(nn::gru(usize::MAX / 4, 2, 1, vb(0)));
    assert_eq!(op, "VarBuilder");
    assert!(
        m.contains("weight_ih_l0") && m.contains("usize::MAX"),
        "{m}"
    );
}
