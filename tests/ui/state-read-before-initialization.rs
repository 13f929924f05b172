use candle_higher::{differentiable_optimizer, Result, State, Tensor};

#[differentiable_optimizer]
pub struct Sgd {
    pub lr: f64,
    pub momentum: f64,
}

#[differentiable_optimizer]
impl Sgd {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        if self.momentum != 0.0 {
            state.set("momentum_buffer", grad.clone());
        }
        let buf = state.get("momentum_buffer")?;
        p.sub_(&buf.mul(self.lr)?)?;
        Ok(())
    }
}

fn main() {}
