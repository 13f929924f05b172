//! Teaches: writing your own optimizer once with `#[differentiable_optimizer]`, training
//! with its ordinary form, and differentiating through its twin (a meta-gradient w.r.t.
//! the learning rate). See `custom_optimizer-expanded.rs` for what the macro generates.
//!
//! Run: `cargo run --example custom_optimizer`

use candle_higher::optim::TwinHyperparameters;
use candle_higher::{
    differentiable_optimizer, grad, no_grad, GradOptions, Hyperparameters, OptimizerStep, Result,
    Scalar, State, Tensor,
};

/// Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").
#[differentiable_optimizer]
pub struct Lion {
    /// Learning rate.
    pub lr: f64,
    /// Interpolation factors of the update and of the moment.
    pub betas: (f64, f64),
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

#[differentiable_optimizer]
impl Lion {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let exp_avg = state.get_or_insert_with("exp_avg", || p.zeros_like())?;
        p.mul_(1.0 - self.lr * self.weight_decay)?;
        let update = (exp_avg.mul(self.betas.0)? + grad.mul(1.0 - self.betas.0)?)?.sign()?;
        p.sub_(&update.mul(self.lr)?)?;
        exp_avg
            .mul_(self.betas.1)?
            .add_(&grad.mul(1.0 - self.betas.1)?)?;
        Ok(())
    }
}

/// Mean squared error of the linear model `x w` against `y`.
fn loss(w: &Tensor, x: &Tensor, y: &Tensor) -> Result<Tensor> {
    x.matmul(w)?.sub(y)?.sqr()?.mean_all()
}

fn main() -> Result<()> {
    let dev = candle_higher::device_from_env()?;
    // y = 2 x0 - x1, four points.
    let x = Tensor::from_vec(
        vec![1.0f64, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0, -1.0],
        &[4, 2],
        &dev,
    )?;
    let y = Tensor::from_vec(vec![2.0f64, -1.0, 1.0, 5.0], &[4, 1], &dev)?;
    let mut lion = Lion {
        lr: 0.1,
        betas: (0.9, 0.99),
        weight_decay: 0.0,
    };

    // 1. The ordinary optimizer: update in place, as in any training loop.
    let mut w = Tensor::zeros(&[2, 1], candle_higher::DType::F64, &dev)?.to_leaf();
    let mut state = State::new();
    for step in 0..200 {
        // A decaying learning rate: Lion takes steps of fixed size `lr`.
        lion.lr = 0.1 * 0.97f64.powi(step);
        let l = loss(&w, &x, &y)?;
        let g = grad(
            std::slice::from_ref(&l),
            &[w.clone()],
            GradOptions::default(),
        )?[0]
            .clone()
            .expect("w is used");
        {
            let _no_grad = no_grad();
            lion.step(&mut w, &g, &mut state)?;
        }
        w = w.to_leaf();
        if step % 50 == 0 {
            println!("step {step:2}: loss {:.5}", l.to_scalar_f64()?);
        }
    }
    println!("trained w = {:?}", w.to_vec_f64()?);

    // 2. The twin: the same step with the learning rate as a tensor, unrolled for 5 steps
    //    with recorded inner gradients, then differentiated w.r.t. the learning rate.
    lion.lr = 0.05;
    let mut twin = lion.twin();
    let lr = Tensor::scalar(lion.lr).to_leaf();
    twin.set("lr", Scalar::Tensor(lr.clone()))?;
    let mut fast = Tensor::zeros(&[2, 1], candle_higher::DType::F64, &dev)?.to_leaf();
    let mut state = State::new();
    for _ in 0..5 {
        let l = loss(&fast, &x, &y)?;
        let g = grad(&[l], &[fast.clone()], GradOptions::create_graph())?[0]
            .clone()
            .expect("fast weights are used");
        twin.step(&mut fast, &g, &mut state)?;
    }
    let meta_loss = loss(&fast, &x, &y)?;
    let d_lr = grad(
        std::slice::from_ref(&meta_loss),
        &[lr],
        GradOptions::default(),
    )?[0]
        .clone()
        .expect("the loss depends on lr");
    println!(
        "after 5 twin steps: loss {:.5}, d loss / d lr = {:.5}",
        meta_loss.to_scalar_f64()?,
        d_lr.to_scalar_f64()?
    );
    Ok(())
}
