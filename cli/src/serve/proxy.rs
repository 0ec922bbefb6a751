//! The proxy: accepting client connections (TLS or not), serving their requests through the
//! plugins, and forwarding them to the route's upstream.

use crate::routes::RouteUpstream;
use anyhow::{Context as _, Result};
use bytes::Bytes;
use filterbox::{ConnectionInfo, FilteredBody};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tower_service::Service;

use super::*;

/// The inner service: forwards a filtered request to the listener's upstream.
#[derive(Clone)]
pub(super) struct Upstream {
    pub(super) shared: Arc<Shared>,
    pub(super) name: Arc<str>,
}

impl Service<http::Request<FilteredBody>> for Upstream {
    type Response = http::Response<Incoming>;
    type Error = anyhow::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<FilteredBody>) -> Self::Future {
        let shared = self.shared.clone();
        let name = match request.extensions().get::<RouteUpstream>() {
            Some(route) => route.0.clone(),
            None => self.name.clone(),
        };
        Box::pin(async move {
            let pool = shared.upstreams.read().get(&*name).cloned();
            let pool = pool.with_context(|| format!("upstream {name:?} is gone"))?;
            // The upstream hop is filterbox's own connection: HTTP/1.1, whatever the client
            // spoke (hyper sets `host` from the URI when an HTTP/2 client sent none).
            *request.version_mut() = http::Version::HTTP_11;
            filterbox::strip_hop_by_hop(request.headers_mut());
            // A request without a body can be sent again: it tries every address until one
            // connects. One with a body goes to one address (its body is read once).
            let replayable = request.body().is_end_stream();
            let order = pool.order();
            let mut addresses = order.iter().peekable();
            let mut response = loop {
                let Some(&address) = addresses.next() else {
                    anyhow::bail!("upstream {name:?} has no address");
                };
                let attempt = match (replayable, addresses.peek()) {
                    (true, Some(_)) => replay(&request),
                    _ => std::mem::replace(&mut request, http::Request::new(FilteredBody::empty())),
                };
                match pool.send(workers::current(), address, attempt).await {
                    Ok(response) => break response,
                    Err(error) if error.is_connect() => {
                        pool.mark_down(address);
                        tracing::warn!(upstream = %name, address = %address.uri(), "{error}");
                        if !replayable || addresses.peek().is_none() {
                            return Err(error.into());
                        }
                    }
                    Err(error) => return Err(error.into()),
                }
            };
            // Upgrades are not proxied (their headers are hop-by-hop and dropped): a 101
            // passed on would switch a client that never asked to.
            if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                anyhow::bail!(
                    "upstream answered 101 Switching Protocols; upgrades are not proxied"
                );
            }
            filterbox::strip_hop_by_hop(response.headers_mut());
            Ok(response)
        })
    }
}

/// A copy of a request without a body, to send again.
pub(super) fn replay(request: &http::Request<FilteredBody>) -> http::Request<FilteredBody> {
    let mut copy = http::Request::new(FilteredBody::empty());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    *copy.extensions_mut() = request.extensions().clone();
    copy
}

pub(super) type ProxyBody = http_body_util::Either<FilteredBody, Full<Bytes>>;

/// How long running requests get to finish at shutdown by default.
pub(super) const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a request body may wait for its client's next bytes by default.
pub(super) const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A request body that fails when its client sends nothing for `idle` while the proxy waits
/// for it: a stalled upload cannot hold a connection and the plugins' buffers for ever. Only
/// time spent waiting on the client counts (not time the plugins keep the body unread).
pub(super) struct IdleBody {
    pub(super) inner: Incoming,
    pub(super) idle: Duration,
    pub(super) timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl IdleBody {
    pub(super) fn new(inner: Incoming, idle: Duration) -> Self {
        IdleBody {
            inner,
            idle,
            timer: None,
        }
    }
}

impl Body for IdleBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.timer = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let idle = this.idle;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyIdle(idle))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A client sent no request body bytes for this long.
#[derive(Debug)]
pub(super) struct BodyIdle(pub(super) Duration);

impl std::fmt::Display for BodyIdle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the client sent no request body for {} ms",
            self.0.as_millis()
        )
    }
}

impl std::error::Error for BodyIdle {}

/// How long a client may take to send a request's head (and an idle keep-alive connection
/// may wait for the next one).
pub(super) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The answer to a request `serve` does not forward: a CONNECT (it proxies no tunnels), or
/// one with more than one `Host` (which one the upstream and the plugins believe would
/// differ).
pub(super) fn refuse<B>(request: &http::Request<B>) -> Option<http::Response<ProxyBody>> {
    if request.method() == http::Method::CONNECT {
        return Some(text(
            http::StatusCode::METHOD_NOT_ALLOWED,
            "filterbox: CONNECT is not proxied\n".into(),
        ));
    }
    if request.headers().get_all(http::header::HOST).iter().count() > 1 {
        return Some(text(
            http::StatusCode::BAD_REQUEST,
            "filterbox: more than one Host header\n".into(),
        ));
    }
    None
}

/// How long an accept loop waits after a failed accept (EMFILE: out of descriptors).
pub(super) const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What a listener serves its requests with: the filter layer around the upstream.
pub(super) trait ListenerService:
    Service<
        http::Request<IdleBody>,
        Response = http::Response<FilteredBody>,
        Error = filterbox::FilterError,
        Future: Send,
    > + Clone
    + Send
    + 'static
{
}

impl<S> ListenerService for S where
    S: Service<
            http::Request<IdleBody>,
            Response = http::Response<FilteredBody>,
            Error = filterbox::FilterError,
            Future: Send,
        > + Clone
        + Send
        + 'static
{
}

/// Accepts client connections on `socket` (with TLS when `tls` is set) and serves each on a
/// task of its own until the listener is stopped.
pub(super) async fn accept_loop<S: ListenerService>(
    socket: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    service: S,
    shared: Arc<Shared>,
    workers: Arc<workers::Workers>,
) {
    loop {
        let (stream, peer) = match socket.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!("accept: {error}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (service, shared, tls) = (service.clone(), shared.clone(), tls.clone());
        workers.serve(stream, move |stream| async move {
            let mut connection = ConnectionInfo {
                source: Some(peer),
                destination: stream.local_addr().ok(),
                ..ConnectionInfo::default()
            };
            let Some(tls) = tls else {
                return serve_client(stream, Arc::new(connection), service, shared).await;
            };
            // The handshake gets the time a request head gets.
            let stream = match tokio::time::timeout(HEADER_READ_TIMEOUT, tls.accept(stream)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => return tracing::debug!(%peer, "TLS handshake: {error}"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            let (_, session) = stream.get_ref();
            connection.tls_version = session.protocol_version().map(envoy_tls_version);
            connection.requested_server_name = session.server_name().map(str::to_owned);
            serve_client(stream, Arc::new(connection), service, shared).await;
        });
    }
}

/// A TLS version in Envoy's spelling (`TLSv1.3`; rustls names it `TLSv1_3`).
pub(super) fn envoy_tls_version(version: rustls::ProtocolVersion) -> String {
    format!("{version:?}").replace("TLSv1_", "TLSv1.")
}

/// Serves one client connection: every request through `service` (the plugins, then the
/// upstream), with the connection's attributes for the plugins.
pub(super) async fn serve_client<I, S>(
    io: I,
    connection: Arc<ConnectionInfo>,
    service: S,
    shared: Arc<Shared>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: ListenerService,
{
    let graceful = shared.clone();
    let graceful = &graceful.graceful;
    let handler = service_fn(move |request: http::Request<Incoming>| {
        let mut service = service.clone();
        let shared = shared.clone();
        let connection = connection.clone();
        async move {
            shared.requests.fetch_add(1, Ordering::Relaxed);
            if let Some(refused) = refuse(&request) {
                return Ok::<_, std::convert::Infallible>(refused);
            }
            let idle = shared.body_idle;
            let mut request = request.map(|body| IdleBody::new(body, idle));
            request.extensions_mut().insert(connection);
            let router = shared.router.read().clone();
            router.route(&mut request);
            let response: http::Response<ProxyBody> = match service.call(request).await {
                Ok(response) => response.map(http_body_util::Either::Left),
                // The client's fault: a malformed (chunked) body or one that stalled. The
                // upstream request was dropped unfinished with it.
                Err(filterbox::FilterError::RequestBody(error)) => {
                    shared.request_body_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("request body: {error}");
                    let status = match error.is::<BodyIdle>() {
                        true => http::StatusCode::REQUEST_TIMEOUT,
                        false => http::StatusCode::BAD_REQUEST,
                    };
                    text(status, format!("filterbox: request body: {error}\n"))
                }
                Err(error) => {
                    shared.upstream_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("{error}");
                    text(
                        http::StatusCode::BAD_GATEWAY,
                        format!("filterbox: {error}\n"),
                    )
                }
            };
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    // HTTP/1.1 or HTTP/2 (ALPN on TLS, prior knowledge otherwise). A client gets
    // HEADER_READ_TIMEOUT to send a request head, so half-sent requests cannot hold
    // connections for ever.
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    // Shutting down: the connection came in as the listener stopped.
    let Some(watcher) = graceful.lock().as_ref().map(|g| g.watcher()) else {
        return;
    };
    let connection = builder.serve_connection(TokioIo::new(io), handler);
    if let Err(error) = watcher.watch(connection).await {
        tracing::debug!("connection: {error}");
    }
}
