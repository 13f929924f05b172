//! optax's `inject_hyperparams`: an optimizer built with tensor hyperparameters
//! (`Optimizer::inject`), whose inner loops step with them; meta-gradients equal those
//! through overrides and central finite differences, and bad tensors are typed errors.

use candle_higher::nn::{self, Parameters};
use candle_higher::optim::{Adam, Optimizer, Overrides, Sgd};
use candle_higher::{
    grad, innerloop, DType, Device, Error, GradOptions, InnerloopOptions, Result, Tensor,
};

use crate::common::t;

fn model() -> Result<nn::Sequential> {
    let vb = nn::VarBuilder::new(5, DType::F64, &Device::Cpu);
    Ok(nn::seq()
        .add(nn::linear(2, 4, vb.pp("0"))?)
        .add(nn::Activation::Tanh)
        .add(nn::linear(4, 1, vb.pp("2"))?))
}

fn leaf(v: f64) -> Tensor {
    Tensor::full_scalar(v, DType::F64, &Device::Cpu)
        .unwrap()
        .to_leaf()
}

/// Three inner SGD steps on a support set, then the query loss.
fn meta_loss(
    model: &nn::Sequential,
    opt: &Optimizer<Sgd>,
    options: InnerloopOptions,
) -> Result<Tensor> {
    let x = t(&[0.1, -0.4, 0.7, 0.2, -0.3, 0.9, 0.5, 0.5], &[4, 2]);
    let y = t(&[0.5, -1.0, 0.25, 0.8], &[4, 1]);
    let xq = t(&[0.3, 0.3, -0.6, 0.1], &[2, 2]);
    let yq = t(&[0.1, -0.2], &[2, 1]);
    let (mut fmodel, mut diffopt) = innerloop(model, opt, options)?;
    for _ in 0..3 {
        let loss = nn::mse(&fmodel.forward(&x)?, &y)?;
        diffopt.step(&mut fmodel, &loss)?;
    }
    nn::mse(&fmodel.forward(&xq)?, &yq)
}

const NAMES: [&str; 3] = ["lr", "momentum", "weight_decay"];
const VALUES: [f64; 3] = [0.3, 0.6, 0.05];

/// `Sgd::default()` (momentum and weight decay 0) with `lr`, `momentum` and `weight_decay`
/// injected as tensors: the meta-gradient with respect to each equals the one through
/// overrides bit for bit, and central finite differences of the float optimizer (f64).
#[test]
fn injected_meta_gradients_equal_overrides_and_finite_differences() -> Result<()> {
    let model = model()?;
    let n = model.parameters()?.len();
    let hypers: Vec<Tensor> = VALUES.iter().map(|&v| leaf(v)).collect();

    let mut injected = Optimizer::new(Sgd::default(), n)?;
    for (name, h) in NAMES.iter().zip(&hypers) {
        injected.inject(name, h)?;
    }
    assert_eq!(injected.injected().len(), 3);
    let loss = meta_loss(&model, &injected, InnerloopOptions::new())?;
    let by_injection = grad(&[loss], &hypers, GradOptions::default())?;

    let plain = Optimizer::new(Sgd::default(), n)?;
    let overrides = NAMES
        .iter()
        .zip(&hypers)
        .fold(Overrides::new(), |o, (name, h)| o.set(name, h.clone()));
    let loss = meta_loss(&model, &plain, InnerloopOptions::new().overrides(overrides))?;
    let by_overrides = grad(&[loss], &hypers, GradOptions::default())?;

    let float_loss = |values: [f64; 3]| -> f64 {
        let sgd = Sgd {
            lr: values[0],
            momentum: values[1],
            weight_decay: values[2],
            ..Sgd::default()
        };
        let opt = Optimizer::new(sgd, n).unwrap();
        meta_loss(&model, &opt, InnerloopOptions::new())
            .and_then(|l| l.to_scalar_f64())
            .unwrap()
    };
    let h = 1e-5;
    for k in 0..3 {
        let g_inject = by_injection[k].as_ref().unwrap().to_scalar_f64()?;
        let g_override = by_overrides[k].as_ref().unwrap().to_scalar_f64()?;
        assert_eq!(g_inject.to_bits(), g_override.to_bits(), "{}", NAMES[k]);
        let (mut up, mut down) = (VALUES, VALUES);
        up[k] += h;
        down[k] -= h;
        // Central differences: error about h^2 |f'''| / 6, far below the tolerance.
        let fd = (float_loss(up) - float_loss(down)) / (2.0 * h);
        assert!(
            (g_inject - fd).abs() <= 1e-8 * fd.abs().max(1.0),
            "{}: injected {g_inject}, finite differences {fd}",
            NAMES[k]
        );
        assert!(g_inject != 0.0, "{} must reach the meta-loss", NAMES[k]);
    }
    Ok(())
}

/// The injected value is what the ordinary optimizer steps with too, and injecting a name
/// again replaces the tensor: the inner loop no longer reaches the first one.
#[test]
fn injection_sets_the_float_and_a_second_injection_replaces_the_first() -> Result<()> {
    let model = model()?;
    let n = model.parameters()?.len();
    let first = leaf(0.2);
    let second = leaf(0.4);
    let mut opt = Optimizer::new(Sgd::new(0.01), n)?;
    opt.inject("lr", &first)?.inject("lr", &second)?;
    assert_eq!(opt.groups()[0].hyperparameters.lr, 0.4);
    assert_eq!(opt.injected().len(), 1);
    let loss = meta_loss(&model, &opt, InnerloopOptions::new())?;
    let g = grad(
        &[loss],
        &[first, second],
        GradOptions::default().allow_unused(true),
    )?;
    assert!(g[0].is_none(), "the replaced tensor is not used");
    assert!(g[1].is_some());

    // Overrides given to the inner loop win over the injected tensor.
    let third = leaf(0.1);
    let options = InnerloopOptions::new().overrides(Overrides::new().set("lr", third.clone()));
    let loss = meta_loss(&model, &opt, options)?;
    let plain = Optimizer::new(Sgd::new(0.1), n)?;
    let reference = meta_loss(&model, &plain, InnerloopOptions::new())?;
    assert_eq!(loss.to_scalar_f64()?, reference.to_scalar_f64()?);
    Ok(())
}

/// Unknown names, tensors of more than one element and values the optimizer rejects are
/// typed errors naming what is wrong, and change nothing.
#[test]
fn bad_injections_are_typed_errors_and_change_nothing() -> Result<()> {
    let mut opt = Optimizer::new(Adam::new(1e-3), 2)?;
    let before = format!("{:?}", opt.groups());
    let check_unchanged = |opt: &Optimizer<Adam>| {
        assert_eq!(format!("{:?}", opt.groups()), before);
        assert!(opt.injected().is_empty());
    };

    let err = opt.inject("learning_rate", &leaf(0.1)).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument { message, .. }
            if message.contains("learning_rate") && message.contains("betas.1")),
        "{err}"
    );
    check_unchanged(&opt);

    let two = t(&[0.1, 0.2], &[2]).to_leaf();
    let err = opt.inject("lr", &two).unwrap_err();
    assert!(
        matches!(&err, Error::ShapeMismatch { got, .. } if got == &[2]),
        "{err}"
    );
    check_unchanged(&opt);

    for (name, value) in [("lr", -0.1), ("betas.1", 1.0), ("eps", f64::NAN)] {
        let err = opt.inject(name, &leaf(value)).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidHyperparameter { name: n, .. } if n == name),
            "{name}: {err}"
        );
        check_unchanged(&opt);
    }

    // A one-element tensor of any rank is fine, and an integer one converts as an override
    // does: injected, it steps exactly as the float it holds.
    opt.inject("lr", &t(&[0.01], &[1, 1]).to_leaf())?;
    assert_eq!(opt.groups()[0].hyperparameters.lr, 0.01);
    let model = model()?;
    let n = model.parameters()?.len();
    let mut int_lr = Optimizer::new(Sgd::default(), n)?;
    int_lr.inject("lr", &Tensor::scalar(1u32))?;
    let err = int_lr.inject("lr", &Tensor::scalar(-1i64)).unwrap_err();
    assert!(matches!(err, Error::InvalidHyperparameter { .. }), "{err}");
    let reference = Optimizer::new(Sgd::new(1.0), n)?;
    assert_eq!(
        meta_loss(&model, &int_lr, InnerloopOptions::new())?.to_scalar_f64()?,
        meta_loss(&model, &reference, InnerloopOptions::new())?.to_scalar_f64()?
    );
    Ok(())
}
