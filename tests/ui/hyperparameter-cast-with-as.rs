use candle_higher::{differentiable_optimizer, Result, State, Tensor};

#[differentiable_optimizer]
pub struct Clipped {
    pub lr: f64,
    pub lr_max: f64,
    pub warmup: u64,
}

#[differentiable_optimizer]
impl Clipped {
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        // `as` casts an integer flag in both forms; on a float hyperparameter it would read a
        // plain `f64` out of the twin's `Scalar`.
        let warmup = self.warmup as f64;
        let cap = self.lr_max as f64;
        let lr = self.lr as f32;
        p.sub_(&grad.mul((self.lr / warmup).min(cap))?.mul(f64::from(lr))?)?;
        Ok(())
    }
}

fn main() {}
