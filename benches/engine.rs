//! Engine benchmarks (printed, never asserted): the tape's overhead per op against the
//! raw candle op, and a 1-40-40-1 MLP forward + second-order backward.
//!
//! Run with `cargo bench --bench engine`. Medians of repeated timings with
//! `std::time::Instant`; compare ratios, not absolute times, across machines. The device
//! is `CANDLE_HIGHER_DEVICE`'s (the CPU by default; the f64 rows are left out on Metal,
//! which has no f64), except for the CPU fast paths, which exist on the CPU only.

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_higher::{grad, grad_with_stats, DType, Device, GradOptions, Tensor};

/// The device `CANDLE_HIGHER_DEVICE` names (the CPU when unset).
fn device() -> Device {
    candle_higher::device_from_env().unwrap_or_else(|e| panic!("CANDLE_HIGHER_DEVICE: {e}"))
}

/// Waits for the device's queued work (a GPU runs asynchronously; a no-op on the CPU).
fn sync() {
    device().synchronize().expect("the device synchronizes");
}

/// Median time of one call of `f`, over `reps` batches sized to about 2 ms each.
fn median(mut f: impl FnMut()) -> Duration {
    for _ in 0..10 {
        f();
    }
    sync();
    let probe = Instant::now();
    f();
    sync();
    let one = probe.elapsed().max(Duration::from_nanos(50));
    let inner = ((2_000_000 / one.as_nanos().max(1)) as usize).clamp(1, 10_000);
    let mut samples: Vec<Duration> = (0..21)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..inner {
                f();
            }
            sync();
            start.elapsed() / inner as u32
        })
        .collect();
    samples.sort();
    samples[samples.len() / 2]
}

fn ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

fn per_op(dims: &[usize], dtype: DType) {
    let dev = device();
    let a = Tensor::new(
        candle_core::Tensor::randn(0f32, 1.0, dims, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
    );
    let b = Tensor::new(
        candle_core::Tensor::randn(0f32, 1.0, dims, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
    );
    let sq = dims[1];
    let m = Tensor::new(
        candle_core::Tensor::randn(0f32, 1.0, (sq, sq), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
    );
    let (la, lb, lm) = (a.to_leaf(), b.to_leaf(), m.to_leaf());
    let (ca, cb, cm) = (a.to_candle(), b.to_candle(), m.to_candle());
    println!("\nper-op cost, {dims:?} {dtype:?} (ns: raw candle | tape, no grad input | tape, recording)");
    let row = |name: &str, raw: Duration, konst: Duration, rec: Duration| {
        println!(
            "  {name:<8} {:>10.0} | {:>10.0} | {:>10.0}   overhead recording {:+.0} ns ({:.2}x)",
            ns(raw),
            ns(konst),
            ns(rec),
            ns(rec) - ns(raw),
            ns(rec) / ns(raw)
        );
    };
    row(
        "add",
        median(|| drop(black_box((&ca + &cb).unwrap()))),
        median(|| drop(black_box(a.add(&b).unwrap()))),
        median(|| drop(black_box(la.add(&lb).unwrap()))),
    );
    row(
        "mul",
        median(|| drop(black_box((&ca * &cb).unwrap()))),
        median(|| drop(black_box(a.mul(&b).unwrap()))),
        median(|| drop(black_box(la.mul(&lb).unwrap()))),
    );
    row(
        "relu",
        median(|| drop(black_box(ca.relu().unwrap()))),
        median(|| drop(black_box(a.relu().unwrap()))),
        median(|| drop(black_box(la.relu().unwrap()))),
    );
    row(
        "exp",
        median(|| drop(black_box(ca.exp().unwrap()))),
        median(|| drop(black_box(a.exp().unwrap()))),
        median(|| drop(black_box(la.exp().unwrap()))),
    );
    row(
        "matmul",
        median(|| drop(black_box(ca.matmul(&cm).unwrap()))),
        median(|| drop(black_box(a.matmul(&m).unwrap()))),
        median(|| drop(black_box(la.matmul(&lm).unwrap()))),
    );
    row(
        "sum(1)",
        median(|| drop(black_box(ca.sum(1).unwrap()))),
        median(|| drop(black_box(a.sum(1).unwrap()))),
        median(|| drop(black_box(la.sum(1).unwrap()))),
    );
    row(
        "sum(0)",
        median(|| drop(black_box(ca.sum(0).unwrap()))),
        median(|| drop(black_box(a.sum(0).unwrap()))),
        median(|| drop(black_box(la.sum(0).unwrap()))),
    );
}

struct Mlp {
    params: Vec<Tensor>,
}

impl Mlp {
    fn new(dtype: DType) -> Self {
        let dev = device();
        let r = |shape: &[usize], scale: f32| {
            Tensor::new(
                (candle_core::Tensor::randn(0f32, 1.0, shape, &dev).unwrap() * scale as f64)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .to_leaf()
        };
        Mlp {
            params: vec![
                r(&[1, 40], 1.0),
                r(&[1, 40], 0.1),
                r(&[40, 40], 0.15),
                r(&[1, 40], 0.1),
                r(&[40, 1], 0.15),
                r(&[1, 1], 0.1),
            ],
        }
    }

    fn forward(p: &[Tensor], x: &Tensor) -> Tensor {
        let h = x.matmul(&p[0]).unwrap().add(&p[1]).unwrap().relu().unwrap();
        let h = h.matmul(&p[2]).unwrap().add(&p[3]).unwrap().relu().unwrap();
        h.matmul(&p[4]).unwrap().add(&p[5]).unwrap()
    }
}

fn mlp(dtype: DType) {
    let dev = device();
    let model = Mlp::new(dtype);
    let x = Tensor::new(
        candle_core::Tensor::randn(0f32, 1.0, (10, 1), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
    );
    let y = x.sin_for_bench();
    let loss = |p: &[Tensor]| {
        Mlp::forward(p, &x)
            .sub(&y)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    };
    println!("\n1-40-40-1 MLP, batch 10, {dtype:?}");
    let fwd = median(|| drop(black_box(loss(&model.params))));
    let first = median(|| {
        let l = loss(&model.params);
        drop(black_box(
            grad(&[l], &model.params, GradOptions::default()).unwrap(),
        ));
    });
    // One MAML-style inner step and the second-order meta-gradient through it.
    let maml = || {
        let l = loss(&model.params);
        let (g, s1) = grad_with_stats(&[l], &model.params, GradOptions::create_graph()).unwrap();
        let fast: Vec<Tensor> = model
            .params
            .iter()
            .zip(&g)
            .map(|(p, g)| p.sub(g.as_ref().unwrap().mul(0.01).unwrap()).unwrap())
            .collect();
        let meta = loss(&fast);
        let (mg, s2) = grad_with_stats(&[meta], &model.params, GradOptions::default()).unwrap();
        black_box(mg);
        (s1, s2)
    };
    let (s1, s2) = maml();
    let second = median(|| {
        black_box(maml());
    });
    println!(
        "  forward + loss                          {:>10.1} us",
        ns(fwd) / 1e3
    );
    println!(
        "  forward + first-order gradient          {:>10.1} us",
        ns(first) / 1e3
    );
    println!(
        "  inner step (create_graph) + meta-grad   {:>10.1} us   nodes visited: inner {} ({} on path), meta {} ({} on path)",
        ns(second) / 1e3,
        s1.nodes_visited,
        s1.nodes_on_path,
        s2.nodes_visited,
        s2.nodes_on_path
    );
}

/// An inner-step `grad` at step 1 and at step 1000 of a hand unroll of the MLP.
fn pruning() {
    let dev = device();
    let model = Mlp::new(DType::F32);
    let x = Tensor::new(candle_core::Tensor::randn(0f32, 1.0, (10, 1), &dev).unwrap());
    let y = x.sin_for_bench();
    let mut params = model.params.clone();
    let step = |p: &[Tensor]| -> Vec<Tensor> {
        let l = Mlp::forward(p, &x)
            .sub(&y)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let g = grad(&[l], p, GradOptions::create_graph()).unwrap();
        p.iter()
            .zip(&g)
            .map(|(p, g)| p.sub(g.as_ref().unwrap().mul(0.001).unwrap()).unwrap())
            .collect()
    };
    let at_1 = median(|| drop(black_box(step(&params))));
    for _ in 0..1000 {
        params = step(&params);
    }
    let at_1000 = median(|| drop(black_box(step(&params))));
    println!(
        "\npruning: one inner step at step 1 {:.1} us, at step 1000 {:.1} us (ratio {:.2})",
        ns(at_1) / 1e3,
        ns(at_1000) / 1e3,
        ns(at_1000) / ns(at_1)
    );
}

trait SinForBench {
    fn sin_for_bench(&self) -> Tensor;
}

impl SinForBench for Tensor {
    fn sin_for_bench(&self) -> Tensor {
        Tensor::new(self.to_candle().sin().unwrap())
    }
}

/// The fast paths against what they replace: a small matmul with `RAYON_NUM_THREADS`
/// unset (candle looks the thread count up on each call), and a bias-gradient `sum_to`.
fn fast_paths() {
    // CPU only: the fast paths are the CPU's (other devices take candle's kernels).
    let dev = Device::Cpu;
    let a = Tensor::new(candle_core::Tensor::randn(0f32, 1.0, (10, 40), &dev).unwrap());
    let m = Tensor::new(candle_core::Tensor::randn(0f32, 1.0, (40, 40), &dev).unwrap());
    let (ca, cm) = (a.to_candle(), m.to_candle());
    let saved = std::env::var("RAYON_NUM_THREADS").ok();
    std::env::remove_var("RAYON_NUM_THREADS");
    let candle_unset = median(|| drop(black_box(ca.matmul(&cm).unwrap())));
    let ours_unset = median(|| drop(black_box(a.matmul(&m).unwrap())));
    if let Some(v) = saved {
        std::env::set_var("RAYON_NUM_THREADS", v);
    }
    println!(
        "\nmatmul [10,40]x[40,40] f32 with RAYON_NUM_THREADS unset: candle {:.0} ns, ours {:.0} ns",
        ns(candle_unset),
        ns(ours_unset)
    );
    let g = Tensor::new(candle_core::Tensor::randn(0f32, 1.0, (10, 40), &dev).unwrap());
    let old = median(|| drop(black_box(g.sum_dims(&[0], true).unwrap())));
    let new = median(|| drop(black_box(g.sum_to(&[1, 40]).unwrap())));
    println!(
        "bias gradient [10,40] -> [1,40] f32: sum over dim 0 {:.0} ns, sum_to (ones-matmul) {:.0} ns",
        ns(old),
        ns(new)
    );
}

/// The input gradient of a stride-1 conv2d (computed as a conv2d with the flipped,
/// transposed kernel) against candle's conv_transpose2d of the same gradient.
fn conv_input_grad(dtype: DType) {
    let dev = device();
    let r = |shape: &[usize]| {
        candle_core::Tensor::randn(0f32, 1.0, shape, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let x = Tensor::new(r(&[8, 32, 28, 28])).to_leaf();
    let w = Tensor::new(r(&[32, 32, 3, 3]));
    let y = x.conv2d(&w, 1, 1, 1, 1).unwrap();
    let gy = Tensor::new(r(y.dims()));
    let ours = median(|| {
        let opts = GradOptions::default().grad_outputs(vec![gy.clone()]);
        drop(black_box(
            grad(std::slice::from_ref(&y), std::slice::from_ref(&x), opts).unwrap(),
        ));
    });
    let (cgy, cw) = (gy.to_candle(), w.to_candle());
    let candle = median(|| drop(black_box(cgy.conv_transpose2d(&cw, 1, 0, 1, 1).unwrap())));
    println!(
        "conv2d input gradient x[8,32,28,28] k[32,32,3,3] p1 {dtype:?}: ours {:.2} ms, candle conv_transpose2d {:.2} ms ({:.1}x)",
        ns(ours) / 1e6,
        ns(candle) / 1e6,
        ns(candle) / ns(ours)
    );
}

fn main() {
    println!(
        "RAYON_NUM_THREADS={}",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into())
    );
    let f64_too = !device().is_metal();
    println!("device {:?}", device());
    per_op(&[10, 40], DType::F32);
    if f64_too {
        per_op(&[10, 40], DType::F64);
    }
    per_op(&[256, 256], DType::F32);
    mlp(DType::F32);
    if f64_too {
        mlp(DType::F64);
    }
    pruning();
    if device().is_cpu() {
        fast_paths();
    }
    conv_input_grad(DType::F32);
    if f64_too {
        conv_input_grad(DType::F64);
    }
}
