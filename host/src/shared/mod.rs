//! State shared between VMs: the key-value store and the message queues (ABI.md §4.8, §4.9).
//!
//! Both are namespaced by `vm_id`: every VM whose plugin has the same `vm_id` sees the same
//! data and queues, on any thread. One [`SharedState`] is one such world; by default every
//! plugin uses the process-wide [`SharedState::global`], as the reference host does. A world
//! lives in this process ([`SharedState::new`], `local`) or, with the `redis` feature, on a
//! Redis server that several proxy instances share ([`SharedState::redis`], `redis`).

mod local;
#[cfg(feature = "redis")]
mod redis;

#[cfg(feature = "redis")]
pub use self::redis::{RedisConfig, RedisConfigError};

use crate::inbox::Inbox;
use bytes::Bytes;
use std::sync::{Arc, OnceLock};

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

/// Why a shared-data write did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SharedError {
    /// A non-zero CAS token did not match the stored one: another writer came first.
    CasMismatch,
    /// The write would pass a [`SharedLimits`] bound.
    Full,
    /// The store did not answer in time (a remote store that is down, slow or restarting).
    Unavailable,
}

impl core::fmt::Display for SharedError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            SharedError::CasMismatch => "the CAS token does not match the stored one",
            SharedError::Full => "the write would pass the shared-state limits",
            SharedError::Unavailable => "the shared-state store did not answer in time",
        })
    }
}

impl std::error::Error for SharedError {}

impl SharedLimits {
    /// Whether a namespace holding `held` bytes, in a world holding `total`, may grow by
    /// `more` bytes.
    fn has_room(&self, held: usize, total: usize, more: usize) -> bool {
        held.saturating_add(more) <= self.max_vm_id_bytes
            && total.saturating_add(more) <= self.max_total_bytes
    }
}

/// A key-value store and a set of message queues shared by VMs, namespaced by `vm_id`.
/// Cheap to clone; clones are the same world.
#[derive(Clone)]
pub struct SharedState {
    store: Store,
    limits: SharedLimits,
}

#[derive(Clone)]
enum Store {
    Local(Arc<local::LocalStore>),
    #[cfg(feature = "redis")]
    Redis(Arc<redis::RedisStore>),
}

impl Default for SharedState {
    fn default() -> Self {
        SharedState::new(SharedLimits::default())
    }
}

impl core::fmt::Debug for SharedState {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SharedState")
            .field("backend", &self.backend())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// What a remote store has done so far: every round trip, the ones that failed, and how long
/// they took. Counted since the store was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// Operations asked of the store (a hostcall makes at most one), including those that
    /// failed at once during a backoff.
    pub operations: u64,
    /// Operations that failed: no connection, a timeout, an error from the server, or a
    /// backoff after such a failure. The plugin got its hostcall's "unavailable" status
    /// (ABI.md §11, item 17).
    pub errors: u64,
    /// Operations answered without a round trip (the local read cache).
    pub cache_hits: u64,
    /// Total time of the operations, in microseconds.
    pub total_micros: u64,
    /// The slowest operation, in microseconds.
    pub max_micros: u64,
}

impl StoreStats {
    /// Adds these numbers to `text` as the `filterbox_shared_store_*` families, labelled
    /// `plugin`.
    pub fn write_prometheus(&self, plugin: &str, text: &mut crate::PrometheusText) {
        let labels = [("plugin", plugin)];
        let counters = [
            (
                "filterbox_shared_store_operations_total",
                "Round trips to the remote shared-state store.",
                self.operations,
            ),
            (
                "filterbox_shared_store_errors_total",
                "Round trips to the remote shared-state store that failed or timed out.",
                self.errors,
            ),
            (
                "filterbox_shared_store_cache_hits_total",
                "Shared-data reads answered from the local cache, without a round trip.",
                self.cache_hits,
            ),
        ];
        for (name, help, value) in counters {
            text.sample(name, "counter", Some(help), name, &labels, value);
        }
        let seconds = [
            (
                "filterbox_shared_store_seconds_total",
                "counter",
                "Time spent in round trips to the remote shared-state store.",
                self.total_micros,
            ),
            (
                "filterbox_shared_store_max_seconds",
                "gauge",
                "The slowest round trip to the remote shared-state store.",
                self.max_micros,
            ),
        ];
        for (name, kind, help, micros) in seconds {
            let value = micros as f64 / 1e6;
            text.sample(name, kind, Some(help), name, &labels, value);
        }
    }
}

impl SharedState {
    /// An empty in-process world with `limits`.
    pub fn new(limits: SharedLimits) -> Self {
        SharedState {
            store: Store::Local(Arc::new(local::LocalStore::new(limits))),
            limits,
        }
    }

    /// A world kept on the Redis server `config` names, shared with every process that uses
    /// the same server and key prefix. Nothing is sent yet: the first hostcall connects, and
    /// a server that is down makes hostcalls answer their "unavailable" status until it is
    /// back. Starts one thread that hears queue wake-ups (and cache invalidations).
    #[cfg(feature = "redis")]
    pub fn redis(config: RedisConfig, limits: SharedLimits) -> Result<Self, RedisConfigError> {
        Ok(SharedState {
            store: Store::Redis(redis::RedisStore::start(config, limits)?),
            limits,
        })
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

    /// Where the world lives: `"local"` or `"redis"`.
    pub fn backend(&self) -> &'static str {
        match &self.store {
            Store::Local(_) => "local",
            #[cfg(feature = "redis")]
            Store::Redis(_) => "redis",
        }
    }

    /// What a remote store has done so far (`None` for the in-process world, which has no
    /// round trips to count).
    pub fn store_stats(&self) -> Option<StoreStats> {
        match &self.store {
            Store::Local(_) => None,
            #[cfg(feature = "redis")]
            Store::Redis(store) => Some(store.stats()),
        }
    }

    /// The value and CAS token stored under `key` for `vm_id` (`Ok(None)`: no such key).
    pub fn get(&self, vm_id: &str, key: &[u8]) -> Result<Option<(Bytes, u32)>, SharedError> {
        match &self.store {
            Store::Local(store) => Ok(store.get(vm_id, key)),
            #[cfg(feature = "redis")]
            Store::Redis(store) => store.get(vm_id, key),
        }
    }

    /// Stores `value` under `key` for `vm_id`. A non-zero `cas` must match the stored token
    /// (ignored when the key is new). Returns the new token.
    pub fn set(&self, vm_id: &str, key: &[u8], value: &[u8], cas: u32) -> Result<u32, SharedError> {
        match &self.store {
            Store::Local(store) => store.set(vm_id, key, value, cas),
            #[cfg(feature = "redis")]
            Store::Redis(store) => store.set(vm_id, key, value, cas),
        }
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
        match &self.store {
            Store::Local(store) => store.register_queue(vm_id, name, owner, root),
            #[cfg(feature = "redis")]
            Store::Redis(store) => store.register_queue(vm_id, name, owner, root),
        }
    }

    /// The token of queue `name` of `vm_id`, if it is registered (`Ok(None)`: it is not).
    pub fn resolve_queue(&self, vm_id: &str, name: &[u8]) -> Result<Option<u32>, QueueError> {
        match &self.store {
            Store::Local(store) => Ok(store.resolve_queue(vm_id, name)),
            #[cfg(feature = "redis")]
            Store::Redis(store) => store.resolve_queue(vm_id, name),
        }
    }

    /// Appends `message` to queue `token` and tells its owner (one `proxy_on_queue_ready` per
    /// message, as the reference host). Works from any thread.
    pub fn enqueue(&self, token: u32, message: &[u8]) -> Result<(), QueueError> {
        match &self.store {
            Store::Local(store) => store.enqueue(token, message),
            #[cfg(feature = "redis")]
            Store::Redis(store) => store.enqueue(token, message),
        }
    }

    /// Takes the oldest message of queue `token`: `Ok(None)` when it is empty.
    pub fn dequeue(&self, token: u32) -> Result<Option<Bytes>, QueueError> {
        match &self.store {
            Store::Local(store) => store.dequeue(token),
            #[cfg(feature = "redis")]
            Store::Redis(store) => store.dequeue(token),
        }
    }
}

/// Why a queue operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueError {
    /// No queue has that token.
    NotFound,
    /// The queue holds as much as [`SharedLimits`] allow.
    Full,
    /// The store did not answer in time (a remote store that is down, slow or restarting).
    Unavailable,
}

impl core::fmt::Display for QueueError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            QueueError::NotFound => "no queue has that token",
            QueueError::Full => "the queue is full",
            QueueError::Unavailable => "the shared-state store did not answer in time",
        })
    }
}

impl std::error::Error for QueueError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_rules_follow_the_reference() {
        let s = SharedState::default();
        assert_eq!(s.get("vm", b"k"), Ok(None));
        let first = s.set("vm", b"k", b"1", 12345).unwrap(); // new key: cas ignored
        assert_ne!(first, 0);
        assert_eq!(
            s.set("vm", b"k", b"2", first + 1),
            Err(SharedError::CasMismatch)
        );
        let second = s.set("vm", b"k", b"2", first).unwrap();
        let third = s.set("vm", b"k", b"3", 0).unwrap(); // 0: unconditional
        assert!(second != first && third != second);
        assert_eq!(
            s.get("vm", b"k"),
            Ok(Some((Bytes::from_static(b"3"), third)))
        );
        assert_eq!(s.get("other-vm", b"k"), Ok(None));
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
        assert_eq!(s.resolve_queue("vm", b"q"), Ok(Some(token)));
        assert_eq!(s.resolve_queue("vm", b"other"), Ok(None));
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
