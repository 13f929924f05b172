//! The README's tour, as code that must compile and run: the MAML loop, a tensor learning
//! rate, a user-defined model and a user-written optimizer (trained on candle `Var`s too).
//! When the README changes, change this file with it.

use candle_higher::nn::{self, Module, Parameters, Visitor};
use candle_higher::optim::{Adam, Optimizer, Overrides, Sgd};
use candle_higher::{
    backward, differentiable_optimizer, grad, innerloop, DType, GradOptions, InitialWeights,
    InnerloopOptions, Result, State, Tensor,
};

fn data(n: usize, shift: f32) -> Result<(Tensor, Tensor)> {
    let x: Vec<f32> = (0..n).map(|i| i as f32 / n as f32 - 0.5 + shift).collect();
    let y: Vec<f32> = x.iter().map(|v| (3.0 * v).sin()).collect();
    let dev = crate::common::device();
    Ok((
        Tensor::from_slice(&x, &[n, 1], &dev)?,
        Tensor::from_slice(&y, &[n, 1], &dev)?,
    ))
}

/// "MAML in a dozen lines": the meta-gradient reaches every base parameter and the Adam
/// step changes them.
#[test]
fn maml_in_a_dozen_lines() -> Result<()> {
    let (x_support, y_support) = data(10, 0.0)?;
    let (x_query, y_query) = data(10, 0.05)?;
    let vb = nn::VarBuilder::new(0, DType::F32, &crate::common::device());
    let mut model = nn::seq()
        .add(nn::linear(1, 40, vb.pp("0"))?)
        .add(nn::Activation::Relu)
        .add(nn::linear(40, 1, vb.pp("2"))?);
    let mut meta_opt = Optimizer::new(Adam::new(1e-3), model.parameters()?.len())?;
    let inner_opt = Optimizer::new(Sgd::new(0.01), model.parameters()?.len())?;
    let before: Vec<Vec<f64>> = model
        .parameters()?
        .iter()
        .map(Tensor::to_vec_f64)
        .collect::<Result<_>>()?;

    let options = InnerloopOptions::new().initial_weights(InitialWeights::BaseParameters);
    let (mut fmodel, mut diffopt) = innerloop(&model, &inner_opt, options)?;
    for _ in 0..2 {
        let loss = nn::mse(&fmodel.forward(&x_support)?, &y_support)?;
        diffopt.step(&mut fmodel, &loss)?;
    }
    let meta_loss = nn::mse(&fmodel.forward(&x_query)?, &y_query)?;
    let grads = backward(&meta_loss)?;
    for p in model.parameters()? {
        assert!(
            grads.get(&p).is_some(),
            "a base parameter got no meta-gradient"
        );
    }
    meta_opt.step_module(&mut model, &grads)?;
    for (p, b) in model.parameters()?.iter().zip(&before) {
        assert_ne!(&p.to_vec_f64()?, b);
    }
    Ok(())
}

/// "Hyperparameters as tensors": the meta-gradient reaches a tensor learning rate, and it
/// agrees with a central finite difference.
#[test]
fn tensor_learning_rate() -> Result<()> {
    let (x_support, y_support) = data(10, 0.0)?;
    let (x_query, y_query) = data(10, 0.05)?;
    let vb = nn::VarBuilder::new(1, DType::F64, &crate::common::device());
    let model = nn::seq()
        .add(nn::linear(1, 8, vb.pp("0"))?)
        .add(nn::Activation::Tanh)
        .add(nn::linear(8, 1, vb.pp("2"))?);
    let inner_opt = Optimizer::new(Sgd::new(0.01), model.parameters()?.len())?;
    let meta_loss = |lr: Tensor| -> Result<Tensor> {
        let options = InnerloopOptions::new().overrides(Overrides::new().set("lr", lr));
        let (mut fmodel, mut diffopt) = innerloop(&model, &inner_opt, options)?;
        for _ in 0..3 {
            let loss = nn::mse(
                &fmodel.forward(&x_support.to_dtype(DType::F64)?)?,
                &y_support.to_dtype(DType::F64)?,
            )?;
            diffopt.step(&mut fmodel, &loss)?;
        }
        nn::mse(
            &fmodel.forward(&x_query.to_dtype(DType::F64)?)?,
            &y_query.to_dtype(DType::F64)?,
        )
    };
    let lr = Tensor::full_scalar(0.1, DType::F64, &crate::common::device())?.to_leaf();
    let g = grad(&[meta_loss(lr.clone())?], &[lr], GradOptions::default())?[0]
        .clone()
        .expect("the learning rate gets a gradient")
        .to_scalar_f64()?;
    let h = 1e-5;
    let at = |v: f64| -> Result<f64> {
        meta_loss(Tensor::full_scalar(
            v,
            DType::F64,
            &crate::common::device(),
        )?)?
        .to_scalar_f64()
    };
    let fd = (at(0.1 + h)? - at(0.1 - h)?) / (2.0 * h);
    assert!((g - fd).abs() <= 1e-6 * fd.abs().max(1e-3), "{g} vs {fd}");
    Ok(())
}

#[derive(Clone)]
struct Mlp {
    hidden: nn::Linear,
    out: nn::Linear,
}

impl Parameters for Mlp {
    fn visit(&mut self, v: &mut Visitor<'_>) -> Result<()> {
        v.module("hidden", &mut self.hidden)?;
        v.module("out", &mut self.out)
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.hidden.forward(x)?.relu()?)
    }
}

/// "Your own model": dotted names in visiting order, and a forward pass.
#[test]
fn your_own_model() -> Result<()> {
    let vb = nn::VarBuilder::new(2, DType::F32, &crate::common::device());
    let mlp = Mlp {
        hidden: nn::linear(1, 4, vb.pp("hidden"))?,
        out: nn::linear(4, 1, vb.pp("out"))?,
    };
    let names: Vec<String> = mlp
        .named_parameters()?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        names,
        ["hidden.weight", "hidden.bias", "out.weight", "out.bias"]
    );
    let (x, _) = data(5, 0.0)?;
    assert_eq!(mlp.forward(&x)?.dims(), &[5, 1]);
    Ok(())
}

#[differentiable_optimizer]
pub(crate) struct SignSgd {
    pub lr: f64,
    pub momentum: f64,
}

#[differentiable_optimizer]
impl SignSgd {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let buf = state.get_or_insert_with("momentum_buffer", || p.zeros_like())?;
        buf.mul_(self.momentum)?.add_(grad)?;
        p.sub_(&buf.sign()?.mul(self.lr)?)?;
        Ok(())
    }
}

/// "Your own optimizer": the README's SignSgd trains a plain candle `Var` through
/// `step_vars`, each step moving every weight by exactly `lr` against its momentum's sign.
#[test]
fn your_own_optimizer_on_candle_vars() -> Result<()> {
    let dev = crate::common::device();
    let w = candle_core::Var::new(&[2.0f64, -3.0], &dev)?;
    let mut opt = Optimizer::new(
        SignSgd {
            lr: 0.5,
            momentum: 0.9,
        },
        1,
    )?;
    let loss = |w: &candle_core::Tensor| w.sqr().and_then(|s| s.sum_all());
    let first = loss(w.as_tensor())?.to_scalar::<f64>()?;
    for _ in 0..3 {
        opt.step_vars(std::slice::from_ref(&w), &loss(w.as_tensor())?.backward()?)?;
    }
    assert_eq!(w.to_vec1::<f64>()?, vec![0.5, -1.5]);
    assert!(loss(w.as_tensor())?.to_scalar::<f64>()? < first);
    Ok(())
}

/// "Your own optimizer": the README's one-line check passes on its SignSgd, with `lr` and
/// `momentum` both differentiated.
#[test]
fn your_own_optimizer_passes_check_optimizer() {
    let report = candle_higher::testing::check_optimizer(SignSgd {
        lr: 0.05,
        momentum: 0.9,
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = report
        .hypergradients
        .iter()
        .map(|h| h.name.as_str())
        .collect();
    assert_eq!(names, ["lr", "momentum", "initial parameters"]);
    assert!(report.to_string().contains("finite difference"));
}
