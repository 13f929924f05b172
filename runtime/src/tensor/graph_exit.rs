//! While a differentiable twin steps, reading a value out of a tensor that requires grad
//! (or cutting it from the graph) in code outside this crate is an error: the macro cannot
//! see into helper functions, and such a read would make the meta-gradient silently miss a
//! path that the ordinary optimizer's numbers depend on.
//!
//! The accessors that leave the graph are `#[track_caller]`; while a [`TwinStepGuard`]
//! lives on this thread, a call on a tensor that requires grad from a file outside this
//! crate's sources records the first such exit, which the twin's runner turns into
//! [`crate::Error::LeavesGraph`] after the step. The crate's own ops read values freely.

use std::cell::{Cell, RefCell};
use std::panic::Location;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The first exit from the graph seen during the current twin step.
#[derive(Clone, Debug)]
pub(crate) struct GraphExit {
    pub(crate) op: &'static str,
    pub(crate) location: String,
}

/// Twin steps running on any thread: the one load every value read pays when none is.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static IN_TWIN_STEP: Cell<bool> = const { Cell::new(false) };
    static FIRST_EXIT: RefCell<Option<GraphExit>> = const { RefCell::new(None) };
}

/// This crate's source directory, as `Location::file` spells paths of this crate.
fn crate_src() -> &'static str {
    let this = file!();
    this.strip_suffix("tensor/graph_exit.rs").unwrap_or(this)
}

/// Records `op` at `caller` if a twin step is running and the caller is outside this
/// crate. `requires_grad`: whether the tensor the op reads is part of the graph.
#[inline]
pub(crate) fn note(op: &'static str, requires_grad: bool, caller: &'static Location<'static>) {
    if requires_grad && ACTIVE.load(Ordering::Relaxed) > 0 {
        note_in_step(op, caller);
    }
}

#[cold]
fn note_in_step(op: &'static str, caller: &'static Location<'static>) {
    if !IN_TWIN_STEP.with(Cell::get) || caller.file().starts_with(crate_src()) {
        return;
    }
    FIRST_EXIT.with(|e| {
        e.borrow_mut().get_or_insert_with(|| GraphExit {
            op,
            location: format!("{}:{}", caller.file(), caller.line()),
        });
    });
}

/// Marks this thread as running a twin's step until dropped; [`TwinStepGuard::finish`]
/// reports the first exit from the graph seen meanwhile.
#[derive(Debug)]
pub(crate) struct TwinStepGuard {
    previous: bool,
}

impl TwinStepGuard {
    pub(crate) fn start() -> Self {
        FIRST_EXIT.with(|e| e.borrow_mut().take());
        ACTIVE.fetch_add(1, Ordering::Relaxed);
        TwinStepGuard {
            previous: IN_TWIN_STEP.with(|s| s.replace(true)),
        }
    }

    /// Ends the step; the first exit from the graph it saw, if any.
    pub(crate) fn finish(self) -> Option<GraphExit> {
        FIRST_EXIT.with(|e| e.borrow_mut().take())
    }
}

impl Drop for TwinStepGuard {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Ordering::Relaxed);
        IN_TWIN_STEP.with(|s| s.set(self.previous));
    }
}
