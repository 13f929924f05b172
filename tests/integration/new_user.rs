//! What a new user hits (issue 11): silent no-ops that are now typed errors, errors that
//! say what is wrong, and the pieces a first program needs.

use candle_higher::nn::{self, Module, Parameters};
use candle_higher::optim::{Optimizer, Sgd};
use candle_higher::{
    backward, grad, innerloop, DType, Error, GradOptions, GradStore, InitialWeights,
    InnerloopOptions, Result, Tensor,
};

use crate::common::t;

fn model() -> Result<nn::Sequential> {
    let vb = nn::VarBuilder::new(3, DType::F64, &crate::common::device());
    Ok(nn::seq()
        .add(nn::linear(2, 4, vb.pp("0"))?)
        .add(nn::Activation::Tanh)
        .add(nn::linear(4, 1, vb.pp("2"))?))
}

fn values(ts: &[Tensor]) -> Vec<Vec<f64>> {
    ts.iter().map(|p| p.to_vec_f64().unwrap()).collect()
}

fn data() -> (Tensor, Tensor) {
    (
        t(&[0.1, -0.4, 0.7, 0.2, -0.3, 0.9], &[3, 2]),
        t(&[0.5, -1.0, 0.25], &[3, 1]),
    )
}

/// MAML with the default options (detached initial copies): the meta-loss does not reach
/// the base model, and `step_module` says so and what to do, instead of changing nothing.
#[test]
fn step_module_without_any_gradient_names_detached_copy() -> Result<()> {
    let (x, y) = data();
    let mut model = model()?;
    let n = model.parameters()?.len();
    let inner = Optimizer::new(Sgd::new(0.1), n)?;
    let mut meta = Optimizer::new(Sgd::new(0.1), n)?;
    let (mut fmodel, mut diffopt) = innerloop(&model, &inner, InnerloopOptions::new())?;
    let loss = nn::mse(&fmodel.forward(&x)?, &y)?;
    diffopt.step(&mut fmodel, &loss)?;
    let meta_loss = nn::mse(&fmodel.forward(&x)?, &y)?;
    let grads = backward(&meta_loss)?;
    let before = values(&model.parameters()?);
    let err = meta.step_module(&mut model, &grads).unwrap_err();
    assert!(
        matches!(err, Error::NoGradient { trainable, .. } if trainable == n),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("DetachedCopy") && msg.contains("BaseParameters"),
        "{msg}"
    );
    assert_eq!(values(&model.parameters()?), before);

    // The fix the message names works: the same loop with BaseParameters steps the model.
    let options = InnerloopOptions::new().initial_weights(InitialWeights::BaseParameters);
    let (mut fmodel, mut diffopt) = innerloop(&model, &inner, options)?;
    let loss = nn::mse(&fmodel.forward(&x)?, &y)?;
    diffopt.step(&mut fmodel, &loss)?;
    let meta_loss = nn::mse(&fmodel.forward(&x)?, &y)?;
    meta.step_module(&mut model, &backward(&meta_loss)?)?;
    for (a, b) in values(&model.parameters()?).iter().zip(&before) {
        assert_ne!(a, b);
    }
    Ok(())
}

/// `Optimizer::step` with a store keyed by other tensors is the same error; a store that
/// reaches one parameter of two steps that one only.
#[test]
fn optimizer_step_needs_at_least_one_gradient() -> Result<()> {
    let a = t(&[1.0, 2.0], &[2]).to_leaf();
    let b = t(&[3.0], &[1]).to_leaf();
    let other = t(&[5.0], &[1]).to_leaf();
    let mut params = vec![a.clone(), b.clone()];
    let mut opt = Optimizer::new(Sgd::new(0.5), 2)?;
    let err = opt
        .step(&mut params, &backward(&other.sqr()?.sum_all()?)?)
        .unwrap_err();
    assert!(
        matches!(err, Error::NoGradient { trainable: 2, .. }),
        "{err}"
    );
    assert_eq!(values(&params), vec![vec![1.0, 2.0], vec![3.0]]);
    let err = opt.step(&mut params, &GradStore::default()).unwrap_err();
    assert!(matches!(err, Error::NoGradient { .. }), "{err}");
    // d/db b^2 = 2b = 6; b - 0.5 * 6 = 0; a has no gradient and stays.
    opt.step(&mut params, &backward(&b.sqr()?.sum_all()?)?)?;
    assert_eq!(values(&params), vec![vec![1.0, 2.0], vec![0.0]]);
    Ok(())
}

/// A model whose parameters are all frozen (no tensor requires grad) has nothing to step:
/// `step_module` is a no-op, not an error.
#[test]
fn step_module_on_a_frozen_only_model_is_a_no_op() -> Result<()> {
    let mut frozen = nn::Linear::new(t(&[1.0, 2.0], &[1, 2]), Some(t(&[0.5], &[1])));
    let mut opt = Optimizer::new(Sgd::new(0.1), 2)?;
    opt.step_module(&mut frozen, &GradStore::default())?;
    assert_eq!(
        values(&frozen.parameters()?),
        vec![vec![1.0, 2.0], vec![0.5]]
    );
    Ok(())
}

/// `diffopt.step` on a loss computed from the base model instead of the fmodel reaches no
/// fast weight: an error that changes nothing, instead of a silent no-op.
#[test]
fn diffopt_step_on_a_loss_of_the_base_model_is_an_error() -> Result<()> {
    let (x, y) = data();
    let model = model()?;
    let n = model.parameters()?.len();
    let inner = Optimizer::new(Sgd::new(0.1), n)?;
    for first_order in [false, true] {
        let options = InnerloopOptions::new().first_order(first_order);
        let (mut fmodel, mut diffopt) = innerloop(&model, &inner, options)?;
        let wrong = nn::mse(&model.forward(&x)?, &y)?;
        let err = diffopt.step(&mut fmodel, &wrong).unwrap_err();
        assert!(
            matches!(err, Error::NoGradient { trainable, .. } if trainable == n),
            "{err}"
        );
        assert!(err.to_string().contains("fmodel.forward"), "{err}");
        assert_eq!(fmodel.time(), 0);
        // A constant loss (no graph at all) is the same error.
        let constant = t(&[1.0], &[]);
        assert!(matches!(
            diffopt.step(&mut fmodel, &constant),
            Err(Error::NoGradient { .. })
        ));
        assert_eq!(fmodel.time(), 0);
        // The right loss still steps.
        let loss = nn::mse(&fmodel.forward(&x)?, &y)?;
        diffopt.step(&mut fmodel, &loss)?;
        assert_eq!(fmodel.time(), 1);
    }
    Ok(())
}

/// A loss that reaches some fast weights and not others is legitimate: the reached ones
/// step, the others stay.
#[test]
fn diffopt_step_on_a_loss_of_some_fast_weights_steps_those() -> Result<()> {
    let model = model()?;
    let n = model.parameters()?.len();
    let inner = Optimizer::new(Sgd::new(0.5), n)?;
    let (mut fmodel, mut diffopt) = innerloop(&model, &inner, InnerloopOptions::new())?;
    let before = values(fmodel.fast_params());
    // Only the last bias: d/db sum(b^2) = 2b, so b - 0.5 * 2b = 0.
    let loss = fmodel.fast_params()[n - 1].sqr()?.sum_all()?;
    diffopt.step(&mut fmodel, &loss)?;
    let after = values(fmodel.fast_params());
    assert_eq!(&after[..n - 1], &before[..n - 1]);
    assert_eq!(after[n - 1], vec![0.0]);
    Ok(())
}

/// `grad` with respect to a tensor that does not require grad says so (and how to fix it),
/// not that it was "not reached"; a leaf that is not reached keeps the old message.
#[test]
fn grad_of_an_input_that_does_not_require_grad_says_so() -> Result<()> {
    let x = t(&[1.0, 2.0], &[2]).to_leaf();
    let plain = t(&[3.0], &[1]);
    let unreached = t(&[3.0], &[1]).to_leaf();
    let y = x.sqr()?.sum_all()?;
    let err = grad(
        std::slice::from_ref(&y),
        &[x.clone(), plain.clone()],
        GradOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::InputDoesNotRequireGrad { index: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("to_leaf"), "{err}");
    let err = grad(
        std::slice::from_ref(&y),
        std::slice::from_ref(&unreached),
        GradOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::UnusedInput { index: 0, .. }), "{err}");
    let g = grad(&[y], &[plain, x], GradOptions::default().allow_unused(true))?;
    assert!(g[0].is_none());
    assert_eq!(g[1].as_ref().unwrap().to_vec_f64()?, vec![2.0, 4.0]);
    Ok(())
}

mod pieces {
    //! The pieces a first program reaches for (issue 11, "missing pieces").

    use candle_higher::nn::{self, BatchNorm, BatchNormConfig, Module, Reduction};
    use candle_higher::optim::{DiffOptimizer, Overrides, Sgd};
    use candle_higher::{grad, grad_one, DType, Error, GradOptions, Result, Tensor};

    use crate::common::{check12, randn, rng, t};

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-12 * (1.0 + y.abs()), "{a:?} vs {b:?}");
        }
    }

    /// A loss under test: its name, the loss at a reduction, the expected unreduced
    /// values, and the plain (mean) loss.
    type LossCase<'a> = (
        &'static str,
        Box<dyn Fn(Reduction) -> Result<Tensor> + 'a>,
        Vec<f64>,
        Tensor,
    );

    fn rows(v: &[f64], cols: usize) -> Vec<&[f64]> {
        v.chunks(cols).collect()
    }

    /// One-hot labels given to `cross_entropy` or `nll` say what was expected and point to
    /// `soft_cross_entropy`, which gives the same loss on them.
    #[test]
    fn one_hot_labels_say_class_indices_and_point_to_soft_targets() -> Result<()> {
        let logits = t(&[0.2, -1.0, 0.5, 1.5, 0.3, -0.7], &[2, 3]);
        let labels = t(&[2.0, 0.0], &[2]);
        let targets = nn::one_hot(&labels, 3, DType::F64)?;
        for err in [
            nn::cross_entropy(&logits, &targets).unwrap_err(),
            nn::nll(&logits.log_softmax(1)?, &targets).unwrap_err(),
            nn::cross_entropy_with(&logits, &targets, Reduction::Sum).unwrap_err(),
        ] {
            assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
            let msg = err.to_string();
            assert!(
                msg.contains("class indices of shape [2]") && msg.contains("soft_cross_entropy"),
                "{msg}"
            );
        }
        close(
            &nn::soft_cross_entropy(&logits, &targets, Reduction::Mean)?.to_vec_f64()?,
            &nn::cross_entropy(&logits, &labels)?.to_vec_f64()?,
        );
        // The hint's other route: argmax of the one-hot rows are the labels.
        assert_eq!(targets.argmax(1)?.to_vec::<u32>()?, vec![2, 0]);
        Ok(())
    }

    /// `one_hot` of any shape of whole-number labels; out-of-range labels are an error.
    #[test]
    fn one_hot_encodes_and_checks_labels() -> Result<()> {
        let labels = Tensor::from_slice(&[1u32, 0, 2, 1], &[2, 2], &crate::common::device())?;
        let oh = nn::one_hot(&labels, 3, DType::F32)?;
        assert_eq!(oh.dims(), &[2, 2, 3]);
        assert_eq!(oh.dtype(), DType::F32);
        assert!(!oh.requires_grad());
        let v = oh.to_vec::<f32>()?;
        for (i, &l) in [1usize, 0, 2, 1].iter().enumerate() {
            for c in 0..3 {
                assert_eq!(v[i * 3 + c], if c == l { 1.0 } else { 0.0 });
            }
        }
        for bad in [3.0, -1.0, 0.5] {
            let err = nn::one_hot(&t(&[0.0, bad], &[2]), 3, DType::F64).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
        }
        Ok(())
    }

    /// Every loss with `Reduction::None` gives the per-element or per-example values of its
    /// formula (computed here in plain f64), `Mean` their mean (the plain loss), `Sum`
    /// their sum.
    #[test]
    fn reductions_match_the_formulas() -> Result<()> {
        let mut r = rng(11);
        let logits = randn(&mut r, &[4, 3]);
        let labels = t(&[2.0, 0.0, 1.0, 2.0], &[4]);
        let lv = logits.to_vec_f64()?;
        let ce: Vec<f64> = rows(&lv, 3)
            .iter()
            .zip([2usize, 0, 1, 2])
            .map(|(row, l)| row.iter().map(|v| v.exp()).sum::<f64>().ln() - row[l])
            .collect();
        let pred = randn(&mut r, &[4, 3]);
        let target = randn(&mut r, &[4, 3]);
        let (pv, tv) = (pred.to_vec_f64()?, target.to_vec_f64()?);
        let se: Vec<f64> = pv.iter().zip(&tv).map(|(p, y)| (p - y).powi(2)).collect();
        let probs = crate::common::uniform(&mut r, &[4, 3], 0.0, 1.0);
        let yv = probs.to_vec_f64()?;
        let bce: Vec<f64> = lv
            .iter()
            .zip(&yv)
            .map(|(x, y)| {
                -(y * (1.0 / (1.0 + (-x).exp())).ln() + (1.0 - y) * (1.0 / (1.0 + x.exp())).ln())
            })
            .collect();
        let cases: Vec<LossCase<'_>> = vec![
            (
                "cross_entropy",
                Box::new(|red| nn::cross_entropy_with(&logits, &labels, red)),
                ce.clone(),
                nn::cross_entropy(&logits, &labels)?,
            ),
            (
                "nll",
                Box::new(|red| nn::nll_with(&logits.log_softmax(1)?, &labels, red)),
                ce.clone(),
                nn::nll(&logits.log_softmax(1)?, &labels)?,
            ),
            (
                "mse",
                Box::new(|red| nn::mse_with(&pred, &target, red)),
                se,
                nn::mse(&pred, &target)?,
            ),
            (
                "bce",
                Box::new(|red| nn::binary_cross_entropy_with_logits_with(&logits, &probs, red)),
                bce,
                nn::binary_cross_entropy_with_logits(&logits, &probs)?,
            ),
        ];
        for (name, f, want, plain) in cases {
            let none = f(Reduction::None)?;
            close(&none.to_vec_f64()?, &want);
            let n = want.len() as f64;
            let sum: f64 = want.iter().sum();
            close(&f(Reduction::Sum)?.to_vec_f64()?, &[sum]);
            close(&f(Reduction::Mean)?.to_vec_f64()?, &[sum / n]);
            close(
                &f(Reduction::default())?.to_vec_f64()?,
                &plain.to_vec_f64()?,
            );
            assert_eq!(f(Reduction::Sum)?.dims(), &[] as &[usize], "{name}");
        }
        assert_eq!(
            nn::cross_entropy_with(&logits, &labels, Reduction::None)?.dims(),
            &[4]
        );
        Ok(())
    }

    /// First and second derivatives of the unreduced and summed losses match finite
    /// differences (per-example weights multiply the unreduced values).
    #[test]
    fn reduced_losses_match_finite_differences() {
        let mut r = rng(12);
        let logits = randn(&mut r, &[3, 4]);
        let soft = nn::one_hot(&t(&[1.0, 3.0, 0.0], &[3]), 4, DType::F64)
            .unwrap()
            .mul(0.7)
            .unwrap()
            .add(0.075)
            .unwrap();
        let probs = crate::common::uniform(&mut r, &[3, 4], 0.0, 1.0);
        let target = randn(&mut r, &[3, 4]);
        for red in [Reduction::None, Reduction::Sum, Reduction::Mean] {
            check12(
                "cross_entropy_with",
                move |x| nn::cross_entropy_with(&x[0], &t(&[1.0, 3.0, 0.0], &[3]), red),
                std::slice::from_ref(&logits),
            );
            check12(
                "soft_cross_entropy",
                move |x| nn::soft_cross_entropy(&x[0], &x[1], red),
                &[logits.clone(), soft.clone()],
            );
            check12(
                "mse_with",
                move |x| nn::mse_with(&x[0], &x[1], red),
                &[logits.clone(), target.clone()],
            );
            check12(
                "bce_with",
                move |x| nn::binary_cross_entropy_with_logits_with(&x[0], &x[1], red),
                &[logits.clone(), probs.clone()],
            );
        }
    }

    /// argmax / argmin along each dim against a plain scan (first index among ties), as
    /// u32 constants; a bad dim is an error.
    #[test]
    fn argmax_and_argmin_along_a_dim() -> Result<()> {
        let x = t(&[1.0, 5.0, 5.0, -2.0, 0.0, 7.0], &[2, 3]);
        assert_eq!(x.argmax(1)?.to_vec::<u32>()?, vec![1, 2]);
        assert_eq!(x.argmin(1)?.to_vec::<u32>()?, vec![0, 0]);
        assert_eq!(x.argmax(0)?.to_vec::<u32>()?, vec![0, 0, 1]);
        assert_eq!(x.argmin(0)?.to_vec::<u32>()?, vec![1, 1, 0]);
        let leaf = x.to_leaf();
        let a = leaf.argmax(1)?;
        assert_eq!(a.dtype(), DType::U32);
        assert!(!a.requires_grad());
        assert_eq!(a.dims(), &[2]);
        assert!(matches!(x.argmax(2), Err(Error::InvalidArgument { .. })));
        Ok(())
    }

    /// topk: the k largest along a dim, largest first, with their indices; the values'
    /// gradient goes to the selected positions (finite differences at first and second
    /// order); k past the size is an error.
    #[test]
    fn topk_values_indices_and_gradient() -> Result<()> {
        let x = t(&[0.3, -1.0, 2.0, 0.9, 1.5, -0.2, 0.1, 4.0], &[2, 4]);
        let (v, i) = x.topk(2, 1)?;
        assert_eq!(i.to_vec::<u32>()?, vec![2, 3, 3, 0]);
        assert_eq!(v.to_vec_f64()?, vec![2.0, 0.9, 4.0, 1.5]);
        let (v0, i0) = x.topk(1, 0)?;
        assert_eq!(i0.to_vec::<u32>()?, vec![1, 1, 0, 1]);
        assert_eq!(v0.dims(), &[1, 4]);
        assert_eq!(v0.to_vec_f64()?, vec![1.5, -0.2, 2.0, 4.0]);
        check12("topk", |x| Ok(x[0].topk(3, 1)?.0), std::slice::from_ref(&x));
        check12(
            "topk dim 0",
            |x| Ok(x[0].topk(2, 0)?.0),
            std::slice::from_ref(&x),
        );
        assert!(matches!(x.topk(5, 1), Err(Error::InvalidArgument { .. })));
        Ok(())
    }

    /// clamp_min / clamp_max: values, and a gradient that passes only inside the bound
    /// (finite differences away from it).
    #[test]
    fn clamp_min_and_clamp_max() -> Result<()> {
        let x = t(&[-2.0, -0.5, 0.4, 3.0], &[4]);
        assert_eq!(x.clamp_min(0.0)?.to_vec_f64()?, vec![0.0, 0.0, 0.4, 3.0]);
        assert_eq!(x.clamp_max(0.0)?.to_vec_f64()?, vec![-2.0, -0.5, 0.0, 0.0]);
        let lo = t(&[-3.0, 0.0, 0.0, 0.0], &[4]);
        assert_eq!(x.clamp_min(&lo)?.to_vec_f64()?, vec![-2.0, 0.0, 0.4, 3.0]);
        let leaf = x.to_leaf();
        let g = grad_one(
            &leaf.clamp_min(0.0)?.sum_all()?,
            &leaf,
            GradOptions::default(),
        )?;
        assert_eq!(g.to_vec_f64()?, vec![0.0, 0.0, 1.0, 1.0]);
        check12(
            "clamp_min",
            |x| x[0].clamp_min(0.0),
            std::slice::from_ref(&x),
        );
        check12(
            "clamp_max",
            |x| x[0].clamp_max(0.0),
            std::slice::from_ref(&x),
        );
        Ok(())
    }

    /// mv: `[m, n] x [n] -> [m]`, against a plain sum; finite differences in both
    /// arguments; mismatched shapes are an error.
    #[test]
    fn matrix_vector_product() -> Result<()> {
        let mut r = rng(13);
        let a = randn(&mut r, &[3, 4]);
        let v = randn(&mut r, &[4]);
        let (av, vv) = (a.to_vec_f64()?, v.to_vec_f64()?);
        let want: Vec<f64> = rows(&av, 4)
            .iter()
            .map(|row| row.iter().zip(&vv).map(|(x, y)| x * y).sum())
            .collect();
        close(&a.mv(&v)?.to_vec_f64()?, &want);
        check12("mv", |x| x[0].mv(&x[1]), &[a.clone(), v.clone()]);
        for bad in [t(&[1.0, 2.0, 3.0], &[3]), randn(&mut r, &[4, 1])] {
            assert!(matches!(a.mv(&bad), Err(Error::ShapeMismatch { .. })));
        }
        Ok(())
    }

    /// to_vec::<T>: every element, row-major, in the requested type.
    #[test]
    fn typed_to_vec() -> Result<()> {
        let x = t(&[1.5, -2.0, 3.25, 4.0], &[2, 2]);
        assert_eq!(x.to_vec::<f64>()?, vec![1.5, -2.0, 3.25, 4.0]);
        assert_eq!(x.to_vec::<f32>()?, vec![1.5f32, -2.0, 3.25, 4.0]);
        assert_eq!(x.t()?.to_vec::<f64>()?, vec![1.5, 3.25, -2.0, 4.0]);
        assert_eq!(x.abs()?.to_vec::<u32>()?, vec![1, 2, 3, 4]);
        Ok(())
    }

    /// grad_one equals grad's single entry, at first and second order; an unreached input
    /// and one that does not require grad are errors even with allow_unused.
    #[test]
    fn gradient_with_respect_to_one_input() -> Result<()> {
        let x = t(&[0.5, -1.5], &[2]).to_leaf();
        let y = x.sqr()?.mul(&x)?.sum_all()?; // sum x^3
        let g = grad_one(&y, &x, GradOptions::create_graph())?;
        close(&g.to_vec_f64()?, &[0.75, 6.75]); // 3x^2
        let g2 = grad_one(&g.sum_all()?, &x, GradOptions::default())?;
        close(&g2.to_vec_f64()?, &[3.0, -9.0]); // 6x
        let via_grad = grad(
            std::slice::from_ref(&y),
            std::slice::from_ref(&x),
            GradOptions::default(),
        )?;
        close(
            &via_grad[0].as_ref().unwrap().to_vec_f64()?,
            &g.to_vec_f64()?,
        );
        let other = t(&[1.0], &[1]).to_leaf();
        let unused = GradOptions::default().allow_unused(true);
        assert!(matches!(
            grad_one(&y, &other, unused.clone()),
            Err(Error::UnusedInput { .. })
        ));
        assert!(matches!(
            grad_one(&y, &t(&[1.0], &[1]), unused),
            Err(Error::InputDoesNotRequireGrad { .. })
        ));
        Ok(())
    }

    /// BatchNorm from given tensors normalises with the given running statistics in eval
    /// mode (against the formula), and rejects inconsistent tensors.
    #[test]
    fn batch_norm_from_given_tensors() -> Result<()> {
        let w = t(&[2.0, 0.5], &[2]).to_leaf();
        let b = t(&[0.1, -0.3], &[2]).to_leaf();
        let rm = t(&[1.0, -2.0], &[2]);
        let rv = t(&[4.0, 0.25], &[2]);
        let config = BatchNormConfig::default();
        let mut bn = BatchNorm::from_tensors_1d(Some(w), Some(b), rm.clone(), rv.clone(), config)?;
        bn.training = false;
        let x = t(&[3.0, 0.0, -1.0, -2.5], &[2, 2]);
        let y = bn.forward(&x)?.to_vec_f64()?;
        let (wv, bv, mv, vv) = ([2.0, 0.5], [0.1, -0.3], [1.0, -2.0], [4.0, 0.25]);
        let xv = [3.0, 0.0, -1.0, -2.5];
        let want: Vec<f64> = (0..4)
            .map(|k| {
                let c = k % 2;
                (xv[k] - mv[c]) / (vv[c] + 1e-5f64).sqrt() * wv[c] + bv[c]
            })
            .collect();
        close(&y, &want);
        assert!(bn.config.affine);
        let plain = BatchNorm::from_tensors_2d(None, None, rm.clone(), rv.clone(), config)?;
        assert!(!plain.config.affine && plain.weight.is_none());
        assert!(matches!(
            BatchNorm::from_tensors_1d(
                Some(t(&[1.0, 1.0], &[2])),
                None,
                rm.clone(),
                rv.clone(),
                config
            ),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            BatchNorm::from_tensors_1d(None, None, rm.clone(), t(&[1.0, 1.0, 1.0], &[3]), config),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            BatchNorm::from_tensors_1d(None, None, rm, rv.to_dtype(DType::F32)?, config),
            Err(Error::DTypeMismatch { .. })
        ));
        Ok(())
    }

    /// Two SGD steps on `p` for `loss(p) = sum((p - c)^2 * s)`, with `weight_decay` and
    /// `momentum` given either as floats (`hyper`) or as override tensors.
    fn two_steps(wd: Option<&Tensor>, mom: Option<&Tensor>, hyper: Sgd) -> Result<Tensor> {
        let p0 = t(&[0.4, -0.8, 1.2], &[3]).to_leaf();
        let c = t(&[0.1, 0.2, -0.3], &[3]);
        let s = t(&[1.0, 2.0, 0.5], &[3]);
        let loss = |p: &Tensor| p.sub(&c)?.sqr()?.mul(&s)?.sum_all();
        let mut opt = DiffOptimizer::new(hyper, std::slice::from_ref(&p0))?;
        let mut o = Overrides::new();
        if let Some(wd) = wd {
            o = o.set("weight_decay", wd.clone());
        }
        if let Some(m) = mom {
            o = o.set("momentum", m.clone());
        }
        opt.set_overrides(&o)?;
        let mut p = vec![p0];
        for _ in 0..2 {
            p = opt.step_params(&loss(&p[0])?, &p)?;
        }
        loss(&p[0])
    }

    /// An override reaches `weight_decay` and `momentum` although the constructor's floats
    /// are 0: its derivative matches finite differences of the float form. A
    /// `weight_decay` tensor of value 0 still reports its derivative; a `momentum` tensor of
    /// value exactly 0 takes torch's branch without a buffer and reports none.
    #[test]
    fn overrides_reach_hyperparameters_whose_float_is_zero() -> Result<()> {
        let sgd = |wd: f64, m: f64| Sgd {
            lr: 0.1,
            momentum: m,
            weight_decay: wd,
            ..Sgd::default()
        };
        let h = 1e-5;
        // Central differences, or at 0 (negative decay is invalid) the one-sided
        // second-order formula (-3 f(0) + 4 f(h) - f(2h)) / 2h.
        let fd = |f: &dyn Fn(f64) -> f64, at: f64| {
            if at == 0.0 {
                (-3.0 * f(0.0) + 4.0 * f(h) - f(2.0 * h)) / (2.0 * h)
            } else {
                (f(at + h) - f(at - h)) / (2.0 * h)
            }
        };
        let value = |wd: f64, m: f64| {
            two_steps(None, None, sgd(wd, m))
                .unwrap()
                .to_scalar_f64()
                .unwrap()
        };
        for (wd0, m0) in [(0.05, 0.9), (0.0, 0.9)] {
            let wd = Tensor::scalar(wd0).to_leaf();
            let m = Tensor::scalar(m0).to_leaf();
            let out = two_steps(Some(&wd), Some(&m), sgd(0.0, 0.0))?;
            close(&[out.to_scalar_f64()?], &[value(wd0, m0)]);
            let g = grad(&[out], &[wd, m], GradOptions::default())?;
            let want_wd = fd(&|v| value(v, m0), wd0);
            let want_m = fd(&|v| value(wd0, v), m0);
            let got_wd = g[0].as_ref().unwrap().to_scalar_f64()?;
            let got_m = g[1].as_ref().unwrap().to_scalar_f64()?;
            assert!(
                (got_wd - want_wd).abs() < 1e-7 && got_wd != 0.0,
                "{got_wd} vs {want_wd}"
            );
            assert!(
                (got_m - want_m).abs() < 1e-7 && got_m != 0.0,
                "{got_m} vs {want_m}"
            );
        }
        let m = Tensor::scalar(0.0f64).to_leaf();
        let out = two_steps(None, Some(&m), sgd(0.0, 0.0))?;
        let g = grad(&[out], &[m], GradOptions::default().allow_unused(true))?;
        assert!(
            g[0].is_none(),
            "a zero momentum takes the branch without a buffer"
        );
        Ok(())
    }
}

mod custom_ops {
    //! Ops of your own (`CustomOp`, `apply_custom_op`): derivatives at first and second
    //! order against finite differences, and the checks on what a vjp returns.

    use candle_higher::candle;
    use candle_higher::{
        apply_custom_op, backward, grad_one, CustomOp, Error, GradOptions, Result, Tensor,
    };

    use crate::common::{check_op, randn, rng, t, uniform};

    /// `sqrt(x^2 + y^2)` elementwise: the vjp uses the output, `g x / r` and `g y / r`.
    struct Hypot;

    impl CustomOp for Hypot {
        fn name(&self) -> &'static str {
            "hypot"
        }
        fn forward(&self, inputs: &[&candle::Tensor]) -> Result<candle::Tensor> {
            Ok((inputs[0].sqr()? + inputs[1].sqr()?)?.sqrt()?)
        }
        fn vjp(
            &self,
            inputs: &[Tensor],
            output: &Tensor,
            grad: &Tensor,
        ) -> Result<Vec<Option<Tensor>>> {
            let scale = grad.div(output)?;
            Ok(vec![
                Some(scale.mul(&inputs[0])?),
                Some(scale.mul(&inputs[1])?),
            ])
        }
    }

    /// `x * w` where `w` is broadcast along the rows: the vjp sums back over them.
    struct RowScale;

    impl CustomOp for RowScale {
        fn name(&self) -> &'static str {
            "row_scale"
        }
        fn forward(&self, inputs: &[&candle::Tensor]) -> Result<candle::Tensor> {
            Ok(inputs[0].broadcast_mul(inputs[1])?)
        }
        fn vjp(
            &self,
            inputs: &[Tensor],
            _output: &Tensor,
            grad: &Tensor,
        ) -> Result<Vec<Option<Tensor>>> {
            Ok(vec![
                Some(grad.mul(&inputs[1])?),
                Some(grad.mul(&inputs[0])?.sum(0)?),
            ])
        }
    }

    /// What [`Broken`]'s vjp returns, given its input.
    type VjpResult = fn(&Tensor) -> Result<Vec<Option<Tensor>>>;

    /// A vjp that returns what it was told to, to exercise the checks.
    struct Broken {
        grads: VjpResult,
    }

    impl CustomOp for Broken {
        fn name(&self) -> &'static str {
            "broken"
        }
        fn forward(&self, inputs: &[&candle::Tensor]) -> Result<candle::Tensor> {
            Ok(inputs[0].clone())
        }
        fn vjp(&self, inputs: &[Tensor], _: &Tensor, _: &Tensor) -> Result<Vec<Option<Tensor>>> {
            (self.grads)(&inputs[0])
        }
    }

    #[test]
    fn custom_ops_match_finite_differences_at_first_and_second_order() {
        let mut r = rng(21);
        let x = uniform(&mut r, &[2, 3], 0.3, 1.2);
        let y = uniform(&mut r, &[2, 3], -1.2, -0.3);
        check_op(
            "hypot",
            |v| apply_custom_op(Hypot, &[&v[0], &v[1]]),
            &[x.clone(), y],
            3,
        );
        let w = randn(&mut r, &[3]);
        check_op(
            "row_scale",
            |v| apply_custom_op(RowScale, &[&v[0], &v[1]]),
            &[x, w],
            2,
        );
    }

    /// The forward's value is the op's output; inputs without grad record nothing;
    /// `backward` reaches the leaves through the op; only needed inputs get gradients.
    #[test]
    fn custom_op_value_recording_and_backward() -> Result<()> {
        let x = t(&[3.0, 0.6], &[2]);
        let y = t(&[4.0, 0.8], &[2]);
        let out = apply_custom_op(Hypot, &[&x, &y])?;
        assert_eq!(out.to_vec_f64()?, vec![5.0, 1.0]);
        assert!(!out.requires_grad());
        let xl = x.to_leaf();
        let out = apply_custom_op(Hypot, &[&xl, &y])?.sum_all()?;
        let grads = backward(&out)?;
        let g = grads.get(&xl).unwrap().to_vec_f64()?;
        assert!(
            (g[0] - 0.6).abs() < 1e-15 && (g[1] - 0.6).abs() < 1e-15,
            "{g:?}"
        );
        assert!(grads.get(&y).is_none());
        Ok(())
    }

    /// A vjp that returns the wrong number of gradients, or one of the wrong shape or
    /// dtype, is an error naming the op.
    #[test]
    fn a_bad_vjp_is_an_error_naming_the_op() -> Result<()> {
        let x = t(&[1.0, 2.0], &[2]).to_leaf();
        let cases: [VjpResult; 3] = [
            |_| Ok(vec![]),
            |x| Ok(vec![Some(x.sum_all()?)]),
            |x| Ok(vec![Some(x.to_dtype(candle_higher::DType::F32)?)]),
        ];
        for grads in cases {
            let out = apply_custom_op(Broken { grads }, &[&x])?.sum_all()?;
            let err = grad_one(&out, &x, GradOptions::default()).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::InvalidArgument { op: "broken", .. }
                        | Error::ShapeMismatch { op: "broken", .. }
                        | Error::DTypeMismatch { op: "broken", .. }
                ),
                "{err}"
            );
        }
        // `None` is a zero gradient: the input is then not reached.
        let out = apply_custom_op(
            Broken {
                grads: |_| Ok(vec![None]),
            },
            &[&x],
        )?
        .sum_all()?;
        assert!(matches!(
            grad_one(&out, &x, GradOptions::default()),
            Err(Error::UnusedInput { .. })
        ));
        Ok(())
    }
}

/// The library's thread count is cached and settable in one call; 0 is an error that
/// changes nothing. (Products give the same result at any count: gemm does not split the
/// inner dimension.)
#[test]
fn cpu_thread_count_is_cached_and_settable() -> Result<()> {
    let before = candle_higher::cpu_threads();
    assert!(before >= 1);
    assert!(matches!(
        candle_higher::set_cpu_threads(0),
        Err(Error::InvalidArgument { .. })
    ));
    assert_eq!(candle_higher::cpu_threads(), before);
    let a = t(
        &(0..96 * 300)
            .map(|i| (i % 7) as f64 - 3.0)
            .collect::<Vec<_>>(),
        &[96, 300],
    );
    let b = t(
        &(0..300 * 64)
            .map(|i| (i % 5) as f64 * 0.5)
            .collect::<Vec<_>>(),
        &[300, 64],
    );
    let one = a.matmul(&b)?.to_vec_f64()?;
    candle_higher::set_cpu_threads(2)?;
    assert_eq!(candle_higher::cpu_threads(), 2);
    let two = a.matmul(&b)?.to_vec_f64()?;
    candle_higher::set_cpu_threads(before)?;
    assert_eq!(one, two);
    Ok(())
}

/// NaN is the largest and the smallest value for argmax / argmin and the largest for topk,
/// as in PyTorch; slices without one are unaffected.
#[test]
fn argmax_argmin_topk_with_nan() -> Result<()> {
    let nan = f64::NAN;
    let x = t(
        &[1.0, nan, 3.0, nan, 0.5, 2.0, -1.0, 4.0, f64::INFINITY],
        &[3, 3],
    );
    assert_eq!(x.argmax(1)?.to_vec::<u32>()?, vec![1, 0, 2]);
    assert_eq!(x.argmin(1)?.to_vec::<u32>()?, vec![1, 0, 0]);
    assert_eq!(x.argmax(0)?.to_vec::<u32>()?, vec![1, 0, 2]);
    let (v, i) = x.topk(2, 1)?;
    assert_eq!(i.to_vec::<u32>()?[..2], [1, 2]);
    assert_eq!(i.to_vec::<u32>()?[2..4], [0, 2]);
    let v = v.to_vec_f64()?;
    assert!(
        v[0].is_nan() && v[1] == 3.0 && v[2].is_nan() && v[3] == 2.0,
        "{v:?}"
    );
    Ok(())
}

/// The inner gradients of each step are readable after it (`last_grads`), without a
/// callback: they equal `grad` of the step's loss at the weights before the step, are
/// differentiable in full mode, and a failing step leaves them as they were.
#[test]
fn inner_gradients_of_each_step_are_readable() -> Result<()> {
    let (x, y) = data();
    let model = model()?;
    let n = model.parameters()?.len();
    let inner = Optimizer::new(Sgd::new(0.1), n)?;
    let (mut fmodel, mut diffopt) = innerloop(&model, &inner, InnerloopOptions::new())?;
    assert!(diffopt.last_grads().is_empty());
    for _ in 0..2 {
        let before = fmodel.fast_params().to_vec();
        let loss = nn::mse(&fmodel.forward(&x)?, &y)?;
        let want = grad(std::slice::from_ref(&loss), &before, GradOptions::default())?;
        diffopt.step(&mut fmodel, &loss)?;
        let got = diffopt.last_grads();
        assert_eq!(got.len(), n);
        for (g, w) in got.iter().zip(&want) {
            let g = g.as_ref().expect("every parameter has a gradient");
            assert!(
                g.requires_grad(),
                "full mode keeps the inner gradient's graph"
            );
            assert_eq!(g.to_vec_f64()?, w.as_ref().unwrap().to_vec_f64()?);
        }
    }
    let kept = values(
        &diffopt
            .last_grads()
            .iter()
            .map(|g| g.clone().unwrap())
            .collect::<Vec<_>>(),
    );
    let wrong = nn::mse(&model.forward(&x)?, &y)?;
    assert!(diffopt.step(&mut fmodel, &wrong).is_err());
    let after = diffopt
        .last_grads()
        .iter()
        .map(|g| g.clone().unwrap())
        .collect::<Vec<_>>();
    assert_eq!(values(&after), kept);
    Ok(())
}

/// Weights from another naming (a candle-nn `VarMap`'s `model.0.weight`, ...): prefix
/// renaming, strict by default, and non-strict loading that reports what it left out.
#[test]
fn load_state_dict_with_renaming_and_non_strict_report() -> Result<()> {
    use candle_higher::nn::{load_state_dict_with, state_dict, LoadOptions, LoadReport};
    use std::collections::HashMap;

    let (x, _) = data();
    let source_model = model()?;
    let foreign: HashMap<String, candle_higher::candle::Tensor> = state_dict(&source_model)?
        .into_iter()
        .map(|(k, v)| (format!("model.{k}"), v))
        .collect();
    let fresh = || -> Result<nn::Sequential> {
        let vb = nn::VarBuilder::new(77, DType::F64, &crate::common::device());
        Ok(nn::seq()
            .add(nn::linear(2, 4, vb.pp("0"))?)
            .add(nn::Activation::Tanh)
            .add(nn::linear(4, 1, vb.pp("2"))?))
    };

    // Strict without renaming: every name is missing and unexpected; nothing changes.
    let mut target = fresh()?;
    let before = values(&target.parameters()?);
    let err =
        load_state_dict_with(&mut target, &foreign, "varmap", &LoadOptions::new()).unwrap_err();
    assert!(matches!(err, Error::LoadMismatch { .. }), "{err}");
    assert_eq!(values(&target.parameters()?), before);

    // Renamed: a round trip, outputs equal bit for bit.
    let options = LoadOptions::new().rename_prefix("model.", "");
    let report = load_state_dict_with(&mut target, &foreign, "varmap", &options)?;
    assert_eq!(
        report.loaded,
        vec!["0.bias", "0.weight", "2.bias", "2.weight"]
    );
    assert!(report.missing.is_empty() && report.unexpected.is_empty());
    assert_eq!(
        target.forward(&x)?.to_vec_f64()?,
        source_model.forward(&x)?.to_vec_f64()?
    );
    assert!(target.parameters()?.iter().all(Tensor::requires_grad));

    // Non-strict: one missing, one extra, both reported; the missing one keeps its value.
    let mut partial = foreign.clone();
    partial.remove("model.2.bias");
    partial.insert("model.head.scale".into(), foreign["model.2.bias"].clone());
    let mut target = fresh()?;
    let kept = target.parameters()?[3].to_vec_f64()?;
    let strict = load_state_dict_with(&mut target, &partial, "varmap", &options);
    assert!(matches!(strict, Err(Error::LoadMismatch { .. })));
    let report = load_state_dict_with(
        &mut target,
        &partial,
        "varmap",
        &options.clone().non_strict(true),
    )?;
    assert_eq!(
        report,
        LoadReport {
            loaded: vec!["0.bias".into(), "0.weight".into(), "2.weight".into()],
            missing: vec!["2.bias".into()],
            unexpected: vec!["head.scale".into()],
        }
    );
    assert_eq!(target.parameters()?[3].to_vec_f64()?, kept);
    assert_eq!(
        target.parameters()?[0].to_vec_f64()?,
        source_model.parameters()?[0].to_vec_f64()?
    );

    // Non-strict still rejects a mis-shaped tensor, and two names renamed to one.
    let mut bad = foreign.clone();
    bad.insert(
        "model.0.bias".into(),
        candle_higher::candle::Tensor::zeros(3, DType::F64, &crate::common::device())?,
    );
    let mut target = fresh()?;
    let before = values(&target.parameters()?);
    let lenient = options.clone().non_strict(true);
    assert!(matches!(
        load_state_dict_with(&mut target, &bad, "varmap", &lenient),
        Err(Error::LoadMismatch { .. })
    ));
    let mut twice = foreign.clone();
    twice.insert("0.bias".into(), foreign["model.0.bias"].clone());
    assert!(matches!(
        load_state_dict_with(&mut target, &twice, "varmap", &lenient),
        Err(Error::InvalidArgument { .. })
    ));
    assert_eq!(values(&target.parameters()?), before);
    Ok(())
}

/// `step_vars` with candle's gradients of a loss that reaches none of the vars is the same
/// typed error, and sets nothing.
#[test]
fn step_vars_without_any_gradient_is_an_error() -> Result<()> {
    use candle_higher::candle::{Tensor as CandleTensor, Var};
    let w = Var::from_tensor(&CandleTensor::new(
        &[1.0f64, 2.0],
        &crate::common::device(),
    )?)?;
    let other = Var::from_tensor(&CandleTensor::new(&[3.0f64], &crate::common::device())?)?;
    let grads = other.as_tensor().sqr()?.sum_all()?.backward()?;
    let mut opt = Optimizer::new(Sgd::new(0.1), 1)?;
    let err = opt.step_vars(std::slice::from_ref(&w), &grads).unwrap_err();
    assert!(
        matches!(err, Error::NoGradient { trainable: 1, .. }),
        "{err}"
    );
    assert_eq!(w.as_tensor().to_vec1::<f64>()?, vec![1.0, 2.0]);
    // The loss of w steps it: w - 0.1 * 2w.
    let grads = w.as_tensor().sqr()?.sum_all()?.backward()?;
    opt.step_vars(std::slice::from_ref(&w), &grads)?;
    assert_eq!(w.as_tensor().to_vec1::<f64>()?, vec![0.8, 1.6]);
    Ok(())
}
