//! Wasm engines behind one small interface, for the filterbox proxy-wasm host.
//!
//! - [`Engine`] compiles bytes into a [`Module`] (`Send + Sync`, shared by every VM of a plugin).
//! - [`Module::link`] links it with a host's [`Hostcalls`] into an [`InstancePre`].
//! - [`InstancePre::instantiate`] makes an [`Instance`] that owns the host state and calls
//!   [`Callback`] exports.
//! - Hostcalls see the guest only through [`Caller`]: a checked [`GuestMemory`] and the guest
//!   allocator.
//!
//! Which backends exist is decided by cargo features (`wasmtime`, on by default); which one a
//! plugin uses is chosen at run time by [`EngineKind`]. This is the only crate that touches
//! engine types or contains `unsafe`. The backends are listed once, in this file's
//! `backend_list!`; each is one module implementing `backend::Backend`.

#![warn(missing_docs)]

#[cfg(not(any(feature = "wasmtime", feature = "wasmi", feature = "wasmer")))]
compile_error!("filterbox-engines needs at least one engine feature: wasmtime, wasmi or wasmer");

mod backend;
mod cache;
#[cfg(any(feature = "wasmtime", feature = "wasmi", feature = "wasmer"))]
mod clock;
mod config;
mod error;
mod hostcalls;
mod link;
mod memory;

use backend::{Backend, BackendInstance};
use core::fmt;
use filterbox_abi::{AbiVersion, Callback, ModuleInfo};
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

pub use cache::{CacheOutcome, ModuleCache};
#[cfg(any(feature = "wasmtime", feature = "wasmi", feature = "wasmer"))]
pub(crate) use clock::RunClock;
#[cfg(feature = "wasmer")]
pub(crate) use clock::ThreadCpuClock;
#[cfg(any(feature = "wasmtime", feature = "wasmi"))]
pub(crate) use config::WASM_PAGE;
pub use config::{EngineConfig, InstanceLimits, PoolingConfig, WASMER_OPS_PER_MS};
#[cfg(feature = "wasmer")]
pub(crate) use error::panic_message;
pub use error::{EngineError, Trap, TrapKind};
pub(crate) use error::{HostTrap, panic_trap};
pub use filterbox_abi as abi;
pub(crate) use hostcalls::run_import;
pub use hostcalls::{Caller, Hostcalls};
pub(crate) use link::{check_allocation, check_callbacks, module_names, pick_allocator};
pub use memory::{GuestMemory, MemoryError};

// The backend list: module::type, cargo feature (and `thread_bound` for a backend whose
// instances must stay on their thread), then the engines it provides, in report order.
backend::backend_list! {
    wasmtime_backend::Wasmtime if "wasmtime" => {
        /// Wasmtime with Cranelift (`"wasmtime"`, the default).
        Wasmtime = "wasmtime",
    }
    wasmer_backend::Wasmer if "wasmer", thread_bound => {
        /// Wasmer with its Cranelift compiler (`"wasmer-cranelift"`).
        WasmerCranelift = "wasmer-cranelift",
        /// Wasmer with its single-pass compiler (`"wasmer-singlepass"`).
        WasmerSinglepass = "wasmer-singlepass",
    }
    wasmi_backend::Wasmi if "wasmi" => {
        /// The wasmi interpreter (`"wasmi"`).
        Wasmi = "wasmi",
    }
}

impl EngineKind {
    /// The engine with this name, whether or not this build has it.
    pub fn from_name(name: &str) -> Result<EngineKind, EngineError> {
        EngineKind::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| EngineError::UnknownEngine(name.to_owned()))
    }

    /// The engines this build includes.
    pub fn built() -> Vec<EngineKind> {
        EngineKind::ALL
            .into_iter()
            .filter(|k| k.is_built())
            .collect()
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl core::str::FromStr for EngineKind {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EngineKind::from_name(s)
    }
}

/// What a callback call returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Returned {
    /// The module does not export the callback.
    Missing,
    /// The callback returns nothing.
    Nothing,
    /// The callback's `i32` result.
    Value(i32),
}

/// A wasm engine: compiles modules. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    kind: EngineKind,
    inner: EngineInner,
}

impl Engine {
    /// Makes an engine of `kind`, or says which engines this build has.
    pub fn new(kind: EngineKind, config: &EngineConfig) -> Result<Engine, EngineError> {
        Ok(Engine {
            kind,
            inner: EngineInner::new(kind, config)?,
        })
    }

    /// Which engine this is.
    pub fn kind(&self) -> EngineKind {
        self.kind
    }

    /// Compiles a module. Its imports and exports are read first, so a module that is not
    /// wasm at all fails with the parser's reason.
    pub fn compile(&self, wasm: &[u8]) -> Result<Module, EngineError> {
        let info = ModuleInfo::parse(wasm).map_err(|e| EngineError::Compile(e.to_string()))?;
        Ok(Module {
            kind: self.kind,
            info: Arc::new(info),
            inner: self.inner.compile(wasm)?,
        })
    }
}

/// A compiled module. `Send + Sync`, cheap to clone, shared by every VM of a plugin.
#[derive(Clone)]
pub struct Module {
    kind: EngineKind,
    info: Arc<ModuleInfo>,
    inner: ModuleInner,
}

impl Module {
    /// The engine that compiled it.
    pub fn engine(&self) -> EngineKind {
        self.kind
    }

    /// Its imports and exports.
    pub fn info(&self) -> &ModuleInfo {
        &self.info
    }

    /// Links the module with the host functions of `H` for ABI `abi`, checking up front that
    /// every import is provided, that it exports `memory` and an allocator, and that every
    /// callback it exports has the type the ABI gives it.
    pub fn link<H: Hostcalls>(&self, abi: AbiVersion) -> Result<InstancePre<H>, EngineError> {
        let unsupported: Vec<String> = self
            .info
            .unsupported_imports()
            .map(|i| format!("{}.{}", i.module, i.name))
            .collect();
        if !unsupported.is_empty() {
            return Err(EngineError::UnsupportedImports(unsupported));
        }
        Ok(InstancePre {
            inner: self.inner.link(abi)?,
        })
    }
}

/// A module linked with a host's functions, ready to instantiate many times.
/// `Send + Sync`: one per plugin, shared by every worker thread.
pub struct InstancePre<H: Hostcalls> {
    inner: InstancePreInner<H>,
}

impl<H: Hostcalls> Clone for InstancePre<H> {
    fn clone(&self) -> Self {
        InstancePre {
            inner: self.inner.clone(),
        }
    }
}

impl<H: Hostcalls> InstancePre<H> {
    /// Makes a new instance that owns `host`, held to `limits`. A wasm start section runs
    /// here, under the engine's [`EngineConfig::start_deadline`].
    pub fn instantiate(
        &self,
        host: H,
        limits: &InstanceLimits,
    ) -> Result<Instance<H>, EngineError> {
        Ok(Instance {
            inner: self.inner.instantiate(host, limits)?,
        })
    }
}

/// One instance of a module with its host state. `Send`, never `Sync`.
///
/// An instance of a [thread-bound](EngineKind::thread_bound) engine (wasmer) may be moved but
/// is only usable on the thread that made it ([`Instance::is_home`]): elsewhere
/// [`Instance::call`] fails with a [`TrapKind::Other`] trap, [`Instance::has`] says `false`,
/// and a drop leaks it rather than free it on the wrong thread.
pub struct Instance<H: Hostcalls> {
    inner: InstanceInner<H>,
}

impl<H: Hostcalls> Instance<H> {
    /// Whether the module exports `callback`.
    pub fn has(&self, callback: Callback) -> bool {
        self.inner.get().has(callback)
    }

    /// Sets how long each later [`Instance::call`] may run (`None`: no limit). A call past its
    /// deadline traps with [`TrapKind::Interrupted`]. Each engine does what it can:
    /// - wasmtime checks a 1 ms epoch at loop heads and function entries; once the deadline
    ///   has passed on the clock, the thread's CPU time decides (where the platform keeps one):
    ///   a call that was preempted rather than running goes on until it has run for its
    ///   deadline, or until ten deadlines have passed on the clock. A busy loop stops between
    ///   the deadline and a tick after it;
    /// - wasmi runs on fuel in slices and looks at the clock between slices, and past the
    ///   deadline at the thread's CPU clock, as wasmtime does;
    /// - wasmer: a watchdog thread interrupts a call still running a millisecond tick after
    ///   its deadline, with the running thread's CPU clock deciding as on wasmtime (so a
    ///   preempted call is not cut short, and a slow or loaded machine does not stretch a
    ///   running one). It sends no interrupt while the call runs a hostcall, and repeats one
    ///   only after 100 ms. Metering (ten deadlines' worth of operators at
    ///   [`WASMER_OPS_PER_MS`]) is the backstop should the signal not end the call.
    ///
    /// On wasmi and wasmer the clocks are also read before each hostcall (the thread's CPU
    /// clock deciding past the deadline), so time spent inside hostcalls counts: a call past
    /// its deadline traps as it next enters the host (wasmtime's epoch counts it without
    /// that).
    ///
    /// Without [`EngineConfig::interruptible`] this does nothing.
    pub fn set_deadline(&mut self, deadline: Option<Duration>) {
        self.inner.get_mut().set_deadline(deadline)
    }

    /// Calls `callback` with `args` (as many as its ABI signature has; extra ones are
    /// ignored, missing ones are zero).
    pub fn call(&mut self, callback: Callback, args: &[i32]) -> Result<Returned, Trap> {
        self.inner.get_mut().call(callback, args)
    }

    /// Whether the instance can be used on the calling thread: always, except for a
    /// [thread-bound](EngineKind::thread_bound) engine's instance away from its thread.
    pub fn is_home(&self) -> bool {
        self.inner.get().is_home()
    }

    /// The host state.
    ///
    /// # Panics
    /// On a thread other than its own, for an instance of a
    /// [thread-bound](EngineKind::thread_bound) engine ([`Instance::is_home`] says when).
    pub fn host(&self) -> &H {
        self.inner.get().host()
    }

    /// The host state, mutably.
    ///
    /// # Panics
    /// As [`Instance::host`].
    pub fn host_mut(&mut self) -> &mut H {
        self.inner.get_mut().host_mut()
    }

    /// Current size of the guest's linear memory in bytes.
    pub fn memory_size(&mut self) -> usize {
        self.inner.get_mut().memory_size()
    }
}

/// Locks `mutex`, going on past a poisoned lock: the deadline threads' lists stay usable
/// after a panic elsewhere (a list of weak references or watched calls cannot be left half
/// changed by one).
#[cfg(any(feature = "wasmtime", feature = "wasmer"))]
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

// Every instance is `Send` in every build (wasmer's by staying usable only at home).
#[allow(dead_code)]
fn instance_is_send<H: Hostcalls>(instance: Instance<H>) -> impl Send {
    instance
}
