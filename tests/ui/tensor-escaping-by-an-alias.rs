use candle_higher::{differentiable_optimizer, Result, State, Tensor};

#[differentiable_optimizer]
pub struct Sgd {
    pub lr: f64,
    pub momentum: f64,
}

#[differentiable_optimizer]
impl Sgd {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let buf = state.get_or_insert_with("momentum_buffer", || p.zeros_like())?;
        let mut velocity = buf;
        velocity.mul_(self.momentum)?.add_(grad)?;
        p.sub_(&velocity.mul(self.lr)?)?;
        Ok(())
    }
}

fn main() {}
