//! The tower layer with real SDK-built plugins around a service that records what reached it.

use bytes::Bytes;
use filterbox::{FilterChain, FilterLayer, FilteredBody, Plugin, PluginConfig};
use filterbox_conformance::guests;
use filterbox_conformance::servers::Servers;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower_layer::Layer;
use tower_service::Service;

/// What reached the inner service: headers as name → value, and the body.
#[derive(Clone, Default)]
struct Upstream {
    seen: Arc<Mutex<Vec<(http::HeaderMap, Bytes)>>>,
}

impl Service<http::Request<FilteredBody>> for Upstream {
    type Response = http::Response<FilteredBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<FilteredBody>) -> Self::Future {
        let seen = self.seen.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let body = body.collect().await.expect("request body").to_bytes();
            seen.lock().push((parts.headers, body.clone()));
            let response = http::Response::builder()
                .header("x-upstream", "yes")
                .body(FilteredBody::full(body))
                .unwrap_or_default();
            Ok(response)
        })
    }
}

/// A request body that arrives in the given chunks.
struct Chunks(VecDeque<Bytes>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|chunk| Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

fn plugin(name: &str, wasm: &[u8], configuration: &str) -> Plugin {
    Plugin::load(
        PluginConfig::named(name).with_configuration(configuration),
        wasm,
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn request(path: &str, chunks: &[&str]) -> http::Request<Chunks> {
    let body = Chunks(chunks.iter().map(|c| Bytes::from(c.to_string())).collect());
    http::Request::builder()
        .method(if chunks.is_empty() { "GET" } else { "POST" })
        .uri(path)
        .header("host", "example.test")
        .body(body)
        .expect("request")
}

async fn send<S>(service: &mut S, request: http::Request<Chunks>) -> (http::Response<()>, Bytes)
where
    S: Service<http::Request<Chunks>, Response = http::Response<FilteredBody>>,
    S::Error: std::fmt::Debug,
{
    let response = service.call(request).await.expect("exchange");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("response body").to_bytes();
    (http::Response::from_parts(parts, ()), body)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn a_chain_adds_headers_denies_and_rewrites_bodies_chunk_by_chunk() {
    runtime().block_on(async {
        let chain = FilterChain::builder()
            .slots(2)
            .build(vec![
                plugin(
                    "headers",
                    guests::HEADERS,
                    "add x-added one\nresponse-add x-response two",
                ),
                plugin("deny", guests::DENY, "/admin"),
                plugin("body", guests::BODY, "foo=>bar"),
            ])
            .expect("chain");
        let upstream = Upstream::default();
        let mut service = FilterLayer::new(chain).layer(upstream.clone());

        let (response, body) = send(&mut service, request("/ok", &[])).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-response"], "two");
        assert_eq!(response.headers()["x-upstream"], "yes");
        assert!(body.is_empty());
        {
            let seen = upstream.seen.lock();
            assert_eq!(seen.len(), 1);
            assert_eq!(seen[0].0["x-added"], "one");
            assert_eq!(seen[0].0["host"], "example.test");
        }

        let (response, body) = send(&mut service, request("/admin/x", &[])).await;
        assert_eq!(response.status(), 403);
        assert_eq!(response.headers()["x-denied-by"], "filterbox-guest");
        assert_eq!(body, "denied by policy\n");
        // As in Envoy, the local response went through the plugins' response phase: the
        // headers plugin (before the deny plugin in the chain) added its response header.
        assert_eq!(response.headers()["x-response"], "two");
        assert_eq!(
            upstream.seen.lock().len(),
            1,
            "a denied request reached the upstream"
        );

        // "foo" split across chunks: only a plugin that saw the body accumulate rewrites it.
        let (response, body) = send(&mut service, request("/post", &["a fo", "o b", "foo"])).await;
        assert_eq!(response.status(), 200);
        assert_eq!(upstream.seen.lock()[1].1, "a bar bbar");
        assert_eq!(body, "a bar bbar");
    });
}

#[test]
fn a_paused_request_resumes_when_the_plugins_http_call_answers() {
    let servers = Servers::get().expect("servers");
    runtime().block_on(async {
        let callouts = servers.callouts().expect("callouts");
        let plugin = Plugin::builder(PluginConfig::named("callouts"))
            .callouts(callouts)
            .build(guests::CALLOUTS)
            .expect("plugin");
        let chain = FilterChain::builder()
            .slots(1)
            .build(vec![plugin])
            .expect("chain");
        let upstream = Upstream::default();
        let mut service = FilterLayer::new(chain).layer(upstream.clone());
        for round in 0..3 {
            let (response, _) = send(&mut service, request(&format!("/r{round}"), &[])).await;
            assert_eq!(response.status(), 200);
        }
        let seen = upstream.seen.lock();
        assert_eq!(seen.len(), 3);
        for (headers, _) in seen.iter() {
            assert_eq!(headers["x-lookup"], "200 found");
        }
    });
}

#[test]
fn a_chain_refuses_a_plugin_that_does_not_configure() {
    let deny = plugin("deny", guests::DENY, "");
    let bad = plugin("headers", guests::HEADERS, "frobnicate everything");
    let error = FilterChain::new(vec![deny, bad]).expect_err("bad config accepted");
    assert!(matches!(error, filterbox::ChainError::Start(_)), "{error}");
    assert!(error.to_string().contains("proxy_on_configure"), "{error}");
}

/// An inner service that holds each request until the test lets it go.
#[derive(Clone)]
struct Gate {
    open: Arc<tokio::sync::Semaphore>,
    arrived: Arc<std::sync::atomic::AtomicUsize>,
    seen: Upstream,
}

impl Service<http::Request<FilteredBody>> for Gate {
    type Response = http::Response<FilteredBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<FilteredBody>) -> Self::Future {
        let (open, mut seen) = (self.open.clone(), self.seen.clone());
        self.arrived
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move {
            if let Ok(permit) = open.acquire().await {
                permit.forget();
            }
            seen.call(request).await
        })
    }
}

#[test]
fn a_replaced_chain_finishes_its_exchanges_then_drops_its_vms() {
    runtime().block_on(async {
        let old_plugin = plugin("headers", guests::HEADERS, "add x-chain old");
        let shared = filterbox::SharedChain::new(
            FilterChain::builder()
                .slots(1)
                .build(vec![old_plugin.clone()])
                .expect("old chain"),
        );
        let gate = Gate {
            open: Arc::new(tokio::sync::Semaphore::new(0)),
            arrived: Arc::default(),
            seen: Upstream::default(),
        };
        let mut service = filterbox::FilterLayer::shared(shared.clone()).layer(gate.clone());
        let mut in_flight = service.clone();
        let early = tokio::spawn(async move { send(&mut in_flight, request("/early", &[])).await });
        // The early exchange is inside the gate, on the old chain.
        let started = std::time::Instant::now();
        while gate.arrived.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "never reached the gate"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let new_chain = FilterChain::builder()
            .slots(1)
            .build(vec![plugin("headers", guests::HEADERS, "add x-chain new")])
            .expect("new chain");
        drop(shared.replace(new_chain));
        assert_eq!(
            old_plugin.metrics().vms_active(),
            1,
            "the old VM left mid-exchange"
        );

        gate.open.add_permits(2);
        let (response, _) = early.await.expect("early exchange");
        assert_eq!(response.status(), 200);
        let (response, _) = send(&mut service, request("/late", &[])).await;
        assert_eq!(response.status(), 200);
        {
            let seen = gate.seen.seen.lock();
            assert_eq!(seen[0].0["x-chain"], "old");
            assert_eq!(seen[1].0["x-chain"], "new");
        }
        // With its last exchange gone, the old chain's slot thread drops its VM.
        let started = std::time::Instant::now();
        while old_plugin.metrics().vms_active() != 0 {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "old VM never dropped"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    });
}

/// A plugin that traps in `proxy_on_request_headers` when the request has `x-boom`.
fn trapping_plugin(policy: filterbox::FailurePolicy, engine: filterbox::EngineKind) -> Plugin {
    let wasm = guests::trapping_on_x_boom().expect("wat");
    let config = PluginConfig::named("boom")
        .with_failure_policy(policy)
        .with_engine(engine);
    Plugin::load(config, &wasm).expect("boom")
}

fn boom(path: &str) -> http::Request<Chunks> {
    let mut request = request(path, &[]);
    request
        .headers_mut()
        .insert("x-boom", http::HeaderValue::from_static("1"));
    request
}

#[test]
fn a_trap_in_the_chain_gets_the_failure_policy_and_the_vm_is_rebuilt_on_every_engine() {
    let policies = [
        filterbox::FailurePolicy::FailClosed { status: 503 },
        filterbox::FailurePolicy::FailOpen,
    ];
    let runs = filterbox::EngineKind::built()
        .into_iter()
        .flat_map(|engine| policies.map(|policy| (engine, policy)));
    runtime().block_on(async {
        for (engine, policy) in runs {
            let trapping = trapping_plugin(policy, engine);
            let headers = Plugin::load(
                PluginConfig::named("headers")
                    .with_configuration("add x-added one")
                    .with_engine(engine),
                guests::HEADERS,
            )
            .expect("headers");
            let chain = FilterChain::builder()
                .slots(1)
                .build(vec![trapping.clone(), headers])
                .expect("chain");
            let upstream = Upstream::default();
            let mut service = FilterLayer::new(chain).layer(upstream.clone());

            let (response, _) = send(&mut service, boom("/boom")).await;
            match policy {
                filterbox::FailurePolicy::FailClosed { .. } => {
                    assert_eq!(response.status(), 503);
                    assert!(
                        upstream.seen.lock().is_empty(),
                        "fail-closed let the request through"
                    );
                }
                filterbox::FailurePolicy::FailOpen => {
                    assert_eq!(response.status(), 200);
                    // The next plugin still ran.
                    assert_eq!(upstream.seen.lock()[0].0["x-added"], "one");
                }
                other => panic!("a policy this test does not know: {other:?}"),
            }
            // The trap stayed in its VM: the next request runs on a rebuilt one.
            let before = upstream.seen.lock().len();
            let (response, _) = send(&mut service, request("/fine", &[])).await;
            assert_eq!(response.status(), 200, "{engine} {policy:?}");
            assert_eq!(upstream.seen.lock().len(), before + 1);
            assert_eq!(trapping.metrics().vms_failed(), 1, "{engine} {policy:?}");
            assert_eq!(trapping.metrics().vms_restarted(), 1, "{engine} {policy:?}");
        }
    });
}

/// A response body the test feeds chunk by chunk.
struct Feed(tokio::sync::mpsc::Receiver<Bytes>);

impl Body for Feed {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

/// An inner service whose response body is whatever the test feeds it.
#[derive(Clone)]
struct Feeding(Arc<Mutex<Option<tokio::sync::mpsc::Receiver<Bytes>>>>);

impl Service<http::Request<FilteredBody>> for Feeding {
    type Response = http::Response<Feed>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<FilteredBody>) -> Self::Future {
        let (_, empty) = tokio::sync::mpsc::channel(1);
        let feed = self.0.lock().take().unwrap_or(empty);
        std::future::ready(Ok(http::Response::new(Feed(feed))))
    }
}

#[test]
fn a_body_no_plugin_pauses_on_streams_through_and_one_that_pauses_accumulates() {
    runtime().block_on(async {
        let wait = std::time::Duration::from_secs(10);
        // Headers-only plugin: each chunk reaches the client before the next is produced.
        let (feed, fed) = tokio::sync::mpsc::channel(1);
        let chain = FilterChain::builder()
            .slots(1)
            .build(vec![plugin(
                "headers",
                guests::HEADERS,
                "response-add x-r yes",
            )])
            .expect("chain");
        let mut service = FilterLayer::new(chain).layer(Feeding(Arc::new(Mutex::new(Some(fed)))));
        // The headers go out with the first body frame.
        feed.send(Bytes::from("one ")).await.expect("feed");
        let response = service
            .call(request("/stream", &[]))
            .await
            .expect("exchange");
        assert_eq!(response.headers()["x-r"], "yes");
        let mut body = response.into_body();
        for (n, chunk) in ["one ", "two ", "three"].into_iter().enumerate() {
            if n > 0 {
                feed.send(Bytes::from(chunk)).await.expect("feed");
            }
            let frame = tokio::time::timeout(wait, body.frame())
                .await
                .expect("a chunk was held back")
                .expect("frame")
                .expect("data");
            assert_eq!(frame.into_data().expect("data frame"), chunk);
        }
        drop(feed);
        assert!(body.frame().await.is_none());

        // The body plugin pauses until the end: nothing comes out before the last chunk, then
        // the rewrite of the whole body, "foo" split across chunks included.
        let (feed, fed) = tokio::sync::mpsc::channel(4);
        let chain = FilterChain::builder()
            .slots(1)
            .build(vec![plugin("body", guests::BODY, "foo=>bar")])
            .expect("chain");
        let mut service = FilterLayer::new(chain).layer(Feeding(Arc::new(Mutex::new(Some(fed)))));
        feed.send(Bytes::from("a fo")).await.expect("feed");
        let response = service
            .call(request("/buffered", &[]))
            .await
            .expect("exchange");
        let mut body = response.into_body();
        feed.send(Bytes::from("o b")).await.expect("feed");
        let early = tokio::time::timeout(std::time::Duration::from_millis(200), body.frame()).await;
        assert!(early.is_err(), "a paused body came out early");
        drop(feed);
        let rest = body.collect().await.expect("body").to_bytes();
        assert_eq!(rest, "a bar b");
    });
}

#[test]
fn a_plugin_may_hold_at_most_max_body_bytes() {
    runtime().block_on(async {
        let chain = FilterChain::builder()
            .slots(1)
            .max_body_bytes(8)
            .build(vec![plugin("body", guests::BODY, "foo=>bar")])
            .expect("chain");
        let upstream = Upstream::default();
        let mut service = FilterLayer::new(chain).layer(upstream.clone());
        let (response, _) = send(&mut service, request("/big", &["12345", "67890"])).await;
        assert_eq!(response.status(), 413);
        assert!(
            upstream.seen.lock().is_empty(),
            "an over-limit body was forwarded"
        );
        // Within the limit it goes through.
        let (response, body) = send(&mut service, request("/small", &["foo", "foo"])).await;
        assert_eq!(response.status(), 200);
        assert_eq!(body, "barbar");
    });
}

#[test]
fn paused_bodies_across_exchanges_hold_at_most_max_held_bytes() {
    runtime().block_on(async {
        let chain = FilterChain::builder()
            .slots(1)
            .max_body_bytes(100)
            .max_held_bytes(16)
            .build(vec![plugin("body", guests::BODY, "foo=>bar")])
            .expect("chain");
        let upstream = Upstream::default();
        let mut service = FilterLayer::new(chain).layer(upstream.clone());
        // Two slow uploads: 10 bytes each, then nothing until the test lets them end. The
        // plugin holds what came (it pauses until the end of the body): one fits in 16 bytes,
        // the other is refused.
        let mut feeds = Vec::new();
        let mut exchanges = tokio::task::JoinSet::new();
        for path in ["/one", "/two"] {
            let (feed, fed) = tokio::sync::mpsc::channel(1);
            feed.send(Bytes::from("0123456789")).await.expect("feed");
            feeds.push(feed);
            let request = http::Request::post(path)
                .header("host", "example.test")
                .body(Feed(fed))
                .expect("request");
            let mut service = service.clone();
            exchanges.spawn(async move {
                let response = service.call(request).await.expect("exchange");
                let (parts, body) = response.into_parts();
                let body = body.collect().await.expect("body").to_bytes();
                (parts.status, body)
            });
        }
        let wait = std::time::Duration::from_secs(30);
        let (status, _) = tokio::time::timeout(wait, exchanges.join_next())
            .await
            .expect("both uploads are held: held bodies passed the chain's limit")
            .expect("an exchange")
            .expect("exchange task");
        assert_eq!(status, 503);
        // The uploads end: the one held goes through, and what it held is given back.
        for feed in feeds {
            let _ = feed.send(Bytes::from("foo")).await;
        }
        let (status, body) = tokio::time::timeout(wait, exchanges.join_next())
            .await
            .expect("the held upload did not finish")
            .expect("an exchange")
            .expect("exchange task");
        assert_eq!((status.as_u16(), body), (200, Bytes::from("0123456789bar")));
        assert_eq!(
            upstream.seen.lock().len(),
            1,
            "the refused upload was forwarded"
        );
        let (response, body) = send(&mut service, request("/three", &["abcdefghij"])).await;
        assert_eq!(response.status(), 200);
        assert_eq!(body, "abcdefghij");
        // Nothing is held now: another slow upload fits.
        let (feed, fed) = tokio::sync::mpsc::channel(1);
        feed.send(Bytes::from("0123456789")).await.expect("feed");
        let request = http::Request::post("/four")
            .header("host", "example.test")
            .body(Feed(fed))
            .expect("request");
        let call = service.call(request);
        drop(feed);
        let response = tokio::time::timeout(wait, call)
            .await
            .expect("the last upload")
            .expect("exchange");
        assert_eq!(response.status(), 200, "the held bytes were not given back");
    });
}

#[test]
fn a_local_reply_goes_through_the_plugins_response_phase_as_in_envoy() {
    runtime().block_on(async {
        // A rate limiter written with the Rust SDK answers 429 from its request headers and
        // adds `retry-after` in its response headers; the headers plugin before it in the
        // chain adds its response header to the 429 too.
        let chain = FilterChain::builder()
            .slots(1)
            .build(vec![
                plugin("headers", guests::HEADERS, "response-add x-r yes"),
                plugin("ratelimit", guests::PARITY, "ratelimit"),
            ])
            .expect("chain");
        let upstream = Upstream::default();
        let mut service = FilterLayer::new(chain).layer(upstream.clone());
        let (response, body) = send(&mut service, request("/limited", &[])).await;
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["retry-after"], "1");
        assert_eq!(response.headers()["x-r"], "yes");
        assert_eq!(body, "slow down\n");
        assert!(
            upstream.seen.lock().is_empty(),
            "a limited request went upstream"
        );
    });
}

/// Plugin log lines, kept.
#[derive(Default)]
struct Lines(Mutex<Vec<String>>);

impl filterbox::LogSink for Lines {
    fn log(&self, _plugin: &str, _level: filterbox::LogLevel, message: &str) {
        self.0.lock().push(message.to_owned());
    }
}

#[test]
fn on_log_sees_the_final_status_of_forwarded_and_locally_answered_exchanges() {
    runtime().block_on(async {
        let lines = Arc::new(Lines::default());
        let logger = Plugin::builder(PluginConfig::named("logger"))
            .log_sink(lines.clone())
            .build(guests::LOGGER)
            .expect("logger");
        let chain = FilterChain::builder()
            .slots(1)
            .build(vec![logger, plugin("deny", guests::DENY, "/admin")])
            .expect("chain");
        let mut service = FilterLayer::new(chain).layer(Upstream::default());
        let (response, _) = send(&mut service, request("/ok", &[])).await;
        assert_eq!(response.status(), 200);
        let (response, _) = send(&mut service, request("/admin", &[])).await;
        assert_eq!(response.status(), 403);
        // `proxy_on_log` runs on the slot after the exchange; give it a moment.
        let started = std::time::Instant::now();
        loop {
            let logged: Vec<String> = lines
                .0
                .lock()
                .iter()
                .filter(|l| l.starts_with("log status"))
                .cloned()
                .collect();
            if logged.len() == 2 {
                assert_eq!(logged, ["log status 200", "log status 403"]);
                break;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "{logged:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    });
}

/// A plugin answering with its own framing (`content-length` of another size,
/// `transfer-encoding`) and hop-by-hop headers: the proxy frames the body itself, so those
/// never reach the client as the plugin gave them (they would split the response on a
/// keep-alive connection). Other headers and the body come through.
#[test]
fn a_local_response_cannot_set_its_own_framing() {
    // Pairs: content-length: 5, transfer-encoding: chunked, connection: close, x-kept: 1.
    let wasm = wat::parse_str(
        r#"(module
            (import "env" "proxy_send_local_response"
                (func $respond (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (data (i32.const 100) "hello world")
            (data (i32.const 200)
                "\04\00\00\00"
                "\0e\00\00\00\01\00\00\00" "\11\00\00\00\07\00\00\00"
                "\0a\00\00\00\05\00\00\00" "\06\00\00\00\01\00\00\00"
                "content-length\005\00" "transfer-encoding\00chunked\00"
                "connection\00close\00" "x-kept\001\00")
            (func (export "proxy_abi_version_0_2_1"))
            (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
            (func (export "proxy_on_context_create") (param i32 i32))
            (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
                (drop (call $respond (i32.const 200) (i32.const 0) (i32.const 0)
                    (i32.const 100) (i32.const 11) (i32.const 200) (i32.const 105) (i32.const -1)))
                (i32.const 1)))"#,
    )
    .expect("wat");
    runtime().block_on(async {
        let chain = FilterChain::builder()
            .slots(1)
            .build(vec![plugin("framing", &wasm, "")])
            .expect("chain");
        let upstream = Upstream::default();
        let mut service = FilterLayer::new(chain).layer(upstream.clone());
        let (response, body) = send(&mut service, request("/", &[])).await;
        assert_eq!(response.status(), 200);
        assert_eq!(body, "hello world");
        assert_eq!(response.headers()["x-kept"], "1");
        for name in ["content-length", "transfer-encoding", "connection"] {
            assert!(
                response.headers().get(name).is_none(),
                "{name}: {:?}",
                response.headers().get(name)
            );
        }
        assert!(upstream.seen.lock().is_empty(), "the request went upstream");
    });
}

/// A local response to a gRPC call goes out as Envoy sends it: a trailers-only response
/// (HTTP 200, `content-type: application/grpc`, `grpc-status` mapped from the HTTP status,
/// the body as a percent-encoded `grpc-message`) with no body.
#[test]
fn a_local_response_to_a_grpc_call_is_trailers_only() {
    runtime().block_on(async {
        let chain = FilterChain::builder()
            .slots(1)
            .build(vec![plugin("deny", guests::DENY, "/admin")])
            .expect("chain");
        let upstream = Upstream::default();
        let mut service = FilterLayer::new(chain).layer(upstream.clone());
        let mut call = request("/admin/Service/Method", &[]);
        call.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        let (response, body) = send(&mut service, call).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "application/grpc");
        assert_eq!(response.headers()["grpc-status"], "7"); // PermissionDenied, from 403
        assert_eq!(response.headers()["grpc-message"], "denied by policy%0A");
        assert!(body.is_empty(), "body {body:?}");
        assert!(upstream.seen.lock().is_empty(), "the call went upstream");
        // The same answer to a plain request keeps its status and body.
        let (response, body) = send(&mut service, request("/admin/x", &[])).await;
        assert_eq!(response.status(), 403);
        assert_eq!(body, "denied by policy\n");
    });
}

/// Trailers a plugin adds in its last response-body callback (the response had none) reach
/// the client after the body.
#[test]
fn trailers_a_plugin_adds_at_the_end_of_the_body_reach_the_client() {
    let wasm = wat::parse_str(
        r#"(module
            (import "env" "proxy_add_header_map_value"
                (func $add (param i32 i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (data (i32.const 16) "x-checksum") (data (i32.const 32) "ok")
            (func (export "proxy_abi_version_0_2_1"))
            (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
            (func (export "proxy_on_context_create") (param i32 i32))
            (func (export "proxy_on_response_body") (param i32 i32 i32) (result i32)
                (if (local.get 2) (then
                    (drop (call $add (i32.const 3) (i32.const 16) (i32.const 10) (i32.const 32) (i32.const 2)))))
                (i32.const 0)))"#,
    )
    .expect("wat");
    runtime().block_on(async {
        let chain = FilterChain::builder()
            .slots(1)
            .build(vec![plugin("trailers", &wasm, "")])
            .expect("chain");
        let mut service = FilterLayer::new(chain).layer(Upstream::default());
        let response = service
            .call(request("/", &["hello"]))
            .await
            .expect("exchange");
        let collected = response.into_body().collect().await.expect("body");
        let trailers = collected.trailers().cloned();
        assert_eq!(collected.to_bytes(), "hello");
        assert_eq!(
            trailers.as_ref().and_then(|t| t.get("x-checksum")),
            Some(&http::HeaderValue::from_static("ok")),
            "{trailers:?}"
        );
    });
}
