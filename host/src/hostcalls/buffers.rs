//! Body and other buffers.

use filterbox_abi::{BufferType, Status};

use super::marshal::*;

pub(super) fn proxy_get_buffer_bytes(
    cx: Cx<'_>,
    buffer_type: i32,
    start: i32,
    max_size: i32,
    ret_ptr_ptr: i32,
    ret_size_ptr: i32,
) -> i32 {
    let kind = tri!(self::buffer_type(buffer_type));
    let len = tri!(cx.host().buffer(kind)).len() as u64;
    // 64-bit arithmetic: the Rust SDK passes max_size = u32::MAX to mean "everything".
    let (start, max_size) = (u64::from(start as u32), u64::from(max_size as u32));
    let length = if start >= len {
        0
    } else {
        max_size.min(len - start)
    };
    // Both fit in usize: they are at most the buffer's length.
    let (start, length) = (start as usize, length as usize);
    return_with(
        cx,
        length,
        ret_ptr_ptr,
        ret_size_ptr,
        |state, dst| match state
            .buffer(kind)
            .ok()
            .and_then(|b| b.get(start..start + length))
        {
            Some(src) => {
                dst.copy_from_slice(src);
                true
            }
            None => false,
        },
    )
    .as_i32()
}

pub(super) fn proxy_get_buffer_status(
    cx: Cx<'_>,
    buffer_type: i32,
    ret_size_ptr: i32,
    ret_flags_ptr: i32,
) -> i32 {
    let kind = tri!(self::buffer_type(buffer_type));
    let len = tri!(cx.host().buffer(kind)).len();
    let Ok(len) = u32::try_from(len) else {
        return Status::InternalFailure.as_i32();
    };
    write_words(&mut cx.memory(), &[(ret_size_ptr, len), (ret_flags_ptr, 0)]).as_i32()
}

pub(super) fn proxy_set_buffer_bytes(
    cx: Cx<'_>,
    buffer_type: i32,
    start: i32,
    size: i32,
    data_ptr: i32,
    data_size: i32,
) -> i32 {
    let kind = tri!(self::buffer_type(buffer_type));
    let (state, memory) = cx.split();
    let data = tri!(read(&memory, data_ptr, data_size));
    let mutable = matches!(
        kind,
        BufferType::HttpRequestBody
            | BufferType::HttpResponseBody
            | BufferType::DownstreamData
            | BufferType::UpstreamData
    );
    if !mutable {
        return Status::BadArgument.as_i32();
    }
    let max = state.shared.config.limits.max_body_bytes;
    let Some((_, body)) = state.body.as_mut().filter(|(k, _)| *k == kind) else {
        return Status::NotFound.as_i32();
    };
    // The spec's semantics, a superset of Envoy's: replace `size` bytes at `start` with
    // `data`; (0, 0) prepends, start >= len appends, (0, len) replaces everything.
    let len = body.len() as u64;
    let from = u64::from(start as u32).min(len) as usize;
    let to = (from as u64 + u64::from(size as u32)).min(len) as usize;
    if body.len() - (to - from) + data.len() > max {
        return Status::BadArgument.as_i32();
    }
    let tail = body.split_off(to);
    body.truncate(from);
    body.extend_from_slice(data);
    body.extend_from_slice(&tail);
    Status::Ok.as_i32()
}
