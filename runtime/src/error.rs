//! The runtime's one error type.

/// Everything that can go wrong in the runtime. Messages are lowercase and name the
/// shapes, dtypes, devices, indices or names involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Two operands of a binary op cannot be broadcast together.
    #[error("{op}: shapes {lhs:?} and {rhs:?} cannot be broadcast together")]
    BroadcastMismatch {
        /// The op that failed.
        op: &'static str,
        /// Left operand's shape.
        lhs: Vec<usize>,
        /// Right operand's shape.
        rhs: Vec<usize>,
    },
    /// An op received a shape it cannot work with.
    #[error("{op}: expected shape {expected}, got {got:?}")]
    ShapeMismatch {
        /// The op that failed.
        op: &'static str,
        /// What was expected, in words or as a shape.
        expected: String,
        /// The shape that was given.
        got: Vec<usize>,
    },
    /// Two operands have different dtypes.
    #[error("{op}: dtype mismatch, {lhs:?} vs {rhs:?}")]
    DTypeMismatch {
        /// The op that failed.
        op: &'static str,
        /// Left operand's dtype.
        lhs: candle_core::DType,
        /// Right operand's dtype.
        rhs: candle_core::DType,
    },
    /// Two operands live on different devices.
    #[error("{op}: operands on different devices, {lhs} vs {rhs}")]
    DeviceMismatch {
        /// The op that failed.
        op: &'static str,
        /// Left operand's device.
        lhs: String,
        /// Right operand's device.
        rhs: String,
    },
    /// A function that differentiates (or estimates the gradient of) a one-element value got
    /// one of several elements: an output of `grad` without `grad_outputs`, the output of
    /// `backward`, the meta-loss of `checkpointed_unroll` or `plain_unroll`, the value of
    /// `es_gradient`'s `f`.
    #[error("{op}: {what} has shape {shape:?}; {hint}")]
    NonScalarOutput {
        /// The function that needed one element (`grad`, `backward`, `checkpointed_unroll`,
        /// `plain_unroll`, `es_gradient`).
        op: &'static str,
        /// What has several elements, in words (`output 1`, `the meta-loss`, `f's value`).
        what: String,
        /// Position of the output among `grad`'s outputs; 0 where there is only one.
        index: usize,
        /// Its shape.
        shape: Vec<usize>,
        /// What to do instead, in that function.
        hint: &'static str,
    },
    /// `grad` was asked for an input that the outputs do not depend on.
    #[error("grad: input {index} (shape {shape:?}) is not reached from the outputs; set allow_unused to get None")]
    UnusedInput {
        /// Position of the input.
        index: usize,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// `grad` was given a different number of `grad_outputs` than outputs.
    #[error("grad: {outputs} outputs but {grad_outputs} grad_outputs")]
    GradOutputsLength {
        /// Number of outputs.
        outputs: usize,
        /// Number of grad_outputs.
        grad_outputs: usize,
    },
    /// An argument is out of its valid range or otherwise unusable.
    #[error("{op}: {message}")]
    InvalidArgument {
        /// The op or function that rejected the argument.
        op: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// Code outside the library read a value out of a tensor that requires grad, or cut
    /// one from the graph, while a differentiable twin stepped: the meta-gradient would
    /// silently miss that path.
    #[error("`{op}` at {location} leaves the graph while the differentiable twin steps parameter {param}: it reads a value out of (or cuts) a tensor the meta-gradient must flow through, so the hypergradient would silently miss that path; keep the computation on tensors and `Scalar`s (comparisons such as `lr > 0.0` are fine for branches)")]
    LeavesGraph {
        /// The accessor called (`Scalar::value`, `to_scalar_f64`, `detach`, ...).
        op: &'static str,
        /// Where it was called from (`file:line`).
        location: String,
        /// The parameter being stepped.
        param: usize,
    },
    /// An op received a tensor whose dtype it does not support (an integer tensor in a
    /// float-only op, or where only floating point tensors can require gradients).
    #[error("{op}: {dtype:?} tensors are not supported; {expected}")]
    UnsupportedDType {
        /// The op that rejected the tensor.
        op: &'static str,
        /// The tensor's dtype.
        dtype: candle_core::DType,
        /// What the op accepts, and what to do instead.
        expected: &'static str,
    },
    /// An index outside the dimension it indexes.
    #[error("{op}: index {index} at position {position} is out of range for dimension {dim} of size {size}")]
    IndexOutOfRange {
        /// The op that failed.
        op: &'static str,
        /// The offending index, as given.
        index: i64,
        /// Its flat position in the index tensor.
        position: usize,
        /// The indexed dimension.
        dim: usize,
        /// That dimension's size (valid indices are `0..size`).
        size: usize,
    },
    /// A value is NaN or infinite where finite data is required.
    #[error("{what}: contains NaN or infinite values")]
    NonFinite {
        /// What was checked.
        what: String,
    },
    /// An optimizer override gives a number of values that is neither one (for every
    /// parameter group) nor one per group.
    #[error("override of \"{name}\": {given} values for {groups} parameter groups; give one value for all groups or one per group")]
    OverrideCount {
        /// The overridden hyperparameter.
        name: String,
        /// How many values were given.
        given: usize,
        /// How many parameter groups the optimizer has.
        groups: usize,
    },
    /// A list of parameters, buffers, gradients or optimizer states has the wrong length.
    #[error("{op}: expected {expected} {what}, got {got}")]
    ParamCount {
        /// The function that rejected the list.
        op: &'static str,
        /// What the list holds: "parameters", "buffers", "gradients", "states", ...
        what: &'static str,
        /// How many the model has (tied ones once).
        expected: usize,
        /// How many were given.
        got: usize,
    },
    /// A replacement parameter or buffer has the wrong shape.
    #[error("{op}: {name} (position {position}) has shape {expected:?}, the replacement has shape {got:?}")]
    ParamShape {
        /// The function that rejected the tensor.
        op: &'static str,
        /// The tensor's position in the list given.
        position: usize,
        /// The parameter's dotted name.
        name: String,
        /// The parameter's shape.
        expected: Vec<usize>,
        /// The replacement's shape.
        got: Vec<usize>,
    },
    /// A replacement parameter or buffer has another dtype than the tensor it replaces.
    #[error("{op}: {what} {position} ({name}) has dtype {expected:?}, the replacement has dtype {got:?}")]
    ParamDType {
        /// The function that rejected the list.
        op: &'static str,
        /// What the list holds: "parameter" or "buffer".
        what: &'static str,
        /// The tensor's position in the list.
        position: usize,
        /// Its dotted name.
        name: String,
        /// The model's dtype.
        expected: candle_core::DType,
        /// The replacement's dtype.
        got: candle_core::DType,
    },
    /// A replacement parameter or buffer lives on another device than the tensor it
    /// replaces.
    #[error("{op}: {what} {position} ({name}) is on {expected}, the replacement is on {got}")]
    ParamDevice {
        /// The function that rejected the list.
        op: &'static str,
        /// What the list holds: "parameter" or "buffer".
        what: &'static str,
        /// The tensor's position in the list.
        position: usize,
        /// Its dotted name.
        name: String,
        /// The model's device.
        expected: String,
        /// The replacement's device.
        got: String,
    },
    /// A frozen parameter was given a new tensor.
    #[error("{op}: {name} is frozen; pass its current tensor unchanged")]
    FrozenParameter {
        /// The function that rejected the list.
        op: &'static str,
        /// The parameter's dotted name.
        name: String,
    },
    /// A fast-weight time outside the recorded history.
    #[error("parameters({time}): out of range; the history has times {first}..={latest}")]
    TimeOutOfRange {
        /// The time asked for.
        time: usize,
        /// The earliest time still held.
        first: usize,
        /// The latest time.
        latest: usize,
    },
    /// A fast-weight time that existed but is no longer held.
    #[error("parameters({time}): unavailable, {reason}")]
    HistoryUnavailable {
        /// The time asked for.
        time: usize,
        /// Why it is not held (test mode, truncation).
        reason: String,
    },
    /// Loading named tensors (or writing them back) found names or shapes that do not
    /// match the model; nothing was changed.
    #[error("{source_name}: nothing changed; {}", describe_load(.missing, .unexpected, .mis_shaped))]
    LoadMismatch {
        /// Where the tensors came from (a path or "tensors").
        source_name: String,
        /// Names the model has and the source lacks.
        missing: Vec<String>,
        /// Names the source has and the model lacks.
        unexpected: Vec<String>,
        /// Name, the model's shape, the source's shape.
        mis_shaped: Vec<(String, Vec<usize>, Vec<usize>)>,
    },
    /// Named tensors whose dtypes differ from the model's, loaded (or written back) without
    /// `LoadOptions::convert_dtype`; nothing was changed.
    #[error("{source_name}: nothing changed; dtypes differ: {}; convert them with LoadOptions::convert_dtype(true)", describe_dtypes(.mismatched))]
    LoadDType {
        /// Where the tensors came from (or go to).
        source_name: String,
        /// Name, the model's dtype, the other side's dtype.
        mismatched: Vec<(String, candle_core::DType, candle_core::DType)>,
    },
    /// A file could not be read or written, or does not hold a safetensors file candle can
    /// read (missing, truncated, corrupt); a failed load changed nothing.
    #[error("{op}: {path}: {message}")]
    File {
        /// The function that failed (`load_safetensors`, `save_safetensors`).
        op: &'static str,
        /// The file, as given.
        path: String,
        /// What is wrong, with the system's or the format's message.
        message: String,
    },
    /// An optimizer hyperparameter outside the range torch.optim accepts (negative
    /// learning rate, `betas` outside `[0, 1)`, NaN, ...), found at construction, when an
    /// override is set, or at a step after the hyperparameters were changed.
    #[error("{optimizer}: invalid {name}: {value}{}; expected {expected}", in_group(.group))]
    InvalidHyperparameter {
        /// The optimizer's name.
        optimizer: &'static str,
        /// The hyperparameter, as in `Hyperparameters::FLOAT_NAMES` (`lr`, `betas.0`).
        name: String,
        /// Its value (an override tensor's value when it was set).
        value: f64,
        /// What is accepted, e.g. `>= 0`, `in [0, 1)`.
        expected: String,
        /// The parameter group whose hyperparameters these are, where the runtime knows it.
        group: Option<usize>,
    },
    /// An optimizer was given no parameters, or a parameter group holds none (torch.optim:
    /// "optimizer got an empty parameter list").
    #[error("{op}: {}", describe_empty(.group))]
    NoParameters {
        /// The constructor that rejected it.
        op: &'static str,
        /// The empty group; `None` when there are no parameters or no groups at all.
        group: Option<usize>,
    },
    /// A tensor state entry whose shape is not its parameter's: a state made for other
    /// parameters (set by `set_states`, or branched from), which would otherwise broadcast.
    #[error("{op}: state entry \"{entry}\" of parameter {param} has shape {state_shape:?}, but the parameter has shape {param_shape:?}")]
    StateShape {
        /// The function that found it.
        op: &'static str,
        /// The parameter's position.
        param: usize,
        /// The state entry's name.
        entry: String,
        /// The parameter's shape.
        param_shape: Vec<usize>,
        /// The entry's shape.
        state_shape: Vec<usize>,
    },
    /// An optimizer step found a gradient for none of its trainable parameters, so it
    /// would change nothing: the loss does not reach the parameters being stepped.
    #[error("{op}: none of the {trainable} trainable parameters got a gradient, so the step would change nothing; {hint}")]
    NoGradient {
        /// The step that found it.
        op: &'static str,
        /// How many trainable parameters it has.
        trainable: usize,
        /// The likely cause and what to do.
        hint: &'static str,
    },
    /// `grad` was asked for the gradient with respect to a tensor that does not require
    /// grad (neither a leaf made with `to_leaf` nor computed from one).
    #[error("grad: input {index} (shape {shape:?}) does not require grad; make it a leaf with `to_leaf()` (or compute it from one) before computing the outputs, or set allow_unused to get None")]
    InputDoesNotRequireGrad {
        /// Position of the input.
        index: usize,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// The ranks of a distributed run disagree on something that must be the same on every
    /// rank (parameter count, a shape or dtype, the optimizer's state count), or a call
    /// failed on another rank (that rank returns its own error). Every rank returns from
    /// the same call, so none is left waiting.
    #[error("{op}: rank {rank} failed or differs from rank 0: {what}")]
    RankMismatch {
        /// The collective call that found it.
        op: &'static str,
        /// The first rank that differs or failed.
        rank: usize,
        /// What differs, or why that rank failed.
        what: String,
    },
    /// A collective operation failed (the communication library reported an error, or what
    /// arrived could not be decoded).
    #[error("{op}: {message}")]
    Communication {
        /// The collective call.
        op: &'static str,
        /// What went wrong.
        message: String,
    },
    /// An error from candle itself.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The runtime's result type.
pub type Result<T> = std::result::Result<T, Error>;

fn describe_load(
    missing: &[String],
    unexpected: &[String],
    mis_shaped: &[(String, Vec<usize>, Vec<usize>)],
) -> String {
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("missing: {}", missing.join(", ")));
    }
    if !unexpected.is_empty() {
        parts.push(format!("unexpected: {}", unexpected.join(", ")));
    }
    if !mis_shaped.is_empty() {
        let items: Vec<String> = mis_shaped
            .iter()
            .map(|(n, want, got)| format!("{n} (model {want:?}, source {got:?})"))
            .collect();
        parts.push(format!("mis-shaped: {}", items.join(", ")));
    }
    parts.join("; ")
}

fn describe_dtypes(mismatched: &[(String, candle_core::DType, candle_core::DType)]) -> String {
    let items: Vec<String> = mismatched
        .iter()
        .map(|(n, model, other)| format!("{n} (model {model:?}, source {other:?})"))
        .collect();
    items.join(", ")
}

fn in_group(group: &Option<usize>) -> String {
    group
        .map(|g| format!(" in parameter group {g}"))
        .unwrap_or_default()
}

fn describe_empty(group: &Option<usize>) -> String {
    match group {
        Some(g) => format!("parameter group {g} has no parameters"),
        None => "the optimizer got an empty parameter list".to_string(),
    }
}
