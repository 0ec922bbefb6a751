//! The hostcalls: what each `proxy_*` and WASI import does (ABI.md §4, §9).
//!
//! Every guest pointer and length goes through [`GuestMemory`]'s checked access; results that
//! need guest memory are allocated with the guest allocator and written through a checked
//! borrow. Imports not listed here fall back to [`Hostcalls::unimplemented`], which logs once
//! and answers `Unimplemented` (`ENOSYS` for WASI).

use crate::callout::{GrpcReply, GrpcRequest, HttpCallReply, HttpCallRequest};
use crate::config::Limits;
use crate::headers::lower;
use crate::state::{ContextKind, OpenGrpc, Phase, VmState};
use crate::{HeaderMap, LocalResponse, StreamEvent};
use bytes::Bytes;
use filterbox_abi::{
    BufferType, GrpcStatus, Import, ImportModule, LogLevel, MapType, MetricType, Status,
    StreamType, WasiErrno, pairs, property_path,
};
use filterbox_engines::{Caller, GuestMemory, Hostcalls, MemoryError, Trap, TrapKind};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

type Cx<'a> = &'a mut dyn Caller<VmState>;

/// The WASI functions filterbox links to a stub answering `ENOSYS` (files, sockets, signals:
/// nothing a proxy plugin may use), so that a plugin importing them still loads.
const WASI_STUBS: [Import; 33] = [
    Import::FdAdvise,
    Import::FdAllocate,
    Import::FdClose,
    Import::FdDatasync,
    Import::FdFdstatSetFlags,
    Import::FdFdstatSetRights,
    Import::FdFilestatGet,
    Import::FdFilestatSetSize,
    Import::FdFilestatSetTimes,
    Import::FdPread,
    Import::FdPrestatDirName,
    Import::FdPwrite,
    Import::FdRead,
    Import::FdReaddir,
    Import::FdRenumber,
    Import::FdSeek,
    Import::FdSync,
    Import::FdTell,
    Import::PathCreateDirectory,
    Import::PathFilestatGet,
    Import::PathFilestatSetTimes,
    Import::PathLink,
    Import::PathOpen,
    Import::PathReadlink,
    Import::PathRemoveDirectory,
    Import::PathRename,
    Import::PathSymlink,
    Import::PathUnlinkFile,
    Import::ProcRaise,
    Import::SockAccept,
    Import::SockRecv,
    Import::SockSend,
    Import::SockShutdown,
];

/// Whether filterbox implements `import` (every `proxy_*` hostcall and the WASI functions
/// SDKs use) or links it to a stub that answers `ENOSYS`.
pub fn is_implemented(import: Import) -> bool {
    !WASI_STUBS.contains(&import)
}

/// Largest `random_get` a guest may ask for at once, as the reference host allows.
const RANDOM_GET_MAX_BYTES: u32 = 64 * 1024;

/// Most bytes of a local response's details (Envoy's response-code details) kept; the rest
/// is dropped.
const MAX_DETAILS_BYTES: usize = 1024;

/// Most iovecs one `fd_write` may pass, as POSIX's IOV_MAX.
const IOV_MAX: u32 = 1024;

/// Returns early from a hostcall with the status (or errno) of an error.
macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return Status::from(e).as_i32(),
        }
    };
}

macro_rules! wasi_tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(MemoryError::OutOfBounds { .. } | MemoryError::NoMemory) => {
                return WasiErrno::Fault.as_i32()
            }
            Err(_) => return WasiErrno::Inval.as_i32(),
        }
    };
}

fn read<'m>(memory: &'m GuestMemory<'_>, ptr: i32, len: i32) -> Result<&'m [u8], MemoryError> {
    // Wasm pointers and sizes are unsigned 32-bit values carried in i32s.
    memory.read(ptr as u32, len as u32)
}

/// Hands `len` bytes to the guest: allocates them with the guest allocator, lets `fill` write
/// them from the host state, and writes the pointer and size to the out-pointers. Zero bytes
/// are returned as `(0, 0)` without calling the allocator (SDK allocators break on 0).
fn return_with(
    cx: Cx<'_>,
    len: usize,
    ret_ptr_ptr: i32,
    ret_size_ptr: i32,
    fill: impl FnOnce(&VmState, &mut [u8]) -> bool,
) -> Status {
    return_with_to(cx, len, Some(ret_ptr_ptr), Some(ret_size_ptr), fill)
}

/// [`return_with`] where either out-pointer may be left unwritten (`None`).
fn return_with_to(
    cx: Cx<'_>,
    len: usize,
    ret_ptr_ptr: Option<i32>,
    ret_size_ptr: Option<i32>,
    fill: impl FnOnce(&VmState, &mut [u8]) -> bool,
) -> Status {
    let Ok(len) = u32::try_from(len) else {
        return Status::InvalidMemoryAccess;
    };
    let ptr = if len == 0 {
        0
    } else {
        // While the guest allocator runs, only the hostcalls `admit` lets through work.
        cx.host().in_allocator = true;
        let allocated = cx.allocate(len);
        cx.host().in_allocator = false;
        let ptr = match allocated {
            Ok(ptr) => ptr,
            Err(e) => return e.into(),
        };
        let (state, mut memory) = cx.split();
        let Ok(dst) = memory.read_mut(ptr, len) else {
            return Status::InvalidMemoryAccess;
        };
        // The allocator is guest code and may have changed what we were about to return.
        if !fill(state, dst) {
            return Status::InternalFailure;
        }
        ptr
    };
    let words: Vec<(i32, u32)> = [(ret_ptr_ptr, ptr), (ret_size_ptr, len)]
        .into_iter()
        .filter_map(|(at, value)| Some((at?, value)))
        .collect();
    write_words(&mut cx.memory(), &words)
}

/// Hands a copy of `data` to the guest (see [`return_with`]).
fn return_bytes(cx: Cx<'_>, data: &[u8], ret_ptr_ptr: i32, ret_size_ptr: i32) -> Status {
    return_with(cx, data.len(), ret_ptr_ptr, ret_size_ptr, |_, dst| {
        dst.copy_from_slice(data);
        true
    })
}

fn write_words(memory: &mut GuestMemory<'_>, words: &[(i32, u32)]) -> Status {
    for (ptr, value) in words {
        if memory.write_u32(*ptr as u32, *value).is_err() {
            return Status::InvalidMemoryAccess;
        }
    }
    Status::Ok
}

/// Stores a property of the current context (`proxy_set_property`, filter state), within
/// the property limits: paths count with values, both held until the context ends.
fn set_property(state: &mut VmState, path: Vec<u8>, value: &[u8]) -> Result<(), Status> {
    let limits = &state.shared.config.limits;
    let held: usize = state
        .properties
        .iter()
        .map(|((_, path), value)| path.len() + value.len())
        .sum();
    if state.properties.len() >= limits.max_header_count
        || held + path.len() + value.len() > limits.max_header_bytes
    {
        return Err(Status::BadArgument);
    }
    let context = state.context();
    state
        .properties
        .insert((context, path), Bytes::copy_from_slice(value));
    Ok(())
}

/// Reads a key and a value from guest memory and applies `edit` to a writable map: the shared
/// shape of add, replace and remove (which passes an empty value).
fn edit_map(
    cx: Cx<'_>,
    map_type: i32,
    (key_ptr, key_size): (i32, i32),
    (value_ptr, value_size): (i32, i32),
    edit: impl FnOnce(&mut crate::HeaderMap, &[u8], &[u8]),
) -> i32 {
    let map = tri!(self::map_type(map_type));
    let (state, memory) = cx.split();
    let key = tri!(read(&memory, key_ptr, key_size));
    let value = tri!(read(&memory, value_ptr, value_size));
    let limits = &state.shared.config.limits;
    let (max_count, max_bytes) = (limits.max_header_count, limits.max_header_bytes);
    let Some(headers) = state.map_mut(map) else {
        return Status::BadArgument.as_i32();
    };
    // Only an edit that might cross a limit pays for a copy to undo it.
    let surely_fits =
        headers.len() < max_count && headers.byte_size() + key.len() + value.len() <= max_bytes;
    let before = (!surely_fits).then(|| headers.clone());
    edit(headers, key, value);
    if let Some(before) = before
        && (headers.len() > max_count || headers.byte_size() > max_bytes)
    {
        *headers = before;
        return Status::BadArgument.as_i32();
    }
    Status::Ok.as_i32()
}

/// The status of an operation that returns nothing on success.
fn status_of<E: Into<Status>>(result: Result<(), E>) -> i32 {
    match result {
        Ok(()) => Status::Ok.as_i32(),
        Err(e) => e.into().as_i32(),
    }
}

fn map_type(value: i32) -> Result<MapType, Status> {
    MapType::from_u32(value as u32).ok_or(Status::BadArgument)
}

fn buffer_type(value: i32) -> Result<BufferType, Status> {
    BufferType::from_u32(value as u32).ok_or(Status::BadArgument)
}

fn stream_type(value: i32) -> Result<StreamType, Status> {
    StreamType::from_u32(value as u32).ok_or(Status::BadArgument)
}

/// Decodes a guest pairs buffer holding at most the headers `limits` allow (`BadArgument`
/// past them). The buffer's size is checked before it is decoded, so a huge one costs the
/// host nothing. A malformed one is `BadArgument` too: the reference host treats it as an
/// empty map and answers `Ok`, which silently clears headers; filterbox says so instead.
fn decode_pairs(bytes: &[u8], limits: &Limits) -> Result<Vec<(Bytes, Bytes)>, Status> {
    // Each pair costs 8 bytes of sizes and 2 NULs on top of its name and value.
    let largest = limits
        .max_header_count
        .saturating_mul(10)
        .saturating_add(limits.max_header_bytes)
        .saturating_add(4);
    if bytes.len() > largest {
        return Err(Status::BadArgument);
    }
    let decoded = pairs::decode(bytes).map_err(|_| Status::BadArgument)?;
    let held: usize = decoded.iter().map(|(k, v)| k.len() + v.len()).sum();
    if decoded.len() > limits.max_header_count || held > limits.max_header_bytes {
        return Err(Status::BadArgument);
    }
    Ok(decoded
        .into_iter()
        .map(|(k, v)| (lower(k), Bytes::copy_from_slice(v)))
        .collect())
}

fn read_str(memory: &GuestMemory<'_>, ptr: i32, len: i32) -> Result<String, Status> {
    let bytes = read(memory, ptr, len)?;
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

fn decode_map(
    memory: &GuestMemory<'_>,
    ptr: i32,
    len: i32,
    limits: &Limits,
) -> Result<HeaderMap, Status> {
    Ok(decode_pairs(read(memory, ptr, len)?, limits)?
        .into_iter()
        .collect())
}

/// A copy of a body the plugin hands over (a local response's, a callout's): at most
/// `max_body_bytes`, `BadArgument` past it.
fn read_body(
    memory: &GuestMemory<'_>,
    ptr: i32,
    len: i32,
    limits: &Limits,
) -> Result<Bytes, Status> {
    let bytes = read(memory, ptr, len)?;
    if bytes.len() > limits.max_body_bytes {
        return Err(Status::BadArgument);
    }
    Ok(Bytes::copy_from_slice(bytes))
}

/// A callout timeout: Envoy reads it as a signed int, so values past `i32::MAX` are
/// `BadArgument`; 0 means none.
fn callout_timeout(timeout_ms: i32) -> Result<Option<Duration>, Status> {
    match timeout_ms {
        ..0 => Err(Status::BadArgument),
        0 => Ok(None),
        ms => Ok(Some(Duration::from_millis(ms as u64))),
    }
}

/// Runs embedder code from a hostcall: a panic is the embedder's bug and answers
/// `InternalFailure` instead of unwinding into wasm.
fn embedder<T>(f: impl FnOnce() -> Result<T, Status>) -> Result<T, Status> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(Err(Status::InternalFailure))
}

/// The gRPC work shared by `proxy_grpc_call` and `proxy_grpc_stream`: checks, opens the
/// stream through the embedder, sends a unary call's message, and writes the token.
#[allow(clippy::too_many_arguments)]
fn grpc_open(
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

fn monotonic_nanos() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let nanos = START.get_or_init(Instant::now).elapsed().as_nanos();
    u64::try_from(nanos).unwrap_or(u64::MAX)
}

fn realtime_nanos() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    u64::try_from(nanos).unwrap_or(u64::MAX)
}

impl Hostcalls for VmState {
    /// With `filterbox::hostcall=trace` enabled in the tracing subscriber, logs every
    /// hostcall: plugin, name, raw arguments and result (a status name for `proxy_*` calls).
    fn returned(cx: Cx<'_>, import: Import, args: &[i64], result: Option<i32>) {
        if !tracing::enabled!(target: "filterbox::hostcall", tracing::Level::TRACE) {
            return;
        }
        let args: Vec<String> = args.iter().map(i64::to_string).collect();
        let result = match (result, import.module()) {
            (None, _) => String::new(),
            (Some(code), ImportModule::Env) => {
                match u32::try_from(code).ok().and_then(Status::from_u32) {
                    Some(status) => format!(" -> {status}"),
                    None => format!(" -> {code}"),
                }
            }
            (Some(code), _) => format!(" -> {code}"),
        };
        tracing::trace!(
            target: "filterbox::hostcall",
            plugin = %cx.host().shared.config.name,
            "{}({}){result}",
            import.name(),
            args.join(", ")
        );
    }

    /// Refuses what the phase or the plugin's capabilities do not allow (ABI.md §1.3: the
    /// reference host lets the allocator log, write to fds and read clocks, and filterbox
    /// holds the start function to the same plus WASI and log-level/time queries). A refused
    /// call answers `BadArgument` (WASI: `ENOTCAPABLE`); a denied capability answers like an
    /// unimplemented import.
    fn admit(cx: Cx<'_>, import: Import) -> Option<i32> {
        let state = cx.host();
        if state.shared.denied.contains(import) {
            return Some(Self::unimplemented(cx, import));
        }
        let allowed = if state.in_allocator {
            // `proc_exit` too: an allocator that gives up (C's `abort`, TinyGo's runtime)
            // must end the VM, not return into the hostcall that asked for memory. And
            // emscripten's `sbrk` reports growth from inside `malloc`.
            matches!(
                import,
                Import::ProxyLog
                    | Import::FdWrite
                    | Import::ClockTimeGet
                    | Import::PollOneoff
                    | Import::ProcExit
                    | Import::EmscriptenNotifyMemoryGrowth
            )
        } else if state.phase == Phase::Start {
            import.module() == ImportModule::Wasi
                || matches!(
                    import,
                    Import::ProxyLog
                        | Import::ProxyGetLogLevel
                        | Import::ProxyGetCurrentTimeNanoseconds
                        | Import::PthreadEqual
                        | Import::EmscriptenNotifyMemoryGrowth
                )
        } else {
            true
        };
        match (allowed, import.module()) {
            (true, _) => None,
            (false, ImportModule::Env) => Some(Status::BadArgument.as_i32()),
            (false, ImportModule::Wasi) => Some(WasiErrno::Notcapable.as_i32()),
        }
    }

    fn unimplemented(cx: Cx<'_>, import: Import) -> i32 {
        cx.host().warn_unimplemented(import);
        match import.module() {
            ImportModule::Env => Status::Unimplemented.as_i32(),
            ImportModule::Wasi => WasiErrno::Nosys.as_i32(),
        }
    }

    // --- logging, time, configuration ---

    fn proxy_log(cx: Cx<'_>, level: i32, message_ptr: i32, message_size: i32) -> i32 {
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

    fn proxy_get_log_level(cx: Cx<'_>, ret_level_ptr: i32) -> i32 {
        let level = cx.host().shared.config.log_level.as_u32();
        write_words(&mut cx.memory(), &[(ret_level_ptr, level)]).as_i32()
    }

    fn proxy_get_current_time_nanoseconds(cx: Cx<'_>, ret_time_ptr: i32) -> i32 {
        tri!(cx.memory().write_u64(ret_time_ptr as u32, realtime_nanos()));
        Status::Ok.as_i32()
    }

    fn proxy_get_configuration(cx: Cx<'_>, ret_ptr_ptr: i32, ret_size_ptr: i32) -> i32 {
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

    // --- timers, status, shutdown ---

    fn proxy_set_tick_period_milliseconds(cx: Cx<'_>, period_ms: i32) -> i32 {
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

    fn proxy_get_status(
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

    fn proxy_done(cx: Cx<'_>) -> i32 {
        let state = cx.host();
        if !state.done_pending {
            return Status::NotFound.as_i32();
        }
        // The root context is deleted once the current call returns.
        state.done_requested = true;
        Status::Ok.as_i32()
    }

    fn proxy_clear_route_cache(cx: Cx<'_>) -> i32 {
        cx.host().record_event(StreamEvent::ClearRouteCache);
        Status::Ok.as_i32()
    }

    // --- properties ---

    fn proxy_set_property(
        cx: Cx<'_>,
        path_ptr: i32,
        path_size: i32,
        value_ptr: i32,
        value_size: i32,
    ) -> i32 {
        let (state, memory) = cx.split();
        let path = tri!(read(&memory, path_ptr, path_size));
        let value = tri!(read(&memory, value_ptr, value_size));
        if property_path::decode(path).is_err() {
            return Status::BadArgument.as_i32();
        }
        tri!(set_property(state, path.to_vec(), value));
        Status::Ok.as_i32()
    }

    // --- shared data ---

    fn proxy_get_shared_data(
        cx: Cx<'_>,
        key_ptr: i32,
        key_size: i32,
        ret_value_ptr_ptr: i32,
        ret_value_size_ptr: i32,
        ret_cas_ptr: i32,
    ) -> i32 {
        let (state, memory) = cx.split();
        let key = tri!(read(&memory, key_ptr, key_size));
        let Some((value, cas)) = state
            .shared
            .shared_state
            .get(&state.shared.config.vm_id, key)
        else {
            return Status::NotFound.as_i32();
        };
        if let Err(e) = cx.memory().write_u32(ret_cas_ptr as u32, cas) {
            return Status::from(e).as_i32();
        }
        return_bytes(cx, &value, ret_value_ptr_ptr, ret_value_size_ptr).as_i32()
    }

    fn proxy_set_shared_data(
        cx: Cx<'_>,
        key_ptr: i32,
        key_size: i32,
        value_ptr: i32,
        value_size: i32,
        cas: i32,
    ) -> i32 {
        let (state, memory) = cx.split();
        let key = tri!(read(&memory, key_ptr, key_size));
        let value = tri!(read(&memory, value_ptr, value_size));
        let shared = &state.shared;
        match shared
            .shared_state
            .set(&shared.config.vm_id, key, value, cas as u32)
        {
            Ok(_) => Status::Ok.as_i32(),
            Err(e) => Status::from(e).as_i32(),
        }
    }

    // --- shared queues ---

    fn proxy_register_shared_queue(
        cx: Cx<'_>,
        name_ptr: i32,
        name_size: i32,
        ret_queue_id_ptr: i32,
    ) -> i32 {
        let (state, mut memory) = cx.split();
        let name = tri!(read(&memory, name_ptr, name_size));
        tri!(memory.read(ret_queue_id_ptr as u32, 4));
        let shared = &state.shared;
        // Stream contexts register for their root, which hears proxy_on_queue_ready.
        let token = match shared.shared_state.register_queue(
            &shared.config.vm_id,
            name,
            &state.inbox,
            state.current_root(),
        ) {
            Ok(token) => token,
            Err(e) => return Status::from(e).as_i32(),
        };
        write_words(&mut memory, &[(ret_queue_id_ptr, token)]).as_i32()
    }

    fn proxy_resolve_shared_queue(
        cx: Cx<'_>,
        vm_id_ptr: i32,
        vm_id_size: i32,
        name_ptr: i32,
        name_size: i32,
        ret_queue_id_ptr: i32,
    ) -> i32 {
        let (state, mut memory) = cx.split();
        let vm_id = tri!(read(&memory, vm_id_ptr, vm_id_size));
        let name = tri!(read(&memory, name_ptr, name_size));
        let shared = &state.shared;
        // An empty vm_id means this VM's own.
        let vm_id = match vm_id {
            [] => shared.config.vm_id.clone(),
            other => String::from_utf8_lossy(other).into_owned(),
        };
        match shared.shared_state.resolve_queue(&vm_id, name) {
            Some(token) => write_words(&mut memory, &[(ret_queue_id_ptr, token)]).as_i32(),
            None => Status::NotFound.as_i32(),
        }
    }

    fn proxy_enqueue_shared_queue(
        cx: Cx<'_>,
        queue_id: i32,
        value_ptr: i32,
        value_size: i32,
    ) -> i32 {
        let (state, memory) = cx.split();
        let value = tri!(read(&memory, value_ptr, value_size));
        status_of(state.shared.shared_state.enqueue(queue_id as u32, value))
    }

    fn proxy_dequeue_shared_queue(
        cx: Cx<'_>,
        queue_id: i32,
        ret_ptr_ptr: i32,
        ret_size_ptr: i32,
    ) -> i32 {
        // Check the out-pointers first: a message taken must reach the guest.
        {
            let memory = cx.memory();
            tri!(memory.read(ret_ptr_ptr as u32, 4));
            tri!(memory.read(ret_size_ptr as u32, 4));
        }
        match cx.host().shared.shared_state.dequeue(queue_id as u32) {
            Ok(Some(message)) => return_bytes(cx, &message, ret_ptr_ptr, ret_size_ptr).as_i32(),
            Ok(None) => Status::Empty.as_i32(),
            Err(e) => Status::from(e).as_i32(),
        }
    }

    // --- metrics ---

    fn proxy_define_metric(
        cx: Cx<'_>,
        metric_type: i32,
        name_ptr: i32,
        name_size: i32,
        ret_metric_id_ptr: i32,
    ) -> i32 {
        let Some(kind) = MetricType::from_u32(metric_type as u32) else {
            return Status::BadArgument.as_i32();
        };
        let (state, mut memory) = cx.split();
        let name = tri!(read(&memory, name_ptr, name_size));
        tri!(memory.read(ret_metric_id_ptr as u32, 4));
        match state.shared.metric_registry.define(kind, name) {
            Ok(id) => write_words(&mut memory, &[(ret_metric_id_ptr, id)]).as_i32(),
            Err(e) => Status::from(e).as_i32(),
        }
    }

    fn proxy_increment_metric(cx: Cx<'_>, metric_id: i32, offset: i64) -> i32 {
        let registry = &cx.host().shared.metric_registry;
        status_of(registry.increment(metric_id as u32, offset))
    }

    fn proxy_record_metric(cx: Cx<'_>, metric_id: i32, value: i64) -> i32 {
        let registry = &cx.host().shared.metric_registry;
        status_of(registry.record(metric_id as u32, value as u64))
    }

    fn proxy_get_metric(cx: Cx<'_>, metric_id: i32, ret_value_ptr: i32) -> i32 {
        let value = match cx.host().shared.metric_registry.get(metric_id as u32) {
            Ok(value) => value,
            Err(e) => return Status::from(e).as_i32(),
        };
        tri!(cx.memory().write_u64(ret_value_ptr as u32, value));
        Status::Ok.as_i32()
    }

    // --- foreign functions ---

    fn proxy_call_foreign_function(
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

    // --- HTTP callouts ---

    fn proxy_http_call(
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

    // --- gRPC callouts ---

    fn proxy_grpc_call(
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

    fn proxy_grpc_stream(
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

    fn proxy_grpc_send(
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

    fn proxy_grpc_cancel(cx: Cx<'_>, token: i32) -> i32 {
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

    fn proxy_grpc_close(cx: Cx<'_>, token: i32) -> i32 {
        let token = token as u32;
        match token & 3 {
            // A call: the same as cancel.
            1 => Self::proxy_grpc_cancel(cx, token as i32),
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

    fn proxy_get_property(
        cx: Cx<'_>,
        path_ptr: i32,
        path_size: i32,
        ret_ptr_ptr: i32,
        ret_size_ptr: i32,
    ) -> i32 {
        let (state, memory) = cx.split();
        let raw = tri!(read(&memory, path_ptr, path_size));
        // An empty or malformed path names nothing.
        let Ok(path) = property_path::decode(raw) else {
            return Status::NotFound.as_i32();
        };
        let config = &state.shared.config;
        // What the plugin or the embedder set wins, on this context then on the root.
        let set = match state.properties.is_empty() {
            true => None,
            false => [state.context(), state.current_root()]
                .into_iter()
                .find_map(|c| state.properties.get(&(c, raw.to_vec())).cloned()),
        };
        let value = match path.as_slice() {
            _ if set.is_some() => set,
            [b"plugin_name"] => Some(Bytes::copy_from_slice(config.name.as_bytes())),
            [b"plugin_root_id"] => Some(Bytes::copy_from_slice(config.root_id.as_bytes())),
            [b"plugin_vm_id"] => Some(Bytes::copy_from_slice(config.vm_id.as_bytes())),
            [b"request" | b"response", ..] if state.context_kind() == Some(ContextKind::Http) => {
                crate::attributes::stream_attribute(
                    &path,
                    state.map(MapType::HttpRequestHeaders),
                    state.map(MapType::HttpResponseHeaders),
                    state.map(MapType::HttpResponseTrailers),
                    state.stream_info.get(&state.context()),
                )
            }
            [b"source" | b"destination" | b"connection", ..] => state
                .stream_info
                .get(&state.context())
                .and_then(|info| info.connection.as_ref()?.attribute(&path)),
            _ => None,
        };
        // Then the embedder, under either of Envoy's spellings. A panicking provider is the
        // embedder's bug: the guest gets InternalFailure.
        let value = match value {
            Some(value) => Some(value),
            None => {
                let provider = &state.shared.properties;
                let ask = || {
                    provider.property(&path).or_else(|| {
                        let other = crate::attributes::alias(&path)?;
                        let other: Vec<&[u8]> = other.iter().map(Vec::as_slice).collect();
                        provider.property(&other)
                    })
                };
                match catch_unwind(AssertUnwindSafe(ask)) {
                    Ok(value) => value,
                    Err(_) => return Status::InternalFailure.as_i32(),
                }
            }
        };
        match value {
            Some(value) => return_bytes(cx, &value, ret_ptr_ptr, ret_size_ptr).as_i32(),
            None => Status::NotFound.as_i32(),
        }
    }

    // --- buffers ---

    fn proxy_get_buffer_bytes(
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

    fn proxy_get_buffer_status(
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

    fn proxy_set_buffer_bytes(
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

    // --- header maps ---

    fn proxy_get_header_map_pairs(
        cx: Cx<'_>,
        map_type: i32,
        ret_ptr_ptr: i32,
        ret_size_ptr: i32,
    ) -> i32 {
        let map = tri!(self::map_type(map_type));
        // An absent map reads as empty, as Envoy answers (the Rust SDK panics on anything else).
        let len = cx
            .host()
            .map(map)
            .filter(|m| !m.is_empty())
            .map_or(0, |m| pairs::encoded_len(m.as_slice()));
        return_with(cx, len, ret_ptr_ptr, ret_size_ptr, |state, dst| {
            state
                .map(map)
                .is_some_and(|m| pairs::encode_into(m.as_slice(), dst))
        })
        .as_i32()
    }

    fn proxy_set_header_map_pairs(
        cx: Cx<'_>,
        map_type: i32,
        pairs_ptr: i32,
        pairs_size: i32,
    ) -> i32 {
        let map = tri!(self::map_type(map_type));
        let (state, memory) = cx.split();
        let limits = &state.shared.config.limits;
        let entries = tri!(decode_pairs(
            tri!(read(&memory, pairs_ptr, pairs_size)),
            limits
        ));
        let Some(headers) = state.map_mut(map) else {
            return Status::BadArgument.as_i32();
        };
        headers.clear();
        headers.extend(entries);
        Status::Ok.as_i32()
    }

    fn proxy_get_header_map_value(
        cx: Cx<'_>,
        map_type: i32,
        key_ptr: i32,
        key_size: i32,
        ret_ptr_ptr: i32,
        ret_size_ptr: i32,
    ) -> i32 {
        let map = tri!(self::map_type(map_type));
        let (state, memory) = cx.split();
        let key = tri!(read(&memory, key_ptr, key_size));
        let Some(headers) = state.map(map) else {
            return Status::BadArgument.as_i32();
        };
        match headers.get(key).cloned() {
            Some(value) => return_bytes(cx, &value, ret_ptr_ptr, ret_size_ptr).as_i32(),
            // ABI 0.1.0 answers a missing key with an empty value; 0.2.0 made it NotFound.
            None if state.abi() == filterbox_abi::AbiVersion::V0_1_0 => {
                write_words(&mut cx.memory(), &[(ret_ptr_ptr, 0), (ret_size_ptr, 0)]).as_i32()
            }
            None => Status::NotFound.as_i32(),
        }
    }

    fn proxy_add_header_map_value(
        cx: Cx<'_>,
        map_type: i32,
        key_ptr: i32,
        key_size: i32,
        value_ptr: i32,
        value_size: i32,
    ) -> i32 {
        edit_map(
            cx,
            map_type,
            (key_ptr, key_size),
            (value_ptr, value_size),
            |headers, key, value| {
                headers.add(lower(key), Bytes::copy_from_slice(value));
            },
        )
    }

    fn proxy_replace_header_map_value(
        cx: Cx<'_>,
        map_type: i32,
        key_ptr: i32,
        key_size: i32,
        value_ptr: i32,
        value_size: i32,
    ) -> i32 {
        edit_map(
            cx,
            map_type,
            (key_ptr, key_size),
            (value_ptr, value_size),
            |headers, key, value| {
                headers.replace(lower(key), Bytes::copy_from_slice(value));
            },
        )
    }

    fn proxy_remove_header_map_value(
        cx: Cx<'_>,
        map_type: i32,
        key_ptr: i32,
        key_size: i32,
    ) -> i32 {
        edit_map(
            cx,
            map_type,
            (key_ptr, key_size),
            (0, 0),
            |headers, key, _| {
                headers.remove(key);
            },
        )
    }

    fn proxy_get_header_map_size(cx: Cx<'_>, map_type: i32, ret_size_ptr: i32) -> i32 {
        let map = tri!(self::map_type(map_type));
        // Envoy's answer: total bytes of names and values.
        let Some(size) = cx.host().map(map).map(|m| m.byte_size()) else {
            return Status::BadArgument.as_i32();
        };
        let Ok(size) = u32::try_from(size) else {
            return Status::InternalFailure.as_i32();
        };
        write_words(&mut cx.memory(), &[(ret_size_ptr, size)]).as_i32()
    }

    // --- stream control ---

    fn proxy_send_local_response(
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

    fn proxy_continue_stream(cx: Cx<'_>, stream_type: i32) -> i32 {
        match tri!(self::stream_type(stream_type)) {
            // Envoy cannot resume an upstream connection either.
            StreamType::Upstream => Status::Unimplemented.as_i32(),
            stream => {
                cx.host().stream_type_event(stream, false);
                Status::Ok.as_i32()
            }
        }
    }

    fn proxy_close_stream(cx: Cx<'_>, stream_type: i32) -> i32 {
        let stream = tri!(self::stream_type(stream_type));
        cx.host().stream_type_event(stream, true);
        Status::Ok.as_i32()
    }

    fn proxy_continue_request(cx: Cx<'_>) -> i32 {
        cx.host().stream_type_event(StreamType::HttpRequest, false);
        Status::Ok.as_i32()
    }

    fn proxy_continue_response(cx: Cx<'_>) -> i32 {
        cx.host().stream_type_event(StreamType::HttpResponse, false);
        Status::Ok.as_i32()
    }

    // --- contexts ---

    fn proxy_set_effective_context(cx: Cx<'_>, context_id: i32) -> i32 {
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

    // --- emscripten helpers ---

    fn pthread_equal(_cx: Cx<'_>, a: i32, b: i32) -> i32 {
        i32::from(a == b)
    }

    fn emscripten_notify_memory_growth(_cx: Cx<'_>, _memory_index: i32) {}

    // --- WASI ---

    fn fd_write(cx: Cx<'_>, fd: i32, iovs_ptr: i32, iovs_len: i32, ret_nwritten_ptr: i32) -> i32 {
        let level = match fd {
            1 => LogLevel::Info,
            2 => LogLevel::Error,
            _ => return WasiErrno::Badf.as_i32(),
        };
        if iovs_len as u32 > IOV_MAX {
            return WasiErrno::Inval.as_i32();
        }
        let (state, mut memory) = cx.split();
        // Every iovec is checked; the bytes are read in place and only what log lines hold
        // is copied (iovecs may all point at the same large range of guest memory).
        let mut chunks = Vec::with_capacity(iovs_len as usize);
        let mut written: u64 = 0;
        for i in 0..iovs_len as u32 {
            let Some(at) = (iovs_ptr as u32).checked_add(i.saturating_mul(8)) else {
                return WasiErrno::Fault.as_i32();
            };
            let buf = wasi_tri!(memory.read_u32(at));
            let len = wasi_tri!(memory.read_u32(at.wrapping_add(4)));
            chunks.push(wasi_tri!(memory.read(buf, len)));
            written += u64::from(len);
        }
        let Ok(written) = u32::try_from(written) else {
            return WasiErrno::Inval.as_i32();
        };
        state.write_output((fd - 1) as usize, level, &chunks);
        wasi_tri!(memory.write_u32(ret_nwritten_ptr as u32, written));
        WasiErrno::Success.as_i32()
    }

    fn fd_fdstat_get(cx: Cx<'_>, fd: i32, ret_fdstat_ptr: i32) -> i32 {
        if !matches!(fd, 1 | 2) {
            return WasiErrno::Badf.as_i32();
        }
        // filetype 0, flags 0, rights_base = FD_WRITE (64), rights_inheriting 0.
        let mut stat = [0u8; 24];
        stat[8] = 64;
        wasi_tri!(cx.memory().write(ret_fdstat_ptr as u32, &stat));
        WasiErrno::Success.as_i32()
    }

    fn fd_prestat_get(_cx: Cx<'_>, _fd: i32, _ret_prestat_ptr: i32) -> i32 {
        // No preopened directories: libc stops scanning at the first BADF.
        WasiErrno::Badf.as_i32()
    }

    fn environ_sizes_get(cx: Cx<'_>, ret_count_ptr: i32, ret_buf_size_ptr: i32) -> i32 {
        let vars = &cx.host().shared.config.environment_variables;
        let count = vars.len();
        let size: usize = vars.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        let (Ok(count), Ok(size)) = (u32::try_from(count), u32::try_from(size)) else {
            return WasiErrno::Inval.as_i32();
        };
        let mut memory = cx.memory();
        wasi_tri!(memory.write_u32(ret_count_ptr as u32, count));
        wasi_tri!(memory.write_u32(ret_buf_size_ptr as u32, size));
        WasiErrno::Success.as_i32()
    }

    fn environ_get(cx: Cx<'_>, environ_ptr: i32, environ_buf_ptr: i32) -> i32 {
        let (state, mut memory) = cx.split();
        let (mut slot, mut at) = (environ_ptr as u32, environ_buf_ptr as u32);
        for (key, value) in &state.shared.config.environment_variables {
            let entry = format!("{key}={value}\0");
            wasi_tri!(memory.write_u32(slot, at));
            wasi_tri!(memory.write(at, entry.as_bytes()));
            slot = slot.wrapping_add(4);
            at = at.wrapping_add(entry.len() as u32);
        }
        WasiErrno::Success.as_i32()
    }

    fn args_sizes_get(cx: Cx<'_>, ret_argc_ptr: i32, ret_buf_size_ptr: i32) -> i32 {
        let mut memory = cx.memory();
        wasi_tri!(memory.write_u32(ret_argc_ptr as u32, 0));
        wasi_tri!(memory.write_u32(ret_buf_size_ptr as u32, 0));
        WasiErrno::Success.as_i32()
    }

    fn args_get(_cx: Cx<'_>, _argv_ptr: i32, _argv_buf_ptr: i32) -> i32 {
        WasiErrno::Success.as_i32()
    }

    fn clock_time_get(cx: Cx<'_>, clock_id: i32, _precision: i64, ret_time_ptr: i32) -> i32 {
        let now = match clock_id {
            0 => realtime_nanos(),
            1 => monotonic_nanos(),
            _ => return WasiErrno::Notsup.as_i32(),
        };
        wasi_tri!(cx.memory().write_u64(ret_time_ptr as u32, now));
        WasiErrno::Success.as_i32()
    }

    fn clock_res_get(cx: Cx<'_>, clock_id: i32, ret_resolution_ptr: i32) -> i32 {
        if !matches!(clock_id, 0 | 1) {
            return WasiErrno::Notsup.as_i32();
        }
        wasi_tri!(cx.memory().write_u64(ret_resolution_ptr as u32, 1));
        WasiErrno::Success.as_i32()
    }

    fn random_get(cx: Cx<'_>, buf_ptr: i32, buf_len: i32) -> i32 {
        let len = buf_len as u32;
        if len > RANDOM_GET_MAX_BYTES {
            return WasiErrno::Inval.as_i32();
        }
        let mut memory = cx.memory();
        let dst = wasi_tri!(memory.read_mut(buf_ptr as u32, len));
        match getrandom::fill(dst) {
            Ok(()) => WasiErrno::Success.as_i32(),
            Err(_) => WasiErrno::Notsup.as_i32(),
        }
    }

    fn sched_yield(_cx: Cx<'_>) -> i32 {
        WasiErrno::Success.as_i32()
    }

    fn poll_oneoff(
        cx: Cx<'_>,
        _in_ptr: i32,
        _out_ptr: i32,
        _nsubscriptions: i32,
        ret_nevents_ptr: i32,
    ) -> i32 {
        // No event ever becomes ready; the Go runtime needs the call itself to succeed.
        wasi_tri!(cx.memory().write_u32(ret_nevents_ptr as u32, 0));
        WasiErrno::Success.as_i32()
    }

    fn proc_exit(cx: Cx<'_>, code: i32) {
        // A trap of this VM: nothing after proc_exit may run. (The reference host logs and
        // returns, and the guest then runs on into whatever follows.) `proc_exit(0)` from a
        // start function is a clean end of start, which `Vm` accepts.
        let state = cx.host();
        state.exit_code = Some(code);
        if !(code == 0 && state.phase == Phase::Start) {
            let _ = state
                .shared
                .log(LogLevel::Error, &format!("plugin called proc_exit({code})"));
        }
        cx.trap(Trap {
            kind: TrapKind::Exit,
            message: format!("proc_exit({code})"),
        });
    }
}
