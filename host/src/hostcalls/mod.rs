//! The hostcalls: what each `proxy_*` and WASI import does (ABI.md §4, §9).
//!
//! Every guest pointer and length goes through
//! [`GuestMemory`](filterbox_engines::GuestMemory)'s checked access; results that need guest
//! memory are allocated with the guest allocator and written through a checked borrow.
//! Imports not listed here fall back to [`Hostcalls::unimplemented`], which logs once and
//! answers `Unimplemented` (`ENOSYS` for WASI).
//!
//! Each import's work lives in the module of its concern; this file only binds them to the
//! engine's [`Hostcalls`] trait, one line per import.

mod buffers;
mod callouts;
mod context;
mod headers;
mod marshal;
mod metrics;
mod policy;
mod properties;
mod shared;
mod stream;
mod wasi;

use crate::state::VmState;
use filterbox_abi::Import;
use filterbox_engines::Hostcalls;
use marshal::Cx;

pub use wasi::is_implemented;

/// Binds each listed hostcall to the function of the same name in its module.
macro_rules! bind {
    ($($module:ident :: $name:ident ( $($arg:ident : $ty:ty),* ) $(-> $ret:ty)?;)*) => {
        $(
            fn $name(cx: Cx<'_>, $($arg: $ty),*) $(-> $ret)? {
                $module::$name(cx, $($arg),*)
            }
        )*
    };
}

impl Hostcalls for VmState {
    fn returned(cx: Cx<'_>, import: Import, args: &[i64], result: Option<i32>) {
        policy::returned(cx, import, args, result)
    }

    fn admit(cx: Cx<'_>, import: Import) -> Option<i32> {
        policy::admit(cx, import)
    }

    fn unimplemented(cx: Cx<'_>, import: Import) -> i32 {
        policy::unimplemented(cx, import)
    }

    bind! {
        context::proxy_log(level: i32, message_ptr: i32, message_size: i32) -> i32;
        context::proxy_get_log_level(ret_level_ptr: i32) -> i32;
        context::proxy_get_current_time_nanoseconds(ret_time_ptr: i32) -> i32;
        context::proxy_get_configuration(ret_ptr_ptr: i32, ret_size_ptr: i32) -> i32;
        context::proxy_set_tick_period_milliseconds(period_ms: i32) -> i32;
        context::proxy_get_status(ret_code_ptr: i32, ret_message_ptr_ptr: i32, ret_message_size_ptr: i32) -> i32;
        context::proxy_done() -> i32;
        context::proxy_clear_route_cache() -> i32;
        properties::proxy_set_property(path_ptr: i32, path_size: i32, value_ptr: i32, value_size: i32) -> i32;
        shared::proxy_get_shared_data(key_ptr: i32, key_size: i32, ret_value_ptr_ptr: i32, ret_value_size_ptr: i32, ret_cas_ptr: i32) -> i32;
        shared::proxy_set_shared_data(key_ptr: i32, key_size: i32, value_ptr: i32, value_size: i32, cas: i32) -> i32;
        shared::proxy_register_shared_queue(name_ptr: i32, name_size: i32, ret_queue_id_ptr: i32) -> i32;
        shared::proxy_resolve_shared_queue(vm_id_ptr: i32, vm_id_size: i32, name_ptr: i32, name_size: i32, ret_queue_id_ptr: i32) -> i32;
        shared::proxy_enqueue_shared_queue(queue_id: i32, value_ptr: i32, value_size: i32) -> i32;
        shared::proxy_dequeue_shared_queue(queue_id: i32, ret_ptr_ptr: i32, ret_size_ptr: i32) -> i32;
        metrics::proxy_define_metric(metric_type: i32, name_ptr: i32, name_size: i32, ret_metric_id_ptr: i32) -> i32;
        metrics::proxy_increment_metric(metric_id: i32, offset: i64) -> i32;
        metrics::proxy_record_metric(metric_id: i32, value: i64) -> i32;
        metrics::proxy_get_metric(metric_id: i32, ret_value_ptr: i32) -> i32;
        context::proxy_call_foreign_function(name_ptr: i32, name_size: i32, args_ptr: i32, args_size: i32, ret_results_ptr_ptr: i32, ret_results_size_ptr: i32) -> i32;
        callouts::proxy_http_call(upstream_ptr: i32, upstream_size: i32, headers_ptr: i32, headers_size: i32, body_ptr: i32, body_size: i32, trailers_ptr: i32, trailers_size: i32, timeout_ms: i32, ret_token_ptr: i32) -> i32;
        callouts::proxy_grpc_call(upstream_ptr: i32, upstream_size: i32, service_ptr: i32, service_size: i32, method_ptr: i32, method_size: i32, initial_metadata_ptr: i32, initial_metadata_size: i32, message_ptr: i32, message_size: i32, timeout_ms: i32, ret_token_ptr: i32) -> i32;
        callouts::proxy_grpc_stream(upstream_ptr: i32, upstream_size: i32, service_ptr: i32, service_size: i32, method_ptr: i32, method_size: i32, initial_metadata_ptr: i32, initial_metadata_size: i32, ret_token_ptr: i32) -> i32;
        callouts::proxy_grpc_send(token: i32, message_ptr: i32, message_size: i32, end_stream: i32) -> i32;
        callouts::proxy_grpc_cancel(token: i32) -> i32;
        callouts::proxy_grpc_close(token: i32) -> i32;
        properties::proxy_get_property(path_ptr: i32, path_size: i32, ret_ptr_ptr: i32, ret_size_ptr: i32) -> i32;
        buffers::proxy_get_buffer_bytes(buffer_type: i32, start: i32, max_size: i32, ret_ptr_ptr: i32, ret_size_ptr: i32) -> i32;
        buffers::proxy_get_buffer_status(buffer_type: i32, ret_size_ptr: i32, ret_flags_ptr: i32) -> i32;
        buffers::proxy_set_buffer_bytes(buffer_type: i32, start: i32, size: i32, data_ptr: i32, data_size: i32) -> i32;
        headers::proxy_get_header_map_pairs(map_type: i32, ret_ptr_ptr: i32, ret_size_ptr: i32) -> i32;
        headers::proxy_set_header_map_pairs(map_type: i32, pairs_ptr: i32, pairs_size: i32) -> i32;
        headers::proxy_get_header_map_value(map_type: i32, key_ptr: i32, key_size: i32, ret_ptr_ptr: i32, ret_size_ptr: i32) -> i32;
        headers::proxy_add_header_map_value(map_type: i32, key_ptr: i32, key_size: i32, value_ptr: i32, value_size: i32) -> i32;
        headers::proxy_replace_header_map_value(map_type: i32, key_ptr: i32, key_size: i32, value_ptr: i32, value_size: i32) -> i32;
        headers::proxy_remove_header_map_value(map_type: i32, key_ptr: i32, key_size: i32) -> i32;
        headers::proxy_get_header_map_size(map_type: i32, ret_size_ptr: i32) -> i32;
        stream::proxy_send_local_response(status_code: i32, details_ptr: i32, details_size: i32, body_ptr: i32, body_size: i32, headers_ptr: i32, headers_size: i32, grpc_status: i32) -> i32;
        stream::proxy_continue_stream(stream_type: i32) -> i32;
        stream::proxy_close_stream(stream_type: i32) -> i32;
        stream::proxy_continue_request() -> i32;
        stream::proxy_continue_response() -> i32;
        context::proxy_set_effective_context(context_id: i32) -> i32;
        context::pthread_equal(a: i32, b: i32) -> i32;
        context::emscripten_notify_memory_growth(memory_index: i32);
        wasi::fd_write(fd: i32, iovs_ptr: i32, iovs_len: i32, ret_nwritten_ptr: i32) -> i32;
        wasi::fd_fdstat_get(fd: i32, ret_fdstat_ptr: i32) -> i32;
        wasi::fd_prestat_get(fd: i32, ret_prestat_ptr: i32) -> i32;
        wasi::environ_sizes_get(ret_count_ptr: i32, ret_buf_size_ptr: i32) -> i32;
        wasi::environ_get(environ_ptr: i32, environ_buf_ptr: i32) -> i32;
        wasi::args_sizes_get(ret_argc_ptr: i32, ret_buf_size_ptr: i32) -> i32;
        wasi::args_get(argv_ptr: i32, argv_buf_ptr: i32) -> i32;
        wasi::clock_time_get(clock_id: i32, precision: i64, ret_time_ptr: i32) -> i32;
        wasi::clock_res_get(clock_id: i32, ret_resolution_ptr: i32) -> i32;
        wasi::random_get(buf_ptr: i32, buf_len: i32) -> i32;
        wasi::sched_yield() -> i32;
        wasi::poll_oneoff(in_ptr: i32, out_ptr: i32, nsubscriptions: i32, ret_nevents_ptr: i32) -> i32;
        wasi::proc_exit(code: i32);
    }
}
