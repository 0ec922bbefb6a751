//! End to end: `filterbox serve` on 127.0.0.1 in front of a real upstream, with a chain of two
//! Rust-SDK plugins (one adds headers, one denies by rule); the config is reloaded (a bad one
//! refused, a good one taken) while clients keep sending, and no request may fail.

use bytes::Bytes;
use filterbox_conformance::guests;
use filterbox_conformance::servers::free_port;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

mod common;
use common::*;

/// An upstream that answers `saw x-added=<value>` and counts the requests it got, and in
/// `uploads` the uploads (`/upload`) it read whole.
async fn upstream(hits: Arc<AtomicUsize>, uploads: Arc<AtomicUsize>) -> SocketAddr {
    http1_upstream(move |request: http::Request<Incoming>| {
        hits.fetch_add(1, Ordering::SeqCst);
        let added = x_added(&request);
        let upload = request.uri().path() == "/upload";
        let uploads = uploads.clone();
        async move {
            // An upload is read whole before the answer.
            if upload && request.into_body().collect().await.is_ok() {
                uploads.fetch_add(1, Ordering::SeqCst);
            }
            format!("saw x-added={added}")
        }
    })
    .await
}

fn write_config(
    dir: &Path,
    listen: SocketAddr,
    admin: SocketAddr,
    upstream: SocketAddr,
    add: &str,
) {
    let config = format!(
        r#"listeners: [{{ address: "{listen}", upstream: backend }}]
upstreams: {{ backend: "http://{upstream}" }}
admin: {{ address: "{admin}" }}
slots: 2
body_idle_timeout_ms: 500
plugins:
  - name: add-headers
    configuration: "{add}\nresponse-add x-filtered yes"
    failure_policy: FAIL_RELOAD
    vm_config: {{ code: {{ local: {{ filename: headers.wasm }} }} }}
  - name: deny
    configuration: /admin
    vm_config: {{ vm_id: deny, code: {{ local: {{ filename: deny.wasm }} }} }}
  - name: second-headers
    configuration: "response-add x-second yes"
    vm_config: {{ code: {{ local: {{ filename: headers.wasm }} }} }}
"#
    );
    // Written whole and renamed, so the proxy never reads half a file.
    let tmp = dir.join("filterbox.yaml.tmp");
    std::fs::write(&tmp, config).expect("write config");
    std::fs::rename(&tmp, dir.join("filterbox.yaml")).expect("rename config");
}

#[test]
fn serve_filters_through_two_plugins_and_reloads_under_load_without_failing_a_request() {
    runtime().block_on(async {
        let dir = test_dir("serve");
        std::fs::write(dir.join("headers.wasm"), guests::HEADERS).expect("headers.wasm");
        std::fs::write(dir.join("deny.wasm"), guests::DENY).expect("deny.wasm");
        let hits = Arc::new(AtomicUsize::new(0));
        let uploads = Arc::new(AtomicUsize::new(0));
        let upstream = upstream(hits.clone(), uploads.clone()).await;
        let (listen, admin) = (free_port(), free_port());
        write_config(&dir, listen, admin, upstream, "add x-added one");
        let mut proxy = start_serve(&dir);
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();

        let started = Instant::now();
        while get(&client, format!("http://{admin}/ready"), None)
            .await
            .is_err()
        {
            proxy.assert_running();
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "serve never became ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Through both plugins to the upstream and back.
        let (status, headers, body) = get(&client, format!("http://{listen}/hello"), None)
            .await
            .expect("hello");
        assert_eq!(status, 200);
        assert_eq!(body, "saw x-added=one");
        assert_eq!(headers["x-filtered"], "yes");
        // A second plugin of the same file (on its compiled module) with its own config.
        assert_eq!(headers["x-second"], "yes");
        assert_eq!(hits.load(Ordering::SeqCst), 1);

        // The same over HTTP/2 (prior knowledge).
        let h2: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        let (status, _, body) = get(&h2, format!("http://{listen}/h2"), None)
            .await
            .expect("h2");
        assert_eq!((status, body.as_str()), (200, "saw x-added=one"));
        assert_eq!(hits.load(Ordering::SeqCst), 2);

        // Requests serve does not forward: two Host headers (400), CONNECT (405).
        for (request, wanted) in [
            (
                "GET /two HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                "HTTP/1.1 400",
            ),
            (
                "CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n",
                "HTTP/1.1 405",
            ),
        ] {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut socket = tokio::net::TcpStream::connect(listen)
                .await
                .expect("connect");
            socket.write_all(request.as_bytes()).await.expect("send");
            let mut answer = vec![0u8; 256];
            let n = socket.read(&mut answer).await.expect("answer");
            let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
            assert!(answer.starts_with(wanted), "{request:?}: {answer}");
        }
        assert_eq!(
            hits.load(Ordering::SeqCst),
            2,
            "a refused request reached the upstream"
        );

        // Denied by rule (path prefix, then header): answered by the plugin, never forwarded.
        for (path, header) in [("/admin/users", None), ("/fine", Some(("x-deny", "1")))] {
            let (status, headers, body) = get(&client, format!("http://{listen}{path}"), header)
                .await
                .expect("deny");
            assert_eq!(status, 403, "{path}");
            assert_eq!(headers["x-denied-by"], "filterbox-guest");
            assert_eq!(body, "denied by policy\n");
        }
        assert_eq!(
            hits.load(Ordering::SeqCst),
            2,
            "a denied request reached the upstream"
        );

        // Load: 4 clients while the config changes under them. Each runs until it has sent
        // 150 requests and seen the new chain answer 20, so the reload lands in the middle of
        // its load however slow the machine.
        let mut clients = Vec::new();
        for worker in 0..4 {
            let client = client.clone();
            clients.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                let started = Instant::now();
                let new_chain =
                    |seen: &[String]| seen.iter().filter(|b| *b == "saw x-added=two").count();
                while seen.len() < 150 || new_chain(&seen) < 20 {
                    if started.elapsed() > Duration::from_secs(120) {
                        return Err("the good config did not take over under load".to_owned());
                    }
                    let url = format!("http://{listen}/load/{worker}/{}", seen.len());
                    match get(&client, url, None).await {
                        Ok((200, _, body)) => seen.push(body),
                        Ok((status, _, body)) => return Err(format!("status {status}: {body}")),
                        Err(error) => return Err(error),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Ok(seen)
            }));
        }
        let hang_up = || {
            let status = Command::new("kill")
                .args(["-HUP", &proxy.0.id().to_string()])
                .status()
                .expect("run kill");
            assert!(status.success(), "kill -HUP failed: {status}");
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        // A config whose plugin refuses its configuration: refused, the old chain serves on.
        write_config(&dir, listen, admin, upstream, "frobnicate");
        hang_up();
        tokio::time::sleep(Duration::from_millis(700)).await;
        write_config(&dir, listen, admin, upstream, "add x-added two");
        hang_up();

        for client in clients {
            let seen = match client.await.expect("client task") {
                Ok(seen) => seen,
                Err(error) => panic!("a request failed during reload: {error}"),
            };
            assert!(
                seen.iter()
                    .all(|b| b == "saw x-added=one" || b == "saw x-added=two"),
                "a request saw neither chain"
            );
            // The reload happened while this client's requests were running.
            assert!(
                seen.first().is_some_and(|b| b == "saw x-added=one"),
                "the load started after the reload"
            );
        }

        // Once reloaded, new requests take the new chain.
        let started = Instant::now();
        loop {
            let (_, _, body) = get(&client, format!("http://{listen}/after"), None)
                .await
                .expect("after");
            if body == "saw x-added=two" {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the good config never took over"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (_, _, stats) = get(&client, format!("http://{admin}/stats"), None)
            .await
            .expect("stats");
        assert!(
            stat(&stats, "filterbox_serve_reloads_total") >= 1,
            "{stats}"
        );
        assert!(
            stat(&stats, "filterbox_serve_reloads_refused_total") >= 1,
            "{stats}"
        );
        assert!(
            stats.contains("filterbox_vms_active{plugin=\"deny\"}"),
            "{stats}"
        );
        // An upload that stalls (10 of 100 bytes sent) ends after the body idle timeout
        // (500 ms here) with a 408 instead of holding the connection and what the plugins
        // buffered; a malformed chunked body is the client's error (400). Neither reaches the
        // upstream whole.
        for (request, wanted) in [
            (
                "POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789",
                "HTTP/1.1 408",
            ),
            (
                "POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
                 5\r\nhello\r\nZZ\r\n",
                "HTTP/1.1 400",
            ),
        ] {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut socket = tokio::net::TcpStream::connect(listen)
                .await
                .expect("connect");
            socket.write_all(request.as_bytes()).await.expect("send");
            let mut answer = vec![0u8; 256];
            let read = tokio::time::timeout(Duration::from_secs(20), socket.read(&mut answer))
                .await
                .expect("a broken upload is still open after 20 s");
            let answer = String::from_utf8_lossy(&answer[..read.unwrap_or(0)]).into_owned();
            assert!(answer.starts_with(wanted), "{request:?}: {answer}");
        }
        assert_eq!(
            uploads.load(Ordering::SeqCst),
            0,
            "a broken upload reached the upstream whole"
        );

        // SIGTERM ends it cleanly.
        let mut proxy = proxy;
        let _ = Command::new("kill")
            .args(["-TERM", &proxy.0.id().to_string()])
            .status();
        let started = Instant::now();
        let status = loop {
            if let Some(status) = proxy.0.try_wait().expect("wait") {
                break status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "serve ignored SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(status.success(), "serve exited with {status}");
    });
}

#[test]
fn serve_runs_service_plugins_beside_the_chain() {
    runtime().block_on(async {
        let dir = test_dir("serve-service");
        std::fs::write(dir.join("headers.wasm"), guests::HEADERS).expect("headers.wasm");
        std::fs::write(dir.join("parity.wasm"), guests::PARITY).expect("parity.wasm");
        let hits = Arc::new(AtomicUsize::new(0));
        let upstream = upstream(hits.clone(), Arc::default()).await;
        let (listen, admin) = (free_port(), free_port());
        // The service ticks and counts in shared data; the filter plugin (same vm_id) copies
        // the count into the header the upstream echoes. The service is given no request.
        let config = format!(
            r#"listeners: [{{ address: "{listen}", upstream: backend }}]
upstreams: {{ backend: "http://{upstream}" }}
admin: {{ address: "{admin}" }}
slots: 1
services:
  - name: ticker
    configuration: service
    vm_config: {{ vm_id: together, code: {{ local: {{ filename: parity.wasm }} }} }}
plugins:
  - name: reader
    configuration: copy-shared x-added service-ticks
    vm_config: {{ vm_id: together, code: {{ local: {{ filename: headers.wasm }} }} }}
"#
        );
        std::fs::write(dir.join("filterbox.yaml"), config).expect("config");
        let mut proxy = start_serve(&dir);
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let started = Instant::now();
        let mut counts = Vec::new();
        // Two different counts: the service's ticks go on with no requests of their own.
        while counts.len() < 2 {
            proxy.assert_running();
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the service's ticks never showed: {counts:?}"
            );
            if let Ok((200, _, body)) = get(&client, format!("http://{listen}/"), None).await
                && let Some(count) = body.strip_prefix("saw x-added=")
                && count.parse::<u64>().is_ok()
                && !counts.contains(&count.to_owned())
            {
                counts.push(count.to_owned());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (_, _, stats) = get(&client, format!("http://{admin}/stats"), None)
            .await
            .expect("stats");
        assert!(
            stats.contains("filterbox_vms_active{plugin=\"ticker\"} 1"),
            "{stats}"
        );
        assert!(
            stats.contains("plugin=\"ticker\",callback=\"proxy_on_tick\""),
            "{stats}"
        );
        assert!(
            !stats.contains("plugin=\"ticker\",callback=\"proxy_on_request_headers\""),
            "the service was given requests: {stats}"
        );
    });
}

#[test]
fn serve_routes_by_host_and_path_with_per_route_configuration_in_one_vm_per_slot() {
    runtime().block_on(async {
        let dir = test_dir("serve-routes");
        std::fs::write(dir.join("headers.wasm"), guests::HEADERS).expect("headers.wasm");
        std::fs::write(dir.join("deny.wasm"), guests::DENY).expect("deny.wasm");
        let other_hits = Arc::new(AtomicUsize::new(0));
        let main = upstream(Arc::default(), Arc::default()).await;
        let other = upstream(other_hits.clone(), Arc::default()).await;
        let (listen, admin) = (free_port(), free_port());
        // 100 routes, each with its own configuration of the headers plugin; one route to
        // another upstream without the deny plugin.
        let mut routes = String::from("routes:\n");
        routes.push_str(
            "  - { name: open, match: { host: open.test }, upstream: other, plugins: [add] }\n",
        );
        for i in 0..100 {
            routes.push_str(&format!(
                "  - {{ match: {{ path_prefix: /r{i}/ }}, configuration: {{ add: \"add x-added r{i}\" }} }}\n"
            ));
        }
        let config = format!(
            r#"listeners: [{{ address: "{listen}", upstream: main }}]
upstreams: {{ main: "http://{main}", other: "http://{other}" }}
admin: {{ address: "{admin}" }}
slots: 2
plugins:
  - name: add
    configuration: add x-added base
    vm_config: {{ code: {{ local: {{ filename: headers.wasm }} }} }}
  - name: deny
    configuration: /admin
    vm_config: {{ code: {{ local: {{ filename: deny.wasm }} }} }}
{routes}"#
        );
        std::fs::write(dir.join("filterbox.yaml"), config).expect("config");
        let mut proxy = start_serve(&dir);
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let base = format!("http://{listen}");
        let started = Instant::now();
        while get(&client, format!("{base}/"), None).await.is_err() {
            proxy.assert_running();
            assert!(started.elapsed() < Duration::from_secs(120), "serve never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for (path, host, expected) in [
            ("/", None, "saw x-added=base"),
            ("/r0/x", None, "saw x-added=r0"),
            ("/r42/x", None, "saw x-added=r42"),
            ("/r99/", Some("a.test"), "saw x-added=r99"),
            ("/r100/", None, "saw x-added=base"),
        ] {
            let header = host.map(|h| ("host", h));
            let (status, _, body) = get(&client, format!("{base}{path}"), header)
                .await
                .expect("routed request");
            assert_eq!((status, body.as_str()), (200, expected), "{path}");
        }
        // The deny plugin runs on the routes that do not leave it out.
        let (status, _, _) = get(&client, format!("{base}/r3/admin"), None).await.expect("r3");
        assert_eq!(status, 200, "/r3/admin is not under /admin");
        let (status, _, _) = get(&client, format!("{base}/admin"), None).await.expect("deny");
        assert_eq!(status, 403);
        let other_before = other_hits.load(Ordering::SeqCst);
        let (status, _, body) = get(&client, format!("{base}/admin"), Some(("host", "open.test")))
            .await
            .expect("open route");
        assert_eq!((status, body.as_str()), (200, "saw x-added=base"));
        assert_eq!(other_hits.load(Ordering::SeqCst), other_before + 1);
        // 101 configurations of one plugin: one VM per slot, not one per route.
        let (_, _, stats) = get(&client, format!("http://{admin}/stats"), None)
            .await
            .expect("stats");
        assert!(stats.contains("filterbox_vms_active{plugin=\"add\"} 2"), "{stats}");
        assert!(stats.contains("filterbox_vms_active{plugin=\"deny\"} 2"), "{stats}");
    });
}

#[test]
fn serve_drains_running_requests_on_sigterm_and_takes_no_new_ones() {
    runtime().block_on(async {
        let dir = test_dir("serve-drain");
        std::fs::write(dir.join("headers.wasm"), guests::HEADERS).expect("headers.wasm");
        // An upstream that says when a request arrived and answers it 1 s later.
        let arrived = Arc::new(tokio::sync::Notify::new());
        let arrival = arrived.clone();
        let slow = http1_upstream(move |_| {
            arrival.notify_one();
            async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                "slow answer".to_owned()
            }
        })
        .await;
        let listen = free_port();
        let config = format!(
            r#"listeners: [{{ address: "{listen}", upstream: slow }}]
upstreams: {{ slow: "http://{slow}" }}
slots: 1
drain_timeout_ms: 20000
plugins:
  - name: add
    configuration: add x-added drained
    vm_config: {{ code: {{ local: {{ filename: headers.wasm }} }} }}
"#
        );
        let mut proxy = serve_until_listening(&dir, &config, listen).await;
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let running =
            tokio::spawn(async move { get(&client, format!("http://{listen}/"), None).await });
        // The request is at the upstream when the signal comes.
        arrived.notified().await;
        let pid = proxy.0.id().to_string();
        let killed = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(killed.success());
        let answer = running
            .await
            .expect("task")
            .expect("the running request finished");
        assert_eq!((answer.0, answer.2.as_str()), (200, "slow answer"));
        // The listener is closed: a new connection is refused (or closed unanswered).
        let mut refused = false;
        for _ in 0..100 {
            match tokio::net::TcpStream::connect(listen).await {
                Err(_) => {
                    refused = true;
                    break;
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        assert!(refused, "still accepting after SIGTERM");
        // And the process exits once drained, well before the drain timeout.
        let exited = Instant::now();
        loop {
            if let Some(status) = proxy.0.try_wait().expect("wait") {
                assert!(status.success(), "{status}");
                break;
            }
            assert!(
                exited.elapsed() < Duration::from_secs(15),
                "did not exit after draining"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

#[test]
fn serve_takes_upstream_addresses_in_turn_and_skips_one_that_refuses() {
    runtime().block_on(async {
        let dir = test_dir("serve-pool");
        std::fs::write(dir.join("headers.wasm"), guests::HEADERS).expect("headers.wasm");
        let (a_hits, b_hits) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let a = upstream(a_hits.clone(), Arc::default()).await;
        let b = upstream(b_hits.clone(), Arc::default()).await;
        // Nothing listens here.
        let dead = free_port();
        let listen = free_port();
        let config = format!(
            r#"listeners: [{{ address: "{listen}", upstream: pool }}]
upstreams: {{ pool: ["http://{a}", "http://{dead}", "http://{b}"] }}
slots: 1
plugins:
  - name: add
    configuration: add x-added pooled
    vm_config: {{ code: {{ local: {{ filename: headers.wasm }} }} }}
"#
        );
        let _proxy = serve_until_listening(&dir, &config, listen).await;
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        for i in 0..30 {
            let (status, _, body) = get(&client, format!("http://{listen}/{i}"), None)
                .await
                .expect("request");
            assert_eq!(
                (status, body.as_str()),
                (200, "saw x-added=pooled"),
                "request {i}"
            );
        }
        let (a, b) = (a_hits.load(Ordering::SeqCst), b_hits.load(Ordering::SeqCst));
        assert_eq!(a + b, 30);
        assert!(
            a >= 10 && b >= 10,
            "both live addresses take turns: {a} and {b}"
        );
    });
}

/// An upstream that answers with the `x-` headers it got, one `name=value` per line.
async fn echo_upstream() -> SocketAddr {
    http1_upstream(|request: http::Request<Incoming>| {
        let mut lines: Vec<String> = request
            .headers()
            .iter()
            .filter(|(name, _)| name.as_str().starts_with("x-"))
            .map(|(name, value)| format!("{name}={}", value.to_str().unwrap_or("?")))
            .collect();
        lines.sort();
        async move { lines.join("\n") }
    })
    .await
}

#[test]
fn serve_terminates_tls_with_a_certificate_per_server_name_and_tells_the_plugins() {
    runtime().block_on(async {
        let dir = test_dir("serve-tls");
        std::fs::write(dir.join("headers.wasm"), guests::HEADERS).expect("headers.wasm");
        let mut roots = rustls::RootCertStore::empty();
        for name in ["default.test", "a.test"] {
            let made = rcgen::generate_simple_self_signed(vec![name.to_owned()]).expect("cert");
            std::fs::write(dir.join(format!("{name}.pem")), made.cert.pem()).expect("cert");
            std::fs::write(
                dir.join(format!("{name}.key")),
                made.key_pair.serialize_pem(),
            )
            .expect("key");
            roots.add(made.cert.der().clone()).expect("root");
        }
        let upstream = echo_upstream().await;
        let listen = free_port();
        let rules = "copy-header :scheme x-scheme\\n\
                     copy-property x-sni connection.requested_server_name\\n\
                     copy-property x-source source.address\\n\
                     copy-property x-tls connection.tls_version";
        let config = format!(
            r#"listeners:
  - address: "{listen}"
    upstream: backend
    tls:
      certificates:
        - {{ certificate_chain: default.test.pem, private_key: default.test.key }}
        - {{ certificate_chain: a.test.pem, private_key: a.test.key, server_names: [a.test] }}
upstreams: {{ backend: "http://{upstream}" }}
slots: 1
plugins:
  - name: attributes
    configuration: "{rules}"
    vm_config: {{ code: {{ local: {{ filename: headers.wasm }} }} }}
"#
        );
        let _proxy = serve_until_listening(&dir, &config, listen).await;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocols")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        // Each name gets its own certificate: the client checks the one it is shown.
        for name in ["a.test", "default.test"] {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let tcp = tokio::net::TcpStream::connect(listen)
                .await
                .expect("connect");
            let server = rustls::pki_types::ServerName::try_from(name).expect("name");
            let mut tls = connector
                .connect(server, tcp)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let head = format!("GET / HTTP/1.1\r\nhost: {name}\r\nconnection: close\r\n\r\n");
            tls.write_all(head.as_bytes()).await.expect("request");
            let mut answer = Vec::new();
            let _ = tls.read_to_end(&mut answer).await;
            let text = String::from_utf8_lossy(&answer);
            assert!(text.starts_with("HTTP/1.1 200"), "{name}: {text}");
            assert!(text.contains(&format!("x-sni={name}")), "{name}: {text}");
            assert!(text.contains("x-source=127.0.0.1:"), "{name}: {text}");
            assert!(text.contains("x-tls=TLSv1.3"), "{name}: {text}");
            assert!(text.contains("x-scheme=https"), "{name}: {text}");
        }
    });
}

/// An upstream that answers with the HTTP version it was spoken to in: over TLS with
/// `certificate` (HTTP/2 or HTTP/1.1 by ALPN), or without TLS in HTTP/2 only.
async fn version_upstream(certificate: Option<&rcgen::CertifiedKey>) -> SocketAddr {
    let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = socket.local_addr().expect("addr");
    let acceptor = certificate.map(tls_acceptor);
    tokio::spawn(async move {
        while let Ok((stream, _)) = socket.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let service = service_fn(|request: http::Request<Incoming>| async move {
                    let text = format!("{:?}", request.version());
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(
                        text,
                    ))))
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                match acceptor {
                    Some(acceptor) => {
                        if let Ok(tls) = acceptor.accept(stream).await {
                            let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                        }
                    }
                    None => {
                        let _ = builder
                            .http2_only()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn serve_speaks_tls_and_http2_to_upstreams() {
    runtime().block_on(async {
        let dir = test_dir("serve-upstream-tls");
        std::fs::write(dir.join("headers.wasm"), guests::HEADERS).expect("headers.wasm");
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
        std::fs::write(dir.join("upstream-ca.pem"), made.cert.pem()).expect("ca");
        let secure = version_upstream(Some(&made)).await;
        let h2c = version_upstream(None).await;
        let listen = free_port();
        let config = format!(
            r#"listeners: [{{ address: "{listen}", upstream: secure }}]
upstreams:
  secure: {{ addresses: ["https://localhost:{}"], ca_file: upstream-ca.pem }}
  h2c: {{ addresses: ["http://{h2c}"], http2: true }}
routes:
  - {{ match: {{ path_prefix: /h2c }}, upstream: h2c }}
slots: 1
plugins:
  - name: add
    configuration: add x-added upstream
    vm_config: {{ code: {{ local: {{ filename: headers.wasm }} }} }}
"#,
            secure.port()
        );
        let _proxy = serve_until_listening(&dir, &config, listen).await;
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        // TLS checked against the CA file, HTTP/2 chosen by ALPN.
        let (status, _, body) = get(&client, format!("http://{listen}/tls"), None)
            .await
            .expect("tls upstream");
        assert_eq!((status, body.as_str()), (200, "HTTP/2.0"));
        // HTTP/2 by prior knowledge to a plain upstream that speaks nothing else.
        let (status, _, body) = get(&client, format!("http://{listen}/h2c"), None)
            .await
            .expect("h2c upstream");
        assert_eq!((status, body.as_str()), (200, "HTTP/2.0"));
    });
}

#[test]
fn plugins_call_https_upstreams_through_serve() {
    runtime().block_on(async {
        let dir = test_dir("serve-callout-tls");
        std::fs::write(dir.join("callouts.wasm"), guests::CALLOUTS).expect("callouts.wasm");
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
        std::fs::write(dir.join("backend-ca.pem"), made.cert.pem()).expect("ca");
        let backend = version_upstream(Some(&made)).await;
        let echo = echo_upstream().await;
        let listen = free_port();
        // The plugin calls `backend` for every request and puts the answer in `x-lookup`.
        let config = format!(
            r#"listeners: [{{ address: "{listen}", upstream: echo }}]
upstreams:
  echo: "http://{echo}"
  backend: {{ addresses: ["https://localhost:{}"], ca_file: backend-ca.pem }}
slots: 1
plugins:
  - name: lookup
    vm_config: {{ code: {{ local: {{ filename: callouts.wasm }} }} }}
"#,
            backend.port()
        );
        let _proxy = serve_until_listening(&dir, &config, listen).await;
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let (status, _, body) = get(&client, format!("http://{listen}/"), None)
            .await
            .expect("request");
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("x-lookup=200 HTTP/"), "{body}");
    });
}

/// Sends one keep-alive request on `socket` and reads until the answer ends with `body`.
async fn keep_alive_request(socket: &mut tokio::net::TcpStream, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    socket
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("send");
    let mut answer = Vec::new();
    let mut buffer = vec![0u8; 512];
    while !answer.ends_with(body.as_bytes()) {
        let read = tokio::time::timeout(Duration::from_secs(20), socket.read(&mut buffer))
            .await
            .unwrap_or_else(|_| panic!("no whole answer in 20 s: {answer:?}"))
            .expect("read");
        assert!(read > 0, "closed after {answer:?}");
        answer.extend_from_slice(buffer.get(..read).unwrap_or_default());
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn serve_spreads_connections_over_its_workers_or_serves_them_with_work_stealing() {
    runtime().block_on(async {
        let dir = test_dir("serve-workers");
        std::fs::write(dir.join("headers.wasm"), guests::HEADERS).expect("headers.wasm");
        let upstream = x_added_upstream().await;
        for stealing in [false, true] {
            let (listen, admin) = (free_port(), free_port());
            let config = format!(
                r#"listeners: [{{ address: "{listen}", upstream: backend }}]
upstreams: {{ backend: "http://{upstream}" }}
admin: {{ address: "{admin}" }}
workers: 2
work_stealing: {stealing}
plugins:
  - name: add
    configuration: add x-added worker
    vm_config: {{ code: {{ local: {{ filename: headers.wasm }} }} }}
"#
            );
            let _proxy = serve_until_listening(&dir, &config, listen).await;
            // Four connections kept open, each answered through the plugin.
            let mut open = Vec::new();
            for _ in 0..4 {
                let mut socket = tokio::net::TcpStream::connect(listen)
                    .await
                    .expect("connect");
                let answer = keep_alive_request(&mut socket, "worker").await;
                assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
                open.push(socket);
            }
            // A second request on each goes through the same worker's VMs and client.
            for socket in &mut open {
                let answer = keep_alive_request(socket, "worker").await;
                assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            }
            let client: Client<HttpConnector, Full<Bytes>> =
                Client::builder(TokioExecutor::new()).build_http();
            let (_, _, stats) = get(&client, format!("http://{admin}/stats"), None)
                .await
                .expect("stats");
            let per_worker = |worker: u32| {
                let name = format!("filterbox_serve_worker_connections{{worker=\"{worker}\"}}");
                sample(&stats, &name)
            };
            match stealing {
                // Each new connection went to the worker with the fewest.
                false => assert_eq!(
                    (per_worker(1), per_worker(2)),
                    (Some(2), Some(2)),
                    "{stats}"
                ),
                true => assert_eq!(per_worker(1), None, "{stats}"),
            }
            assert!(
                stat(&stats, "filterbox_serve_requests_total") >= 8,
                "{stats}"
            );
        }
    });
}

#[test]
fn serve_takes_an_address_that_fails_its_health_checks_out_until_it_passes() {
    runtime().block_on(async {
        let dir = test_dir("serve-health");
        std::fs::write(dir.join("headers.wasm"), guests::HEADERS).expect("headers.wasm");
        // `a` is always healthy; `b` answers requests but fails /healthz while `b_sick`.
        let b_sick = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let answer = |name: &'static str, sick: Option<Arc<std::sync::atomic::AtomicBool>>| {
            move |request: http::Request<Incoming>| {
                let probe = request.uri().path() == "/healthz";
                let sick = sick.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
                async move {
                    match (probe, sick) {
                        (true, true) => (503, "sick".to_owned()),
                        _ => (200, name.to_owned()),
                    }
                }
            }
        };
        let a = http1_upstream_with_status(answer("a", None)).await;
        let b = http1_upstream_with_status(answer("b", Some(b_sick.clone()))).await;
        let (listen, admin) = (free_port(), free_port());
        let config = format!(
            r#"listeners: [{{ address: "{listen}", upstream: pool }}]
upstreams:
  pool:
    addresses: ["http://{a}", "http://{b}"]
    health_check: {{ path: /healthz, interval_ms: 50, timeout_ms: 5000, unhealthy_threshold: 2 }}
admin: {{ address: "{admin}" }}
plugins:
  - name: add
    configuration: add x-added health
    vm_config: {{ code: {{ local: {{ filename: headers.wasm }} }} }}
"#
        );
        let _proxy = serve_until_listening(&dir, &config, listen).await;
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let healthy_b = format!(
            "filterbox_serve_upstream_healthy{{upstream=\"pool\",address=\"http://{b}/\"}}"
        );
        let wait_for = |wanted: u64| {
            let (client, name) = (client.clone(), healthy_b.clone());
            async move {
                let started = Instant::now();
                loop {
                    let (_, _, stats) = get(&client, format!("http://{admin}/stats"), None)
                        .await
                        .expect("stats");
                    if sample(&stats, &name) == Some(wanted) {
                        return;
                    }
                    assert!(
                        started.elapsed() < Duration::from_secs(60),
                        "{name} never became {wanted}: {stats}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        let served = |client: Client<HttpConnector, Full<Bytes>>| async move {
            let mut by = std::collections::BTreeMap::<String, usize>::new();
            for i in 0..20 {
                let (status, _, body) = get(&client, format!("http://{listen}/{i}"), None)
                    .await
                    .expect("request");
                assert_eq!(status, 200, "{body}");
                *by.entry(body).or_default() += 1;
            }
            by
        };
        wait_for(0).await;
        // Every request goes to the healthy address while `b` is out.
        let by = served(client.clone()).await;
        assert_eq!(by.get("a"), Some(&20), "{by:?}");
        b_sick.store(false, Ordering::SeqCst);
        wait_for(1).await;
        // Back in: both take turns.
        let by = served(client.clone()).await;
        assert_eq!((by.get("a"), by.get("b")), (Some(&10), Some(&10)), "{by:?}");
    });
}

/// The engines `filterbox engines` says the binary has.
fn built_engines() -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_filterbox"))
        .arg("engines")
        .output()
        .expect("filterbox engines");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(
            |line| match line.split_whitespace().collect::<Vec<_>>()[..] {
                [engine, "built"] => Some(engine.to_owned()),
                _ => None,
            },
        )
        .collect()
}

#[test]
fn serve_runs_plugins_on_every_built_engine_from_its_worker_threads() {
    runtime().block_on(async {
        let dir = test_dir("serve-engines");
        std::fs::write(dir.join("headers.wasm"), guests::HEADERS).expect("headers.wasm");
        std::fs::write(dir.join("deny.wasm"), guests::DENY).expect("deny.wasm");
        let upstream = x_added_upstream().await;
        let engines = built_engines();
        assert!(engines.iter().any(|e| e == "wasmtime"), "{engines:?}");
        for engine in engines {
            let listen = free_port();
            // wasmer's VMs never leave their slot thread: its callbacks are handed over from
            // the workers; the others run inline on them.
            let config = format!(
                r#"listeners: [{{ address: "{listen}", upstream: backend }}]
upstreams: {{ backend: "http://{upstream}" }}
workers: 2
plugins:
  - name: add
    configuration: add x-added {engine}
    vm_config: {{ runtime: {engine}, code: {{ local: {{ filename: headers.wasm }} }} }}
  - name: deny
    configuration: /admin
    vm_config: {{ runtime: {engine}, code: {{ local: {{ filename: deny.wasm }} }} }}
"#
            );
            let _proxy = serve_until_listening(&dir, &config, listen).await;
            // Eight clients at once, on both workers.
            let clients = (0..8).map(|i| {
                let client: Client<HttpConnector, Full<Bytes>> =
                    Client::builder(TokioExecutor::new()).build_http();
                tokio::spawn(async move {
                    let mut answers = Vec::new();
                    for j in 0..10 {
                        let path = match (i + j) % 5 {
                            0 => "/admin",
                            _ => "/ok",
                        };
                        let (status, _, body) =
                            get(&client, format!("http://{listen}{path}"), None)
                                .await
                                .expect("request");
                        answers.push((path, status, body));
                    }
                    answers
                })
            });
            for client in clients.collect::<Vec<_>>() {
                for (path, status, body) in client.await.expect("client") {
                    match path {
                        "/admin" => assert_eq!(status, 403, "{engine}: {body}"),
                        _ => {
                            assert_eq!((status, body.as_str()), (200, engine.as_str()), "{engine}")
                        }
                    }
                }
            }
        }
    });
}
