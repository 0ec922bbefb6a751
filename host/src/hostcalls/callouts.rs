//! HTTP and gRPC callouts.

use crate::callout::{GrpcRequest, HttpCallRequest};
use crate::callouts::{GrpcReply, HttpCallReply};
use crate::state::OpenGrpc;
use filterbox_abi::Status;
use std::time::Duration;

use super::marshal::*;

/// A callout timeout: Envoy reads it as a signed int, so values past `i32::MAX` are
/// `BadArgument`; 0 means none.
pub(super) fn callout_timeout(timeout_ms: i32) -> Result<Option<Duration>, Status> {
    match timeout_ms {
        ..0 => Err(Status::BadArgument),
        0 => Ok(None),
        ms => Ok(Some(Duration::from_millis(ms as u64))),
    }
}

/// The gRPC work shared by `proxy_grpc_call` and `proxy_grpc_stream`: checks, opens the
/// stream through the embedder, sends a unary call's message, and writes the token.
#[allow(clippy::too_many_arguments)]
pub(super) fn grpc_open(
    cx: Cx<'_>,
    upstream: (i32, i32),
    service: (i32, i32),
    method: (i32, i32),
    metadata: (i32, i32),
    message: Option<(i32, i32)>,
    timeout_ms: i32,
    ret_token_ptr: i32,
) -> i32 {
    let (state, memory) = cx.split();
    let upstream = tri!(read_str(&memory, upstream.0, upstream.1));
    let service = tri!(read_str(&memory, service.0, service.1));
    let method = tri!(read_str(&memory, method.0, method.1));
    let limits = &state.shared.config.limits;
    let initial_metadata = tri!(decode_map(&memory, metadata.0, metadata.1, limits));
    let message = match message {
        Some((ptr, len)) => Some(tri!(read_body(&memory, ptr, len, limits))),
        None => None,
    };
    // The out-pointer is checked before anything is sent.
    tri!(memory.read(ret_token_ptr as u32, 4));
    let timeout = tri!(callout_timeout(timeout_ms));
    if state.pending_callouts() >= state.shared.config.limits.max_pending_callouts {
        return Status::InternalFailure.as_i32();
    }
    let message = match message.map(|m| state.inbox.budget().counted(m)) {
        Some(None) => return Status::InternalFailure.as_i32(),
        Some(Some(counted)) => Some(counted),
        None => None,
    };
    let unary = message.is_some();
    let token = state.next_token(if unary { 1 } else { 2 });
    let request = GrpcRequest {
        upstream,
        service,
        method,
        initial_metadata,
        timeout: if unary { timeout } else { None },
    };
    let reply = GrpcReply::new(&state.inbox, token);
    let callouts = state.shared.callouts.clone();
    let mut stream = tri!(embedder(|| {
        callouts
            .grpc_open(request, reply)
            .map_err(|e| e.status(true))
    }));
    if let Some(message) = message {
        stream.send(message, true);
    }
    let root = state.current_root();
    state.grpc.insert(
        token,
        OpenGrpc {
            root,
            unary,
            message: None,
            stream,
        },
    );
    write_words(&mut cx.memory(), &[(ret_token_ptr, token)]).as_i32()
}

pub(super) fn proxy_http_call(
    cx: Cx<'_>,
    upstream_ptr: i32,
    upstream_size: i32,
    headers_ptr: i32,
    headers_size: i32,
    body_ptr: i32,
    body_size: i32,
    trailers_ptr: i32,
    trailers_size: i32,
    timeout_ms: i32,
    ret_token_ptr: i32,
) -> i32 {
    let (state, mut memory) = cx.split();
    let upstream = tri!(read_str(&memory, upstream_ptr, upstream_size));
    let limits = &state.shared.config.limits;
    let headers = tri!(decode_map(&memory, headers_ptr, headers_size, limits));
    let body = tri!(read_body(&memory, body_ptr, body_size, limits));
    let trailers = tri!(decode_map(&memory, trailers_ptr, trailers_size, limits));
    // As the reference host: the token out-pointer is zeroed (and so checked) first.
    if write_words(&mut memory, &[(ret_token_ptr, 0)]) != Status::Ok {
        return Status::InvalidMemoryAccess.as_i32();
    }
    let timeout = tri!(callout_timeout(timeout_ms));
    // Envoy refuses a request it could not route.
    let has = |name: &[u8]| headers.get(name).is_some();
    if !has(b":method") || !has(b":path") || !(has(b":authority") || has(b"host")) {
        return Status::BadArgument.as_i32();
    }
    if state.pending_callouts() >= state.shared.config.limits.max_pending_callouts {
        return Status::InternalFailure.as_i32();
    }
    let Some(body) = state.inbox.budget().counted(body) else {
        return Status::InternalFailure.as_i32();
    };
    let token = state.next_token(0);
    let request = HttpCallRequest {
        upstream,
        headers,
        body,
        trailers,
        timeout,
    };
    let reply = HttpCallReply::new(&state.inbox, token);
    let callouts = state.shared.callouts.clone();
    tri!(embedder(|| {
        callouts
            .http_call(request, reply)
            .map_err(|e| e.status(false))
    }));
    let root = state.current_root();
    state.http_calls.insert(token, root);
    write_words(&mut memory, &[(ret_token_ptr, token)]).as_i32()
}

pub(super) fn proxy_grpc_call(
    cx: Cx<'_>,
    upstream_ptr: i32,
    upstream_size: i32,
    service_ptr: i32,
    service_size: i32,
    method_ptr: i32,
    method_size: i32,
    initial_metadata_ptr: i32,
    initial_metadata_size: i32,
    message_ptr: i32,
    message_size: i32,
    timeout_ms: i32,
    ret_token_ptr: i32,
) -> i32 {
    grpc_open(
        cx,
        (upstream_ptr, upstream_size),
        (service_ptr, service_size),
        (method_ptr, method_size),
        (initial_metadata_ptr, initial_metadata_size),
        Some((message_ptr, message_size)),
        timeout_ms,
        ret_token_ptr,
    )
}

pub(super) fn proxy_grpc_stream(
    cx: Cx<'_>,
    upstream_ptr: i32,
    upstream_size: i32,
    service_ptr: i32,
    service_size: i32,
    method_ptr: i32,
    method_size: i32,
    initial_metadata_ptr: i32,
    initial_metadata_size: i32,
    ret_token_ptr: i32,
) -> i32 {
    grpc_open(
        cx,
        (upstream_ptr, upstream_size),
        (service_ptr, service_size),
        (method_ptr, method_size),
        (initial_metadata_ptr, initial_metadata_size),
        None,
        0,
        ret_token_ptr,
    )
}

pub(super) fn proxy_grpc_send(
    cx: Cx<'_>,
    token: i32,
    message_ptr: i32,
    message_size: i32,
    end_stream: i32,
) -> i32 {
    let token = token as u32;
    if token & 3 != 2 {
        return Status::BadArgument.as_i32();
    }
    let (state, memory) = cx.split();
    let limits = &state.shared.config.limits;
    let message = tri!(read_body(&memory, message_ptr, message_size, limits));
    let Some(open) = state.grpc.get_mut(&token) else {
        return Status::NotFound.as_i32();
    };
    // Held by the client until sent: a stream whose upstream does not read fills the
    // budget, and then sends fail.
    let Some(message) = state.inbox.budget().counted(message) else {
        return Status::InternalFailure.as_i32();
    };
    let stream = &mut open.stream;
    tri!(embedder(|| {
        stream.send(message, end_stream != 0);
        Ok(())
    }));
    Status::Ok.as_i32()
}

pub(super) fn proxy_grpc_cancel(cx: Cx<'_>, token: i32) -> i32 {
    let token = token as u32;
    if !matches!(token & 3, 1 | 2) {
        return Status::BadArgument.as_i32();
    }
    // Cancelled and forgotten: no callback follows.
    let Some(mut open) = cx.host().grpc.remove(&token) else {
        return Status::NotFound.as_i32();
    };
    tri!(embedder(|| {
        open.stream.cancel();
        Ok(())
    }));
    Status::Ok.as_i32()
}

pub(super) fn proxy_grpc_close(cx: Cx<'_>, token: i32) -> i32 {
    let token = token as u32;
    match token & 3 {
        // A call: the same as cancel.
        1 => proxy_grpc_cancel(cx, token as i32),
        // A stream: half-close; what is in flight may still arrive.
        2 => {
            let Some(open) = cx.host().grpc.get_mut(&token) else {
                return Status::NotFound.as_i32();
            };
            let stream = &mut open.stream;
            tri!(embedder(|| {
                stream.close();
                Ok(())
            }));
            Status::Ok.as_i32()
        }
        _ => Status::BadArgument.as_i32(),
    }
}
