//! The intent of higher's test_patch.py / test_higher.py, in f64: forward parity of an
//! fmodel with its base for several architectures, a hand-written SGD unroll through
//! `update_params` whose meta-gradients reach every used parameter (and no unused one),
//! central finite differences for the MAML-Omniglot CNN, WeightDropout and weight norm
//! after 3 unrolled steps, and batch-norm buffers kept apart from the base model.

use candle_higher::nn::{self, ConvConfig, Module, Parameters, Visitor};
use candle_higher::{grad, DType, FunctionalModel, FunctionalOptions, GradOptions, Result, Tensor};

fn vb(seed: u64) -> nn::VarBuilder {
    nn::VarBuilder::new(seed, DType::F64, &crate::common::device())
}

fn input(shape: &[usize], seed: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n).map(|i| ((i as f64 + seed) * 0.713).sin()).collect();
    Tensor::from_vec(data, shape, &crate::common::device()).unwrap()
}

fn labels(values: &[u32]) -> Tensor {
    Tensor::from_vec(values.to_vec(), &[values.len()], &crate::common::device()).unwrap()
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

fn parity<M: Module + Parameters + Clone>(model: &M, x: &Tensor) {
    let fmodel = FunctionalModel::new(model, FunctionalOptions::default()).unwrap();
    // Run the fmodel first: a base in train mode must not have moved its buffers.
    let yf = fmodel.forward(x).unwrap();
    let yb = model.forward(x).unwrap();
    assert_eq!(max_abs_diff(&yb, &yf), 0.0);
}

/// A model with a parameter its forward never uses.
#[derive(Clone)]
struct WithUnused {
    fc: nn::Linear,
    unused: Tensor,
}

impl WithUnused {
    fn new() -> Self {
        let vb = vb(11);
        WithUnused {
            fc: nn::linear(3, 2, vb.pp("fc")).unwrap(),
            unused: vb.uniform("unused", &[4], -1.0, 1.0).unwrap(),
        }
    }
}

impl Parameters for WithUnused {
    fn visit(&mut self, v: &mut Visitor<'_>) -> Result<()> {
        v.module("fc", &mut self.fc)?;
        v.param("unused", &mut self.unused)
    }
}

impl Module for WithUnused {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc.forward(x)
    }
}

fn bn_mlp() -> nn::Sequential {
    let vb = vb(12);
    nn::seq()
        .add(nn::linear(3, 6, vb.pp("0")).unwrap())
        .add(nn::batch_norm1d(6, nn::BatchNormConfig::default(), vb.pp("1")).unwrap())
        .add(nn::Activation::Relu)
        .add(nn::linear(6, 2, vb.pp("3")).unwrap())
}

/// An LSTM over a sequence followed by a readout of the last step.
#[derive(Clone)]
struct SeqModel {
    lstm: nn::Recurrent,
    head: nn::Linear,
}

impl SeqModel {
    fn new() -> Self {
        let vb = vb(13);
        SeqModel {
            lstm: nn::lstm(3, 5, 2, vb.pp("lstm")).unwrap(),
            head: nn::linear(5, 2, vb.pp("head")).unwrap(),
        }
    }
}

impl Parameters for SeqModel {
    fn visit(&mut self, v: &mut Visitor<'_>) -> Result<()> {
        v.module("lstm", &mut self.lstm)?;
        v.module("head", &mut self.head)
    }
}

impl Module for SeqModel {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.lstm.forward(x)?;
        let last = y.narrow(0, y.dims()[0] - 1, 1)?.squeeze(0)?;
        self.head.forward(&last)
    }
}

/// The MAML-Omniglot CNN: 3 x [Conv2d(64, 3x3), BatchNorm2d(momentum = 1), ReLU,
/// MaxPool2d(2)], Flatten, Linear(64, n_way); 28x28 inputs.
fn omniglot_cnn(n_way: usize) -> nn::Sequential {
    let vb = vb(14);
    let bn = nn::BatchNormConfig {
        momentum: 1.0,
        ..Default::default()
    };
    let mut s = nn::seq();
    let mut i = 0;
    for cin in [1, 64, 64] {
        s = s
            .add(nn::conv2d(cin, 64, 3, ConvConfig::default(), vb.pp(i)).unwrap())
            .add(nn::batch_norm2d(64, bn, vb.pp(i + 1)).unwrap())
            .add(nn::Activation::Relu)
            .add(nn::max_pool2d(2));
        i += 4;
    }
    s.add(nn::flatten())
        .add(nn::linear(64, n_way, vb.pp(i + 1)).unwrap())
}

#[test]
fn forward_parity_across_architectures() {
    parity(
        &nn::seq()
            .add(nn::linear(3, 4, vb(1).pp("0")).unwrap())
            .add(nn::Activation::Tanh),
        &input(&[5, 3], 0.0),
    );
    parity(&WithUnused::new(), &input(&[5, 3], 1.0));
    parity(&bn_mlp(), &input(&[5, 3], 2.0));
    parity(&SeqModel::new(), &input(&[4, 2, 3], 3.0));
    parity(&omniglot_cnn(5), &input(&[2, 1, 28, 28], 4.0));
}

/// `steps` of SGD on `loss_fn` through `update_params`; returns the fmodel.
fn unroll<M: Module + Parameters + Clone>(
    model: &M,
    steps: usize,
    lr: f64,
    create_graph: bool,
    loss_fn: &dyn Fn(&Tensor) -> Tensor,
    x: &Tensor,
) -> FunctionalModel<M> {
    let mut fmodel = FunctionalModel::new(model, FunctionalOptions::default()).unwrap();
    for _ in 0..steps {
        let loss = loss_fn(&fmodel.forward(x).unwrap());
        let params = fmodel.fast_params().to_vec();
        let opts = GradOptions {
            create_graph,
            ..Default::default()
        }
        .allow_unused(true);
        let grads = grad(&[loss], &params, opts).unwrap();
        let new = params
            .iter()
            .zip(grads)
            .map(|(p, g)| match g {
                Some(g) => p.sub(g.affine(lr, 0.0).unwrap()).unwrap(),
                None => p.clone(),
            })
            .collect();
        fmodel.update_params(new).unwrap();
    }
    fmodel
}

#[test]
fn every_used_parameter_gets_a_meta_gradient_and_the_unused_one_none() {
    let mse_to_zero = |y: &Tensor| y.sqr().unwrap().mean_all().unwrap();
    let x = input(&[5, 3], 0.5);
    let fmodel = unroll(&WithUnused::new(), 3, 0.1, true, &mse_to_zero, &x);
    let meta = mse_to_zero(&fmodel.forward(&x).unwrap());
    let g = grad(
        &[meta],
        fmodel.parameters(0).unwrap(),
        GradOptions::default().allow_unused(true),
    )
    .unwrap();
    assert_eq!(fmodel.names(), ["fc.weight", "fc.bias", "unused"]);
    assert!(g[0].is_some() && g[1].is_some());
    assert!(g[2].is_none());

    // The same for the BN MLP and the LSTM: every parameter is used.
    let fmodel = unroll(&bn_mlp(), 3, 0.1, true, &mse_to_zero, &x);
    let meta = mse_to_zero(&fmodel.forward(&x).unwrap());
    let g = grad(
        &[meta],
        fmodel.parameters(0).unwrap(),
        GradOptions::default(),
    )
    .unwrap();
    assert!(g.iter().all(Option::is_some));
    let xs = input(&[4, 2, 3], 1.5);
    let fmodel = unroll(&SeqModel::new(), 2, 0.1, true, &mse_to_zero, &xs);
    let meta = mse_to_zero(&fmodel.forward(&xs).unwrap());
    let g = grad(
        &[meta],
        fmodel.parameters(0).unwrap(),
        GradOptions::default(),
    )
    .unwrap();
    assert_eq!(g.len(), 10);
    assert!(g.iter().all(Option::is_some));
}

/// Central finite differences of `meta_loss(model)` w.r.t. coordinate `j` of parameter
/// `k`, compared with `analytic`.
fn check_fd<M: Module + Parameters + Clone>(
    model: &M,
    meta_loss: &dyn Fn(&M) -> f64,
    analytic: &[Option<Tensor>],
    coords: &[(usize, usize)],
    eps: f64,
    tol: f64,
) {
    let params = model.parameters().unwrap();
    for &(k, j) in coords {
        let perturbed = |delta: f64| {
            let mut m = model.clone();
            let mut ps = params.clone();
            let mut v = ps[k].to_vec_f64().unwrap();
            v[j] += delta;
            ps[k] = Tensor::from_vec(v, ps[k].dims(), &crate::common::device())
                .unwrap()
                .to_leaf();
            m.set_parameters(&ps).unwrap();
            meta_loss(&m)
        };
        let fd = (perturbed(eps) - perturbed(-eps)) / (2.0 * eps);
        let an = analytic[k].as_ref().unwrap().to_vec_f64().unwrap()[j];
        let err = (fd - an).abs() / fd.abs().max(an.abs()).max(1e-6);
        assert!(
            err < tol,
            "param {k} coord {j}: fd {fd} analytic {an} rel err {err}"
        );
    }
}

#[test]
fn omniglot_cnn_meta_gradient_matches_finite_differences() {
    // 5-way, 1 image per class in the support set; the query set is another batch.
    let model = omniglot_cnn(5);
    let xs = input(&[5, 1, 28, 28], 0.25);
    let ys = labels(&[0, 1, 2, 3, 4]);
    let xq = input(&[5, 1, 28, 28], 7.0);
    let yq = labels(&[4, 3, 2, 1, 0]);
    let ce = |y: &Tensor| nn::cross_entropy(y, &ys).unwrap();
    let meta_loss = |m: &nn::Sequential, create_graph: bool| {
        let fmodel = unroll(m, 3, 0.05, create_graph, &ce, &xs);
        let meta = nn::cross_entropy(&fmodel.forward(&xq).unwrap(), &yq).unwrap();
        (fmodel, meta)
    };
    let (fmodel, meta) = meta_loss(&model, true);
    let g = grad(
        &[meta],
        fmodel.parameters(0).unwrap(),
        GradOptions::default(),
    )
    .unwrap();
    assert!(g.iter().all(Option::is_some));
    let names = fmodel.names().to_vec();
    let idx = |n: &str| names.iter().position(|x| x == n).unwrap();
    let coords = [
        (idx("0.weight"), 0),
        (idx("0.weight"), 17),
        (idx("4.weight"), 1000),
        (idx("9.bias"), 3),
        (idx("1.weight"), 5),
        (idx("13.weight"), 7),
    ];
    check_fd(
        &model,
        &|m| meta_loss(m, false).1.to_scalar_f64().unwrap(),
        &g,
        &coords,
        1e-7,
        1e-4,
    );
}

#[test]
fn batch_norm_buffers_move_in_the_fmodel_only_until_written_back() {
    let mut model = bn_mlp();
    let base_stats = model.named_buffers().unwrap();
    let x = input(&[6, 3], 3.0);
    let fmodel = unroll(
        &model,
        2,
        0.1,
        true,
        &|y: &Tensor| y.sqr().unwrap().mean_all().unwrap(),
        &x,
    );
    let f_stats = fmodel.buffers().unwrap();
    let now = model.named_buffers().unwrap();
    for (((n, b0), (_, b1)), (nf, f)) in base_stats.iter().zip(&now).zip(&f_stats) {
        assert_eq!(n, nf);
        assert_eq!(b0.id(), b1.id(), "{n}: the base buffer is untouched");
        assert!(max_abs_diff(b0, f) > 0.0, "{n}: the fmodel's copy moved");
    }
    fmodel.write_back_buffers(&mut model).unwrap();
    for ((_, b), (_, f)) in model.named_buffers().unwrap().iter().zip(&f_stats) {
        assert_eq!(max_abs_diff(b, f), 0.0);
    }
    // Eval mode on the fmodel uses its own statistics and does not move them.
    let mut fmodel = fmodel;
    fmodel.eval().unwrap();
    let before = fmodel.buffers().unwrap();
    fmodel.forward(&x).unwrap();
    for ((_, a), (_, b)) in before.iter().zip(fmodel.buffers().unwrap().iter()) {
        assert_eq!(a.id(), b.id());
    }
}

/// An LSTM whose hidden-to-hidden weight goes through fastai's WeightDropout.
#[derive(Clone)]
struct AwdModel {
    rnn: nn::WeightDropout<nn::Recurrent>,
    head: nn::Linear,
}

impl Parameters for AwdModel {
    fn visit(&mut self, v: &mut Visitor<'_>) -> Result<()> {
        v.module("rnn", &mut self.rnn)?;
        v.module("head", &mut self.head)
    }
}

impl Module for AwdModel {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.rnn.forward(x)?;
        self.head
            .forward(&y.narrow(0, y.dims()[0] - 1, 1)?.squeeze(0)?)
    }
}

#[test]
fn weight_dropout_meta_gradient_matches_finite_differences() {
    let vb = vb(15);
    let lstm = nn::lstm(3, 4, 1, vb.pp("rnn")).unwrap();
    let mut rnn = nn::weight_dropout(lstm, &["weight_hh_l0"], 0.3, vb.pp("rnn")).unwrap();
    let masks = rnn.sample_masks().unwrap();
    assert!(masks[0].to_vec_f64().unwrap().contains(&0.0));
    rnn.fix_masks(masks).unwrap();
    let model = AwdModel {
        rnn,
        head: nn::linear(4, 1, vb.pp("head")).unwrap(),
    };
    let names: Vec<String> = model
        .named_parameters()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        names,
        [
            "rnn.module.weight_ih_l0",
            "rnn.module.bias_ih_l0",
            "rnn.module.bias_hh_l0",
            "rnn.weight_hh_l0_raw",
            "head.weight",
            "head.bias"
        ]
    );
    let x = input(&[3, 2, 3], 0.7);
    let loss = |y: &Tensor| y.sub(0.5).unwrap().sqr().unwrap().mean_all().unwrap();
    let meta_loss = |m: &AwdModel, create_graph: bool| {
        let fmodel = unroll(m, 3, 0.5, create_graph, &loss, &x);
        let meta = loss(&fmodel.forward(&x.affine(-1.0, 0.2).unwrap()).unwrap());
        (fmodel, meta)
    };
    let (fmodel, meta) = meta_loss(&model, true);
    let g = grad(
        &[meta],
        fmodel.parameters(0).unwrap(),
        GradOptions::default(),
    )
    .unwrap();
    check_fd(
        &model,
        &|m| meta_loss(m, false).1.to_scalar_f64().unwrap(),
        &g,
        &[(3, 0), (3, 5), (3, 30), (0, 2), (4, 1)],
        1e-5,
        1e-6,
    );
}

#[test]
fn weight_norm_meta_gradient_matches_finite_differences() {
    let vb = vb(16);
    let model = nn::seq()
        .add(nn::weight_norm(nn::linear(3, 5, vb.pp("0")).unwrap(), "weight").unwrap())
        .add(nn::Activation::Tanh)
        .add(nn::linear(5, 1, vb.pp("2")).unwrap());
    let names: Vec<String> = model
        .named_parameters()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        names,
        ["0.bias", "0.weight_g", "0.weight_v", "2.weight", "2.bias"]
    );
    // Initially the reparametrized layer computes the same as the plain one.
    let plain = nn::seq()
        .add(nn::linear(3, 5, vb.pp("0")).unwrap())
        .add(nn::Activation::Tanh)
        .add(nn::linear(5, 1, vb.pp("2")).unwrap());
    let x = input(&[6, 3], 0.9);
    assert!(max_abs_diff(&model.forward(&x).unwrap(), &plain.forward(&x).unwrap()) < 1e-14);
    let loss = |y: &Tensor| y.sub(0.3).unwrap().sqr().unwrap().mean_all().unwrap();
    let meta_loss = |m: &nn::Sequential, create_graph: bool| {
        let fmodel = unroll(m, 3, 0.5, create_graph, &loss, &x);
        let meta = loss(&fmodel.forward(&x.sqr().unwrap()).unwrap());
        (fmodel, meta)
    };
    let (fmodel, meta) = meta_loss(&model, true);
    let g = grad(
        &[meta],
        fmodel.parameters(0).unwrap(),
        GradOptions::default(),
    )
    .unwrap();
    assert!(g.iter().all(Option::is_some));
    check_fd(
        &model,
        &|m| meta_loss(m, false).1.to_scalar_f64().unwrap(),
        &g,
        &[(1, 0), (1, 3), (2, 0), (2, 7), (2, 14), (0, 2)],
        1e-5,
        1e-6,
    );
}
