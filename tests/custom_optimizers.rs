use candle_higher::{
    differentiable_optimizer, Device, Hyperparameters, OptimizerStep, Result, State, Tensor,
};

#[differentiable_optimizer]
pub struct Lion {
    pub lr: f64,
    pub betas: (f64, f64),
    pub weight_decay: f64,
}

#[differentiable_optimizer]
impl Lion {
    fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
        let exp_avg = state.get_or_insert_with("exp_avg", || p.zeros_like())?;
        p.mul_(1.0 - self.lr * self.weight_decay)?;
        let update = (exp_avg.mul(self.betas.0)? + grad.mul(1.0 - self.betas.0)?)?.sign()?;
        p.sub_(&update.mul(self.lr)?)?;
        exp_avg
            .mul_(self.betas.1)?
            .add_(&grad.mul(1.0 - self.betas.1)?)?;
        Ok(())
    }
}

#[test]
fn smoke() {
    let opt = Lion {
        lr: 0.1,
        betas: (0.9, 0.99),
        weight_decay: 0.01,
    };
    let mut p = Tensor::from_vec(vec![1.0f64, -2.0], &[2], &Device::Cpu).unwrap();
    let g = Tensor::from_vec(vec![0.5f64, -0.5], &[2], &Device::Cpu).unwrap();
    let mut s = State::new();
    opt.step(&mut p, &g, &mut s).unwrap();
    println!(
        "{:?} {:?}",
        p.to_vec_f64(),
        s.get("exp_avg").unwrap().to_vec_f64()
    );
    let twin = opt.twin();
    let mut p2 = Tensor::from_vec(vec![1.0f64, -2.0], &[2], &Device::Cpu).unwrap();
    let mut s2 = State::new();
    twin.step(&mut p2, &g, &mut s2).unwrap();
    println!(
        "{:?} {:?}",
        p2.to_vec_f64(),
        s2.get("exp_avg").unwrap().to_vec_f64()
    );
}
