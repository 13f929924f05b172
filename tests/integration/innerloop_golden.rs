//! `innerloop` and `diffopt.step(&mut fmodel, &loss)` on an `nn` model: every top-level
//! golden file again through the functional-model path (higher's `innerloop_ctx` with
//! `copy_initial_weights=False`: the base parameters are the meta-parameters), the
//! first-order files in test and first-order modes, a MAML outer loop with the ordinary
//! optimizer, branching from a stepped optimizer, detached copies, devices, frozen
//! parameters. Tolerances: `common::precision()` (1e-9 relative to the golden numbers in
//! f64).

use crate::common::precision;
use crate::optim_support::*;
use candle_higher::nn::{self, Module, Parameters};
use candle_higher::optim::{Adam, Optimizer, Overrides, Sgd};
use candle_higher::{
    backward, grad, innerloop, DType, DifferentiableOptimizer, GradOptions, InitialWeights,
    InnerloopOptions, Tensor,
};

/// The golden 3-4-2 MLP as an `nn::Sequential` whose parameters are the golden initial
/// weights, as leaves (`0.weight, 0.bias, 2.weight, 2.bias`).
fn model(case: &Case) -> nn::Sequential {
    let p: Vec<Tensor> = case.initial().iter().map(Tensor::to_leaf).collect();
    let act = if case.relu {
        nn::Activation::Relu
    } else {
        nn::Activation::Tanh
    };
    nn::seq()
        .add(nn::Linear::new(p[0].clone(), Some(p[1].clone())))
        .add(act)
        .add(nn::Linear::new(p[2].clone(), Some(p[3].clone())))
}

fn loss(fmodel: &impl Module, x: &Tensor, y: &Tensor) -> Tensor {
    mse(&fmodel.forward(x).unwrap(), y).unwrap()
}

/// The relative error of `ours` against the golden value (entries small by cancellation
/// in absolute terms, see `Precision::golden_floor`), asserted within the golden tolerance.
fn close(what: &str, ours: &Tensor, golden: &serde_json::Value) -> f64 {
    let (g, _) = flat(golden);
    let scale = g.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let e = rel_err(
        &ours.to_vec_f64().unwrap(),
        &g,
        scale * precision().golden_floor,
    );
    assert!(e <= precision().golden_tol, "{what}: {e:e}");
    e
}

/// One golden second-order file through `innerloop`.
fn golden_case<O: DifferentiableOptimizer>(file: &str, opt: O) -> f64 {
    let case = Case::new(file);
    let out = &case.json["outputs"];
    let base = model(&case);
    let names: Vec<String> = base
        .named_parameters()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, PARAM_NAMES);
    let mut overrides = Overrides::new();
    let mut tensors = Vec::new();
    for (name, v) in case.override_values() {
        let t = Tensor::scalar(v).to_leaf();
        overrides = overrides.set(&name, t.clone());
        tensors.push((name, t));
    }
    let inner = Optimizer::new(opt, 4).unwrap();
    let options = InnerloopOptions::new()
        .initial_weights(InitialWeights::BaseParameters)
        .overrides(overrides);
    let (mut fmodel, mut diffopt) = innerloop(&base, &inner, options).unwrap();
    let mut worst = 0.0f64;
    for t in 0..case.steps {
        let l = loss(&fmodel, &case.xs, &case.ys);
        worst = worst.max(close("inner loss", &l, &out["inner_losses"][t]));
        let new = diffopt.step(&mut fmodel, &l).unwrap();
        for (i, name) in PARAM_NAMES.iter().enumerate() {
            let e = close("fast weight", &new[i], &out["fast_params"][t + 1][name]);
            worst = worst.max(e);
        }
    }
    assert_eq!(fmodel.time(), case.steps);
    let meta = loss(&fmodel, &case.xq, &case.yq);
    worst = worst.max(close("meta-loss", &meta, &out["meta_loss"]));
    // backward reaches the base model's own parameters (BaseParameters).
    let grads = backward(&meta).unwrap();
    for ((name, p), i) in base.named_parameters().unwrap().into_iter().zip(0..) {
        let g = grads
            .get(&p)
            .expect("a meta-gradient for every base parameter");
        let e = close(&name, g, &out["meta_grad_initial_params"][PARAM_NAMES[i]]);
        worst = worst.max(e);
    }
    let fd = &case.json["finite_difference"]["meta_grad_override"];
    for (name, t) in &tensors {
        let ours = grads.get(t).unwrap().to_scalar_f64().unwrap();
        let (k, idx) = match name.split_once('.') {
            Some((k, i)) => (k, Some(i.parse::<usize>().unwrap())),
            None => (name.as_str(), None),
        };
        let pick = |v: &serde_json::Value| match idx {
            Some(i) => v[k][i].clone(),
            None => v[k].clone(),
        };
        // Against FD where higher's own value is off (see golden_optim.rs).
        let adam = file.starts_with("mlp_adam");
        let asgd = file.starts_with("mlp_asgd");
        if (adam && name == "betas.1") || (asgd && (name == "lr" || name == "lambd")) {
            let f = num(&pick(fd)["fd"]);
            assert!(
                !fd_judgeable(file, name)
                    || (ours - f).abs() <= precision().reference_fd_tol * f.abs(),
                "{file} {name}: {ours} vs FD {f}"
            );
        } else {
            let g = num(&pick(&out["meta_grad_override"]));
            let e = (ours - g).abs() / g.abs().max(1e-12);
            assert!(e <= precision().golden_tol, "{file} {name}: {ours} vs {g}");
            worst = worst.max(e);
        }
    }
    println!("{file}: {worst:.1e}");
    worst
}

#[test]
fn every_second_order_golden_file_through_innerloop() {
    let mut worst = 0.0f64;
    let mut count = 0;
    for entry in std::fs::read_dir(GOLDEN_DIR).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if !name.starts_with("mlp_") || !name.ends_with(".json") {
            continue;
        }
        let case = Case::new(&name);
        if !case.json["error"].is_null() || case.json["track_higher_grads"] == false {
            continue; // AdamW error records (golden_optim.rs); first-order files below
        }
        let g = case.group().clone();
        let e = match case.json["optimizer"]["type"].as_str().unwrap() {
            "SGD" => golden_case(&name, sgd(&g)),
            "Adam" => golden_case(&name, adam(&g)),
            "AdamW" => golden_case(&name, adamw(&g)),
            "Adagrad" => golden_case(&name, adagrad(&g)),
            "Adadelta" => golden_case(&name, adadelta(&g)),
            "Adamax" => golden_case(&name, adamax(&g)),
            "ASGD" => golden_case(&name, asgd(&g)),
            "RMSprop" => golden_case(&name, rmsprop(&g)),
            "Rprop" => golden_case(&name, rprop(&g)),
            other => panic!("{name}: unknown optimizer {other}"),
        };
        worst = worst.max(e);
        count += 1;
    }
    assert_eq!(count, 21);
    println!("worst over {count} files: {worst:.1e}");
}

/// The first-order files: test mode (no graph; the base model gets no gradient; the
/// gradient w.r.t. the final fast weights is the FOMAML estimate) and first-order mode
/// (the same estimate reaches the base model through the kept update path).
#[test]
fn first_order_files_through_innerloop() {
    for (file, is_adam) in [
        ("mlp_sgd_firstorder.json", false),
        ("mlp_adam_firstorder_head.json", true),
    ] {
        let case = Case::new(file);
        let out = &case.json["outputs"];
        for test_mode in [true, false] {
            let base = model(&case);
            let options = InnerloopOptions::new()
                .initial_weights(InitialWeights::BaseParameters)
                .track_higher_grads(!test_mode)
                .first_order(!test_mode);
            let g = case.group().clone();
            let (mut fmodel, meta) = if is_adam {
                let (mut f, mut d) =
                    innerloop(&base, &Optimizer::new(adam(&g), 4).unwrap(), options).unwrap();
                for _ in 0..case.steps {
                    let l = loss(&f, &case.xs, &case.ys);
                    d.step(&mut f, &l).unwrap();
                }
                let m = loss(&f, &case.xq, &case.yq);
                (f, m)
            } else {
                let (mut f, mut d) =
                    innerloop(&base, &Optimizer::new(sgd(&g), 4).unwrap(), options).unwrap();
                for _ in 0..case.steps {
                    let l = loss(&f, &case.xs, &case.ys);
                    d.step(&mut f, &l).unwrap();
                }
                let m = loss(&f, &case.xq, &case.yq);
                (f, m)
            };
            close("meta-loss", &meta, &out["meta_loss"]);
            for (i, name) in PARAM_NAMES.iter().enumerate() {
                close(
                    "fast weight",
                    &fmodel.fast_params()[i],
                    &out["fast_params"][case.steps][name],
                );
            }
            let grads = backward(&meta).unwrap();
            let base_params = base.parameters().unwrap();
            if test_mode {
                assert!(fmodel.parameters(0).is_err(), "test mode keeps no history");
                assert!(base_params.iter().all(|p| grads.get(p).is_none()));
                let last = fmodel.fast_params().to_vec();
                for (i, name) in PARAM_NAMES.iter().enumerate() {
                    let g = grads.get(&last[i]).unwrap();
                    close(
                        "FOMAML gradient",
                        g,
                        &out["meta_grad_final_fast_params"][name],
                    );
                }
            } else {
                for (i, name) in PARAM_NAMES.iter().enumerate() {
                    let g = grads.get(&base_params[i]).unwrap();
                    close(
                        "first-order meta-gradient",
                        g,
                        &out["meta_grad_final_fast_params"][name],
                    );
                }
            }
            fmodel.truncate();
        }
    }
}

/// MAML on the golden data: the meta-gradient accumulates on the base model, the
/// ordinary optimizer steps it (`step_module`), and the next outer iteration starts from
/// the new leaves. The meta-loss falls.
#[test]
fn maml_outer_loop_with_the_ordinary_optimizer() {
    let case = Case::new("mlp_sgd_plain.json");
    let mut base = model(&case);
    let mut meta_opt = Optimizer::new(Adam::new(0.01), 4).unwrap();
    let inner = Optimizer::new(Sgd::new(0.1), 4).unwrap();
    let mut losses = Vec::new();
    for _ in 0..20 {
        let options = InnerloopOptions::new().initial_weights(InitialWeights::BaseParameters);
        let (mut fmodel, mut diffopt) = innerloop(&base, &inner, options).unwrap();
        for _ in 0..3 {
            let l = loss(&fmodel, &case.xs, &case.ys);
            diffopt.step(&mut fmodel, &l).unwrap();
        }
        let meta = loss(&fmodel, &case.xq, &case.yq);
        losses.push(meta.to_scalar_f64().unwrap());
        let grads = backward(&meta).unwrap();
        let before = base.parameters().unwrap();
        meta_opt.step_module(&mut base, &grads).unwrap();
        let after = base.parameters().unwrap();
        for (b, a) in before.iter().zip(&after) {
            assert!(a.is_leaf() && a.requires_grad());
            assert_ne!(a.id(), b.id());
        }
    }
    assert!(losses[19] < 0.9 * losses[0], "{losses:?}");
    assert_eq!(meta_opt.states()[0].int("step"), Some(20));
}

/// `innerloop` branches from an ordinary optimizer that has taken steps: its state is
/// copied (the inner loop continues the golden trajectory at step 3) and left unchanged.
#[test]
fn innerloop_branches_from_a_stepped_optimizer() {
    let case = Case::new("mlp_adam_default_head.json");
    let mut base = model(&case);
    let mut opt = Optimizer::new(adam(case.group()), 4).unwrap();
    for _ in 0..2 {
        let l = loss(&base, &case.xs, &case.ys);
        let grads = backward(&l).unwrap();
        opt.step_module(&mut base, &grads).unwrap();
    }
    let (mut fmodel, mut diffopt) = innerloop(&base, &opt, InnerloopOptions::new()).unwrap();
    for _ in 0..2 {
        let l = loss(&fmodel, &case.xs, &case.ys);
        diffopt.step(&mut fmodel, &l).unwrap();
    }
    let out = &case.json["outputs"];
    for (i, name) in PARAM_NAMES.iter().enumerate() {
        close(
            "branch",
            &fmodel.fast_params()[i],
            &out["fast_params"][4][name],
        );
    }
    assert_eq!(opt.states()[0].int("step"), Some(2));
    assert_eq!(diffopt.states()[0].int("step"), Some(4));
}

/// Detached copies (the default): the meta-gradient stops at the fmodel's initial
/// weights and never reaches the base model.
#[test]
fn detached_copies_keep_the_base_model_out_of_the_graph() {
    let case = Case::new("mlp_sgd_plain.json");
    let base = model(&case);
    let (mut fmodel, mut diffopt) = innerloop(
        &base,
        &Optimizer::new(Sgd::new(0.1), 4).unwrap(),
        InnerloopOptions::new(),
    )
    .unwrap();
    let l = loss(&fmodel, &case.xs, &case.ys);
    diffopt.step(&mut fmodel, &l).unwrap();
    let meta = loss(&fmodel, &case.xq, &case.yq);
    let grads = backward(&meta).unwrap();
    assert!(base
        .parameters()
        .unwrap()
        .iter()
        .all(|p| grads.get(p).is_none()));
    let init = fmodel.init_fast_params().unwrap().to_vec();
    let g = grad(&[meta], &init, GradOptions::default()).unwrap();
    let golden = &Case::new("mlp_sgd_plain.json").json;
    // One step differs from the golden 4-step meta-gradient; only check it exists.
    assert!(g.iter().all(Option::is_some));
    assert!(golden["outputs"].is_object());
}

/// An explicit device (the CPU here; the move is differentiable) gives the same numbers,
/// and a frozen parameter is left alone by the inner loop and by `step_module`.
#[test]
fn device_option_and_frozen_parameters() {
    let case = Case::new("mlp_sgd_plain.json");
    let mut base = model(&case);
    base.set_frozen("0.bias", true).unwrap();
    let frozen_before = base.parameters().unwrap()[1].clone();
    let options = InnerloopOptions::new()
        .device(&crate::common::device())
        .initial_weights(InitialWeights::BaseParameters);
    let (mut fmodel, mut diffopt) =
        innerloop(&base, &Optimizer::new(Sgd::new(0.1), 4).unwrap(), options).unwrap();
    assert_eq!(fmodel.frozen(), &[false, true, false, false]);
    for _ in 0..2 {
        let l = loss(&fmodel, &case.xs, &case.ys);
        diffopt.step(&mut fmodel, &l).unwrap();
    }
    assert_eq!(fmodel.fast_params()[1].id(), frozen_before.id());
    assert!(diffopt.states()[1].is_empty());
    let meta = loss(&fmodel, &case.xq, &case.yq);
    let grads = backward(&meta).unwrap();
    assert!(grads.get(&base.parameters().unwrap()[0]).is_some());
    let mut opt = Optimizer::new(Sgd::new(0.1), 4).unwrap();
    opt.step_module(&mut base, &grads).unwrap();
    assert_eq!(base.parameters().unwrap()[1].id(), frozen_before.id());
    // f32 models work too (the optimizers are dtype-generic).
    let vb = nn::VarBuilder::new(0, DType::F32, &crate::common::device());
    let small = nn::seq().add(nn::linear(3, 2, vb.pp("0")).unwrap());
    let (mut f, mut d) = innerloop(
        &small,
        &Optimizer::new(Adam::new(0.1), 2).unwrap(),
        InnerloopOptions::new()
            .overrides(Overrides::new().set("lr", Tensor::scalar(0.1f64).to_leaf())),
    )
    .unwrap();
    let x = case.xs.to_dtype(DType::F32).unwrap();
    let l = f.forward(&x).unwrap().sqr().unwrap().mean_all().unwrap();
    let new = d.step(&mut f, &l).unwrap();
    assert_eq!(new[0].dtype(), DType::F32);
}

/// A wrong override count at construction is the typed error.
#[test]
fn innerloop_override_errors() {
    let case = Case::new("mlp_sgd_plain.json");
    let base = model(&case);
    let options = InnerloopOptions::new().overrides(Overrides::new().per_group("lr", [0.1, 0.2]));
    let err = innerloop(&base, &Optimizer::new(Sgd::new(0.1), 4).unwrap(), options).unwrap_err();
    assert!(
        err.to_string().contains("2 values for 1 parameter groups"),
        "{err}"
    );
    let err = innerloop(
        &base,
        &Optimizer::new(Sgd::new(0.1), 3).unwrap(),
        InnerloopOptions::new(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("expected 3 parameters, got 4"),
        "{err}"
    );
}
