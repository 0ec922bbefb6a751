//! Memory and table limits per instance on wasmer, whose only hook for them is the engine's
//! tunables.

use crate::InstanceLimits;
use std::cell::Cell;
use std::ptr::NonNull;
use wasmer::sys::vm::{
    MemoryError as VmMemoryError, MemoryStyle, TableStyle, VMMemory, VMMemoryDefinition, VMTable,
    VMTableDefinition,
};
use wasmer::sys::{BaseTunables, Tunables};
use wasmer::{MemoryType, Pages, TableType};

thread_local! {
    /// The limits of the instance this thread is making. Wasmer asks the engine's tunables
    /// for memories and tables, and has no per-store hook, so `instantiate` puts the
    /// instance's limits here for the length of `Instance::new` (which runs on this thread).
    pub(super) static LIMITS: Cell<Option<(u32, u32)>> = const { Cell::new(None) };
}

/// Lowers the maximum of every memory and table to the limits of the instance being made.
pub(super) struct LimitingTunables {
    pub(super) base: BaseTunables,
}

impl LimitingTunables {
    fn limits() -> (u32, u32) {
        LIMITS.with(Cell::get).unwrap_or_else(|| {
            let d = InstanceLimits::default();
            (
                d.memory_pages(),
                u32::try_from(d.max_table_elements).unwrap_or(u32::MAX),
            )
        })
    }

    fn memory(ty: &MemoryType) -> Result<MemoryType, VmMemoryError> {
        let (pages, _) = Self::limits();
        if ty.minimum.0 > pages {
            return Err(VmMemoryError::MinimumMemoryTooLarge {
                min_requested: ty.minimum,
                max_allowed: Pages(pages),
            });
        }
        let mut ty = *ty;
        ty.maximum = Some(Pages(ty.maximum.map_or(pages, |m| m.0.min(pages))));
        Ok(ty)
    }

    fn table(ty: &TableType) -> Result<TableType, String> {
        let (_, elements) = Self::limits();
        if ty.minimum > elements {
            return Err(format!(
                "table of {} elements is over the limit of {elements}",
                ty.minimum
            ));
        }
        let mut ty = *ty;
        ty.maximum = Some(ty.maximum.map_or(elements, |m| m.min(elements)));
        Ok(ty)
    }
}

impl Tunables for LimitingTunables {
    fn memory_style(&self, memory: &MemoryType) -> MemoryStyle {
        self.base.memory_style(memory)
    }

    fn table_style(&self, table: &TableType) -> TableStyle {
        self.base.table_style(table)
    }

    fn create_host_memory(
        &self,
        ty: &MemoryType,
        style: &MemoryStyle,
    ) -> Result<VMMemory, VmMemoryError> {
        self.base.create_host_memory(&Self::memory(ty)?, style)
    }

    unsafe fn create_vm_memory(
        &self,
        ty: &MemoryType,
        style: &MemoryStyle,
        vm_definition_location: NonNull<VMMemoryDefinition>,
    ) -> Result<VMMemory, VmMemoryError> {
        let ty = Self::memory(ty)?;
        // SAFETY: forwarded unchanged from wasmer, which guarantees the location is valid;
        // only the memory's maximum was lowered, which its style (made for the larger
        // maximum) still covers.
        unsafe {
            self.base
                .create_vm_memory(&ty, style, vm_definition_location)
        }
    }

    fn create_host_table(&self, ty: &TableType, style: &TableStyle) -> Result<VMTable, String> {
        self.base.create_host_table(&Self::table(ty)?, style)
    }

    unsafe fn create_vm_table(
        &self,
        ty: &TableType,
        style: &TableStyle,
        vm_definition_location: NonNull<VMTableDefinition>,
    ) -> Result<VMTable, String> {
        let ty = Self::table(ty)?;
        // SAFETY: forwarded unchanged from wasmer, which guarantees the location is valid;
        // only the table's maximum was lowered.
        unsafe {
            self.base
                .create_vm_table(&ty, style, vm_definition_location)
        }
    }
}
