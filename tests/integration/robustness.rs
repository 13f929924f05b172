//! Inputs at the edges: meta-batches over many thread counts (the worker threads stay
//! bounded), reductions and softmax-like ops over empty tensors (PyTorch's values, or a typed
//! error naming the op), and model loading from names, shapes, dtypes or files that do not
//! fit (a typed error naming what is wrong, and the model left exactly as it was).

use std::process::Command;
use std::time::{Duration, Instant};

use candle_higher::nn::{self, Parameters};
use candle_higher::parallel::{meta_batch, Combine, MAX_THREADS};
use candle_higher::{backward, DType, Error, GradStore, Result, Tensor, TensorId};

use crate::common::{bits, F64};

// ---------------------------------------------------------------------------------------
// meta_batch's worker threads

/// Set in the process that `pool_probe` runs in.
const POOL_PROBE: &str = "CANDLE_HIGHER_POOL_PROBE";

/// The ids of meta_batch's worker threads alive in this process (`/proc/self/task`; the
/// kernel keeps the first 15 bytes of a thread's name, `candle-higher-m`).
fn pool_threads() -> Vec<u64> {
    let mut ids: Vec<u64> = std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let name = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            let id = entry.file_name().to_str()?.parse().ok()?;
            name.starts_with("candle-higher-m").then_some(id)
        })
        .collect();
    ids.sort_unstable();
    ids
}

/// The worker threads once their count satisfies `done`, or after 5 s: a new thread names
/// itself a moment after it starts, and a joined one leaves `/proc/self/task` a moment
/// after `join` returns.
fn pool_threads_when(done: impl Fn(usize) -> bool) -> Vec<u64> {
    let start = Instant::now();
    loop {
        let ids = pool_threads();
        if done(ids.len()) || start.elapsed() > Duration::from_secs(5) {
            return ids;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The worker threads once they are `want`, or after 5 s.
fn pool_threads_settled(want: usize) -> Vec<u64> {
    pool_threads_when(|n| n == want)
}

/// d/dw sum(tanh(c w)) = c (1 - tanh(c w)^2), c = 0.3 (i + 1): a cheap task with rounding.
fn tanh_task(w: &Tensor, i: usize) -> Result<GradStore> {
    backward(&w.mul(0.3 * (i + 1) as f64)?.tanh()?.sum_all()?)
}

fn grad_bits(store: &GradStore, w: &Tensor) -> Vec<u64> {
    let g = store.get(w).expect("a gradient for w");
    g.to_vec_f64()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// The pool's threads are counted in a process of their own: the other tests of this binary
/// run meta-batches on their own threads at the same time.
#[test]
fn sweeping_thread_counts_keeps_the_threads_of_the_last_count_only() {
    if !cfg!(target_os = "linux") {
        return; // /proc/self/task
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "robustness::pool_probe", "--ignored"])
        .args(["--test-threads=1", "--nocapture"])
        .env(POOL_PROBE, "1")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{stdout}\n{stderr}"
    );
}

#[test]
#[ignore = "run in a process of its own by sweeping_thread_counts_keeps_the_threads_of_the_last_count_only"]
fn pool_probe() {
    if std::env::var_os(POOL_PROBE).is_none() {
        return; // --include-ignored: other tests share this process
    }
    let w = Tensor::from_slice(&[0.3, -0.7, 1.1], &[3], &crate::common::device())
        .unwrap()
        .to_leaf();
    let run = |tasks: usize, threads: usize| {
        grad_bits(
            &meta_batch(tasks, threads, Combine::Sum, |i| tanh_task(&w, i)).unwrap(),
            &w,
        )
    };
    let want = run(8, 1);
    assert!(pool_threads().is_empty(), "one thread needs no pool");
    // A sweep keeps the workers of the last count only (the caller runs the first block).
    for threads in [3, 5, 2] {
        assert_eq!(run(8, threads), want, "{threads} threads");
        let live = pool_threads_settled(threads - 1);
        assert_eq!(live.len(), threads - 1, "after {threads} threads: {live:?}");
    }
    // The same count again, and fewer tasks than threads, reuse the pool's threads.
    let two = pool_threads();
    assert_eq!(run(8, 2), want);
    assert_eq!(run(1, 2), run(1, 1));
    assert_eq!(pool_threads(), two, "the pool of 2 threads is kept");
    run(8, 4);
    let four = pool_threads_settled(3);
    assert_eq!(run(2, 4), run(2, 1));
    assert_eq!(pool_threads(), four, "2 tasks on the pool of 4 threads");
    // An absurd count is clamped to MAX_THREADS, and its threads go with the next count.
    let tasks = MAX_THREADS + 10;
    assert_eq!(run(tasks, 1000), run(tasks, 1));
    assert_eq!(pool_threads_settled(MAX_THREADS - 1).len(), MAX_THREADS - 1);
    assert_eq!(run(8, 2), want);
    assert_eq!(pool_threads_settled(1).len(), 1);
    // Two callers that keep replacing each other's pool: each finishes on the pool it
    // started with, with the right result, and no more than both pools' threads remain.
    std::thread::scope(|s| {
        for threads in [3, 4] {
            let (run, want) = (&run, &want);
            s.spawn(move || {
                for _ in 0..20 {
                    assert_eq!(run(8, threads), *want, "{threads} threads");
                }
            });
        }
    });
    let live = pool_threads_when(|n| n == 2 || n == 3).len();
    assert!(live == 2 || live == 3, "{live} threads left");
}

// ---------------------------------------------------------------------------------------
// Reductions and softmax-like ops over empty tensors, as PyTorch 2.x gives them

/// A leaf of zeros of `shape` (f64).
fn leaf(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, F64, &crate::common::device())
        .unwrap()
        .to_leaf()
}

/// The gradient of `sum(y)` with respect to `x` (`y` made from `x`): it must exist and
/// have `x`'s shape; returns its values.
fn grad_of_sum(y: &Tensor, x: &Tensor) -> Vec<f64> {
    let g = crate::common::grads_or_zeros(&y.sum_all().unwrap(), std::slice::from_ref(x));
    assert_eq!(g[0].dims(), x.dims(), "the gradient has the input's shape");
    g[0].to_vec_f64().unwrap()
}

/// `y`'s shape and values.
fn shape_vals(y: &Tensor) -> (Vec<usize>, Vec<f64>) {
    (y.dims().to_vec(), y.to_vec_f64().unwrap())
}

/// torch.zeros(2, 0).logsumexp(1) is [-inf, -inf] (the log of an empty sum); keepdim
/// [2, 1]; over a non-empty dim of an empty tensor, an empty result; the gradient is the
/// input's (empty) zeros. It was candle's untyped error from its max reduction.
#[test]
fn logsumexp_over_an_empty_dim_is_negative_infinity() {
    let ninf = f64::NEG_INFINITY;
    let x = leaf(&[2, 0]);
    for keepdim in [false, true] {
        let y = x.logsumexp(1, keepdim).unwrap();
        let want = if keepdim { vec![2, 1] } else { vec![2] };
        assert_eq!(shape_vals(&y), (want, vec![ninf; 2]), "keepdim {keepdim}");
        assert!(grad_of_sum(&y, &x).is_empty());
        let y = x.logsumexp(0, keepdim).unwrap();
        let want = if keepdim { vec![1, 0] } else { vec![0] };
        assert_eq!(shape_vals(&y), (want, vec![]), "dim 0, keepdim {keepdim}");
        assert!(grad_of_sum(&y, &x).is_empty());
    }
    let x = leaf(&[0, 3]);
    assert_eq!(
        shape_vals(&x.logsumexp(0, false).unwrap()),
        (vec![3], vec![ninf; 3])
    );
    assert_eq!(
        shape_vals(&x.logsumexp(1, true).unwrap()),
        (vec![0, 1], vec![])
    );
    let x = leaf(&[0]);
    let y = x.logsumexp(0, false).unwrap();
    assert_eq!(shape_vals(&y), (vec![], vec![ninf]));
    assert!(grad_of_sum(&y, &x).is_empty());
    // Second order through it: the gradient of the gradient is empty too.
    let g = candle_higher::grad(
        &[y],
        std::slice::from_ref(&x),
        candle_higher::GradOptions::create_graph(),
    )
    .unwrap()[0]
        .clone()
        .unwrap();
    assert!(grad_of_sum(&g, &x).is_empty());
}

/// torch.logsumexp of a slice of -inf is -inf and of one holding +inf is +inf (PyTorch
/// shifts by 0 where the maximum is infinite); the shift by the maximum gave NaN.
#[test]
fn logsumexp_of_infinite_slices_is_infinite() {
    let (inf, ninf) = (f64::INFINITY, f64::NEG_INFINITY);
    let x = crate::common::t(&[ninf, ninf, inf, 1.0, ninf, 0.0], &[3, 2]);
    let y = x.logsumexp(1, false).unwrap().to_vec_f64().unwrap();
    assert_eq!(y, vec![ninf, inf, 0.0]);
    // A finite slice is unchanged: log(e^1 + e^2).
    let y = crate::common::t(&[1.0, 2.0], &[2])
        .logsumexp(0, false)
        .unwrap();
    let want = (1f64.exp() + 2f64.exp()).ln();
    assert!((y.to_scalar_f64().unwrap() - want).abs() < 1e-15);
}

/// sum -> 0 and mean -> NaN over an empty dim, an empty result over a non-empty dim of an
/// empty tensor, an integer sum of nothing a 0 in i64; every gradient the input's zeros.
#[test]
fn sums_and_means_over_empty_dims_match_pytorch() {
    let nan = f64::NAN;
    let x = leaf(&[2, 0]);
    let cases: Vec<(&str, Tensor, Vec<usize>, Vec<f64>)> = vec![
        ("sum(1)", x.sum(1).unwrap(), vec![2], vec![0.0; 2]),
        (
            "sum_keepdim(1)",
            x.sum_keepdim(1).unwrap(),
            vec![2, 1],
            vec![0.0; 2],
        ),
        ("sum(0)", x.sum(0).unwrap(), vec![0], vec![]),
        ("sum_all", x.sum_all().unwrap(), vec![], vec![0.0]),
        ("mean(1)", x.mean(1).unwrap(), vec![2], vec![nan; 2]),
        (
            "mean_keepdim(1)",
            x.mean_keepdim(1).unwrap(),
            vec![2, 1],
            vec![nan; 2],
        ),
        ("mean(0)", x.mean(0).unwrap(), vec![0], vec![]),
        ("mean_all", x.mean_all().unwrap(), vec![], vec![nan]),
        (
            "mean_dims([0, 1])",
            x.mean_dims(&[0, 1], true).unwrap(),
            vec![1, 1],
            vec![nan],
        ),
    ];
    for (what, y, shape, want) in cases {
        let (got_shape, got) = shape_vals(&y);
        assert_eq!(got_shape, shape, "{what}");
        let same = got.len() == want.len()
            && got
                .iter()
                .zip(&want)
                .all(|(a, b)| a == b || (a.is_nan() && b.is_nan()));
        assert!(same, "{what}: {got:?}, want {want:?}");
        assert!(grad_of_sum(&y, &x).is_empty(), "{what}");
    }
    // A dim listed twice is an error, as in PyTorch (the mean divided by its size twice).
    for r in [x.sum_dims(&[1, 1], false), x.mean_dims(&[0, 1, 0], true)] {
        let err = r.unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument { message, .. } if message.contains("more than once")),
            "{err:?}"
        );
    }
    for dtype in [DType::U8, DType::U32, DType::I64] {
        let x = Tensor::zeros(&[3, 0], dtype, &crate::common::device()).unwrap();
        let y = x.sum(1).unwrap();
        assert_eq!(
            (y.dtype(), y.to_vec_f64().unwrap()),
            (DType::I64, vec![0.0; 3])
        );
    }
}

/// max / min / argmax / argmin over an empty dim are errors naming the op and the dim
/// (PyTorch: "max(): Expected reduction dim 1 to have non-zero size"); over a non-empty dim
/// of an empty tensor they give the empty result, and max's gradient is the input's zeros.
#[test]
fn extrema_over_an_empty_dim_are_errors_naming_the_op_and_dim() {
    let x = leaf(&[2, 0]);
    type Op = fn(&Tensor, usize) -> Result<Tensor>;
    let ops: [(&str, Op); 6] = [
        ("max", Tensor::max),
        ("max", Tensor::max_keepdim),
        ("min", Tensor::min),
        ("min", Tensor::min_keepdim),
        ("argmax", Tensor::argmax),
        ("argmin", Tensor::argmin),
    ];
    for (name, op) in ops {
        let err = op(&x, 1).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument { op, message }
                if *op == name && message.contains("dimension 1") && message.contains("empty")),
            "{name}: {err:?}"
        );
        // [0], or [1, 0] with keepdim.
        let y = op(&x, 0).unwrap();
        assert!(
            y.elem_count() == 0 && y.dims().last() == Some(&0),
            "{name}: {y:?}"
        );
    }
    let x = leaf(&[0, 3]);
    for y in [x.max(1).unwrap(), x.min_keepdim(1).unwrap()] {
        assert_eq!(y.dims()[0], 0);
        assert!(grad_of_sum(&y, &x).is_empty());
    }
    assert_eq!(x.argmax(1).unwrap().dims(), [0]);
    assert_eq!(x.argmin(1).unwrap().dtype(), DType::U32);
}

/// topk(0) is empty, also over an empty dim (torch.zeros(2, 0).topk(0, 1) gives [2, 0]);
/// topk over a non-empty dim of an empty tensor is empty; k past the size is an error.
#[test]
fn topk_of_nothing_is_empty() {
    let x = leaf(&[2, 3]);
    let (v, i) = x.topk(0, 1).unwrap();
    assert_eq!((v.dims(), i.dims()), (&[2, 0][..], &[2, 0][..]));
    assert_eq!(grad_of_sum(&v, &x), vec![0.0; 6]);
    let x = leaf(&[2, 0]);
    let (v, i) = x.topk(0, 1).unwrap();
    assert_eq!((v.dims(), i.dims()), (&[2, 0][..], &[2, 0][..]));
    assert!(grad_of_sum(&v, &x).is_empty());
    let err = x.topk(1, 1).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument { op: "topk", message } if message.contains("k = 1")),
        "{err:?}"
    );
    let x = leaf(&[0, 3]);
    let (v, i) = x.topk(2, 1).unwrap();
    assert_eq!((v.dims(), i.dims()), (&[0, 2][..], &[0, 2][..]));
    assert!(grad_of_sum(&v, &x).is_empty());
}

/// softmax and log_softmax of an empty tensor are empty, over either dim, with an empty
/// gradient, to second order.
#[test]
fn softmax_of_empty_tensors_is_empty() {
    for shape in [[2usize, 0], [0, 3]] {
        let x = leaf(&shape);
        for dim in 0..2 {
            for y in [x.softmax(dim).unwrap(), x.log_softmax(dim).unwrap()] {
                assert_eq!(y.dims(), shape);
                let g = candle_higher::grad(
                    &[y.sum_all().unwrap()],
                    std::slice::from_ref(&x),
                    candle_higher::GradOptions::create_graph(),
                )
                .unwrap()[0]
                    .clone()
                    .unwrap();
                assert_eq!(g.dims(), shape);
                assert!(grad_of_sum(&g, &x).is_empty());
            }
        }
    }
}

/// A 0-dim tensor has no dim 0: every op over a dim says so in a typed error naming it
/// (PyTorch wraps dim 0 of a scalar to itself; a reduction over all dims, `sum_all`,
/// `mean_all`, takes a scalar).
#[test]
fn ops_over_a_dim_of_a_scalar_are_typed_errors() {
    let x = Tensor::scalar(2.0f64).to_leaf();
    type Op = fn(&Tensor) -> Result<Tensor>;
    let ops: [(&str, Op); 9] = [
        ("sum", |x| x.sum(0)),
        ("mean", |x| x.mean(0)),
        ("max", |x| x.max(0)),
        ("min", |x| x.min_keepdim(0)),
        ("argmax", |x| x.argmax(0)),
        ("softmax", |x| x.softmax(0)),
        ("log_softmax", |x| x.log_softmax(0)),
        ("logsumexp", |x| x.logsumexp(0, false)),
        ("topk", |x| x.topk(1, 0).map(|(v, _)| v)),
    ];
    for (name, op) in ops {
        let err = op(&x).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument { op, message }
                if *op == name && message.contains("dimension 0")),
            "{name}: {err:?}"
        );
    }
    assert_eq!(x.sum_all().unwrap().to_scalar_f64().unwrap(), 2.0);
    assert_eq!(x.mean_all().unwrap().to_scalar_f64().unwrap(), 2.0);
    assert_eq!(grad_of_sum(&x.mean_all().unwrap(), &x), vec![1.0]);
}

/// Pooling an empty batch (or no channels) gives the empty output and gradient; a plane
/// smaller than the kernel (an empty one) is an error naming the op.
#[test]
fn pooling_empty_batches_is_empty() {
    for (name, pool) in [
        (
            "max_pool2d",
            Tensor::max_pool2d as fn(&Tensor, usize) -> Result<Tensor>,
        ),
        ("avg_pool2d", Tensor::avg_pool2d),
    ] {
        for (shape, want) in [([0, 1, 4, 4], [0, 1, 2, 2]), ([2, 0, 4, 4], [2, 0, 2, 2])] {
            let x = leaf(&shape);
            let y = pool(&x, 2).unwrap();
            assert_eq!(y.dims(), want, "{name} of {shape:?}");
            assert!(grad_of_sum(&y, &x).is_empty(), "{name} of {shape:?}");
        }
        let err = pool(&leaf(&[1, 1, 0, 4]), 2).unwrap_err();
        assert!(
            matches!(&err, Error::ShapeMismatch { op, .. } if *op == name),
            "{name}: {err:?}"
        );
    }
}

/// Losses over an empty batch: the mean is NaN and the sum 0, as PyTorch's `reduction`;
/// a class index into zero classes is an error naming the label.
#[test]
fn losses_over_an_empty_batch_match_pytorch() {
    use candle_higher::nn::{self, Reduction};
    let dev = crate::common::device();
    let logits = leaf(&[0, 3]);
    let labels = Tensor::zeros(&[0], DType::U32, &dev).unwrap();
    let pred = leaf(&[0]);
    let target = Tensor::zeros(&[0], F64, &dev).unwrap();
    let mean = [
        nn::cross_entropy(&logits, &labels).unwrap(),
        nn::nll(&logits, &labels).unwrap(),
        nn::mse(&pred, &target).unwrap(),
        nn::binary_cross_entropy_with_logits(&pred, &target).unwrap(),
        nn::cross_entropy_with(&logits, &labels, Reduction::Mean).unwrap(),
    ];
    for (i, y) in mean.iter().enumerate() {
        assert!(
            y.dims().is_empty() && y.to_scalar_f64().unwrap().is_nan(),
            "loss {i}"
        );
    }
    assert!(grad_of_sum(&mean[0], &logits).is_empty());
    assert!(grad_of_sum(&mean[2], &pred).is_empty());
    let sum = nn::cross_entropy_with(&logits, &labels, Reduction::Sum).unwrap();
    assert_eq!(sum.to_scalar_f64().unwrap(), 0.0);
    let none = nn::cross_entropy_with(&logits, &labels, Reduction::None).unwrap();
    assert_eq!(none.dims(), [0]);
    let no_classes = leaf(&[2, 0]);
    let labels = Tensor::zeros(&[2], DType::U32, &dev).unwrap();
    let err = nn::cross_entropy(&no_classes, &labels).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument { op: "nll", message } if message.contains("0..0")),
        "{err:?}"
    );
}

/// Integer tensors: max, min, argmax and topk of an empty tensor give empty results of
/// their dtype, and over an empty dim the same errors as floats.
#[test]
fn integer_reductions_of_empty_tensors_are_empty() {
    let dev = crate::common::device();
    for dtype in [DType::U8, DType::U32, DType::I64] {
        let x = Tensor::zeros(&[0, 3], dtype, &dev).unwrap();
        for y in [x.max(1).unwrap(), x.min_keepdim(1).unwrap()] {
            assert_eq!((y.dtype(), y.elem_count()), (dtype, 0), "{dtype:?}");
        }
        assert_eq!(x.argmax(1).unwrap().dims(), [0], "{dtype:?}");
        let (v, i) = x.topk(2, 1).unwrap();
        assert_eq!(
            (v.dims(), v.dtype(), i.dims()),
            (&[0, 2][..], dtype, &[0, 2][..])
        );
        assert!(matches!(
            x.max(0),
            Err(Error::InvalidArgument { op: "max", .. })
        ));
    }
}

/// Selection and indexing with nothing to select: empty results of the right shapes, and
/// the inputs' gradients (zeros where nothing was selected).
#[test]
fn selecting_nothing_gives_empty_results_and_zero_gradients() {
    let dev = crate::common::device();
    let x = crate::common::t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).to_leaf();
    let none = Tensor::zeros(&[0], DType::U32, &dev).unwrap();
    let y = x.index_select(&none, 1).unwrap();
    assert_eq!(y.dims(), [2, 0]);
    assert_eq!(grad_of_sum(&y, &x), vec![0.0; 6]);
    let y = x
        .gather(&Tensor::zeros(&[2, 0], DType::U32, &dev).unwrap(), 1)
        .unwrap();
    assert_eq!(y.dims(), [2, 0]);
    assert_eq!(grad_of_sum(&y, &x), vec![0.0; 6]);
    // From a transposed (strided) tensor, where candle gathers from contiguous ones only.
    let at = crate::common::t(&[1.0, 0.0, 1.0], &[3, 1])
        .to_dtype(DType::U32)
        .unwrap();
    let y = x.t().unwrap().gather(&at, 1).unwrap();
    assert_eq!(y.to_vec_f64().unwrap(), vec![4.0, 2.0, 6.0]);
    assert_eq!(grad_of_sum(&y, &x), vec![0.0, 1.0, 0.0, 1.0, 0.0, 1.0]);
    // And index_select: from a transposed tensor, at strided indices (a column).
    let cols = crate::common::t(&[2.0, 9.0, 0.0, 9.0], &[2, 2])
        .to_dtype(DType::U32)
        .unwrap();
    let at = cols.narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
    let y = x.t().unwrap().index_select(&at, 0).unwrap();
    assert_eq!(y.to_vec_f64().unwrap(), vec![3.0, 6.0, 1.0, 4.0]);
    assert_eq!(grad_of_sum(&y, &x), vec![1.0, 0.0, 1.0, 1.0, 0.0, 1.0]);
    let src = leaf(&[2, 0]);
    let y = x
        .scatter_add(&Tensor::zeros(&[2, 0], DType::U32, &dev).unwrap(), &src, 1)
        .unwrap();
    assert_eq!(y.to_vec_f64().unwrap(), x.to_vec_f64().unwrap());
    assert_eq!(grad_of_sum(&y, &x), vec![1.0; 6]);
    assert!(grad_of_sum(&y, &src).is_empty());
    let y = x.index_add(&none, &src, 1).unwrap();
    assert_eq!(grad_of_sum(&y, &x), vec![1.0; 6]);
    assert!(grad_of_sum(&y, &src).is_empty());
    // An empty tensor in a concatenation adds nothing; all of them empty, an empty result.
    let e = leaf(&[2, 0]);
    let y = Tensor::cat(&[e.clone(), x.clone(), e.clone()], 1).unwrap();
    assert_eq!(y.to_vec_f64().unwrap(), x.to_vec_f64().unwrap());
    assert!(grad_of_sum(&y, &e).is_empty());
    assert_eq!(
        Tensor::cat(&[e.clone(), e.clone()], 1).unwrap().dims(),
        [2, 0]
    );
    assert!(matches!(
        Tensor::cat(&[], 0),
        Err(Error::InvalidArgument { op: "cat", .. })
    ));
    // Elementwise selections of empty operands.
    let mask = Tensor::zeros(&[2, 0], DType::U8, &dev).unwrap();
    let y = mask.where_cond(&e, &e).unwrap();
    assert_eq!(y.dims(), [2, 0]);
    assert!(grad_of_sum(&y, &e).is_empty());
    for y in [
        e.clamp(0.0, 1.0).unwrap(),
        e.clamp(&e, 1.0).unwrap(),
        e.maximum(&e).unwrap(),
        e.minimum(0.5).unwrap(),
    ] {
        assert_eq!(y.dims(), [2, 0]);
        assert!(grad_of_sum(&y, &e).is_empty());
    }
}

// ---------------------------------------------------------------------------------------
// Loading a model from what does not fit it

/// A linear layer and a batch norm (parameters and running-statistics buffers).
fn net(seed: u64) -> nn::Sequential {
    let vb = nn::VarBuilder::new(seed, F64, &crate::common::device());
    nn::seq()
        .add(nn::linear(2, 3, vb.pp("0")).unwrap())
        .add(nn::batch_norm1d(3, nn::BatchNormConfig::default(), vb.pp("1")).unwrap())
}

/// Everything a load could change: each parameter's name, handle, frozen flag and bits,
/// each buffer's name and bits.
type Snapshot = (
    Vec<(String, TensorId, bool, Vec<u64>)>,
    Vec<(String, Vec<u64>)>,
);

fn snapshot<M: Parameters + Clone>(model: &M) -> Snapshot {
    let params = model
        .param_infos()
        .unwrap()
        .into_iter()
        .map(|p| (p.name, p.tensor.id(), p.frozen, bits(&p.tensor)))
        .collect();
    let buffers = model
        .named_buffers()
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, bits(&t)))
        .collect();
    (params, buffers)
}

/// A fresh directory for this test's files.
fn temp_dir(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("robustness_{test}_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A file that does not exist, is a directory, is cut short or holds garbage: a typed error
/// naming the file and what is wrong with it, and the model as it was. candle's own error
/// ("No such file or directory (os error 2)") named no file.
#[test]
fn loading_a_missing_truncated_or_corrupt_file_is_an_error_naming_it() {
    let dir = temp_dir("files");
    let good = dir.join("good.safetensors");
    nn::save_safetensors(&net(1), &good).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let mut model = net(2);
    let before = snapshot(&model);
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut bad_json = bytes.clone();
    bad_json[8] = b'!';
    let mut huge_header = bytes.clone();
    huge_header[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let cases: Vec<(&str, Option<Vec<u8>>, &str)> = vec![
        ("missing.safetensors", None, "cannot read"),
        (
            "empty.safetensors",
            Some(Vec::new()),
            "not a safetensors file",
        ),
        (
            "seven.safetensors",
            Some(bytes[..7].to_vec()),
            "not a safetensors file",
        ),
        (
            "header_cut.safetensors",
            Some(bytes[..8 + header_len / 2].to_vec()),
            "not a safetensors file",
        ),
        (
            "data_cut.safetensors",
            Some(bytes[..bytes.len() - 1].to_vec()),
            "not a safetensors file",
        ),
        (
            "bad_json.safetensors",
            Some(bad_json),
            "not a safetensors file",
        ),
        (
            "huge_header.safetensors",
            Some(huge_header),
            "not a safetensors file",
        ),
    ];
    for (name, content, what) in cases {
        let path = dir.join(name);
        if let Some(content) = content {
            std::fs::write(&path, content).unwrap();
        }
        let err = nn::load_safetensors(&mut model, &path).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(&err, Error::File { op: "load_safetensors", path: p, .. } if p.ends_with(name))
                && msg.contains(what)
                && msg.contains("nothing loaded"),
            "{name}: {msg}"
        );
        assert_eq!(snapshot(&model), before, "{name}");
    }
    let err = nn::load_safetensors(&mut model, &dir).unwrap_err();
    assert!(matches!(err, Error::File { .. }), "a directory: {err}");
    // Saving into a directory that does not exist names the file too.
    let nowhere = dir.join("no").join("such.safetensors");
    let err = nn::save_safetensors(&model, &nowhere).unwrap_err();
    assert!(
        matches!(&err, Error::File { op: "save_safetensors", path, .. } if path.ends_with("such.safetensors")),
        "{err}"
    );
    nn::load_safetensors(&mut model, &good).unwrap();
    assert_eq!(snapshot(&model).1, snapshot(&net(1)).1);
    std::fs::remove_dir_all(&dir).ok();
}

/// One weight in two slots (an encoder's and a decoder's), as a user ties them.
#[derive(Clone)]
struct Tied {
    encoder: Tensor,
    decoder: Tensor,
    bias: Tensor,
}

impl Parameters for Tied {
    fn visit(&mut self, v: &mut nn::Visitor<'_>) -> Result<()> {
        v.param("encoder.weight", &mut self.encoder)?;
        v.param("decoder.weight", &mut self.decoder)?;
        v.param("bias", &mut self.bias)
    }
}

fn tied(seed: u64) -> Tied {
    let vb = nn::VarBuilder::new(seed, F64, &crate::common::device());
    let w = vb.normal("encoder.weight", &[2, 2], 0.0, 1.0).unwrap();
    Tied {
        encoder: w.clone(),
        decoder: w,
        bias: vb.normal("bias", &[2], 0.0, 1.0).unwrap(),
    }
}

/// Tied weights load once and stay tied. A checkpoint that holds them under both names
/// with the same values (what PyTorch's `state_dict` saves) loads; with different values
/// it is an error naming both, and nothing changes.
#[test]
fn tied_weights_load_once_and_stay_tied() {
    // The parameters' values, in order.
    let values = |m: &Tied| -> Vec<Vec<u64>> { snapshot(m).0.into_iter().map(|p| p.3).collect() };
    let source = nn::state_dict(&tied(1)).unwrap();
    assert_eq!(source.len(), 2, "the tied weight is saved once");
    let mut model = tied(2);
    nn::load_state_dict(&mut model, &source, "tied").unwrap();
    assert_eq!(model.encoder.id(), model.decoder.id(), "still tied");
    assert_eq!(values(&model), values(&tied(1)));
    // Both names, as PyTorch saves a tied weight.
    let mut both = source.clone();
    both.insert("decoder.weight".into(), source["encoder.weight"].clone());
    let mut model = tied(2);
    nn::load_state_dict(&mut model, &both, "both").unwrap();
    assert_eq!(model.encoder.id(), model.decoder.id());
    assert_eq!(values(&model), values(&tied(1)));
    let renamed: std::collections::HashMap<String, candle_higher::candle::Tensor> = both
        .iter()
        .map(|(k, v)| (format!("m.{k}"), v.clone()))
        .collect();
    let options = nn::LoadOptions::new().rename_prefix("m.", "");
    let mut model = tied(2);
    let report = nn::load_state_dict_with(&mut model, &renamed, "renamed", &options).unwrap();
    assert!(report.unexpected.is_empty(), "{report:?}");
    assert_eq!(model.encoder.id(), model.decoder.id());
    assert_eq!(values(&model), values(&tied(1)));
    // Two different values for one weight.
    let mut differ = source.clone();
    differ.insert(
        "decoder.weight".into(),
        (&source["encoder.weight"] + 1.0).unwrap(),
    );
    let mut model = tied(2);
    let before = snapshot(&model);
    for err in [
        nn::load_state_dict(&mut model, &differ, "differ").unwrap_err(),
        nn::load_state_dict_with(&mut model, &differ, "differ", &nn::LoadOptions::new())
            .unwrap_err(),
        nn::load_state_dict_with(
            &mut model,
            &differ,
            "differ",
            &nn::LoadOptions::new().non_strict(true),
        )
        .unwrap_err(),
    ] {
        let msg = err.to_string();
        assert!(
            matches!(err, Error::InvalidArgument { .. })
                && msg.contains("encoder.weight")
                && msg.contains("decoder.weight")
                && msg.contains("nothing loaded"),
            "{msg}"
        );
        assert_eq!(snapshot(&model), before);
    }
}

/// A frozen parameter takes the checkpoint's value and stays frozen; a trainable one becomes
/// a fresh leaf.
#[test]
fn frozen_parameters_load_their_values_and_stay_frozen() {
    let source = nn::state_dict(&net(1)).unwrap();
    let mut model = net(2);
    model.set_frozen("0.weight", true).unwrap();
    nn::load_state_dict(&mut model, &source, "ckpt").unwrap();
    let infos = model.param_infos().unwrap();
    let frozen: Vec<(&str, bool)> = infos.iter().map(|p| (p.name.as_str(), p.frozen)).collect();
    assert_eq!(
        frozen,
        [
            ("0.weight", true),
            ("0.bias", false),
            ("1.weight", false),
            ("1.bias", false)
        ]
    );
    assert!(infos[1].tensor.is_leaf());
    let (got, want) = (snapshot(&model), snapshot(&net(1)));
    for (g, w) in got.0.iter().zip(&want.0) {
        assert_eq!(g.3, w.3, "{}", g.0);
    }
}

/// Another dtype: `load_state_dict` converts, as PyTorch's `copy_` does;
/// `load_state_dict_with` names every mismatched tensor unless `convert_dtype` is set, and
/// changes nothing.
#[test]
fn dtypes_convert_or_are_errors_naming_every_tensor() {
    let f32_source: std::collections::HashMap<_, _> = nn::state_dict(&net(1))
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F32).unwrap()))
        .collect();
    let mut model = net(2);
    let before = snapshot(&model);
    let err = nn::load_state_dict_with(&mut model, &f32_source, "f32", &nn::LoadOptions::new())
        .unwrap_err();
    match &err {
        Error::LoadDType { mismatched, .. } => assert_eq!(mismatched.len(), 6, "{err}"),
        _ => panic!("{err}"),
    }
    assert_eq!(snapshot(&model), before);
    let options = nn::LoadOptions::new().convert_dtype(true);
    nn::load_state_dict_with(&mut model, &f32_source, "f32", &options).unwrap();
    let mut plain = net(2);
    nn::load_state_dict(&mut plain, &f32_source, "f32").unwrap();
    for ((n, _, _, a), (_, _, _, b)) in snapshot(&model).0.iter().zip(&snapshot(&plain).0) {
        assert_eq!(a, b, "{n}");
    }
    let p = plain.parameters().unwrap();
    assert!(p.iter().all(|t| t.dtype() == F64));
}

/// Every way a load can fail leaves the parameters (their handles, values and frozen
/// flags) and the buffers exactly as they were.
#[test]
fn a_failing_load_changes_nothing() {
    let good = nn::state_dict(&net(1)).unwrap();
    let mut model = net(2);
    model.set_frozen("0.bias", true).unwrap();
    let before = snapshot(&model);
    let with =
        |edit: &dyn Fn(&mut std::collections::HashMap<String, candle_higher::candle::Tensor>)| {
            let mut t = good.clone();
            edit(&mut t);
            t
        };
    let dev = crate::common::device();
    let cases = [
        with(&|t| {
            t.remove("1.running_mean");
        }),
        with(&|t| {
            t.insert("2.weight".into(), t["0.bias"].clone());
        }),
        with(&|t| {
            t.insert(
                "1.running_var".into(),
                t["1.running_var"].reshape((3, 1)).unwrap(),
            );
        }),
        with(&|t| {
            let nan = candle_higher::candle::Tensor::new(&[1.0, f64::NAN, 1.0], &dev).unwrap();
            t.insert("1.running_var".into(), nan);
        }),
        with(&|t| {
            let inf = candle_higher::candle::Tensor::new(&[f64::NEG_INFINITY; 3], &dev).unwrap();
            t.insert("1.bias".into(), inf);
        }),
    ];
    for (i, tensors) in cases.iter().enumerate() {
        assert!(
            nn::load_state_dict(&mut model, tensors, "bad").is_err(),
            "case {i}"
        );
        assert_eq!(snapshot(&model), before, "case {i}");
        for options in [
            nn::LoadOptions::new(),
            nn::LoadOptions::new().non_strict(true).convert_dtype(true),
        ] {
            // A clone shares the parameters' handles and copies the buffers.
            let mut copy = model.clone();
            let r = nn::load_state_dict_with(&mut copy, tensors, "bad", &options);
            // Non-strict loading takes a missing or an extra name.
            if r.is_ok() {
                assert!(options.non_strict && i < 2, "case {i}");
                continue;
            }
            assert_eq!(snapshot(&copy), before, "case {i}, {options:?}");
        }
    }
    // Two names renamed to one.
    let options = nn::LoadOptions::new().rename_with(|n| n.replace("bias", "weight"));
    let err = nn::load_state_dict_with(&mut model, &good, "bad", &options).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    assert_eq!(snapshot(&model), before);
}

/// Non-strict loading vets what it loads, not what it keeps: a kept parameter that holds a
/// NaN (the model's own) does not block loading the others.
#[test]
fn non_strict_loading_vets_only_what_it_loads() {
    let mut partial = nn::state_dict(&net(1)).unwrap();
    partial.remove("0.bias");
    let mut model = net(2);
    let nan = Tensor::from_slice(&[f64::NAN, 0.0, 0.0], &[3], &crate::common::device()).unwrap();
    let mut params = model.parameters().unwrap();
    params[1] = nan.to_leaf();
    model.set_parameters(&params).unwrap();
    let options = nn::LoadOptions::new().non_strict(true);
    let report = nn::load_state_dict_with(&mut model, &partial, "partial", &options).unwrap();
    assert_eq!(report.missing, ["0.bias"]);
    assert!(model.parameters().unwrap()[1].to_vec_f64().unwrap()[0].is_nan());
    assert_eq!(snapshot(&model).0[0].3, snapshot(&net(1)).0[0].3);
}

/// `set_parameters` / `set_buffers` with the wrong count or a wrong shape or dtype: a typed
/// error naming the count or the parameter, and nothing replaced.
#[test]
fn replacement_lists_that_do_not_fit_change_nothing() {
    let mut model = net(2);
    let before = snapshot(&model);
    let params = model.parameters().unwrap();
    let buffers: Vec<Tensor> = model
        .named_buffers()
        .unwrap()
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    let err = model.set_parameters(&params[1..]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ParamCount {
                expected: 4,
                got: 3,
                ..
            }
        ),
        "{err}"
    );
    let mut shaped = params.clone();
    shaped[3] = Tensor::zeros(&[4], F64, &crate::common::device()).unwrap();
    let err = model.set_parameters(&shaped).unwrap_err();
    assert!(
        matches!(&err, Error::ParamShape { name, .. } if name == "1.bias"),
        "{err}"
    );
    let mut typed = params.clone();
    typed[2] = typed[2].to_dtype(DType::F32).unwrap();
    assert!(model.set_parameters(&typed).is_err());
    let err = model.set_buffers(&buffers[..1]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ParamCount {
                what: "buffers",
                ..
            }
        ),
        "{err}"
    );
    let mut shaped = buffers.clone();
    shaped[0] = Tensor::zeros(&[1, 3], F64, &crate::common::device()).unwrap();
    let err = model.set_buffers(&shaped).unwrap_err();
    assert!(
        matches!(&err, Error::ParamShape { name, .. } if name == "1.running_mean"),
        "{err}"
    );
    assert_eq!(snapshot(&model), before);
}

/// A source tensor that is a strided view (a transpose of a transpose, as a conversion
/// script makes) loads as its values: outputs and gradients are those of a contiguous one.
#[test]
fn strided_source_tensors_load_as_their_values() {
    use candle_higher::nn::Module;
    let mut source = nn::state_dict(&net(1)).unwrap();
    let w = source["0.weight"].clone();
    let strided = w.t().unwrap().contiguous().unwrap().t().unwrap();
    assert!(!strided.is_contiguous());
    source.insert("0.weight".into(), strided);
    let mut model = net(2);
    nn::load_state_dict(&mut model, &source, "strided").unwrap();
    let mut want = net(1);
    model.eval().unwrap();
    want.eval().unwrap();
    let x = crate::common::t(&[0.5, -1.0, 2.0, 0.25, -0.75, 1.5, 0.0, 1.0], &[4, 2]);
    let (y, y_want) = (model.forward(&x).unwrap(), want.forward(&x).unwrap());
    assert_eq!(y.to_vec_f64().unwrap(), y_want.to_vec_f64().unwrap());
    let g = grad_of_sum(&y.sqr().unwrap(), &model.parameters().unwrap()[0]);
    let g_want = grad_of_sum(&y_want.sqr().unwrap(), &want.parameters().unwrap()[0]);
    assert_eq!(g, g_want);
}
