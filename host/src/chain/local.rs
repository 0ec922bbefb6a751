//! Local responses as the client gets them: status, headers and body of a plugin's (or the
//! chain's own) answer, with Envoy's gRPC mapping. Pure functions of `http` types; nothing
//! here touches a VM.

use crate::HeaderMap;
use crate::http_parts::HttpPartsError;
use crate::vm::LocalResponse;
use bytes::Bytes;
use filterbox_abi::GrpcStatus;

/// Whether the request is a gRPC call (its `content-type` is `application/grpc…`).
pub(super) fn is_grpc(request: &HeaderMap) -> bool {
    request
        .get_str("content-type")
        .is_some_and(|t| t.starts_with("application/grpc"))
}

/// A local response as the client gets it: the status, the response headers (with that
/// `:status`) and the body. Framing and hop-by-hop headers a plugin set are left out: the
/// proxy frames the body it sends. A gRPC call gets what Envoy sends: a trailers-only
/// response (HTTP 200, `content-type: application/grpc`, `grpc-status` from the plugin or
/// mapped from the HTTP status, the body as `grpc-message`) with no body.
pub(super) fn local_message(
    local: &LocalResponse,
    grpc: bool,
) -> (http::StatusCode, HeaderMap, Bytes) {
    let status = local_status(local.status_code);
    let sent = if grpc { http::StatusCode::OK } else { status };
    let mut headers = HeaderMap::new();
    headers.add(":status", sent.as_str().to_owned());
    for (name, value) in local.headers.iter() {
        if !is_framing(name) {
            headers.add(name.clone(), value.clone());
        }
    }
    if !grpc {
        if let Some(code) = local.grpc_status {
            headers.replace("grpc-status", code.as_u32().to_string());
        }
        return (sent, headers, local.body.clone());
    }
    let code = local
        .grpc_status
        .map_or_else(|| grpc_status_of(status), GrpcStatus::as_u32);
    headers.replace("content-type", "application/grpc");
    headers.replace("grpc-status", code.to_string());
    if !local.body.is_empty() {
        headers.replace("grpc-message", percent_encode(&local.body));
    }
    (sent, headers, Bytes::new())
}

/// The gRPC status Envoy gives a local reply of HTTP `status` that names none.
fn grpc_status_of(status: http::StatusCode) -> u32 {
    let code = match status.as_u16() {
        400 => GrpcStatus::Internal,
        401 => GrpcStatus::Unauthenticated,
        403 => GrpcStatus::PermissionDenied,
        404 => GrpcStatus::Unimplemented,
        429 | 502 | 503 | 504 => GrpcStatus::Unavailable,
        _ => GrpcStatus::Unknown,
    };
    code.as_u32()
}

/// `grpc-message` encoding: printable ASCII but `%` as it is, every other byte `%XX`.
fn percent_encode(text: &[u8]) -> String {
    let mut out = String::with_capacity(text.len());
    for &byte in text {
        match byte {
            b' '..=b'~' if byte != b'%' => out.push(char::from(byte)),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// A local response's status as HTTP has it (500 for one out of range).
pub(super) fn local_status(code: u32) -> http::StatusCode {
    u16::try_from(code)
        .ok()
        .and_then(|s| http::StatusCode::from_u16(s).ok())
        .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR)
}

/// Headers a plugin may not set on a local response: the proxy frames the body it sends (a
/// plugin's `content-length` next to a body of another length would split the response).
pub(super) fn is_framing(name: &[u8]) -> bool {
    name == b"content-length" || crate::http_parts::is_hop_by_hop(name)
}

/// A plugin left headers `http` cannot carry: answer 500 rather than forward garbage.
pub(super) fn invalid_edit(error: HttpPartsError) -> LocalResponse {
    tracing::warn!("plugin left invalid headers: {error}");
    LocalResponse::new(500, "filterbox_invalid_headers")
}

/// What a proxy answers when the plugins left headers its HTTP types cannot carry: a 500
/// with details `filterbox_invalid_headers` (the error is logged).
impl From<HttpPartsError> for LocalResponse {
    fn from(error: HttpPartsError) -> LocalResponse {
        invalid_edit(error)
    }
}

/// A local response as the client gets it, after the plugins' response phase.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LocalReply {
    /// The HTTP status sent (200 for a gRPC call, whose status is in `grpc-status`).
    pub status: u16,
    /// The response headers, with `:status`. Framing and hop-by-hop headers a plugin set are
    /// left out: the proxy frames the body it sends.
    pub headers: HeaderMap,
    /// The response body.
    pub body: Bytes,
    /// Why the exchange was answered (the plugin's details, or `filterbox_*` for the chain's
    /// own answers), for the access log.
    pub details: String,
}

impl LocalReply {
    /// The reply's headers as `http` headers for the client: no pseudo headers, no framing
    /// headers (the proxy frames the body it sends), and none that `http` refuses.
    pub fn http_headers(&self) -> http::HeaderMap {
        let mut headers = http::HeaderMap::with_capacity(self.headers.len());
        for (name, value) in self.headers.iter() {
            if name.starts_with(b":") || is_framing(name) {
                continue;
            }
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(name),
                http::HeaderValue::from_bytes(value),
            ) {
                let _ = headers.try_append(name, value);
            }
        }
        headers
    }
}
