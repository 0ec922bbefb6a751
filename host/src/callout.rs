//! Outbound calls a plugin makes (`proxy_http_call`, `proxy_grpc_*`): requests, answers,
//! errors and the byte budget. The trait through which the embedder carries them out and the
//! reply handles it answers with are in `callouts`.
//!
//! The host checks and decodes what the guest passed, then hands a [`HttpCallRequest`] or
//! [`GrpcRequest`] to the plugin's [`Callouts`](crate::Callouts) with a reply handle. The embedder answers on
//! any thread, whenever it likes; the answer waits in the VM's inbox until the VM's own thread
//! delivers it (see [`Vm::dispatch_pending`](crate::Vm::dispatch_pending)). A reply handle
//! dropped without an answer reports a failure, so a call can never hang forever.

use crate::HeaderMap;
use bytes::Bytes;
use core::fmt;
use filterbox_abi::GrpcStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    pub(crate) fn grow(&self, bytes: usize) -> Result<(), OverBudget> {
        if !self.budget.take(bytes) {
            return Err(OverBudget {
                limit: self.budget.max,
            });
        }
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
        Ok(())
    }

    pub(crate) fn bytes(&self) -> usize {
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
