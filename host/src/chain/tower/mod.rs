//! The tower adapter: [`FilterLayer`] and [`FilterService`] drive the exchange core with
//! `http` requests and responses. What crosses it: an `http::Request` in, the request the
//! plugins let through to the inner service, its response back through the plugins, and a
//! [`FilteredBody`] whose frames are filtered as the reader pulls them. The two halves of an
//! exchange (request, then response) are in [`phases`].

mod phases;

use super::body::FilteredBody;
use super::error::{BoxError, FilterError};
use super::exchange::Exchange;
use super::route::RouteName;
use super::{FilterChain, SharedChain};
use crate::vm::LocalResponse;
use http_body::Body;
use phases::{request_phase, response_phase};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tower_layer::Layer;
use tower_service::Service;

/// The tower layer: wraps a service in a [`FilterService`].
#[derive(Clone, Debug)]
pub struct FilterLayer {
    chain: SharedChain,
}

impl FilterLayer {
    /// Runs every exchange through `chain`.
    pub fn new(chain: FilterChain) -> Self {
        FilterLayer {
            chain: SharedChain::new(chain),
        }
    }

    /// Runs every exchange through whatever chain `chain` holds when the exchange starts.
    pub fn shared(chain: SharedChain) -> Self {
        FilterLayer { chain }
    }
}

impl<S> Layer<S> for FilterLayer {
    type Service = FilterService<S>;

    fn layer(&self, inner: S) -> FilterService<S> {
        FilterService {
            chain: self.chain.clone(),
            inner,
        }
    }
}

/// Runs the chain's plugins on a request, passes what they let through to the inner service,
/// and runs them (in reverse order) on its response. Bodies stream through the plugins frame
/// by frame with the proxy-wasm buffering semantics: a plugin that pauses on a chunk holds it
/// and sees the body accumulate on the next call; what a plugin lets through goes on at once
/// (the request body while the inner service runs, the response body from a task). Local
/// responses (a plugin's, the failure policy's, a limit's) go to the client without running
/// the response callbacks; `proxy_on_log` runs for every exchange, once its response body
/// has been read (or dropped).
///
/// Two request extensions steer it: a [`RouteName`] runs the exchange on that route of the
/// chain, and an `Arc<`[`ConnectionInfo`]`>` gives the plugins the connection's attributes
/// (`source.address` and the rest).
#[derive(Clone, Debug)]
pub struct FilterService<S> {
    chain: SharedChain,
    inner: S,
}

impl<S, B, RB> Service<http::Request<B>> for FilterService<S>
where
    S: Service<http::Request<FilteredBody>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError> + Send,
    RB: Body + Send + Unpin + 'static,
    RB::Data: Send,
    RB::Error: Into<BoxError> + Send,
{
    type Response = http::Response<FilteredBody>;
    type Error = FilterError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, FilterError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FilterError>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| FilterError::Service(e.into()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The clone that was driven to ready serves this call (tower's usual dance).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let chain = self.chain.current();
        let route = request.extensions().get::<RouteName>();
        let route = route.and_then(|name| chain.route(&name.0));
        let exchange = chain.into_exchange(route);
        if exchange.is_empty() {
            return Box::pin(pass_through(exchange, inner, request));
        }
        Box::pin(halves(exchange, inner, request))
    }
}

pin_project_lite::pin_project! {
    /// An exchange's future: the request half, then the response half in the same memory.
    /// One `async fn` awaiting both would keep the locals of each beside the other's (and
    /// its arguments twice): over 1.5 KiB against under 1 KiB here. The future is allocated
    /// once per request, and under 1 KiB that allocation is a thread-cache hit of glibc's
    /// malloc rather than its slow path.
    #[project = HalvesProjection]
    enum Halves<Request, Next, Response> {
        Request { #[pin] half: Request, next: Option<Next> },
        Response { #[pin] half: Response },
    }
}

/// A request or response body the service reads: what [`FilterService`] asks of both
/// (named once for the functions its future is made of).
pub(super) trait MessageBody:
    Body<Data: Send, Error: Into<BoxError> + Send> + Send + Unpin + 'static
{
}

impl<T: Body<Data: Send, Error: Into<BoxError> + Send> + Send + Unpin + 'static> MessageBody for T {}

/// The service [`FilterService`] wraps, answering with bodies of type `RB`.
pub(super) trait InnerService<RB>:
    Service<http::Request<FilteredBody>, Response = http::Response<RB>, Error: Into<BoxError>>
{
}

impl<RB, T> InnerService<RB> for T where
    T: Service<http::Request<FilteredBody>, Response = http::Response<RB>, Error: Into<BoxError>>
{
}

/// An exchange that runs plugins: [`request_phase`], then [`response_phase`].
fn halves<S, B, RB>(
    exchange: Exchange,
    inner: S,
    request: http::Request<B>,
) -> impl Future<Output = Ended> + Send
where
    S: InnerService<RB, Future: Send> + Send,
    B: MessageBody,
    RB: MessageBody,
{
    let (parts, body) = request.into_parts();
    Halves::new(
        request_phase(exchange, inner, parts, body),
        |exchange, response: http::Response<RB>| {
            let (parts, body) = response.into_parts();
            response_phase(exchange, parts, body)
        },
    )
}

impl<Request, Next, Response> Halves<Request, Next, Response> {
    fn new<RB>(half: Request, next: Next) -> Self
    where
        Next: FnOnce(Exchange, http::Response<RB>) -> Response,
    {
        Halves::Request {
            half,
            next: Some(next),
        }
    }
}

impl<Request, Next, Response, RB> Future for Halves<Request, Next, Response>
where
    Request: Future<Output = (Exchange, Result<http::Response<RB>, Ended>)>,
    Next: FnOnce(Exchange, http::Response<RB>) -> Response,
    Response: Future<Output = Ended>,
{
    type Output = Ended;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Ended> {
        loop {
            match self.as_mut().project() {
                HalvesProjection::Request { half, next } => {
                    let (exchange, response) = match half.poll(cx) {
                        Poll::Ready((exchange, Ok(response))) => (exchange, response),
                        Poll::Ready((_, Err(ended))) => return Poll::Ready(ended),
                        Poll::Pending => return Poll::Pending,
                    };
                    // Taken once: the request half is replaced right here.
                    let Some(next) = next.take() else {
                        return Poll::Ready(Err(FilterError::Reset(LocalResponse::new(
                            500,
                            "filterbox_polled_after_completion",
                        ))));
                    };
                    self.set(Halves::Response {
                        half: next(exchange, response),
                    });
                }
                HalvesProjection::Response { half } => return half.poll(cx),
            }
        }
    }
}

/// An exchange that runs no plugin: the bodies pass through untouched (lengths and all).
async fn pass_through<S, B, RB>(
    mut exchange: Exchange,
    mut inner: S,
    request: http::Request<B>,
) -> Ended
where
    S: InnerService<RB>,
    B: MessageBody,
    RB: MessageBody,
{
    exchange.pass_through();
    let request = request.map(|body| FilteredBody::boxed(body, FilterError::RequestBody));
    let response = inner
        .call(request)
        .await
        .map_err(|e| FilterError::Service(e.into()))?;
    Ok(response.map(|body| FilteredBody::boxed(body, FilterError::ResponseBody)))
}

/// How an exchange ended before the upstream's response came back: the reply to send (a
/// local response) or the error.
pub(super) type Ended = Result<http::Response<FilteredBody>, FilterError>;
