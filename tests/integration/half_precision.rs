//! f16 and bf16: the tape runs in half precision where candle has the ops, and its first-
//! and second-order gradients agree with the same computation in f64 to the precision of
//! the dtype. Covers the ops a MAML step uses (matmul, bias add, relu, tanh, sigmoid,
//! the safe sqrt at zero, mean) and a differentiable SGD step.

use candle_higher::{grad, DType, GradOptions, Tensor};

/// `loss(w) = mean(tanh(x w^T + b) * sigmoid(x w^T)) + mean(sqrt(relu(x w^T)))`, then one
/// SGD step `w1 = w - 0.5 dloss/dw` with the graph kept, and the loss again at `w1`.
/// Returns the meta-loss and its gradient with respect to `w` (second order).
fn meta_loss_and_grad(dtype: DType) -> (f64, Vec<f64>) {
    let dev = crate::common::device();
    let x = Tensor::from_slice(
        &[0.5f64, -1.0, 0.25, 1.5, 0.0, -0.75, 2.0, 0.125, -0.5],
        &[3, 3],
        &dev,
    )
    .unwrap()
    .to_dtype(dtype)
    .unwrap();
    // The first row of w times x's second row is exactly 0: the safe sqrt sees a zero.
    let w = Tensor::from_slice(&[0.0f64, 0.5, 0.0, 0.25, -0.5, 1.0], &[2, 3], &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
        .to_leaf();
    let b = Tensor::from_slice(&[0.125f64, -0.25], &[2], &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let loss = |w: &Tensor| {
        let z = x.matmul(&w.t().unwrap()).unwrap();
        let a = z.add(&b).unwrap().tanh().unwrap();
        let s = z.sigmoid().unwrap();
        let r = z.relu().unwrap().sqrt().unwrap().mean_all().unwrap();
        a.mul(&s).unwrap().mean_all().unwrap().add(&r).unwrap()
    };
    let inner = loss(&w);
    let g = grad(
        &[inner],
        std::slice::from_ref(&w),
        GradOptions::create_graph(),
    )
    .unwrap()[0]
        .clone()
        .unwrap();
    assert_eq!(g.dtype(), dtype);
    let w1 = w.sub(g.mul(0.5).unwrap()).unwrap();
    let meta = loss(&w1);
    let mg = grad(
        std::slice::from_ref(&meta),
        std::slice::from_ref(&w),
        GradOptions::default(),
    )
    .unwrap()[0]
        .clone()
        .unwrap();
    assert_eq!(mg.dtype(), dtype);
    (meta.to_scalar_f64().unwrap(), mg.to_vec_f64().unwrap())
}

fn check(dtype: DType, tol: f64) {
    let (loss64, grad64) = meta_loss_and_grad(DType::F64);
    let (loss, grad) = meta_loss_and_grad(dtype);
    assert!(
        loss.is_finite() && grad.iter().all(|g| g.is_finite()),
        "{dtype:?}: {grad:?}"
    );
    assert!(
        (loss - loss64).abs() <= tol,
        "{dtype:?} loss {loss} vs {loss64}"
    );
    let scale = grad64.iter().fold(0.0f64, |m, g| m.max(g.abs()));
    for (a, b) in grad.iter().zip(&grad64) {
        assert!(
            (a - b).abs() <= tol * scale.max(1.0),
            "{dtype:?} grad {grad:?} vs {grad64:?}"
        );
    }
}

#[test]
fn f32_second_order_agrees_with_f64() {
    check(DType::F32, 1e-5);
}

#[test]
fn bf16_second_order_agrees_with_f64() {
    check(DType::BF16, 2e-2);
}

#[test]
fn f16_second_order_agrees_with_f64() {
    check(DType::F16, 5e-3);
}
