//! Properties: Envoy attributes, the plugin's own values and the embedder's.

use crate::state::{ContextKind, VmState};
use bytes::Bytes;
use filterbox_abi::{MapType, Status, property_path};
use std::panic::{AssertUnwindSafe, catch_unwind};

use super::marshal::*;

/// Stores a property of the current context (`proxy_set_property`, filter state), within
/// the property limits: paths count with values, both held until the context ends.
pub(super) fn set_property(state: &mut VmState, path: Vec<u8>, value: &[u8]) -> Result<(), Status> {
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

pub(super) fn proxy_set_property(
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

pub(super) fn proxy_get_property(
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
        [b"upstream", ..] => state
            .stream_info
            .get(&state.context())
            .and_then(|info| info.upstream_attribute(&path)),
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
