//! The fused `linear` op: values against matmul + add, gradients against central finite
//! differences at first and second order (f64).

use candle_higher::{grad, GradOptions, Result, Tensor};

fn seeded(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed;
    let v: Vec<f64> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &crate::common::device()).unwrap()
}

/// A scalar function of (x, w, b) whose second derivative is non-trivial: sum(tanh(linear)^2).
fn f(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.linear(w, Some(b))?.tanh()?.sqr()?.sum_all()
}

fn fd(inputs: &[Tensor], which: usize, h: f64, g: impl Fn(&[Tensor]) -> f64) -> Vec<f64> {
    let base = inputs[which].to_vec_f64().unwrap();
    (0..base.len())
        .map(|i| {
            let shifted = |d: f64| {
                let mut v = base.clone();
                v[i] += d;
                let mut ins = inputs.to_vec();
                ins[which] = Tensor::from_vec(v, inputs[which].dims(), &crate::common::device())
                    .unwrap()
                    .to_leaf();
                g(&ins)
            };
            (shifted(h) - shifted(-h)) / (2.0 * h)
        })
        .collect()
}

fn assert_close(a: &[f64], b: &[f64], tol: f64) {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "entry {i}: {x} vs {y}"
        );
    }
}

#[test]
fn linear_equals_matmul_plus_bias() -> Result<()> {
    let (x, w, b) = (seeded(&[2, 3, 4], 1), seeded(&[5, 4], 2), seeded(&[5], 3));
    let fused = x.linear(&w, Some(&b))?.to_vec_f64()?;
    let plain = x.matmul(&w.t()?)?.add(&b)?.to_vec_f64()?;
    assert_close(&fused, &plain, 1e-14);
    Ok(())
}

#[test]
fn first_order_matches_finite_differences() -> Result<()> {
    let inputs = [
        seeded(&[3, 4], 4).to_leaf(),
        seeded(&[2, 4], 5).to_leaf(),
        seeded(&[2], 6).to_leaf(),
    ];
    let y = f(&inputs[0], &inputs[1], &inputs[2])?;
    let grads = grad(&[y], &inputs, GradOptions::default())?;
    for (which, g) in grads.iter().enumerate() {
        let numeric = fd(&inputs, which, 1e-6, |ins| {
            f(&ins[0], &ins[1], &ins[2])
                .unwrap()
                .to_scalar_f64()
                .unwrap()
        });
        assert_close(&g.as_ref().unwrap().to_vec_f64()?, &numeric, 1e-7);
    }
    Ok(())
}

#[test]
fn second_order_matches_finite_differences() -> Result<()> {
    // d/dθ <∇f(θ), v> by FD of the analytic first derivative, for each input θ.
    let inputs = [
        seeded(&[3, 4], 7).to_leaf(),
        seeded(&[2, 4], 8).to_leaf(),
        seeded(&[2], 9).to_leaf(),
    ];
    let v: Vec<Tensor> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| seeded(t.dims(), 20 + i as u64))
        .collect();
    let directional = |ins: &[Tensor], create: bool| -> Tensor {
        let y = f(&ins[0], &ins[1], &ins[2]).unwrap();
        let g = grad(
            &[y],
            ins,
            GradOptions {
                create_graph: create,
                ..Default::default()
            },
        )
        .unwrap();
        let mut total = Tensor::scalar(0.0f64);
        for (gi, vi) in g.iter().zip(&v) {
            total = total
                .add(gi.as_ref().unwrap().mul(vi).unwrap().sum_all().unwrap())
                .unwrap();
        }
        total
    };
    let hvp = grad(
        &[directional(&inputs, true)],
        &inputs,
        GradOptions::default(),
    )?;
    for (which, h) in hvp.iter().enumerate() {
        let numeric = fd(&inputs, which, 1e-5, |ins| {
            directional(ins, false).to_scalar_f64().unwrap()
        });
        assert_close(&h.as_ref().unwrap().to_vec_f64()?, &numeric, 1e-6);
    }
    Ok(())
}

#[test]
fn mismatched_weight_names_both_shapes() {
    let err = seeded(&[3, 4], 1)
        .linear(&seeded(&[2, 5], 2), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("[3, 4]") && err.contains("[2, 5]"), "{err}");
}
