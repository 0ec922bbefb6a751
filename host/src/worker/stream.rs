//! A worker's streams and what a failed one tells the proxy.

use crate::vm::{Action, HttpStream, VmError};
use core::fmt;

/// A stream the plugin could not serve: why, and what the failure policy says the proxy
/// must do with the stream. Boxed inside, so a `Result<Action, Failure>` stays small.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    inner: Box<(VmError, Action)>,
}

impl Failure {
    pub(super) fn new(error: VmError, action: Action) -> Failure {
        Failure {
            inner: Box::new((error, action)),
        }
    }

    /// What went wrong (names the plugin, and the callback and trap where there is one).
    pub fn error(&self) -> &VmError {
        &self.inner.0
    }

    /// What the policy gives the stream: [`Action::Respond`] for fail-closed,
    /// [`Action::Continue`] for fail-open.
    pub fn action(&self) -> &Action {
        &self.inner.1
    }

    /// The policy's action, by value.
    pub fn into_action(self) -> Action {
        self.inner.1
    }

    /// The trap behind the failure, if a guest trapped.
    pub fn trap(&self) -> Option<&filterbox_engines::Trap> {
        match self.error() {
            VmError::Trap { trap, .. } | VmError::Failed { trap, .. } => Some(trap),
            _ => None,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let policy = match self.action() {
            Action::Continue => "failing open",
            _ => "failing closed",
        };
        write!(f, "{}; {policy}", self.error())
    }
}

impl std::error::Error for Failure {}

/// A stream on a [`Worker`]. Drive it with the worker's `on_*` methods and end it with
/// [`Worker::finish_stream`].
#[derive(Debug)]
pub struct WorkerStream {
    pub(super) generation: u64,
    pub(super) stream: Option<HttpStream>,
    pub(super) failure: Option<Failure>,
}

impl WorkerStream {
    /// The failure this stream met, if any; every later call on it returns the same.
    pub fn failure(&self) -> Option<&Failure> {
        self.failure.as_ref()
    }
}
