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
//! engine types or contains `unsafe`.

#![warn(missing_docs)]

#[cfg(not(any(feature = "wasmtime", feature = "wasmi", feature = "wasmer")))]
compile_error!("filterbox-engines needs at least one engine feature: wasmtime, wasmi or wasmer");

mod cache;
mod memory;
#[cfg(feature = "wasmer")]
mod wasmer_backend;
#[cfg(feature = "wasmi")]
mod wasmi_backend;
#[cfg(feature = "wasmtime")]
mod wasmtime_backend;

use core::fmt;
use filterbox_abi::{AbiVersion, Callback, Import, ModuleInfo};
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

pub use cache::{CacheOutcome, ModuleCache};

pub use filterbox_abi as abi;
pub use memory::{GuestMemory, MemoryError};

/// The engines filterbox knows, by the names configs and reports use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EngineKind {
    /// Wasmtime with Cranelift (`"wasmtime"`, the default).
    Wasmtime,
    /// Wasmer with its Cranelift compiler (`"wasmer-cranelift"`).
    WasmerCranelift,
    /// Wasmer with its single-pass compiler (`"wasmer-singlepass"`).
    WasmerSinglepass,
    /// The wasmi interpreter (`"wasmi"`).
    Wasmi,
}

impl EngineKind {
    /// Every engine filterbox knows, whether or not this build has it.
    pub const ALL: [EngineKind; 4] = [
        EngineKind::Wasmtime,
        EngineKind::WasmerCranelift,
        EngineKind::WasmerSinglepass,
        EngineKind::Wasmi,
    ];

    /// The engine's name in configs and reports.
    pub const fn name(self) -> &'static str {
        match self {
            EngineKind::Wasmtime => "wasmtime",
            EngineKind::WasmerCranelift => "wasmer-cranelift",
            EngineKind::WasmerSinglepass => "wasmer-singlepass",
            EngineKind::Wasmi => "wasmi",
        }
    }

    /// The engine with this name, whether or not this build has it.
    pub fn from_name(name: &str) -> Result<EngineKind, EngineError> {
        EngineKind::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| EngineError::UnknownEngine(name.to_owned()))
    }

    /// Whether this build includes the engine.
    pub const fn is_built(self) -> bool {
        match self {
            EngineKind::Wasmtime => cfg!(feature = "wasmtime"),
            EngineKind::WasmerCranelift | EngineKind::WasmerSinglepass => cfg!(feature = "wasmer"),
            EngineKind::Wasmi => cfg!(feature = "wasmi"),
        }
    }

    /// Whether the engine's instances must stay on the thread that made them (wasmer's). An
    /// [`Instance`] of such an engine is `Send` so that it can live beside others, but used
    /// on another thread its calls fail and [`Instance::host`] panics: keep it home.
    pub const fn thread_bound(self) -> bool {
        matches!(
            self,
            EngineKind::WasmerCranelift | EngineKind::WasmerSinglepass
        )
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

/// Engine settings shared by every module an [`Engine`] compiles.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EngineConfig {
    /// Maximum wasm stack in bytes on the compiling engines; deeper recursion traps with
    /// [`TrapKind::StackOverflow`]. (wasmi bounds recursion with its own stack limits.)
    pub max_wasm_stack: usize,
    /// Pre-allocate instance slots so a new VM costs little (wasmtime's pooling allocator).
    /// Off by default: it reserves address space for every slot up front.
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
pub struct PoolingConfig {
    /// How many instances (VMs) may live at once.
    pub max_instances: u32,
    /// The largest linear memory an instance may have.
    pub max_memory_bytes: usize,
}

impl Default for PoolingConfig {
    fn default() -> Self {
        PoolingConfig {
            max_instances: 1000,
            max_memory_bytes: 64 << 20,
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
/// many; singlepass code is slower, so its deadlines are later in wall time).
pub const WASMER_OPS_PER_MS: u64 = 1_000_000;

/// Bytes in a wasm page.
pub(crate) const WASM_PAGE: usize = 64 * 1024;

/// Why an engine could not be made, a module compiled or linked, or an instance made.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EngineError {
    /// No engine has this name.
    UnknownEngine(String),
    /// The engine exists but this build does not include it.
    NotBuilt {
        /// The engine asked for.
        engine: EngineKind,
        /// The engines this build has.
        built: Vec<EngineKind>,
    },
    /// The engine rejected its configuration.
    Config(String),
    /// The bytes are not a valid module for this engine.
    Compile(String),
    /// The module imports functions the host does not provide.
    UnsupportedImports(Vec<String>),
    /// The module lacks an export the host needs.
    MissingExport(&'static str),
    /// An export has a different type than the ABI gives it.
    BadExportSignature {
        /// The export.
        name: &'static str,
        /// The type the ABI gives it.
        expected: String,
        /// The type the module gives it.
        found: String,
    },
    /// Linking or instantiation failed.
    Instantiate(String),
    /// The start section trapped during instantiation.
    StartTrapped(Trap),
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EngineError::UnknownEngine(name) => {
                let all: Vec<_> = EngineKind::ALL.iter().map(|k| k.name()).collect();
                write!(f, "unknown engine {name:?} (known: {})", all.join(", "))
            }
            EngineError::NotBuilt { engine, built } => {
                let built: Vec<_> = built.iter().map(|k| k.name()).collect();
                write!(
                    f,
                    "engine {engine} is not in this build (built: {}); enable its cargo feature",
                    built.join(", ")
                )
            }
            EngineError::Config(why) => write!(f, "engine configuration rejected: {why}"),
            EngineError::Compile(why) => write!(f, "module does not compile: {why}"),
            EngineError::UnsupportedImports(names) => write!(
                f,
                "module imports unsupported functions: {}",
                names.join(", ")
            ),
            EngineError::MissingExport(name) => write!(f, "module does not export {name}"),
            EngineError::BadExportSignature {
                name,
                expected,
                found,
            } => {
                write!(
                    f,
                    "export {name} has type {found}, the ABI gives it {expected}"
                )
            }
            EngineError::Instantiate(why) => write!(f, "instantiation failed: {why}"),
            EngineError::StartTrapped(trap) => write!(f, "start section trapped: {trap}"),
        }
    }
}

impl std::error::Error for EngineError {}

/// The class of a trap, the same whatever the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TrapKind {
    /// `unreachable` was executed (Rust SDK panics end here).
    Unreachable,
    /// A memory or table access was out of bounds.
    OutOfBounds,
    /// The wasm stack was exhausted.
    StackOverflow,
    /// Execution was interrupted (deadline or fuel).
    Interrupted,
    /// A memory or table could not grow, or an allocation was too large.
    OutOfMemory,
    /// Integer overflow, division by zero or a bad float-to-int conversion.
    Arithmetic,
    /// An indirect call to a null or mistyped function.
    BadCall,
    /// A host function failed or panicked.
    Host,
    /// The guest called WASI `proc_exit`.
    Exit,
    /// Anything else the engine reports.
    Other,
}

impl TrapKind {
    /// Every class, in a fixed order (for tables indexed by `kind as usize`).
    pub const ALL: [TrapKind; 10] = [
        TrapKind::Unreachable,
        TrapKind::OutOfBounds,
        TrapKind::StackOverflow,
        TrapKind::Interrupted,
        TrapKind::OutOfMemory,
        TrapKind::Arithmetic,
        TrapKind::BadCall,
        TrapKind::Host,
        TrapKind::Exit,
        TrapKind::Other,
    ];

    /// A short lower-case name for reports and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            TrapKind::Unreachable => "unreachable",
            TrapKind::OutOfBounds => "out_of_bounds",
            TrapKind::StackOverflow => "stack_overflow",
            TrapKind::Interrupted => "interrupted",
            TrapKind::OutOfMemory => "out_of_memory",
            TrapKind::Arithmetic => "arithmetic",
            TrapKind::BadCall => "bad_call",
            TrapKind::Host => "host",
            TrapKind::Exit => "exit",
            TrapKind::Other => "other",
        }
    }
}

/// A trap raised while running guest code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trap {
    /// Its class.
    pub kind: TrapKind,
    /// The engine's description.
    pub message: String,
}

impl fmt::Display for Trap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} trap: {}", self.kind.name(), self.message)
    }
}

impl std::error::Error for Trap {}

/// What a guest sees of its caller from inside a hostcall: the host state, its own memory
/// (checked), and its allocator. Engines implement it; hostcalls take `&mut dyn Caller<H>`.
pub trait Caller<H> {
    /// The host state.
    fn host(&mut self) -> &mut H;
    /// The guest's memory. Empty if the module has none (every access then fails).
    fn memory(&mut self) -> GuestMemory<'_>;
    /// Host state and memory at once.
    fn split(&mut self) -> (&mut H, GuestMemory<'_>);
    /// Makes the guest trap with `trap` as soon as the current hostcall returns (WASI
    /// `proc_exit`). The instance fails like on any trap.
    fn trap(&mut self, trap: Trap);
    /// Calls the guest allocator for `size` (> 0) bytes and checks that the whole returned
    /// range is inside memory before the host writes through it. A trap in the allocator fails
    /// the instance once the hostcall returns.
    fn allocate(&mut self, size: u32) -> Result<u32, MemoryError>;
    /// Whether the running call is past its deadline. Checked before every hostcall, so a
    /// loop whose body is a hostcall stops in time on engines that measure deadlines by
    /// counting work (wasmi's fuel, wasmer's metering) and do not count the host's share.
    fn deadline_passed(&mut self) -> bool {
        false
    }
}

macro_rules! default_body {
    (i32, $cx:ident, $import:expr) => {
        Self::unimplemented($cx, $import)
    };
    ((), $cx:ident, $import:expr) => {{
        let _ = Self::unimplemented($cx, $import);
    }};
}

macro_rules! define_hostcalls_trait {
    ($($variant:ident : $module:ident $name:ident ( $($arg:ident : $ty:ident),* ) -> $ret:tt , $vers:ident ;)*) => {
        /// The host side of every import in the ABI table, one method per import, generated
        /// from [`abi::for_each_import!`]. Arguments are the raw wasm values. Methods not
        /// overridden call [`Hostcalls::unimplemented`].
        #[allow(unused_variables)]
        pub trait Hostcalls: Sized + Send + 'static {
            /// Result of an import the implementation does not provide: a `proxy_*` call
            /// should answer `Status::Unimplemented`, a WASI call `ENOSYS`.
            fn unimplemented(cx: &mut dyn Caller<Self>, import: Import) -> i32;

            /// Runs before every import: `Some(answer)` answers the call with `answer` (for
            /// an import that returns nothing, just returns) instead of running it, which is
            /// how a host refuses calls by phase or capability. By default every call runs.
            fn admit(cx: &mut dyn Caller<Self>, import: Import) -> Option<i32> {
                None
            }

            /// Runs after every import with its raw arguments and its result (`None` for an
            /// import that returns nothing), whether it ran or `admit` answered it: the place
            /// for a hostcall trace. By default nothing.
            fn returned(cx: &mut dyn Caller<Self>, import: Import, args: &[i64], result: Option<i32>) {}

            $(
                #[doc = concat!("`", stringify!($module), ".", stringify!($name), "`")]
                fn $name(cx: &mut dyn Caller<Self>, $($arg: $ty),*) -> $ret {
                    default_body!($ret, cx, Import::$variant)
                }
            )*
        }
    };
}
filterbox_abi::for_each_import!(define_hostcalls_trait);

/// A hostcall result that an [`Hostcalls::admit`] answer can stand in for.
pub(crate) trait FromAnswer {
    fn from_answer(answer: i32) -> Self;
    fn answer(&self) -> Option<i32>;
}

impl FromAnswer for i32 {
    fn from_answer(answer: i32) -> Self {
        answer
    }

    fn answer(&self) -> Option<i32> {
        Some(*self)
    }
}

impl FromAnswer for () {
    fn from_answer(_: i32) -> Self {}

    fn answer(&self) -> Option<i32> {
        None
    }
}

/// Runs one import through [`Hostcalls::admit`] and then, if admitted, its method; then
/// [`Hostcalls::returned`].
pub(crate) fn dispatch<H: Hostcalls, R: FromAnswer>(
    cx: &mut dyn Caller<H>,
    import: Import,
    args: &[i64],
    call: impl FnOnce(&mut dyn Caller<H>) -> R,
) -> R {
    if cx.deadline_passed() {
        cx.trap(Trap {
            kind: TrapKind::Interrupted,
            message: format!("deadline passed before the hostcall {}", import.name()),
        });
        // The answer is never seen: the guest traps as the hostcall returns.
        return R::from_answer(-1);
    }
    let result = match H::admit(cx, import) {
        Some(answer) => R::from_answer(answer),
        None => call(cx),
    };
    H::returned(cx, import, args, result.answer());
    result
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

/// Runs `$body` with `$x` bound to the backend value inside `$value`, whichever backend it is.
macro_rules! each_backend {
    ($value:expr, $enum:ident, $x:ident => $body:expr) => {
        match $value {
            #[cfg(feature = "wasmtime")]
            $enum::Wasmtime($x) => $body,
            #[cfg(feature = "wasmi")]
            $enum::Wasmi($x) => $body,
            #[cfg(feature = "wasmer")]
            $enum::Wasmer($x) => $body,
        }
    };
}

/// A wasm engine: compiles modules. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    kind: EngineKind,
    inner: EngineInner,
}

#[derive(Clone)]
enum EngineInner {
    #[cfg(feature = "wasmtime")]
    Wasmtime(wasmtime_backend::WtEngine),
    #[cfg(feature = "wasmi")]
    Wasmi(wasmi_backend::WiEngine),
    #[cfg(feature = "wasmer")]
    Wasmer(wasmer_backend::WrEngine),
}

impl Engine {
    /// Makes an engine of `kind`, or says which engines this build has.
    pub fn new(kind: EngineKind, config: &EngineConfig) -> Result<Engine, EngineError> {
        let inner = match kind {
            #[cfg(feature = "wasmtime")]
            EngineKind::Wasmtime => EngineInner::Wasmtime(wasmtime_backend::WtEngine::new(config)?),
            #[cfg(feature = "wasmi")]
            EngineKind::Wasmi => EngineInner::Wasmi(wasmi_backend::WiEngine::new(config)?),
            #[cfg(feature = "wasmer")]
            EngineKind::WasmerCranelift | EngineKind::WasmerSinglepass => {
                EngineInner::Wasmer(wasmer_backend::WrEngine::new(kind, config)?)
            }
            #[allow(unreachable_patterns)]
            _ => {
                return Err(EngineError::NotBuilt {
                    engine: kind,
                    built: EngineKind::built(),
                });
            }
        };
        Ok(Engine { kind, inner })
    }

    /// Which engine this is.
    pub fn kind(&self) -> EngineKind {
        self.kind
    }

    /// Compiles a module. Its imports and exports are read first, so a module that is not
    /// wasm at all fails with the parser's reason.
    pub fn compile(&self, wasm: &[u8]) -> Result<Module, EngineError> {
        let info = ModuleInfo::parse(wasm).map_err(|e| EngineError::Compile(e.to_string()))?;
        let inner = match &self.inner {
            #[cfg(feature = "wasmtime")]
            EngineInner::Wasmtime(engine) => {
                ModuleInner::Wasmtime(engine.compile(wasm)?, engine.clone())
            }
            #[cfg(feature = "wasmi")]
            EngineInner::Wasmi(engine) => ModuleInner::Wasmi(engine.compile(wasm)?, engine.clone()),
            #[cfg(feature = "wasmer")]
            EngineInner::Wasmer(engine) => {
                let (module, engine) = engine.compile(wasm)?;
                ModuleInner::Wasmer(module, engine)
            }
        };
        Ok(Module {
            kind: self.kind,
            info: Arc::new(info),
            inner,
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

#[derive(Clone)]
enum ModuleInner {
    #[cfg(feature = "wasmtime")]
    Wasmtime(wasmtime::Module, wasmtime_backend::WtEngine),
    #[cfg(feature = "wasmi")]
    Wasmi(wasmi::Module, wasmi_backend::WiEngine),
    #[cfg(feature = "wasmer")]
    Wasmer(wasmer::Module, wasmer_backend::WrEngine),
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
        let inner = match &self.inner {
            #[cfg(feature = "wasmtime")]
            ModuleInner::Wasmtime(module, engine) => InstancePreInner::Wasmtime(
                wasmtime_backend::WtInstancePre::new(engine, module, abi)?,
            ),
            #[cfg(feature = "wasmi")]
            ModuleInner::Wasmi(module, engine) => {
                InstancePreInner::Wasmi(wasmi_backend::WiInstancePre::new(engine, module, abi)?)
            }
            #[cfg(feature = "wasmer")]
            ModuleInner::Wasmer(module, engine) => InstancePreInner::Wasmer(
                wasmer_backend::WrInstancePre::new(engine, module, abi)?,
                PhantomData,
            ),
        };
        Ok(InstancePre {
            inner,
            _host: PhantomData,
        })
    }
}

/// A module linked with a host's functions, ready to instantiate many times.
/// `Send + Sync`: one per plugin, shared by every worker thread.
pub struct InstancePre<H: Hostcalls> {
    inner: InstancePreInner<H>,
    _host: PhantomData<fn() -> H>,
}

enum InstancePreInner<H: Hostcalls> {
    #[cfg(feature = "wasmtime")]
    Wasmtime(wasmtime_backend::WtInstancePre<H>),
    #[cfg(feature = "wasmi")]
    Wasmi(wasmi_backend::WiInstancePre<H>),
    // The host type marks the variant so that a wasmer-only build still uses `H`.
    #[cfg(feature = "wasmer")]
    Wasmer(wasmer_backend::WrInstancePre, PhantomData<fn() -> H>),
}

impl<H: Hostcalls> Clone for InstancePre<H> {
    fn clone(&self) -> Self {
        let inner = match &self.inner {
            #[cfg(feature = "wasmtime")]
            InstancePreInner::Wasmtime(pre) => InstancePreInner::Wasmtime(pre.clone()),
            #[cfg(feature = "wasmi")]
            InstancePreInner::Wasmi(pre) => InstancePreInner::Wasmi(pre.clone()),
            #[cfg(feature = "wasmer")]
            InstancePreInner::Wasmer(pre, _) => InstancePreInner::Wasmer(pre.clone(), PhantomData),
        };
        InstancePre {
            inner,
            _host: PhantomData,
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
        let inner = match &self.inner {
            #[cfg(feature = "wasmtime")]
            InstancePreInner::Wasmtime(pre) => {
                InstanceInner::Wasmtime(pre.instantiate(host, limits)?)
            }
            #[cfg(feature = "wasmi")]
            InstancePreInner::Wasmi(pre) => {
                InstanceInner::Wasmi(Box::new(pre.instantiate(host, limits)?))
            }
            #[cfg(feature = "wasmer")]
            InstancePreInner::Wasmer(pre, _) => {
                InstanceInner::Wasmer(pre.instantiate(host, limits)?)
            }
        };
        Ok(Instance { inner })
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

enum InstanceInner<H: Hostcalls> {
    #[cfg(feature = "wasmtime")]
    Wasmtime(wasmtime_backend::WtInstance<H>),
    #[cfg(feature = "wasmi")]
    // wasmi's store is large; boxing keeps every instance the size of the smallest.
    Wasmi(Box<wasmi_backend::WiInstance<H>>),
    #[cfg(feature = "wasmer")]
    Wasmer(wasmer_backend::WrInstance<H>),
}

impl<H: Hostcalls> Instance<H> {
    /// Whether the module exports `callback`.
    pub fn has(&self, callback: Callback) -> bool {
        each_backend!(&self.inner, InstanceInner, i => i.has(callback))
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
    /// - wasmer counts wasm operators (metering, at [`WASMER_OPS_PER_MS`]) and a watchdog
    ///   thread interrupts a call still running a millisecond tick after its deadline, so a
    ///   slow or loaded machine does not stretch it.
    ///
    /// On wasmi and wasmer the clock is also read before each hostcall, so time spent inside
    /// hostcalls counts: a call past its deadline traps as it next enters the host (wasmtime's
    /// epoch counts it without that).
    ///
    /// Without [`EngineConfig::interruptible`] this does nothing.
    pub fn set_deadline(&mut self, deadline: Option<Duration>) {
        each_backend!(&mut self.inner, InstanceInner, i => i.set_deadline(deadline))
    }

    /// Calls `callback` with `args` (as many as its ABI signature has; extra ones are
    /// ignored, missing ones are zero).
    pub fn call(&mut self, callback: Callback, args: &[i32]) -> Result<Returned, Trap> {
        each_backend!(&mut self.inner, InstanceInner, i => i.call(callback, args))
    }

    /// Whether the instance can be used on the calling thread: always, except for a
    /// [thread-bound](EngineKind::thread_bound) engine's instance away from its thread.
    pub fn is_home(&self) -> bool {
        match &self.inner {
            #[cfg(feature = "wasmer")]
            InstanceInner::Wasmer(i) => i.is_home(),
            #[allow(unreachable_patterns)]
            _ => true,
        }
    }

    /// The host state.
    ///
    /// # Panics
    /// On a thread other than its own, for an instance of a
    /// [thread-bound](EngineKind::thread_bound) engine ([`Instance::is_home`] says when).
    pub fn host(&self) -> &H {
        each_backend!(&self.inner, InstanceInner, i => i.host())
    }

    /// The host state, mutably.
    ///
    /// # Panics
    /// As [`Instance::host`].
    pub fn host_mut(&mut self) -> &mut H {
        each_backend!(&mut self.inner, InstanceInner, i => i.host_mut())
    }

    /// Current size of the guest's linear memory in bytes.
    pub fn memory_size(&mut self) -> usize {
        each_backend!(&mut self.inner, InstanceInner, i => i.memory_size())
    }
}

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

/// An error a host function returns to make the guest trap with a given class.
#[derive(Debug)]
pub(crate) struct HostTrap(pub(crate) Trap);

impl fmt::Display for HostTrap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for HostTrap {}

/// The trap for a panic in host code.
pub(crate) fn panic_trap(name: &str, payload: &(dyn std::any::Any + Send)) -> Trap {
    Trap {
        kind: TrapKind::Host,
        message: format!("hostcall {name} panicked: {}", panic_message(payload)),
    }
}

/// Turns a panic payload into a message.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

/// The CPU time the calling thread has run, where the platform keeps a clock for it
/// (`CLOCK_THREAD_CPUTIME_ID` on unixes); `None` elsewhere.
#[cfg(all(unix, any(feature = "wasmtime", feature = "wasmi")))]
pub(crate) fn thread_cpu_time() -> Option<Duration> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable `timespec` for the length of the call, and the clock
    // id is the platform's own constant; the call writes nothing else.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    if status != 0 {
        return None;
    }
    Some(Duration::new(
        u64::try_from(now.tv_sec).ok()?,
        u32::try_from(now.tv_nsec).ok()?,
    ))
}

/// A call's deadline, counted in the time its thread runs. Past the deadline on the wall
/// clock, the thread's CPU clock decides whether the call ran that long or its thread was
/// preempted (a loaded machine, a busy proxy thread); then it goes on for what it has not
/// run, up to [`RunClock::WALL_DEADLINES`] deadlines on the wall clock. The CPU clock is read
/// first a millisecond or more into the call (at wasmtime's first epoch tick, or wasmi's first
/// check after that), so short calls never read it; what ran before counts as one millisecond.
/// On wasmtime the wall clock too is first read at that tick (the call is taken to have
/// started a millisecond before), so a call that ends sooner reads no clock at all.
/// Without a CPU clock, the wall clock decides.
#[cfg(any(feature = "wasmtime", feature = "wasmi"))]
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunClock {
    /// When the call started; `None` until the first reading of a clock made with
    /// [`RunClock::from_first_tick`].
    start: Option<std::time::Instant>,
    budget: Duration,
    /// The thread's CPU clock at the first reading.
    first: FirstReading,
    /// When the call is next past its deadline on the wall clock (`None` with `start`).
    due: Option<std::time::Instant>,
}

/// The first reading of a call's CPU clock.
#[cfg(any(feature = "wasmtime", feature = "wasmi"))]
#[derive(Debug, Clone, Copy)]
enum FirstReading {
    NotYet,
    Cpu(Duration),
    /// The platform keeps no CPU clock for threads.
    NoClock,
}

#[cfg(any(feature = "wasmtime", feature = "wasmi"))]
impl RunClock {
    /// The wall clock a call lasts at most, in deadlines.
    const WALL_DEADLINES: u32 = 10;

    /// When the CPU clock is first read; what the call did before counts as this much running.
    const FIRST_READING: Duration = Duration::from_millis(1);

    /// A budget past this is no deadline (a clock that could not represent its end).
    const LONGEST: Duration = Duration::from_secs(100 * 365 * 86_400);

    /// A clock for a call of `budget` starting now; `None` for a budget too far to represent.
    #[cfg(feature = "wasmi")]
    pub(crate) fn start(budget: Duration) -> Option<RunClock> {
        let start = std::time::Instant::now();
        let due = start.checked_add(budget)?;
        Some(RunClock {
            start: Some(start),
            budget,
            first: FirstReading::NotYet,
            due: Some(due),
        })
    }

    /// A clock for a call of `budget` whose start is taken at its first reading (wasmtime's
    /// first epoch tick, at most a tick into the call), as [`RunClock::FIRST_READING`] before
    /// it: a call that ends before the tick never reads the wall clock. `None` for a budget
    /// too far to represent.
    pub(crate) fn from_first_tick(budget: Duration) -> Option<RunClock> {
        (budget < Self::LONGEST).then_some(RunClock {
            start: None,
            budget,
            first: FirstReading::NotYet,
            due: None,
        })
    }

    /// The call's start and when it is next due, taking them at `now` on the first reading.
    fn started(&mut self, now: std::time::Instant) -> (std::time::Instant, std::time::Instant) {
        match (self.start, self.due) {
            (Some(start), Some(due)) => (start, due),
            _ => {
                let start = now.checked_sub(Self::FIRST_READING).unwrap_or(now);
                let due = start.checked_add(self.budget).unwrap_or(now);
                (self.start, self.due) = (Some(start), Some(due));
                (start, due)
            }
        }
    }

    /// How long until the call is next due on the wall clock.
    pub(crate) fn left(&mut self, now: std::time::Instant) -> Duration {
        let (_, due) = self.started(now);
        due.saturating_duration_since(now)
    }

    /// Takes the first reading of the CPU clock now, if it has not been taken.
    pub(crate) fn read_cpu(&mut self) {
        if let FirstReading::NotYet = self.first {
            self.first = match thread_cpu_time() {
                Some(cpu) => FirstReading::Cpu(cpu),
                None => FirstReading::NoClock,
            };
        }
    }

    /// Whether the call has run for its budget, with `now` from the wall clock.
    pub(crate) fn passed(&mut self, now: std::time::Instant) -> bool {
        let (start, due) = self.started(now);
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= Self::FIRST_READING {
            self.read_cpu();
        }
        if now < due {
            return false;
        }
        if elapsed >= self.budget.saturating_mul(Self::WALL_DEADLINES) {
            return true;
        }
        let ran = match self.first {
            FirstReading::Cpu(first) => thread_cpu_time().map_or(elapsed, |cpu| {
                Self::FIRST_READING + cpu.saturating_sub(first)
            }),
            FirstReading::NotYet | FirstReading::NoClock => elapsed,
        };
        if ran >= self.budget {
            return true;
        }
        if let Some(next) = now.checked_add(self.budget - ran) {
            self.due = Some(next);
        }
        false
    }
}

/// See the unix version: no thread CPU clock here, deadlines count wall time.
#[cfg(all(not(unix), any(feature = "wasmtime", feature = "wasmi")))]
pub(crate) fn thread_cpu_time() -> Option<Duration> {
    None
}

// Every instance is `Send` in every build (wasmer's by staying usable only at home).
#[allow(dead_code)]
fn instance_is_send<H: Hostcalls>(instance: Instance<H>) -> impl Send {
    instance
}
