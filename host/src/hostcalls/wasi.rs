//! The WASI functions SDK-built guests import (ABI.md §9), and the stubs for the rest.

use crate::state::Phase;
use filterbox_abi::{Import, LogLevel, WasiErrno};
use filterbox_engines::{MemoryError, Trap, TrapKind};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::marshal::*;

/// The WASI functions filterbox links to a stub answering `ENOSYS` (files, sockets, signals:
/// nothing a proxy plugin may use), so that a plugin importing them still loads.
pub(super) const WASI_STUBS: [Import; 33] = [
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
pub(super) const RANDOM_GET_MAX_BYTES: u32 = 64 * 1024;

/// Most iovecs one `fd_write` may pass, as POSIX's IOV_MAX.
pub(super) const IOV_MAX: u32 = 1024;

pub(super) fn monotonic_nanos() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let nanos = START.get_or_init(Instant::now).elapsed().as_nanos();
    u64::try_from(nanos).unwrap_or(u64::MAX)
}

pub(super) fn realtime_nanos() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    u64::try_from(nanos).unwrap_or(u64::MAX)
}

pub(super) fn fd_write(
    cx: Cx<'_>,
    fd: i32,
    iovs_ptr: i32,
    iovs_len: i32,
    ret_nwritten_ptr: i32,
) -> i32 {
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

pub(super) fn fd_fdstat_get(cx: Cx<'_>, fd: i32, ret_fdstat_ptr: i32) -> i32 {
    if !matches!(fd, 1 | 2) {
        return WasiErrno::Badf.as_i32();
    }
    // filetype 0, flags 0, rights_base = FD_WRITE (64), rights_inheriting 0.
    let mut stat = [0u8; 24];
    stat[8] = 64;
    wasi_tri!(cx.memory().write(ret_fdstat_ptr as u32, &stat));
    WasiErrno::Success.as_i32()
}

pub(super) fn fd_prestat_get(_cx: Cx<'_>, _fd: i32, _ret_prestat_ptr: i32) -> i32 {
    // No preopened directories: libc stops scanning at the first BADF.
    WasiErrno::Badf.as_i32()
}

pub(super) fn environ_sizes_get(cx: Cx<'_>, ret_count_ptr: i32, ret_buf_size_ptr: i32) -> i32 {
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

pub(super) fn environ_get(cx: Cx<'_>, environ_ptr: i32, environ_buf_ptr: i32) -> i32 {
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

pub(super) fn args_sizes_get(cx: Cx<'_>, ret_argc_ptr: i32, ret_buf_size_ptr: i32) -> i32 {
    let mut memory = cx.memory();
    wasi_tri!(memory.write_u32(ret_argc_ptr as u32, 0));
    wasi_tri!(memory.write_u32(ret_buf_size_ptr as u32, 0));
    WasiErrno::Success.as_i32()
}

pub(super) fn args_get(_cx: Cx<'_>, _argv_ptr: i32, _argv_buf_ptr: i32) -> i32 {
    WasiErrno::Success.as_i32()
}

pub(super) fn clock_time_get(cx: Cx<'_>, clock_id: i32, _precision: i64, ret_time_ptr: i32) -> i32 {
    let now = match clock_id {
        0 => realtime_nanos(),
        1 => monotonic_nanos(),
        _ => return WasiErrno::Notsup.as_i32(),
    };
    wasi_tri!(cx.memory().write_u64(ret_time_ptr as u32, now));
    WasiErrno::Success.as_i32()
}

pub(super) fn clock_res_get(cx: Cx<'_>, clock_id: i32, ret_resolution_ptr: i32) -> i32 {
    if !matches!(clock_id, 0 | 1) {
        return WasiErrno::Notsup.as_i32();
    }
    wasi_tri!(cx.memory().write_u64(ret_resolution_ptr as u32, 1));
    WasiErrno::Success.as_i32()
}

pub(super) fn random_get(cx: Cx<'_>, buf_ptr: i32, buf_len: i32) -> i32 {
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

pub(super) fn sched_yield(_cx: Cx<'_>) -> i32 {
    WasiErrno::Success.as_i32()
}

pub(super) fn poll_oneoff(
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

pub(super) fn proc_exit(cx: Cx<'_>, code: i32) {
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
