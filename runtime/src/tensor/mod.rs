//! The differentiable `Tensor` handle: a detached candle value plus an optional graph node.

pub(crate) mod anomaly;
mod convert;
mod grad_mode;
pub(crate) mod graph_exit;
mod id;

pub use anomaly::{detect_anomaly, is_anomaly_enabled, AnomalyGuard};
pub use grad_mode::{is_grad_enabled, no_grad, NoGradGuard};

use std::sync::Arc;

use candle_core::{DType, Device};

use crate::autograd::Backward;
use crate::error::{Error, Result};

/// A tensor that can take part in the tape.
///
/// Cloning is an `Arc` clone. The value is an immutable, *detached* candle tensor (candle
/// records nothing); the node, when present, says which op made the tensor and what its
/// backward needs. In-place methods (`add_`, `mul_`, ...) rebind the handle to a new value,
/// so other handles to the old value never change.
#[derive(Clone)]
pub struct Tensor(pub(crate) Arc<TensorInner>);

pub(crate) struct TensorInner {
    /// Unique; an op's output always has a larger id than its inputs (see `id`), which
    /// lets `grad` prune every node with an id below the earliest input's.
    pub(crate) id: u64,
    pub(crate) value: candle_core::Tensor,
    pub(crate) node: Option<Node>,
}

/// How a tensor that requires grad came to be.
pub(crate) enum Node {
    /// A leaf: created with `requires_grad`, gradients stop here.
    Leaf,
    /// The output of a recorded op.
    Op {
        inputs: Vec<Tensor>,
        backward: Box<dyn Backward>,
    },
}

impl Tensor {
    /// Wraps a candle tensor as a constant (no gradient). The value is detached from any
    /// graph candle might hold.
    pub fn new(value: candle_core::Tensor) -> Self {
        Self::from_parts(value.detach(), None)
    }

    pub(crate) fn from_parts(value: candle_core::Tensor, node: Option<Node>) -> Self {
        let after = match &node {
            Some(Node::Op { inputs, .. }) => inputs.iter().map(|t| t.0.id).max().unwrap_or(0),
            _ => 0,
        };
        Tensor(Arc::new(TensorInner {
            id: id::next_id(after),
            value,
            node,
        }))
    }

    /// Records the output of an op: a node is kept only when grad mode is on, some input
    /// requires grad and the output is floating point (integer results are constants, as in
    /// PyTorch); otherwise the result is a constant. With [`detect_anomaly`] on, a
    /// non-finite output is an error naming the op.
    pub(crate) fn from_op<B: Backward + 'static>(
        value: candle_core::Tensor,
        inputs: &[&Tensor],
        backward: B,
    ) -> Result<Self> {
        if anomaly::is_anomaly_enabled() {
            anomaly::check_forward(backward.name(), inputs, &value)?;
        }
        let record = is_grad_enabled()
            && inputs.iter().any(|t| t.requires_grad())
            && value.dtype().is_float();
        Ok(if record {
            let node = Node::Op {
                inputs: inputs.iter().map(|t| (*t).clone()).collect(),
                backward: Box::new(backward),
            };
            Self::from_parts(value, Some(node))
        } else {
            Self::from_parts(value, None)
        })
    }

    /// Whether gradients flow to this tensor: it is a leaf made with [`Tensor::to_leaf`] or
    /// the recorded output of an op on such tensors.
    pub fn requires_grad(&self) -> bool {
        self.0.node.is_some()
    }

    /// A leaf with the same value that requires grad (`requires_grad_()` in PyTorch):
    /// `grad` can be asked for gradients with respect to it, and `backward` reports it.
    /// Only floating point tensors can require gradients: `grad` with an integer leaf among
    /// its inputs, and `backward` reaching one, return [`Error::UnsupportedDType`].
    pub fn to_leaf(&self) -> Self {
        Self::from_parts(self.0.value.clone(), Some(Node::Leaf))
    }

    /// Whether this tensor is a leaf: a constant, or created by [`Tensor::to_leaf`].
    pub fn is_leaf(&self) -> bool {
        !matches!(self.0.node, Some(Node::Op { .. }))
    }

    /// The same value, cut from the graph. Inside a differentiable twin's step, on a
    /// tensor that requires grad, this is reported as [`Error::LeavesGraph`].
    #[track_caller]
    pub fn detach(&self) -> Self {
        graph_exit::note(
            "detach",
            self.requires_grad(),
            std::panic::Location::caller(),
        );
        if self.requires_grad() {
            Self::from_parts(self.0.value.clone(), None)
        } else {
            self.clone()
        }
    }

    /// A stable identity for this handle's tensor (not for its value).
    pub fn id(&self) -> TensorId {
        TensorId(self.0.id)
    }

    /// The detached candle value. Inside a differentiable twin's step, on a tensor that
    /// requires grad, this is reported as [`Error::LeavesGraph`] (code of this crate reads
    /// values freely).
    #[track_caller]
    pub fn value(&self) -> &candle_core::Tensor {
        graph_exit::note(
            "value",
            self.requires_grad(),
            std::panic::Location::caller(),
        );
        &self.0.value
    }

    /// Dimensions.
    pub fn dims(&self) -> &[usize] {
        self.0.value.dims()
    }

    /// Shape as candle's type.
    pub fn shape(&self) -> &candle_core::Shape {
        self.0.value.shape()
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.value.rank()
    }

    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        self.0.value.elem_count()
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.0.value.dtype()
    }

    /// Device the value lives on.
    pub fn device(&self) -> &Device {
        self.0.value.device()
    }

    pub(crate) fn node(&self) -> Option<&Node> {
        self.0.node.as_ref()
    }

    /// Checks that this tensor is floating point: the one check of every float-only op
    /// (candle reaches `todo!` on integer tensors in many of them).
    pub(crate) fn require_float(&self, op: &'static str) -> Result<()> {
        if self.dtype().is_float() {
            return Ok(());
        }
        Err(Error::UnsupportedDType {
            op,
            dtype: self.dtype(),
            expected: "it needs a floating point tensor; convert with to_dtype first",
        })
    }

    /// Checks that `other` has this tensor's dtype and device.
    pub(crate) fn check_same(&self, other: &Tensor, op: &'static str) -> Result<()> {
        if self.dtype() != other.dtype() {
            return Err(Error::DTypeMismatch {
                op,
                lhs: self.dtype(),
                rhs: other.dtype(),
            });
        }
        if !self.device().same_device(other.device()) {
            return Err(Error::DeviceMismatch {
                op,
                lhs: format!("{:?}", self.device().location()),
                rhs: format!("{:?}", other.device().location()),
            });
        }
        Ok(())
    }
}

/// Identity of a tensor in the graph, used to key gradient stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(pub(crate) u64);

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.0.node {
            None => "const".to_string(),
            Some(Node::Leaf) => "leaf".to_string(),
            Some(Node::Op { backward, .. }) => backward.name().to_string(),
        };
        write!(
            f,
            "Tensor[{:?}, {:?}, {kind}]({})",
            self.dims(),
            self.dtype(),
            self.0.value
        )
    }
}

/// Dropping a long unrolled graph recursively would overflow the stack; unlink it with an
/// explicit work list instead.
impl Drop for TensorInner {
    fn drop(&mut self) {
        let Some(Node::Op { inputs, .. }) = self.node.as_mut() else {
            return;
        };
        let mut pending: Vec<Tensor> = std::mem::take(inputs);
        while let Some(t) = pending.pop() {
            if let Ok(mut inner) = Arc::try_unwrap(t.0) {
                if let Some(Node::Op { inputs, .. }) = inner.node.as_mut() {
                    pending.append(inputs);
                }
            }
        }
    }
}
