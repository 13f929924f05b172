use candle_higher::{differentiable_optimizer, Result, State, Tensor};

#[differentiable_optimizer]
pub struct Clipped {
    pub lr: f64,
    pub lr_max: f64,
}

#[differentiable_optimizer]
impl Clipped {
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        let lr: f64 = self.lr;
        let cap = self.lr_max;
        p.sub_(&grad.mul(lr.min(cap))?)?;
        Ok(())
    }
}

fn main() {}
