use candle_higher::{differentiable_optimizer, Result, State, Tensor};

#[differentiable_optimizer]
pub struct Sgd {
    pub lr: f64,
}

#[differentiable_optimizer]
impl Sgd {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let buf = state.get_or_insert_with("buf", || p.zeros_like())?;
        buf.exp_()?;
        p.copy_(&buf)?;
        p.sub_(&grad.mul(self.lr)?)?;
        Ok(())
    }
}

fn main() {}
