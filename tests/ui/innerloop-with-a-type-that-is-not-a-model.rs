use candle_higher::optim::{Optimizer, Sgd};
use candle_higher::{innerloop, InnerloopOptions, Result, Tensor};

#[allow(dead_code)]
struct NotAModel {
    weight: Tensor,
}

fn adapt(model: &NotAModel) -> Result<()> {
    let opt = Optimizer::new(Sgd::new(0.1), 1)?;
    let _ = innerloop(model, &opt, InnerloopOptions::new())?;
    Ok(())
}

fn main() {}
