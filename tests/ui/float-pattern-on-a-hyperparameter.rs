use candle_higher::{differentiable_optimizer, Result, State, Tensor};

#[differentiable_optimizer]
pub struct Sgd {
    pub lr: f64,
    pub weight_decay: f64,
}

#[differentiable_optimizer]
impl Sgd {
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        let g = match self.weight_decay {
            0.0 => grad.clone(),
            wd => grad.add(&p.mul(wd)?)?,
        };
        p.sub_(&g.mul(self.lr)?)?;
        Ok(())
    }
}

fn main() {}
