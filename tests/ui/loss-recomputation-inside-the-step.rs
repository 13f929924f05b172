use candle_higher::{differentiable_optimizer, Result, State, Tensor};

#[differentiable_optimizer]
pub struct Sgd {
    pub lr: f64,
}

#[differentiable_optimizer]
impl Sgd {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let g = candle_higher::grad(&[p.sqr()?.sum_all()?], &[p.clone()], Default::default())?;
        p.sub_(g[0].as_ref().unwrap_or(grad))?;
        Ok(())
    }
}

fn main() {}
