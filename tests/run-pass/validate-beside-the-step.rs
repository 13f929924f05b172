// `fn validate` beside `fn step`: one body checks the optimizer's f64 hyperparameters and
// its twin's `Scalar`s (a tensor override by its value), and the runners call it.
use candle_higher::optim::validation::{in_range, require, value_of};
use candle_higher::optim::{DiffOptimizer, Optimizer, Overrides};
use candle_higher::{differentiable_optimizer, Device, Error, Result, State, Tensor};

#[differentiable_optimizer]
pub struct Clipped {
    pub lr: f64,
    pub bounds: (f64, f64),
}

#[differentiable_optimizer]
impl Clipped {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let _ = state;
        p.sub_(&grad.mul(self.lr)?)?;
        Ok(())
    }

    /// `lr >= 0` and `bounds.0 <= bounds.1`.
    fn validate(&self) -> Result<()> {
        in_range("Clipped", "lr", &self.lr, 0.0..)?;
        let (low, high) = (value_of(&self.bounds.0), value_of(&self.bounds.1));
        require(low <= high, "Clipped", "bounds.1", &self.bounds.1, ">= bounds.0")
    }
}

fn invalid(result: Result<impl Sized>) -> (String, f64) {
    match result {
        Err(Error::InvalidHyperparameter { name, value, .. }) => (name, value),
        Err(other) => panic!("expected an invalid hyperparameter, got {other}"),
        Ok(_) => panic!("expected an invalid hyperparameter, got Ok"),
    }
}

fn main() {
    let ok = Clipped { lr: 0.1, bounds: (0.0, 1.0) };
    let negative = Clipped { lr: -0.1, ..ok.clone() };
    let crossed = Clipped { bounds: (2.0, 1.0), ..ok.clone() };
    assert_eq!(invalid(Optimizer::new(negative, 1)), ("lr".to_string(), -0.1));
    assert_eq!(invalid(Optimizer::new(crossed, 1)), ("bounds.1".to_string(), 1.0));

    let p = vec![Tensor::zeros(&[2], candle_higher::DType::F64, &Device::Cpu).unwrap()];
    let mut d = DiffOptimizer::new(ok, &p).unwrap();
    let lr = Tensor::scalar(-0.5f64).to_leaf();
    assert_eq!(
        invalid(d.set_overrides(&Overrides::new().set("lr", lr))),
        ("lr".to_string(), -0.5)
    );
    assert_eq!(
        invalid(d.set_overrides(&Overrides::new().set("bounds.0", 3.0))),
        ("bounds.1".to_string(), 1.0)
    );
    assert_eq!(d.hyperparameter(0, "lr").unwrap().value(), 0.1);
}
