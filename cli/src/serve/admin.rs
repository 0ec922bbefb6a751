//! The admin listener: `/stats` (Prometheus text), `/ready`, and the plugin metric registries.

use bytes::Bytes;
use filterbox::MetricRegistry;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::net::TcpListener;

use super::*;

pub(super) fn text(status: http::StatusCode, body: String) -> http::Response<ProxyBody> {
    let mut response =
        http::Response::new(http_body_util::Either::Right(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response
}

pub(super) async fn admin_loop(socket: TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match socket.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors (or another passing error): wait instead of
                // spinning on accept.
                tracing::warn!("admin accept failed: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let handler = service_fn(move |request: http::Request<Incoming>| {
                let shared = shared.clone();
                async move {
                    let response = match request.uri().path() {
                        "/ready" => text(http::StatusCode::OK, "ready\n".into()),
                        "/stats" | "/stats/prometheus" => {
                            text(http::StatusCode::OK, render_stats(&shared))
                        }
                        _ => text(http::StatusCode::NOT_FOUND, "try /stats or /ready\n".into()),
                    };
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), handler)
                .await;
        });
    }
}

/// Prometheus text: plugin metrics, host metrics per plugin, and the proxy's own counters.
pub(super) fn render_stats(shared: &Shared) -> String {
    let mut plugins = String::new();
    for (name, registry) in shared.registries.all() {
        let mut text = String::new();
        registry.render_prometheus(&mut text);
        plugins.push_str(&label_samples(&text, &name));
    }
    let plugins = merge_families(&plugins);
    let mut host = String::new();
    for plugin in shared.chain.current().plugins() {
        plugin
            .metrics()
            .render_prometheus(&plugin.config().name, &mut host);
    }
    for service in shared.services.lock().iter() {
        let plugin = service.plugin();
        plugin
            .metrics()
            .render_prometheus(&plugin.config().name, &mut host);
    }
    let mut out = plugins;
    out.push_str(&merge_families(&host));
    let mut counter = |name: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    };
    counter(
        "filterbox_serve_requests_total",
        "Requests the listeners received.",
        shared.requests.load(Ordering::Relaxed),
    );
    counter(
        "filterbox_serve_upstream_errors_total",
        "Requests answered 502 because the upstream or a response body failed.",
        shared.upstream_errors.load(Ordering::Relaxed),
    );
    counter(
        "filterbox_serve_request_body_errors_total",
        "Requests answered 400 (malformed body) or 408 (stalled body).",
        shared.request_body_errors.load(Ordering::Relaxed),
    );
    counter(
        "filterbox_serve_reloads_total",
        "Configs reloaded.",
        shared.reloads.load(Ordering::Relaxed),
    );
    counter(
        "filterbox_serve_reloads_refused_total",
        "New configs refused (the old one kept serving).",
        shared.reloads_refused.load(Ordering::Relaxed),
    );
    out
}

/// The metrics plugins define, one registry per plugin name: a plugin can neither use up
/// another's metric slots nor reach another's metrics by guessing ids. A registry outlives
/// reloads, so a reloaded plugin's counters go on.
#[derive(Clone, Default)]
pub(super) struct Registries(
    pub(super) Arc<parking_lot::Mutex<BTreeMap<String, Arc<MetricRegistry>>>>,
);

impl Registries {
    /// Metrics one plugin may define.
    const MAX_METRICS_PER_PLUGIN: usize = 10_000;

    pub(super) fn of(&self, plugin: &str) -> Arc<MetricRegistry> {
        self.0
            .lock()
            .entry(plugin.to_owned())
            .or_insert_with(|| Arc::new(MetricRegistry::new(Self::MAX_METRICS_PER_PLUGIN)))
            .clone()
    }

    pub(super) fn all(&self) -> Vec<(String, Arc<MetricRegistry>)> {
        let registries = self.0.lock();
        registries
            .iter()
            .map(|(name, registry)| (name.clone(), registry.clone()))
            .collect()
    }
}

/// Adds a `plugin` label to every sample line of Prometheus text, so that two plugins that
/// define a metric of the same name report two series of one family.
pub(super) fn label_samples(text: &str, plugin: &str) -> String {
    let plugin = plugin.replace('\\', "\\\\").replace('"', "\\\"");
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line.starts_with('#') {
            out.push_str(line);
        } else if let Some((name, rest)) = line.split_once('{') {
            let _ = write!(out, "{name}{{plugin=\"{plugin}\",{rest}");
        } else if let Some((name, value)) = line.split_once(' ') {
            let _ = write!(out, "{name}{{plugin=\"{plugin}\"}} {value}");
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// Groups the samples of each metric family under one `# HELP` / `# TYPE` pair, as the text
/// format requires when several plugins report the same family.
pub(super) fn merge_families(text: &str) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut families: BTreeMap<String, (Vec<String>, Vec<String>)> = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines() {
        let meta = line
            .strip_prefix("# HELP ")
            .or_else(|| line.strip_prefix("# TYPE "));
        if let Some(rest) = meta {
            current = rest.split(' ').next().unwrap_or_default().to_owned();
        }
        let family = families.entry(current.clone()).or_insert_with(|| {
            order.push(current.clone());
            (Vec::new(), Vec::new())
        });
        match meta {
            Some(_) if !family.0.iter().any(|l| l == line) => family.0.push(line.to_owned()),
            Some(_) => {}
            None => family.1.push(line.to_owned()),
        }
    }
    let mut out = String::new();
    for name in order {
        if let Some((meta, samples)) = families.get(&name) {
            for line in meta.iter().chain(samples) {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}
