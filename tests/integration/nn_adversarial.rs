//! Layer construction and forward passes under adversarial configurations and inputs, as
//! torch.nn raises for them: convolutions, pooling, normalisation, dropout, embedding,
//! recurrent layers, losses, `Linear`, `VarBuilder` and the device named by the
//! environment. Every bad input is a typed error naming what is wrong, and a failing call
//! changes nothing the caller had.

use std::process::Command;

use candle_higher::nn::{self, BatchNormConfig, ConvConfig, Module, Parameters, Reduction};
use candle_higher::{parse_device, DType, Error, Tensor, TensorId};

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

// ---------------------------------------------------------------------------------------
// Replacing parameters and buffers

fn f64s(data: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_slice(data, shape, &device()).unwrap()
}

/// `[linear 2 -> 3, batch norm 3, linear 3 -> 1]`: parameters `0.weight`, `0.bias`,
/// `1.weight`, `1.bias`, `2.weight`, `2.bias`; buffers `1.running_mean`, `1.running_var`.
fn net() -> nn::Sequential {
    let vb = vb(3);
    nn::seq()
        .add(nn::linear(2, 3, vb.pp("0")).unwrap())
        .add(nn::batch_norm1d(3, BatchNormConfig::default(), vb.pp("1")).unwrap())
        .add(nn::linear(3, 1, vb.pp("2")).unwrap())
}

/// Each parameter's and buffer's name, id, frozen flag and values.
fn listing<M: Parameters + Clone>(m: &M) -> Vec<(String, TensorId, bool, Vec<f64>)> {
    let params = m.named_parameters().unwrap();
    let buffers = m.named_buffers().unwrap();
    params
        .into_iter()
        .chain(buffers)
        .map(|(n, t)| (n, t.id(), t.requires_grad(), vals(&t)))
        .collect()
}

/// A replacement of another dtype is `ParamDType` naming the parameter (or buffer) and its
/// position, wherever it is in the list; on another device, `ParamDevice` (checked where
/// the suites run off the CPU). Nothing changes.
#[test]
fn set_parameters_names_the_replacement_of_another_dtype_or_device() {
    let mut model = net();
    let before = listing(&model);
    let named = model.named_parameters().unwrap();
    let params: Vec<Tensor> = named.iter().map(|(_, t)| t.clone()).collect();
    for (i, (name, p)) in named.iter().enumerate() {
        let mut list = params.clone();
        list[i] = p.to_dtype(DType::F32).unwrap().to_leaf();
        match model.set_parameters(&list) {
            Err(Error::ParamDType {
                op: "set_parameters",
                what: "parameter",
                position,
                name: n,
                expected: DType::F64,
                got: DType::F32,
            }) => assert_eq!((position, &n), (i, name)),
            other => panic!("{i}: {other:?}"),
        }
        assert_eq!(listing(&model), before, "{name}");
    }
    let mut list = params.clone();
    list[1] = list[1].to_dtype(DType::F32).unwrap();
    assert_eq!(
        model.set_parameters(&list).unwrap_err().to_string(),
        "set_parameters: parameter 1 (0.bias) has dtype F64, the replacement has dtype F32"
    );
    let named_buffers = model.named_buffers().unwrap();
    let buffers: Vec<Tensor> = named_buffers.iter().map(|(_, t)| t.clone()).collect();
    for (i, (name, b)) in named_buffers.iter().enumerate() {
        let mut list = buffers.clone();
        list[i] = b.to_dtype(DType::F32).unwrap();
        match model.set_buffers(&list) {
            Err(Error::ParamDType {
                op: "set_buffers",
                what: "buffer",
                position,
                name: n,
                ..
            }) => assert_eq!((position, &n), (i, name)),
            other => panic!("{i}: {other:?}"),
        }
        assert_eq!(listing(&model), before, "{name}");
    }
    // A wrong shape still comes first, as `ParamShape`.
    let mut list = params.clone();
    list[2] = f64s(&[0.0; 4], &[4]).to_dtype(DType::F32).unwrap();
    match model.set_parameters(&list) {
        Err(Error::ParamShape { name, position, .. }) => {
            assert_eq!(name, "1.weight");
            assert_eq!(position, 2);
        }
        other => panic!("{other:?}"),
    }
    if !device().is_cpu() {
        let cpu = candle_higher::Device::Cpu;
        for (i, (name, p)) in named.iter().enumerate() {
            let mut list = params.clone();
            list[i] = p.to_device(&cpu).unwrap().to_leaf();
            match model.set_parameters(&list) {
                Err(Error::ParamDevice {
                    op: "set_parameters",
                    what: "parameter",
                    position,
                    name: n,
                    expected,
                    got,
                }) => {
                    assert_eq!((position, &n), (i, name));
                    assert_eq!(got, "Cpu");
                    assert_ne!(expected, got);
                }
                other => panic!("{i}: {other:?}"),
            }
        }
        let mut list = buffers.clone();
        list[1] = list[1].to_device(&cpu).unwrap();
        match model.set_buffers(&list) {
            Err(Error::ParamDevice {
                position: 1, name, ..
            }) => {
                assert_eq!(name, "1.running_var")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(listing(&model), before);
    }
}

/// `FunctionalModel::update_params` and `write_back_params` check their lists the same
/// way: a weight of another dtype is named with its position.
#[test]
fn update_params_and_write_back_name_the_weight_of_another_dtype() {
    let mut model = net();
    let mut fmodel =
        candle_higher::FunctionalModel::new(&model, candle_higher::FunctionalOptions::default())
            .unwrap();
    let mut list = fmodel.fast_params().to_vec();
    list[4] = list[4].to_dtype(DType::F32).unwrap().to_leaf();
    match fmodel.update_params(list) {
        Err(Error::ParamDType {
            op: "update_params",
            position: 4,
            name,
            ..
        }) => assert_eq!(name, "2.weight"),
        other => panic!("{other:?}"),
    }
    assert_eq!(fmodel.time(), 0);
    // A base model whose bias is now f32: writing back names it.
    let mut params = model.parameters().unwrap();
    params[3] = params[3].to_dtype(DType::F32).unwrap().to_leaf();
    let mut base = net();
    base.visit(&mut nn::Visitor::new(&mut |n, e| {
        if let (nn::Entry::Param(t), "1.bias") = (e, n) {
            *t = params[3].clone();
        }
        Ok(())
    }))
    .unwrap();
    let before = listing(&base);
    match fmodel.write_back_params(&mut base) {
        Err(Error::ParamDType {
            op: "write_back_params",
            position: 3,
            name,
            expected: DType::F32,
            got: DType::F64,
            ..
        }) => assert_eq!(name, "1.bias"),
        other => panic!("{other:?}"),
    }
    assert_eq!(listing(&base), before);
    // The model itself was never touched.
    let _ = &mut model;
}

/// How a [`Fickle`] model shows its fields on one walk.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Show {
    /// Flag `t0`, `a`, `ra`, `b`, `rb`, `c`, `rc`, flag `t1`.
    All,
    /// Another parameter and buffer before all the others.
    ExtraFirst,
    /// Another parameter and buffer after all the others.
    ExtraLast,
    /// Without `b` and `rb`.
    DropMiddle,
    /// An error from `visit` after `t0`, `a` and `ra`.
    FailAfterA,
}

/// A hand-written model with a buggy `visit`: its `n`-th walk shows the fields as
/// `script[n]` says, all of them once the script is done. Every parameter and buffer has
/// shape `[2]`, so a shifted write fits. `c` may be tied to `a`.
#[derive(Clone)]
struct Fickle {
    a: Tensor,
    b: Tensor,
    c: Tensor,
    extra: Tensor,
    ra: nn::Buffer,
    rb: nn::Buffer,
    rc: nn::Buffer,
    rextra: nn::Buffer,
    t0: bool,
    t1: bool,
    walks: usize,
    script: Vec<Show>,
}

impl Parameters for Fickle {
    fn visit(&mut self, v: &mut nn::Visitor<'_>) -> candle_higher::Result<()> {
        let show = self.script.get(self.walks).copied().unwrap_or(Show::All);
        self.walks += 1;
        if show == Show::ExtraFirst {
            v.param("extra", &mut self.extra)?;
            v.buffer("rextra", &mut self.rextra)?;
        }
        v.training(&mut self.t0)?;
        v.param("a", &mut self.a)?;
        v.buffer("ra", &mut self.ra)?;
        if show == Show::FailAfterA {
            return Err(Error::InvalidArgument {
                op: "Fickle::visit",
                message: "failed part-way".into(),
            });
        }
        if show != Show::DropMiddle {
            v.param("b", &mut self.b)?;
            v.buffer("rb", &mut self.rb)?;
        }
        v.param("c", &mut self.c)?;
        v.buffer("rc", &mut self.rc)?;
        v.training(&mut self.t1)?;
        if show == Show::ExtraLast {
            v.param("extra", &mut self.extra)?;
            v.buffer("rextra", &mut self.rextra)?;
        }
        Ok(())
    }
}

impl Module for Fickle {
    fn forward(&self, x: &Tensor) -> candle_higher::Result<Tensor> {
        x.mul(&self.a)?.add(&self.b)?.mul(&self.c)
    }
}

fn fickle(tied: bool) -> Fickle {
    let leaf = |v: f64| f64s(&[v, -v], &[2]).to_leaf();
    let a = leaf(1.0);
    Fickle {
        c: if tied { a.clone() } else { leaf(3.0) },
        a,
        b: leaf(2.0),
        extra: leaf(4.0),
        ra: nn::Buffer::new(f64s(&[5.0, 5.0], &[2])),
        rb: nn::Buffer::new(f64s(&[6.0, 6.0], &[2])),
        rc: nn::Buffer::new(f64s(&[7.0, 7.0], &[2])),
        rextra: nn::Buffer::new(f64s(&[8.0, 8.0], &[2])),
        t0: true,
        t1: false,
        walks: 0,
        script: Vec::new(),
    }
}

/// Every field of a [`Fickle`], read without walking it: each tensor's id, frozen flag
/// and values (parameters, then buffers), and the two flags.
type Fields = (Vec<(TensorId, bool, Vec<f64>)>, [bool; 2]);

fn fields(m: &Fickle) -> Fields {
    let buffers = [&m.ra, &m.rb, &m.rc, &m.rextra].map(nn::Buffer::get);
    let tensors = [&m.a, &m.b, &m.c, &m.extra]
        .into_iter()
        .chain(&buffers)
        .map(|t| (t.id(), t.requires_grad(), vals(t)))
        .collect();
    (tensors, [m.t0, m.t1])
}

/// The error of a write into a `Fickle` whose walk shows `show`.
fn assert_visit_error(show: Show, err: &Error, case: &str) {
    match (show, err) {
        (Show::FailAfterA, Error::InvalidArgument { op, .. }) => {
            assert_eq!(*op, "Fickle::visit", "{case}")
        }
        (_, Error::InvalidArgument { op, message }) => {
            assert_eq!(*op, "Parameters::visit", "{case}");
            assert!(
                message.contains("slots, but") || message.contains("no longer holds"),
                "{case}: {message}"
            );
            assert!(
                !message.contains("could not be put back"),
                "{case}: {message}"
            );
        }
        _ => panic!("{case}: {err:?}"),
    }
}

const FICKLE: [Show; 4] = [
    Show::ExtraFirst,
    Show::ExtraLast,
    Show::DropMiddle,
    Show::FailAfterA,
];

/// The walk that writes shows other slots than the walk that listed them (or fails
/// part-way): `set_parameters` and `set_buffers` put back what they wrote, whatever the
/// walk that puts back shows (all the fields, or the same as the write), tied slots
/// included. Before, the slots seen before the mismatch (shifted ones included) kept the
/// new tensors.
#[test]
fn set_parameters_and_set_buffers_leave_a_model_with_a_changing_visit_as_it_was() {
    for show in FICKLE {
        for script in [
            vec![Show::All, show],
            vec![Show::All, show, show],
            vec![show, Show::All],
        ] {
            for tied in [false, true] {
                if show == Show::FailAfterA && script[0] == show {
                    continue; // the first walk fails: nothing to list
                }
                let case = format!("{script:?}, tied {tied}");
                let mut m = fickle(tied);
                m.script = script.clone();
                // The lists are made from what the first walk shows, as `set_parameters`
                // sees it.
                let n = m.parameters().unwrap().len();
                let nb = m.named_buffers().unwrap().len();
                let before = fields(&m);
                let params: Vec<Tensor> = (0..n)
                    .map(|i| f64s(&[10.0 + i as f64, 0.0], &[2]).to_leaf())
                    .collect();
                let err = m.set_parameters(&params).unwrap_err();
                assert_visit_error(show, &err, &case);
                assert_eq!(fields(&m), before, "set_parameters: {case}");
                m.walks = 0;
                let buffers: Vec<Tensor> = (0..nb)
                    .map(|i| f64s(&[20.0 + i as f64, 0.0], &[2]))
                    .collect();
                let err = m.set_buffers(&buffers).unwrap_err();
                assert_visit_error(show, &err, &case);
                assert_eq!(fields(&m), before, "set_buffers: {case}");
            }
        }
    }
}

/// The same for writing an fmodel's weights and buffers back into a base model whose
/// `visit` changes between walks.
#[test]
fn write_back_into_a_model_with_a_changing_visit_leaves_it_as_it_was() {
    let model = fickle(false);
    let fmodel =
        candle_higher::FunctionalModel::new(&model, candle_higher::FunctionalOptions::default())
            .unwrap();
    for show in FICKLE {
        let mut base = fickle(false);
        base.script = vec![Show::All, show];
        let before = fields(&base);
        let err = fmodel.write_back_params(&mut base).unwrap_err();
        assert_visit_error(show, &err, &format!("{show:?}"));
        assert_eq!(fields(&base), before, "write_back_params: {show:?}");
        base.walks = 0;
        let err = fmodel.write_back_buffers(&mut base).unwrap_err();
        assert_visit_error(show, &err, &format!("{show:?}"));
        assert_eq!(fields(&base), before, "write_back_buffers: {show:?}");
    }
}

/// `train`/`eval` and `set_frozen` on a model whose `visit` fails part-way: the flags and
/// slots already changed are put back (a tied parameter is not left half frozen).
#[test]
fn train_and_set_frozen_put_back_what_a_failing_visit_changed() {
    let mut m = fickle(true);
    m.script = vec![Show::FailAfterA];
    let before = fields(&m);
    let err = m.eval().unwrap_err();
    assert_visit_error(Show::FailAfterA, &err, "eval");
    assert_eq!(fields(&m), before, "eval");
    // The first walk finds `a`; the second, which replaces it, fails after it.
    m.walks = 0;
    m.script = vec![Show::All, Show::FailAfterA];
    let err = m.set_frozen("a", true).unwrap_err();
    assert_visit_error(Show::FailAfterA, &err, "set_frozen");
    assert_eq!(fields(&m), before, "set_frozen");
    assert_eq!(m.a.id(), m.c.id());
    // With a visit that works, both tied slots are frozen together.
    m.set_frozen("a", true).unwrap();
    assert!(!m.a.requires_grad() && m.a.id() == m.c.id());
}

/// The rule of `set_parameters`: the tensors are used as they are. A constant freezes a
/// trainable parameter, a leaf keeps (or makes) it trainable, as in higher's
/// `update_params` and `torch.func.functional_call` (not torch's `load_state_dict`).
#[test]
fn set_parameters_uses_the_given_tensors_frozen_flags_included() {
    let mut model = net();
    let params = model.parameters().unwrap();
    let constants: Vec<Tensor> = params.iter().map(Tensor::detach).collect();
    model.set_parameters(&constants).unwrap();
    assert!(model.param_infos().unwrap().iter().all(|p| p.frozen));
    let ids: Vec<TensorId> = model.parameters().unwrap().iter().map(Tensor::id).collect();
    assert_eq!(ids, constants.iter().map(Tensor::id).collect::<Vec<_>>());
    let leaves: Vec<Tensor> = constants.iter().map(Tensor::to_leaf).collect();
    model.set_parameters(&leaves).unwrap();
    assert!(model.param_infos().unwrap().iter().all(|p| !p.frozen));
}

// ---------------------------------------------------------------------------------------
// Dropout's generator when a forward fails

/// `[dropout 0.5, linear 3 -> 2]`.
fn dropout_net() -> nn::Sequential {
    let vb = vb(21);
    nn::seq()
        .add(nn::dropout(0.5, vb.pp("0")).unwrap())
        .add(nn::linear(3, 2, vb.pp("1")).unwrap())
}

/// A pass that fails after the dropout drew its mask (the next layer rejects the input's
/// shape or dtype) leaves the generator as it was: the retried pass gives what a first
/// attempt gives, and the pass after it what a second gives. Before, the failed pass had
/// used up a mask.
#[test]
fn a_failed_forward_does_not_advance_the_dropout_generator() {
    let x = f64s(
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 1.0, 2.0, 3.0],
        &[4, 3],
    );
    let fresh = dropout_net();
    let first = vals(&fresh.forward(&x).unwrap());
    let second = vals(&fresh.forward(&x).unwrap());
    assert_ne!(first, second);
    for bad in [ones(&[4, 5]), x.to_dtype(DType::F32).unwrap()] {
        let model = dropout_net();
        assert!(model.forward(&bad).is_err());
        assert!(model.forward(&bad).is_err());
        assert_eq!(vals(&model.forward(&x).unwrap()), first, "{bad:?}");
        assert_eq!(vals(&model.forward(&x).unwrap()), second, "{bad:?}");
    }
    // A lone dropout given an integer input draws nothing either.
    let d = nn::dropout(0.5, vb(22)).unwrap();
    let fresh = d.clone();
    assert!(matches!(
        d.forward(&ids_u32(&[1, 2, 3], &[3])),
        Err(Error::UnsupportedDType { .. })
    ));
    assert_eq!(
        vals(&d.forward(&x).unwrap()),
        vals(&fresh.forward(&x).unwrap())
    );
}

/// The same through a `FunctionalModel`, whose forward passes undo a failed pass's draws.
#[test]
fn a_failed_fmodel_forward_does_not_advance_the_dropout_generator() {
    let x = ones(&[4, 3]);
    let options = candle_higher::FunctionalOptions::default();
    let fresh = candle_higher::FunctionalModel::new(&dropout_net(), options).unwrap();
    let first = vals(&fresh.forward(&x).unwrap());
    let fmodel = candle_higher::FunctionalModel::new(&dropout_net(), options).unwrap();
    assert!(fmodel.forward(&ones(&[4, 5])).is_err());
    assert_eq!(vals(&fmodel.forward(&x).unwrap()), first);
}

/// Weight dropout: a forward whose wrapped layer rejects the input, and `sample_masks`
/// failing on its second raw weight (edited to an integer tensor), leave the generator as
/// it was: the next masks are a first attempt's.
#[test]
fn a_failed_weight_dropout_forward_does_not_advance_its_generator() {
    let vb = vb(31);
    let wd = nn::weight_dropout(
        nn::linear(3, 2, vb.pp("0")).unwrap(),
        &["weight", "bias"],
        0.5,
        vb,
    )
    .unwrap();
    let fresh = wd.clone();
    let x = ones(&[4, 3]);
    assert!(wd.forward(&ones(&[4, 5])).is_err());
    assert_eq!(
        vals(&wd.forward(&x).unwrap()),
        vals(&fresh.forward(&x).unwrap())
    );
    let mut wd = fresh.clone();
    let fresh_masks: Vec<Vec<f64>> = fresh.sample_masks().unwrap().iter().map(vals).collect();
    let bias = wd.raw[1].clone();
    wd.raw[1] = ids_u32(&[1, 2], &[2]);
    assert!(matches!(
        wd.sample_masks(),
        Err(Error::UnsupportedDType { .. })
    ));
    wd.raw[1] = bias;
    let masks: Vec<Vec<f64>> = wd.sample_masks().unwrap().iter().map(vals).collect();
    assert_eq!(masks, fresh_masks);
}

/// A dropout inside a layer that weight norm or weight dropout wraps advances at each
/// forward, as the same layer unwrapped does (the wrapper runs a copy of the layer; the
/// copy used to draw from a copy of the generator, so every forward had the first mask).
#[test]
fn a_dropout_inside_a_reparametrized_layer_draws_a_new_mask_at_each_forward() {
    let layer = || {
        let vb = vb(41);
        nn::seq()
            .add(nn::linear(3, 4, vb.pp("0")).unwrap())
            .add(nn::dropout(0.5, vb.pp("1")).unwrap())
    };
    let x = ones(&[5, 3]);
    let plain = layer();
    let want: Vec<Vec<f64>> = (0..3).map(|_| vals(&plain.forward(&x).unwrap())).collect();
    assert_ne!(want[0], want[1]);
    // p = 0: the wrapper runs the layer with its own weights.
    let wd = nn::weight_dropout(layer(), &["0.weight"], 0.0, vb(42)).unwrap();
    let got: Vec<Vec<f64>> = (0..3).map(|_| vals(&wd.forward(&x).unwrap())).collect();
    assert_eq!(got, want);
    // Weight norm recomputes the weight (equal up to rounding): the zeros move.
    let wn = nn::weight_norm(layer(), "0.weight").unwrap();
    let zeros = |v: &[f64]| v.iter().map(|y| *y == 0.0).collect::<Vec<_>>();
    let got: Vec<Vec<f64>> = (0..3).map(|_| vals(&wn.forward(&x).unwrap())).collect();
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(zeros(g), zeros(w));
    }
}

/// A load whose buffer write meets a walk that shows other slots (whichever walk of the
/// load it is) changes nothing: before, the parameters it had written stayed.
#[test]
fn a_load_that_fails_writing_the_buffers_puts_the_parameters_back() {
    let dict: std::collections::HashMap<String, candle_higher::candle::Tensor> = [
        ("a", 11.0),
        ("b", 12.0),
        ("c", 13.0),
        ("ra", 15.0),
        ("rb", 16.0),
        ("rc", 17.0),
    ]
    .into_iter()
    .map(|(n, v)| (n.to_string(), f64s(&[v, v], &[2]).value().clone()))
    .collect();
    let mut failed = 0;
    for show in [Show::ExtraFirst, Show::ExtraLast, Show::DropMiddle] {
        for walks_before in 0..5 {
            let mut m = fickle(false);
            m.script = vec![Show::All; walks_before];
            m.script.push(show);
            let before = fields(&m);
            match nn::load_state_dict(&mut m, &dict, "dict") {
                Ok(()) => assert_ne!(fields(&m), before),
                Err(e) => {
                    failed += 1;
                    let case = format!("{show:?} after {walks_before} walks");
                    // A listing walk that shows other names is a mismatch with the dict.
                    if !matches!(e, Error::LoadMismatch { .. }) {
                        assert_visit_error(show, &e, &case);
                    }
                    assert_eq!(fields(&m), before, "{case}");
                }
            }
        }
    }
    // Every script fails at some walk of the load: listing, the parameters or the buffers.
    assert!(failed >= 9, "{failed}");
}
