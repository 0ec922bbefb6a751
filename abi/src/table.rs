//! The ABI as one table: every import a proxy-wasm host provides (the `proxy_*` hostcalls,
//! the two emscripten helpers and WASI preview1) and every export it may call.
//!
//! [`for_each_import!`](crate::for_each_import) and
//! [`for_each_callback!`](crate::for_each_callback) hand the whole list to another macro. This
//! crate expands them into [`Import`] and [`Callback`]; the engines expand the same lists into
//! their linkers and the host trait, so there is no second hand-written list anywhere.

/// Calls `$m!` with every import the host provides, one entry per line:
///
/// ```text
/// Variant: module name(param: type, ...) -> result, versions;
/// ```
///
/// `module` is `env` or `wasi` (linked under both `wasi_snapshot_preview1` and `wasi_unstable`);
/// `type` is `i32` or `i64`; `result` is `i32` or `()`; `versions` is a constant of
/// [`AbiVersions`](crate::AbiVersions) naming the ABI versions that define the call.
#[macro_export]
macro_rules! for_each_import {
    ($m:ident) => {
        $m! {
            // --- proxy-wasm hostcalls (ABI.md §4.0), in the reference's order ---
            ProxyLog: env proxy_log(level: i32, message_ptr: i32, message_size: i32) -> i32, ALL;
            ProxyGetLogLevel: env proxy_get_log_level(ret_level_ptr: i32) -> i32, V0_2_1;
            ProxyGetCurrentTimeNanoseconds: env proxy_get_current_time_nanoseconds(ret_time_ptr: i32) -> i32, ALL;
            ProxySetTickPeriodMilliseconds: env proxy_set_tick_period_milliseconds(period_ms: i32) -> i32, ALL;
            ProxyGetConfiguration: env proxy_get_configuration(ret_ptr_ptr: i32, ret_size_ptr: i32) -> i32, V0_1_0;
            ProxyGetStatus: env proxy_get_status(ret_code_ptr: i32, ret_message_ptr_ptr: i32, ret_message_size_ptr: i32) -> i32, ALL;
            ProxyGetProperty: env proxy_get_property(path_ptr: i32, path_size: i32, ret_ptr_ptr: i32, ret_size_ptr: i32) -> i32, ALL;
            ProxySetProperty: env proxy_set_property(path_ptr: i32, path_size: i32, value_ptr: i32, value_size: i32) -> i32, ALL;
            ProxyGetBufferBytes: env proxy_get_buffer_bytes(buffer_type: i32, start: i32, max_size: i32, ret_ptr_ptr: i32, ret_size_ptr: i32) -> i32, ALL;
            ProxyGetBufferStatus: env proxy_get_buffer_status(buffer_type: i32, ret_size_ptr: i32, ret_flags_ptr: i32) -> i32, ALL;
            ProxySetBufferBytes: env proxy_set_buffer_bytes(buffer_type: i32, start: i32, size: i32, data_ptr: i32, data_size: i32) -> i32, ALL;
            ProxyGetHeaderMapPairs: env proxy_get_header_map_pairs(map_type: i32, ret_ptr_ptr: i32, ret_size_ptr: i32) -> i32, ALL;
            ProxySetHeaderMapPairs: env proxy_set_header_map_pairs(map_type: i32, pairs_ptr: i32, pairs_size: i32) -> i32, ALL;
            ProxyGetHeaderMapValue: env proxy_get_header_map_value(map_type: i32, key_ptr: i32, key_size: i32, ret_ptr_ptr: i32, ret_size_ptr: i32) -> i32, ALL;
            ProxyAddHeaderMapValue: env proxy_add_header_map_value(map_type: i32, key_ptr: i32, key_size: i32, value_ptr: i32, value_size: i32) -> i32, ALL;
            ProxyReplaceHeaderMapValue: env proxy_replace_header_map_value(map_type: i32, key_ptr: i32, key_size: i32, value_ptr: i32, value_size: i32) -> i32, ALL;
            ProxyRemoveHeaderMapValue: env proxy_remove_header_map_value(map_type: i32, key_ptr: i32, key_size: i32) -> i32, ALL;
            ProxyGetHeaderMapSize: env proxy_get_header_map_size(map_type: i32, ret_size_ptr: i32) -> i32, ALL;
            ProxySendLocalResponse: env proxy_send_local_response(status_code: i32, details_ptr: i32, details_size: i32, body_ptr: i32, body_size: i32, headers_ptr: i32, headers_size: i32, grpc_status: i32) -> i32, ALL;
            ProxyContinueRequest: env proxy_continue_request() -> i32, V0_1_0;
            ProxyContinueResponse: env proxy_continue_response() -> i32, V0_1_0;
            ProxyClearRouteCache: env proxy_clear_route_cache() -> i32, V0_1_0;
            ProxyContinueStream: env proxy_continue_stream(stream_type: i32) -> i32, V0_2_X;
            ProxyCloseStream: env proxy_close_stream(stream_type: i32) -> i32, V0_2_X;
            ProxyHttpCall: env proxy_http_call(upstream_ptr: i32, upstream_size: i32, headers_ptr: i32, headers_size: i32, body_ptr: i32, body_size: i32, trailers_ptr: i32, trailers_size: i32, timeout_ms: i32, ret_token_ptr: i32) -> i32, ALL;
            ProxyGrpcCall: env proxy_grpc_call(upstream_ptr: i32, upstream_size: i32, service_ptr: i32, service_size: i32, method_ptr: i32, method_size: i32, initial_metadata_ptr: i32, initial_metadata_size: i32, message_ptr: i32, message_size: i32, timeout_ms: i32, ret_token_ptr: i32) -> i32, ALL;
            ProxyGrpcStream: env proxy_grpc_stream(upstream_ptr: i32, upstream_size: i32, service_ptr: i32, service_size: i32, method_ptr: i32, method_size: i32, initial_metadata_ptr: i32, initial_metadata_size: i32, ret_token_ptr: i32) -> i32, ALL;
            ProxyGrpcSend: env proxy_grpc_send(token: i32, message_ptr: i32, message_size: i32, end_stream: i32) -> i32, ALL;
            ProxyGrpcCancel: env proxy_grpc_cancel(token: i32) -> i32, ALL;
            ProxyGrpcClose: env proxy_grpc_close(token: i32) -> i32, ALL;
            ProxyGetSharedData: env proxy_get_shared_data(key_ptr: i32, key_size: i32, ret_value_ptr_ptr: i32, ret_value_size_ptr: i32, ret_cas_ptr: i32) -> i32, ALL;
            ProxySetSharedData: env proxy_set_shared_data(key_ptr: i32, key_size: i32, value_ptr: i32, value_size: i32, cas: i32) -> i32, ALL;
            ProxyRegisterSharedQueue: env proxy_register_shared_queue(name_ptr: i32, name_size: i32, ret_queue_id_ptr: i32) -> i32, ALL;
            ProxyResolveSharedQueue: env proxy_resolve_shared_queue(vm_id_ptr: i32, vm_id_size: i32, name_ptr: i32, name_size: i32, ret_queue_id_ptr: i32) -> i32, ALL;
            ProxyEnqueueSharedQueue: env proxy_enqueue_shared_queue(queue_id: i32, value_ptr: i32, value_size: i32) -> i32, ALL;
            ProxyDequeueSharedQueue: env proxy_dequeue_shared_queue(queue_id: i32, ret_ptr_ptr: i32, ret_size_ptr: i32) -> i32, ALL;
            ProxyDefineMetric: env proxy_define_metric(metric_type: i32, name_ptr: i32, name_size: i32, ret_metric_id_ptr: i32) -> i32, ALL;
            ProxyIncrementMetric: env proxy_increment_metric(metric_id: i32, offset: i64) -> i32, ALL;
            ProxyRecordMetric: env proxy_record_metric(metric_id: i32, value: i64) -> i32, ALL;
            ProxyGetMetric: env proxy_get_metric(metric_id: i32, ret_value_ptr: i32) -> i32, ALL;
            ProxySetEffectiveContext: env proxy_set_effective_context(context_id: i32) -> i32, ALL;
            ProxyDone: env proxy_done() -> i32, ALL;
            ProxyCallForeignFunction: env proxy_call_foreign_function(name_ptr: i32, name_size: i32, args_ptr: i32, args_size: i32, ret_results_ptr_ptr: i32, ret_results_size_ptr: i32) -> i32, ALL;
            // --- helpers every host registers (ABI.md §4.0, §9.1) ---
            PthreadEqual: env pthread_equal(a: i32, b: i32) -> i32, ALL;
            EmscriptenNotifyMemoryGrowth: env emscripten_notify_memory_growth(memory_index: i32) -> (), ALL;
            // --- WASI preview1 (ABI.md §9.1), alphabetical ---
            ArgsGet: wasi args_get(argv_ptr: i32, argv_buf_ptr: i32) -> i32, ALL;
            ArgsSizesGet: wasi args_sizes_get(ret_argc_ptr: i32, ret_buf_size_ptr: i32) -> i32, ALL;
            ClockResGet: wasi clock_res_get(clock_id: i32, ret_resolution_ptr: i32) -> i32, ALL;
            ClockTimeGet: wasi clock_time_get(clock_id: i32, precision: i64, ret_time_ptr: i32) -> i32, ALL;
            EnvironGet: wasi environ_get(environ_ptr: i32, environ_buf_ptr: i32) -> i32, ALL;
            EnvironSizesGet: wasi environ_sizes_get(ret_count_ptr: i32, ret_buf_size_ptr: i32) -> i32, ALL;
            FdAdvise: wasi fd_advise(fd: i32, offset: i64, len: i64, advice: i32) -> i32, ALL;
            FdAllocate: wasi fd_allocate(fd: i32, offset: i64, len: i64) -> i32, ALL;
            FdClose: wasi fd_close(fd: i32) -> i32, ALL;
            FdDatasync: wasi fd_datasync(fd: i32) -> i32, ALL;
            FdFdstatGet: wasi fd_fdstat_get(fd: i32, ret_fdstat_ptr: i32) -> i32, ALL;
            FdFdstatSetFlags: wasi fd_fdstat_set_flags(fd: i32, flags: i32) -> i32, ALL;
            FdFdstatSetRights: wasi fd_fdstat_set_rights(fd: i32, rights_base: i64, rights_inheriting: i64) -> i32, ALL;
            FdFilestatGet: wasi fd_filestat_get(fd: i32, ret_filestat_ptr: i32) -> i32, ALL;
            FdFilestatSetSize: wasi fd_filestat_set_size(fd: i32, size: i64) -> i32, ALL;
            FdFilestatSetTimes: wasi fd_filestat_set_times(fd: i32, atim: i64, mtim: i64, flags: i32) -> i32, ALL;
            FdPread: wasi fd_pread(fd: i32, iovs_ptr: i32, iovs_len: i32, offset: i64, ret_nread_ptr: i32) -> i32, ALL;
            FdPrestatDirName: wasi fd_prestat_dir_name(fd: i32, path_ptr: i32, path_len: i32) -> i32, ALL;
            FdPrestatGet: wasi fd_prestat_get(fd: i32, ret_prestat_ptr: i32) -> i32, ALL;
            FdPwrite: wasi fd_pwrite(fd: i32, iovs_ptr: i32, iovs_len: i32, offset: i64, ret_nwritten_ptr: i32) -> i32, ALL;
            FdRead: wasi fd_read(fd: i32, iovs_ptr: i32, iovs_len: i32, ret_nread_ptr: i32) -> i32, ALL;
            FdReaddir: wasi fd_readdir(fd: i32, buf_ptr: i32, buf_len: i32, cookie: i64, ret_used_ptr: i32) -> i32, ALL;
            FdRenumber: wasi fd_renumber(fd: i32, to: i32) -> i32, ALL;
            FdSeek: wasi fd_seek(fd: i32, offset: i64, whence: i32, ret_offset_ptr: i32) -> i32, ALL;
            FdSync: wasi fd_sync(fd: i32) -> i32, ALL;
            FdTell: wasi fd_tell(fd: i32, ret_offset_ptr: i32) -> i32, ALL;
            FdWrite: wasi fd_write(fd: i32, iovs_ptr: i32, iovs_len: i32, ret_nwritten_ptr: i32) -> i32, ALL;
            PathCreateDirectory: wasi path_create_directory(fd: i32, path_ptr: i32, path_len: i32) -> i32, ALL;
            PathFilestatGet: wasi path_filestat_get(fd: i32, flags: i32, path_ptr: i32, path_len: i32, ret_filestat_ptr: i32) -> i32, ALL;
            PathFilestatSetTimes: wasi path_filestat_set_times(fd: i32, flags: i32, path_ptr: i32, path_len: i32, atim: i64, mtim: i64, fst_flags: i32) -> i32, ALL;
            PathLink: wasi path_link(old_fd: i32, old_flags: i32, old_path_ptr: i32, old_path_len: i32, new_fd: i32, new_path_ptr: i32, new_path_len: i32) -> i32, ALL;
            PathOpen: wasi path_open(fd: i32, dirflags: i32, path_ptr: i32, path_len: i32, oflags: i32, rights_base: i64, rights_inheriting: i64, fdflags: i32, ret_fd_ptr: i32) -> i32, ALL;
            PathReadlink: wasi path_readlink(fd: i32, path_ptr: i32, path_len: i32, buf_ptr: i32, buf_len: i32, ret_used_ptr: i32) -> i32, ALL;
            PathRemoveDirectory: wasi path_remove_directory(fd: i32, path_ptr: i32, path_len: i32) -> i32, ALL;
            PathRename: wasi path_rename(fd: i32, old_path_ptr: i32, old_path_len: i32, new_fd: i32, new_path_ptr: i32, new_path_len: i32) -> i32, ALL;
            PathSymlink: wasi path_symlink(old_path_ptr: i32, old_path_len: i32, fd: i32, new_path_ptr: i32, new_path_len: i32) -> i32, ALL;
            PathUnlinkFile: wasi path_unlink_file(fd: i32, path_ptr: i32, path_len: i32) -> i32, ALL;
            PollOneoff: wasi poll_oneoff(in_ptr: i32, out_ptr: i32, nsubscriptions: i32, ret_nevents_ptr: i32) -> i32, ALL;
            ProcExit: wasi proc_exit(code: i32) -> (), ALL;
            ProcRaise: wasi proc_raise(signal: i32) -> i32, ALL;
            RandomGet: wasi random_get(buf_ptr: i32, buf_len: i32) -> i32, ALL;
            SchedYield: wasi sched_yield() -> i32, ALL;
            SockAccept: wasi sock_accept(fd: i32, flags: i32, ret_fd_ptr: i32) -> i32, ALL;
            SockRecv: wasi sock_recv(fd: i32, ri_data_ptr: i32, ri_data_len: i32, ri_flags: i32, ret_len_ptr: i32, ret_flags_ptr: i32) -> i32, ALL;
            SockSend: wasi sock_send(fd: i32, si_data_ptr: i32, si_data_len: i32, si_flags: i32, ret_len_ptr: i32) -> i32, ALL;
            SockShutdown: wasi sock_shutdown(fd: i32, how: i32) -> i32, ALL;
        }
    };
}

/// Calls `$m!` with every export the host may call (ABI.md §6.1), one entry per line:
///
/// ```text
/// Variant: name(param: type, ...) -> result, versions;
/// ```
///
/// Signatures are those of ABI 0.2.x; [`Callback::params`](crate::Callback::params) gives the
/// 0.1.0 arity of the two header callbacks, the only exports whose type changed.
#[macro_export]
macro_rules! for_each_callback {
    ($m:ident) => {
        $m! {
            Initialize: _initialize() -> (), ALL;
            Main: main(argc: i32, argv: i32) -> i32, ALL;
            MainVoid: __main_void() -> i32, ALL;
            Start: _start() -> (), ALL;
            Malloc: malloc(size: i32) -> i32, ALL;
            ProxyOnMemoryAllocate: proxy_on_memory_allocate(size: i32) -> i32, ALL;
            ProxyOnContextCreate: proxy_on_context_create(context_id: i32, parent_context_id: i32) -> (), ALL;
            ProxyOnVmStart: proxy_on_vm_start(root_context_id: i32, vm_configuration_size: i32) -> i32, ALL;
            ProxyValidateConfiguration: proxy_validate_configuration(root_context_id: i32, configuration_size: i32) -> i32, ALL;
            ProxyOnConfigure: proxy_on_configure(root_context_id: i32, plugin_configuration_size: i32) -> i32, ALL;
            ProxyOnTick: proxy_on_tick(root_context_id: i32) -> (), ALL;
            ProxyOnQueueReady: proxy_on_queue_ready(root_context_id: i32, queue_id: i32) -> (), ALL;
            ProxyOnNewConnection: proxy_on_new_connection(context_id: i32) -> i32, ALL;
            ProxyOnDownstreamData: proxy_on_downstream_data(context_id: i32, data_size: i32, end_of_stream: i32) -> i32, ALL;
            ProxyOnUpstreamData: proxy_on_upstream_data(context_id: i32, data_size: i32, end_of_stream: i32) -> i32, ALL;
            ProxyOnDownstreamConnectionClose: proxy_on_downstream_connection_close(context_id: i32, peer_type: i32) -> (), ALL;
            ProxyOnUpstreamConnectionClose: proxy_on_upstream_connection_close(context_id: i32, peer_type: i32) -> (), ALL;
            ProxyOnRequestHeaders: proxy_on_request_headers(context_id: i32, num_headers: i32, end_of_stream: i32) -> i32, ALL;
            ProxyOnRequestBody: proxy_on_request_body(context_id: i32, body_size: i32, end_of_stream: i32) -> i32, ALL;
            ProxyOnRequestTrailers: proxy_on_request_trailers(context_id: i32, num_trailers: i32) -> i32, ALL;
            ProxyOnRequestMetadata: proxy_on_request_metadata(context_id: i32, num_elements: i32) -> i32, ALL;
            ProxyOnResponseHeaders: proxy_on_response_headers(context_id: i32, num_headers: i32, end_of_stream: i32) -> i32, ALL;
            ProxyOnResponseBody: proxy_on_response_body(context_id: i32, body_size: i32, end_of_stream: i32) -> i32, ALL;
            ProxyOnResponseTrailers: proxy_on_response_trailers(context_id: i32, num_trailers: i32) -> i32, ALL;
            ProxyOnResponseMetadata: proxy_on_response_metadata(context_id: i32, num_elements: i32) -> i32, ALL;
            ProxyOnLog: proxy_on_log(context_id: i32) -> (), ALL;
            ProxyOnDone: proxy_on_done(context_id: i32) -> i32, ALL;
            ProxyOnDelete: proxy_on_delete(context_id: i32) -> (), ALL;
            ProxyOnHttpCallResponse: proxy_on_http_call_response(root_context_id: i32, token: i32, num_headers: i32, body_size: i32, num_trailers: i32) -> (), ALL;
            ProxyOnGrpcReceiveInitialMetadata: proxy_on_grpc_receive_initial_metadata(root_context_id: i32, token: i32, num_elements: i32) -> (), ALL;
            ProxyOnGrpcReceive: proxy_on_grpc_receive(root_context_id: i32, token: i32, message_size: i32) -> (), ALL;
            ProxyOnGrpcReceiveTrailingMetadata: proxy_on_grpc_receive_trailing_metadata(root_context_id: i32, token: i32, num_elements: i32) -> (), ALL;
            ProxyOnGrpcClose: proxy_on_grpc_close(root_context_id: i32, token: i32, status_code: i32) -> (), ALL;
            ProxyOnForeignFunction: proxy_on_foreign_function(context_id: i32, function_id: i32, arguments_size: i32) -> (), V0_2_X;
        }
    };
}
