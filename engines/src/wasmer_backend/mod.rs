//! The wasmer backend, with its Cranelift or single-pass compiler.

use crate::backend::Backend;
use crate::{
    Caller, EngineConfig, EngineError, EngineKind, GuestMemory, HostTrap, Hostcalls,
    InstanceLimits, MemoryError, RunClock, Trap, TrapKind,
};
use filterbox_abi::{AbiVersion, Callback};
use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use wasmer::sys::{BaseTunables, CompilerConfig, NativeEngineExt};
use wasmer::wasmparser::Operator;
use wasmer::{
    ExternType, Function, FunctionEnv, FunctionEnvMut, Imports, Memory, RuntimeError, Store,
    TypedFunction,
};
use wasmer_middlewares::Metering;

/// The wasmer release line this crate is built against (see the workspace Cargo.toml).
const WASMER_LINE: &str = "wasmer-7.4";

/// The globals the metering middleware adds to every module.
const POINTS_LEFT: &str = "wasmer_metering_remaining_points";
const POINTS_EXHAUSTED: &str = "wasmer_metering_points_exhausted";

/// Every operator costs one point.
fn operator_cost(_: &Operator<'_>) -> u64 {
    1
}

/// How many deadlines' worth of operators the metering budget allows. Metering is the
/// backstop, the watchdog's signal what ends a call at its deadline: the two must not end a
/// call at the same moment. Wasmer builds a backtrace when metering's `unreachable` raises
/// its trap, and a watchdog signal landing in that code runs the trap handler, which builds
/// a backtrace again inside the signal handler and deadlocks on the unwinder's lock (seen in
/// the conformance suite on a loaded machine, when the budget was one deadline's worth).
const METERING_BACKSTOP: u64 = 10;

fn points_for(deadline: Option<Duration>) -> u64 {
    match deadline {
        Some(d) => u64::try_from(d.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
            .saturating_mul(crate::WASMER_OPS_PER_MS)
            .saturating_mul(METERING_BACKSTOP),
        None => u64::MAX,
    }
}

mod instance;
mod tunables;
mod watchdog;

use instance::Typed;
pub(crate) use instance::WrInstance;
use tunables::{LIMITS, LimitingTunables};
use watchdog::Watch;

/// A wasmer engine setting. Wasmer's metering middleware keeps per-module state and refuses
/// a second module, so each compiled module gets its own `wasmer::Engine` made from these
/// settings (cheap: the compiler is configured, nothing is compiled up front).
#[derive(Clone)]
pub(crate) struct WrEngine {
    engine: wasmer::Engine,
    kind: EngineKind,
    interruptible: bool,
    start_points: u64,
    start_deadline: Duration,
}

impl WrEngine {
    pub(crate) fn new(kind: EngineKind, config: &EngineConfig) -> Result<Self, EngineError> {
        let start_points = points_for(Some(config.start_deadline));
        Ok(WrEngine {
            engine: make_engine(kind, config.interruptible, start_points),
            kind,
            interruptible: config.interruptible,
            start_points,
            start_deadline: config.start_deadline,
        })
    }

    /// The same settings on a fresh `wasmer::Engine`, for one module.
    fn fresh(&self) -> WrEngine {
        WrEngine {
            engine: make_engine(self.kind, self.interruptible, self.start_points),
            ..self.clone()
        }
    }

    /// The compiler and target (wasmer's id), the wasmer release line, whether metering is
    /// compiled in and with what start budget, hashed with SHA-256. Wasmer's own artifact
    /// header also refuses artifacts of an incompatible version.
    pub(crate) fn fingerprint(&self) -> String {
        use std::hash::Hash;
        let mut hasher = crate::cache::Fingerprint::default();
        // The metering budget of the start section is compiled into the module too.
        (
            WASMER_LINE,
            self.engine.deterministic_id(),
            self.interruptible,
            self.start_points,
        )
            .hash(&mut hasher);
        hasher.hex()
    }

    pub(crate) fn deserialize(
        &self,
        artifact: &[u8],
    ) -> Result<(wasmer::Module, WrEngine), String> {
        let engine = self.fresh();
        // SAFETY: the bytes come from a cache entry whose magic, source-module hash and
        // checksum were verified, written by `Module::serialize` of a wasmer engine with the
        // same fingerprint; wasmer checks its artifact header as well.
        let module = unsafe { wasmer::Module::deserialize(&engine.engine, artifact.to_vec()) }
            .map_err(|e| e.to_string())?;
        Ok((module, engine))
    }

    /// Compiles on a fresh engine. A panic inside wasmer's compiler (it has a few `expect`s
    /// on module shapes) becomes a compile error, never an unwind into the embedder.
    pub(crate) fn compile(&self, wasm: &[u8]) -> Result<(wasmer::Module, WrEngine), EngineError> {
        let engine = self.fresh();
        let compiled = catch_unwind(AssertUnwindSafe(|| {
            wasmer::Module::new(&engine.engine, wasm)
        }))
        .map_err(|panic| {
            EngineError::Compile(format!(
                "wasmer's compiler panicked: {}",
                crate::panic_message(&*panic)
            ))
        })?;
        let module = compiled.map_err(|e| EngineError::Compile(e.to_string()))?;
        Ok((module, engine))
    }
}

/// Wasmer's metering middleware with filterbox's cost function.
type OperatorMetering = Metering<fn(&Operator<'_>) -> u64>;

/// An engine on `compiler`, with the metering middleware when there is one.
fn compiled_with<C>(mut compiler: C, metering: Option<Arc<OperatorMetering>>) -> wasmer::Engine
where
    C: CompilerConfig,
    wasmer::Engine: From<C>,
{
    if let Some(m) = metering {
        compiler.push_middleware(m);
    }
    wasmer::Engine::from(compiler)
}

fn make_engine(kind: EngineKind, interruptible: bool, start_points: u64) -> wasmer::Engine {
    let metering = interruptible.then(|| {
        Arc::new(Metering::new(
            start_points,
            operator_cost as fn(&Operator<'_>) -> u64,
        ))
    });
    let mut engine = match kind {
        EngineKind::WasmerSinglepass => compiled_with(wasmer::sys::Singlepass::default(), metering),
        _ => compiled_with(wasmer::sys::Cranelift::default(), metering),
    };
    engine.set_tunables(LimitingTunables {
        base: BaseTunables::new(),
    });
    engine
}

pub(crate) struct StoreData<H> {
    host: H,
    memory: Option<Memory>,
    allocator: Option<TypedFunction<i32, i32>>,
    pending_trap: Option<Trap>,
    /// The running call's deadline (`None`: no deadline or not interruptible).
    deadline: Option<RunClock>,
    /// Set while a hostcall runs, for the watchdog (which then sends no signal).
    in_host: Arc<AtomicBool>,
}

fn classify(err: &RuntimeError) -> Trap {
    if let Some(HostTrap(trap)) = err.downcast_ref::<HostTrap>() {
        return trap.clone();
    }
    use wasmer_types::TrapCode as T;
    let kind = match err.clone().to_trap() {
        Some(T::StackOverflow) => TrapKind::StackOverflow,
        Some(T::HeapAccessOutOfBounds | T::TableAccessOutOfBounds | T::HeapMisaligned) => {
            TrapKind::OutOfBounds
        }
        Some(T::IndirectCallToNull | T::BadSignature) => TrapKind::BadCall,
        Some(T::IntegerDivisionByZero | T::IntegerOverflow | T::BadConversionToInteger) => {
            TrapKind::Arithmetic
        }
        Some(T::UnreachableCodeReached) => TrapKind::Unreachable,
        Some(T::HostInterrupt) => TrapKind::Interrupted,
        _ => TrapKind::Other,
    };
    Trap {
        kind,
        message: err.message(),
    }
}

struct WrCaller<'a, 'b, H: 'static> {
    env: &'a mut FunctionEnvMut<'b, StoreData<H>>,
}

/// The bytes of `memory` as a slice that lives as long as the borrow of the store it came from.
///
/// # Safety
/// The caller must hold the only access to the store for `'s`: the memory can then neither
/// grow (which may move it) nor be dropped while the slice lives, and the memory is not shared
/// with another thread (proxy-wasm modules have no shared memories; `link` refuses them).
unsafe fn memory_bytes<'s>(memory: &Memory, store: &impl wasmer::AsStoreRef) -> &'s mut [u8] {
    let view = memory.view(store);
    let (ptr, len) = (view.data_ptr(), view.data_size() as usize);
    if ptr.is_null() || len == 0 {
        return &mut [];
    }
    // SAFETY: `ptr..ptr+len` is the memory's live mapping (wasmer reports both from the same
    // view); the caller guarantees exclusive access for 's as documented above.
    unsafe { std::slice::from_raw_parts_mut(ptr, len) }
}

impl<H: Send + 'static> crate::hostcalls::PendingTrap for WrCaller<'_, '_, H> {
    fn take_pending_trap(&mut self) -> Option<Trap> {
        self.env.data_mut().pending_trap.take()
    }
}

impl<H: Send + 'static> Caller<H> for WrCaller<'_, '_, H> {
    fn host(&mut self) -> &mut H {
        &mut self.env.data_mut().host
    }

    fn memory(&mut self) -> GuestMemory<'_> {
        self.split().1
    }

    fn split(&mut self) -> (&mut H, GuestMemory<'_>) {
        let (data, store) = self.env.data_and_store_mut();
        let bytes = match &data.memory {
            // SAFETY: `self.env` is borrowed mutably for the slice's whole life, so nothing
            // else can touch the store (and so grow the memory) meanwhile.
            Some(memory) => unsafe { memory_bytes(memory, &store) },
            None => &mut [],
        };
        (&mut data.host, GuestMemory::new(bytes))
    }

    fn trap(&mut self, trap: Trap) {
        self.env.data_mut().pending_trap = Some(trap);
    }

    fn deadline_passed(&mut self) -> bool {
        self.env
            .data_mut()
            .deadline
            .as_mut()
            .is_some_and(|clock| clock.passed(Instant::now()))
    }

    fn allocate(&mut self, size: u32) -> Result<u32, MemoryError> {
        let Some(allocator) = self.env.data().allocator.clone() else {
            return Err(MemoryError::AllocatorFailed { size });
        };
        // The allocator is guest code again: the watchdog may interrupt it.
        self.env.data().in_host.store(false, Ordering::Release);
        // The size is a u32 on the wire; the allocator takes it as an i32 bit pattern.
        let allocated = allocator.call(&mut *self.env, size as i32);
        self.env.data().in_host.store(true, Ordering::Release);
        match allocated {
            Ok(ptr) => crate::check_allocation(ptr, size, &self.memory()),
            Err(err) => {
                self.env.data_mut().pending_trap = Some(classify(&err));
                Err(MemoryError::AllocatorTrapped)
            }
        }
    }
}

macro_rules! define_imports {
    ($($variant:ident : $module:ident $name:ident ( $($arg:ident : $ty:ident),* ) -> $ret:tt , $vers:ident ;)*) => {
        /// Wasmer host functions belong to a store, so every instance gets its own set,
        /// restricted to what the module imports.
        fn define_imports<H: Hostcalls>(
            store: &mut Store,
            env: &FunctionEnv<StoreData<H>>,
            wanted: &[(String, String)],
        ) -> Imports {
            let mut imports = Imports::new();
            $(
                for module in crate::module_names(stringify!($module)) {
                    if wanted.iter().any(|(m, n)| m == module && n == stringify!($name)) {
                        let func = Function::new_typed_with_env(
                            store,
                            env,
                            |mut env: FunctionEnvMut<'_, StoreData<H>>, $($arg: $ty),*| -> Result<$ret, HostTrap> {
                                // `run_import` catches panics: nothing unwinds past the reset.
                                env.data().in_host.store(true, Ordering::Release);
                                let result = crate::run_import(&mut WrCaller { env: &mut env }, filterbox_abi::Import::$variant, &[$(i64::from($arg)),*], |cx| H::$name(cx, $($arg),*));
                                env.data().in_host.store(false, Ordering::Release);
                                result.map_err(HostTrap)
                            },
                        );
                        imports.define(module, stringify!($name), func);
                    }
                }
            )*
            imports
        }
    };
}
filterbox_abi::for_each_import!(define_imports);

fn type_name(ty: &wasmer::Type) -> &'static str {
    match ty {
        wasmer::Type::I32 => "i32",
        wasmer::Type::I64 => "i64",
        wasmer::Type::F32 => "f32",
        wasmer::Type::F64 => "f64",
        _ => "ref",
    }
}

#[derive(Clone)]
pub(crate) struct WrInstancePre {
    module: wasmer::Module,
    engine: WrEngine,
    imports: Vec<(String, String)>,
    present: Vec<bool>,
    allocator: Callback,
    abi: AbiVersion,
}

impl WrInstancePre {
    pub(crate) fn new(
        engine: &WrEngine,
        module: &wasmer::Module,
        abi: AbiVersion,
    ) -> Result<Self, EngineError> {
        let exports: HashMap<String, ExternType> = module
            .exports()
            .map(|e| (e.name().to_owned(), e.ty().clone()))
            .collect();
        match exports.get("memory") {
            Some(ExternType::Memory(ty)) if !ty.shared => {}
            Some(ExternType::Memory(_)) => {
                return Err(EngineError::Instantiate(
                    "shared memories are not supported".into(),
                ));
            }
            _ => return Err(EngineError::MissingExport("memory")),
        }
        let (present, abi) = crate::check_callbacks(abi, |name| match exports.get(name) {
            Some(ExternType::Function(ty)) => Some((
                ty.params().iter().map(type_name).collect(),
                ty.results().iter().map(type_name).collect(),
            )),
            _ => None,
        })?;
        let allocator = crate::pick_allocator(&present)?;
        let imports = module
            .imports()
            .map(|i| (i.module().to_owned(), i.name().to_owned()))
            .collect();
        Ok(WrInstancePre {
            module: module.clone(),
            engine: engine.clone(),
            imports,
            present,
            allocator,
            abi,
        })
    }

    pub(crate) fn instantiate<H: Hostcalls>(
        &self,
        host: H,
        limits: &InstanceLimits,
    ) -> Result<WrInstance<H>, EngineError> {
        let mut store = Store::new(self.engine.engine.clone());
        let budget = self
            .engine
            .interruptible
            .then(|| limits.start_deadline.unwrap_or(self.engine.start_deadline));
        let deadline = budget.and_then(RunClock::start);
        let data = StoreData {
            host,
            memory: None,
            allocator: None,
            pending_trap: None,
            deadline,
            in_host: Arc::default(),
        };
        let env = FunctionEnv::new(&mut store, data);
        let imports = define_imports::<H>(&mut store, &env, &self.imports);
        LIMITS.with(|l| {
            l.set(Some((
                limits.memory_pages(),
                u32::try_from(limits.max_table_elements).unwrap_or(u32::MAX),
            )))
        });
        let watch = Watch::start(&store, budget, &env.as_ref(&store).in_host);
        let instance = wasmer::Instance::new(&mut store, &self.module, &imports);
        drop(watch);
        LIMITS.with(|l| l.set(None));
        let instance = instance.map_err(|e| match e {
            wasmer::InstantiationError::Start(err) => {
                let mut trap = classify(&err);
                if self.engine.interruptible && trap.kind == TrapKind::Unreachable {
                    // Metering ends with `unreachable` too, and the instance that could
                    // tell the two apart is gone.
                    trap.message
                        .push_str(" (or the start deadline's metering budget ran out)");
                }
                EngineError::StartTrapped(trap)
            }
            other => EngineError::Instantiate(other.to_string()),
        })?;
        let points = match self.engine.interruptible {
            true => {
                let global = |name| {
                    instance
                        .exports
                        .get_global(name)
                        .cloned()
                        .map_err(|e| EngineError::Instantiate(format!("metering: {e}")))
                };
                Some((global(POINTS_LEFT)?, global(POINTS_EXHAUSTED)?))
            }
            false => None,
        };
        let memory = instance
            .exports
            .get_memory("memory")
            .map_err(|_| EngineError::MissingExport("memory"))?
            .clone();
        let allocator = instance
            .exports
            .get_typed_function::<i32, i32>(&store, self.allocator.name())
            .map_err(|e| EngineError::Instantiate(e.to_string()))?;
        let mut funcs = Vec::with_capacity(Callback::COUNT);
        for (callback, present) in Callback::ALL.iter().zip(&self.present) {
            let func = match present {
                true => instance.exports.get_function(callback.name()).ok(),
                false => None,
            };
            funcs.push(match func {
                Some(f) => Some(Typed::new(
                    f,
                    &store,
                    callback.params(self.abi).len(),
                    callback.result().is_some(),
                )?),
                None => None,
            });
        }
        let data = env.as_mut(&mut store);
        data.memory = Some(memory);
        data.allocator = Some(allocator);
        data.deadline = None;
        Ok(WrInstance::new(
            store,
            env,
            funcs,
            points,
            self.engine.interruptible,
        ))
    }
}

/// The wasmer backend (Cranelift and single-pass compilers).
pub(crate) struct Wasmer;

impl Backend for Wasmer {
    type Engine = WrEngine;
    type Module = (wasmer::Module, WrEngine);
    type InstancePre<H: Hostcalls> = WrInstancePre;
    type Instance<H: Hostcalls> = WrInstance<H>;

    fn new_engine(kind: EngineKind, config: &EngineConfig) -> Result<WrEngine, EngineError> {
        WrEngine::new(kind, config)
    }

    fn compile(engine: &WrEngine, wasm: &[u8]) -> Result<Self::Module, EngineError> {
        engine.compile(wasm)
    }

    fn fingerprint(engine: &WrEngine) -> Option<String> {
        Some(engine.fingerprint())
    }

    fn deserialize(engine: &WrEngine, artifact: &[u8]) -> Result<Self::Module, String> {
        engine.deserialize(artifact)
    }

    fn serialize((module, _): &Self::Module) -> Result<Vec<u8>, String> {
        module
            .serialize()
            .map(|bytes| bytes.to_vec())
            .map_err(|e| e.to_string())
    }

    fn link<H: Hostcalls>(
        (module, engine): &Self::Module,
        abi: AbiVersion,
    ) -> Result<WrInstancePre, EngineError> {
        WrInstancePre::new(engine, module, abi)
    }

    fn instantiate<H: Hostcalls>(
        pre: &WrInstancePre,
        host: H,
        limits: &InstanceLimits,
    ) -> Result<WrInstance<H>, EngineError> {
        pre.instantiate(host, limits)
    }
}
