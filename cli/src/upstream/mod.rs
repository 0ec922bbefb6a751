//! `serve`'s upstreams: one or several `http://` or `https://` addresses per name, taken in
//! turn (round robin); an address that refused a connection is left out for a while (passive
//! health), one that fails its active health checks (`health_check`) until it passes again,
//! and a request without a body that could not connect is tried on the next one.
//! Each upstream has its own client (its connection pool, its TLS roots, HTTP/2 by ALPN over
//! TLS or, when asked, by prior knowledge over plain TCP).
//!
//! Plain `http://` HTTP/1.1 addresses are reached from the worker threads through
//! connections each worker keeps for itself ([`h1`]).
//!
//! What crosses this module: the `upstreams` entries of the config in, a [`Pool`] per name
//! out, which gives the order in which to try its addresses for one request and sends it.

mod h1;

use anyhow::{Context as _, Result, bail};
use filterbox::FilteredBody;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The client a pool sends its requests with.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, FilteredBody>;

/// An `upstreams` value in the config: one URL, or a list of them.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum UpstreamEntry {
    /// `backend: "http://127.0.0.1:9000"`.
    One(String),
    /// `backend: ["http://10.0.0.1:80", "http://10.0.0.2:80"]`.
    Several(Vec<String>),
    /// `backend: { addresses: [...], ca_file: ca.pem, http2: true }`.
    Detailed(UpstreamSettings),
}

/// An upstream with settings beside its addresses.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSettings {
    /// The URLs, taken in turn.
    pub addresses: Vec<String>,
    /// PEM file of the certificate authorities `https://` addresses are checked against
    /// (relative to the config file); default: the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Speak HTTP/2 to plain `http://` addresses (prior knowledge); over TLS, ALPN decides.
    #[serde(default)]
    pub http2: bool,
    /// Probe every address in the background; those that fail go last until they pass.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
}

/// Active health checks: a `GET` of `path` on every address each `interval_ms`; an answer
/// with a 2xx status within `timeout_ms` passes, anything else fails.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// The path probed (with its query, if any), e.g. `/healthz`.
    pub path: String,
    /// Between two probes of an address, in milliseconds (default 5 000).
    #[serde(default)]
    pub interval_ms: Option<u64>,
    /// How long a probe may take, in milliseconds (default 1 000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Failed probes in a row that take an address out (default 2).
    #[serde(default)]
    pub unhealthy_threshold: Option<u32>,
    /// Passed probes in a row that bring it back (default 1).
    #[serde(default)]
    pub healthy_threshold: Option<u32>,
}

impl UpstreamEntry {
    /// The URLs, in the order given.
    pub fn urls(&self) -> &[String] {
        match self {
            UpstreamEntry::One(url) => std::slice::from_ref(url),
            UpstreamEntry::Several(urls) => urls,
            UpstreamEntry::Detailed(settings) => &settings.addresses,
        }
    }

    fn settings(&self) -> Option<&UpstreamSettings> {
        match self {
            UpstreamEntry::Detailed(settings) => Some(settings),
            _ => None,
        }
    }
}

/// How long an address that refused a connection is left out.
const COOL_DOWN: Duration = Duration::from_secs(5);

/// One upstream's addresses and whose turn it is.
#[derive(Debug)]
pub struct Pool {
    addresses: Vec<Address>,
    /// The client of every thread without one of its own.
    client: UpstreamClient,
    /// The clients of threads 1, 2, …: each has connections of its own, used on the thread
    /// whose runtime drives them.
    thread_clients: Vec<UpstreamClient>,
    next: AtomicUsize,
    health_check: Option<ActiveCheck>,
    /// When the pool was made: the clock `down_until` counts from.
    epoch: Instant,
}

/// A [`HealthCheck`] with its defaults applied and its path parsed, once, as the pool is made.
#[derive(Debug, Clone)]
struct ActiveCheck {
    path: http::uri::PathAndQuery,
    interval: Duration,
    timeout: Duration,
    /// Failed probes in a row that take an address out.
    to_fail: u32,
    /// Passed probes in a row that bring it back.
    to_pass: u32,
}

impl ActiveCheck {
    fn new(name: &str, check: &HealthCheck) -> Result<ActiveCheck> {
        let path = match check.path.parse::<http::uri::PathAndQuery>() {
            Ok(path) if check.path.starts_with('/') => path,
            _ => bail!(
                "upstream {name:?}: health_check path {:?} is not a path starting with /",
                check.path
            ),
        };
        Ok(ActiveCheck {
            path,
            interval: Duration::from_millis(check.interval_ms.unwrap_or(5_000).max(1)),
            timeout: Duration::from_millis(check.timeout_ms.unwrap_or(1_000).max(1)),
            to_fail: check.unhealthy_threshold.unwrap_or(2).max(1),
            to_pass: check.healthy_threshold.unwrap_or(1).max(1),
        })
    }
}

/// One address of an upstream.
#[derive(Debug)]
pub struct Address {
    uri: http::Uri,
    /// The workers' own connections, for a plain HTTP/1.1 address.
    direct: Option<h1::Connections>,
    /// Milliseconds since the pool's epoch until which the address is left out (0: never).
    down_until: AtomicU64,
    /// What the active health checks last concluded (true until they say otherwise).
    healthy: AtomicBool,
}

impl Address {
    /// The address's URL.
    pub fn uri(&self) -> &http::Uri {
        &self.uri
    }
}

/// Why a request sent to an upstream address got no response.
#[derive(Debug)]
pub struct SendError {
    /// No connection could be made: another address may be tried.
    connect: bool,
    error: Box<dyn std::error::Error + Send + Sync>,
}

impl SendError {
    fn connect(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> SendError {
        SendError {
            connect: true,
            error: error.into(),
        }
    }

    fn request(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> SendError {
        SendError {
            connect: false,
            error: error.into(),
        }
    }

    /// Whether no connection to the address could be made (nothing was sent).
    pub fn is_connect(&self) -> bool {
        self.connect
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.connect {
            true => write!(f, "connecting to the upstream: {}", self.error),
            false => write!(f, "upstream request: {}", self.error),
        }
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.error)
    }
}

impl Pool {
    /// The pool of upstream `name`: each URL must be `http://` or `https://host[:port]` (a
    /// path is ignored); a CA file is read relative to `base`. Threads 1 to `threads` get
    /// clients (and connections) of their own: see [`Pool::client`].
    pub fn new(name: &str, entry: &UpstreamEntry, base: &Path, threads: usize) -> Result<Pool> {
        if entry.urls().is_empty() {
            bail!("upstream {name:?}: no address");
        }
        let mut addresses = Vec::with_capacity(entry.urls().len());
        // HTTP/2 by prior knowledge goes through the general client.
        let http2 = entry.settings().is_some_and(|s| s.http2);
        for url in entry.urls() {
            let uri: http::Uri = match url.parse() {
                Ok(uri) => uri,
                Err(e) => bail!("upstream {name:?}: bad URL {url:?}: {e}"),
            };
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
                bail!("upstream {name:?}: {url:?} is not an http:// or https://host:port URL");
            }
            addresses.push(Address {
                direct: (uri.scheme_str() == Some("http") && !http2)
                    .then(|| h1::Connections::new(threads)),
                uri,
                down_until: AtomicU64::new(0),
                healthy: AtomicBool::new(true),
            });
        }
        let health_check = match entry.settings().and_then(|s| s.health_check.as_ref()) {
            Some(check) => Some(ActiveCheck::new(name, check)?),
            None => None,
        };
        let tls = addresses
            .iter()
            .any(|a| a.uri.scheme_str() == Some("https"));
        // A clone would share its connections: each client is built anew.
        let build =
            || client(entry.settings(), tls, base).with_context(|| format!("upstream {name:?}"));
        Ok(Pool {
            addresses,
            health_check,
            client: build()?,
            thread_clients: (0..threads).map(|_| build()).collect::<Result<_>>()?,
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
        })
    }

    /// The client to send this upstream's requests with from thread number `thread` (from
    /// 1; 0 or a number past the pool's threads: the shared one).
    pub fn client(&self, thread: usize) -> &UpstreamClient {
        thread
            .checked_sub(1)
            .and_then(|i| self.thread_clients.get(i))
            .unwrap_or(&self.client)
    }

    /// The addresses to try for one request, in order: from the next one in turn, those not
    /// left out first, then the rest (so a pool whose addresses all failed still tries).
    pub fn order(&self) -> Vec<&Address> {
        let count = self.addresses.len();
        // One address (the common case) has no turn to take and nothing to reorder: no
        // shared counter written and no clock read per request.
        if count <= 1 {
            return self.addresses.iter().collect();
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % count;
        let now = self.now_ms();
        let mut order: Vec<&Address> = (0..count)
            .filter_map(|i| self.addresses.get((start + i) % count))
            .collect();
        // Stable: the addresses left out go last (those failing health checks after those
        // that refused a connection lately), each group in turn order.
        order.sort_by_key(|a| {
            (
                !a.healthy.load(Ordering::Relaxed),
                a.down_until.load(Ordering::Relaxed) > now,
            )
        });
        order
    }

    /// `address` refused a connection: leave it out for [`COOL_DOWN`].
    pub fn mark_down(&self, address: &Address) {
        let until = self.now_ms() + u64::try_from(COOL_DOWN.as_millis()).unwrap_or(u64::MAX);
        address.down_until.store(until, Ordering::Relaxed);
    }

    /// Sends `request` to `address` (one of this pool's) with the path and query of its URI,
    /// from worker `worker` (the calling thread's number, 0 off the workers).
    pub async fn send(
        &self,
        worker: usize,
        address: &Address,
        mut request: http::Request<FilteredBody>,
    ) -> Result<http::Response<Incoming>, SendError> {
        let path = request.uri().path_and_query().cloned();
        let direct = address
            .direct
            .as_ref()
            .filter(|direct| direct.serves(worker));
        let Some((direct, host)) = direct.zip(address.uri.host()) else {
            *request.uri_mut() = at_path(&address.uri, path).map_err(SendError::request)?;
            return self.client(worker).request(request).await.map_err(|error| {
                match error.is_connect() {
                    true => SendError::connect(error),
                    false => SendError::request(error),
                }
            });
        };
        let port = address.uri.port_u16().unwrap_or(80);
        // Origin form, and a `host` when the client sent none (an HTTP/2 client's
        // `:authority` is in the URI): the address's, as the general client sets it.
        if !request.headers().contains_key(http::header::HOST) {
            let authority = match port {
                80 => host.to_owned(),
                port => format!("{host}:{port}"),
            };
            let value = http::HeaderValue::from_str(&authority).map_err(SendError::request)?;
            request.headers_mut().insert(http::header::HOST, value);
        }
        *request.uri_mut() = match path {
            Some(path) => http::Uri::from(path),
            None => http::Uri::from_static("/"),
        };
        direct.send(worker, host, port, request).await
    }

    /// Each address with what its health checks last concluded; empty when the upstream has
    /// no `health_check`.
    pub fn health(&self) -> Vec<(&http::Uri, bool)> {
        match &self.health_check {
            Some(_) => self
                .addresses
                .iter()
                .map(|a| (&a.uri, a.healthy.load(Ordering::Relaxed)))
                .collect(),
            None => Vec::new(),
        }
    }

    /// Milliseconds since the epoch; at least 1, so that 0 means "never down".
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

/// Runs `pool`'s health checks (if it has any) on `runtime` until the pool is dropped (a
/// reload replaced it).
pub fn check_health(name: &str, pool: &Arc<Pool>, runtime: &tokio::runtime::Handle) {
    let Some(check) = pool.health_check.clone() else {
        return;
    };
    let ActiveCheck {
        path,
        interval,
        timeout,
        to_fail,
        to_pass,
    } = check;
    let (name, weak) = (name.to_owned(), Arc::downgrade(pool));
    runtime.spawn(async move {
        // Per address: probes passed (positive) or failed (negative) in a row.
        let mut streaks = vec![0i64; weak.upgrade().map_or(0, |p| p.addresses.len())];
        loop {
            let Some(pool) = weak.upgrade() else {
                return;
            };
            for (address, streak) in pool.addresses.iter().zip(streaks.iter_mut()) {
                let passed = probe(pool.client(0), &address.uri, &path, timeout).await;
                *streak = match (passed, *streak > 0) {
                    (true, true) => streak.saturating_add(1),
                    (true, false) => 1,
                    (false, true) => -1,
                    (false, false) => streak.saturating_sub(1),
                };
                let healthy = address.healthy.load(Ordering::Relaxed);
                if healthy && *streak <= -i64::from(to_fail) {
                    address.healthy.store(false, Ordering::Relaxed);
                    tracing::warn!(upstream = %name, address = %address.uri, "failed {to_fail} health check(s) in a row: taken out");
                } else if !healthy && *streak >= i64::from(to_pass) {
                    address.healthy.store(true, Ordering::Relaxed);
                    tracing::info!(upstream = %name, address = %address.uri, "passed its health checks: back in");
                }
            }
            // The pool is not kept alive while the task sleeps.
            drop(pool);
            tokio::time::sleep(interval).await;
        }
    });
}

/// Whether `GET path` on `base` answers 2xx within `timeout`.
async fn probe(
    client: &UpstreamClient,
    base: &http::Uri,
    path: &http::uri::PathAndQuery,
    timeout: Duration,
) -> bool {
    let Ok(uri) = at_path(base, Some(path.clone())) else {
        return false;
    };
    let mut request = http::Request::new(FilteredBody::empty());
    *request.uri_mut() = uri;
    match tokio::time::timeout(timeout, client.request(request)).await {
        Ok(Ok(response)) => response.status().is_success(),
        _ => false,
    }
}

/// `base` (an upstream address) with `path` as its path and query.
pub fn at_path(
    base: &http::Uri,
    path: Option<http::uri::PathAndQuery>,
) -> Result<http::Uri, http::uri::InvalidUriParts> {
    let mut parts = base.clone().into_parts();
    parts.path_and_query = path;
    http::Uri::from_parts(parts)
}

/// A client for an upstream: TLS roots from the CA file or the system (read only when an
/// address is `https://`), HTTP/1.1 and HTTP/2 by ALPN, or HTTP/2 only when asked.
fn client(settings: Option<&UpstreamSettings>, tls: bool, base: &Path) -> Result<UpstreamClient> {
    let mut roots = rustls::RootCertStore::empty();
    if tls {
        add_roots(settings, base, &mut roots)?;
    }
    let http2 = settings.is_some_and(|s| s.http2);
    Ok(Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build(tls_connector(roots)?))
}

/// The connector plugins' HTTP and gRPC calls go through, and whether it speaks TLS: for
/// `https://` upstreams it trusts what each of them trusts (its CA file, or the system's
/// roots).
pub fn callout_connector<'a>(
    entries: impl IntoIterator<Item = &'a UpstreamEntry>,
    base: &Path,
) -> Result<(HttpsConnector<HttpConnector>, bool)> {
    let mut roots = rustls::RootCertStore::empty();
    let mut any = false;
    for entry in entries {
        if entry.urls().iter().any(|url| url.starts_with("https://")) {
            add_roots(entry.settings(), base, &mut roots)?;
            any = true;
        }
    }
    Ok((tls_connector(roots)?, any))
}

/// The connector remote plugin code at `uri` is fetched through: for `https://`, TLS trusting
/// `upstream`'s CA file (Envoy's `http_uri.cluster`) or the system's roots.
pub fn code_connector(
    uri: &str,
    upstream: Option<&UpstreamEntry>,
    base: &Path,
) -> Result<HttpsConnector<HttpConnector>> {
    let mut roots = rustls::RootCertStore::empty();
    if uri.starts_with("https://") {
        add_roots(upstream.and_then(UpstreamEntry::settings), base, &mut roots)?;
    }
    tls_connector(roots)
}

/// Adds the roots an upstream's `https://` addresses are checked against: its CA file, or
/// the system's.
fn add_roots(
    settings: Option<&UpstreamSettings>,
    base: &Path,
    roots: &mut rustls::RootCertStore,
) -> Result<()> {
    let added = match settings.and_then(|s| s.ca_file.as_ref()) {
        Some(file) => {
            let path = base.join(file);
            let certificates = CertificateDer::pem_file_iter(&path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| anyhow::anyhow!("{e:?}"))
                .with_context(|| format!("reading CA file {}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certificates);
            if added == 0 {
                bail!("no certificate authority in {}", path.display());
            }
            added
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs).0
        }
    };
    if added == 0 {
        bail!("no system certificate authorities found (give a ca_file)");
    }
    Ok(())
}

/// TCP (with `TCP_NODELAY`) and, for `https://`, TLS trusting `roots`, HTTP/2 or HTTP/1.1 by
/// ALPN.
fn tls_connector(roots: rustls::RootCertStore) -> Result<HttpsConnector<HttpConnector>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(tcp))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(urls: &[&str]) -> Pool {
        let entry = UpstreamEntry::Several(urls.iter().map(|u| (*u).to_owned()).collect());
        Pool::new("p", &entry, Path::new("."), 0).expect("pool")
    }

    fn hosts(order: Vec<&Address>) -> Vec<String> {
        order
            .iter()
            .map(|a| {
                a.uri()
                    .authority()
                    .map(|a| a.to_string())
                    .unwrap_or_default()
            })
            .collect()
    }

    /// The address of `pool` at `url`.
    fn address<'a>(pool: &'a Pool, url: &str) -> &'a Address {
        let uri: http::Uri = url.parse().expect("uri");
        pool.addresses
            .iter()
            .find(|a| a.uri == uri)
            .expect("one of the pool's addresses")
    }

    #[test]
    fn addresses_take_turns_and_one_that_refused_goes_last_for_a_while() {
        let pool = pool(&["http://a:1", "http://b:2", "http://c:3"]);
        assert_eq!(hosts(pool.order()), ["a:1", "b:2", "c:3"]);
        assert_eq!(hosts(pool.order()), ["b:2", "c:3", "a:1"]);
        assert_eq!(hosts(pool.order()), ["c:3", "a:1", "b:2"]);
        pool.mark_down(address(&pool, "http://a:1"));
        assert_eq!(hosts(pool.order()), ["b:2", "c:3", "a:1"]);
        assert_eq!(hosts(pool.order()), ["b:2", "c:3", "a:1"]);
        assert_eq!(hosts(pool.order()), ["c:3", "b:2", "a:1"]);
    }

    #[test]
    fn an_address_failing_its_health_checks_goes_after_one_that_refused_lately() {
        let pool = pool(&["http://a:1", "http://b:2", "http://c:3"]);
        assert!(pool.health().is_empty(), "no health_check: nothing to show");
        if let Some(a) = pool.addresses.first() {
            a.healthy.store(false, Ordering::Relaxed);
        }
        pool.mark_down(address(&pool, "http://b:2"));
        assert_eq!(hosts(pool.order()), ["c:3", "b:2", "a:1"]);
        let yaml = "{ addresses: [http://a:1], health_check: { path: healthz } }";
        let entry: UpstreamEntry = serde_yaml::from_str(yaml).expect("entry");
        let error = Pool::new("api", &entry, Path::new("."), 0).expect_err("a path without /");
        assert!(error.to_string().contains("health_check path"), "{error}");
    }

    #[test]
    fn bad_entries_are_refused_with_the_upstream_named() {
        for (entry, why) in [
            (UpstreamEntry::Several(Vec::new()), "no address"),
            (
                UpstreamEntry::One("ftp://a:1".into()),
                "not an http:// or https://",
            ),
            (UpstreamEntry::One("http://".into()), "bad URL"),
        ] {
            let error = Pool::new("api", &entry, Path::new("."), 0)
                .expect_err("refused")
                .to_string();
            assert!(error.contains("\"api\"") && error.contains(why), "{error}");
        }
        let one: UpstreamEntry = serde_yaml::from_str("http://a:1").expect("one");
        assert_eq!(one.urls(), ["http://a:1"]);
        let several: UpstreamEntry =
            serde_yaml::from_str("[http://a:1, http://b:2]").expect("list");
        assert_eq!(several.urls().len(), 2);
    }
}
