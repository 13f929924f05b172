//! Layers, initialisers, losses, the [`Module`] trait and parameter visiting.
//!
//! A model is a plain struct whose parameters are [`Tensor`](crate::Tensor) fields. It
//! implements [`Module`] (its forward) and [`Parameters`] (a short `visit` that shows every
//! field, with a name, to a [`Visitor`]); from that it can list its parameters and buffers
//! in a stable order with dotted names, be rebuilt from a replacement list, switch between
//! train and eval, be saved to and loaded from safetensors, and be wrapped in a
//! [`crate::FunctionalModel`].
//!
//! Layers are built in candle-nn's style, `linear(in, out, vb)`, from a [`VarBuilder`]
//! that carries a seed, a dtype, a device and a name prefix (`vb.pp("encoder")`), with
//! PyTorch's default initialisation.

mod activation;
mod conv;
mod dropout;
mod linear;
mod load;
mod loss;
mod loss_with;
mod module;
mod norm;
mod reparam;
mod rnn;
mod safetensors;
mod sequential;
mod tasks;
mod var_builder;
#[cfg(feature = "candle-nn")]
mod varmap;

pub use activation::{flatten, Activation, Flatten};
pub use conv::{
    avg_pool2d, conv1d, conv2d, max_pool2d, AvgPool2d, Conv1d, Conv2d, ConvConfig, MaxPool2d,
};
pub use dropout::{dropout, embedding, Dropout, Embedding};
pub use linear::{linear, linear_b, linear_no_bias, Linear};
pub use load::{load_state_dict_with, LoadOptions, LoadReport};
pub use loss::{
    binary_cross_entropy_with_logits, binary_cross_entropy_with_logits_per_task, cross_entropy,
    cross_entropy_per_task, mse, mse_per_task, nll, nll_per_task,
};
pub use loss_with::{
    binary_cross_entropy_with_logits_with, cross_entropy_with, mse_with, nll_with, one_hot,
    soft_cross_entropy, Reduction,
};
pub use module::{
    restore_buffers_on_error, walk, Buffer, Entry, Module, ParamInfo, Parameters, VisitFn, Visitor,
};
pub use norm::{batch_norm1d, batch_norm2d, layer_norm, BatchNorm, BatchNormConfig, LayerNorm};
pub use reparam::{weight_dropout, weight_norm, WeightDropout, WeightNorm};
pub use rnn::{
    gru, gru_cell, lstm, lstm_cell, rnn, rnn_cell, CellKind, CellState, Recurrent, RecurrentCell,
};
pub use safetensors::{load_safetensors, load_state_dict, save_safetensors, state_dict};
pub use sequential::{seq, Func, Layer, Sequential};
pub use tasks::{task_batch, task_scope, TaskScope};
pub use var_builder::VarBuilder;
#[cfg(feature = "candle-nn")]
pub use varmap::{load_varmap, write_varmap};

pub(crate) use module::ParamLayout;
