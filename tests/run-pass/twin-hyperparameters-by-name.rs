// Tuple and flag fields: FLOAT_NAMES flattens tuples, flags are copied into the twin,
// `let (b1, b2) = self.betas;` compiles for the twin (where the betas are `Scalar`s), and
// a tensor hyperparameter receives a gradient through the twin's step.
use candle_higher::optim::TwinHyperparameters;
use candle_higher::{
    differentiable_optimizer, grad, Device, GradOptions, Hyperparameters, OptimizerStep, Result,
    Scalar, State, Tensor,
};

#[differentiable_optimizer]
#[derive(Clone, Debug, PartialEq)]
pub struct Decay {
    /// Learning rate.
    pub lr: f64,
    pub betas: (f64, f64),
    pub warmup: u32,
    pub enabled: bool,
}

#[differentiable_optimizer]
impl Decay {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let step = state.increment("step");
        let (b1, b2) = self.betas;
        if !self.enabled || step <= i64::from(self.warmup) {
            return Ok(());
        }
        let scale = self.lr * (b1 + b2) / 2.0;
        p.sub_(&grad.mul(scale)?)?;
        Ok(())
    }
}

fn main() {
    assert_eq!(Decay::FLOAT_NAMES, ["lr", "betas.0", "betas.1"]);
    let opt = Decay {
        lr: 0.1,
        betas: (0.5, 1.5),
        warmup: 0,
        enabled: true,
    };
    let mut twin = opt.twin();
    assert!(twin.enabled && twin.warmup == 0);
    let lr = Tensor::scalar(0.1f64).to_leaf();
    twin.set("lr", Scalar::Tensor(lr.clone())).unwrap();
    let g = Tensor::from_vec(vec![1.0f64, 2.0], &[2], &Device::Cpu).unwrap();
    let mut p = Tensor::from_vec(vec![0.0f64, 0.0], &[2], &Device::Cpu).unwrap();
    twin.step(&mut p, &g, &mut State::new()).unwrap();
    // p = -lr * g, so d(sum p)/d lr = -(1 + 2)
    let d = grad(&[p.sum_all().unwrap()], &[lr], GradOptions::default()).unwrap();
    let d = d[0].as_ref().unwrap().to_scalar_f64().unwrap();
    assert!((d + 3.0).abs() < 1e-12, "{d}");
}
