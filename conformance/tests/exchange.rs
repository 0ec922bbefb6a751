//! The exchange core (`FilterChain::exchange`) driven directly, as a proxy of its own would,
//! with SDK-built plugins on every built engine.

use bytes::Bytes;
use filterbox::{
    CalloutError, Callouts, EngineKind, FilterChain, GrpcReply, GrpcRequest, GrpcStream, HeaderMap,
    HttpCallReply, HttpCallRequest, Plugin, PluginConfig,
};
use filterbox_conformance::guests;
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A plugin on `engine`. These tests are about the exchange protocol, not deadlines: its
/// callbacks get a second, since wasmer's deadlines count wall-clock time and the parallel
/// tests' compiles can keep a slot thread off the CPU past the default 10 ms.
fn plugin(name: &str, wasm: &[u8], configuration: &str, engine: EngineKind) -> Plugin {
    let mut config = PluginConfig::named(name)
        .with_configuration(configuration)
        .with_engine(engine);
    config.limits.callback_deadline_ms = Some(1000);
    Plugin::load(config, wasm).unwrap_or_else(|e| panic!("{name} on {engine}: {e}"))
}

/// A chain of `plugins` on one slot.
fn one_slot(plugins: Vec<Plugin>) -> FilterChain {
    FilterChain::builder()
        .slots(1)
        .build(plugins)
        .expect("chain")
}

fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    pairs.iter().copied().collect()
}

#[test]
fn an_exchange_runs_the_phases_in_chain_order_and_answers_locally_through_the_response_phase() {
    for engine in EngineKind::built() {
        let chain = one_slot(vec![
            plugin(
                "headers",
                guests::HEADERS,
                "add x-added one\nresponse-add x-response two",
                engine,
            ),
            plugin("deny", guests::DENY, "/admin", engine),
            plugin("body", guests::BODY, "foo=>bar", engine),
        ]);
        runtime().block_on(async {
            let mut exchange = chain.exchange();
            let request = [(":method", "POST"), (":path", "/ok"), (":authority", "a")];
            let headers = exchange
                .request_headers(map(&request), false)
                .await
                .expect("request headers pass");
            assert_eq!(headers.get_str("x-added"), Some("one"), "{engine}");
            // "foo" split across chunks: the body plugin holds the body and rewrites it whole.
            let mut body = Vec::new();
            for (chunk, end) in [("a fo", false), ("o b", false), ("foo", true)] {
                let passed = exchange
                    .request_body(Bytes::from(chunk), end)
                    .await
                    .expect("body passes");
                body.extend_from_slice(&passed);
            }
            assert_eq!(body, b"a bar bbar", "{engine}");
            let headers = exchange
                .response_headers(map(&[(":status", "200")]), true)
                .await
                .expect("response headers pass");
            assert_eq!(headers.get_str("x-response"), Some("two"), "{engine}");
            exchange.finish();

            let mut exchange = chain.exchange();
            let request = [
                (":method", "GET"),
                (":path", "/admin/x"),
                (":authority", "a"),
            ];
            let local = exchange
                .request_headers(map(&request), true)
                .await
                .expect_err("denied");
            let reply = exchange.reply(local).await;
            assert_eq!(reply.status, 403, "{engine}");
            assert_eq!(reply.body, "denied by policy\n", "{engine}");
            // The headers plugin, before the deny plugin, ran its response phase on it.
            assert_eq!(reply.headers.get_str("x-response"), Some("two"), "{engine}");
            assert_eq!(reply.headers.get_str(":status"), Some("403"), "{engine}");
        });
    }
}

#[test]
fn properties_set_on_an_exchange_reach_the_plugins_and_trailers_release_held_bodies() {
    for engine in EngineKind::built() {
        let chain = one_slot(vec![
            plugin(
                "headers",
                guests::HEADERS,
                "copy-property x-source source.address",
                engine,
            ),
            plugin("body", guests::BODY, "foo=>bar", engine),
        ]);
        runtime().block_on(async {
            let mut exchange = chain.exchange();
            exchange
                .set_property(&["source", "address"], Bytes::from_static(b"10.0.0.1:4321"))
                .await
                .expect("property set");
            let request = [(":method", "POST"), (":path", "/"), (":authority", "a")];
            let headers = exchange
                .request_headers(map(&request), false)
                .await
                .expect("request headers pass");
            assert_eq!(
                headers.get_str("x-source"),
                Some("10.0.0.1:4321"),
                "{engine}"
            );
            // The body plugin holds the body until its end, which the trailers mark here.
            let passed = exchange
                .request_body(Bytes::from_static(b"a foo"), false)
                .await
                .expect("body");
            assert!(passed.is_empty(), "{engine}: held, not passed");
            let (released, trailers) = exchange
                .request_trailers(map(&[("x-checksum", "1")]))
                .await
                .expect("trailers pass");
            assert_eq!(
                released, "a foo",
                "{engine}: released as held once the trailers went"
            );
            assert_eq!(trailers.get_str("x-checksum"), Some("1"), "{engine}");
            exchange.finish_and_wait().await;
        });
    }
}

/// HTTP calls that are never answered, and no gRPC (which the Rust SDK answers with a panic
/// when it hears `Unimplemented`: the callouts guest's first tick then traps).
struct Unanswered(Mutex<Vec<HttpCallReply>>);

impl Callouts for Unanswered {
    fn http_call(&self, _: HttpCallRequest, reply: HttpCallReply) -> Result<(), CalloutError> {
        self.0.lock().push(reply);
        Ok(())
    }

    fn grpc_open(&self, _: GrpcRequest, _: GrpcReply) -> Result<Box<dyn GrpcStream>, CalloutError> {
        Err(CalloutError::Unsupported)
    }
}

/// The VM dies while an exchange waits on it (here its tick traps): the exchange gets the
/// plugin's failure policy at once, not after the pause timeout.
#[test]
fn a_paused_exchange_gets_the_failure_policy_as_soon_as_its_vm_fails() {
    for engine in EngineKind::built() {
        let config = PluginConfig::named("callouts").with_engine(engine);
        let plugin = Plugin::builder(config)
            .callouts(Arc::new(Unanswered(Mutex::new(Vec::new()))))
            .build(guests::CALLOUTS)
            .expect("plugin");
        let pause_timeout = Duration::from_secs(120);
        let chain = FilterChain::builder()
            .slots(1)
            .pause_timeout(pause_timeout)
            .build(vec![plugin])
            .expect("chain");
        let started = Instant::now();
        let local = runtime().block_on(async {
            let mut exchange = chain.exchange();
            let request = [(":method", "GET"), (":path", "/"), (":authority", "a")];
            exchange
                .request_headers(map(&request), true)
                .await
                .expect_err("the plugin's VM fails")
        });
        assert_eq!(local.status_code, 503, "{engine}: {local:?}");
        assert_eq!(local.details, "filterbox_plugin_failed", "{engine}");
        // Far below the pause timeout, however busy the machine.
        assert!(started.elapsed() < pause_timeout / 2, "{engine}");
    }
}
