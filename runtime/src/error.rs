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
    /// `grad` was asked for the gradient of a non-scalar output without `grad_outputs`.
    #[error("grad: output {index} has shape {shape:?}; a non-scalar output needs grad_outputs")]
    NonScalarOutput {
        /// Position of the output.
        index: usize,
        /// Its shape.
        shape: Vec<usize>,
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
    /// An error from candle itself.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The runtime's result type.
pub type Result<T> = std::result::Result<T, Error>;
