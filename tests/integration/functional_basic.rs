//! FunctionalModel basics: naming, tied weights, history, errors, test mode, write-back.

use candle_higher::nn::{self, Module, Parameters, VarBuilder, Visitor};
use candle_higher::{
    backward, grad, DType, Error, FunctionalModel, FunctionalOptions, GradOptions, InitialWeights,
    Result, Tensor,
};

fn vb() -> VarBuilder {
    VarBuilder::new(7, DType::F64, &crate::common::device())
}

fn mlp() -> nn::Sequential {
    let vb = vb();
    nn::seq()
        .add(nn::linear(3, 5, vb.pp("0")).unwrap())
        .add(nn::Activation::Tanh)
        .add(nn::linear(5, 2, vb.pp("2")).unwrap())
}

fn input(n: usize, d: usize, seed: f64) -> Tensor {
    let data: Vec<f64> = (0..n * d)
        .map(|i| ((i as f64 + seed) * 0.37).sin())
        .collect();
    Tensor::from_vec(data, &[n, d], &crate::common::device()).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    a.to_vec_f64()
        .unwrap()
        .iter()
        .zip(b.to_vec_f64().unwrap())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// A tied-weight autoencoder: the decoder uses the encoder's weight handle.
#[derive(Clone)]
struct Tied {
    enc: nn::Linear,
    dec: nn::Linear,
}

impl Tied {
    fn new() -> Self {
        let vb = vb();
        let enc = nn::linear(4, 4, vb.pp("enc")).unwrap();
        let mut dec = nn::linear(4, 4, vb.pp("dec")).unwrap();
        dec.weight = enc.weight.clone();
        Tied { enc, dec }
    }
}

impl Parameters for Tied {
    fn visit(&mut self, v: &mut Visitor<'_>) -> Result<()> {
        v.module("enc", &mut self.enc)?;
        v.module("dec", &mut self.dec)
    }
}

impl Module for Tied {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.dec.forward(&self.enc.forward(x)?.tanh()?)
    }
}

/// The loss every test here uses: the mean of the squared outputs of `fmodel` on `x`.
fn mean_square<M: Module + Parameters + Clone>(fmodel: &FunctionalModel<M>, x: &Tensor) -> Tensor {
    fmodel
        .forward(x)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
}

fn sgd(params: &[Tensor], grads: Vec<Option<Tensor>>, lr: f64) -> Vec<Tensor> {
    params
        .iter()
        .zip(grads)
        .map(|(p, g)| match g {
            Some(g) => p.sub(g.affine(lr, 0.0).unwrap()).unwrap(),
            None => p.clone(),
        })
        .collect()
}

#[test]
fn names_follow_pytorch_sequential() {
    let names: Vec<String> = mlp()
        .named_parameters()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["0.weight", "0.bias", "2.weight", "2.bias"]);
}

#[test]
fn mlp_forward_parity() {
    let model = mlp();
    let fmodel = FunctionalModel::new(&model, FunctionalOptions::default()).unwrap();
    let x = input(6, 3, 0.0);
    let d = max_abs_diff(&model.forward(&x).unwrap(), &fmodel.forward(&x).unwrap());
    assert_eq!(d, 0.0);
}

#[test]
fn tied_weights_listed_once_and_updated_once() {
    let model = Tied::new();
    let names: Vec<String> = model
        .named_parameters()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["enc.weight", "enc.bias", "dec.bias"]);
    let mut fmodel = FunctionalModel::new(&model, FunctionalOptions::default()).unwrap();
    let x = input(3, 4, 1.0);
    assert_eq!(
        max_abs_diff(&model.forward(&x).unwrap(), &fmodel.forward(&x).unwrap()),
        0.0
    );
    // One update per tied weight: shifting the shared weight by 1 moves both slots.
    let new: Vec<Tensor> = fmodel
        .fast_params()
        .iter()
        .map(|p| p.add(1.0).unwrap())
        .collect();
    fmodel.update_params(new.clone()).unwrap();
    let m = fmodel.model();
    assert_eq!(m.enc.weight.id(), m.dec.weight.id());
    assert_eq!(m.enc.weight.id(), new[0].id());
}

#[test]
fn history_and_errors() {
    let model = mlp();
    let mut fmodel = FunctionalModel::new(&model, FunctionalOptions::default()).unwrap();
    let x = input(4, 3, 2.0);
    for _ in 0..2 {
        let loss = mean_square(&fmodel, &x);
        let p = fmodel.fast_params().to_vec();
        let g = grad(&[loss], &p, GradOptions::create_graph()).unwrap();
        fmodel.update_params(sgd(&p, g, 0.1)).unwrap();
    }
    assert_eq!(fmodel.time(), 2);
    assert!(fmodel.parameters(2).is_ok());
    match fmodel.parameters(3) {
        Err(Error::TimeOutOfRange {
            time: 3, latest: 2, ..
        }) => {}
        other => panic!("expected TimeOutOfRange, got {other:?}"),
    }
    let msg = fmodel.parameters(5).unwrap_err().to_string();
    assert!(msg.contains("0..=2"), "{msg}");
    // Wrong length.
    let short = fmodel.fast_params()[..3].to_vec();
    assert!(matches!(
        fmodel.update_params(short),
        Err(Error::ParamCount {
            expected: 4,
            got: 3,
            ..
        })
    ));
    // Wrong shape names the parameter and both shapes.
    let mut bad = fmodel.fast_params().to_vec();
    bad[2] = Tensor::zeros(&[3, 5], DType::F64, &crate::common::device()).unwrap();
    let err = fmodel.update_params(bad).unwrap_err().to_string();
    assert!(
        err.contains("2.weight") && err.contains("[2, 5]") && err.contains("[3, 5]"),
        "{err}"
    );
    assert_eq!(fmodel.time(), 2, "a rejected list changes nothing");
}

#[test]
fn base_parameters_receive_the_meta_gradient() {
    let model = mlp();
    let base = model.parameters().unwrap();
    let x = input(5, 3, 3.0);
    let run = |opts: FunctionalOptions| {
        let mut fmodel = FunctionalModel::new(&model, opts).unwrap();
        for _ in 0..3 {
            let loss = mean_square(&fmodel, &x);
            let p = fmodel.fast_params().to_vec();
            let g = grad(&[loss], &p, GradOptions::create_graph()).unwrap();
            fmodel.update_params(sgd(&p, g, 0.3)).unwrap();
        }
        let meta = mean_square(&fmodel, &x);
        (fmodel, meta)
    };
    // Base parameters: backward reaches the base leaves, equal to grad wrt parameters(0).
    let (fmodel, meta) =
        run(FunctionalOptions::default().initial_weights(InitialWeights::BaseParameters));
    let store = backward(&meta).unwrap();
    let g0 = grad(
        &[meta],
        fmodel.init_fast_params().unwrap(),
        GradOptions::default(),
    )
    .unwrap();
    for (b, g) in base.iter().zip(&g0) {
        let gb = store.get(b).expect("base parameter has a meta-gradient");
        assert_eq!(max_abs_diff(gb, g.as_ref().unwrap()), 0.0);
    }
    // Detached copies: the base gets nothing.
    let (fmodel, meta) = run(FunctionalOptions::default());
    let store = backward(&meta).unwrap();
    for b in &base {
        assert!(store.get(b).is_none());
    }
    for p in fmodel.init_fast_params().unwrap() {
        assert!(store.get(p).is_some());
    }
}

#[test]
fn test_mode_keeps_no_graph() {
    let model = mlp();
    let x = input(5, 3, 4.0);
    let mut fmodel = FunctionalModel::new(
        &model,
        FunctionalOptions::default().track_higher_grads(false),
    )
    .unwrap();
    let mut tracked = FunctionalModel::new(&model, FunctionalOptions::default()).unwrap();
    let mut sizes = Vec::new();
    for _ in 0..4 {
        for fm in [&mut fmodel, &mut tracked] {
            let loss = fm.forward(&x).unwrap().sqr().unwrap().mean_all().unwrap();
            let p = fm.fast_params().to_vec();
            let g = grad(&[loss], &p, GradOptions::create_graph()).unwrap();
            fm.update_params(sgd(&p, g, 0.1)).unwrap();
        }
        sizes.push((fmodel.graph_len(), tracked.graph_len()));
    }
    for (i, &(test, track)) in sizes.iter().enumerate() {
        assert_eq!(test, 0);
        if i > 0 {
            assert!(track > sizes[i - 1].1, "tracked graph grows: {sizes:?}");
        }
    }
    assert!(fmodel
        .fast_params()
        .iter()
        .all(|p| p.is_leaf() && p.requires_grad()));
    let err = fmodel.parameters(0).unwrap_err().to_string();
    assert!(err.contains("test mode"), "{err}");
    assert!(fmodel.parameters(4).is_ok());
}

#[test]
fn truncate_drops_history() {
    let model = mlp();
    let x = input(5, 3, 5.0);
    let mut fmodel = FunctionalModel::new(&model, FunctionalOptions::default()).unwrap();
    for _ in 0..3 {
        let loss = mean_square(&fmodel, &x);
        let p = fmodel.fast_params().to_vec();
        let g = grad(&[loss], &p, GradOptions::create_graph()).unwrap();
        fmodel.update_params(sgd(&p, g, 0.1)).unwrap();
    }
    let before = fmodel.fast_params().to_vec();
    fmodel.truncate();
    assert_eq!(fmodel.time(), 3);
    assert_eq!(fmodel.graph_len(), 0);
    assert!(fmodel
        .parameters(2)
        .unwrap_err()
        .to_string()
        .contains("truncated at time 3"));
    for (a, b) in before.iter().zip(fmodel.fast_params()) {
        assert_eq!(max_abs_diff(a, b), 0.0);
    }
    // Continue: the meta-gradient reaches the truncation point.
    let loss = mean_square(&fmodel, &x);
    let p = fmodel.fast_params().to_vec();
    let g = grad(&[loss], &p, GradOptions::create_graph()).unwrap();
    fmodel.update_params(sgd(&p, g, 0.1)).unwrap();
    let meta = mean_square(&fmodel, &x);
    let g3 = grad(
        &[meta],
        fmodel.parameters(3).unwrap(),
        GradOptions::default(),
    )
    .unwrap();
    assert!(g3.iter().all(Option::is_some));
}

#[test]
fn write_back_params() {
    let mut model = mlp();
    let mut fmodel = FunctionalModel::new(&model, FunctionalOptions::default()).unwrap();
    let new: Vec<Tensor> = fmodel
        .fast_params()
        .iter()
        .map(|p| p.add(0.5).unwrap())
        .collect();
    fmodel.update_params(new.clone()).unwrap();
    let x = input(2, 3, 6.0);
    assert!(max_abs_diff(&model.forward(&x).unwrap(), &fmodel.forward(&x).unwrap()) > 0.0);
    fmodel.write_back_params(&mut model).unwrap();
    assert_eq!(
        max_abs_diff(&model.forward(&x).unwrap(), &fmodel.forward(&x).unwrap()),
        0.0
    );
    assert!(model
        .parameters()
        .unwrap()
        .iter()
        .all(|p| p.is_leaf() && p.requires_grad()));
}

#[test]
fn frozen_parameters_are_marked_and_kept() {
    let mut model = mlp();
    model.set_frozen("0.bias", true).unwrap();
    assert!(model
        .set_frozen("nope", true)
        .unwrap_err()
        .to_string()
        .contains("0.weight"));
    let mut fmodel = FunctionalModel::new(&model, FunctionalOptions::default()).unwrap();
    assert_eq!(fmodel.frozen(), [false, true, false, false]);
    let p = fmodel.fast_params().to_vec();
    let moved: Vec<Tensor> = p.iter().map(|t| t.add(1.0).unwrap()).collect();
    let err = fmodel.update_params(moved).unwrap_err().to_string();
    assert!(err.contains("0.bias") && err.contains("frozen"), "{err}");
    let mut ok: Vec<Tensor> = p.iter().map(|t| t.add(1.0).unwrap()).collect();
    ok[1] = p[1].clone();
    fmodel.update_params(ok).unwrap();
}

#[test]
fn closures_are_modules() {
    let f = |x: &Tensor| x.relu();
    let x = input(2, 2, 0.0);
    assert_eq!(
        max_abs_diff(&f.forward(&x).unwrap(), &x.relu().unwrap()),
        0.0
    );
}

#[test]
fn test_mode_with_base_parameters_gives_no_meta_gradient() {
    // In test mode nothing links the latest weights to time 0: neither the base
    // parameters nor parameters(0) receive a meta-gradient.
    let model = mlp();
    let base = model.parameters().unwrap();
    let x = input(4, 3, 8.0);
    let opts = FunctionalOptions::default()
        .initial_weights(InitialWeights::BaseParameters)
        .track_higher_grads(false);
    let mut fmodel = FunctionalModel::new(&model, opts).unwrap();
    for _ in 0..2 {
        let loss = mean_square(&fmodel, &x);
        let p = fmodel.fast_params().to_vec();
        let g = grad(&[loss], &p, GradOptions::create_graph()).unwrap();
        fmodel.update_params(sgd(&p, g, 0.1)).unwrap();
    }
    let meta = mean_square(&fmodel, &x);
    let store = backward(&meta).unwrap();
    assert!(base.iter().all(|b| store.get(b).is_none()));
    assert!(fmodel.init_fast_params().is_err());
    assert!(fmodel.fast_params().iter().all(|p| store.get(p).is_some()));
}

#[test]
fn forward_with_records_the_weights() {
    let model = mlp();
    let mut fmodel = FunctionalModel::new(&model, FunctionalOptions::default()).unwrap();
    let x = input(3, 3, 9.0);
    let new: Vec<Tensor> = fmodel
        .fast_params()
        .iter()
        .map(|p| p.affine(0.5, 0.0).unwrap())
        .collect();
    let y = fmodel.forward_with(new.clone(), &x).unwrap();
    assert_eq!(fmodel.time(), 1);
    assert_eq!(fmodel.parameters(1).unwrap()[0].id(), new[0].id());
    assert_eq!(max_abs_diff(&y, &fmodel.forward(&x).unwrap()), 0.0);
    let named = fmodel.named_fast_params();
    assert_eq!(named[2].0, "2.weight");
    assert!(!named[2].2);
}

#[test]
fn gru_and_rnn_parity() {
    let vb = vb();
    let x = input(8, 3, 10.0).reshape(&[4, 2, 3]).unwrap();
    for m in [
        nn::gru(3, 5, 2, vb.pp("gru")).unwrap(),
        nn::rnn(3, 5, 2, vb.pp("rnn")).unwrap(),
    ] {
        let fmodel = FunctionalModel::new(&m, FunctionalOptions::default()).unwrap();
        assert_eq!(
            max_abs_diff(&m.forward(&x).unwrap(), &fmodel.forward(&x).unwrap()),
            0.0
        );
        assert_eq!(fmodel.num_params(), 8);
    }
}

#[test]
fn models_and_fmodels_are_send_and_sync() {
    // Tasks of a meta-batch can run on separate threads.
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<nn::Sequential>();
    assert_send_sync::<FunctionalModel<nn::Sequential>>();
    assert_send_sync::<nn::BatchNorm>();
    assert_send_sync::<nn::Dropout>();
    assert_send_sync::<nn::WeightDropout<nn::Recurrent>>();
    let model = mlp();
    let x = input(3, 3, 11.0);
    let outs: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let fmodel =
                        FunctionalModel::new(&model, FunctionalOptions::default()).unwrap();
                    fmodel
                        .forward(&x)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar_f64()
                        .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(outs[0], outs[1]);
}
