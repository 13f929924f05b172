//! Grad mode: whether ops record graph nodes on this thread.

use std::cell::Cell;

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Whether ops on this thread currently record graph nodes.
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(Cell::get)
}

/// Restores the previous grad mode when dropped. Made by [`no_grad`].
#[derive(Debug)]
#[must_use = "grad mode is restored as soon as the guard is dropped"]
pub struct NoGradGuard {
    previous: bool,
}

impl NoGradGuard {
    /// Turns recording off (or on) on this thread until the guard is dropped.
    pub(crate) fn set(enabled: bool) -> Self {
        let previous = GRAD_ENABLED.with(|g| g.replace(enabled));
        NoGradGuard { previous }
    }
}

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.previous));
    }
}

/// Turns graph recording off on this thread until the returned guard is dropped
/// (`torch.no_grad()`): results of ops are constants.
///
/// ```
/// # use candle_higher_runtime::{Tensor, no_grad};
/// let x = Tensor::scalar(2.0f64).to_leaf();
/// let y = {
///     let _guard = no_grad();
///     x.mul(&x).unwrap()
/// };
/// assert!(!y.requires_grad());
/// ```
#[track_caller]
pub fn no_grad() -> NoGradGuard {
    super::graph_exit::note("no_grad", true, std::panic::Location::caller());
    NoGradGuard::set(false)
}
