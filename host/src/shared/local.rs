//! The in-process store: one mutex-protected world per [`SharedState`](super::SharedState),
//! as the reference host keeps (cpp-host `shared_data.cc`, `shared_queue.cc`).

use super::{QueueError, SharedError, SharedLimits};
use crate::inbox::{Inbox, Pending};
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};

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

/// Data and queues of every `vm_id`, behind one lock.
pub(super) struct LocalStore {
    world: Mutex<World>,
    limits: SharedLimits,
}

fn next_nonzero(counter: &mut u32) -> u32 {
    *counter = counter.wrapping_add(1).max(1);
    *counter
}

impl LocalStore {
    pub(super) fn new(limits: SharedLimits) -> Self {
        LocalStore {
            world: Mutex::default(),
            limits,
        }
    }

    /// The value and CAS token stored under `key` for `vm_id`.
    pub(super) fn get(&self, vm_id: &str, key: &[u8]) -> Option<(Bytes, u32)> {
        let world = self.world.lock();
        world.namespaces.get(vm_id)?.data.get(key).cloned()
    }

    /// Stores `value` under `key` for `vm_id`. A non-zero `cas` must match the stored token
    /// (ignored when the key is new). Returns the new token.
    pub(super) fn set(
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
    pub(super) fn register_queue(
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
    pub(super) fn resolve_queue(&self, vm_id: &str, name: &[u8]) -> Option<u32> {
        let world = self.world.lock();
        world.namespaces.get(vm_id)?.queue_names.get(name).copied()
    }

    /// Appends `message` to queue `token` and tells its owner (one `proxy_on_queue_ready` per
    /// message, as the reference host). Works from any thread.
    pub(super) fn enqueue(&self, token: u32, message: &[u8]) -> Result<(), QueueError> {
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
    pub(super) fn dequeue(&self, token: u32) -> Result<Option<Bytes>, QueueError> {
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
