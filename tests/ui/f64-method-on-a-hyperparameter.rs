use candle_higher::{differentiable_optimizer, Result, State, Tensor};

#[differentiable_optimizer]
pub struct Decayed {
    pub lr: f64,
    pub gamma: f64,
}

#[differentiable_optimizer]
impl Decayed {
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        if !self.lr.is_finite() {
            return Ok(());
        }
        // A hyperparameter's own `powf` takes a hyperparameter; a tensor's takes an `f64`.
        let lr = self.lr.powf(self.gamma);
        let decay = grad.powf(self.gamma)?;
        p.sub_(&decay.mul(lr)?)?;
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        // `fn validate` is the same code for both forms too.
        if self.gamma.is_sign_negative() {
            return Err(candle_higher::Error::InvalidArgument {
                op: "Decayed",
                message: "gamma must be non-negative".into(),
            });
        }
        Ok(())
    }
}

fn main() {}
