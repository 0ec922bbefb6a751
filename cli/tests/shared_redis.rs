//! Two `filterbox serve` processes share one Redis (`shared_state: { backend: redis }`): the
//! suite's Rust-SDK rate limiter enforces one limit across both, a queue written through one
//! wakes the plugin in the other, and a Redis that stops, stalls and comes back is ridden out:
//! requests keep being answered (the plugin's fail-open fallback) and sharing resumes without
//! a restart. The test starts its own `redis-server`; it is skipped, saying so, only when none
//! can be started (`scripts/setup` installs Debian's).

use bytes::Bytes;
use filterbox_conformance::guests;
use filterbox_conformance::redis_server::RedisServer;
use filterbox_conformance::servers::free_port;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

mod common;
use common::*;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn redis() -> Option<RedisServer> {
    match RedisServer::start() {
        Ok(server) => Some(server),
        Err(e) => {
            eprintln!("SKIPPED: no redis-server to test against: {e}");
            None
        }
    }
}

/// One `serve` with the rate limiter (`configuration`) on `redis_url`, and its admin port.
async fn instance(
    name: &str,
    upstream: SocketAddr,
    redis_url: &str,
    timeout_ms: u64,
    configuration: &str,
) -> (Proxy, SocketAddr, SocketAddr) {
    let dir = test_dir(name);
    std::fs::write(dir.join("ratelimit.wasm"), guests::RATELIMIT).expect("ratelimit.wasm");
    let (listen, admin) = (free_port(), free_port());
    let config = format!(
        r#"listeners: [{{ address: "{listen}", upstream: backend }}]
upstreams: {{ backend: "http://{upstream}" }}
admin: {{ address: "{admin}" }}
plugins:
  - name: ratelimit
    configuration: "{configuration}"
    failure_policy: FAIL_CLOSED
    vm_config: {{ vm_id: limiter, code: {{ local: {{ filename: ratelimit.wasm }} }} }}
    shared_state: {{ backend: redis, url: "{redis_url}", key_prefix: "test:", timeout_ms: {timeout_ms} }}
"#
    );
    let proxy = serve_until_listening(&dir, &config, listen).await;
    (proxy, listen, admin)
}

async fn status_of(client: &HttpClient, listen: SocketAddr, header: Option<(&str, &str)>) -> u16 {
    get(client, format!("http://{listen}/"), header)
        .await
        .map(|(status, _, _)| status)
        .unwrap_or_else(|e| panic!("request to {listen}: {e}"))
}

#[test]
fn two_serve_processes_enforce_one_rate_limit_and_share_a_queue_through_redis() {
    let Some(server) = redis() else { return };
    runtime().block_on(async {
        let upstream = http1_upstream(|_| async { "ok".to_owned() }).await;
        // A long timeout: this test counts exactly and must not see a slow moment as an outage.
        let url = server.url();
        let (_a, a, _) = instance("redis-a", upstream, &url, 5_000, "limit=100 window=0").await;
        let (_b, b, _) = instance(
            "redis-b",
            upstream,
            &url,
            5_000,
            "limit=100 window=0 queue=events instance=b",
        )
        .await;
        let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

        // 300 requests, spread over both instances, six at a time.
        let mut tasks = Vec::new();
        for worker in 0..6 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut statuses = Vec::new();
                for i in 0..50 {
                    let target = if (worker + i) % 2 == 0 { a } else { b };
                    statuses.push(status_of(&client, target, None).await);
                }
                statuses
            }));
        }
        let mut statuses = Vec::new();
        for task in tasks {
            statuses.extend(task.await.expect("client task"));
        }
        let passed = statuses.iter().filter(|s| **s == 200).count();
        let limited = statuses.iter().filter(|s| **s == 429).count();
        assert_eq!((passed, limited), (100, 200), "{statuses:?}");

        // A queue registered by B's plugin, written through A: B's plugin hears it.
        assert_eq!(
            status_of(&client, a, Some(("x-enqueue", "hello"))).await,
            202
        );
        let started = Instant::now();
        loop {
            let read = get(&client, format!("http://{a}/"), Some(("x-read", "got:b")))
                .await
                .expect("read");
            if (read.0, read.2.as_str()) == (200, "hello") {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "B's on_queue_ready never stored the message: {read:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

#[test]
fn serve_rides_out_a_redis_that_stops_stalls_and_comes_back() {
    let Some(server) = redis() else { return };
    let redis_address = server.address();
    runtime().block_on(async {
        let upstream = http1_upstream(|_| async { "ok".to_owned() }).await;
        let url = server.url();
        let (_proxy, listen, admin) =
            instance("redis-fault", upstream, &url, 100, "limit=100000 window=0").await;
        let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
        let fallback = |headers: &http::HeaderMap| {
            headers
                .get("x-ratelimit")
                .is_some_and(|v| v == "unavailable")
        };
        let shared = async || loop {
            let (status, headers, _) = get(&client, format!("http://{listen}/"), None)
                .await
                .expect("request");
            assert_eq!(status, 200);
            if !fallback(&headers) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        tokio::time::timeout(Duration::from_secs(20), shared())
            .await
            .expect("counted through Redis at first");

        // Redis stopped: every request is still answered, through the plugin's fallback.
        server.stop();
        for _ in 0..20 {
            let (status, headers, _) = get(&client, format!("http://{listen}/"), None)
                .await
                .expect("request while Redis is down");
            assert_eq!(status, 200);
            assert!(fallback(&headers), "{headers:?}");
        }

        // Redis back on its port (empty): sharing resumes without a restart of serve.
        let server = RedisServer::start_on(redis_address).expect("restart redis-server");
        tokio::time::timeout(Duration::from_secs(20), shared())
            .await
            .expect("counted through Redis again");

        // Redis stalled (`DEBUG SLEEP`): the request does not wait for it.
        let stall = std::thread::spawn({
            let address = server.address();
            move || RedisServer::command_at(address, &["DEBUG", "SLEEP", "8"])
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        let (status, headers, _) = get(&client, format!("http://{listen}/"), None)
            .await
            .expect("request while Redis stalls");
        let waited = started.elapsed();
        assert_eq!(status, 200);
        assert!(fallback(&headers), "{headers:?}");
        // Far below the 8 s stall (each round trip gives up after 100 ms).
        assert!(waited < Duration::from_secs(4), "waited {waited:?}");
        let _ = stall.join();

        let stats = get(&client, format!("http://{admin}/stats"), None)
            .await
            .expect("stats")
            .2;
        let errors = stat(
            &stats,
            "filterbox_shared_store_errors_total{plugin=\"ratelimit\"}",
        );
        assert!(errors > 0, "store errors not in /stats:\n{stats}");
        drop(server);
    });
}
