//! State shared between VMs: the key-value store and the message queues (ABI.md §4.8, §4.9).
//!
//! Both are namespaced by `vm_id`: every VM whose plugin has the same `vm_id` sees the same
//! data and queues, on any thread. One [`SharedState`] is one such world; by default every
//! plugin uses the process-wide [`SharedState::global`], as the reference host does.

use crate::inbox::{Inbox, Pending};
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, OnceLock, Weak};

/// Bounds on what one `vm_id` may keep in a [`SharedState`]. A write past them is refused with
/// `InternalFailure` (the ABI has no "full" status; the Rust SDK maps that one to an `Err`
/// for queues and callouts, and the Go SDK to `ErrInternalFailure` everywhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SharedLimits {
    /// Keys in the key-value store.
    pub max_keys: usize,
    /// Bytes of keys and values in the key-value store.
    pub max_data_bytes: usize,
    /// Registered queues.
    pub max_queues: usize,
    /// Messages waiting in one queue.
    pub max_queue_messages: usize,
    /// Bytes waiting in one queue.
    pub max_queue_bytes: usize,
    /// Bytes one `vm_id` holds in all: keys and values, queue names and waiting messages.
    pub max_vm_id_bytes: usize,
    /// Bytes the whole world holds, across every `vm_id`.
    pub max_total_bytes: usize,
}

impl Default for SharedLimits {
    fn default() -> Self {
        SharedLimits {
            max_keys: 65_536,
            max_data_bytes: 64 << 20,
            max_queues: 1024,
            max_queue_messages: 10_000,
            max_queue_bytes: 16 << 20,
            max_vm_id_bytes: 64 << 20,
            max_total_bytes: 256 << 20,
        }
    }
}

impl SharedLimits {
    /// Sets [`SharedLimits::max_keys`].
    pub fn with_max_keys(mut self, n: usize) -> Self {
        self.max_keys = n;
        self
    }

    /// Sets [`SharedLimits::max_data_bytes`].
    pub fn with_max_data_bytes(mut self, n: usize) -> Self {
        self.max_data_bytes = n;
        self
    }

    /// Sets [`SharedLimits::max_queues`].
    pub fn with_max_queues(mut self, n: usize) -> Self {
        self.max_queues = n;
        self
    }

    /// Sets [`SharedLimits::max_queue_messages`].
    pub fn with_max_queue_messages(mut self, n: usize) -> Self {
        self.max_queue_messages = n;
        self
    }

    /// Sets [`SharedLimits::max_queue_bytes`].
    pub fn with_max_queue_bytes(mut self, n: usize) -> Self {
        self.max_queue_bytes = n;
        self
    }

    /// Sets [`SharedLimits::max_vm_id_bytes`].
    pub fn with_max_vm_id_bytes(mut self, n: usize) -> Self {
        self.max_vm_id_bytes = n;
        self
    }

    /// Sets [`SharedLimits::max_total_bytes`].
    pub fn with_max_total_bytes(mut self, n: usize) -> Self {
        self.max_total_bytes = n;
        self
    }
}

/// Why a shared-state operation did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SharedError {
    NotFound,
    CasMismatch,
    Full,
}

impl From<SharedError> for filterbox_abi::Status {
    fn from(e: SharedError) -> Self {
        use filterbox_abi::Status;
        match e {
            SharedError::NotFound => Status::NotFound,
            SharedError::CasMismatch => Status::CasMismatch,
            SharedError::Full => Status::InternalFailure,
        }
    }
}

#[derive(Default)]
struct Namespace {
    data: HashMap<Bytes, (Bytes, u32)>,
    data_bytes: usize,
    /// Queue name → token.
    queue_names: HashMap<Bytes, u32>,
    /// Everything the namespace holds: data, queue names and waiting messages.
    bytes: usize,
}

struct Queue {
    /// The namespace that registered it, whose budget its messages use.
    vm_id: String,
    messages: VecDeque<Bytes>,
    bytes: usize,
    /// Who hears `proxy_on_queue_ready`: the VM that registered last, and its root context.
    owner: Weak<Inbox>,
    owner_root: u32,
}

#[derive(Default)]
struct World {
    namespaces: HashMap<String, Namespace>,
    queues: HashMap<u32, Queue>,
    /// Bytes held across all namespaces.
    bytes: usize,
    next_cas: u32,
    next_queue: u32,
}

/// A key-value store and a set of message queues shared by VMs, namespaced by `vm_id`.
/// Cheap to clone; clones are the same world.
#[derive(Clone)]
pub struct SharedState {
    world: Arc<Mutex<World>>,
    limits: SharedLimits,
}

impl Default for SharedState {
    fn default() -> Self {
        SharedState::new(SharedLimits::default())
    }
}

impl core::fmt::Debug for SharedState {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SharedState")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

fn next_nonzero(counter: &mut u32) -> u32 {
    *counter = counter.wrapping_add(1).max(1);
    *counter
}

impl SharedLimits {
    /// Whether a namespace holding `held` bytes, in a world holding `total`, may grow by
    /// `more` bytes.
    fn has_room(&self, held: usize, total: usize, more: usize) -> bool {
        held.saturating_add(more) <= self.max_vm_id_bytes
            && total.saturating_add(more) <= self.max_total_bytes
    }
}

impl SharedState {
    /// An empty world with `limits`.
    pub fn new(limits: SharedLimits) -> Self {
        SharedState {
            world: Arc::default(),
            limits,
        }
    }

    /// The process-wide world plugins use unless given another.
    pub fn global() -> SharedState {
        static GLOBAL: OnceLock<SharedState> = OnceLock::new();
        GLOBAL.get_or_init(SharedState::default).clone()
    }

    /// The limits of this world.
    pub fn limits(&self) -> SharedLimits {
        self.limits
    }

    /// The value and CAS token stored under `key` for `vm_id`.
    pub fn get(&self, vm_id: &str, key: &[u8]) -> Option<(Bytes, u32)> {
        let world = self.world.lock();
        world.namespaces.get(vm_id)?.data.get(key).cloned()
    }

    /// Stores `value` under `key` for `vm_id`. A non-zero `cas` must match the stored token
    /// (ignored when the key is new). Returns the new token.
    pub(crate) fn set(
        &self,
        vm_id: &str,
        key: &[u8],
        value: &[u8],
        cas: u32,
    ) -> Result<u32, SharedError> {
        let mut guard = self.world.lock();
        let world = &mut *guard;
        let ns = world.namespaces.entry(vm_id.to_owned()).or_default();
        let old = ns.data.get(key);
        if let Some((_, current)) = old
            && cas != 0
            && cas != *current
        {
            return Err(SharedError::CasMismatch);
        }
        let old_bytes = old.map_or(0, |(v, _)| key.len() + v.len());
        let keys = ns.data.len() + usize::from(old.is_none());
        let bytes = ns.data_bytes - old_bytes + key.len() + value.len();
        let grows = bytes.saturating_sub(ns.data_bytes);
        if keys > self.limits.max_keys
            || bytes > self.limits.max_data_bytes
            || !self.limits.has_room(ns.bytes, world.bytes, grows)
        {
            return Err(SharedError::Full);
        }
        let token = next_nonzero(&mut world.next_cas);
        // The namespace shrinks by what the old value held and grows by the new one.
        ns.bytes = ns.bytes + bytes - ns.data_bytes;
        world.bytes = world.bytes + bytes - ns.data_bytes;
        ns.data_bytes = bytes;
        ns.data.insert(
            Bytes::copy_from_slice(key),
            (Bytes::copy_from_slice(value), token),
        );
        Ok(token)
    }

    /// Creates the queue `name` of `vm_id` (or finds it, keeping what waits in it) and makes
    /// `owner`'s root context `root` the one woken by enqueues.
    pub(crate) fn register_queue(
        &self,
        vm_id: &str,
        name: &[u8],
        owner: &Arc<Inbox>,
        root: u32,
    ) -> Result<u32, SharedError> {
        let mut guard = self.world.lock();
        let world = &mut *guard;
        let ns = world.namespaces.entry(vm_id.to_owned()).or_default();
        if let Some(token) = ns.queue_names.get(name).copied()
            && let Some(queue) = world.queues.get_mut(&token)
        {
            queue.owner = Arc::downgrade(owner);
            queue.owner_root = root;
            return Ok(token);
        }
        if ns.queue_names.len() >= self.limits.max_queues
            || !self.limits.has_room(ns.bytes, world.bytes, name.len())
        {
            return Err(SharedError::Full);
        }
        let token = loop {
            let token = next_nonzero(&mut world.next_queue);
            if !world.queues.contains_key(&token) {
                break token;
            }
        };
        ns.queue_names.insert(Bytes::copy_from_slice(name), token);
        ns.bytes += name.len();
        world.bytes += name.len();
        world.queues.insert(
            token,
            Queue {
                vm_id: vm_id.to_owned(),
                messages: VecDeque::new(),
                bytes: 0,
                owner: Arc::downgrade(owner),
                owner_root: root,
            },
        );
        Ok(token)
    }

    /// The token of queue `name` of `vm_id`, if it is registered.
    pub fn resolve_queue(&self, vm_id: &str, name: &[u8]) -> Option<u32> {
        let world = self.world.lock();
        world.namespaces.get(vm_id)?.queue_names.get(name).copied()
    }

    /// Appends `message` to queue `token` and tells its owner (one `proxy_on_queue_ready` per
    /// message, as the reference host). Works from any thread.
    pub fn enqueue(&self, token: u32, message: &[u8]) -> Result<(), QueueError> {
        let (owner, root) = {
            let mut guard = self.world.lock();
            let world = &mut *guard;
            let queue = world.queues.get(&token).ok_or(QueueError::NotFound)?;
            let held = world.namespaces.get(&queue.vm_id).map_or(0, |ns| ns.bytes);
            if queue.messages.len() >= self.limits.max_queue_messages
                || queue.bytes + message.len() > self.limits.max_queue_bytes
                || !self.limits.has_room(held, world.bytes, message.len())
            {
                return Err(QueueError::Full);
            }
            let queue = world.queues.get_mut(&token).ok_or(QueueError::NotFound)?;
            queue.bytes += message.len();
            queue.messages.push_back(Bytes::copy_from_slice(message));
            if let Some(ns) = world.namespaces.get_mut(&queue.vm_id) {
                ns.bytes += message.len();
            }
            world.bytes += message.len();
            (queue.owner.clone(), queue.owner_root)
        };
        // Woken outside the lock: the owner's waker is embedder code.
        if let Some(inbox) = owner.upgrade() {
            inbox.push(Pending::QueueReady { root, token });
        }
        Ok(())
    }

    /// Takes the oldest message of queue `token`: `Ok(None)` when it is empty.
    pub fn dequeue(&self, token: u32) -> Result<Option<Bytes>, QueueError> {
        let mut guard = self.world.lock();
        let world = &mut *guard;
        let queue = world.queues.get_mut(&token).ok_or(QueueError::NotFound)?;
        let message = queue.messages.pop_front();
        if let Some(m) = &message {
            queue.bytes -= m.len();
            if let Some(ns) = world.namespaces.get_mut(&queue.vm_id) {
                ns.bytes -= m.len();
            }
            world.bytes -= m.len();
        }
        Ok(message)
    }
}

/// Why [`SharedState::enqueue`] or [`SharedState::dequeue`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueError {
    /// No queue has that token.
    NotFound,
    /// The queue holds as much as [`SharedLimits`] allow.
    Full,
}

impl core::fmt::Display for QueueError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            QueueError::NotFound => "no queue has that token",
            QueueError::Full => "the queue is full",
        })
    }
}

impl std::error::Error for QueueError {}

impl From<QueueError> for filterbox_abi::Status {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::NotFound => SharedError::NotFound.into(),
            QueueError::Full => SharedError::Full.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_rules_follow_the_reference() {
        let s = SharedState::default();
        assert_eq!(s.get("vm", b"k"), None);
        let first = s.set("vm", b"k", b"1", 12345).unwrap(); // new key: cas ignored
        assert_ne!(first, 0);
        assert_eq!(
            s.set("vm", b"k", b"2", first + 1),
            Err(SharedError::CasMismatch)
        );
        let second = s.set("vm", b"k", b"2", first).unwrap();
        let third = s.set("vm", b"k", b"3", 0).unwrap(); // 0: unconditional
        assert!(second != first && third != second);
        assert_eq!(s.get("vm", b"k"), Some((Bytes::from_static(b"3"), third)));
        assert_eq!(s.get("other-vm", b"k"), None);
    }

    #[test]
    fn data_bounds_hold_and_replacing_frees_room() {
        let s = SharedState::new(
            SharedLimits::default()
                .with_max_keys(2)
                .with_max_data_bytes(10),
        );
        s.set("vm", b"a", b"1234", 0).unwrap(); // 5 bytes
        assert_eq!(s.set("vm", b"b", b"123456", 0), Err(SharedError::Full)); // 12 > 10
        s.set("vm", b"b", b"1234", 0).unwrap(); // 10
        assert_eq!(s.set("vm", b"c", b"", 0), Err(SharedError::Full)); // third key
        s.set("vm", b"a", b"", 0).unwrap(); // shrinks to 6
        s.set("vm", b"b", b"12345678", 0).unwrap(); // 1 + 9 = 10
        s.set("other", b"c", b"123456789", 0).unwrap(); // per vm_id
    }

    #[test]
    fn one_budget_per_vm_id_across_data_and_queues_and_one_for_all() {
        let s = SharedState::new(
            SharedLimits::default()
                .with_max_vm_id_bytes(100)
                .with_max_total_bytes(150),
        );
        let inbox = Arc::new(Inbox::new(0));
        s.set("vm", b"k", &[0; 59], 0).unwrap(); // 60
        let q = s.register_queue("vm", b"q", &inbox, 1).unwrap(); // 61
        s.enqueue(q, &[0; 39]).unwrap(); // 100
        assert_eq!(s.enqueue(q, b"x"), Err(QueueError::Full));
        assert_eq!(s.set("vm", b"k2", b"", 0), Err(SharedError::Full));
        // Taking a message frees its bytes for data.
        s.dequeue(q).unwrap();
        s.set("vm", b"k2", &[0; 37], 0).unwrap(); // 61 + 39 = 100
        // Another vm_id has its own budget, but the world's cap holds across both.
        s.set("other", b"k", &[0; 49], 0).unwrap(); // world 150
        assert_eq!(s.set("other", b"j", b"", 0), Err(SharedError::Full));
        // Replacing a value by a smaller one gives room back to both.
        s.set("vm", b"k", b"", 0).unwrap(); // vm 42, world 91
        s.set("other", b"j", &[0; 49], 0).unwrap(); // other 100, world 141
    }

    #[test]
    fn queues_are_fifo_bounded_and_wake_their_owner() {
        let s = SharedState::new(SharedLimits::default().with_max_queue_messages(2));
        let inbox = Arc::new(Inbox::new(0));
        let token = s.register_queue("vm", b"q", &inbox, 7).unwrap();
        assert_eq!(s.resolve_queue("vm", b"q"), Some(token));
        assert_eq!(s.resolve_queue("vm", b"other"), None);
        assert_eq!(s.dequeue(token), Ok(None));
        s.enqueue(token, b"one").unwrap();
        s.enqueue(token, b"two").unwrap();
        assert_eq!(s.enqueue(token, b"three"), Err(QueueError::Full));
        assert_eq!(inbox.take().len(), 2);
        // Registering again keeps the messages.
        assert_eq!(s.register_queue("vm", b"q", &inbox, 7), Ok(token));
        assert_eq!(s.dequeue(token), Ok(Some(Bytes::from_static(b"one"))));
        assert_eq!(s.dequeue(token), Ok(Some(Bytes::from_static(b"two"))));
        assert_eq!(s.dequeue(token + 100), Err(QueueError::NotFound));
    }
}
