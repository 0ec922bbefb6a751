//! The exchange core (`FilterChain::exchange`) driven directly, as a proxy of its own would,
//! with SDK-built plugins on every built engine.

use bytes::Bytes;
use filterbox::abi::Callback;
use filterbox::{
    CalloutError, Callouts, EngineKind, FilterChain, GrpcReply, GrpcRequest, GrpcStream, HeaderMap,
    HttpCallReply, HttpCallRequest, Plugin, PluginConfig, Route,
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

#[test]
fn a_route_runs_the_plugins_it_names_in_its_own_order_on_the_chains_vms() {
    for engine in EngineKind::built() {
        let first = plugin("first", guests::HEADERS, "add x-first 1", engine);
        let copy = plugin(
            "copy",
            guests::HEADERS,
            "copy-header x-first x-copied",
            engine,
        );
        let deny = plugin("deny", guests::DENY, "/admin", engine);
        let chain = FilterChain::builder()
            .slots(1)
            .route("reversed", Route::new().order(["copy", "first"]))
            .route("copy-only", Route::new().order(["copy"]))
            .route(
                "skipped",
                Route::new().order(["first", "deny"]).skip("deny"),
            )
            .build(vec![first.clone(), copy.clone(), deny.clone()])
            .unwrap_or_else(|e| panic!("{engine}: {e}"));
        // Every order runs on the chain's one VM per plugin.
        for plugin in [&first, &copy, &deny] {
            assert_eq!(plugin.metrics().vms_created(), 1, "{engine}");
        }
        runtime().block_on(async {
            for (route, first_header, copied, denied) in [
                // Chain order: `copy` sees what `first` added.
                (None, Some("1"), Some("1"), true),
                // `copy` runs before `first` added it.
                (Some("reversed"), Some("1"), Some("missing"), false),
                (Some("copy-only"), None, Some("missing"), false),
                (Some("skipped"), Some("1"), None, false),
            ] {
                for path in ["/", "/admin"] {
                    let mut exchange = match route {
                        Some(name) => chain.exchange_on(chain.route(name).expect("route")),
                        None => chain.exchange(),
                    };
                    let mut request = map(&[(":method", "GET"), (":authority", "a")]);
                    request.add(":path", path);
                    let outcome = exchange.request_headers(request, true).await;
                    exchange.finish();
                    if path == "/admin" {
                        assert_eq!(outcome.is_err(), denied, "{engine} {route:?}");
                        continue;
                    }
                    let headers = outcome.expect("passes");
                    assert_eq!(
                        headers.get_str("x-first"),
                        first_header,
                        "{engine} {route:?}"
                    );
                    assert_eq!(headers.get_str("x-copied"), copied, "{engine} {route:?}");
                }
            }
        });
        // A plugin named twice in one order is refused, naming route and plugin.
        let twice = FilterChain::builder()
            .slots(1)
            .route("twice", Route::new().order(["deny", "deny"]))
            .build(vec![deny.clone()]);
        match twice {
            Err(error @ filterbox::ChainError::PluginTwiceInRoute { .. }) => {
                let message = error.to_string();
                assert!(
                    message.contains("twice") && message.contains("deny"),
                    "{message}"
                );
            }
            other => panic!("{engine}: {other:?}"),
        }
    }
}

#[test]
fn routes_run_their_own_plugin_configurations_in_the_same_vms_and_skip_what_they_skip() {
    for engine in EngineKind::built() {
        let headers = plugin("headers", guests::HEADERS, "add x-route base", engine);
        let deny = plugin("deny", guests::DENY, "/admin", engine);
        let mut builder = FilterChain::builder()
            .slots(1)
            .route("open", Route::new().skip("deny"))
            // The plugin's own configuration: no root context of its own.
            .route(
                "same",
                Route::new().configure("headers", "add x-route base"),
            );
        for i in 0..100 {
            let route = Route::new().configure("headers", format!("add x-route r{i}"));
            builder = builder.route(format!("r{i}"), route);
        }
        // A configuration two routes share is one root context.
        builder = builder.route("again", Route::new().configure("headers", "add x-route r7"));
        let chain = builder
            .build(vec![headers.clone(), deny.clone()])
            .unwrap_or_else(|e| panic!("{engine}: {e}"));
        // One VM per plugin on the one slot, whatever the routes.
        assert_eq!(headers.metrics().vms_created(), 1, "{engine}");
        assert_eq!(deny.metrics().vms_created(), 1, "{engine}");
        // Each of the 100 configurations (and the plugin's own) ran proxy_on_configure once.
        let configured = headers.metrics().callback_calls(Callback::ProxyOnConfigure);
        assert_eq!(configured, 101, "{engine}");
        assert!(chain.route("nowhere").is_none());
        runtime().block_on(async {
            let admin = [(":method", "GET"), (":path", "/admin"), (":authority", "a")];
            for (route, expected, denied) in [
                (None, "base", true),
                (Some("same"), "base", true),
                (Some("r0"), "r0", true),
                (Some("r99"), "r99", true),
                (Some("again"), "r7", true),
                (Some("open"), "base", false),
            ] {
                let mut exchange = match route {
                    Some(name) => chain.exchange_on(chain.route(name).expect("route")),
                    None => chain.exchange(),
                };
                let request = [(":method", "GET"), (":path", "/"), (":authority", "a")];
                let headers = exchange
                    .request_headers(map(&request), true)
                    .await
                    .expect("passes");
                assert_eq!(
                    headers.get_str("x-route"),
                    Some(expected),
                    "{engine} {route:?}"
                );
                exchange.finish();
                let mut exchange = match route {
                    Some(name) => chain.exchange_on(chain.route(name).expect("route")),
                    None => chain.exchange(),
                };
                let outcome = exchange.request_headers(map(&admin), true).await;
                assert_eq!(outcome.is_err(), denied, "{engine} {route:?}");
                exchange.finish();
            }
        });
        // A route that names a plugin the chain lacks is refused.
        let refused = FilterChain::builder()
            .slots(1)
            .route("bad", Route::new().skip("missing"))
            .build(vec![deny.clone()]);
        assert!(
            matches!(refused, Err(filterbox::ChainError::UnknownPlugin { .. })),
            "{engine}"
        );
        // A route configuration the plugin rejects refuses the chain before it serves.
        let rejected = FilterChain::builder()
            .slots(1)
            .route("bad", Route::new().configure("headers", "nonsense"))
            .build(vec![headers.clone()]);
        assert!(
            matches!(rejected, Err(filterbox::ChainError::Start(_))),
            "{engine}"
        );
    }
}

/// `request.*` attributes read after the request headers see the request as the whole chain
/// left it (Envoy's attributes read the request's one live map), in the plugin that rewrote
/// it and in the plugins before it.
#[test]
fn request_attributes_later_in_the_exchange_see_the_whole_chain_s_edits() {
    for engine in EngineKind::built() {
        let chain = one_slot(vec![
            plugin(
                "before",
                guests::HEADERS,
                "response-copy-property x-before-saw request.path",
                engine,
            ),
            plugin(
                "rewrite",
                guests::HEADERS,
                "replace :path /rewritten\nresponse-copy-property x-rewrite-saw request.path",
                engine,
            ),
        ]);
        runtime().block_on(async {
            let mut exchange = chain.exchange();
            let request = [(":method", "GET"), (":path", "/asked"), (":authority", "a")];
            let headers = exchange
                .request_headers(map(&request), true)
                .await
                .expect("request headers pass");
            assert_eq!(headers.get_str(":path"), Some("/rewritten"), "{engine}");
            let headers = exchange
                .response_headers(map(&[(":status", "200")]), true)
                .await
                .expect("response headers pass");
            assert_eq!(
                headers.get_str("x-rewrite-saw"),
                Some("/rewritten"),
                "{engine}"
            );
            assert_eq!(
                headers.get_str("x-before-saw"),
                Some("/rewritten"),
                "{engine}"
            );
            exchange.finish();
        });
    }
}
