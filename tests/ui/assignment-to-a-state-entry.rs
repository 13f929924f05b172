use candle_higher::{differentiable_optimizer, Result, State, Tensor};

#[differentiable_optimizer]
pub struct Decaying {
    pub lr: f64,
}

#[differentiable_optimizer]
impl Decaying {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let mut avg = state.get_or_insert_with("avg", || p.zeros_like())?;
        avg = avg.mul(0.9)?.add(grad)?;
        p.sub_(&avg.mul(self.lr)?)?;
        Ok(())
    }
}

fn main() {}
