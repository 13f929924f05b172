//! candle-nn interop (the `candle-nn` feature): a model's weights and buffers from a live
//! `candle_nn::VarMap` and back into its `Var`s in place, with renaming, strict and
//! non-strict matching; outputs equal candle-nn's on the same `VarMap`.

use std::collections::HashMap;

use candle_higher::candle::{self as candle, Module as _};
use candle_higher::candle_nn::{self as cnn, ModuleT as _};
use candle_higher::nn::{self, load_varmap, write_varmap, LoadOptions, LoadReport, Module};
use candle_higher::optim::{Adam, Optimizer, Sgd};
use candle_higher::{
    backward, innerloop, DType, Device, Error, InitialWeights, InnerloopOptions, Parameters,
    Result, Tensor,
};

/// candle-nn's MLP: `model.fc1` (2 -> 5), relu, `model.fc2` (5 -> 3), on `varmap`.
struct CandleMlp {
    fc1: cnn::Linear,
    fc2: cnn::Linear,
}

impl CandleMlp {
    fn new(varmap: &cnn::VarMap, dtype: DType) -> Result<Self> {
        let vb = cnn::VarBuilder::from_varmap(varmap, dtype, &Device::Cpu).pp("model");
        Ok(CandleMlp {
            fc1: cnn::linear(2, 5, vb.pp("fc1"))?,
            fc2: cnn::linear(5, 3, vb.pp("fc2"))?,
        })
    }

    fn forward(&self, x: &candle::Tensor) -> Result<candle::Tensor> {
        Ok(self.fc2.forward(&self.fc1.forward(x)?.relu()?)?)
    }
}

/// The same MLP with this crate's layers (other initial values: seed 9).
fn our_mlp(dtype: DType) -> Result<nn::Sequential> {
    let vb = nn::VarBuilder::new(9, dtype, &Device::Cpu);
    Ok(nn::seq()
        .add(nn::linear(2, 5, vb.pp("0"))?)
        .add(nn::Activation::Relu)
        .add(nn::linear(5, 3, vb.pp("2"))?))
}

/// candle-nn's `model.fc1.weight` is our `0.weight`, `model.fc2.*` our `2.*`.
fn mlp_names() -> LoadOptions {
    LoadOptions::new()
        .rename_prefix("model.fc1.", "0.")
        .rename_prefix("model.fc2.", "2.")
}

fn input(dtype: DType) -> Result<candle::Tensor> {
    let x: Vec<f64> = (0..14).map(|i| (i as f64 * 0.37).sin() * 2.0).collect();
    Ok(candle::Tensor::from_vec(x, (7, 2), &Device::Cpu)?.to_dtype(dtype)?)
}

fn bits(t: &candle::Tensor) -> Vec<u64> {
    t.flatten_all()
        .and_then(|t| t.to_dtype(DType::F64))
        .and_then(|t| t.to_vec1::<f64>())
        .unwrap()
        .into_iter()
        .map(f64::to_bits)
        .collect()
}

/// Every `Var` of the map by name, as bits (f32 values widen to f64 exactly).
fn snapshot(varmap: &cnn::VarMap) -> HashMap<String, Vec<u64>> {
    let vars = varmap.data().lock().unwrap();
    vars.iter()
        .map(|(name, var)| (name.clone(), bits(var.as_tensor())))
        .collect()
}

/// Every parameter and buffer of the model by name, as bits.
fn model_bits<M: Parameters + Clone>(model: &M) -> HashMap<String, Vec<u64>> {
    nn::state_dict(model)
        .unwrap()
        .iter()
        .map(|(name, t)| (name.clone(), bits(t)))
        .collect()
}

fn assert_close(ours: &Tensor, theirs: &candle::Tensor, rel: f64) {
    let a = ours.to_vec_f64().unwrap();
    let b = theirs
        .flatten_all()
        .and_then(|t| t.to_dtype(DType::F64))
        .and_then(|t| t.to_vec1::<f64>())
        .unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1.0_f64, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= rel * scale,
            "element {i}: ours {x}, candle-nn {y}"
        );
    }
}

/// VarMap -> our model -> another VarMap of the same names: equal bit for bit, in f32 and
/// f64, and the loaded model computes what candle-nn's model computes.
#[test]
fn mlp_weights_round_trip_and_outputs_match() -> Result<()> {
    for (dtype, rel) in [(DType::F64, 1e-13), (DType::F32, 1e-6)] {
        let varmap = cnn::VarMap::new();
        let theirs = CandleMlp::new(&varmap, dtype)?;
        let mut ours = our_mlp(dtype)?;
        let report = load_varmap(&mut ours, &varmap, &mlp_names())?;
        assert_eq!(
            report,
            LoadReport {
                loaded: vec!["0.bias", "0.weight", "2.bias", "2.weight"]
                    .into_iter()
                    .map(String::from)
                    .collect(),
                missing: vec![],
                unexpected: vec![],
            }
        );
        assert!(ours.parameters()?.iter().all(Tensor::requires_grad));
        let x = input(dtype)?;
        assert_close(
            &ours.forward(&Tensor::new(x.clone()))?,
            &theirs.forward(&x)?,
            rel,
        );

        // Into a second, freshly initialised candle-nn model: its Vars become the first's.
        let other = cnn::VarMap::new();
        let theirs_too = CandleMlp::new(&other, dtype)?;
        assert_ne!(snapshot(&other), snapshot(&varmap));
        let report = write_varmap(&ours, &other, &mlp_names())?;
        assert_eq!(report.loaded.len(), 4);
        assert_eq!(snapshot(&other), snapshot(&varmap));
        assert_eq!(
            bits(&theirs_too.forward(&x)?),
            bits(&theirs.forward(&x)?),
            "the candle-nn model on the written VarMap sees the new weights"
        );
    }
    Ok(())
}

/// The model holds copies: changing the `Var`s after loading (candle-nn training) does not
/// reach it, and writing back does not alias its tensors either.
#[test]
fn loaded_weights_do_not_alias_the_vars() -> Result<()> {
    let varmap = cnn::VarMap::new();
    CandleMlp::new(&varmap, DType::F64)?;
    let mut ours = our_mlp(DType::F64)?;
    load_varmap(&mut ours, &varmap, &mlp_names())?;
    let loaded = model_bits(&ours);
    for var in varmap.all_vars() {
        var.set(&var.as_tensor().affine(0.0, 1.5)?)?;
    }
    assert_eq!(model_bits(&ours), loaded);
    write_varmap(&ours, &varmap, &mlp_names())?;
    for var in varmap.all_vars() {
        var.set(&var.as_tensor().affine(0.0, -2.0)?)?;
    }
    assert_eq!(model_bits(&ours), loaded);
    Ok(())
}

/// candle-nn's conv2d + batch_norm (running statistics in the VarMap, set to non-trivial
/// values) against ours in eval mode; buffers load and write back like parameters.
#[test]
fn conv_batch_norm_eval_outputs_match_and_buffers_round_trip() -> Result<()> {
    let varmap = cnn::VarMap::new();
    let vb = cnn::VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let conv_config = cnn::Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let conv = cnn::conv2d(2, 4, 3, conv_config, vb.pp("features.conv"))?;
    let bn = cnn::batch_norm(4, cnn::BatchNormConfig::default(), vb.pp("features.bn"))?;
    let stats = |shift: f64| -> Result<candle::Tensor> {
        let v: Vec<f64> = (0..4).map(|i| shift + 0.3 * i as f64).collect();
        Ok(candle::Tensor::from_vec(v, 4, &Device::Cpu)?)
    };
    let mut writable = varmap.clone();
    writable.set_one("features.bn.running_mean", stats(-0.2)?)?;
    writable.set_one("features.bn.running_var", stats(0.5)?)?;
    writable.set_one("features.bn.weight", stats(0.7)?)?;
    writable.set_one("features.bn.bias", stats(-0.1)?)?;

    let ovb = nn::VarBuilder::new(4, DType::F64, &Device::Cpu);
    let our_config = nn::ConvConfig {
        padding: 1,
        ..Default::default()
    };
    let mut ours = nn::seq()
        .add(nn::conv2d(2, 4, 3, our_config, ovb.pp("0"))?)
        .add(nn::batch_norm2d(
            4,
            nn::BatchNormConfig::default(),
            ovb.pp("1"),
        )?);
    let names = LoadOptions::new().rename_with(|n: &str| {
        n.replace("features.conv.", "0.")
            .replace("features.bn.", "1.")
    });
    let report = load_varmap(&mut ours, &varmap, &names)?;
    assert_eq!(
        report.loaded,
        vec![
            "0.bias",
            "0.weight",
            "1.bias",
            "1.running_mean",
            "1.running_var",
            "1.weight"
        ]
    );
    ours.eval()?;

    let x: Vec<f64> = (0..2 * 2 * 5 * 5)
        .map(|i| (i as f64 * 0.21).cos())
        .collect();
    let x = candle::Tensor::from_vec(x, (2, 2, 5, 5), &Device::Cpu)?;
    let expected = bn.forward_t(&conv.forward(&x)?, false)?;
    assert_close(&ours.forward(&Tensor::new(x.clone()))?, &expected, 1e-13);

    // Train mode moves our running statistics; written back, candle-nn's eval uses them.
    ours.train(true)?;
    ours.forward(&Tensor::new(x.clone()))?;
    ours.eval()?;
    let moved = model_bits(&ours);
    assert_ne!(moved["1.running_mean"], bits(&stats(-0.2)?));
    write_varmap(&ours, &varmap, &names)?;
    let vars = snapshot(&varmap);
    assert_eq!(vars["features.bn.running_mean"], moved["1.running_mean"]);
    assert_eq!(vars["features.bn.running_var"], moved["1.running_var"]);
    let expected = bn.forward_t(&conv.forward(&x)?, false)?;
    assert_close(&ours.forward(&Tensor::new(x))?, &expected, 1e-13);
    Ok(())
}

/// A MAML step on weights brought from candle-nn, written back: the candle-nn model (built
/// before, on the same VarMap) computes exactly what our meta-trained model computes.
#[test]
fn maml_step_written_back_reaches_the_candle_nn_model() -> Result<()> {
    let varmap = cnn::VarMap::new();
    let theirs = CandleMlp::new(&varmap, DType::F64)?;
    let mut model = our_mlp(DType::F64)?;
    load_varmap(&mut model, &varmap, &mlp_names())?;
    let before = snapshot(&varmap);

    let x = Tensor::new(input(DType::F64)?);
    let y = x.matmul(&Tensor::new(candle::Tensor::from_vec(
        vec![0.5, -1.0, 2.0, 0.3, 0.1, -0.7],
        (2, 3),
        &Device::Cpu,
    )?))?;
    let n = model.parameters()?.len();
    let inner = Optimizer::new(Sgd::new(0.1), n)?;
    let mut meta = Optimizer::new(Adam::new(1e-2), n)?;
    let options = InnerloopOptions::new().initial_weights(InitialWeights::BaseParameters);
    let (mut fmodel, mut diffopt) = innerloop(&model, &inner, options)?;
    let loss = nn::mse(&fmodel.forward(&x)?, &y)?;
    diffopt.step(&mut fmodel, &loss)?;
    let meta_loss = nn::mse(&fmodel.forward(&x)?, &y)?;
    meta.step_module(&mut model, &backward(&meta_loss)?)?;

    write_varmap(&model, &varmap, &mlp_names())?;
    let after = snapshot(&varmap);
    for name in before.keys() {
        assert_ne!(after[name], before[name], "{name} was not updated");
    }
    let x = input(DType::F64)?;
    assert_close(
        &model.forward(&Tensor::new(x.clone()))?,
        &theirs.forward(&x)?,
        1e-13,
    );
    Ok(())
}

/// Strict loading and writing: a name on one side only, a shape or a dtype that differs is
/// a typed error naming it (and both shapes or dtypes); nothing changes on either side.
#[test]
fn strict_mismatches_are_typed_errors_and_change_nothing() -> Result<()> {
    let varmap = cnn::VarMap::new();
    CandleMlp::new(&varmap, DType::F64)?;
    let mut ours = our_mlp(DType::F64)?;
    let kept = model_bits(&ours);
    let vars = snapshot(&varmap);
    let unchanged = |ours: &nn::Sequential| {
        assert_eq!(model_bits(ours), kept);
        assert_eq!(snapshot(&varmap), vars);
    };

    // No renaming: every name is on one side only.
    let err = load_varmap(&mut ours, &varmap, &LoadOptions::new()).unwrap_err();
    match &err {
        Error::LoadMismatch {
            missing,
            unexpected,
            ..
        } => {
            assert_eq!(missing.len(), 4, "{err}");
            assert!(
                unexpected.contains(&"model.fc1.weight".to_string()),
                "{err}"
            );
        }
        other => panic!("expected LoadMismatch, got {other}"),
    }
    let err = write_varmap(&ours, &varmap, &LoadOptions::new()).unwrap_err();
    assert!(matches!(err, Error::LoadMismatch { .. }), "{err}");
    unchanged(&ours);

    // One Var more than the model has (renamed to a name the model lacks).
    let extra = varmap.clone();
    let extra_vb = cnn::VarBuilder::from_varmap(&extra, DType::F64, &Device::Cpu);
    extra_vb.get_with_hints(3, "model.fc2.scale", cnn::Init::Const(1.0))?;
    for err in [
        load_varmap(&mut ours, &extra, &mlp_names()).unwrap_err(),
        write_varmap(&ours, &extra, &mlp_names()).unwrap_err(),
    ] {
        match &err {
            Error::LoadMismatch {
                missing,
                unexpected,
                mis_shaped,
                ..
            } => {
                assert!(missing.is_empty() && mis_shaped.is_empty(), "{err}");
                assert_eq!(unexpected, &vec!["2.scale".to_string()], "{err}");
            }
            other => panic!("expected LoadMismatch, got {other}"),
        }
    }
    extra.data().lock().unwrap().remove("model.fc2.scale");

    // A model with one more parameter than the VarMap: missing, named.
    let vb = nn::VarBuilder::new(9, DType::F64, &Device::Cpu);
    let mut bigger = our_mlp(DType::F64)?.add(nn::linear(3, 1, vb.pp("3"))?);
    let bigger_kept = model_bits(&bigger);
    for err in [
        load_varmap(&mut bigger, &varmap, &mlp_names()).unwrap_err(),
        write_varmap(&bigger, &varmap, &mlp_names()).unwrap_err(),
    ] {
        match &err {
            Error::LoadMismatch { missing, .. } => {
                assert_eq!(missing, &vec!["3.bias".to_string(), "3.weight".to_string()])
            }
            other => panic!("expected LoadMismatch, got {other}"),
        }
    }
    assert_eq!(model_bits(&bigger), bigger_kept);

    // A shape that differs, non-strict too: the name and both shapes.
    let vb = nn::VarBuilder::new(9, DType::F64, &Device::Cpu);
    let mut wide = nn::seq()
        .add(nn::linear(2, 6, vb.pp("0"))?)
        .add(nn::Activation::Relu)
        .add(nn::linear(6, 3, vb.pp("2"))?);
    let wide_kept = model_bits(&wide);
    for options in [mlp_names(), mlp_names().non_strict(true)] {
        for err in [
            load_varmap(&mut wide, &varmap, &options).unwrap_err(),
            write_varmap(&wide, &varmap, &options).unwrap_err(),
        ] {
            match &err {
                Error::LoadMismatch { mis_shaped, .. } => {
                    assert!(
                        mis_shaped.contains(&("0.weight".into(), vec![6, 2], vec![5, 2])),
                        "{err}"
                    );
                    assert!(err.to_string().contains("0.weight (model [6, 2]"), "{err}");
                }
                other => panic!("expected LoadMismatch, got {other}"),
            }
        }
    }
    assert_eq!(model_bits(&wide), wide_kept);

    // A dtype that differs: named with both dtypes, unless converting.
    let mut single = our_mlp(DType::F32)?;
    let single_kept = model_bits(&single);
    for err in [
        load_varmap(&mut single, &varmap, &mlp_names()).unwrap_err(),
        write_varmap(&single, &varmap, &mlp_names()).unwrap_err(),
    ] {
        match &err {
            Error::LoadDType { mismatched, .. } => {
                assert_eq!(mismatched.len(), 4, "{err}");
                assert!(
                    mismatched.contains(&("2.bias".into(), DType::F32, DType::F64)),
                    "{err}"
                );
            }
            other => panic!("expected LoadDType, got {other}"),
        }
    }
    assert_eq!(model_bits(&single), single_kept);
    unchanged(&ours);
    load_varmap(&mut single, &varmap, &mlp_names().convert_dtype(true))?;
    let x = input(DType::F32)?;
    let mut double = our_mlp(DType::F64)?;
    load_varmap(&mut double, &varmap, &mlp_names())?;
    assert_close(
        &single.forward(&Tensor::new(x.clone()))?,
        &double
            .forward(&Tensor::new(x.to_dtype(DType::F64)?))?
            .to_candle(),
        1e-6,
    );
    Ok(())
}

/// Two of the VarMap's names renamed to one, and NaN weights written back: typed errors,
/// nothing written.
#[test]
fn ambiguous_renaming_and_non_finite_weights_write_nothing() -> Result<()> {
    let varmap = cnn::VarMap::new();
    CandleMlp::new(&varmap, DType::F64)?;
    let vars = snapshot(&varmap);
    let mut ours = our_mlp(DType::F64)?;
    let kept = model_bits(&ours);
    let collapse = mlp_names().rename_with(|n: &str| n.replace("bias", "weight"));
    assert!(matches!(
        load_varmap(&mut ours, &varmap, &collapse),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        write_varmap(&ours, &varmap, &collapse),
        Err(Error::InvalidArgument { .. })
    ));
    assert_eq!(model_bits(&ours), kept);

    // A diverged model: its NaN weight is named, and not one Var is set (the other three
    // would be valid).
    let mut params = ours.parameters()?;
    params[3] = Tensor::new(params[3].to_candle().affine(0.0, f64::NAN)?).to_leaf();
    ours.set_parameters(&params)?;
    let err = write_varmap(&ours, &varmap, &mlp_names()).unwrap_err();
    assert!(
        matches!(&err, Error::NonFinite { what } if what.contains("2.bias")),
        "{err}"
    );
    assert_eq!(snapshot(&varmap), vars);
    Ok(())
}

/// Non-strict: what each side lacks is reported, by our names; a model name the VarMap
/// lacks keeps its value on load, a Var the model lacks keeps its value on write.
#[test]
fn non_strict_reports_what_it_left_out() -> Result<()> {
    let varmap = cnn::VarMap::new();
    CandleMlp::new(&varmap, DType::F64)?;
    let vb = cnn::VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    vb.get_with_hints(3, "model.temperature", cnn::Init::Const(2.0))?;
    varmap.data().lock().unwrap().remove("model.fc2.bias");

    let mut ours = our_mlp(DType::F64)?;
    let kept_bias = model_bits(&ours)["2.bias"].clone();
    let options = mlp_names().non_strict(true);
    let expected = LoadReport {
        loaded: vec!["0.bias".into(), "0.weight".into(), "2.weight".into()],
        missing: vec!["2.bias".into()],
        unexpected: vec!["model.temperature".into()],
    };
    assert_eq!(load_varmap(&mut ours, &varmap, &options)?, expected);
    let loaded = model_bits(&ours);
    let vars = snapshot(&varmap);
    assert_eq!(loaded["2.bias"], kept_bias);
    assert_eq!(loaded["0.weight"], vars["model.fc1.weight"]);
    assert_eq!(loaded["2.weight"], vars["model.fc2.weight"]);

    // Written back after a change: the three matched Vars take it, the extra one does not.
    let params: Vec<Tensor> = ours
        .parameters()?
        .iter()
        .map(|p| p.affine(2.0, 0.5).map(|t| t.detach().to_leaf()))
        .collect::<Result<_>>()?;
    ours.set_parameters(&params)?;
    assert_eq!(write_varmap(&ours, &varmap, &options)?, expected);
    let written = snapshot(&varmap);
    let changed = model_bits(&ours);
    assert_eq!(written["model.fc1.weight"], changed["0.weight"]);
    assert_eq!(written["model.fc1.bias"], changed["0.bias"]);
    assert_eq!(written["model.fc2.weight"], changed["2.weight"]);
    assert_eq!(written["model.temperature"], vars["model.temperature"]);
    Ok(())
}
