//! Stream control: local responses, continue and close.

use crate::LocalResponse;
use crate::state::{ContextKind, Phase};
use filterbox_abi::{GrpcStatus, LogLevel, Status, StreamType};

use super::marshal::*;

/// Most bytes of a local response's details (Envoy's response-code details) kept; the rest
/// is dropped.
pub(super) const MAX_DETAILS_BYTES: usize = 1024;

pub(super) fn proxy_send_local_response(
    cx: Cx<'_>,
    status_code: i32,
    details_ptr: i32,
    details_size: i32,
    body_ptr: i32,
    body_size: i32,
    headers_ptr: i32,
    headers_size: i32,
    grpc_status: i32,
) -> i32 {
    let (state, memory) = cx.split();
    let limits = &state.shared.config.limits;
    let details = tri!(read(&memory, details_ptr, details_size));
    let details = details.get(..MAX_DETAILS_BYTES).unwrap_or(details);
    let body = tri!(read_body(&memory, body_ptr, body_size, limits));
    let headers = tri!(decode_pairs(
        tri!(read(&memory, headers_ptr, headers_size)),
        limits
    ));
    if state.phase == Phase::Log {
        // The exchange is over; there is no response left to replace.
        return Status::BadArgument.as_i32();
    }
    if state.context_kind() != Some(ContextKind::Http) {
        // Envoy ignores it outside an HTTP stream and still answers Ok.
        let _ = state.shared.log(
            LogLevel::Warn,
            "filterbox: proxy_send_local_response outside an HTTP stream is ignored",
        );
        return Status::Ok.as_i32();
    }
    let context = state.context();
    state.local_response = Some((
        context,
        LocalResponse {
            status_code: status_code as u32,
            details: String::from_utf8_lossy(details).into_owned(),
            body,
            headers: headers.into_iter().collect(),
            // SDKs pass -1 for "not a gRPC response"; anything outside 0..=16 means none.
            grpc_status: GrpcStatus::from_u32(grpc_status as u32),
        },
    ));
    Status::Ok.as_i32()
}

pub(super) fn proxy_continue_stream(cx: Cx<'_>, stream_type: i32) -> i32 {
    match tri!(self::stream_type(stream_type)) {
        // Envoy cannot resume an upstream connection either.
        StreamType::Upstream => Status::Unimplemented.as_i32(),
        stream => {
            cx.host().stream_type_event(stream, false);
            Status::Ok.as_i32()
        }
    }
}

pub(super) fn proxy_close_stream(cx: Cx<'_>, stream_type: i32) -> i32 {
    let stream = tri!(self::stream_type(stream_type));
    cx.host().stream_type_event(stream, true);
    Status::Ok.as_i32()
}

pub(super) fn proxy_continue_request(cx: Cx<'_>) -> i32 {
    cx.host().stream_type_event(StreamType::HttpRequest, false);
    Status::Ok.as_i32()
}

pub(super) fn proxy_continue_response(cx: Cx<'_>) -> i32 {
    cx.host().stream_type_event(StreamType::HttpResponse, false);
    Status::Ok.as_i32()
}
