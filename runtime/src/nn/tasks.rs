//! The task axis of a task-batched forward.
//!
//! A task-batched model (a [`crate::FunctionalModel`] made with
//! [`crate::FunctionalOptions::tasks`]) holds every fast weight with a leading task axis
//! `[T, ...]` and takes inputs `[T, N, ...]`. Layers with parameters see the axis in their
//! weights' rank (a Linear weight `[T, out, in]` has rank 3 instead of 2; a batch norm's
//! running mean `[T, C]` rank 2 instead of 1). Layers without parameters (`Flatten`) cannot,
//! so the batched fmodel's forward runs inside a [`task_scope`], and such layers read
//! [`task_batch`]. A hand-written forward can read it too, or open its own scope.

use std::cell::Cell;

thread_local! {
    static TASKS: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The number of tasks of the task-batched forward running on this thread, if any.
pub fn task_batch() -> Option<usize> {
    TASKS.with(Cell::get)
}

/// Marks this thread's forwards as task-batched with `tasks` tasks (or not, with `None`)
/// until the guard is dropped; the previous setting then comes back.
///
/// ```
/// use candle_higher_runtime::nn::{task_batch, task_scope};
/// assert_eq!(task_batch(), None);
/// {
///     let _scope = task_scope(Some(4));
///     assert_eq!(task_batch(), Some(4));
/// }
/// assert_eq!(task_batch(), None);
/// ```
pub fn task_scope(tasks: Option<usize>) -> TaskScope {
    let previous = TASKS.with(|t| t.replace(tasks));
    TaskScope { previous }
}

/// The guard of [`task_scope`]: restores the previous setting when dropped.
#[derive(Debug)]
#[must_use = "the scope ends when the guard is dropped"]
pub struct TaskScope {
    previous: Option<usize>,
}

impl Drop for TaskScope {
    fn drop(&mut self) {
        TASKS.with(|t| t.set(self.previous));
    }
}

/// Whether a parameter of nominal rank `nominal` has a leading task axis; an error for a
/// rank that is neither.
pub(crate) fn batched(
    op: &'static str,
    param: &crate::Tensor,
    nominal: usize,
) -> crate::Result<bool> {
    match param.rank() {
        r if r == nominal => Ok(false),
        r if r == nominal + 1 => Ok(true),
        _ => Err(crate::Error::InvalidArgument {
            op,
            message: format!(
                "a parameter of shape {:?} has neither the layer's rank {nominal} nor rank {} \
                 (a leading task axis)",
                param.dims(),
                nominal + 1
            ),
        }),
    }
}

/// Checks that a task-batched input `x` has rank at least `min_rank` and the parameters'
/// `tasks` leading entries.
pub(crate) fn check_input(
    op: &'static str,
    x: &crate::Tensor,
    tasks: usize,
    min_rank: usize,
) -> crate::Result<()> {
    if x.rank() < min_rank || x.dims()[0] != tasks {
        return Err(crate::Error::ShapeMismatch {
            op,
            expected: format!(
                "a task-batched input [{tasks}, ..] of rank at least {min_rank}, as the \
                 layer's parameters have {tasks} tasks"
            ),
            got: x.dims().to_vec(),
        });
    }
    Ok(())
}
