//! Shared state on Redis (`SharedState::redis`): two worlds on one server stand for two proxy
//! instances. Data with CAS and limits, the local read cache, queues that wake a VM of the
//! other world, and a rate limiter (the suite's Rust-SDK `ratelimit` guest) whose VMs in both
//! worlds enforce one limit, on every built engine. Each test starts its own `redis-server`
//! and is skipped, saying so, only when none can be started.

use filterbox::{
    Action, EngineKind, HeaderMap, Plugin, PluginConfig, QueueError, RedisConfig, Service,
    SharedError, SharedLimits, SharedState, Vm,
};
use filterbox_conformance::guests;
use filterbox_conformance::redis_server::RedisServer;
use std::time::{Duration, Instant};

/// A round trip on a busy test machine can take long; no test here measures it.
const PATIENT: Duration = Duration::from_secs(5);

fn server() -> Option<RedisServer> {
    match RedisServer::start() {
        Ok(server) => Some(server),
        Err(e) => {
            eprintln!("SKIPPED: no redis-server to test against: {e}");
            None
        }
    }
}

fn world(server: &RedisServer, limits: SharedLimits) -> SharedState {
    let config = RedisConfig::new(server.url()).with_timeout(PATIENT);
    SharedState::redis(config, limits).expect("a valid config")
}

/// Polls `check` until it holds (up to 10 s), for what arrives through the subscriber.
fn eventually(what: &str, check: impl Fn() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < Duration::from_secs(10), "never: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn two_worlds_on_one_server_share_data_with_cas_and_limits() {
    let Some(server) = server() else { return };
    let limits = SharedLimits::default()
        .with_max_keys(3)
        .with_max_data_bytes(64);
    let (a, b) = (world(&server, limits), world(&server, limits));
    assert_eq!(a.backend(), "redis");
    assert_eq!(a.get("vm", b"k"), Ok(None));
    let first = a.set("vm", b"k", b"1", 777).expect("new key: cas ignored");
    assert_eq!(b.get("vm", b"k"), Ok(Some((b"1"[..].into(), first))));
    let second = b.set("vm", b"k", b"2", first).expect("matching cas");
    assert_ne!(second, first);
    // A writes with the token it read before B's write: refused on the server.
    assert_eq!(
        a.set("vm", b"k", b"x", first),
        Err(SharedError::CasMismatch)
    );
    assert_eq!(a.get("vm", b"k"), Ok(Some((b"2"[..].into(), second))));
    let third = a.set("vm", b"k", b"3", 0).expect("0: unconditional");
    assert_eq!(b.get("vm", b"k"), Ok(Some((b"3"[..].into(), third))));
    assert_eq!(b.get("other", b"k"), Ok(None), "namespaced by vm_id");

    // The limits hold across both worlds: they are counted on the server.
    a.set("vm", b"k2", b"", 0).expect("second key");
    b.set("vm", b"k3", b"", 0).expect("third key");
    assert_eq!(a.set("vm", b"k4", b"", 0), Err(SharedError::Full));
    assert_eq!(b.set("vm", b"k", &[0; 70], 0), Err(SharedError::Full));
    b.set("other", b"k4", b"", 0)
        .expect("another vm_id has its own count");

    // Reads of an unchanged key come from the cache once the subscriber listens, and a
    // write in the other world reaches it.
    eventually("a cache hit", || {
        let _ = a.get("vm", b"k2");
        a.store_stats().is_some_and(|s| s.cache_hits > 0)
    });
    b.set("vm", b"k2", b"new", 0).expect("write in B");
    eventually(
        "A sees B's write",
        || matches!(a.get("vm", b"k2"), Ok(Some((v, _))) if v == b"new"[..]),
    );
    let stats = a.store_stats().expect("a remote store has stats");
    assert!(stats.operations > 0 && stats.errors == 0, "{stats:?}");
}

#[test]
fn a_store_that_is_down_answers_unavailable_within_its_timeout() {
    let Some(server) = server() else { return };
    let url = server.url();
    server.stop();
    let config = RedisConfig::new(url).with_timeout(Duration::from_millis(100));
    let world = SharedState::redis(config, SharedLimits::default()).expect("config");
    let started = Instant::now();
    assert_eq!(world.get("vm", b"k"), Err(SharedError::Unavailable));
    assert_eq!(
        world.set("vm", b"k", b"v", 0),
        Err(SharedError::Unavailable)
    );
    assert_eq!(
        world.resolve_queue("vm", b"q"),
        Err(QueueError::Unavailable)
    );
    // Four generous timeouts: a hostcall does not hang on a store that is away.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let stats = world.store_stats().expect("stats");
    assert!(stats.errors >= 1, "{stats:?}");
}

fn request() -> HeaderMap {
    [(":method", "GET"), (":path", "/"), (":authority", "a")]
        .into_iter()
        .collect()
}

fn limiter(engine: EngineKind, world: &SharedState, config: &str) -> Plugin {
    let config = PluginConfig::named("ratelimit")
        .with_configuration(config)
        .with_vm_id("limiter")
        .with_engine(engine);
    Plugin::builder(config)
        .shared_state(world.clone())
        .build(guests::RATELIMIT)
        .expect("ratelimit plugin")
}

#[test]
fn a_rate_limit_holds_across_two_worlds_on_every_engine() {
    let Some(server) = server() else { return };
    for engine in EngineKind::built() {
        server.command(&["FLUSHALL"]).expect("flush");
        let (a, b) = (
            world(&server, SharedLimits::default()),
            world(&server, SharedLimits::default()),
        );
        let mut vms = [
            Vm::new(&limiter(engine, &a, "limit=7 window=0")).expect("vm a"),
            Vm::new(&limiter(engine, &b, "limit=7 window=0")).expect("vm b"),
        ];
        let mut passed = 0;
        for i in 0..20 {
            let vm = &mut vms[i % 2];
            let stream = vm.create_http_stream().expect("stream");
            match vm.on_request_headers(&stream, &mut request(), true) {
                Ok(Action::Continue) => passed += 1,
                Ok(Action::Respond(response)) => assert_eq!(response.status_code, 429),
                other => panic!("{engine}: {other:?}"),
            }
            vm.finish_stream(stream).expect("finish");
        }
        assert_eq!(passed, 7, "{engine}");
    }
}

#[test]
fn a_queue_written_in_one_world_wakes_its_owner_in_the_other_on_every_engine() {
    let Some(server) = server() else { return };
    for engine in EngineKind::built() {
        let (a, b) = (
            world(&server, SharedLimits::default()),
            world(&server, SharedLimits::default()),
        );
        // B's plugin registers `events` and stores what it dequeues under `got:b`.
        let owner = limiter(engine, &b, "queue=events instance=b");
        let service = Service::start(&owner).expect("service");
        let token = a
            .resolve_queue("limiter", b"events")
            .expect("resolve")
            .expect("B registered the queue");
        let message = format!("hello from a, {engine}");
        a.enqueue(token, message.as_bytes()).expect("enqueue");
        eventually(
            "B's on_queue_ready stored the message",
            || matches!(a.get("limiter", b"got:b"), Ok(Some((v, _))) if v == message.as_bytes()),
        );
        assert_eq!(a.dequeue(token), Ok(None), "{engine}: B took it");
        service.stop();
    }
}
