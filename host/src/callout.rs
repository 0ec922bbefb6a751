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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// The bytes one VM's callouts hold at once: request bodies and gRPC messages until the
/// client drops them (sent, or the call ended), answers from when the client reads them until
/// the plugin's callback has run. Bounded by
/// [`Limits::max_pending_callout_bytes`](crate::Limits::max_pending_callout_bytes).
#[derive(Debug)]
pub(crate) struct CalloutBytes {
    held: AtomicUsize,
    max: usize,
}

impl CalloutBytes {
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(CalloutBytes {
            held: AtomicUsize::new(0),
            max,
        })
    }

    /// Bytes held now.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// Counts `bytes` more, unless that would pass the limit.
    fn take(&self, bytes: usize) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|&total| total <= self.max)
            })
            .is_ok()
    }

    /// `data`, counted for as long as any clone of the returned `Bytes` lives (the client
    /// drops a request body once it is sent); `None` if it does not fit.
    pub(crate) fn counted(self: &Arc<Self>, data: Bytes) -> Option<Bytes> {
        let claim = Claim::new(self);
        claim.grow(data.len()).ok()?;
        if data.is_empty() {
            return Some(data);
        }
        Some(Bytes::from_owner(Counted {
            data,
            _claim: claim,
        }))
    }
}

/// Bytes counted against a VM's callout budget until dropped.
#[derive(Debug)]
pub(crate) struct Claim {
    budget: Arc<CalloutBytes>,
    bytes: AtomicUsize,
}

impl Claim {
    pub(crate) fn new(budget: &Arc<CalloutBytes>) -> Self {
        Claim {
            budget: budget.clone(),
            bytes: AtomicUsize::new(0),
        }
    }

    /// Counts `bytes` more in this claim, unless the budget is spent.
    fn grow(&self, bytes: usize) -> Result<(), OverBudget> {
        if !self.budget.take(bytes) {
            return Err(OverBudget {
                limit: self.budget.max,
            });
        }
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
        Ok(())
    }

    fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.budget
            .held
            .fetch_sub(*self.bytes.get_mut(), Ordering::AcqRel);
    }
}

/// Bytes that keep their claim alive.
struct Counted {
    data: Bytes,
    _claim: Claim,
}

impl AsRef<[u8]> for Counted {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

/// An answer would take its VM past
/// [`Limits::max_pending_callout_bytes`](crate::Limits::max_pending_callout_bytes): fail the
/// call rather than read on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverBudget {
    limit: usize,
}

impl OverBudget {
    /// The VM's budget in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

impl fmt::Display for OverBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "over the {}-byte budget for the VM's pending callouts",
            self.limit
        )
    }
}

impl std::error::Error for OverBudget {}

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
#[non_exhaustive]
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
    /// What the answer holds of the VM's callout budget, from when the client reads it.
    claim: Claim,
}

impl HttpCallReply {
    pub(crate) fn new(inbox: &Arc<Inbox>, token: u32) -> Self {
        HttpCallReply {
            inbox: Arc::downgrade(inbox),
            gone: inbox.gone(),
            token,
            sent: false,
            claim: Claim::new(inbox.budget()),
        }
    }

    /// Counts `bytes` of the answer (a body chunk just read) against the VM's budget for
    /// pending callouts. Call it as the answer is read, so that many large answers cannot be
    /// buffered at once; on `Err`, stop reading and send a failure. [`HttpCallReply::send`]
    /// counts whatever was not reserved, and fails the call if it does not fit.
    pub fn reserve(&self, bytes: usize) -> Result<(), OverBudget> {
        self.claim.grow(bytes)
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
        let Some(inbox) = self.inbox.upgrade() else {
            return;
        };
        let mut outcome = outcome;
        if let HttpCallOutcome::Response(response) = &outcome {
            let size =
                response.headers.byte_size() + response.body.len() + response.trailers.byte_size();
            if let Err(over) = self.reserve(size.saturating_sub(self.claim.bytes())) {
                outcome = HttpCallOutcome::Failed(format!("response of {size} bytes is {over}"));
            }
        }
        let claim = std::mem::replace(&mut self.claim, Claim::new(inbox.budget()));
        inbox.push(Pending::HttpResponse {
            token: self.token,
            outcome,
            claim,
        });
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

    /// Whether a close was delivered (sent, or because a message was over the VM's budget
    /// for pending callouts): stop the call, nothing more is heard.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Delivers one event. Nothing is delivered after a close. A message that would take the
    /// VM past its budget for pending callouts closes the call with `RESOURCE_EXHAUSTED`
    /// instead.
    pub fn send(&mut self, event: GrpcEvent) {
        if self.closed {
            return;
        }
        let Some(inbox) = self.inbox.upgrade() else {
            self.closed = true;
            return;
        };
        let claim = Claim::new(inbox.budget());
        let mut event = event;
        if let GrpcEvent::Message(message) = &event
            && let Err(over) = claim.grow(message.len())
        {
            let why = format!("message of {} bytes is {over}", message.len());
            event = GrpcEvent::close(GrpcStatus::ResourceExhausted, why);
        }
        self.closed = matches!(event, GrpcEvent::Close { .. });
        inbox.push(Pending::Grpc {
            token: self.token,
            event,
            claim,
        });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_bytes_hold_their_budget_until_the_last_clone_drops() {
        let budget = CalloutBytes::new(100);
        let held = budget.counted(Bytes::from(vec![7u8; 60])).expect("fits");
        let clone = held.clone();
        assert_eq!(budget.held(), 60);
        assert!(budget.counted(Bytes::from(vec![7u8; 41])).is_none());
        drop(held);
        assert_eq!(budget.held(), 60, "a clone still holds the bytes");
        assert_eq!(&clone[..], &[7u8; 60][..]);
        drop(clone);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn a_grpc_message_over_the_budget_closes_the_call() {
        let inbox = Arc::new(Inbox::new(100));
        let mut reply = GrpcReply::new(&inbox, 2);
        reply.send(GrpcEvent::Message(Bytes::from(vec![1u8; 80])));
        assert_eq!(inbox.budget().held(), 80);
        reply.send(GrpcEvent::Message(Bytes::from(vec![1u8; 80])));
        assert!(reply.is_closed());
        let events: Vec<_> = inbox.take().into_iter().collect();
        assert!(matches!(
            events.as_slice(),
            [
                Pending::Grpc { event: GrpcEvent::Message(_), .. },
                Pending::Grpc { event: GrpcEvent::Close { status, .. }, .. },
            ] if *status == GrpcStatus::ResourceExhausted.as_u32()
        ));
        drop(events);
        assert_eq!(
            inbox.budget().held(),
            0,
            "delivered events give their bytes back"
        );
    }

    #[test]
    fn an_http_answer_over_the_budget_fails_the_call() {
        let inbox = Arc::new(Inbox::new(100));
        let reply = HttpCallReply::new(&inbox, 1);
        assert!(reply.reserve(60).is_ok());
        assert_eq!(reply.reserve(41).map_err(|e| e.limit()), Err(100));
        reply.send(HttpCallOutcome::Response(HttpCallResponse {
            body: Bytes::from(vec![0u8; 101]),
            ..HttpCallResponse::default()
        }));
        let events: Vec<_> = inbox.take().into_iter().collect();
        assert!(matches!(
            events.as_slice(),
            [Pending::HttpResponse { outcome: HttpCallOutcome::Failed(why), .. }]
                if why.contains("100-byte budget")
        ));
        drop(events);
        assert_eq!(inbox.budget().held(), 0);
    }
}
