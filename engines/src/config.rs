//! Engine and instance settings.

use std::time::Duration;

#[cfg(doc)]
use crate::{Engine, Instance, TrapKind};

/// Engine settings shared by every module an [`Engine`] compiles.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EngineConfig {
    /// Maximum wasm stack in bytes on the compiling engines; deeper recursion traps with
    /// [`TrapKind::StackOverflow`]. (wasmi bounds recursion with its own stack limits.)
    pub max_wasm_stack: usize,
    /// Pre-allocate instance slots so a new VM costs little (wasmtime's pooling allocator).
    /// Off by default: it reserves address space for every slot up front. On wasmi, dropped
    /// instances' memory mappings are kept for new ones with their pages resident (up to
    /// `keep_resident_bytes` while idle), instead of making a new VM fault its initial
    /// memory in.
    pub pooling: Option<PoolingConfig>,
    /// Initialize linear memories from copy-on-write images of the module's data (wasmtime).
    pub memory_init_cow: bool,
    /// Compile in the mechanism that stops guest code at a deadline (wasmtime: epoch
    /// interruption; wasmer: metering plus a watchdog thread that interrupts calls by signal;
    /// wasmi: fuel). On by default; without it [`Instance::set_deadline`] has no effect and an
    /// infinite loop runs forever.
    pub interruptible: bool,
    /// How long a module's wasm start section may run while it is instantiated, unless the
    /// instance's [`InstanceLimits::start_deadline`] says otherwise (on wasmer the metering
    /// budget compiled into the module is this one; the watchdog uses the instance's).
    pub start_deadline: Duration,
}

/// Sizes of the instance pool, see [`EngineConfig::pooling`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolingConfig {
    /// How many instances (VMs) may live at once.
    pub max_instances: u32,
    /// The largest linear memory an instance may have.
    pub max_memory_bytes: usize,
    /// Up to this much of a dropped instance's linear memory (and as much of its table)
    /// stays mapped and is reset in place for the next instance in its slot, instead of
    /// being handed back to the kernel (`madvise`, which also interrupts every other core to
    /// flush its TLB). On Linux 6.7 and later only the pages the guest wrote are reset
    /// (`PAGEMAP_SCAN`). Default 1 MiB; 0 hands everything back.
    pub keep_resident_bytes: usize,
}

impl PoolingConfig {
    /// A pool of `max_instances` instances of at most `max_memory_bytes` of linear memory each.
    pub fn new(max_instances: u32, max_memory_bytes: usize) -> Self {
        PoolingConfig {
            max_instances,
            max_memory_bytes,
            ..PoolingConfig::default()
        }
    }
}

impl Default for PoolingConfig {
    fn default() -> Self {
        PoolingConfig {
            max_instances: 1000,
            max_memory_bytes: 64 << 20,
            keep_resident_bytes: 1 << 20,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_wasm_stack: 512 * 1024,
            pooling: None,
            memory_init_cow: true,
            interruptible: true,
            start_deadline: Duration::from_secs(1),
        }
    }
}

impl EngineConfig {
    /// Turns the instance pool on with `pool`.
    pub fn with_pooling(mut self, pool: PoolingConfig) -> Self {
        self.pooling = Some(pool);
        self
    }

    /// Turns the deadline mechanism on or off (see [`EngineConfig::interruptible`]).
    pub fn with_interruptible(mut self, on: bool) -> Self {
        self.interruptible = on;
        self
    }
}

/// Resources one instance may use. Growth past a limit fails inside the guest
/// (`memory.grow` returns -1, `table.grow` returns -1); a module whose *initial* memory or
/// table is over the limit fails to instantiate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct InstanceLimits {
    /// The largest linear memory, in bytes (rounded down to whole 64 KiB pages).
    pub max_memory_bytes: usize,
    /// The most elements a table may hold.
    pub max_table_elements: usize,
    /// How long the module's start section may run (`None`: the engine's
    /// [`EngineConfig::start_deadline`]).
    pub start_deadline: Option<Duration>,
}

impl Default for InstanceLimits {
    fn default() -> Self {
        InstanceLimits {
            max_memory_bytes: 128 << 20,
            max_table_elements: 100_000,
            start_deadline: None,
        }
    }
}

impl InstanceLimits {
    /// Limits with this memory ceiling.
    pub fn with_max_memory_bytes(mut self, bytes: usize) -> Self {
        self.max_memory_bytes = bytes;
        self
    }

    /// Limits with this table ceiling.
    pub fn with_max_table_elements(mut self, elements: usize) -> Self {
        self.max_table_elements = elements;
        self
    }

    /// Limits with this deadline for the start section.
    pub fn with_start_deadline(mut self, deadline: Option<Duration>) -> Self {
        self.start_deadline = deadline;
        self
    }

    /// The memory ceiling in wasm pages.
    pub(crate) fn memory_pages(&self) -> u32 {
        u32::try_from(self.max_memory_bytes / WASM_PAGE).unwrap_or(u32::MAX)
    }
}

/// Wasm operators per millisecond that wasmer's metering budget assumes when it turns a
/// deadline into a count (a simple loop on the Cranelift backend on x86-64 runs about this
/// many; singlepass code is slower). The budget is ten deadlines' worth: metering is the
/// backstop should the watchdog's signal not end a call, never what ends it at its deadline.
pub const WASMER_OPS_PER_MS: u64 = 1_000_000;

/// Bytes in a wasm page.
pub(crate) const WASM_PAGE: usize = 64 * 1024;
