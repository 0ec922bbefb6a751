//! Logging, time, configuration, ticks, call status, effective context, foreign functions
//! and emscripten helpers.

use crate::StreamEvent;
use crate::state::Phase;
use bytes::Bytes;
use filterbox_abi::{BufferType, LogLevel, Status, property_path};
use std::time::{Duration, Instant};

use super::marshal::*;
use super::properties::set_property;
use super::wasi::realtime_nanos;

pub(super) fn proxy_log(cx: Cx<'_>, level: i32, message_ptr: i32, message_size: i32) -> i32 {
    let Some(level) = LogLevel::from_u32(level as u32) else {
        return Status::BadArgument.as_i32();
    };
    let (state, memory) = cx.split();
    let message = tri!(read(&memory, message_ptr, message_size));
    match state.shared.log_bytes(level, message, message.len()) {
        true => Status::Ok.as_i32(),
        // The embedder's sink panicked.
        false => Status::InternalFailure.as_i32(),
    }
}

pub(super) fn proxy_get_log_level(cx: Cx<'_>, ret_level_ptr: i32) -> i32 {
    let level = cx.host().shared.config.log_level.as_u32();
    write_words(&mut cx.memory(), &[(ret_level_ptr, level)]).as_i32()
}

pub(super) fn proxy_get_current_time_nanoseconds(cx: Cx<'_>, ret_time_ptr: i32) -> i32 {
    tri!(cx.memory().write_u64(ret_time_ptr as u32, realtime_nanos()));
    Status::Ok.as_i32()
}

pub(super) fn proxy_get_configuration(cx: Cx<'_>, ret_ptr_ptr: i32, ret_size_ptr: i32) -> i32 {
    // ABI 0.1.0: the plugin configuration inside on_configure, else the VM configuration.
    let state = cx.host();
    let buffer = match state.phase {
        Phase::Configure => BufferType::PluginConfiguration,
        _ => BufferType::VmConfiguration,
    };
    let len = tri!(state.buffer(buffer)).len();
    return_with(
        cx,
        len,
        ret_ptr_ptr,
        ret_size_ptr,
        |state, dst| match state.buffer(buffer) {
            Ok(bytes) if bytes.len() == dst.len() => {
                dst.copy_from_slice(bytes);
                true
            }
            _ => false,
        },
    )
    .as_i32()
}

pub(super) fn proxy_set_tick_period_milliseconds(cx: Cx<'_>, period_ms: i32) -> i32 {
    // The timer of the caller's root context; 0 stops it. The first tick comes one
    // period after.
    let period = Duration::from_millis(u64::from(period_ms as u32));
    let state = cx.host();
    let root = state.current_root();
    match period.is_zero() {
        true => state.ticks.remove(&root),
        false => state.ticks.insert(root, (period, Instant::now() + period)),
    };
    Status::Ok.as_i32()
}

pub(super) fn proxy_get_status(
    cx: Cx<'_>,
    ret_code_ptr: i32,
    ret_message_ptr_ptr: i32,
    ret_message_size_ptr: i32,
) -> i32 {
    let (code, message) = cx.host().status.clone();
    if let Err(e) = cx.memory().write_u32(ret_code_ptr as u32, code) {
        return Status::from(e).as_i32();
    }
    return_bytes(cx, &message, ret_message_ptr_ptr, ret_message_size_ptr).as_i32()
}

pub(super) fn proxy_done(cx: Cx<'_>) -> i32 {
    let state = cx.host();
    if !state.done_pending {
        return Status::NotFound.as_i32();
    }
    // The root context is deleted once the current call returns.
    state.done_requested = true;
    Status::Ok.as_i32()
}

pub(super) fn proxy_clear_route_cache(cx: Cx<'_>) -> i32 {
    cx.host().record_event(StreamEvent::ClearRouteCache);
    Status::Ok.as_i32()
}

pub(super) fn proxy_call_foreign_function(
    cx: Cx<'_>,
    name_ptr: i32,
    name_size: i32,
    args_ptr: i32,
    args_size: i32,
    ret_results_ptr_ptr: i32,
    ret_results_size_ptr: i32,
) -> i32 {
    let (state, memory) = cx.split();
    let name = tri!(read(&memory, name_ptr, name_size));
    let args = tri!(read(&memory, args_ptr, args_size));
    let name = std::str::from_utf8(name).ok();
    let results = match name.and_then(|name| state.shared.foreign_functions.get(name)) {
        Some(function) => {
            let function = function.clone();
            tri!(embedder(|| function.call(args)))
        }
        None if name == Some(crate::foreign::SET_ENVOY_FILTER_STATE) => {
            let Some((key, value)) = crate::foreign::filter_state_args(args) else {
                return Status::BadArgument.as_i32();
            };
            let path = property_path::encode(&[&b"filter_state"[..], key]);
            tri!(set_property(state, path, value));
            Bytes::new()
        }
        None => return Status::NotFound.as_i32(),
    };
    // As the reference host: a zero out-pointer means "do not write this one", and
    // nothing is allocated in the guest when there is nowhere to put the pointer.
    let ptr_ptr = (ret_results_ptr_ptr != 0).then_some(ret_results_ptr_ptr);
    let size_ptr = (ret_results_size_ptr != 0).then_some(ret_results_size_ptr);
    let len = if ptr_ptr.is_some() { results.len() } else { 0 };
    let status = return_with_to(cx, len, ptr_ptr, None, |_, dst| {
        dst.copy_from_slice(&results);
        true
    });
    match (status, size_ptr) {
        (Status::Ok, Some(size_ptr)) => {
            let Ok(size) = u32::try_from(results.len()) else {
                return Status::InternalFailure.as_i32();
            };
            write_words(&mut cx.memory(), &[(size_ptr, size)]).as_i32()
        }
        (status, _) => status.as_i32(),
    }
}

pub(super) fn proxy_set_effective_context(cx: Cx<'_>, context_id: i32) -> i32 {
    let state = cx.host();
    let id = context_id as u32;
    if id == 0 {
        state.effective_context = None;
    } else if state.contexts.contains_key(&id) {
        state.effective_context = Some(id);
    } else {
        return Status::BadArgument.as_i32();
    }
    Status::Ok.as_i32()
}

pub(super) fn pthread_equal(_cx: Cx<'_>, a: i32, b: i32) -> i32 {
    i32::from(a == b)
}

pub(super) fn emscripten_notify_memory_growth(_cx: Cx<'_>, _memory_index: i32) {}
