//! A Pingora proxy with a plugin chain on 127.0.0.1, in front of a real upstream, driven by
//! an HTTP client: the SDK-built suite plugins on every built engine.

use bytes::Bytes;
use filterbox::{EngineKind, FailurePolicy, FilterChain, Plugin, PluginConfig, Route};
use filterbox_conformance::guests;
use filterbox_conformance::servers::Servers;
use filterbox_pingora::{WasmFilters, WasmProxy};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use pingora::upstreams::peer::HttpPeer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The upstream: answers `200` with `x-upstream: yes`, `x-upstream-host` (the request's
/// `host`) and a body naming the request's method, path, `x-*` headers (sorted) and body.
fn start_upstream() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let addr = listener.local_addr().expect("upstream address");
    std::thread::spawn(move || {
        runtime().block_on(async move {
            listener.set_nonblocking(true).expect("nonblocking");
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let service = service_fn(|request: hyper::Request<Incoming>| async move {
                        let (parts, body) = request.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let mut headers: Vec<String> = parts
                            .headers
                            .iter()
                            .filter(|(name, _)| name.as_str().starts_with("x-"))
                            .map(|(n, v)| format!("{n}={}", v.to_str().unwrap_or("?")))
                            .collect();
                        headers.sort();
                        let text = format!(
                            "{} {} [{}] {}",
                            parts.method,
                            parts.uri,
                            headers.join(","),
                            String::from_utf8_lossy(&body)
                        );
                        let host = parts.headers.get(http::header::HOST).cloned();
                        let response = hyper::Response::builder()
                            .header("x-upstream", "yes")
                            .header(
                                "x-upstream-host",
                                host.unwrap_or_else(|| "none".parse().expect("value")),
                            )
                            .body(Full::new(Bytes::from(text)))
                            .expect("response");
                        Ok::<_, std::convert::Infallible>(response)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        })
    });
    addr
}

/// A Pingora server running `proxy` on a free loopback port, with the listener `listen` adds
/// there (plain TCP, TLS); it runs until the test process ends. Returns once it listens.
fn serve<P>(proxy: P, listen: impl FnOnce(&mut ProxyService<P>, &str)) -> SocketAddr
where
    P: pingora::proxy::ProxyHttp + Send + Sync + 'static,
    P::CTX: Send + Sync,
{
    let addr = filterbox_conformance::servers::free_port();
    let mut server = pingora::server::Server::new(None).expect("pingora server");
    server.bootstrap();
    let mut service = pingora::proxy::http_proxy_service(&server.configuration, proxy);
    listen(&mut service, &addr.to_string());
    server.add_service(service);
    std::thread::spawn(move || server.run_forever());
    let started = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the proxy never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    addr
}

type ProxyService<P> = pingora::services::listening::Service<pingora::proxy::HttpProxy<P>>;

/// [`serve`] with `filters` in front of `upstream` on plain TCP.
fn start_proxy(filters: WasmFilters, upstream: SocketAddr) -> SocketAddr {
    let peer = HttpPeer::new(upstream, false, String::new());
    serve(WasmProxy::new(filters, peer), |service, addr| {
        service.add_tcp(addr)
    })
}

/// A plugin on `engine` with a generous callback deadline (these tests are about the
/// proxy, and wasmer's deadlines count wall-clock time on a busy machine).
fn plugin(name: &str, wasm: &[u8], configuration: &str, engine: EngineKind) -> Plugin {
    let mut config = PluginConfig::named(name)
        .with_configuration(configuration)
        .with_engine(engine);
    config.limits.callback_deadline_ms = Some(1000);
    Plugin::load(config, wasm).unwrap_or_else(|e| panic!("{name} on {engine}: {e}"))
}

struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: String,
}

async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    proxy: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> Answer {
    send_with(client, proxy, method, path, &[], body).await
}

/// [`send`] with request headers.
async fn send_with(
    client: &Client<HttpConnector, Full<Bytes>>,
    proxy: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{proxy}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("request");
    let response = tokio::time::timeout(Duration::from_secs(60), client.request(request))
        .await
        .expect("the proxy answers within a minute")
        .expect("a response");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

#[test]
fn headers_bodies_and_a_local_deny_through_pingora_on_every_engine() {
    let upstream = start_upstream();
    for engine in EngineKind::built() {
        let chain = FilterChain::new(vec![
            plugin(
                "headers",
                guests::HEADERS,
                "add x-added one\nresponse-add x-response two\n\
                 response-copy-property x-upstream-address upstream.address",
                engine,
            ),
            plugin("deny", guests::DENY, "/admin", engine),
            plugin("body", guests::BODY, "foo=>bar", engine),
        ])
        .expect("chain");
        let proxy = start_proxy(WasmFilters::new(chain), upstream);
        runtime().block_on(async {
            let client = client();
            let answer = send(&client, proxy, "POST", "/ok", "a foo b").await;
            assert_eq!(answer.status, 200, "{engine}: {}", answer.body);
            assert_eq!(answer.headers["x-upstream"], "yes", "{engine}");
            assert_eq!(answer.headers["x-response"], "two", "{engine}");
            assert_eq!(
                answer.headers["x-upstream-address"],
                upstream.to_string().as_str(),
                "{engine}: upstream.address"
            );
            // The request went up with the plugins' header and rewritten body; the response
            // body came back rewritten as well ("foo" is gone everywhere).
            assert_eq!(
                answer.body, "POST /ok [x-added=one] a bar b",
                "{engine}: the upstream saw the rewrites"
            );
            let denied = send(&client, proxy, "GET", "/admin/x", "").await;
            assert_eq!(denied.status, 403, "{engine}");
            assert!(denied.body.contains("denied"), "{engine}: {}", denied.body);
            // A local reply goes through the response phase, as in Envoy.
            assert_eq!(denied.headers["x-response"], "two", "{engine}");
            assert!(denied.headers.get("x-upstream").is_none(), "{engine}");
        });
    }
}

/// Plugins that change and remove request headers, and rewrite the path and `:authority`,
/// have the request rewritten (not only added to) on its way up.
#[test]
fn changed_and_removed_request_headers_path_and_authority_reach_the_upstream() {
    let upstream = start_upstream();
    for engine in EngineKind::built() {
        let rules = "remove x-drop\nreplace x-keep changed\nreplace :path /rewritten?q=1\n\
                     replace :authority rewritten.example\nadd x-added one";
        let chain = FilterChain::new(vec![plugin("headers", guests::HEADERS, rules, engine)])
            .expect("chain");
        let proxy = start_proxy(WasmFilters::new(chain), upstream);
        runtime().block_on(async {
            let headers = [("x-drop", "1"), ("x-keep", "2"), ("x-other", "3")];
            let answer = send_with(&client(), proxy, "GET", "/original", &headers, "").await;
            assert_eq!(
                answer.body, "GET /rewritten?q=1 [x-added=one,x-keep=changed,x-other=3] ",
                "{engine}"
            );
            assert_eq!(
                answer.headers["x-upstream-host"], "rewritten.example",
                "{engine}"
            );
        });
    }
}

#[test]
fn a_request_paused_on_an_http_call_resumes_with_its_answer() {
    let servers = Servers::get().expect("servers");
    let upstream = start_upstream();
    for engine in EngineKind::built() {
        let mut config = PluginConfig::named("callouts").with_engine(engine);
        config.limits.callback_deadline_ms = Some(1000);
        let plugin = Plugin::builder(config)
            .callouts(servers.callouts().expect("callouts"))
            .build(guests::CALLOUTS)
            .expect("plugin");
        let chain = FilterChain::new(vec![plugin]).expect("chain");
        let proxy = start_proxy(WasmFilters::new(chain), upstream);
        runtime().block_on(async {
            let client = client();
            for round in 0..3 {
                let answer = send(&client, proxy, "GET", &format!("/r{round}"), "").await;
                assert_eq!(answer.status, 200, "{engine}: {}", answer.body);
                assert!(
                    answer.body.contains("x-lookup=200"),
                    "{engine}: the callout's answer reached the upstream request: {}",
                    answer.body
                );
            }
        });
    }
}

/// A plugin that traps in `proxy_on_request_headers` when the request has `x-boom`.
fn trapping_plugin(policy: FailurePolicy, engine: EngineKind) -> Plugin {
    let wasm = guests::trapping_on_x_boom().expect("wat");
    let config = PluginConfig::named("boom")
        .with_failure_policy(policy)
        .with_engine(engine);
    Plugin::load(config, &wasm).expect("boom")
}

#[test]
fn a_trapping_plugin_gets_its_failure_policy_and_the_next_request_runs_on_a_new_vm() {
    let upstream = start_upstream();
    let policies = [
        FailurePolicy::FailClosed { status: 503 },
        FailurePolicy::FailOpen,
    ];
    for engine in EngineKind::built() {
        for policy in policies {
            let chain = FilterChain::new(vec![
                trapping_plugin(policy, engine),
                plugin("headers", guests::HEADERS, "add x-added one", engine),
            ])
            .expect("chain");
            let proxy = start_proxy(WasmFilters::new(chain), upstream);
            runtime().block_on(async {
                let client = client();
                let answer =
                    send_with(&client, proxy, "GET", "/boom", &[("x-boom", "1")], "").await;
                let (status, body) = (answer.status, answer.body);
                match policy {
                    FailurePolicy::FailClosed { .. } => {
                        assert_eq!(status, 503, "{engine}: {body}");
                        assert!(!body.contains("GET /boom"), "{engine}: went upstream");
                    }
                    _ => {
                        assert_eq!(status, 200, "{engine}: {body}");
                        // The next plugin still ran.
                        assert!(body.contains("x-added=one"), "{engine}: {body}");
                    }
                }
                let fine = send(&client, proxy, "GET", "/fine", "").await;
                assert_eq!(fine.status, 200, "{engine}: the VM was rebuilt");
                assert!(fine.body.contains("x-added=one"), "{engine}: {}", fine.body);
            });
        }
    }
}

#[test]
fn the_chain_is_swapped_under_load_without_a_failed_request() {
    let upstream = start_upstream();
    let engine = EngineKind::Wasmtime;
    let chain = |value: &str| {
        let configuration = format!("add x-version {value}");
        FilterChain::new(vec![plugin(
            "headers",
            guests::HEADERS,
            &configuration,
            engine,
        )])
        .expect("chain")
    };
    let filters = WasmFilters::new(chain("old"));
    let proxy = start_proxy(filters.clone(), upstream);
    runtime().block_on(async {
        let client = Arc::new(client());
        // Four clients send requests until each has seen the new chain 20 times.
        let clients: Vec<_> = (0..4)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move {
                    let (mut old, mut new) = (0, 0);
                    while new < 20 {
                        let answer = send(&client, proxy, "GET", "/", "").await;
                        assert_eq!(answer.status, 200, "{}", answer.body);
                        match answer.body.contains("x-version=new") {
                            true => new += 1,
                            false => {
                                assert!(answer.body.contains("x-version=old"), "{}", answer.body);
                                old += 1;
                            }
                        }
                    }
                    old
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        filters.chain().replace(chain("new"));
        let mut old = 0;
        for client in clients {
            old += client.await.expect("client");
        }
        assert!(
            old > 0,
            "the swap happened before any request: nothing was tested"
        );
    });
}

/// A TLS listener with a certificate made here: the plugins see `:scheme` `https`, the
/// client's address as `source.address` and the TLS version as `connection.tls_version`.
#[test]
fn a_tls_listener_serves_the_chain() {
    let upstream = start_upstream();
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let dir = std::env::temp_dir().join(format!("filterbox-pingora-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, key.cert.pem()).expect("cert file");
    std::fs::write(&key_path, key.key_pair.serialize_pem()).expect("key file");

    let rules = "copy-header :scheme x-scheme\ncopy-property x-source source.address\n\
                 copy-property x-tls connection.tls_version";
    let chain = FilterChain::new(vec![plugin(
        "headers",
        guests::HEADERS,
        rules,
        EngineKind::Wasmtime,
    )])
    .expect("chain");
    let peer = HttpPeer::new(upstream, false, String::new());
    let (cert_file, key_file) = (cert_path.to_string_lossy(), key_path.to_string_lossy());
    let addr = serve(
        WasmProxy::new(WasmFilters::new(chain), peer),
        |service, addr| {
            service
                .add_tls(addr, &cert_file, &key_file)
                .expect("tls listener")
        },
    );

    let mut roots = rustls::RootCertStore::empty();
    roots.add(key.cert.der().clone()).expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let text = runtime().block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let started = Instant::now();
        let tcp = loop {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(tcp) => break tcp,
                Err(e) => {
                    assert!(
                        started.elapsed() < Duration::from_secs(30),
                        "never listened: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let mut tls = connector.connect(name, tcp).await.expect("handshake");
        tls.write_all(b"GET /tls HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            .await
            .expect("request");
        let mut answer = Vec::new();
        // The proxy may close without a TLS close_notify; what was read counts.
        let _ = tls.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer).into_owned()
    });
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("x-scheme=https"), "{text}");
    assert!(text.contains("x-source=127.0.0.1:"), "{text}");
    assert!(text.contains("x-tls=TLSv1."), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `ProxyHttp` of its own that picks a chain per route (path prefix `/api` or the rest)
/// in `request_filter`, with `WasmFilters`' helpers for the phases; or, with `one_chain`, the
/// chain route `api` of one chain.
struct Routed {
    api: WasmFilters,
    rest: WasmFilters,
    one_chain: Option<WasmFilters>,
    peer: HttpPeer,
}

#[async_trait::async_trait]
impl pingora::proxy::ProxyHttp for Routed {
    type CTX = Option<filterbox_pingora::WasmCtx>;

    fn new_ctx(&self) -> Self::CTX {
        None
    }

    async fn upstream_peer(
        &self,
        _session: &mut pingora::proxy::Session,
        _ctx: &mut Self::CTX,
    ) -> pingora::Result<Box<HttpPeer>> {
        Ok(Box::new(self.peer.clone()))
    }

    async fn request_filter(
        &self,
        session: &mut pingora::proxy::Session,
        ctx: &mut Self::CTX,
    ) -> pingora::Result<bool> {
        let api = session.req_header().uri.path().starts_with("/api");
        let (filters, wasm) = match (&self.one_chain, api) {
            (Some(one), true) => (one, one.new_ctx_on("api")),
            (Some(one), false) => (one, one.new_ctx()),
            (None, true) => (&self.api, self.api.new_ctx()),
            (None, false) => (&self.rest, self.rest.new_ctx()),
        };
        let wasm = ctx.insert(wasm);
        filters.request_filter(session, wasm).await
    }

    async fn response_filter(
        &self,
        session: &mut pingora::proxy::Session,
        response: &mut pingora::http::ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> pingora::Result<()> {
        match ctx {
            Some(wasm) => self.rest.response_filter(session, response, wasm).await,
            None => Ok(()),
        }
    }

    fn response_body_filter(
        &self,
        session: &mut pingora::proxy::Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> pingora::Result<Option<Duration>> {
        match ctx {
            Some(wasm) => self
                .rest
                .response_body_filter(session, body, end_of_stream, wasm),
            None => Ok(None),
        }
    }

    async fn logging(
        &self,
        session: &mut pingora::proxy::Session,
        error: Option<&pingora::Error>,
        ctx: &mut Self::CTX,
    ) {
        if let Some(wasm) = ctx {
            self.rest.logging(session, error, wasm).await;
        }
    }
}

#[test]
fn a_proxy_of_its_own_runs_a_chain_per_route() {
    let (api, rest) = (
        "add x-route api\nresponse-add x-chain api",
        "add x-route rest\nresponse-add x-chain rest",
    );
    let chain = |rules: &str| {
        let plugin = plugin("headers", guests::HEADERS, rules, EngineKind::Wasmtime);
        FilterChain::new(vec![plugin]).expect("chain")
    };
    // Two chains, one per route.
    routed_requests(
        WasmFilters::new(chain(api)),
        WasmFilters::new(chain(rest)),
        None,
    );
    // One chain whose route `api` configures the plugin its own way, in the same VMs.
    let plugin = plugin("headers", guests::HEADERS, rest, EngineKind::Wasmtime);
    let one = FilterChain::builder()
        .route("api", Route::new().configure("headers", api))
        .build(vec![plugin])
        .expect("chain with routes");
    routed_requests(
        WasmFilters::new(chain(api)),
        WasmFilters::new(chain(rest)),
        Some(WasmFilters::new(one)),
    );
}

/// Requests to `/api…` and elsewhere through a [`Routed`] proxy, each answered by its route.
fn routed_requests(api: WasmFilters, rest: WasmFilters, one_chain: Option<WasmFilters>) {
    let upstream = start_upstream();
    let routed = Routed {
        api,
        rest,
        one_chain,
        peer: HttpPeer::new(upstream, false, String::new()),
    };
    let proxy = serve(routed, |service, addr| service.add_tcp(addr));
    runtime().block_on(async {
        let client = client();
        let started = Instant::now();
        while tokio::net::TcpStream::connect(proxy).await.is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "never listened"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for (path, route) in [
            ("/api/users", "api"),
            ("/index.html", "rest"),
            ("/api", "api"),
        ] {
            let answer = send(&client, proxy, "GET", path, "").await;
            assert_eq!(answer.status, 200, "{path}: {}", answer.body);
            assert!(
                answer.body.contains(&format!("x-route={route}")),
                "{path}: {}",
                answer.body
            );
            // The response phase ran on the route's own chain too.
            assert_eq!(answer.headers["x-chain"], route, "{path}");
        }
    });
}
