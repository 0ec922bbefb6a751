//! Plugin-defined metrics.

use filterbox_abi::{MetricType, Status};

use super::marshal::*;

pub(super) fn proxy_define_metric(
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

pub(super) fn proxy_increment_metric(cx: Cx<'_>, metric_id: i32, offset: i64) -> i32 {
    let registry = &cx.host().shared.metric_registry;
    status_of(registry.increment(metric_id as u32, offset))
}

pub(super) fn proxy_record_metric(cx: Cx<'_>, metric_id: i32, value: i64) -> i32 {
    let registry = &cx.host().shared.metric_registry;
    status_of(registry.record(metric_id as u32, value as u64))
}

pub(super) fn proxy_get_metric(cx: Cx<'_>, metric_id: i32, ret_value_ptr: i32) -> i32 {
    let value = match cx.host().shared.metric_registry.get(metric_id as u32) {
        Ok(value) => value,
        Err(e) => return Status::from(e).as_i32(),
    };
    tri!(cx.memory().write_u64(ret_value_ptr as u32, value));
    Status::Ok.as_i32()
}
