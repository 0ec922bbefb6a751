//! Marshalling shared by the hostcalls: reading guest arguments through checked memory,
//! decoding enums and pair buffers, and handing results back through the guest allocator.

use crate::HeaderMap;
use crate::config::Limits;
use crate::state::VmState;
use bytes::Bytes;
use filterbox_abi::{BufferType, MapType, Status, StreamType, pairs};
use filterbox_engines::{Caller, GuestMemory, MemoryError};
use std::panic::{AssertUnwindSafe, catch_unwind};

pub(super) type Cx<'a> = &'a mut dyn Caller<VmState>;

/// Returns early from a hostcall with the status (or errno) of an error.
macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return Status::from(e).as_i32(),
        }
    };
}

pub(super) use tri;

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

pub(super) use wasi_tri;

pub(super) fn read<'m>(
    memory: &'m GuestMemory<'_>,
    ptr: i32,
    len: i32,
) -> Result<&'m [u8], MemoryError> {
    // Wasm pointers and sizes are unsigned 32-bit values carried in i32s.
    memory.read(ptr as u32, len as u32)
}

/// Hands `len` bytes to the guest: allocates them with the guest allocator, lets `fill` write
/// them from the host state, and writes the pointer and size to the out-pointers. Zero bytes
/// are returned as `(0, 0)` without calling the allocator (SDK allocators break on 0).
pub(super) fn return_with(
    cx: Cx<'_>,
    len: usize,
    ret_ptr_ptr: i32,
    ret_size_ptr: i32,
    fill: impl FnOnce(&VmState, &mut [u8]) -> bool,
) -> Status {
    return_with_to(cx, len, Some(ret_ptr_ptr), Some(ret_size_ptr), fill)
}

/// [`return_with`] where either out-pointer may be left unwritten (`None`).
pub(super) fn return_with_to(
    cx: Cx<'_>,
    len: usize,
    ret_ptr_ptr: Option<i32>,
    ret_size_ptr: Option<i32>,
    fill: impl FnOnce(&VmState, &mut [u8]) -> bool,
) -> Status {
    let Ok(len) = u32::try_from(len) else {
        return Status::InvalidMemoryAccess;
    };
    let (ptr, mut memory) = if len == 0 {
        (0, cx.memory())
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
        (ptr, memory)
    };
    for (at, value) in [(ret_ptr_ptr, ptr), (ret_size_ptr, len)] {
        if let Some(at) = at
            && memory.write_u32(at as u32, value).is_err()
        {
            return Status::InvalidMemoryAccess;
        }
    }
    Status::Ok
}

/// Hands a copy of `data` to the guest (see [`return_with`]).
pub(super) fn return_bytes(cx: Cx<'_>, data: &[u8], ret_ptr_ptr: i32, ret_size_ptr: i32) -> Status {
    return_with(cx, data.len(), ret_ptr_ptr, ret_size_ptr, |_, dst| {
        dst.copy_from_slice(data);
        true
    })
}

pub(super) fn write_words(memory: &mut GuestMemory<'_>, words: &[(i32, u32)]) -> Status {
    for (ptr, value) in words {
        if memory.write_u32(*ptr as u32, *value).is_err() {
            return Status::InvalidMemoryAccess;
        }
    }
    Status::Ok
}

/// The status of an operation that returns nothing on success.
pub(super) fn status_of<E: Into<Status>>(result: Result<(), E>) -> i32 {
    match result {
        Ok(()) => Status::Ok.as_i32(),
        Err(e) => e.into().as_i32(),
    }
}

pub(super) fn map_type(value: i32) -> Result<MapType, Status> {
    MapType::from_u32(value as u32).ok_or(Status::BadArgument)
}

pub(super) fn buffer_type(value: i32) -> Result<BufferType, Status> {
    BufferType::from_u32(value as u32).ok_or(Status::BadArgument)
}

pub(super) fn stream_type(value: i32) -> Result<StreamType, Status> {
    StreamType::from_u32(value as u32).ok_or(Status::BadArgument)
}

/// Decodes a guest pairs buffer holding at most the headers `limits` allow (`BadArgument`
/// past them). The buffer's size is checked before it is decoded, so a huge one costs the
/// host nothing. A malformed one is `BadArgument` too: the reference host treats it as an
/// empty map and answers `Ok`, which silently clears headers; filterbox says so instead.
pub(super) fn decode_pairs(bytes: &[u8], limits: &Limits) -> Result<Vec<(Bytes, Bytes)>, Status> {
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
    Ok(crate::packed::headers(&decoded))
}

pub(super) fn read_str(memory: &GuestMemory<'_>, ptr: i32, len: i32) -> Result<String, Status> {
    let bytes = read(memory, ptr, len)?;
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

pub(super) fn decode_map(
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
pub(super) fn read_body(
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

/// Runs embedder code from a hostcall: a panic is the embedder's bug and answers
/// `InternalFailure` instead of unwinding into wasm.
pub(super) fn embedder<T>(f: impl FnOnce() -> Result<T, Status>) -> Result<T, Status> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(Err(Status::InternalFailure))
}
