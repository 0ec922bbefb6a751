//! What the `serve` end-to-end tests share: the proxy process, an upstream, a client call.
#![allow(dead_code)] // each test file uses its own part

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// The proxy process, killed when the test ends however it ends.
pub struct Proxy(pub Child);

impl Proxy {
    /// Panics if `serve` has exited (it could not start): waiting for it would be in vain.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.0.try_wait() {
            panic!("filterbox serve exited: {status} (its stderr is above)");
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An HTTP/1.1 upstream on a free loopback port that answers each request with `answer`'s
/// body.
pub async fn http1_upstream<F, Fut>(answer: F) -> SocketAddr
where
    F: Fn(http::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = String> + Send + 'static,
{
    http1_upstream_with_status(move |request| {
        let body = answer(request);
        async move { (200, body.await) }
    })
    .await
}

/// [`http1_upstream`] whose `answer` gives the status too.
pub async fn http1_upstream_with_status<F, Fut>(answer: F) -> SocketAddr
where
    F: Fn(http::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = (u16, String)> + Send + 'static,
{
    let socket = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = socket.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = socket.accept().await else {
                continue;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: http::Request<Incoming>| {
                    let body = answer(request);
                    async move {
                        let (status, body) = body.await;
                        let mut response = http::Response::new(Full::new(Bytes::from(body)));
                        *response.status_mut() =
                            http::StatusCode::from_u16(status).expect("a status code");
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

pub async fn get(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: String,
    header: Option<(&str, &str)>,
) -> Result<(u16, http::HeaderMap, String), String> {
    let mut request = http::Request::get(&url);
    if let Some((name, value)) = header {
        request = request.header(name, value);
    }
    let request = request
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let response = client
        .request(request)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((
        parts.status.as_u16(),
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

/// The command for `filterbox serve` on the `filterbox.yaml` in `dir`, its output dropped.
fn serve_command(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_filterbox"));
    command
        .args(["serve", "--config"])
        .arg(dir.join("filterbox.yaml"))
        .stdout(Stdio::null());
    command
}

/// `filterbox serve` on the `filterbox.yaml` in `dir`.
pub fn start_serve(dir: &Path) -> Proxy {
    let child = serve_command(dir)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start filterbox serve");
    Proxy(child)
}

/// `filterbox serve` on `config` (written to `dir`), once it accepts connections on `listen`.
pub async fn serve_until_listening(dir: &Path, config: &str, listen: SocketAddr) -> Proxy {
    std::fs::write(dir.join("filterbox.yaml"), config).expect("config");
    let mut proxy = start_serve(dir);
    let started = Instant::now();
    while tokio::net::TcpStream::connect(listen).await.is_err() {
        proxy.assert_running();
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A fresh directory for one test's config and plugin files.
pub fn test_dir(name: &str) -> PathBuf {
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}

pub fn stat(stats: &str, name: &str) -> u64 {
    sample(stats, name).unwrap_or(0)
}

/// The value of sample `name` (with its labels, if any) in Prometheus text, if it is there.
pub fn sample(stats: &str, name: &str) -> Option<u64> {
    stats
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

/// TLS with `made` as the server's certificate, HTTP/2 or HTTP/1.1 by ALPN.
pub fn tls_acceptor(made: &rcgen::CertifiedKey) -> tokio_rustls::TlsAcceptor {
    let key =
        rustls::pki_types::PrivateKeyDer::try_from(made.key_pair.serialize_der()).expect("key");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_no_client_auth()
        .with_single_cert(vec![made.cert.der().clone()], key)
        .expect("server config");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
}

/// Runs `serve` on a config it must refuse, and returns what it printed.
pub fn refused(dir: &Path, config: &str) -> String {
    std::fs::write(dir.join("filterbox.yaml"), config).expect("config");
    let mut child = serve_command(dir)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start serve");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("serve took a config it should refuse");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut text = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        use std::io::Read;
        let _ = stderr.read_to_string(&mut text);
    }
    text
}

/// The value of a request's `x-added` header (the header plugin's), `none` without one.
pub fn x_added<B>(request: &http::Request<B>) -> String {
    request
        .headers()
        .get("x-added")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_owned()
}

/// An upstream that answers with the value of the request's `x-added` header (`none`).
pub async fn x_added_upstream() -> SocketAddr {
    http1_upstream(|request: http::Request<Incoming>| {
        let added = x_added(&request);
        async move { added }
    })
    .await
}
