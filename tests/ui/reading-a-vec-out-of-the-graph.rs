use candle_higher::{differentiable_optimizer, Result, State, Tensor};

#[differentiable_optimizer]
pub struct Normalized {
    pub lr: f64,
}

#[differentiable_optimizer]
impl Normalized {
    fn step(&self, p: &mut Tensor, grad: &Tensor, _state: &mut State) -> Result<()> {
        let values = grad.to_vec::<f64>()?;
        let signs: Vec<f64> = grad.sign()?.to_vec()?;
        // A slice's `to_vec` is not a graph exit.
        let dims = p.dims().to_vec();
        let mut norm = 0.0;
        for (v, s) in values.iter().zip(&signs) {
            norm += v * s;
        }
        let _ = dims;
        p.sub_(&grad.mul(self.lr / (1.0 + norm))?)?;
        Ok(())
    }
}

fn main() {}
