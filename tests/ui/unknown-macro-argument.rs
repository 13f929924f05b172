use candle_higher::differentiable_optimizer;

#[differentiable_optimizer(krate = candle_higher)]
pub struct Sgd {
    pub lr: f64,
}

fn main() {}
