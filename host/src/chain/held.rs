//! What plugins hold paused of bodies: per plugin and exchange, and across a whole chain.

use bytes::BytesMut;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// What the body bytes plugins hold paused may add up to: per plugin and exchange, and
/// across the whole chain.
#[derive(Debug)]
pub(super) struct HeldBudget {
    pub(super) per_plugin: usize,
    pub(super) total: usize,
    held: AtomicUsize,
}

impl HeldBudget {
    pub(super) fn new(per_plugin: usize, total: usize) -> Arc<Self> {
        Arc::new(HeldBudget {
            per_plugin,
            total,
            held: AtomicUsize::new(0),
        })
    }

    /// Whether `bytes` more may be held.
    pub(super) fn has_room(&self, bytes: usize) -> bool {
        self.held
            .load(Ordering::Acquire)
            .checked_add(bytes)
            .is_some_and(|total| total <= self.total)
    }
}

/// Body bytes one plugin holds paused, counted in the chain's [`HeldBudget`].
pub(super) struct Held {
    bytes: BytesMut,
    budget: Arc<HeldBudget>,
}

impl Held {
    pub(super) fn new(budget: &Arc<HeldBudget>) -> Self {
        Held {
            bytes: BytesMut::new(),
            budget: budget.clone(),
        }
    }

    /// Takes the bytes out (they are no longer held).
    pub(super) fn take(&mut self) -> BytesMut {
        // Nothing held (the usual case): the chain-wide counter, a cache line every slot
        // thread writes, is left alone.
        if !self.bytes.is_empty() {
            self.budget
                .held
                .fetch_sub(self.bytes.len(), Ordering::AcqRel);
        }
        std::mem::take(&mut self.bytes)
    }

    /// Holds `bytes` instead of what was held.
    pub(super) fn put(&mut self, bytes: BytesMut) {
        drop(self.take());
        if !bytes.is_empty() {
            self.budget.held.fetch_add(bytes.len(), Ordering::AcqRel);
        }
        self.bytes = bytes;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.take());
    }
}
