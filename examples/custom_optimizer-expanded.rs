//! Teaches: what `#[differentiable_optimizer]` generates for `custom_optimizer.rs`, by hand
//! and simplified (absolute `::candle_higher::__private::` paths shortened). It compiles
//! and runs the same way.
//! The exact expansion is pinned by the snapshots in `macros/snapshots/`.
//!
//! Run: `cargo run --example custom_optimizer-expanded`

use candle_higher::optim::{unknown_hyperparameter, TwinHyperparameters};
use candle_higher::{
    grad, no_grad, DType, DifferentiableOptimizer, GradOptions, Hyperparameters, OptimizerStep,
    Result, Scalar, State, Tensor,
};

// ---- #[differentiable_optimizer] on the struct -----------------------------------------

/// Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").
#[derive(Clone, Debug)] // added when missing: `Hyperparameters` needs `Clone`
pub struct Lion {
    /// Learning rate.
    pub lr: f64,
    /// Interpolation factors of the update and of the moment.
    pub betas: (f64, f64),
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// The twin: every `f64` becomes a `Scalar` (a constant or a tensor the meta-gradient
/// reaches); `bool` and integer fields would be copied unchanged.
#[derive(Clone, Debug)]
pub struct LionTwin {
    /// Learning rate.
    pub lr: Scalar,
    /// Interpolation factors of the update and of the moment.
    pub betas: (Scalar, Scalar),
    /// Decoupled weight decay.
    pub weight_decay: Scalar,
}

impl Hyperparameters for Lion {
    type Twin = LionTwin;
    const FLOAT_NAMES: &'static [&'static str] = &["lr", "betas.0", "betas.1", "weight_decay"];

    fn twin(&self) -> LionTwin {
        LionTwin {
            lr: Scalar::Float(self.lr),
            betas: (Scalar::Float(self.betas.0), Scalar::Float(self.betas.1)),
            weight_decay: Scalar::Float(self.weight_decay),
        }
    }

    fn float(&self, name: &str) -> Option<f64> {
        match name {
            "lr" => Some(self.lr),
            "betas.0" => Some(self.betas.0),
            "betas.1" => Some(self.betas.1),
            "weight_decay" => Some(self.weight_decay),
            _ => None,
        }
    }

    fn set_float(&mut self, name: &str, value: f64) -> Result<()> {
        match name {
            "lr" => self.lr = value,
            "betas.0" => self.betas.0 = value,
            "betas.1" => self.betas.1 = value,
            "weight_decay" => self.weight_decay = value,
            _ => return Err(unknown_hyperparameter("Lion", name, Self::FLOAT_NAMES)),
        }
        Ok(())
    }
}

impl TwinHyperparameters for LionTwin {
    fn get(&self, name: &str) -> Option<&Scalar> {
        match name {
            "lr" => Some(&self.lr),
            "betas.0" => Some(&self.betas.0),
            "betas.1" => Some(&self.betas.1),
            "weight_decay" => Some(&self.weight_decay),
            _ => None,
        }
    }

    fn set(&mut self, name: &str, value: Scalar) -> Result<()> {
        match name {
            "lr" => self.lr = value,
            "betas.0" => self.betas.0 = value,
            "betas.1" => self.betas.1 = value,
            "weight_decay" => self.weight_decay = value,
            _ => return Err(unknown_hyperparameter("Lion", name, Lion::FLOAT_NAMES)),
        }
        Ok(())
    }
}

// ---- #[differentiable_optimizer] on the impl block -------------------------------------
// The same body twice. One rewrite makes it compile for both: `Scalar` is not `Copy`, so
// every by-value use of a hyperparameter (and of a local computed from one or read from the
// state) is cloned: a copy for `f64`, an `Arc` clone for a tensor, another handle to the
// same entry for a state tensor. Nothing is written back: `exp_avg` is a `StateTensor`, the
// state entry itself (as in torch), so `exp_avg.mul_(..)` updates the state.

impl OptimizerStep for Lion {
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

impl OptimizerStep for LionTwin {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let exp_avg = state.get_or_insert_with("exp_avg", || p.zeros_like())?;
        p.mul_(1.0 - self.lr.clone() * self.weight_decay.clone())?;
        let update =
            (exp_avg.mul(self.betas.0.clone())? + grad.mul(1.0 - self.betas.0.clone())?)?.sign()?;
        p.sub_(&update.mul(self.lr.clone())?)?;
        exp_avg
            .mul_(self.betas.1.clone())?
            .add_(&grad.mul(1.0 - self.betas.1.clone())?)?;
        Ok(())
    }
}

/// The link the inner-loop API asks for: only the macro implements it.
impl DifferentiableOptimizer for Lion {}

// ---- the program of custom_optimizer.rs ------------------------------------------------

fn loss(w: &Tensor, x: &Tensor, y: &Tensor) -> Result<Tensor> {
    x.matmul(w)?.sub(y)?.sqr()?.mean_all()
}

fn main() -> Result<()> {
    let dev = candle_higher::device_from_env()?;
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
    let mut w = Tensor::zeros(&[2, 1], DType::F64, &dev)?.to_leaf();
    let mut state = State::new();
    for step in 0..200 {
        lion.lr = 0.1 * 0.97f64.powi(step);
        let l = loss(&w, &x, &y)?;
        let g = grad(&[l], &[w.clone()], GradOptions::default())?[0]
            .clone()
            .expect("w is used");
        {
            let _no_grad = no_grad();
            lion.step(&mut w, &g, &mut state)?;
        }
        w = w.to_leaf();
    }
    println!("trained w = {:?}", w.to_vec_f64()?);

    lion.lr = 0.05;
    let mut twin = lion.twin();
    let lr = Tensor::scalar(lion.lr).to_leaf();
    twin.set("lr", Scalar::Tensor(lr.clone()))?;
    let mut fast = Tensor::zeros(&[2, 1], DType::F64, &dev)?.to_leaf();
    let mut state = State::new();
    for _ in 0..5 {
        let l = loss(&fast, &x, &y)?;
        let g = grad(&[l], &[fast.clone()], GradOptions::create_graph())?[0]
            .clone()
            .expect("fast weights are used");
        twin.step(&mut fast, &g, &mut state)?;
    }
    let meta_loss = loss(&fast, &x, &y)?;
    let d_lr = grad(&[meta_loss], &[lr], GradOptions::default())?[0]
        .clone()
        .expect("the loss depends on lr");
    println!("d loss / d lr = {:.5}", d_lr.to_scalar_f64()?);
    Ok(())
}
