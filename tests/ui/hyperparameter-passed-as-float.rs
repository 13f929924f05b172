use candle_higher::{differentiable_optimizer, Result, State, Tensor};

#[differentiable_optimizer]
pub struct Scaled {
    pub lr: f64,
    pub floor: f64,
}

#[differentiable_optimizer]
impl Scaled {
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        let step = grad.affine(self.lr, 0.0)?;
        let floor = f64::max(self.floor, 1e-3);
        p.sub_(&step.mul(floor)?)?;
        Ok(())
    }
}

fn main() {}
