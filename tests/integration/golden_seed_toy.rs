//! The toy example of higher's docs, unrolled by hand with the engine and compared with
//! `tests/golden/seed_toy.json` (PyTorch + higher 0.2.1, float64) to 1e-9 relative (the
//! golden tolerance of `common::precision()`, looser in f32):
//! a 1x1 linear model without bias, 5 steps of SGD with momentum, lr and momentum as
//! leaf tensors of shape [1].

use candle_higher::{grad, GradOptions, Tensor};
use serde_json::Value;

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/seed_toy.json");

fn num(v: &Value) -> f64 {
    match v {
        Value::Number(n) => n.as_f64().unwrap(),
        Value::Array(a) if a.len() == 1 => num(&a[0]),
        other => panic!("expected a number or a one-element list, got {other}"),
    }
}

fn assert_rel(what: &str, got: f64, want: f64) {
    assert!(
        (got - want).abs() <= crate::common::precision().golden_tol * want.abs().max(1e-300),
        "{what}: got {got:e}, golden {want:e}"
    );
}

#[test]
fn seed_toy_matches_higher() {
    let text = std::fs::read_to_string(GOLDEN).expect("the golden file is readable");
    let golden: Value = serde_json::from_str(&text).unwrap();
    let out = &golden["outputs"];
    let on_device = |v: Vec<f64>, shape: &[usize]| crate::common::from_f64(v, shape);

    let xs: Vec<f64> = golden["data"]["x"]
        .as_array()
        .unwrap()
        .iter()
        .map(num)
        .collect();
    let ys: Vec<f64> = golden["data"]["y"]
        .as_array()
        .unwrap()
        .iter()
        .map(num)
        .collect();
    let n = xs.len();
    let x = on_device(xs, &[n, 1]);
    let y = on_device(ys, &[n, 1]);

    let w0_value = num(&golden["initial_params"]["weight"][0]);
    let w0 = on_device(vec![w0_value], &[1, 1]).to_leaf();
    let lr = on_device(vec![num(&golden["override"]["lr"]["value"])], &[1]).to_leaf();
    let momentum = on_device(vec![num(&golden["override"]["momentum"]["value"])], &[1]).to_leaf();
    let steps = golden["inner_steps"].as_u64().unwrap() as usize;

    // Inner loop: loss_t = mean((x w^T - y)^2); g_t = d loss_t / d w_t (with create_graph,
    // so the unroll stays differentiable); buf_0 = g_0, buf_t = m buf_{t-1} + g_t;
    // w_{t+1} = w_t - lr buf_t.
    let mut w = w0.clone();
    let mut buf: Option<Tensor> = None;
    for step in 0..steps {
        assert_rel(
            &format!("w[{step}]"),
            w.to_scalar_f64().unwrap(),
            num(&out["w"][step][0]),
        );
        let loss = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .sub(&y)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        assert_rel(
            &format!("inner_losses[{step}]"),
            loss.to_scalar_f64().unwrap(),
            num(&out["inner_losses"][step]),
        );
        let g = grad(
            &[loss],
            std::slice::from_ref(&w),
            GradOptions::create_graph(),
        )
        .unwrap()[0]
            .clone()
            .unwrap();
        assert_rel(
            &format!("inner_grads[{step}]"),
            g.to_scalar_f64().unwrap(),
            num(&out["inner_grads"][step][0]),
        );
        let b = match buf {
            None => g,
            Some(prev) => prev.mul(&momentum).unwrap().add(&g).unwrap(),
        };
        assert_rel(
            &format!("momentum_buffers[{step}]"),
            b.to_scalar_f64().unwrap(),
            num(&out["momentum_buffers"][step][0]),
        );
        w = w.sub(b.mul(&lr).unwrap()).unwrap();
        buf = Some(b);
    }
    assert_rel("w[5]", w.to_scalar_f64().unwrap(), num(&out["w"][steps][0]));

    let meta_loss = w.sub(3.5).unwrap().sqr().unwrap().sum_all().unwrap();
    assert_rel(
        "meta_loss",
        meta_loss.to_scalar_f64().unwrap(),
        num(&out["meta_loss"]),
    );
    let g = grad(&[meta_loss], &[w0, lr, momentum], GradOptions::default()).unwrap();
    let get = |i: usize| g[i].as_ref().unwrap().to_scalar_f64().unwrap();
    assert_rel("d meta / d w0", get(0), num(&out["d_meta_loss_d_w0"][0]));
    assert_rel("d meta / d lr", get(1), num(&out["d_meta_loss_d_lr"]));
    assert_rel(
        "d meta / d momentum",
        get(2),
        num(&out["d_meta_loss_d_momentum"]),
    );
}
