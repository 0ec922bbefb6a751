//! The two halves of an exchange through the tower service: the request (headers through
//! the plugins, then the inner service called with the request, its body pumped through the
//! plugins as the service reads it) and the response (headers, then the body filtered whole
//! or pumped as the client reads it). What crosses it: `http` parts and bodies in, the
//! filtered message (or the local reply a plugin gave) out.

use super::{Ended, InnerService, MessageBody};
use crate::chain::body::{BODY_FRAMES_IN_FLIGHT, BodySender, FilteredBody};
use crate::chain::error::{BoxError, FilterError};
use crate::chain::exchange::Exchange;
use crate::chain::local::{LocalReply, invalid_edit};
use crate::chain::phase::Direction;
use crate::vm::LocalResponse;
use crate::{ConnectionInfo, HeaderMap};
use bytes::{Buf, Bytes};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use std::future::Future;
use std::sync::Arc;

/// The trailers plugins added at the end of `direction`'s body, as `http` trailers; `None`
/// if they added none.
async fn added_http_trailers(
    exchange: &Exchange,
    direction: Direction,
) -> Option<Result<http::HeaderMap, LocalResponse>> {
    match exchange.added_trailers(direction).await {
        Ok(added) => Some(added?.to_http().map_err(invalid_edit)),
        Err(response) => Some(Err(response)),
    }
}

/// Reads `body` frame by frame through the plugins of `direction` and sends what leaves the
/// chain to `out` as it goes (each plugin sees a body it pauses on accumulate).
async fn pump_body<B>(
    exchange: &Exchange,
    direction: Direction,
    mut first: Option<Frame<B::Data>>,
    mut body: B,
    out: &BodySender,
) -> Result<(), PumpEnd>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    let send =
        |frame: Frame<Bytes>| async move { out.send(Ok(frame)).await.map_err(|_| PumpEnd::Gone) };
    let mut trailers = None;
    loop {
        let frame = match first.take() {
            Some(frame) => frame,
            None => match body.frame().await {
                Some(frame) => frame.map_err(|e| PumpEnd::Body(e.into()))?,
                None => break,
            },
        };
        let frame = match frame.into_data() {
            Ok(mut data) => {
                let chunk = data.copy_to_bytes(data.remaining());
                // A body that knows it is done (a content length reached) ends with this
                // chunk, as Envoy marks the last data frame, saving an empty call.
                let ended = body.is_end_stream();
                let passed = exchange
                    .body_chunk(direction, chunk, ended)
                    .await
                    .map_err(PumpEnd::Local)?;
                if !passed.is_empty() {
                    send(Frame::data(passed.freeze())).await?;
                }
                if ended {
                    if let Some(added) = added_http_trailers(exchange, direction).await {
                        send(Frame::trailers(added.map_err(PumpEnd::Local)?)).await?;
                    }
                    return Ok(());
                }
                continue;
            }
            Err(frame) => frame,
        };
        if let Ok(map) = frame.into_trailers() {
            trailers = Some(HeaderMap::from_http(&map));
        }
    }
    let Some(trailers) = trailers else {
        let passed = exchange
            .body_chunk(direction, Bytes::new(), true)
            .await
            .map_err(PumpEnd::Local)?;
        if !passed.is_empty() {
            send(Frame::data(passed.freeze())).await?;
        }
        if let Some(added) = added_http_trailers(exchange, direction).await {
            send(Frame::trailers(added.map_err(PumpEnd::Local)?)).await?;
        }
        return Ok(());
    };
    // What plugins still held once the trailers went through comes first, in order.
    let (released, trailers) = exchange
        .trailers(direction, trailers)
        .await
        .map_err(PumpEnd::Local)?;
    if !released.is_empty() {
        send(Frame::data(released)).await?;
    }
    let trailers = trailers
        .to_http()
        .map_err(|e| PumpEnd::Local(invalid_edit(e)))?;
    send(Frame::trailers(trailers)).await
}

/// The request half of an exchange: the request headers through the plugins, then the
/// inner service called with the request (its body streamed through the plugins); gives the
/// exchange back with the service's response, or with how the exchange ended before it.
///
/// An `async` block rather than an `async fn` (here and in [`response_phase`]): the block uses
/// what it captured in place, where an `async fn` also moves each argument into a local of
/// its own, and the future would hold the request's parts twice.
// An async fn would hold its arguments twice (see above).
#[allow(clippy::manual_async_fn)]
pub(super) fn request_phase<S, B, RB>(
    mut exchange: Exchange,
    mut inner: S,
    mut parts: http::request::Parts,
    body: B,
) -> impl Future<Output = (Exchange, Result<http::Response<RB>, Ended>)>
where
    S: InnerService<RB>,
    B: MessageBody,
{
    async move {
        let result = 'phase: {
            // A server's request has no scheme in its URI; plugins get `:scheme` as in Envoy
            // when the connection says what it is.
            let connection = parts.extensions.get::<Arc<ConnectionInfo>>().cloned();
            let scheme = connection.as_ref().and_then(|connection| {
                parts
                    .uri
                    .scheme()
                    .is_none()
                    .then_some(match connection.tls_version {
                        Some(_) => "https",
                        None => "http",
                    })
            });
            if let Some(connection) = connection {
                exchange.set_connection(connection);
            }
            let headers = HeaderMap::from_request_parts_with_scheme(&parts, scheme);
            let passed = exchange
                .request_headers(headers, body.is_end_stream())
                .await;
            let headers = match passed {
                Ok(headers) => headers,
                Err(response) => break 'phase Err(Ok(reply(&mut exchange, response).await)),
            };
            // The connection's scheme left as given is not a URI change; a map no plugin
            // changed changes nothing.
            let changes = match headers.is_pristine() {
                true => Ok(()),
                false => headers
                    .request_changes_with(&parts, |s| scheme.is_some_and(|c| c.as_bytes() == s))
                    .and_then(|changes| changes.apply(&mut parts)),
            };
            if let Err(error) = changes {
                break 'phase Err(Ok(reply(&mut exchange, invalid_edit(error)).await));
            }
            // A request without a body needs no channel to carry one, and no pump: the inner
            // service is called right here. A body's pump and the race with the service live
            // in a box of their own, so that the common exchange's future stays small.
            let early = match body.is_end_stream() {
                true => Early::Response(
                    inner
                        .call(http::Request::from_parts(parts, FilteredBody::empty()))
                        .await
                        .map_err(|e| FilterError::Service(e.into())),
                ),
                false => Box::pin(stream_request(&exchange, inner, parts, body)).await,
            };
            match early {
                Early::Response(Ok(response)) => Ok(response),
                Early::Local(response) => Err(Ok(reply(&mut exchange, response).await)),
                Early::Response(Err(error)) | Early::Failed(error) => {
                    // `proxy_on_log` runs for failed exchanges too (an access log wants them).
                    exchange.finish_in_place();
                    Err(Err(error))
                }
            }
        };
        (exchange, result)
    }
}

/// The response half of an exchange: the response headers through the plugins (in reverse
/// order), then its body, filtered here when it is whole in its first frame, else by a pump
/// the reader of the body drives; the exchange ends with the body.
// An async fn would hold its arguments twice (see `request_phase`).
#[allow(clippy::manual_async_fn)]
pub(super) fn response_phase<RB>(
    mut exchange: Exchange,
    mut parts: http::response::Parts,
    body: RB,
) -> impl Future<Output = Ended>
where
    RB: MessageBody,
{
    async move {
        let headers = HeaderMap::from_response_parts(&parts);
        let headers = match exchange
            .response_headers(headers, body.is_end_stream())
            .await
        {
            Ok(headers) => headers,
            Err(response) => return Ok(reply_directly(&mut exchange, response)),
        };
        if !headers.is_pristine()
            && let Err(error) = headers.to_response_parts(&mut parts)
        {
            return Ok(reply_directly(&mut exchange, invalid_edit(error)));
        }
        if body.is_end_stream() {
            exchange.finish();
            return Ok(http::Response::from_parts(parts, FilteredBody::empty()));
        }
        // The headers go out with the first body frame. A body that is whole in that frame (the
        // common small response) is filtered here and sent in one piece: no pump, and a plugin
        // that answers on it can still replace the response.
        let mut body = body;
        let first = match body.frame().await {
            Some(Ok(frame)) => Some(frame),
            Some(Err(error)) => {
                exchange.finish();
                return Err(FilterError::ResponseBody(error.into()));
            }
            None => None,
        };
        let (whole, first) = match first.map(Frame::into_data) {
            None => (Some(Bytes::new()), None),
            Some(Ok(mut data)) if body.is_end_stream() => {
                (Some(data.copy_to_bytes(data.remaining())), None)
            }
            Some(Ok(data)) => (None, Some(Frame::data(data))),
            Some(Err(frame)) => (None, Some(frame)),
        };
        if let Some(chunk) = whole {
            let passed = match exchange.response_body(chunk, true).await {
                Ok(passed) => passed,
                Err(response) => return Ok(reply_directly(&mut exchange, response)),
            };
            let added = match added_http_trailers(&exchange, Direction::Response).await {
                Some(Err(response)) => return Ok(reply_directly(&mut exchange, response)),
                Some(Ok(trailers)) => Some(trailers),
                None => None,
            };
            exchange.finish();
            // Known in full, its length can be right whatever the plugins did.
            if parts.headers.contains_key(http::header::CONTENT_LENGTH) {
                let length = http::HeaderValue::from(passed.len());
                parts.headers.insert(http::header::CONTENT_LENGTH, length);
            }
            let body = match added {
                None => FilteredBody::full(passed),
                Some(trailers) => FilteredBody::with_trailers(passed, trailers),
            };
            return Ok(http::Response::from_parts(parts, body));
        }
        let (sender, receiver) = tokio::sync::mpsc::channel(BODY_FRAMES_IN_FLIGHT);
        // Whoever reads the body drives the pump (no task of its own: one fewer thread hop per
        // frame); a reader that drops the body drops the pump and with it the exchange.
        let pump = Box::pin(async move {
            let pumped = pump_body(&exchange, Direction::Response, first, body, &sender).await;
            let error = match pumped {
                Ok(()) | Err(PumpEnd::Gone) => None,
                Err(PumpEnd::Body(error)) => Some(FilterError::ResponseBody(error)),
                Err(PumpEnd::Local(response)) => {
                    // The response headers are gone: the client can only see the body break.
                    tracing::warn!(
                        status = response.status_code,
                        details = %response.details,
                        "a plugin answered after the response headers were sent; resetting"
                    );
                    Some(FilterError::Reset(response))
                }
            };
            if let Some(error) = error {
                let _ = sender.send(Err(error)).await;
            }
            exchange.finish();
        });
        Ok(http::Response::from_parts(
            parts,
            FilteredBody::pumped(receiver, pump),
        ))
    }
}

/// The inner service called with a request whose body streams through the plugins as the
/// service reads it; ends with the service's response or with what stopped the body.
async fn stream_request<S, B, RB>(
    exchange: &Exchange,
    mut inner: S,
    parts: http::request::Parts,
    body: B,
) -> Early<http::Response<RB>>
where
    S: InnerService<RB>,
    B: MessageBody,
{
    let (sender, receiver) = tokio::sync::mpsc::channel(BODY_FRAMES_IN_FLIGHT);
    let pump = async move {
        pump_body(exchange, Direction::Request, None, body, &sender).await
        // `sender` drops here: the body the service reads ends.
    };
    let call = inner.call(http::Request::from_parts(
        parts,
        FilteredBody::stream(receiver),
    ));
    tokio::pin!(pump, call);
    let mut pumping = true;
    loop {
        tokio::select! {
            ended = &mut pump, if pumping => match ended {
                Ok(()) | Err(PumpEnd::Gone) => pumping = false,
                Err(PumpEnd::Local(response)) => return Early::Local(response),
                Err(PumpEnd::Body(error)) => return Early::Failed(FilterError::RequestBody(error)),
            },
            // An upstream that answers before reading the whole body ends the request
            // phase there.
            response = &mut call => return Early::Response(response.map_err(|e| FilterError::Service(e.into()))),
        }
    }
}

/// A local response before the upstream answered, through the plugins' response phase
/// ([`Exchange::reply`]).
async fn reply(exchange: &mut Exchange, local: LocalResponse) -> http::Response<FilteredBody> {
    // Boxed: the rare local reply's future would otherwise make every exchange's future
    // larger (it is allocated and moved once per request).
    http_response(Box::pin(exchange.reply(local)).await)
}

/// A local response after the response phase began, sent as it is
/// ([`Exchange::reply_directly`]).
fn reply_directly(exchange: &mut Exchange, local: LocalResponse) -> http::Response<FilteredBody> {
    http_response(exchange.reply_directly(local))
}

/// The HTTP response for a local reply. Headers `http` refuses are left out, and so are
/// framing headers a plugin set in the response phase: the body is framed here.
fn http_response(reply: LocalReply) -> http::Response<FilteredBody> {
    let headers = reply.http_headers();
    let mut response = http::Response::new(FilteredBody::full(reply.body));
    *response.status_mut() =
        http::StatusCode::from_u16(reply.status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    *response.headers_mut() = headers;
    response
}

/// Why a body pump stopped early.
enum PumpEnd {
    /// A plugin (or a limit) answered the exchange.
    Local(LocalResponse),
    /// The body being read failed.
    Body(BoxError),
    /// Nobody reads the filtered body any more.
    Gone,
}

/// How the request phase ended.
enum Early<R> {
    Response(Result<R, FilterError>),
    Local(LocalResponse),
    Failed(FilterError),
}
