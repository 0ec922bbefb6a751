//! Shared data and queues on a Redis server, so that several proxy instances see one world.
//!
//! What crosses here: a hostcall's key, value, CAS token or message goes to the server in one
//! round trip (a Lua script where the ABI needs atomicity), on a connection taken from a small
//! pool; nothing waits longer than [`RedisConfig::timeout`] per round trip. A failed round
//! trip makes the hostcall answer its "unavailable" status and starts a backoff during which
//! hostcalls fail at once instead of waiting again. One thread per store listens on a
//! subscriber connection for queue wake-ups (delivered to the registering VM's inbox, as
//! callout answers are) and for the server's invalidations of cached reads.
//!
//! Key layout (every key of one `vm_id` in one hash slot, `{…}`; the `vm_id` is written with
//! its length so that no `vm_id` and key pair can name another's key):
//! - `<prefix>d:{<len>:<vm_id>}:<key>`: a hash, `v` the value and `c` the CAS token;
//! - `<prefix>m:{<len>:<vm_id>}`: a hash of the namespace's sizes, for [`SharedLimits`];
//! - `<prefix>q:{<len>:<vm_id>}:<name>`: a queue, a list;
//! - `<prefix>r:{<len>:<vm_id>}`: the set of registered queue names, for `resolve`;
//! - channel `<prefix>queue-ready`: one message per enqueue, `<len>:<vm_id><name>`.

use super::{QueueError, SharedError, SharedLimits, StoreStats};
use crate::inbox::{Inbox, Pending};
use bytes::Bytes;
use parking_lot::Mutex;
use redis::{Client, Connection, RedisError, RedisResult, Script};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// Where and how a [`SharedState`](super::SharedState) keeps its world on Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisConfig {
    /// `redis://[user:password@]host[:port][/db]` (or `unix:///path`).
    pub url: String,
    /// Put before every key and channel name, so that several deployments can share one
    /// server (default `filterbox:`).
    pub key_prefix: String,
    /// The longest a hostcall waits for one round trip, connecting included (default 5 ms).
    /// Past it the hostcall answers its "unavailable" status.
    pub timeout: Duration,
    /// Connections kept open for reuse (default 16).
    pub max_idle_connections: usize,
    /// Keep values read from the server in this process until the server says they changed
    /// (Redis client-side caching, `CLIENT TRACKING … BCAST`): a read of an unchanged key
    /// costs no round trip. On by default.
    pub local_cache: bool,
}

impl RedisConfig {
    /// The defaults, on the server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            key_prefix: "filterbox:".to_owned(),
            timeout: Duration::from_millis(5),
            max_idle_connections: 16,
            local_cache: true,
        }
    }

    /// Sets [`RedisConfig::key_prefix`].
    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Sets [`RedisConfig::timeout`].
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets [`RedisConfig::max_idle_connections`].
    pub fn with_max_idle_connections(mut self, n: usize) -> Self {
        self.max_idle_connections = n;
        self
    }

    /// Sets [`RedisConfig::local_cache`].
    pub fn with_local_cache(mut self, on: bool) -> Self {
        self.local_cache = on;
        self
    }
}

/// Why a [`RedisConfig`] cannot make a store.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RedisConfigError {
    /// The URL does not parse as a Redis address.
    Url {
        /// The URL as given.
        url: String,
        /// What the Redis client said.
        reason: String,
    },
    /// A zero timeout would fail every hostcall.
    ZeroTimeout,
    /// The subscriber thread could not be started.
    Thread(String),
}

impl core::fmt::Display for RedisConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RedisConfigError::Url { url, reason } => {
                write!(f, "{url:?} is not a Redis URL: {reason}")
            }
            RedisConfigError::ZeroTimeout => f.write_str("the Redis timeout must be above zero"),
            RedisConfigError::Thread(e) => {
                write!(f, "could not start the Redis subscriber thread: {e}")
            }
        }
    }
}

impl std::error::Error for RedisConfigError {}

/// Sets `v` (value) and `c` (CAS token) of KEYS[1] if the token matches, within the bounds;
/// keeps the namespace's sizes in KEYS[2]. ARGV: value, cas, key length, max keys, max data
/// bytes, max bytes of the vm_id. Returns the new token, -1 on a CAS mismatch, -2 when full.
const SET_SCRIPT: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'c', 'v')
local token = tonumber(cur[1])
local cas = tonumber(ARGV[2])
if token and cas ~= 0 and token ~= cas then return -1 end
local klen = tonumber(ARGV[3])
local old = 0
if token then old = klen + #cur[2] end
local grow = klen + #ARGV[1] - old
local keys = tonumber(redis.call('HGET', KEYS[2], 'keys') or '0')
local data = tonumber(redis.call('HGET', KEYS[2], 'data') or '0')
local bytes = tonumber(redis.call('HGET', KEYS[2], 'bytes') or '0')
if not token then keys = keys + 1 end
if keys > tonumber(ARGV[4]) or data + grow > tonumber(ARGV[5])
   or (grow > 0 and bytes + grow > tonumber(ARGV[6])) then return -2 end
local next = (token or 0) % 4294967295 + 1
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'c', next)
redis.call('HSET', KEYS[2], 'keys', keys, 'data', data + grow, 'bytes', bytes + grow)
return next
";

/// Appends ARGV[1] to the list KEYS[1] within the bounds, counts it in the namespace's sizes
/// (KEYS[2], field `q<name>` for the queue) and publishes ARGV[5] on channel ARGV[6]. ARGV:
/// message, max messages, max queue bytes, max bytes of the vm_id, payload, channel, name.
/// Returns 0, or -2 when full.
const ENQUEUE_SCRIPT: &str = r"
local field = 'q' .. ARGV[7]
local queued = tonumber(redis.call('HGET', KEYS[2], field) or '0')
local bytes = tonumber(redis.call('HGET', KEYS[2], 'bytes') or '0')
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[2]) or queued + #ARGV[1] > tonumber(ARGV[3])
   or bytes + #ARGV[1] > tonumber(ARGV[4]) then return -2 end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[2], field, #ARGV[1])
redis.call('HINCRBY', KEYS[2], 'bytes', #ARGV[1])
redis.call('PUBLISH', ARGV[6], ARGV[5])
return 0
";

/// Takes the oldest message of the list KEYS[1] and uncounts it (KEYS[2], ARGV[1] the name).
const DEQUEUE_SCRIPT: &str = r"
local message = redis.call('LPOP', KEYS[1])
if not message then return false end
redis.call('HINCRBY', KEYS[2], 'q' .. ARGV[1], -#message)
redis.call('HINCRBY', KEYS[2], 'bytes', -#message)
return message
";

/// The longest backoff after failed round trips.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How often the subscriber thread looks whether its store is gone.
const SUBSCRIBER_POLL: Duration = Duration::from_millis(200);
/// Values the local cache holds at most; past it, it starts again empty.
const MAX_CACHED: usize = 65_536;

/// A queue by its owner's `vm_id` and name.
type QueueName = (String, Bytes);

#[derive(Default)]
struct Queues {
    tokens: HashMap<QueueName, u32>,
    names: HashMap<u32, QueueName>,
    /// Who hears `proxy_on_queue_ready` in this process: queues registered here.
    owners: HashMap<u32, (Weak<Inbox>, u32)>,
    next: u32,
}

#[derive(Default)]
struct Health {
    failures: u32,
    retry_at: Option<Instant>,
}

#[derive(Default)]
struct Stats {
    operations: AtomicU64,
    errors: AtomicU64,
    cache_hits: AtomicU64,
    total_micros: AtomicU64,
    max_micros: AtomicU64,
}

/// Values read from the server, valid while the subscriber connection that hears their
/// invalidations is up. A read that raced with an invalidation is not kept: `generation`
/// moves on every invalidation, and a value is cached only if it did not move during its read.
#[derive(Default)]
struct Cache {
    values: Mutex<HashMap<Vec<u8>, (Bytes, u32)>>,
    generation: AtomicU64,
    live: AtomicBool,
}

impl Cache {
    fn get(&self, key: &[u8]) -> Option<(Bytes, u32)> {
        if !self.live.load(Ordering::Acquire) {
            return None;
        }
        self.values.lock().get(key).cloned()
    }

    fn insert(&self, generation: u64, key: Vec<u8>, value: (Bytes, u32)) {
        let mut values = self.values.lock();
        // Checked under the lock that invalidations take, so none slips in between.
        if !self.live.load(Ordering::Acquire)
            || self.generation.load(Ordering::Acquire) != generation
        {
            return;
        }
        if values.len() >= MAX_CACHED {
            values.clear();
        }
        values.insert(key, value);
    }

    fn invalidate(&self, keys: Option<Vec<Vec<u8>>>) {
        let mut values = self.values.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        match keys {
            Some(keys) => {
                for key in keys {
                    values.remove(&key);
                }
            }
            // A flush of the database, or tracking lost: nothing cached is known good.
            None => values.clear(),
        }
    }

    fn set_live(&self, live: bool) {
        self.invalidate(None);
        self.live.store(live, Ordering::Release);
    }
}

/// The Redis world behind a [`SharedState`](super::SharedState).
pub(super) struct RedisStore {
    client: Client,
    config: RedisConfig,
    limits: SharedLimits,
    idle: Mutex<Vec<Connection>>,
    health: Mutex<Health>,
    queues: Mutex<Queues>,
    cache: Cache,
    stats: Stats,
    set_script: Script,
    enqueue_script: Script,
    dequeue_script: Script,
}

impl RedisStore {
    pub(super) fn start(
        config: RedisConfig,
        limits: SharedLimits,
    ) -> Result<Arc<RedisStore>, RedisConfigError> {
        if config.timeout.is_zero() {
            return Err(RedisConfigError::ZeroTimeout);
        }
        let bad_url = |e: RedisError| RedisConfigError::Url {
            url: config.url.clone(),
            reason: e.to_string(),
        };
        // Request and answer, one at a time: no Nagle delay on either side of a round trip.
        let info = redis::IntoConnectionInfo::into_connection_info(config.url.as_str())
            .map_err(bad_url)?
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        let client = Client::open(info).map_err(bad_url)?;
        let store = Arc::new(RedisStore {
            client,
            config,
            limits,
            idle: Mutex::default(),
            health: Mutex::default(),
            queues: Mutex::default(),
            cache: Cache::default(),
            stats: Stats::default(),
            set_script: Script::new(SET_SCRIPT),
            enqueue_script: Script::new(ENQUEUE_SCRIPT),
            dequeue_script: Script::new(DEQUEUE_SCRIPT),
        });
        let weak = Arc::downgrade(&store);
        std::thread::Builder::new()
            .name("filterbox-redis".to_owned())
            .spawn(move || subscriber::run(weak))
            .map_err(|e| RedisConfigError::Thread(e.to_string()))?;
        Ok(store)
    }

    pub(super) fn stats(&self) -> StoreStats {
        let s = &self.stats;
        StoreStats {
            operations: s.operations.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
            cache_hits: s.cache_hits.load(Ordering::Relaxed),
            total_micros: s.total_micros.load(Ordering::Relaxed),
            max_micros: s.max_micros.load(Ordering::Relaxed),
        }
    }

    fn key(&self, kind: &str, vm_id: &str, rest: Option<&[u8]>) -> Vec<u8> {
        let mut key = Vec::with_capacity(
            self.config.key_prefix.len() + vm_id.len() + rest.map_or(0, <[u8]>::len) + 16,
        );
        key.extend_from_slice(self.config.key_prefix.as_bytes());
        key.extend_from_slice(kind.as_bytes());
        key.extend_from_slice(format!(":{{{}:", vm_id.len()).as_bytes());
        key.extend_from_slice(vm_id.as_bytes());
        key.push(b'}');
        if let Some(rest) = rest {
            key.push(b':');
            key.extend_from_slice(rest);
        }
        key
    }

    fn channel(&self) -> String {
        format!("{}queue-ready", self.config.key_prefix)
    }

    /// The prefix of every data key, which the cache tracks.
    fn data_prefix(&self) -> String {
        format!("{}d:", self.config.key_prefix)
    }

    /// Runs `op` on a pooled connection within the timeout, counting it.
    fn run<T>(&self, op: impl FnOnce(&mut Connection) -> RedisResult<T>) -> Result<T, ()> {
        let started = Instant::now();
        let result = self.run_uncounted(op);
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let s = &self.stats;
        s.operations.fetch_add(1, Ordering::Relaxed);
        s.total_micros.fetch_add(micros, Ordering::Relaxed);
        s.max_micros.fetch_max(micros, Ordering::Relaxed);
        if result.is_err() {
            s.errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn run_uncounted<T>(
        &self,
        op: impl FnOnce(&mut Connection) -> RedisResult<T>,
    ) -> Result<T, ()> {
        if let Some(at) = self.health.lock().retry_at
            && Instant::now() < at
        {
            return Err(());
        }
        let pooled = self.idle.lock().pop();
        let mut connection = match pooled {
            Some(connection) => connection,
            None => match connect(&self.client, self.config.timeout) {
                Ok(connection) => connection,
                Err(e) => {
                    self.failed(&e);
                    return Err(());
                }
            },
        };
        match op(&mut connection) {
            Ok(value) => {
                self.health.lock().failures = 0;
                let mut idle = self.idle.lock();
                if idle.len() < self.config.max_idle_connections {
                    idle.push(connection);
                }
                Ok(value)
            }
            // The connection is dropped: a late reply must not answer the next command.
            Err(e) => {
                self.failed(&e);
                Err(())
            }
        }
    }

    /// Starts or extends the backoff after a failure that says the server is not reachable.
    fn failed(&self, e: &RedisError) {
        let unreachable = e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal();
        if !unreachable {
            tracing::warn!(error = %e, "redis shared state: the server refused an operation");
            return;
        }
        let mut health = self.health.lock();
        health.failures = health.failures.saturating_add(1);
        let backoff = Duration::from_millis(5)
            .saturating_mul(1 << health.failures.min(8))
            .min(MAX_BACKOFF);
        health.retry_at = Some(Instant::now() + backoff);
        if health.failures == 1 {
            tracing::warn!(error = %e, "redis shared state: server unreachable, backing off");
        }
        drop(health);
        // Pooled connections are likely as dead as this one.
        self.idle.lock().clear();
    }

    pub(super) fn get(&self, vm_id: &str, key: &[u8]) -> Result<Option<(Bytes, u32)>, SharedError> {
        let data_key = self.key("d", vm_id, Some(key));
        if self.config.local_cache
            && let Some(hit) = self.cache.get(&data_key)
        {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(hit));
        }
        let generation = self.cache.generation.load(Ordering::Acquire);
        let (value, token): (Option<Vec<u8>>, Option<u32>) = self
            .run(|c| {
                redis::cmd("HMGET")
                    .arg(&data_key)
                    .arg("v")
                    .arg("c")
                    .query(c)
            })
            .map_err(|()| SharedError::Unavailable)?;
        let (Some(value), Some(token)) = (value, token) else {
            return Ok(None);
        };
        let found = (Bytes::from(value), token);
        if self.config.local_cache {
            self.cache.insert(generation, data_key, found.clone());
        }
        Ok(Some(found))
    }

    pub(super) fn set(
        &self,
        vm_id: &str,
        key: &[u8],
        value: &[u8],
        cas: u32,
    ) -> Result<u32, SharedError> {
        let data_key = self.key("d", vm_id, Some(key));
        let meta_key = self.key("m", vm_id, None);
        let limits = &self.limits;
        let reply: i64 = self
            .run(|c| {
                self.set_script
                    .key(&data_key)
                    .key(&meta_key)
                    .arg(value)
                    .arg(cas)
                    .arg(key.len())
                    .arg(limits.max_keys)
                    .arg(limits.max_data_bytes)
                    .arg(limits.max_vm_id_bytes)
                    .invoke(c)
            })
            .map_err(|()| SharedError::Unavailable)?;
        match reply {
            -1 => {
                // What this process holds for the key is older than the server's.
                self.cache.invalidate(Some(vec![data_key]));
                Err(SharedError::CasMismatch)
            }
            token if token > 0 => u32::try_from(token).map_err(|_| SharedError::Unavailable),
            _ => Err(SharedError::Full),
        }
    }

    pub(super) fn register_queue(
        &self,
        vm_id: &str,
        name: &[u8],
        owner: &Arc<Inbox>,
        root: u32,
    ) -> Result<u32, SharedError> {
        let token = {
            let mut queues = self.queues.lock();
            let token = queues
                .token_of(vm_id, name, self.limits.max_queues)
                .ok_or(SharedError::Full)?;
            queues.owners.insert(token, (Arc::downgrade(owner), root));
            token
        };
        // Announced so that other instances can resolve it; if the server is away now, the
        // subscriber announces every queue of this process again when it reconnects.
        self.announce(vm_id, name);
        Ok(token)
    }

    fn announce(&self, vm_id: &str, name: &[u8]) {
        let registry = self.key("r", vm_id, None);
        let _ = self.run(|c| redis::cmd("SADD").arg(&registry).arg(name).query::<i64>(c));
    }

    pub(super) fn resolve_queue(
        &self,
        vm_id: &str,
        name: &[u8],
    ) -> Result<Option<u32>, QueueError> {
        let known = {
            let queues = self.queues.lock();
            queues
                .tokens
                .get(&(vm_id.to_owned(), Bytes::copy_from_slice(name)))
                .copied()
        };
        if let Some(token) = known
            && self.queues.lock().owners.contains_key(&token)
        {
            return Ok(Some(token));
        }
        let registry = self.key("r", vm_id, None);
        let registered: bool = self
            .run(|c| redis::cmd("SISMEMBER").arg(&registry).arg(name).query(c))
            .map_err(|()| QueueError::Unavailable)?;
        if !registered {
            return Ok(None);
        }
        self.queues
            .lock()
            .token_of(vm_id, name, self.limits.max_queues)
            .map(Some)
            .ok_or(QueueError::Full)
    }

    pub(super) fn enqueue(&self, token: u32, message: &[u8]) -> Result<(), QueueError> {
        let (vm_id, name) = self.queue_name(token)?;
        let list = self.key("q", &vm_id, Some(&name));
        let meta = self.key("m", &vm_id, None);
        let limits = &self.limits;
        let reply: i64 = self
            .run(|c| {
                self.enqueue_script
                    .key(&list)
                    .key(&meta)
                    .arg(message)
                    .arg(limits.max_queue_messages)
                    .arg(limits.max_queue_bytes)
                    .arg(limits.max_vm_id_bytes)
                    .arg(wake_payload(&vm_id, &name))
                    .arg(self.channel())
                    .arg(name.as_ref())
                    .invoke(c)
            })
            .map_err(|()| QueueError::Unavailable)?;
        match reply {
            0 => Ok(()),
            _ => Err(QueueError::Full),
        }
    }

    pub(super) fn dequeue(&self, token: u32) -> Result<Option<Bytes>, QueueError> {
        let (vm_id, name) = self.queue_name(token)?;
        let list = self.key("q", &vm_id, Some(&name));
        let meta = self.key("m", &vm_id, None);
        let message: Option<Vec<u8>> = self
            .run(|c| {
                self.dequeue_script
                    .key(&list)
                    .key(&meta)
                    .arg(name.as_ref())
                    .invoke(c)
            })
            .map_err(|()| QueueError::Unavailable)?;
        Ok(message.map(Bytes::from))
    }

    fn queue_name(&self, token: u32) -> Result<QueueName, QueueError> {
        self.queues
            .lock()
            .names
            .get(&token)
            .cloned()
            .ok_or(QueueError::NotFound)
    }

    /// A wake-up heard on the channel: one `proxy_on_queue_ready` for the queue's owner here.
    fn woken(&self, payload: &[u8]) {
        let Some((vm_id, name)) = parse_wake_payload(payload) else {
            return;
        };
        let owner = {
            let queues = self.queues.lock();
            queues
                .tokens
                .get(&(vm_id.to_owned(), Bytes::copy_from_slice(name)))
                .and_then(|token| Some((*token, queues.owners.get(token)?.clone())))
        };
        if let Some((token, (inbox, root))) = owner
            && let Some(inbox) = inbox.upgrade()
        {
            inbox.push(Pending::QueueReady { root, token });
        }
    }

    /// The subscriber is listening (again): wake-ups sent while it was not are lost, so every
    /// queue owned here that holds messages is woken once, and every queue is announced again.
    fn subscribed(&self) {
        let owned: Vec<(u32, QueueName, Weak<Inbox>, u32)> = {
            let queues = self.queues.lock();
            queues
                .owners
                .iter()
                .filter_map(|(token, (inbox, root))| {
                    let name = queues.names.get(token)?.clone();
                    Some((*token, name, inbox.clone(), *root))
                })
                .collect()
        };
        for (token, (vm_id, name), inbox, root) in owned {
            self.announce(&vm_id, &name);
            let list = self.key("q", &vm_id, Some(&name));
            let waiting = self
                .run(|c| redis::cmd("LLEN").arg(&list).query::<u64>(c))
                .unwrap_or(0);
            if waiting > 0
                && let Some(inbox) = inbox.upgrade()
            {
                inbox.push(Pending::QueueReady { root, token });
            }
        }
    }
}

impl Queues {
    /// The token of `(vm_id, name)` in this process, made on first use; `None` when this
    /// process already knows `max` queues (registered or resolved), so that a plugin cannot
    /// grow the table without end.
    fn token_of(&mut self, vm_id: &str, name: &[u8], max: usize) -> Option<u32> {
        let key = (vm_id.to_owned(), Bytes::copy_from_slice(name));
        if let Some(token) = self.tokens.get(&key) {
            return Some(*token);
        }
        if self.names.len() >= max {
            return None;
        }
        let token = loop {
            self.next = self.next.wrapping_add(1).max(1);
            if !self.names.contains_key(&self.next) {
                break self.next;
            }
        };
        self.tokens.insert(key.clone(), token);
        self.names.insert(token, key);
        Some(token)
    }
}

fn connect(client: &Client, timeout: Duration) -> RedisResult<Connection> {
    let connection = client.get_connection_with_timeout(timeout)?;
    connection.set_read_timeout(Some(timeout))?;
    connection.set_write_timeout(Some(timeout))?;
    Ok(connection)
}

fn wake_payload(vm_id: &str, name: &[u8]) -> Vec<u8> {
    let mut payload = format!("{}:{vm_id}", vm_id.len()).into_bytes();
    payload.extend_from_slice(name);
    payload
}

fn parse_wake_payload(payload: &[u8]) -> Option<(&str, &[u8])> {
    let colon = payload.iter().position(|b| *b == b':')?;
    let len: usize = std::str::from_utf8(payload.get(..colon)?)
        .ok()?
        .parse()
        .ok()?;
    let rest = payload.get(colon + 1..)?;
    let vm_id = std::str::from_utf8(rest.get(..len)?).ok()?;
    Some((vm_id, rest.get(len..)?))
}

/// The thread that listens for wake-ups and invalidations, for as long as its store lives.
mod subscriber {
    use super::*;

    const INVALIDATE: &str = "__redis__:invalidate";

    pub(super) fn run(store: Weak<RedisStore>) {
        let mut backoff = Duration::from_millis(10);
        loop {
            let Some((client, timeout, track)) = store.upgrade().map(|s| {
                let track = s.config.local_cache.then(|| s.data_prefix());
                (s.client.clone(), s.config.timeout, track)
            }) else {
                return;
            };
            let listened = listen(&store, &client, timeout, track.as_deref());
            let Some(alive) = store.upgrade() else {
                return;
            };
            alive.cache.set_live(false);
            drop(alive);
            match listened {
                Ok(true) => backoff = Duration::from_millis(10),
                Ok(false) => {}
                Err(e) => tracing::debug!(error = %e, "redis shared state: subscriber lost"),
            }
            // Sleeps in steps, so a dropped store ends the thread soon.
            let until = Instant::now() + backoff;
            while Instant::now() < until {
                if store.strong_count() == 0 {
                    return;
                }
                std::thread::sleep(SUBSCRIBER_POLL.min(backoff));
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Listens until the connection fails (`Err`) or the store is gone. `Ok(true)`: it got
    /// as far as listening, so the next attempt starts with a short backoff again.
    fn listen(
        store: &Weak<RedisStore>,
        client: &Client,
        timeout: Duration,
        track: Option<&str>,
    ) -> RedisResult<bool> {
        // Connecting may take longer than a hostcall may wait: nothing waits on this thread.
        let mut connection = connect(client, timeout.max(Duration::from_millis(500)))?;
        if let Some(prefix) = track {
            let id: i64 = redis::cmd("CLIENT").arg("ID").query(&mut connection)?;
            // Invalidations of every data key, whoever wrote it, come to this connection.
            redis::cmd("CLIENT")
                .arg("TRACKING")
                .arg("on")
                .arg("REDIRECT")
                .arg(id)
                .arg("BCAST")
                .arg("PREFIX")
                .arg(prefix)
                .exec(&mut connection)?;
        }
        connection.set_read_timeout(Some(SUBSCRIBER_POLL))?;
        let channel = match store.upgrade() {
            Some(s) => s.channel(),
            None => return Ok(false),
        };
        let mut pubsub = connection.as_pubsub();
        pubsub.subscribe(&channel)?;
        if track.is_some() {
            pubsub.subscribe(INVALIDATE)?;
        }
        match store.upgrade() {
            Some(s) => {
                s.cache.set_live(track.is_some());
                s.subscribed();
            }
            None => return Ok(false),
        }
        loop {
            match pubsub.get_message() {
                Ok(message) => {
                    let Some(s) = store.upgrade() else {
                        return Ok(true);
                    };
                    if message.get_channel_name() == INVALIDATE {
                        s.cache.invalidate(
                            message.get_payload::<Option<Vec<Vec<u8>>>>().ok().flatten(),
                        );
                    } else {
                        s.woken(message.get_payload_bytes());
                    }
                }
                Err(e) if e.is_timeout() => {
                    if store.strong_count() == 0 {
                        return Ok(true);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wake_payloads_round_trip_and_bad_ones_are_ignored() {
        let payload = wake_payload("vm:1}", b"q:name");
        assert_eq!(
            parse_wake_payload(&payload),
            Some(("vm:1}", &b"q:name"[..]))
        );
        assert_eq!(parse_wake_payload(b"9:short"), None);
        assert_eq!(parse_wake_payload(b"x:vm"), None);
        assert_eq!(parse_wake_payload(b"no colon"), None);
        assert_eq!(parse_wake_payload(b"0:"), Some(("", &b""[..])));
    }

    #[test]
    fn keys_of_different_vm_ids_never_collide() {
        let store = RedisStore::start(
            RedisConfig::new("redis://127.0.0.1:1"),
            SharedLimits::default(),
        )
        .expect("a valid URL");
        assert_ne!(
            store.key("d", "a}:b", Some(b"c")),
            store.key("d", "a", Some(b"b}:c"))
        );
        assert_eq!(store.key("m", "vm", None), b"filterbox:m:{2:vm}".to_vec());
    }

    #[test]
    fn a_process_knows_at_most_max_queues() {
        let mut queues = Queues::default();
        let first = queues.token_of("vm", b"a", 2).expect("first");
        let second = queues.token_of("other", b"a", 2).expect("second");
        assert_ne!(first, second);
        assert_eq!(queues.token_of("vm", b"b", 2), None, "a third one");
        assert_eq!(
            queues.token_of("vm", b"a", 2),
            Some(first),
            "known ones stay"
        );
    }

    #[test]
    fn bad_configs_are_refused() {
        let zero = RedisConfig::new("redis://127.0.0.1").with_timeout(Duration::ZERO);
        assert!(matches!(
            RedisStore::start(zero, SharedLimits::default()),
            Err(RedisConfigError::ZeroTimeout)
        ));
        assert!(matches!(
            RedisStore::start(RedisConfig::new("http://nope"), SharedLimits::default()),
            Err(RedisConfigError::Url { .. })
        ));
    }
}
