//! The admin listener: `/stats` (Prometheus text), `/ready`, and the plugin metric registries.

use bytes::Bytes;
use filterbox::{MetricRegistry, PrometheusText};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
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
    let mut text = PrometheusText::new();
    for (name, registry) in shared.registries.all() {
        registry.write_prometheus(Some(&name), &mut text);
    }
    let services = shared.services.lock();
    let chain = shared.chain.current();
    let plugins = chain
        .plugins()
        .iter()
        .chain(services.iter().map(|service| service.plugin()));
    for plugin in plugins {
        let name = &plugin.config().name;
        plugin.metrics().write_prometheus(name, &mut text);
        if let Some(stats) = plugin.shared_state().store_stats() {
            stats.write_prometheus(name, &mut text);
        }
    }
    drop(services);
    let counters = [
        (
            "filterbox_serve_requests_total",
            "Requests the listeners received.",
            &shared.requests,
        ),
        (
            "filterbox_serve_upstream_errors_total",
            "Requests answered 502 because the upstream or a response body failed.",
            &shared.upstream_errors,
        ),
        (
            "filterbox_serve_request_body_errors_total",
            "Requests answered 400 (malformed body) or 408 (stalled body).",
            &shared.request_body_errors,
        ),
        (
            "filterbox_serve_reloads_total",
            "Configs reloaded.",
            &shared.reloads,
        ),
        (
            "filterbox_serve_reloads_refused_total",
            "New configs refused (the old one kept serving).",
            &shared.reloads_refused,
        ),
    ];
    for (name, help, value) in counters {
        text.add_counter(name, help, value.load(Ordering::Relaxed));
    }
    let upstreams = shared.upstreams.read().clone();
    for (name, pool) in upstreams.iter() {
        for (address, healthy) in pool.health() {
            text.add_gauge(
                "filterbox_serve_upstream_healthy",
                "1 while an upstream address passes its health checks, 0 once it failed them.",
                &[("upstream", name), ("address", &address.to_string())],
                u64::from(healthy),
            );
        }
    }
    for (number, open) in (1..).zip(&shared.worker_connections) {
        text.add_gauge(
            "filterbox_serve_worker_connections",
            "Client connections open on each worker thread.",
            &[("worker", &number.to_string())],
            u64::try_from(open.load(Ordering::Relaxed)).unwrap_or(u64::MAX),
        );
    }
    text.to_string()
}

/// The metrics plugins define, one registry per plugin name: a plugin can neither use up
/// another's metric slots nor reach another's metrics by guessing ids. A registry outlives
/// reloads, so a reloaded plugin's counters go on.
#[derive(Clone, Default)]
pub(super) struct Registries(
    pub(super) Arc<parking_lot::Mutex<BTreeMap<String, Arc<MetricRegistry>>>>,
    /// Each plugin's remote shared-state store, kept across reloads while its config stays:
    /// a reload neither reconnects nor loses the queue wake-ups it listens for.
    Arc<parking_lot::Mutex<BTreeMap<String, (SharedStateEntry, filterbox::SharedState)>>>,
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

    /// The shared-state world `entry` describes for `plugin`: the one made before if the
    /// plugin's entry is unchanged, else a new one.
    pub(super) fn shared_state(
        &self,
        plugin: &str,
        entry: &SharedStateEntry,
    ) -> anyhow::Result<filterbox::SharedState> {
        let mut stores = self.1.lock();
        if let Some((kept, state)) = stores.get(plugin)
            && kept == entry
        {
            return Ok(state.clone());
        }
        let state = entry.build()?;
        stores.insert(plugin.to_owned(), (entry.clone(), state.clone()));
        Ok(state)
    }

    pub(super) fn all(&self) -> Vec<(String, Arc<MetricRegistry>)> {
        let registries = self.0.lock();
        registries
            .iter()
            .map(|(name, registry)| (name.clone(), registry.clone()))
            .collect()
    }
}
