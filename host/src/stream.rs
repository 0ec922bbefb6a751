//! What a stream callback tells the proxy: the vocabulary the VM, the hostcalls and the
//! exchange share, in a module of its own so that none of them imports another for it.

use crate::HeaderMap;
use bytes::Bytes;
use filterbox_abi::{GrpcStatus, StreamType};

/// What the proxy must do after a stream callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Go on with the next filter or the upstream.
    Continue,
    /// Stop here: hold headers, or buffer the body and call again with more of it, until the
    /// plugin resumes the stream (see [`Vm::take_stream_events`](crate::Vm::take_stream_events)).
    Pause,
    /// Answer the client with this response instead.
    Respond(LocalResponse),
}

/// A response a plugin sent with `proxy_send_local_response`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    /// HTTP status code.
    pub status_code: u32,
    /// Response code details (why the plugin answered).
    pub details: String,
    /// Response body.
    pub body: Bytes,
    /// Additional headers (names lower-cased).
    pub headers: HeaderMap,
    /// gRPC status, for a gRPC response.
    pub grpc_status: Option<GrpcStatus>,
}

impl LocalResponse {
    /// A response with `status_code` and `details` and no body, headers or gRPC status: what
    /// the host (a failure policy, a limit, a proxy's own check) answers on its own.
    pub fn new(status_code: u32, details: impl Into<String>) -> Self {
        LocalResponse {
            status_code,
            details: details.into(),
            body: Bytes::new(),
            headers: HeaderMap::new(),
            grpc_status: None,
        }
    }
}

/// Something a plugin asked of a stream outside the return value of a callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// Resume a paused direction (`proxy_continue_stream`, `proxy_continue_request/response`).
    Continue(StreamType),
    /// Reset the stream (`proxy_close_stream`).
    Close(StreamType),
    /// Answer the client with this response (sent from a callback that was not the
    /// stream's own, such as an HTTP-call answer).
    Respond(LocalResponse),
    /// Recompute the route (`proxy_clear_route_cache`, ABI 0.1.0): headers that choose it
    /// changed.
    ClearRouteCache,
}
