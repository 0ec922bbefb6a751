//! Outbound calls a plugin makes (`proxy_http_call`, `proxy_grpc_*`) and the trait through
//! which the embedder carries them out.
//!
//! The host checks and decodes what the guest passed, then hands a [`HttpCallRequest`] or
//! [`GrpcRequest`] to the plugin's [`Callouts`] with a reply handle. The embedder answers on
//! any thread, whenever it likes; the answer waits in the VM's inbox until the VM's own thread
//! delivers it (see [`Vm::dispatch_pending`](crate::Vm::dispatch_pending)). A reply handle
//! dropped without an answer reports a failure, so a call can never hang forever.

use crate::HeaderMap;
use crate::inbox::{Gone, Inbox, Pending};
use bytes::Bytes;
use core::fmt;
use filterbox_abi::GrpcStatus;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// An HTTP call a plugin asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCallRequest {
    /// The upstream name the plugin gave (an Envoy cluster name).
    pub upstream: String,
    /// Request headers, with the pseudo headers `:method`, `:path` and `:authority`.
    pub headers: HeaderMap,
    /// Request body.
    pub body: Bytes,
    /// Request trailers.
    pub trailers: HeaderMap,
    /// How long the call may take; `None` waits as long as the client does.
    pub timeout: Option<Duration>,
}

/// The answer to an HTTP call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpCallResponse {
    /// Response headers, with `:status`.
    pub headers: HeaderMap,
    /// Response body.
    pub body: Bytes,
    /// Response trailers.
    pub trailers: HeaderMap,
}

/// How an HTTP call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpCallOutcome {
    /// A response, whatever its status. As Envoy does, a client should answer a timeout with
    /// a `504` and an unreachable upstream with a `503` response rather than a failure.
    Response(HttpCallResponse),
    /// The call broke (reset, response too large). The plugin's callback gets no headers and
    /// `proxy_get_status` answers `BrokenConnection` with this message, as Envoy's "reset".
    Failed(String),
}

/// Why a call could not be started. The guest sees the status of [`CalloutError::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CalloutError {
    /// No upstream has that name (or the embedder does not allow it).
    UnknownUpstream(String),
    /// The request cannot be sent as given.
    BadRequest(String),
    /// The client could not send it.
    Failed(String),
    /// This host makes no calls of this kind.
    Unsupported,
}

impl CalloutError {
    /// The status the guest gets: as Envoy answers, an unknown upstream is `BadArgument` for
    /// HTTP and `ParseFailure` for gRPC; a bad request `BadArgument` for HTTP and
    /// `InternalFailure` for gRPC (an invalid service or method: the Rust SDK panics on
    /// anything else); a failure to send `InternalFailure`.
    pub fn status(&self, grpc: bool) -> filterbox_abi::Status {
        use filterbox_abi::Status;
        match self {
            CalloutError::UnknownUpstream(_) if grpc => Status::ParseFailure,
            CalloutError::BadRequest(_) if grpc => Status::InternalFailure,
            CalloutError::UnknownUpstream(_) | CalloutError::BadRequest(_) => Status::BadArgument,
            CalloutError::Failed(_) => Status::InternalFailure,
            CalloutError::Unsupported => Status::Unimplemented,
        }
    }
}

impl fmt::Display for CalloutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CalloutError::UnknownUpstream(name) => write!(f, "unknown upstream {name:?}"),
            CalloutError::BadRequest(why) => write!(f, "bad callout request: {why}"),
            CalloutError::Failed(why) => write!(f, "callout failed: {why}"),
            CalloutError::Unsupported => f.write_str("this host makes no such callouts"),
        }
    }
}

impl std::error::Error for CalloutError {}

/// Answers one HTTP call. Send it to any thread; [`HttpCallReply::send`] once.
#[derive(Debug)]
pub struct HttpCallReply {
    inbox: Weak<Inbox>,
    gone: Arc<Gone>,
    token: u32,
    sent: bool,
}

impl HttpCallReply {
    pub(crate) fn new(inbox: &Arc<Inbox>, token: u32) -> Self {
        HttpCallReply {
            inbox: Arc::downgrade(inbox),
            gone: inbox.gone(),
            token,
            sent: false,
        }
    }

    /// Whether the VM that made the call is gone (it trapped and was rebuilt, its plugin was
    /// reloaded, or it was dropped): nobody will hear the answer, so stop the call and free
    /// what it holds.
    pub fn is_abandoned(&self) -> bool {
        self.gone.is_set()
    }

    /// Resolves once [`HttpCallReply::is_abandoned`] turns true: race the call against it.
    #[cfg(feature = "tokio")]
    pub async fn abandoned(&self) {
        self.gone.wait().await
    }

    /// Delivers the outcome to the VM (dropped if the VM is gone).
    pub fn send(mut self, outcome: HttpCallOutcome) {
        self.deliver(outcome);
    }

    fn deliver(&mut self, outcome: HttpCallOutcome) {
        self.sent = true;
        if let Some(inbox) = self.inbox.upgrade() {
            inbox.push(Pending::HttpResponse {
                token: self.token,
                outcome,
            });
        }
    }
}

impl Drop for HttpCallReply {
    fn drop(&mut self) {
        if !self.sent {
            self.deliver(HttpCallOutcome::Failed(
                "callout dropped without an answer".into(),
            ));
        }
    }
}

/// A gRPC call or stream a plugin opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcRequest {
    /// The upstream name (a cluster name; a serialized `GrpcService` proto is not parsed).
    pub upstream: String,
    /// Fully qualified service name, e.g. `helloworld.Greeter`.
    pub service: String,
    /// Method name, e.g. `SayHello`.
    pub method: String,
    /// Initial metadata to send.
    pub initial_metadata: HeaderMap,
    /// Deadline of a unary call; streams have none.
    pub timeout: Option<Duration>,
}

/// Something that happened on a gRPC call or stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcEvent {
    /// The response headers.
    InitialMetadata(HeaderMap),
    /// One message (without the 5-byte gRPC frame header).
    Message(Bytes),
    /// The response trailers.
    TrailingMetadata(HeaderMap),
    /// The end: the `grpc-status` (as a raw code, 0 is OK) and `grpc-message`.
    Close {
        /// gRPC status code.
        status: u32,
        /// gRPC status message.
        message: String,
    },
}

impl GrpcEvent {
    /// A close with `status`.
    pub fn close(status: GrpcStatus, message: impl Into<String>) -> Self {
        GrpcEvent::Close {
            status: status.as_u32(),
            message: message.into(),
        }
    }
}

/// Delivers the events of one gRPC call or stream to the VM. Send it to any thread. Dropped
/// before a [`GrpcEvent::Close`], it closes with `UNAVAILABLE`.
#[derive(Debug)]
pub struct GrpcReply {
    inbox: Weak<Inbox>,
    gone: Arc<Gone>,
    token: u32,
    closed: bool,
}

impl GrpcReply {
    pub(crate) fn new(inbox: &Arc<Inbox>, token: u32) -> Self {
        GrpcReply {
            inbox: Arc::downgrade(inbox),
            gone: inbox.gone(),
            token,
            closed: false,
        }
    }

    /// Whether the VM that opened the call is gone: stop the call (see
    /// [`HttpCallReply::is_abandoned`]).
    pub fn is_abandoned(&self) -> bool {
        self.gone.is_set()
    }

    /// Resolves once [`GrpcReply::is_abandoned`] turns true.
    #[cfg(feature = "tokio")]
    pub async fn abandoned(&self) {
        self.gone.wait().await
    }

    /// Delivers one event. Nothing is delivered after a close.
    pub fn send(&mut self, event: GrpcEvent) {
        if self.closed {
            return;
        }
        self.closed = matches!(event, GrpcEvent::Close { .. });
        if let Some(inbox) = self.inbox.upgrade() {
            inbox.push(Pending::Grpc {
                token: self.token,
                event,
            });
        }
    }
}

impl Drop for GrpcReply {
    fn drop(&mut self) {
        self.send(GrpcEvent::close(
            GrpcStatus::Unavailable,
            "callout dropped without a close",
        ));
    }
}

/// The plugin's side of an open gRPC call or stream, held by the host.
pub trait GrpcStream: Send {
    /// Sends one message; `end_of_stream` half-closes after it.
    fn send(&mut self, message: Bytes, end_of_stream: bool);
    /// Half-closes: no more messages from the plugin; responses may still arrive.
    fn close(&mut self);
    /// Resets the call; nothing more is delivered.
    fn cancel(&mut self);
}

/// Carries out a plugin's outbound calls. Both methods must return quickly: start the call
/// and answer through the reply handle later, from any thread.
pub trait Callouts: Send + Sync {
    /// Starts an HTTP call.
    fn http_call(&self, request: HttpCallRequest, reply: HttpCallReply)
    -> Result<(), CalloutError>;

    /// Opens a gRPC call or stream. Unary calls are streams the host sends one message on,
    /// with `end_of_stream`.
    fn grpc_open(
        &self,
        request: GrpcRequest,
        reply: GrpcReply,
    ) -> Result<Box<dyn GrpcStream>, CalloutError>;
}

/// The default: no callouts. Every call answers [`CalloutError::Unsupported`].
#[derive(Debug, Default, Clone, Copy)]
pub struct NoCallouts;

impl Callouts for NoCallouts {
    fn http_call(&self, _: HttpCallRequest, _: HttpCallReply) -> Result<(), CalloutError> {
        Err(CalloutError::Unsupported)
    }

    fn grpc_open(&self, _: GrpcRequest, _: GrpcReply) -> Result<Box<dyn GrpcStream>, CalloutError> {
        Err(CalloutError::Unsupported)
    }
}
