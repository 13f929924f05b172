//! A differentiable op of your own (PyTorch's `torch.autograd.Function`): a forward on
//! plain candle tensors and a backward written with the library's ops, so the op has
//! derivatives of every order and works inside an unrolled inner loop.
//!
//! The op is `log_cosh(pred - target)`, a robust regression loss: its forward is computed
//! stably in candle (`|d| + ln(1 + e^{-2|d|}) - ln 2`), its vector-Jacobian product is
//! `g * tanh(d)` with respect to `pred` and `-g * tanh(d)` with respect to `target`.
//! The program checks its first and second derivatives against central finite
//! differences, then differentiates a 3-step inner loop trained with it with respect to
//! the learning rate and checks that hypergradient too.
//!
//! `cargo run --release --example custom_op`

use candle_higher::candle;
use candle_higher::nn::{self, Parameters};
use candle_higher::optim::{Optimizer, Sgd};
use candle_higher::{
    apply_custom_op, grad_one, innerloop, CustomOp, DType, GradOptions, InnerloopOptions,
    Overrides, Result, Tensor,
};

/// `log(cosh(pred - target))`, elementwise.
struct LogCosh;

impl CustomOp for LogCosh {
    fn name(&self) -> &'static str {
        "log_cosh"
    }

    fn forward(&self, inputs: &[&candle::Tensor]) -> Result<candle::Tensor> {
        let a = inputs[0].sub(inputs[1])?.abs()?;
        let tail = ((a.affine(-2.0, 0.0)?.exp()? + 1.0)?.log()? - std::f64::consts::LN_2)?;
        Ok((a + tail)?)
    }

    fn vjp(
        &self,
        inputs: &[Tensor],
        _output: &Tensor,
        grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let g = grad.mul(&inputs[0].sub(&inputs[1])?.tanh()?)?;
        Ok(vec![Some(g.clone()), Some(g.neg()?)])
    }
}

/// The mean log-cosh loss.
fn log_cosh(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    apply_custom_op(LogCosh, &[pred, target])?.mean_all()
}

fn main() -> Result<()> {
    let dev = candle_higher::device_from_env()?;
    let h = 1e-5;

    // 1. The op alone, at a point: d/dx and d2/dx2 of log_cosh(x - 0.2) against FD.
    let f = |x: f64| -> Result<f64> {
        log_cosh(&Tensor::scalar(x), &Tensor::scalar(0.2))?.to_scalar_f64()
    };
    let x0 = 0.9;
    // d/dx at x, with the graph kept, so that it can be differentiated again.
    let first = |x: &Tensor| -> Result<Tensor> {
        grad_one(
            &log_cosh(x, &Tensor::scalar(0.2))?,
            x,
            GradOptions::create_graph(),
        )
    };
    let x = Tensor::scalar(x0).to_leaf();
    let d1 = first(&x)?;
    let d2 = grad_one(&d1, &x, GradOptions::default())?.to_scalar_f64()?;
    let d1 = d1.to_scalar_f64()?;
    let d1_at = |v: f64| -> Result<f64> { first(&Tensor::scalar(v).to_leaf())?.to_scalar_f64() };
    let fd1 = (f(x0 + h)? - f(x0 - h)?) / (2.0 * h);
    let fd2 = (d1_at(x0 + h)? - d1_at(x0 - h)?) / (2.0 * h);
    println!("first derivative:  {d1:.10}  finite difference {fd1:.10}");
    println!("second derivative: {d2:.10}  finite difference of the first {fd2:.10}");
    assert!((d1 - fd1).abs() < 1e-8 && (d2 - fd2).abs() < 1e-8);

    // 2. Inside an inner loop: 3 SGD steps on log_cosh, then the derivative of the final
    // loss with respect to the learning rate (a tensor override), against FD of the unroll.
    let xs = Tensor::from_vec(vec![-1.0f64, -0.5, 0.0, 0.5, 1.0, 1.5], &[6, 1], &dev)?;
    let ys = Tensor::from_vec(vec![-2.1f64, -0.9, 0.2, 1.1, 1.9, 6.0], &[6, 1], &dev)?; // one outlier
    let model = nn::linear(1, 1, nn::VarBuilder::new(0, DType::F64, &dev))?;
    let n = model.parameters()?.len();
    let unroll = |lr: &Tensor| -> Result<Tensor> {
        let inner = Optimizer::new(Sgd::new(0.0), n)?;
        let options = InnerloopOptions::new().overrides(Overrides::new().set("lr", lr.clone()));
        let (mut fmodel, mut diffopt) = innerloop(&model, &inner, options)?;
        for _ in 0..3 {
            let loss = log_cosh(&fmodel.forward(&xs)?, &ys)?;
            diffopt.step(&mut fmodel, &loss)?;
        }
        log_cosh(&fmodel.forward(&xs)?, &ys)
    };
    let lr0 = 0.5;
    let lr = Tensor::scalar(lr0).to_leaf();
    let hyper = grad_one(&unroll(&lr)?, &lr, GradOptions::default())?.to_scalar_f64()?;
    let at = |v: f64| -> Result<f64> { unroll(&Tensor::scalar(v))?.to_scalar_f64() };
    let fd = (at(lr0 + h)? - at(lr0 - h)?) / (2.0 * h);
    println!("d loss / d lr after 3 steps: {hyper:.10}  finite difference {fd:.10}");
    assert!((hyper - fd).abs() < 1e-8 * (1.0 + fd.abs()));
    Ok(())
}
