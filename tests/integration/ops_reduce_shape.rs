//! Finite-difference checks (first and second order, in the suites' dtype: f64 unless
//! `common::dtype()` says f32) of reductions, matrix products and shape ops; third order
//! for a matmul chain.

use crate::common::*;
use candle_higher::Tensor;

#[test]
fn sums_and_means() {
    let mut r = rng(20);
    let xs = [randn(&mut r, &[2, 3, 4])];
    check12("sum dim 1", |x| x[0].sum(1)?.sqr(), &xs);
    check12("sum_keepdim 2", |x| x[0].sum_keepdim(2)?.mul(&x[0]), &xs);
    check12(
        "sum dims [0, 2]",
        |x| x[0].sum_dims(&[0, 2], false)?.sqr(),
        &xs,
    );
    check12("sum_all", |x| x[0].sum_all()?.sqr(), &xs);
    check12("mean dim 0", |x| x[0].mean(0)?.sqr(), &xs);
    check12("mean_keepdim 1", |x| x[0].mean_keepdim(1)?.mul(&x[0]), &xs);
    check12("mean_all", |x| x[0].mean_all()?.exp(), &xs);
    check12("sum_to [3, 1]", |x| x[0].sum_to(&[3, 1])?.sqr(), &xs);
    // Leading dims only: one pass over the rows.
    check12("sum_to [3, 4]", |x| x[0].sum_to(&[3, 4])?.sqr(), &xs);
    check12(
        "sum_to [1, 3, 4]",
        |x| x[0].sum_to(&[1, 3, 4])?.mul(&x[0]),
        &xs,
    );
    check12("sum_to [4]", |x| x[0].sum_to(&[4])?.exp(), &xs);
    check12(
        "sum_to [3, 2] of a transposed view",
        |x| x[0].transpose(0, 2)?.sum_to(&[3, 2])?.sqr(),
        &xs,
    );
    // Only dims of size 1 to sum (one task, a batch of one): a reshape.
    let ones = [randn(&mut r, &[1, 1, 3, 2])];
    check12(
        "sum_to [1, 3, 2]",
        |x| x[0].sum_to(&[1, 3, 2])?.sqr(),
        &ones,
    );
    check12(
        "sum_to [3, 2] over size-1 dims",
        |x| x[0].sum_to(&[3, 2])?.mul(&x[0].sum_to(&[3, 2])?),
        &ones,
    );
    let summed = ones[0].sum_to(&[3, 2]).unwrap();
    assert_eq!(summed.dims(), &[3, 2]);
    assert_eq!(
        summed.to_vec::<f64>().unwrap(),
        ones[0]
            .to_dtype(candle_higher::DType::F64)
            .unwrap()
            .to_vec::<f64>()
            .unwrap()
    );
}

#[test]
fn max_and_min() {
    let mut r = rng(21);
    let xs = [randn(&mut r, &[3, 4])];
    check12("max dim 1", |x| x[0].max(1)?.sqr(), &xs);
    check12("max_keepdim 0", |x| x[0].max_keepdim(0)?.mul(&x[0]), &xs);
    check12("min dim 0", |x| x[0].min(0)?.sqr(), &xs);
    check12("min_keepdim 1", |x| x[0].min_keepdim(1)?.mul(&x[0]), &xs);
}

#[test]
fn matmul_2d_and_batched() {
    let mut r = rng(22);
    let ab = [randn(&mut r, &[2, 3]), randn(&mut r, &[3, 4])];
    check12("matmul 2-D", |x| x[0].matmul(&x[1]), &ab);
    check12(
        "matmul 2-D transposed views",
        |x| x[1].t()?.matmul(&x[0].t()?),
        &ab,
    );
    let batched = [randn(&mut r, &[2, 2, 3]), randn(&mut r, &[3, 2])];
    check12("matmul [2,2,3] x [3,2]", |x| x[0].matmul(&x[1]), &batched);
    let bcast = [randn(&mut r, &[2, 1, 2, 3]), randn(&mut r, &[3, 3, 2])];
    check12("matmul [2,1,2,3] x [3,3,2]", |x| x[0].matmul(&x[1]), &bcast);
}

#[test]
fn third_order_matmul_chain() {
    let mut r = rng(23);
    let xs = [
        randn(&mut r, &[2, 3]),
        randn(&mut r, &[3, 3]),
        randn(&mut r, &[3, 2]),
    ];
    check_op(
        "matmul chain",
        |x| {
            x[0].matmul(&x[1])?
                .tanh()?
                .matmul(&x[2])?
                .matmul(&x[1].narrow(0, 0, 2)?)
        },
        &xs,
        3,
    );
}

#[test]
fn shape_ops() {
    let mut r = rng(24);
    let xs = [randn(&mut r, &[2, 3, 4])];
    let sq = |y: Tensor| y.mul(&y);
    check12("transpose", move |x| sq(x[0].transpose(0, 2)?), &xs);
    check12("permute", move |x| sq(x[0].permute(&[1, 2, 0])?), &xs);
    check12("reshape", move |x| sq(x[0].reshape(&[4, 6])?), &xs);
    check12("flatten_from", move |x| sq(x[0].flatten_from(1)?), &xs);
    check12("narrow", move |x| sq(x[0].narrow(2, 1, 2)?), &xs);
    check12(
        "pad_with_zeros",
        move |x| sq(x[0].pad_with_zeros(1, 1, 2)?),
        &xs,
    );
    check12(
        "unsqueeze/squeeze",
        move |x| sq(x[0].unsqueeze(1)?.squeeze(1)?.exp()?),
        &xs,
    );
    let ys = [randn(&mut r, &[3, 1])];
    check12(
        "broadcast_as",
        move |x| sq(x[0].broadcast_as(&[2, 3, 4])?),
        &ys,
    );
}

#[test]
fn cat_and_stack() {
    let mut r = rng(25);
    let xs = [
        randn(&mut r, &[2, 3]),
        randn(&mut r, &[2, 2]),
        randn(&mut r, &[2, 3]),
    ];
    check12(
        "cat dim 1",
        |x| Tensor::cat(&[x[0].clone(), x[1].clone()], 1)?.sqr(),
        &xs,
    );
    check12(
        "cat dim 0",
        |x| Tensor::cat(&[x[0].clone(), x[2].clone()], 0)?.sqr(),
        &xs,
    );
    check12(
        "stack dim 1",
        |x| Tensor::stack(&[x[0].clone(), x[2].mul(&x[0])?], 1)?.sqr(),
        &xs,
    );
}

#[test]
fn to_dtype_gradient_converts_back() {
    // d/dx sum(2 f32(x)) = 2, delivered in x's dtype (f64); in the f32 run, through f16.
    let other = if dtype() == candle_higher::DType::F32 {
        candle_higher::DType::F16
    } else {
        candle_higher::DType::F32
    };
    let x = t(&[0.5, -1.25], &[2]).to_leaf();
    let y = x
        .to_dtype(other)
        .unwrap()
        .affine(2.0, 0.0)
        .unwrap()
        .sum_all()
        .unwrap();
    let g = candle_higher::grad(&[y], &[x], Default::default()).unwrap()[0]
        .clone()
        .unwrap();
    assert_eq!(g.dtype(), dtype());
    assert_eq!(g.to_vec_f64().unwrap(), vec![2.0, 2.0]);
}
