//! The engine of candle-higher: a higher-order reverse-mode tape over candle tensors,
//! functional models with fast-weight histories, and differentiable optimizers.
//!
//! Users depend on the `candle-higher` facade, which re-exports this crate.
#![warn(missing_docs)]

mod autograd;
mod device;
pub mod distributed;
mod error;
mod functional;
mod innerloop;
pub mod nn;
mod ops;
pub mod optim;
pub mod parallel;
mod tensor;
pub mod testing;
mod threads;
pub mod unroll;

pub use autograd::{
    apply_custom_op, backward, grad, grad_one, grad_with_stats, CustomOp, GradOptions, GradStats,
    GradStore,
};
pub use device::{device_from_env, parse_device};
pub use error::{Error, Result};
pub use ops::kernels::{cpu_fast_paths, set_cpu_fast_paths};
pub use ops::Operand;
pub use tensor::{
    detect_anomaly, is_anomaly_enabled, is_grad_enabled, no_grad, AnomalyGuard, NoGradGuard,
    Tensor, TensorId,
};
pub use threads::{cpu_threads, set_cpu_threads};

pub use optim::{
    DiffOptimizer, InnerGradMode, Optimizer, Overrides, ParamGroup, StateTensor, StateValue,
    StepOptions,
};
pub use optim::{DifferentiableOptimizer, Hyperparameters, OptimizerStep, Scalar, State};

pub use functional::{FunctionalModel, FunctionalOptions, InitialWeights};
pub use nn::{Module, Parameters};

pub use innerloop::{innerloop, InnerloopOptions};

pub use candle_core::{DType, Device};

/// Items that generated code names by absolute path. Not public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::optim::{
        unknown_hyperparameter, DifferentiableOptimizer, Hyperparameters, OptimizerStep, Scalar,
        State, StateTensor, TwinHyperparameters,
    };
    pub use crate::{Result, Tensor};
}
