use candle_higher::{differentiable_optimizer, Result, State, Tensor};

#[differentiable_optimizer]
pub struct Floored {
    pub lr: f64,
    pub eps: f64,
}

#[differentiable_optimizer]
impl Floored {
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        let eps = 1e-8_f64.max(self.eps);
        p.sub_(&grad.div(&grad.abs()?.add(eps)?)?.mul(self.lr)?)?;
        Ok(())
    }
}

fn main() {}
