//! `parallel::meta_batch`: MAML tasks on several threads give the same meta-gradient, bit for
//! bit, whatever the thread count, and it is the sum (or mean) of the tasks' own.

use candle_higher::nn::{self, Parameters};
use candle_higher::optim::{Optimizer, Sgd};
use candle_higher::parallel::{meta_batch, Combine};
use candle_higher::{
    backward, innerloop, DType, Error, GradStore, InitialWeights, InnerloopOptions, Result, Tensor,
};

fn model() -> Result<nn::Sequential> {
    let vb = nn::VarBuilder::new(3, DType::F64, &crate::common::device());
    Ok(nn::seq()
        .add(nn::linear(1, 8, vb.pp("0"))?)
        .add(nn::Activation::Tanh)
        .add(nn::linear(8, 1, vb.pp("2"))?))
}

/// One MAML task: two SGD steps on a sinusoid's support points, the query loss's backward.
fn task(model: &nn::Sequential, inner: &Optimizer<Sgd>, i: usize) -> Result<GradStore> {
    let points = |shift: f64| -> Result<(Tensor, Tensor)> {
        let x: Vec<f64> = (0..6).map(|k| k as f64 * 0.3 - 0.8 + shift).collect();
        let y: Vec<f64> = x.iter().map(|v| (v + i as f64 * 0.4).sin()).collect();
        Ok((
            Tensor::from_vec(x, &[6, 1], &crate::common::device())?,
            Tensor::from_vec(y, &[6, 1], &crate::common::device())?,
        ))
    };
    let ((xs, ys), (xq, yq)) = (points(0.0)?, points(0.1)?);
    let options = InnerloopOptions::new().initial_weights(InitialWeights::BaseParameters);
    let (mut fmodel, mut diffopt) = innerloop(model, inner, options)?;
    for _ in 0..2 {
        let loss = nn::mse(&fmodel.forward(&xs)?, &ys)?;
        diffopt.step(&mut fmodel, &loss)?;
    }
    backward(&nn::mse(&fmodel.forward(&xq)?, &yq)?)
}

fn bits(store: &GradStore, params: &[Tensor]) -> Vec<Vec<u64>> {
    params
        .iter()
        .map(|p| {
            let g = store.get(p).expect("a gradient for every parameter");
            g.to_vec_f64()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        })
        .collect()
}

#[test]
fn the_meta_gradient_is_bit_identical_for_every_thread_count() -> Result<()> {
    let model = model()?;
    let params = model.clone().parameters()?;
    let inner = Optimizer::new(Sgd::new(0.1), params.len())?;
    let tasks = 7;
    let one = meta_batch(tasks, 1, Combine::Sum, |i| task(&model, &inner, i))?;
    for threads in [2, 3, 4, 16] {
        let many = meta_batch(tasks, threads, Combine::Sum, |i| task(&model, &inner, i))?;
        assert_eq!(
            bits(&one, &params),
            bits(&many, &params),
            "{threads} threads"
        );
    }
    // The sum, in task order, of each task's own meta-gradient.
    let mut by_hand = GradStore::default();
    for i in 0..tasks {
        by_hand.accumulate(&task(&model, &inner, i)?)?;
    }
    assert_eq!(bits(&one, &params), bits(&by_hand, &params));
    // The mean divides by the task count.
    let mean = meta_batch(tasks, 2, Combine::Mean, |i| task(&model, &inner, i))?;
    for p in &params {
        let (s, m) = (one.get(p).unwrap(), mean.get(p).unwrap());
        let want = s.affine(1.0 / tasks as f64, 0.0)?.to_vec_f64()?;
        assert_eq!(m.to_vec_f64()?, want);
    }
    Ok(())
}

#[test]
fn a_failing_task_or_no_threads_is_an_error() -> Result<()> {
    let model = model()?;
    let params = model.clone().parameters()?;
    let inner = Optimizer::new(Sgd::new(0.1), params.len())?;
    let failing = meta_batch(5, 2, Combine::Sum, |i| {
        if i == 3 {
            Err(Error::InvalidArgument {
                op: "task",
                message: "task 3 failed".into(),
            })
        } else {
            task(&model, &inner, i)
        }
    });
    assert!(failing.unwrap_err().to_string().contains("task 3 failed"));
    // A panicking task is an error naming its block; the pool's threads survive it.
    let panicking = meta_batch(4, 2, Combine::Sum, |i| {
        assert!(i != 2, "task 2 panics");
        task(&model, &inner, i)
    });
    assert!(panicking
        .unwrap_err()
        .to_string()
        .contains("block 1 panicked"));
    let after = meta_batch(4, 2, Combine::Sum, |i| task(&model, &inner, i))?;
    assert_eq!(after.len(), params.len());
    let none = meta_batch(5, 0, Combine::Sum, |i| task(&model, &inner, i));
    assert!(none.unwrap_err().to_string().contains("0 threads"));
    assert!(meta_batch(0, 2, Combine::Mean, |i| task(&model, &inner, i))?.is_empty());
    Ok(())
}

/// Tensors made on different threads form one graph: ids are per-thread clocks, and an op's
/// output must still outrank its inputs for `grad`'s pruning, however far ahead the thread
/// that made an input was.
#[test]
fn graphs_span_threads_whose_clocks_differ() -> Result<()> {
    // This thread's clock starts now, before the other thread's runs ahead.
    let v = Tensor::scalar(2.0f64).to_leaf();
    let w = std::thread::spawn(|| -> Result<Tensor> {
        // Far ahead of the test thread's clock.
        let mut t = Tensor::scalar(0.5f64);
        for _ in 0..100_000 {
            t = t.affine(1.0, 1.0)?;
        }
        Ok(t.affine(0.0, 3.0)?.to_leaf())
    })
    .join()
    .expect("thread")?;
    // `grad` prunes at its earliest input's id: a product made on this thread with a
    // smaller id than `w` would be cut off, and `w` get no gradient.
    let y = w.mul(&w)?.affine(2.0, 0.0)?; // dy/dw = 4 w
    let dw = candle_higher::grad(&[y], std::slice::from_ref(&w), Default::default())?;
    assert_eq!(dw[0].as_ref().expect("a gradient").to_scalar_f64()?, 12.0);
    let z = w.mul(&w)?.mul(&v)?; // dz/dw = 2 w v, dz/dv = w^2
    let grads = backward(&z)?;
    assert_eq!(grads.get(&w).unwrap().to_scalar_f64()?, 12.0);
    assert_eq!(grads.get(&v).unwrap().to_scalar_f64()?, 9.0);
    Ok(())
}

/// Every block runs under the caller's grad mode and anomaly detection, whichever thread it
/// lands on, so a meta-batch behaves the same for every thread count.
#[test]
fn blocks_run_under_the_callers_grad_and_anomaly_modes() -> Result<()> {
    use candle_higher::{detect_anomaly, is_anomaly_enabled, is_grad_enabled, no_grad};
    use std::sync::Mutex;
    let seen = |threads: usize| -> Result<Vec<(bool, bool)>> {
        let modes = Mutex::new(vec![(true, false); 4]);
        meta_batch(4, threads, Combine::Sum, |i| {
            modes.lock().unwrap()[i] = (is_grad_enabled(), is_anomaly_enabled());
            Ok(GradStore::default())
        })?;
        Ok(modes.into_inner().unwrap())
    };
    for threads in [1, 2, 4] {
        assert_eq!(seen(threads)?, vec![(true, false); 4], "{threads} threads");
        let _off = no_grad();
        let _anomaly = detect_anomaly();
        assert_eq!(seen(threads)?, vec![(false, true); 4], "{threads} threads");
    }
    // The pool's threads keep their own defaults afterwards.
    assert_eq!(seen(2)?, vec![(true, false); 4]);
    Ok(())
}

/// A meta-batch started inside a task scope runs every task in it, on whichever thread, as
/// with one thread; the pool's threads leave it afterwards.
#[test]
fn blocks_run_under_the_callers_task_scope() -> Result<()> {
    use candle_higher::nn::{task_batch, task_scope};
    use std::sync::Mutex;
    let seen = |threads: usize| -> Result<Vec<Option<usize>>> {
        let scopes = Mutex::new(vec![Some(0); 4]);
        meta_batch(4, threads, Combine::Sum, |i| {
            scopes.lock().unwrap()[i] = task_batch();
            Ok(GradStore::default())
        })?;
        Ok(scopes.into_inner().unwrap())
    };
    for threads in [1, 2, 4] {
        assert_eq!(seen(threads)?, vec![None; 4], "{threads} threads");
        let _scope = task_scope(Some(3));
        assert_eq!(seen(threads)?, vec![Some(3); 4], "{threads} threads");
    }
    assert_eq!(seen(2)?, vec![None; 4]);
    Ok(())
}
