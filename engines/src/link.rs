//! Checks made when a module is linked and instantiated, the same on every backend.

use crate::{EngineError, GuestMemory, MemoryError};
use filterbox_abi::{AbiVersion, Callback};

/// The type of an export as type names (`"i32"`, `"i64"`, `"f32"`, ...), engine-neutral.
pub(crate) type ExportType = (Vec<&'static str>, Vec<&'static str>);

fn type_names(types: &[filterbox_abi::ValType]) -> Vec<&'static str> {
    types
        .iter()
        .map(|t| match t {
            filterbox_abi::ValType::I32 => "i32",
            filterbox_abi::ValType::I64 => "i64",
        })
        .collect()
}

/// Checks every callback a module exports against the type the ABI gives it and says which
/// are present (indexed by `Callback as usize`), with the ABI version whose callback types the
/// module has. `export_type` answers for a function export.
///
/// That version is the module's own, except for ABI 0.1.0 modules whose header callbacks take
/// 0.2's third parameter (`end_of_stream`; early TinyGo SDK builds, still in the wild): they
/// are accepted and called with it, as mosn's host does.
pub(crate) fn check_callbacks(
    abi: AbiVersion,
    mut export_type: impl FnMut(&str) -> Option<ExportType>,
) -> Result<(Vec<bool>, AbiVersion), EngineError> {
    let takes_end_of_stream = |export_type: &mut dyn FnMut(&str) -> Option<ExportType>| {
        [
            Callback::ProxyOnRequestHeaders,
            Callback::ProxyOnResponseHeaders,
        ]
        .iter()
        .any(|c| export_type(c.name()).is_some_and(|(params, _)| params.len() == 3))
    };
    let abi = match abi {
        AbiVersion::V0_1_0 if takes_end_of_stream(&mut export_type) => AbiVersion::V0_2_0,
        abi => abi,
    };
    let mut present = Vec::with_capacity(Callback::COUNT);
    for &callback in Callback::ALL {
        let Some((params, results)) = export_type(callback.name()) else {
            present.push(false);
            continue;
        };
        let expected = (
            type_names(callback.params(abi)),
            type_names(callback.result().as_slice()),
        );
        if (params.as_slice(), results.as_slice()) != (expected.0.as_slice(), expected.1.as_slice())
        {
            let show =
                |(p, r): (&[&str], &[&str])| format!("({}) -> ({})", p.join(", "), r.join(", "));
            return Err(EngineError::BadExportSignature {
                name: callback.name(),
                expected: show((&expected.0, &expected.1)),
                found: show((&params, &results)),
            });
        }
        present.push(true);
    }
    Ok((present, abi))
}

/// The allocator the host calls: `proxy_on_memory_allocate`, else `malloc` (the spec's order;
/// malloc-first leaks every buffer in TinyGo plugins, ABI.md §1.3).
pub(crate) fn pick_allocator(present: &[bool]) -> Result<Callback, EngineError> {
    [Callback::ProxyOnMemoryAllocate, Callback::Malloc]
        .into_iter()
        .find(|c| present.get(*c as usize).copied().unwrap_or(false))
        .ok_or(EngineError::MissingExport(
            "proxy_on_memory_allocate or malloc",
        ))
}

/// Checks the guest allocator's answer for `size` bytes: 0 means it failed, and the whole
/// block must lie inside memory before the host writes through it.
pub(crate) fn check_allocation(
    ptr: i32,
    size: u32,
    memory: &GuestMemory<'_>,
) -> Result<u32, MemoryError> {
    // Pointers are unsigned 32-bit values carried in an i32.
    match ptr as u32 {
        0 => Err(MemoryError::AllocatorFailed { size }),
        ptr => memory.read(ptr, size).map(|_| ptr),
    }
}

/// The module names an import of the table's module `module` is linked under.
pub(crate) fn module_names(module: &str) -> &'static [&'static str] {
    match module {
        "wasi" => &filterbox_abi::WASI_MODULES,
        _ => &["env"],
    }
}
