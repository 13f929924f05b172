use candle_higher::{differentiable_optimizer, Result, State, Tensor};

#[differentiable_optimizer]
pub struct Sgd {
    pub lr: f64,
}

#[differentiable_optimizer]
impl Sgd {
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        let lr = Tensor::full_scalar(self.lr, p.dtype(), p.device())?;
        p.sub_(&grad.mul(&lr)?)?;
        Ok(())
    }
}

fn main() {}
