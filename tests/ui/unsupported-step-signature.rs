use candle_higher::{differentiable_optimizer, Result, State, Tensor};

#[differentiable_optimizer]
pub struct Sgd {
    pub lr: f64,
}

#[differentiable_optimizer]
impl Sgd {
    fn step(&self, params: &mut [Tensor], grads: &[Tensor], state: &mut State) -> Result<()> {
        for (p, g) in params.iter_mut().zip(grads) {
            p.sub_(&g.mul(self.lr)?)?;
        }
        let _ = state;
        Ok(())
    }
}

fn main() {}
