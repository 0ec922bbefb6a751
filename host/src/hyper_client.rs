//! The default [`Callouts`]: HTTP calls and gRPC over hyper on a tokio runtime, to upstreams
//! named in a table (name → URL). Names not in the table are refused, which makes the table
//! the plugin's egress allowlist.

use crate::HeaderMap;
use crate::callout::{
    CalloutError, GrpcEvent, GrpcRequest, HttpCallOutcome, HttpCallRequest, HttpCallResponse,
};
use crate::callouts::{Callouts, GrpcReply, GrpcStream, HttpCallReply};
use bytes::{Buf, Bytes, BytesMut};
use core::fmt;
use core::pin::Pin;
use core::task::{Context, Poll};
use filterbox_abi::GrpcStatus;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Method, Request, Uri};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::rt::TokioExecutor;
use std::collections::HashMap;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Where an upstream name points.
#[derive(Debug, Clone)]
struct Upstream {
    scheme: Scheme,
    authority: Authority,
}

/// HTTP calls (HTTP/1.1) and gRPC (HTTP/2, prior knowledge) over hyper, run on a tokio
/// runtime the embedder owns. With [`HyperCallouts::new`], `http://` upstreams only; TLS is
/// the embedder's choice of crate: [`HyperCallouts::with_connector`] takes a connector that
/// speaks it (hyper-rustls's, say) and then `https://` upstreams too.
///
/// As Envoy answers its plugins: a call that times out gets a `504` response and one whose
/// upstream cannot be reached a `503`; a connection that breaks after the response started,
/// or a response over the size limit, is a failure (`proxy_get_status` = `BrokenConnection`).
pub struct HyperCallouts<C = HttpConnector> {
    runtime: Handle,
    upstreams: HashMap<String, Upstream>,
    http: Client<C, OnceBody>,
    grpc: Client<C, ChannelBody>,
    max_response_bytes: usize,
    /// The connector speaks TLS: `https://` upstreams are accepted.
    https: bool,
}

impl<C> fmt::Debug for HyperCallouts<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HyperCallouts")
            .field("upstreams", &self.upstreams)
            .field("max_response_bytes", &self.max_response_bytes)
            .finish_non_exhaustive()
    }
}

impl HyperCallouts {
    /// A client running its calls on `runtime`, with no upstreams yet (plain TCP).
    pub fn new(runtime: Handle) -> Self {
        HyperCallouts::with_connector(runtime, HttpConnector::new(), false)
    }
}

impl<C> HyperCallouts<C>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    /// A client running its calls on `runtime` through `connector`; `https`: the connector
    /// speaks TLS for `https://` URIs, so such upstreams are accepted.
    pub fn with_connector(runtime: Handle, connector: C, https: bool) -> Self {
        let mut grpc = Client::builder(TokioExecutor::new());
        grpc.http2_only(true);
        HyperCallouts {
            runtime,
            upstreams: HashMap::new(),
            http: Client::builder(TokioExecutor::new()).build(connector.clone()),
            grpc: grpc.build(connector),
            max_response_bytes: 16 << 20,
            https,
        }
    }

    /// Names an upstream: plugins call `name`, the client connects to `url`
    /// (`http://host:port`, or `https://` with a TLS connector; a path in it is ignored).
    pub fn upstream(mut self, name: impl Into<String>, url: &str) -> Result<Self, CalloutError> {
        let name = name.into();
        let bad =
            |why: &str| CalloutError::BadRequest(format!("upstream {name:?} = {url:?}: {why}"));
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        let scheme = uri.scheme().cloned().ok_or_else(|| bad("no scheme"))?;
        if scheme != Scheme::HTTP && !(self.https && scheme == Scheme::HTTPS) {
            return Err(bad(match self.https {
                true => "only http:// and https:// are supported",
                false => "only http:// is supported (https:// needs a TLS connector)",
            }));
        }
        let authority = uri.authority().cloned().ok_or_else(|| bad("no host"))?;
        self.upstreams.insert(name, Upstream { scheme, authority });
        Ok(self)
    }

    /// Largest response body (HTTP) or message (gRPC) accepted (default 16 MiB).
    pub fn max_response_bytes(mut self, bytes: usize) -> Self {
        self.max_response_bytes = bytes;
        self
    }

    fn resolve(&self, name: &str) -> Result<&Upstream, CalloutError> {
        self.upstreams
            .get(name)
            .ok_or_else(|| CalloutError::UnknownUpstream(name.to_owned()))
    }
}

fn bad_request(why: impl fmt::Display) -> CalloutError {
    CalloutError::BadRequest(why.to_string())
}

fn status_response(status: u16, body: &'static str) -> HttpCallOutcome {
    let headers = [(":status", status.to_string())].into_iter().collect();
    HttpCallOutcome::Response(HttpCallResponse {
        headers,
        body: Bytes::from_static(body.as_bytes()),
        trailers: HeaderMap::default(),
    })
}

impl<C> Callouts for HyperCallouts<C>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    fn http_call(&self, call: HttpCallRequest, reply: HttpCallReply) -> Result<(), CalloutError> {
        let upstream = self.resolve(&call.upstream)?;
        let pseudo = |name: &str| call.headers.get(name.as_bytes());
        let method = pseudo(":method").ok_or_else(|| bad_request("no :method"))?;
        let method = Method::from_bytes(method).map_err(bad_request)?;
        let path = pseudo(":path").ok_or_else(|| bad_request("no :path"))?;
        let path = PathAndQuery::try_from(path.as_ref()).map_err(bad_request)?;
        let uri = Uri::builder()
            .scheme(upstream.scheme.clone())
            .authority(upstream.authority.clone())
            .path_and_query(path)
            .build()
            .map_err(bad_request)?;
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .body(OnceBody::new(call.body, &call.trailers)?)
            .map_err(bad_request)?;
        let headers = request.headers_mut();
        *headers = call.headers.to_http().map_err(bad_request)?;
        // The plugin's :authority is the Host the upstream sees.
        if let Some(authority) = pseudo(":authority")
            && !headers.contains_key(http::header::HOST)
        {
            headers.insert(
                http::header::HOST,
                HeaderValue::from_bytes(authority).map_err(bad_request)?,
            );
        }
        let client = self.http.clone();
        let limit = self.max_response_bytes;
        let timeout = call.timeout;
        self.runtime.spawn(async move {
            let exchange = async {
                let response = match client.request(request).await {
                    Ok(response) => response,
                    // Nothing came back: Envoy's router answers these with a 503.
                    Err(_) => {
                        return status_response(
                            503,
                            "upstream connect error or disconnect/reset before headers",
                        );
                    }
                };
                let (parts, body) = response.into_parts();
                let mut headers: HeaderMap = [(":status", parts.status.as_str().to_owned())]
                    .into_iter()
                    .collect();
                headers.extend(HeaderMap::from_http(&parts.headers));
                match read_answer(body, limit, &reply).await {
                    Ok((body, trailers)) => HttpCallOutcome::Response(HttpCallResponse {
                        headers,
                        body,
                        trailers,
                    }),
                    Err(why) => HttpCallOutcome::Failed(why),
                }
            };
            let call = async {
                match timeout {
                    Some(timeout) => tokio::time::timeout(timeout, exchange)
                        .await
                        .unwrap_or_else(|_| status_response(504, "upstream request timeout")),
                    None => exchange.await,
                }
            };
            // A call whose VM is gone stops at once: nobody hears its answer, and what it
            // holds (a connection, a response being read) must not outlive the VM.
            let outcome = tokio::select! {
                outcome = call => outcome,
                () = reply.abandoned() => return,
            };
            reply.send(outcome);
        });
        Ok(())
    }

    fn grpc_open(
        &self,
        call: GrpcRequest,
        mut reply: GrpcReply,
    ) -> Result<Box<dyn GrpcStream>, CalloutError> {
        let upstream = self.resolve(&call.upstream)?;
        let path = format!("/{}/{}", call.service, call.method);
        let uri = Uri::builder()
            .scheme(upstream.scheme.clone())
            .authority(upstream.authority.clone())
            .path_and_query(path)
            .build()
            .map_err(bad_request)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .body(ChannelBody { rx })
            .map_err(bad_request)?;
        let headers = request.headers_mut();
        *headers = call.initial_metadata.to_http().map_err(bad_request)?;
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
        let client = self.grpc.clone();
        let limit = self.max_response_bytes;
        let timeout = call.timeout;
        let task = self.runtime.spawn(async move {
            let exchange = grpc_exchange(client, request, limit, &mut reply);
            let (status, message) = match timeout {
                Some(timeout) => tokio::time::timeout(timeout, exchange).await.unwrap_or((
                    GrpcStatus::DeadlineExceeded.as_u32(),
                    "deadline exceeded".into(),
                )),
                None => exchange.await,
            };
            reply.send(GrpcEvent::Close { status, message });
        });
        Ok(Box::new(HyperGrpcStream { tx: Some(tx), task }))
    }
}

/// Reads an HTTP call's response body and trailers, each chunk counted against the VM's
/// callout budget as it arrives.
async fn read_answer(
    mut body: hyper::body::Incoming,
    limit: usize,
    reply: &HttpCallReply,
) -> Result<(Bytes, HeaderMap), String> {
    let mut data = BytesMut::new();
    let mut trailers = HeaderMap::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| "reset".to_owned())?;
        match frame.into_data() {
            Ok(chunk) => {
                if data.len().saturating_add(chunk.len()) > limit {
                    return Err(format!("response body over the {limit}-byte limit"));
                }
                reply
                    .reserve(chunk.len())
                    .map_err(|over| format!("response body {over}"))?;
                data.extend_from_slice(&chunk);
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers.extend(HeaderMap::from_http(&t));
                }
            }
        }
    }
    Ok((data.freeze(), trailers))
}

/// Runs one gRPC exchange, delivering metadata and messages; returns the final status.
async fn grpc_exchange<C: Connect + Clone + Send + Sync + 'static>(
    client: Client<C, ChannelBody>,
    request: Request<ChannelBody>,
    limit: usize,
    reply: &mut GrpcReply,
) -> (u32, String) {
    let unavailable = |why: String| (GrpcStatus::Unavailable.as_u32(), why);
    let response = match client.request(request).await {
        Ok(response) => response,
        Err(e) => return unavailable(format!("upstream unreachable: {e}")),
    };
    let (parts, mut body) = response.into_parts();
    if !parts.status.is_success() {
        return unavailable(format!("upstream answered HTTP {}", parts.status));
    }
    // A "trailers-only" response carries the status in its headers.
    let header_status = grpc_status(&parts.headers);
    reply.send(GrpcEvent::InitialMetadata(HeaderMap::from_http(
        &parts.headers,
    )));
    let mut buffer = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => return unavailable(format!("stream broke: {e}")),
        };
        let frame = match frame.into_data() {
            Ok(mut data) => {
                buffer.extend_from_slice(&data.copy_to_bytes(data.remaining()));
                // Every whole length-prefixed message in the buffer.
                while let [flag, l0, l1, l2, l3, ..] = buffer[..] {
                    let len = u32::from_be_bytes([l0, l1, l2, l3]) as usize;
                    if len > limit {
                        return (
                            GrpcStatus::ResourceExhausted.as_u32(),
                            format!("message of {len} bytes is over the {limit}-byte limit"),
                        );
                    }
                    if buffer.len() < 5 + len {
                        break;
                    }
                    if flag != 0 {
                        return (
                            GrpcStatus::Internal.as_u32(),
                            "compressed messages are not supported".into(),
                        );
                    }
                    let mut message = buffer.split_to(5 + len);
                    message.advance(5);
                    reply.send(GrpcEvent::Message(message.freeze()));
                    if reply.is_closed() {
                        // Over the VM's callout budget: the reply closed the call.
                        return (GrpcStatus::ResourceExhausted.as_u32(), String::new());
                    }
                }
                continue;
            }
            Err(frame) => frame,
        };
        if let Ok(trailers) = frame.into_trailers() {
            let status = grpc_status(&trailers);
            reply.send(GrpcEvent::TrailingMetadata(HeaderMap::from_http(&trailers)));
            return status.unwrap_or((GrpcStatus::Unknown.as_u32(), "no grpc-status".into()));
        }
    }
    header_status.unwrap_or_else(|| unavailable("stream ended without a status".into()))
}

fn grpc_status(headers: &http::HeaderMap) -> Option<(u32, String)> {
    let status = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Some((status, message))
}

/// The host's end of a gRPC call running on the runtime.
struct HyperGrpcStream {
    /// Messages to send; dropped to half-close.
    tx: Option<mpsc::UnboundedSender<Bytes>>,
    task: JoinHandle<()>,
}

impl GrpcStream for HyperGrpcStream {
    fn send(&mut self, message: Bytes, end_of_stream: bool) {
        if let Some(tx) = &self.tx {
            // The frame header and the message go as two pieces: the message is not copied,
            // so what it holds of the VM's callout budget is given back once it is sent.
            // (A message came from guest memory: it is under 4 GiB.)
            let len = u32::try_from(message.len()).unwrap_or(u32::MAX);
            let mut header = [0u8; 5];
            header[1..].copy_from_slice(&len.to_be_bytes());
            let _ = tx.send(Bytes::copy_from_slice(&header));
            let _ = tx.send(message);
        }
        if end_of_stream {
            self.tx = None;
        }
    }

    fn close(&mut self) {
        self.tx = None;
    }

    fn cancel(&mut self) {
        self.tx = None;
        self.task.abort();
    }
}

impl Drop for HyperGrpcStream {
    fn drop(&mut self) {
        // The plugin forgot the call (or its VM is gone): nobody is left to hear it.
        self.task.abort();
    }
}

/// A request body sent whole: data, then trailers if any.
pub(crate) struct OnceBody {
    data: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl OnceBody {
    fn new(data: Bytes, trailers: &HeaderMap) -> Result<Self, CalloutError> {
        let trailers = match trailers.is_empty() {
            true => None,
            false => Some(trailers.to_http().map_err(bad_request)?),
        };
        Ok(OnceBody {
            data: (!data.is_empty()).then_some(data),
            trailers,
        })
    }
}

impl Body for OnceBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let len = self.data.as_ref().map_or(0, |d| d.len() as u64);
        match self.trailers {
            None => http_body::SizeHint::with_exact(len),
            Some(_) => http_body::SizeHint::default(),
        }
    }
}

/// A request body fed from a channel: gRPC messages as the plugin sends them.
pub(crate) struct ChannelBody {
    rx: mpsc::UnboundedReceiver<Bytes>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|message| message.map(|m| Ok(Frame::data(m))))
    }
}
