//! Header and trailer maps.

use crate::headers::lower;
use bytes::Bytes;
use filterbox_abi::{Status, pairs};

use super::marshal::*;

/// Reads a key and a value from guest memory and applies `edit` to a writable map: the shared
/// shape of add, replace and remove (which passes an empty value).
pub(super) fn edit_map(
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

pub(super) fn proxy_get_header_map_pairs(
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

pub(super) fn proxy_set_header_map_pairs(
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

pub(super) fn proxy_get_header_map_value(
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

pub(super) fn proxy_add_header_map_value(
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

pub(super) fn proxy_replace_header_map_value(
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

pub(super) fn proxy_remove_header_map_value(
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

pub(super) fn proxy_get_header_map_size(cx: Cx<'_>, map_type: i32, ret_size_ptr: i32) -> i32 {
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
