use candle_higher::{differentiable_optimizer, Result, State, Tensor};

#[differentiable_optimizer]
pub struct Warmup {
    pub lr: f64,
    pub warmup: u32,
}

#[differentiable_optimizer]
impl Warmup {
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        // `f64::from` of an integer flag converts as usual; of a float hyperparameter it
        // would read a plain `f64` out of the twin's `Scalar`.
        let warmup = f64::from(self.warmup);
        let lr = f64::from(self.lr);
        p.sub_(&grad.mul(lr / warmup)?)?;
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        if f64::from(self.lr) < 0.0 {
            return Err(candle_higher::Error::InvalidArgument {
                op: "Warmup",
                message: "lr must be non-negative".into(),
            });
        }
        Ok(())
    }
}

fn main() {}
