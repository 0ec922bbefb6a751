//! Plugin code from an `https://` URL (Envoy's `vm_config.code.remote`): fetched over TLS
//! checked against a certificate made at test time, its pinned SHA-256 checked, kept in the
//! module store and started from there without the network; a wrong digest or a missing
//! module refuses the config with an error that says which and where.

use bytes::Bytes;
use filterbox_conformance::guests;
use filterbox_conformance::servers::free_port;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::net::TcpListener;

mod common;
use common::*;

/// An HTTPS server for `localhost` with `made`'s certificate: `/headers.wasm` is the suite's
/// header plugin, anything else 404; `hits` counts the module's downloads.
async fn code_server(made: &rcgen::CertifiedKey, hits: Arc<AtomicUsize>) -> SocketAddr {
    let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = socket.local_addr().expect("addr");
    let acceptor = tls_acceptor(made);
    tokio::spawn(async move {
        while let Ok((stream, _)) = socket.accept().await {
            let (acceptor, hits) = (acceptor.clone(), hits.clone());
            tokio::spawn(async move {
                let service = service_fn(move |request: http::Request<Incoming>| {
                    let hits = hits.clone();
                    async move {
                        let mut response = http::Response::new(Full::new(Bytes::new()));
                        if request.uri().path() == "/headers.wasm" {
                            hits.fetch_add(1, Ordering::SeqCst);
                            *response.body_mut() = Full::new(Bytes::from_static(guests::HEADERS));
                        } else {
                            *response.status_mut() = http::StatusCode::NOT_FOUND;
                        }
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                if let Ok(tls) = acceptor.accept(stream).await {
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                }
            });
        }
    });
    addr
}

fn config(listen: SocketAddr, echo: SocketAddr, code: SocketAddr, path: &str, sha: &str) -> String {
    format!(
        r#"listeners: [{{ address: "{listen}", upstream: echo }}]
upstreams:
  echo: "http://{echo}"
  code: {{ addresses: ["https://localhost:{port}"], ca_file: code-ca.pem }}
module_store: store
slots: 1
plugins:
  - name: add
    configuration: add x-added remote
    vm_config:
      code:
        remote:
          http_uri: {{ uri: "https://localhost:{port}{path}", cluster: code, timeout: 5s }}
          sha256: "{sha}"
"#,
        port = code.port()
    )
}

#[test]
fn serve_fetches_pinned_code_over_https_and_starts_from_its_store() {
    runtime().block_on(async {
        let dir = test_dir("remote-code");
        let _ = std::fs::remove_dir_all(dir.join("store"));
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
        std::fs::write(dir.join("code-ca.pem"), made.cert.pem()).expect("ca");
        let hits = Arc::new(AtomicUsize::new(0));
        let code = code_server(&made, hits.clone()).await;
        let echo = x_added_upstream().await;
        let sha = filterbox::Sha256::of(guests::HEADERS).to_string();
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();

        // Fetched over TLS (the CA file of upstream `code`), digest checked, and run; then,
        // the module being in the store under its digest, a second start does not fetch it,
        // even from a URL that has nothing.
        for path in ["/headers.wasm", "/gone.wasm"] {
            let listen = free_port();
            let config = config(listen, echo, code, path, &sha);
            let _proxy = serve_until_listening(&dir, &config, listen).await;
            let (status, _, body) = get(&client, format!("http://{listen}/"), None)
                .await
                .expect("request");
            assert_eq!((status, body.as_str()), (200, "remote"), "{path}");
            assert_eq!(hits.load(Ordering::SeqCst), 1, "{path}: fetched once");
        }

        // A digest the module does not have: refused, saying so.
        let wrong = filterbox::Sha256::of(b"another module").to_string();
        let text = refused(
            &dir,
            &config(free_port(), echo, code, "/headers.wasm", &wrong),
        );
        assert!(text.contains("refused") && text.contains(&wrong), "{text}");
        // Not found at the URL (and not in the store): the status and the URL are named.
        let text = refused(&dir, &config(free_port(), echo, code, "/gone.wasm", &wrong));
        assert!(
            text.contains("404") && text.contains("/gone.wasm"),
            "{text}"
        );
    });
}
