//! What a new user hits (issue 11): silent no-ops that are now typed errors, errors that
//! say what is wrong, and the pieces a first program needs.

use candle_higher::nn::{self, Module, Parameters};
use candle_higher::optim::{Optimizer, Sgd};
use candle_higher::{
    backward, grad, innerloop, DType, Device, Error, GradOptions, GradStore, InitialWeights,
    InnerloopOptions, Result, Tensor,
};

use crate::common::t;

fn model() -> Result<nn::Sequential> {
    let vb = nn::VarBuilder::new(3, DType::F64, &Device::Cpu);
    Ok(nn::seq()
        .add(nn::linear(2, 4, vb.pp("0"))?)
        .add(nn::Activation::Tanh)
        .add(nn::linear(4, 1, vb.pp("2"))?))
}

fn values(ts: &[Tensor]) -> Vec<Vec<f64>> {
    ts.iter().map(|p| p.to_vec_f64().unwrap()).collect()
}

fn data() -> (Tensor, Tensor) {
    (
        t(&[0.1, -0.4, 0.7, 0.2, -0.3, 0.9], &[3, 2]),
        t(&[0.5, -1.0, 0.25], &[3, 1]),
    )
}

/// MAML with the default options (detached initial copies): the meta-loss does not reach
/// the base model, and `step_module` says so and what to do, instead of changing nothing.
#[test]
fn step_module_without_any_gradient_names_detached_copy() -> Result<()> {
    let (x, y) = data();
    let mut model = model()?;
    let n = model.parameters()?.len();
    let inner = Optimizer::new(Sgd::new(0.1), n)?;
    let mut meta = Optimizer::new(Sgd::new(0.1), n)?;
    let (mut fmodel, mut diffopt) = innerloop(&model, &inner, InnerloopOptions::new())?;
    let loss = nn::mse(&fmodel.forward(&x)?, &y)?;
    diffopt.step(&mut fmodel, &loss)?;
    let meta_loss = nn::mse(&fmodel.forward(&x)?, &y)?;
    let grads = backward(&meta_loss)?;
    let before = values(&model.parameters()?);
    let err = meta.step_module(&mut model, &grads).unwrap_err();
    assert!(
        matches!(err, Error::NoGradient { trainable, .. } if trainable == n),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("DetachedCopy") && msg.contains("BaseParameters"),
        "{msg}"
    );
    assert_eq!(values(&model.parameters()?), before);

    // The fix the message names works: the same loop with BaseParameters steps the model.
    let options = InnerloopOptions::new().initial_weights(InitialWeights::BaseParameters);
    let (mut fmodel, mut diffopt) = innerloop(&model, &inner, options)?;
    let loss = nn::mse(&fmodel.forward(&x)?, &y)?;
    diffopt.step(&mut fmodel, &loss)?;
    let meta_loss = nn::mse(&fmodel.forward(&x)?, &y)?;
    meta.step_module(&mut model, &backward(&meta_loss)?)?;
    for (a, b) in values(&model.parameters()?).iter().zip(&before) {
        assert_ne!(a, b);
    }
    Ok(())
}

/// `Optimizer::step` with a store keyed by other tensors is the same error; a store that
/// reaches one parameter of two steps that one only.
#[test]
fn optimizer_step_needs_at_least_one_gradient() -> Result<()> {
    let a = t(&[1.0, 2.0], &[2]).to_leaf();
    let b = t(&[3.0], &[1]).to_leaf();
    let other = t(&[5.0], &[1]).to_leaf();
    let mut params = vec![a.clone(), b.clone()];
    let mut opt = Optimizer::new(Sgd::new(0.5), 2)?;
    let err = opt
        .step(&mut params, &backward(&other.sqr()?.sum_all()?)?)
        .unwrap_err();
    assert!(
        matches!(err, Error::NoGradient { trainable: 2, .. }),
        "{err}"
    );
    assert_eq!(values(&params), vec![vec![1.0, 2.0], vec![3.0]]);
    let err = opt.step(&mut params, &GradStore::default()).unwrap_err();
    assert!(matches!(err, Error::NoGradient { .. }), "{err}");
    // d/db b^2 = 2b = 6; b - 0.5 * 6 = 0; a has no gradient and stays.
    opt.step(&mut params, &backward(&b.sqr()?.sum_all()?)?)?;
    assert_eq!(values(&params), vec![vec![1.0, 2.0], vec![0.0]]);
    Ok(())
}

/// A model whose parameters are all frozen (no tensor requires grad) has nothing to step:
/// `step_module` is a no-op, not an error.
#[test]
fn step_module_on_a_frozen_only_model_is_a_no_op() -> Result<()> {
    let mut frozen = nn::Linear::new(t(&[1.0, 2.0], &[1, 2]), Some(t(&[0.5], &[1])));
    let mut opt = Optimizer::new(Sgd::new(0.1), 2)?;
    opt.step_module(&mut frozen, &GradStore::default())?;
    assert_eq!(
        values(&frozen.parameters()?),
        vec![vec![1.0, 2.0], vec![0.5]]
    );
    Ok(())
}

/// `diffopt.step` on a loss computed from the base model instead of the fmodel reaches no
/// fast weight: an error that changes nothing, instead of a silent no-op.
#[test]
fn diffopt_step_on_a_loss_of_the_base_model_is_an_error() -> Result<()> {
    let (x, y) = data();
    let model = model()?;
    let n = model.parameters()?.len();
    let inner = Optimizer::new(Sgd::new(0.1), n)?;
    for first_order in [false, true] {
        let options = InnerloopOptions::new().first_order(first_order);
        let (mut fmodel, mut diffopt) = innerloop(&model, &inner, options)?;
        let wrong = nn::mse(&model.forward(&x)?, &y)?;
        let err = diffopt.step(&mut fmodel, &wrong).unwrap_err();
        assert!(
            matches!(err, Error::NoGradient { trainable, .. } if trainable == n),
            "{err}"
        );
        assert!(err.to_string().contains("fmodel.forward"), "{err}");
        assert_eq!(fmodel.time(), 0);
        // A constant loss (no graph at all) is the same error.
        let constant = t(&[1.0], &[]);
        assert!(matches!(
            diffopt.step(&mut fmodel, &constant),
            Err(Error::NoGradient { .. })
        ));
        assert_eq!(fmodel.time(), 0);
        // The right loss still steps.
        let loss = nn::mse(&fmodel.forward(&x)?, &y)?;
        diffopt.step(&mut fmodel, &loss)?;
        assert_eq!(fmodel.time(), 1);
    }
    Ok(())
}

/// A loss that reaches some fast weights and not others is legitimate: the reached ones
/// step, the others stay.
#[test]
fn diffopt_step_on_a_loss_of_some_fast_weights_steps_those() -> Result<()> {
    let model = model()?;
    let n = model.parameters()?.len();
    let inner = Optimizer::new(Sgd::new(0.5), n)?;
    let (mut fmodel, mut diffopt) = innerloop(&model, &inner, InnerloopOptions::new())?;
    let before = values(fmodel.fast_params());
    // Only the last bias: d/db sum(b^2) = 2b, so b - 0.5 * 2b = 0.
    let loss = fmodel.fast_params()[n - 1].sqr()?.sum_all()?;
    diffopt.step(&mut fmodel, &loss)?;
    let after = values(fmodel.fast_params());
    assert_eq!(&after[..n - 1], &before[..n - 1]);
    assert_eq!(after[n - 1], vec![0.0]);
    Ok(())
}

/// `grad` with respect to a tensor that does not require grad says so (and how to fix it),
/// not that it was "not reached"; a leaf that is not reached keeps the old message.
#[test]
fn grad_of_an_input_that_does_not_require_grad_says_so() -> Result<()> {
    let x = t(&[1.0, 2.0], &[2]).to_leaf();
    let plain = t(&[3.0], &[1]);
    let unreached = t(&[3.0], &[1]).to_leaf();
    let y = x.sqr()?.sum_all()?;
    let err = grad(
        std::slice::from_ref(&y),
        &[x.clone(), plain.clone()],
        GradOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::InputDoesNotRequireGrad { index: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("to_leaf"), "{err}");
    let err = grad(
        std::slice::from_ref(&y),
        &[unreached.clone()],
        GradOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::UnusedInput { index: 0, .. }), "{err}");
    let g = grad(&[y], &[plain, x], GradOptions::default().allow_unused(true))?;
    assert!(g[0].is_none());
    assert_eq!(g[1].as_ref().unwrap().to_vec_f64()?, vec![2.0, 4.0]);
    Ok(())
}
