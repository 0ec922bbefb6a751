//! Where events for one VM wait until the VM's own thread delivers them: queue wake-ups from
//! any VM or thread, callout responses from the embedder's client.

use crate::callout::{CalloutBytes, Claim, GrpcEvent, HttpCallOutcome};
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

/// An event waiting for its VM.
#[derive(Debug)]
pub(crate) enum Pending {
    QueueReady {
        root: u32,
        token: u32,
    },
    HttpResponse {
        token: u32,
        outcome: HttpCallOutcome,
        /// The answer's bytes, counted until it has been delivered.
        claim: Claim,
    },
    Grpc {
        token: u32,
        event: GrpcEvent,
        claim: Claim,
    },
}

/// Called (on the thread that produced the event) when a VM has something to deliver.
pub type Wake = Arc<dyn Fn() + Send + Sync>;

pub(crate) struct Inbox {
    pending: Mutex<VecDeque<Pending>>,
    arrived: Condvar,
    wake: Mutex<Option<Wake>>,
    #[cfg(feature = "tokio")]
    notify: tokio::sync::Notify,
    /// Told when the inbox (and so its VM) is gone, so that callouts still running for it
    /// can stop.
    gone: Arc<Gone>,
    /// What the VM's callouts hold.
    budget: Arc<CalloutBytes>,
}

/// Whether an inbox is gone, and who waits to hear it.
#[derive(Debug, Default)]
pub(crate) struct Gone {
    flag: std::sync::atomic::AtomicBool,
    #[cfg(feature = "tokio")]
    notify: tokio::sync::Notify,
}

impl Gone {
    pub(crate) fn is_set(&self) -> bool {
        self.flag.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Resolves once the inbox is gone.
    #[cfg(feature = "tokio")]
    pub(crate) async fn wait(&self) {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        // Registered before the flag is read, so a drop in between is not missed.
        notified.as_mut().enable();
        if self.is_set() {
            return;
        }
        notified.await;
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.gone
            .flag
            .store(true, std::sync::atomic::Ordering::Release);
        #[cfg(feature = "tokio")]
        self.gone.notify.notify_waiters();
    }
}

impl Inbox {
    /// An empty inbox whose callouts may hold `max_callout_bytes` at once.
    pub(crate) fn new(max_callout_bytes: usize) -> Self {
        Inbox {
            pending: Mutex::default(),
            arrived: Condvar::new(),
            wake: Mutex::default(),
            #[cfg(feature = "tokio")]
            notify: tokio::sync::Notify::new(),
            gone: Arc::default(),
            budget: CalloutBytes::new(max_callout_bytes),
        }
    }

    /// The VM's budget for pending callouts.
    pub(crate) fn budget(&self) -> &Arc<CalloutBytes> {
        &self.budget
    }

    /// The signal that this inbox is gone.
    pub(crate) fn gone(&self) -> Arc<Gone> {
        self.gone.clone()
    }

    pub(crate) fn push(&self, event: Pending) {
        self.pending.lock().push_back(event);
        self.arrived.notify_all();
        #[cfg(feature = "tokio")]
        self.notify.notify_one();
        let wake = self.wake.lock().clone();
        if let Some(wake) = wake {
            // Embedder code: a panic is its bug and must not unwind into whoever enqueued
            // (possibly a guest's hostcall).
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| wake()));
        }
    }

    pub(crate) fn take(&self) -> VecDeque<Pending> {
        std::mem::take(&mut *self.pending.lock())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pending.lock().is_empty()
    }

    pub(crate) fn set_wake(&self, wake: Option<Wake>) {
        *self.wake.lock() = wake;
    }

    /// Blocks until an event is waiting or `until` passes.
    pub(crate) fn wait(&self, until: Instant) {
        let mut pending = self.pending.lock();
        while pending.is_empty() {
            if self.arrived.wait_until(&mut pending, until).timed_out() {
                return;
            }
        }
    }

    /// Resolves when an event is waiting or `until` passes.
    #[cfg(feature = "tokio")]
    pub(crate) async fn wait_async(&self, until: Option<Instant>) {
        let notified = self.notify.notified();
        if !self.is_empty() {
            return;
        }
        match until {
            Some(until) => {
                let _ = tokio::time::timeout_at(until.into(), notified).await;
            }
            None => notified.await,
        }
    }
}
