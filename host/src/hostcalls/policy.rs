//! Which hostcalls a phase or a plugin's capabilities allow, what an unimplemented import
//! answers, and the hostcall trace.

use crate::state::{Phase, VmState};
use filterbox_abi::{Import, ImportModule, Status, WasiErrno};
use filterbox_engines::Hostcalls;

use super::marshal::*;

/// With `filterbox::hostcall=trace` enabled in the tracing subscriber, logs every
/// hostcall: plugin, name, raw arguments and result (a status name for `proxy_*` calls).
pub(super) fn returned(cx: Cx<'_>, import: Import, args: &[i64], result: Option<i32>) {
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
pub(super) fn admit(cx: Cx<'_>, import: Import) -> Option<i32> {
    let state = cx.host();
    if state.shared.denied.contains(import) {
        return Some(<VmState as Hostcalls>::unimplemented(cx, import));
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

pub(super) fn unimplemented(cx: Cx<'_>, import: Import) -> i32 {
    cx.host().warn_unimplemented(import);
    match import.module() {
        ImportModule::Env => Status::Unimplemented.as_i32(),
        ImportModule::Wasi => WasiErrno::Nosys.as_i32(),
    }
}
