//! Exchanges through the tower layer ([`FilterService`](filterbox::FilterService)) in-process,
//! no sockets: what the layer adds to the plugins' own work, and how soon a paused exchange
//! goes on once its callout is answered.

use crate::{Scenario, fail, header_plugin, noop_plugin};
use bytes::Bytes;
use filterbox::{
    CalloutError, Callouts, Engine, FilterChain, FilterLayer, FilteredBody, GrpcReply, GrpcRequest,
    GrpcStream, HeaderMap, HttpCallOutcome, HttpCallReply, HttpCallRequest, HttpCallResponse,
    Plugin, PluginConfig,
};
use filterbox_conformance::guests;
use http_body_util::{BodyExt, Empty};
use std::convert::Infallible;
use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tower_layer::Layer;
use tower_service::Service;

/// An upstream that answers every request at once with an empty 200.
#[derive(Clone, Default)]
struct Answer;

impl Service<http::Request<FilteredBody>> for Answer {
    type Response = http::Response<Empty<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<FilteredBody>) -> Self::Future {
        std::future::ready(Ok(http::Response::new(Empty::new())))
    }
}

fn request() -> http::Request<Empty<Bytes>> {
    let mut request = http::Request::new(Empty::new());
    *request.uri_mut() = http::Uri::from_static("http://bench.example/path");
    request
        .headers_mut()
        .insert("user-agent", http::HeaderValue::from_static("bench"));
    request
}

/// A chain of `n` header plugins on `engine` with one slot, and a current-thread runtime to
/// drive its exchanges (so the slot runs inline where the engine allows).
fn header_chain(
    engine: &Engine,
    n: usize,
) -> Result<(FilterChain, tokio::runtime::Runtime), String> {
    let plugins = (0..n)
        .map(|_| header_plugin(engine))
        .collect::<Result<Vec<_>, _>>()?;
    chain_of(plugins)
}

/// A chain of `plugins` with one slot, and a current-thread runtime to drive its exchanges.
fn chain_of(plugins: Vec<Plugin>) -> Result<(FilterChain, tokio::runtime::Runtime), String> {
    let chain = FilterChain::builder()
        .slots(1)
        .build(plugins)
        .map_err(|e| fail("chain", e))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail("runtime", e))?;
    Ok((chain, runtime))
}

/// One exchange through `FilterService` around a chain of `n` header plugins on `engine`.
fn service_scenario(engine: &Engine, n: usize) -> Result<Scenario, String> {
    let chain = header_chain(engine, n)?;
    Ok(service_over(chain, format!("service/{n}_plugins")))
}

/// One exchange through `FilterService` around `chain`, as scenario `name`.
fn service_over(
    (chain, runtime): (FilterChain, tokio::runtime::Runtime),
    name: String,
) -> Scenario {
    let mut service = FilterLayer::new(chain).layer(Answer);
    Scenario::new(name, move || {
        runtime.block_on(async {
            let response = service.call(request()).await.expect("exchange");
            let body = response.into_body().collect().await.expect("body");
            black_box(body);
        })
    })
}

/// One exchange through the exchange core ([`filterbox::Exchange`], no `http` types) of a
/// chain of `n` header plugins: request headers, response headers, the end.
fn exchange_scenario(engine: &Engine, n: usize) -> Result<Scenario, String> {
    let (chain, runtime) = header_chain(engine, n)?;
    let request = crate::request_headers(0);
    let response = crate::response_headers();
    Ok(Scenario::new(format!("exchange/{n}_plugins"), move || {
        runtime.block_on(async {
            let mut exchange = chain.exchange();
            let request = exchange.request_headers(request.clone(), true).await;
            let response = exchange.response_headers(response.clone(), true).await;
            black_box((request.expect("request"), response.expect("response")));
            exchange.finish();
        })
    }))
}

/// One exchange through `FilterService` and through the exchange core with 0, 1 and 5 header
/// plugins (compare with `chain/N_plugins`, the same callbacks driven on the VMs directly).
pub fn service_scenarios(engine: &Engine) -> Result<Vec<Scenario>, String> {
    let mut out = Vec::new();
    for n in [0, 1, 5] {
        out.push(exchange_scenario(engine, n)?);
        out.push(service_scenario(engine, n)?);
    }
    // The host's own path for one plugin: a plugin whose callbacks do nothing.
    let noop = chain_of(vec![noop_plugin(engine)?])?;
    out.push(service_over(noop, "service/1_noop_plugin".into()));
    Ok(out)
}

/// What an embedder with `http` types pays per exchange to hand headers to the plugins as
/// filterbox's [`HeaderMap`] and to take them back, with one header added on each side as a
/// plugin would: request parts with `extra` headers besides `host` and `user-agent` (and the
/// four pseudo headers), response parts with three. Before each conversion back, the target's
/// headers are reset to the original's (an `http` map clone, which the conversion also makes
/// once), so the row is an upper bound on the conversions' cost. Hostcalls working on the
/// embedder's own map would not save it all: `proxy_on_log` and `request.*` keep the headers
/// after the request has gone on, so one copy per direction stays (tried: no faster).
fn conversion_scenario(extra: usize) -> Scenario {
    let mut request = http::Request::new(());
    *request.uri_mut() = http::Uri::from_static("http://bench.example/path?q=1");
    let headers = request.headers_mut();
    headers.insert("host", http::HeaderValue::from_static("bench.example"));
    headers.insert("user-agent", http::HeaderValue::from_static("bench"));
    for i in 0..extra {
        if let Ok(name) = http::HeaderName::from_bytes(format!("x-extra-{i}").as_bytes()) {
            headers.insert(name, http::HeaderValue::from_static("value"));
        }
    }
    let (request, ()) = request.into_parts();
    let mut response = http::Response::new(());
    let headers = response.headers_mut();
    headers.insert("content-type", http::HeaderValue::from_static("text/plain"));
    headers.insert("content-length", http::HeaderValue::from_static("5"));
    headers.insert(
        "date",
        http::HeaderValue::from_static("Tue, 01 Dec 2026 12:00:00 GMT"),
    );
    let (response, ()) = response.into_parts();
    let (mut request_out, mut response_out) = (request.clone(), response.clone());
    Scenario::new(format!("convert/http_headers_{}", extra + 2), move || {
        let mut map = HeaderMap::from_request_parts(&request);
        map.add("x-request", "yes");
        request_out.headers.clone_from(&request.headers);
        map.to_request_parts(&mut request_out).expect("request");
        let mut map = HeaderMap::from_response_parts(&response);
        map.add("x-response", "yes");
        response_out.headers.clone_from(&response.headers);
        map.to_response_parts(&mut response_out).expect("response");
        black_box((&request_out, &response_out));
    })
}

/// The header conversions of [`conversion_scenario`] for 2 and 12 request headers, and the
/// hop-by-hop stripping `filterbox serve` does on each response.
pub fn conversion_scenarios() -> Vec<Scenario> {
    vec![
        conversion_scenario(0),
        conversion_scenario(10),
        strip_scenario(),
    ]
}

/// [`filterbox::strip_hop_by_hop`] on a response as nginx sends it on a kept-alive
/// connection (five headers, `connection: keep-alive` among them), with the copy of the
/// prebuilt headers it starts from each time.
fn strip_scenario() -> Scenario {
    let mut response = http::HeaderMap::new();
    for (name, value) in [
        ("server", "nginx"),
        ("date", "Tue, 01 Dec 2026 12:00:00 GMT"),
        ("content-type", "text/plain"),
        ("content-length", "5"),
        ("connection", "keep-alive"),
    ] {
        response.insert(name, http::HeaderValue::from_static(value));
    }
    let mut out = response.clone();
    Scenario::new("convert/strip_hop_by_hop_keep_alive", move || {
        out.clone_from(&response);
        filterbox::strip_hop_by_hop(&mut out);
        black_box(&out);
    })
}

/// Callouts answered by a thread `delay` after they start, noting when each answer was
/// handed to filterbox.
struct DelayedCallouts {
    delay: Duration,
    answered: Arc<Mutex<Vec<Instant>>>,
}

impl Callouts for DelayedCallouts {
    fn http_call(&self, _: HttpCallRequest, reply: HttpCallReply) -> Result<(), CalloutError> {
        let (delay, answered) = (self.delay, self.answered.clone());
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            let mut headers = HeaderMap::new();
            headers.add(":status", "200");
            let response = HttpCallResponse {
                headers,
                body: Bytes::from_static(b"found"),
                trailers: HeaderMap::new(),
            };
            if let Ok(mut answered) = answered.lock() {
                answered.push(Instant::now());
            }
            reply.send(HttpCallOutcome::Response(response));
        });
        Ok(())
    }

    fn grpc_open(
        &self,
        request: GrpcRequest,
        _: GrpcReply,
    ) -> Result<Box<dyn GrpcStream>, CalloutError> {
        // No gRPC here: the answer the Rust SDK takes in its stride (it panics on
        // `Unimplemented`, which would fail the guest the bench times).
        Err(CalloutError::UnknownUpstream(request.upstream))
    }
}

/// How long a paused exchange takes to go on once its callout is answered: `exchanges`
/// requests through the callouts guest (which pauses its request headers on an HTTP call
/// answered 20 ms later), driven through [`filterbox::Exchange`] on a two-thread runtime; each
/// gap runs from the answer handed to filterbox to the request phase returning. Returns the
/// gaps, sorted.
pub fn resume_gaps(engine: &Engine, exchanges: usize) -> Result<Vec<Duration>, String> {
    let answered = Arc::new(Mutex::new(Vec::new()));
    let callouts = Arc::new(DelayedCallouts {
        delay: Duration::from_millis(20),
        answered: answered.clone(),
    });
    let config = PluginConfig::named("callouts").with_engine(engine.kind());
    let plugin = Plugin::builder(config)
        .engine(engine)
        .callouts(callouts)
        .build(guests::CALLOUTS)
        .map_err(|e| fail("plugin", e))?;
    let chain = FilterChain::builder()
        .slots(1)
        .build(vec![plugin])
        .map_err(|e| fail("chain", e))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| fail("runtime", e))?;
    let resumed = runtime.block_on(async {
        let mut resumed = Vec::with_capacity(exchanges);
        for _ in 0..exchanges {
            let mut exchange = chain.exchange();
            let headers: HeaderMap = [(":method", "GET"), (":path", "/"), (":authority", "bench")]
                .into_iter()
                .collect();
            match exchange.request_headers(headers, true).await {
                Ok(headers) if headers.get_str("x-lookup") == Some("200 found") => {
                    resumed.push(Instant::now());
                }
                Ok(headers) => return Err(format!("resumed without the answer: {headers:?}")),
                Err(local) => {
                    return Err(format!(
                        "answered {} ({}) instead of resumed",
                        local.status_code, local.details
                    ));
                }
            }
            exchange.finish();
        }
        Ok(resumed)
    })?;
    let answered = answered.lock().map_err(|e| fail("answers", e))?;
    if answered.len() != exchanges {
        return Err(format!(
            "{} answers for {exchanges} exchanges",
            answered.len()
        ));
    }
    let mut gaps: Vec<Duration> = answered
        .iter()
        .zip(&resumed)
        .map(|(answer, resumed)| resumed.saturating_duration_since(*answer))
        .collect();
    gaps.sort();
    Ok(gaps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use filterbox::{EngineConfig, EngineKind};

    #[test]
    fn a_paused_exchange_goes_on_when_its_callout_answers_on_every_engine() {
        for kind in EngineKind::built() {
            let engine = Engine::new(kind, &EngineConfig::default()).expect("engine");
            let gaps = resume_gaps(&engine, 2).unwrap_or_else(|e| panic!("{kind}: {e}"));
            assert_eq!(gaps.len(), 2, "{kind}");
        }
    }
}
