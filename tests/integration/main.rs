//! The integration tests, as one test binary: one link of candle instead of one per file,
//! which keeps CI's build small and fast. Each module is one area; `common` and
//! `optim_support` hold the helpers they share.

mod common;
mod optim_support;

mod adversarial_ops;
mod adversarial_optim;
mod autograd_adversarial;
mod batched;
mod batched_adversarial;
mod batched_reparam;
#[cfg(feature = "candle-nn")]
mod candle_nn_interop;
mod custom_optimizers;
mod engine_smoke;
mod faithful_steps;
mod functional_basic;
mod functional_models;
mod golden_optim;
mod golden_seed_toy;
mod grad_api;
mod half_precision;
mod inject_hyperparams;
mod innerloop_golden;
mod linear_op;
mod macro_adversary;
mod new_user;
mod nn_adversarial;
mod nn_layers;
mod ops_elementwise;
mod ops_nn;
mod ops_reduce_shape;
mod optim_fd;
mod optim_nan;
mod optim_runtime;
mod optim_twin;
mod parallel_adversarial;
mod parallel_meta_batch;
mod readme_tour;
mod robustness;
mod unroll_adversarial;
mod unroll_checkpoint;
mod unroll_implicit;
mod unroll_zero_order;
