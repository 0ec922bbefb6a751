//! Shared data and shared queues.

use crate::shared::{QueueError, SharedError};
use filterbox_abi::Status;

use super::marshal::*;

pub(super) fn proxy_get_shared_data(
    cx: Cx<'_>,
    key_ptr: i32,
    key_size: i32,
    ret_value_ptr_ptr: i32,
    ret_value_size_ptr: i32,
    ret_cas_ptr: i32,
) -> i32 {
    let (state, memory) = cx.split();
    let key = tri!(read(&memory, key_ptr, key_size));
    // A store that cannot answer looks like a missing key: `NotFound` is the one failure the
    // Rust SDK returns instead of panicking (ABI.md §11, item 17).
    let Ok(Some((value, cas))) = state
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

pub(super) fn proxy_set_shared_data(
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
        Ok(_) => Status::Ok,
        Err(SharedError::CasMismatch) => Status::CasMismatch,
        // The write did not happen; `CasMismatch` is the one failure the Rust SDK returns
        // instead of panicking, and a CAS loop retries or gives up on it.
        Err(SharedError::Unavailable) => Status::CasMismatch,
        Err(_) => Status::InternalFailure,
    }
    .as_i32()
}

pub(super) fn proxy_register_shared_queue(
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
        Err(_) => return Status::InternalFailure.as_i32(),
    };
    write_words(&mut memory, &[(ret_queue_id_ptr, token)]).as_i32()
}

pub(super) fn proxy_resolve_shared_queue(
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
        Ok(Some(token)) => write_words(&mut memory, &[(ret_queue_id_ptr, token)]).as_i32(),
        // A store that cannot answer: the queue cannot be found.
        Ok(None) | Err(_) => Status::NotFound.as_i32(),
    }
}

pub(super) fn proxy_enqueue_shared_queue(
    cx: Cx<'_>,
    queue_id: i32,
    value_ptr: i32,
    value_size: i32,
) -> i32 {
    let (state, memory) = cx.split();
    let value = tri!(read(&memory, value_ptr, value_size));
    match state.shared.shared_state.enqueue(queue_id as u32, value) {
        Ok(()) => Status::Ok,
        // A store that cannot answer: `NotFound`, which the Rust SDK returns as an `Err`.
        Err(QueueError::NotFound | QueueError::Unavailable) => Status::NotFound,
        Err(_) => Status::InternalFailure,
    }
    .as_i32()
}

pub(super) fn proxy_dequeue_shared_queue(
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
        // A store that cannot answer: nothing to take now.
        Ok(None) | Err(QueueError::Unavailable) => Status::Empty.as_i32(),
        Err(QueueError::NotFound) => Status::NotFound.as_i32(),
        Err(_) => Status::InternalFailure.as_i32(),
    }
}
