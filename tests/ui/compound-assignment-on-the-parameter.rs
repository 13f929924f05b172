use candle_higher::{differentiable_optimizer, Result, State, Tensor};

#[differentiable_optimizer]
pub struct Decayed {
    pub lr: f64,
    pub decay: f64,
}

#[differentiable_optimizer]
impl Decayed {
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        *p *= self.decay;
        *p -= self.lr * grad;
        Ok(())
    }
}

fn main() {}
