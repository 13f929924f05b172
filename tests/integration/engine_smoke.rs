use candle_higher::{grad, GradOptions, Tensor};

#[test]
fn third_derivative_of_cube() {
    let x = Tensor::scalar(3.0f64).to_leaf();
    let y = x.mul(&x).unwrap().mul(&x).unwrap();
    let d1 = grad(&[y], std::slice::from_ref(&x), GradOptions::create_graph()).unwrap()[0]
        .clone()
        .unwrap();
    let d2 = grad(
        std::slice::from_ref(&d1),
        std::slice::from_ref(&x),
        GradOptions::create_graph(),
    )
    .unwrap()[0]
        .clone()
        .unwrap();
    let d3 = grad(
        std::slice::from_ref(&d2),
        std::slice::from_ref(&x),
        GradOptions::default(),
    )
    .unwrap()[0]
        .clone()
        .unwrap();
    assert_eq!(d1.to_scalar_f64().unwrap(), 27.0);
    assert_eq!(d2.to_scalar_f64().unwrap(), 18.0);
    assert_eq!(d3.to_scalar_f64().unwrap(), 6.0);
}

#[test]
fn mlp_maml_step_matches_fd() {
    let dev = crate::common::device();
    let w = Tensor::from_vec(vec![0.3f64, -0.2, 0.5, 0.1, 0.7, -0.4], &[2, 3], &dev)
        .unwrap()
        .to_leaf();
    let x = Tensor::from_vec(
        vec![1.0f64, 2.0, -1.0, 0.5, 0.3, 0.2, -0.7, 1.1, 0.4],
        &[3, 3],
        &dev,
    )
    .unwrap();
    let f = |w: &Tensor, create: bool| -> f64 {
        let loss = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .tanh()
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let g = grad(
            &[loss],
            std::slice::from_ref(w),
            GradOptions {
                create_graph: create,
                ..Default::default()
            },
        )
        .unwrap()[0]
            .clone()
            .unwrap();
        let w1 = w.sub(g.mul(0.5).unwrap()).unwrap();
        let q = x
            .matmul(&w1.t().unwrap())
            .unwrap()
            .tanh()
            .unwrap()
            .sum_all()
            .unwrap();
        let mg = grad(
            std::slice::from_ref(&q),
            std::slice::from_ref(w),
            GradOptions::default(),
        )
        .unwrap()[0]
            .clone()
            .unwrap();
        let _ = mg;
        q.to_scalar_f64().unwrap()
    };
    let loss = x
        .matmul(&w.t().unwrap())
        .unwrap()
        .tanh()
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let g = grad(
        &[loss],
        std::slice::from_ref(&w),
        GradOptions::create_graph(),
    )
    .unwrap()[0]
        .clone()
        .unwrap();
    let w1 = w.sub(g.mul(0.5).unwrap()).unwrap();
    let q = x
        .matmul(&w1.t().unwrap())
        .unwrap()
        .tanh()
        .unwrap()
        .sum_all()
        .unwrap();
    let mg = grad(&[q], std::slice::from_ref(&w), GradOptions::default()).unwrap()[0]
        .clone()
        .unwrap()
        .to_vec_f64()
        .unwrap();
    let base = w.to_vec_f64().unwrap();
    for i in 0..6 {
        let h = 1e-6;
        let mut p = base.clone();
        p[i] += h;
        let mut m = base.clone();
        m[i] -= h;
        let fp = f(&Tensor::from_vec(p, &[2, 3], &dev).unwrap().to_leaf(), true);
        let fm = f(&Tensor::from_vec(m, &[2, 3], &dev).unwrap().to_leaf(), true);
        let fd = (fp - fm) / (2.0 * h);
        assert!((fd - mg[i]).abs() < 1e-8, "{i}: {fd} vs {}", mg[i]);
    }
}
