//! Real servers on 127.0.0.1 for the callout cases: an HTTP/1.1 upstream and an HTTP/2 gRPC
//! upstream (raw-bytes messages, standard length-prefixed framing and trailers), both on one
//! tokio runtime started the first time a case needs them.
//!
//! HTTP routes: `/lookup` → 200 `found` (header `x-upstream: yes`, trailer-free); `/slow` →
//! 200 after 3 s; anything else → 404.
//! gRPC methods: `test.Echo/Unary` answers `echo: <message>`; `test.Echo/Stream` sends back
//! the `x-echo` metadata, answers each message with `pong: <message>` and ends with status 0
//! when the client half-closes; `test.Echo/Fail` answers status 5 (`NOT_FOUND`) "nope" in a
//! trailers-only response.

use bytes::{Buf, Bytes, BytesMut};
use core::pin::Pin;
use core::task::{Context, Poll};
use filterbox::HyperCallouts;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

/// A loopback port nothing listens on, for a server a test starts later to bind. Taken below
/// Linux's ephemeral range (32768 and up), where neither a `bind` to port 0 nor an outgoing
/// connection's source port lands: a port handed out by the kernel could be given to another
/// test's socket before that server binds it. Each call in this process tries another port.
pub fn free_port() -> SocketAddr {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let spread = std::process::id() % 997 * 12;
    loop {
        let offset = (spread + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) % 12_000;
        let Ok(port) = u16::try_from(20_000 + offset) else {
            continue;
        };
        // Free now; dropped at once, so the caller's server can take it.
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return SocketAddr::from(([127, 0, 0, 1], port));
        }
    }
}

/// Waits until `answers()` says the server `name`, started as `child` to listen on `address`,
/// is up. `Err` if the process exits first or does not answer within 30 s.
pub fn wait_until_answering(
    child: &mut std::process::Child,
    name: &str,
    address: SocketAddr,
    answers: impl Fn() -> bool,
) -> Result<(), String> {
    let started = std::time::Instant::now();
    while !answers() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{name} exited at start: {status}"));
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err(format!("{name} did not answer on {address} within 30 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The running servers.
pub struct Servers {
    runtime: Runtime,
    /// The HTTP/1.1 upstream.
    pub http: SocketAddr,
    /// The gRPC upstream.
    pub grpc: SocketAddr,
    /// A port nothing listens on.
    pub closed: SocketAddr,
}

impl Servers {
    /// The servers, started on first use; an error says why they could not start.
    pub fn get() -> Result<&'static Servers, String> {
        static SERVERS: OnceLock<Result<Servers, String>> = OnceLock::new();
        SERVERS.get_or_init(start).as_ref().map_err(Clone::clone)
    }

    /// A callout client with upstreams `backend` (HTTP), `grpc` and `closed` (nothing
    /// listening), running on the servers' runtime.
    pub fn callouts(&self) -> Result<Arc<HyperCallouts>, String> {
        let url = |addr: SocketAddr| format!("http://{addr}");
        HyperCallouts::new(self.runtime.handle().clone())
            .upstream("backend", &url(self.http))
            .and_then(|c| c.upstream("grpc", &url(self.grpc)))
            .and_then(|c| c.upstream("closed", &url(self.closed)))
            .map(Arc::new)
            .map_err(|e| e.to_string())
    }
}

fn start() -> Result<Servers, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("conformance-servers")
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let bind = || async { TcpListener::bind("127.0.0.1:0").await };
    let (http, grpc, closed) = runtime
        .block_on(async {
            let http = bind().await?;
            let grpc = bind().await?;
            // Bound then dropped: a port that refuses connections.
            let closed = bind().await?.local_addr()?;
            Ok::<_, std::io::Error>((http, grpc, closed))
        })
        .map_err(|e| format!("binding loopback servers: {e}"))?;
    let addrs = (
        http.local_addr().map_err(|e| e.to_string())?,
        grpc.local_addr().map_err(|e| e.to_string())?,
    );
    runtime.spawn(serve(http, false));
    runtime.spawn(serve(grpc, true));
    Ok(Servers {
        runtime,
        http: addrs.0,
        grpc: addrs.1,
        closed,
    })
}

async fn serve(listener: TcpListener, grpc: bool) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let io = TokioIo::new(stream);
        tokio::spawn(async move {
            if grpc {
                let service = service_fn(grpc_route);
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(io, service)
                    .await;
            } else {
                let service = service_fn(http_route);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            }
        });
    }
}

/// A response body fed from a channel: data frames, then trailers.
struct ChannelBody(mpsc::UnboundedReceiver<Frame<Bytes>>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

fn whole(body: Bytes) -> ChannelBody {
    let (tx, rx) = mpsc::unbounded_channel();
    if !body.is_empty() {
        let _ = tx.send(Frame::data(body));
    }
    ChannelBody(rx)
}

async fn http_route(request: Request<Incoming>) -> Result<Response<ChannelBody>, Infallible> {
    let path = request.uri().path().to_owned();
    let _ = request.into_body().collect().await;
    let mut response = Response::new(whole(Bytes::new()));
    match path.as_str() {
        "/lookup" => {
            *response.body_mut() = whole(Bytes::from_static(b"found"));
            response
                .headers_mut()
                .insert("x-upstream", HeaderValue::from_static("yes"));
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            *response.body_mut() = whole(Bytes::from_static(b"late"));
        }
        _ => *response.status_mut() = StatusCode::NOT_FOUND,
    }
    Ok(response)
}

fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.extend_from_slice(&[0]);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out.freeze()
}

fn trailers(status: u32, message: &str) -> Frame<Bytes> {
    let mut map = HeaderMap::new();
    map.insert("grpc-status", HeaderValue::from(status));
    if let Ok(message) = HeaderValue::from_str(message)
        && !message.is_empty()
    {
        map.insert("grpc-message", message);
    }
    Frame::trailers(map)
}

/// Reads length-prefixed messages from a request body and passes each to `on_message`.
async fn read_messages(mut body: Incoming, mut on_message: impl FnMut(Bytes)) {
    let mut buffer = BytesMut::new();
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(mut data) = frame.into_data() {
            buffer.extend_from_slice(&data.copy_to_bytes(data.remaining()));
            while buffer.len() >= 5 {
                let len = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]);
                if buffer.len() < 5 + len as usize {
                    break;
                }
                let mut message = buffer.split_to(5 + len as usize);
                message.advance(5);
                on_message(message.freeze());
            }
        }
    }
}

async fn grpc_route(request: Request<Incoming>) -> Result<Response<ChannelBody>, Infallible> {
    let path = request.uri().path().to_owned();
    let echo = request.headers().get("x-echo").cloned();
    let (tx, rx) = mpsc::unbounded_channel();
    let mut response = Response::new(ChannelBody(rx));
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("application/grpc"));
    let body = request.into_body();
    match path.as_str() {
        "/test.Echo/Unary" => {
            tokio::spawn(async move {
                let mut messages = Vec::new();
                read_messages(body, |m| messages.push(m)).await;
                let first = messages.first().cloned().unwrap_or_default();
                let answer = [b"echo: ".as_slice(), &first].concat();
                let _ = tx.send(Frame::data(frame(&answer)));
                let _ = tx.send(trailers(0, ""));
            });
        }
        "/test.Echo/Stream" => {
            if let Some(echo) = echo {
                headers.insert("x-echo", echo);
            }
            tokio::spawn(async move {
                read_messages(body, |m| {
                    let answer = [b"pong: ".as_slice(), &m].concat();
                    let _ = tx.send(Frame::data(frame(&answer)));
                })
                .await;
                let _ = tx.send(trailers(0, ""));
            });
        }
        _ => {
            // Trailers-only: the status rides in the headers.
            headers.insert("grpc-status", HeaderValue::from(5u32));
            headers.insert("grpc-message", HeaderValue::from_static("nope"));
            drop(tx);
        }
    }
    Ok(response)
}
