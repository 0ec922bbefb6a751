//! The wasmer backend, with its Cranelift or single-pass compiler.

use crate::{
    Caller, EngineConfig, EngineError, EngineKind, GuestMemory, HostTrap, Hostcalls,
    InstanceLimits, MemoryError, Returned, Trap, TrapKind,
};
use filterbox_abi::{AbiVersion, Callback};
use std::cell::Cell;
use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use wasmer::sys::vm::{
    MemoryError as VmMemoryError, MemoryStyle, TableStyle, VMMemory, VMMemoryDefinition, VMTable,
    VMTableDefinition,
};
use wasmer::sys::{BaseTunables, CompilerConfig, NativeEngineExt, Tunables};
use wasmer::wasmparser::Operator;
use wasmer::{
    ExternType, Function, FunctionEnv, FunctionEnvMut, Global, Imports, Memory, MemoryType, Pages,
    RuntimeError, Store, TableType, TypedFunction, Value,
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

fn points_for(deadline: Option<Duration>) -> u64 {
    match deadline {
        Some(d) => u64::try_from(d.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
            .saturating_mul(crate::WASMER_OPS_PER_MS),
        None => u64::MAX,
    }
}

/// How often the watchdog looks for calls past their deadline.
const WATCHDOG_TICK: Duration = Duration::from_millis(1);

/// A call being watched: its deadline and how to interrupt its store.
struct Watched {
    id: u64,
    deadline: Instant,
    interrupter: wasmer::Interrupter,
}

/// The calls running under a deadline, and the next watch id.
struct Watchlist {
    calls: Vec<Watched>,
    next_id: u64,
    /// The watchdog found no call and sleeps until one is watched (so that an idle process
    /// does not wake a thousand times a second).
    asleep: bool,
}

/// The watchdog thread, to wake it.
static WATCHDOG: OnceLock<std::thread::Thread> = OnceLock::new();

/// How long the sleeping watchdog waits before it looks at the list anyway.
const ASLEEP_CHECK: Duration = Duration::from_secs(1);

static WATCHLIST: OnceLock<Result<Mutex<Watchlist>, String>> = OnceLock::new();

/// Locks a mutex whether or not a holder panicked (the list stays consistent: every change
/// is one push or one removal).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The watchlist, starting the watchdog thread the first time. Metering counts operators at a
/// fixed rate, which a loaded or slow machine stretches into seconds; the watchdog interrupts
/// (a signal to the running thread, wasmer's `experimental-host-interrupt`) any call still
/// running a tick after its deadline, and again every tick until the call ends.
fn watchlist() -> Result<&'static Mutex<Watchlist>, EngineError> {
    let list = WATCHLIST.get_or_init(|| {
        std::thread::Builder::new()
            .name("filterbox-wasmer-watchdog".into())
            .spawn(|| {
                let _ = WATCHDOG.set(std::thread::current());
                loop {
                    let asleep = match WATCHLIST.get() {
                        Some(Ok(list)) => {
                            // The interrupt is sent with the lock held: a call removes its
                            // entry under the same lock once it has returned, so no interrupt
                            // meant for one call can reach the next call on the same store.
                            let mut list = lock(list);
                            let now = Instant::now();
                            for call in list.calls.iter().filter(|c| c.deadline <= now) {
                                call.interrupter.interrupt();
                            }
                            list.asleep = list.calls.is_empty();
                            list.asleep
                        }
                        _ => false,
                    };
                    // Asleep, a watched call unparks the thread (or the check comes anyway).
                    match asleep {
                        true => std::thread::park_timeout(ASLEEP_CHECK),
                        false => std::thread::sleep(WATCHDOG_TICK),
                    }
                }
            })
            .map(|_| {
                Mutex::new(Watchlist {
                    calls: Vec::new(),
                    next_id: 0,
                    asleep: false,
                })
            })
            .map_err(|e| format!("cannot start the wasmer watchdog thread: {e}"))
    });
    list.as_ref().map_err(|e| EngineError::Config(e.clone()))
}

/// A call on the watchlist; dropping it (after the call returned) takes it off.
struct Watch {
    id: u64,
    list: &'static Mutex<Watchlist>,
}

impl Watch {
    /// Watches the next call on `store` until `deadline`; `None` when there is no deadline or
    /// the watchdog could not start (metering still bounds the call then).
    fn start(store: &Store, deadline: Option<Instant>) -> Option<Watch> {
        let deadline = deadline?;
        let list = watchlist().ok()?;
        let mut guard = lock(list);
        let id = guard.next_id;
        guard.next_id = id.wrapping_add(1);
        guard.calls.push(Watched {
            id,
            deadline,
            interrupter: store.interrupter(),
        });
        if std::mem::take(&mut guard.asleep)
            && let Some(watchdog) = WATCHDOG.get()
        {
            watchdog.unpark();
        }
        Some(Watch { id, list })
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        lock(self.list).calls.retain(|c| c.id != self.id);
    }
}

thread_local! {
    /// The limits of the instance this thread is making. Wasmer asks the engine's tunables
    /// for memories and tables, and has no per-store hook, so `instantiate` puts the
    /// instance's limits here for the length of `Instance::new` (which runs on this thread).
    static LIMITS: Cell<Option<(u32, u32)>> = const { Cell::new(None) };
}

/// Lowers the maximum of every memory and table to the limits of the instance being made.
struct LimitingTunables {
    base: BaseTunables,
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
    /// When the running call must end (`None`: no deadline or not interruptible).
    deadline: Option<Instant>,
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
            .data()
            .deadline
            .is_some_and(|deadline| Instant::now() >= deadline)
    }

    fn allocate(&mut self, size: u32) -> Result<u32, MemoryError> {
        let Some(allocator) = self.env.data().allocator.clone() else {
            return Err(MemoryError::AllocatorFailed { size });
        };
        // The size is a u32 on the wire; the allocator takes it as an i32 bit pattern.
        match allocator.call(&mut *self.env, size as i32) {
            Ok(ptr) => crate::check_allocation(ptr, size, &self.memory()),
            Err(err) => {
                self.env.data_mut().pending_trap = Some(classify(&err));
                Err(MemoryError::AllocatorTrapped)
            }
        }
    }
}

fn finish<H: Send + 'static, R>(
    env: &mut FunctionEnvMut<'_, StoreData<H>>,
    name: &str,
    result: std::thread::Result<R>,
) -> Result<R, HostTrap> {
    let value = result.map_err(|panic| HostTrap(crate::panic_trap(name, &*panic)))?;
    match env.data_mut().pending_trap.take() {
        Some(trap) => Err(HostTrap(trap)),
        None => Ok(value),
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
                                let result = catch_unwind(AssertUnwindSafe(|| {
                                    crate::dispatch(&mut WrCaller { env: &mut env }, filterbox_abi::Import::$variant, &[$(i64::from($arg)),*], |cx| H::$name(cx, $($arg),*))
                                }));
                                finish(&mut env, stringify!($name), result)
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
        let deadline = self
            .engine
            .interruptible
            .then(|| {
                let deadline = limits.start_deadline.unwrap_or(self.engine.start_deadline);
                Instant::now().checked_add(deadline)
            })
            .flatten();
        let data = StoreData {
            host,
            memory: None,
            allocator: None,
            pending_trap: None,
            deadline,
        };
        let env = FunctionEnv::new(&mut store, data);
        let imports = define_imports::<H>(&mut store, &env, &self.imports);
        LIMITS.with(|l| {
            l.set(Some((
                limits.memory_pages(),
                u32::try_from(limits.max_table_elements).unwrap_or(u32::MAX),
            )))
        });
        let watch = Watch::start(&store, deadline);
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
        Ok(WrInstance {
            home: std::thread::current().id(),
            bound: ManuallyDrop::new(Bound {
                store,
                env,
                funcs,
                points,
                deadline_points: u64::MAX,
                deadline: None,
                interruptible: self.engine.interruptible,
            }),
        })
    }
}

/// A wasmer instance and the thread that made it. wasmer 7's store is not `Send` (its
/// `on_called` hook is a non-`Send` boxed closure and its objects hold raw pointers), so the
/// instance is only ever touched on that thread: every method checks the calling thread
/// first, and a drop elsewhere leaks the instance rather than free it there. Moving the
/// wrapper between threads copies its bytes and touches nothing it points to, which is what
/// lets filterbox keep wasmer VMs beside `Send` ones in one structure (they stay on their
/// home thread; the others may run on any).
pub(crate) struct WrInstance<H: 'static> {
    home: std::thread::ThreadId,
    bound: ManuallyDrop<Bound<H>>,
}

// SAFETY: `bound` (the only non-`Send` part) is read, written and dropped only on `home`:
// `bound()`/`bound_mut()` are its only accessors and check the current thread, and `Drop`
// leaks it on any other thread. Sending the wrapper therefore never makes two threads use
// the store, nor one thread use it while another holds references into it.
unsafe impl<H: Send + 'static> Send for WrInstance<H> {}

impl<H: 'static> Drop for WrInstance<H> {
    fn drop(&mut self) {
        if self.is_home() {
            // SAFETY: dropped once, here, on its home thread; `bound` is not used after.
            unsafe { ManuallyDrop::drop(&mut self.bound) }
        }
        // Elsewhere the store is leaked: freeing it off its thread is what must not happen.
    }
}

/// Everything of a wasmer instance that must stay on the thread that made it.
struct Bound<H: 'static> {
    store: Store,
    env: FunctionEnv<StoreData<H>>,
    funcs: Vec<Option<Typed>>,
    /// The metering globals (points left, exhausted flag) when metering is compiled in.
    points: Option<(Global, Global)>,
    /// Points each call may spend.
    deadline_points: u64,
    /// How long each call may run in wall-clock time.
    deadline: Option<Duration>,
    interruptible: bool,
}

/// A callback export as a typed function, so a call allocates nothing (wasmer's untyped
/// `Function::call` boxes its results). One variant per shape the callback table has:
/// `V` returns nothing, `R` returns an i32; the digit is the number of i32 parameters.
enum Typed {
    V0(TypedFunction<(), ()>),
    R0(TypedFunction<(), i32>),
    V1(TypedFunction<i32, ()>),
    R1(TypedFunction<i32, i32>),
    V2(TypedFunction<(i32, i32), ()>),
    R2(TypedFunction<(i32, i32), i32>),
    V3(TypedFunction<(i32, i32, i32), ()>),
    R3(TypedFunction<(i32, i32, i32), i32>),
    V5(TypedFunction<(i32, i32, i32, i32, i32), ()>),
}

impl Typed {
    fn new(
        func: &Function,
        store: &Store,
        arity: usize,
        returns: bool,
    ) -> Result<Typed, EngineError> {
        let bad = |e: RuntimeError| EngineError::Instantiate(e.message());
        Ok(match (arity, returns) {
            (0, false) => Typed::V0(func.typed(store).map_err(bad)?),
            (0, true) => Typed::R0(func.typed(store).map_err(bad)?),
            (1, false) => Typed::V1(func.typed(store).map_err(bad)?),
            (1, true) => Typed::R1(func.typed(store).map_err(bad)?),
            (2, false) => Typed::V2(func.typed(store).map_err(bad)?),
            (2, true) => Typed::R2(func.typed(store).map_err(bad)?),
            (3, false) => Typed::V3(func.typed(store).map_err(bad)?),
            (3, true) => Typed::R3(func.typed(store).map_err(bad)?),
            (5, false) => Typed::V5(func.typed(store).map_err(bad)?),
            _ => {
                return Err(EngineError::Instantiate(format!(
                    "no typed call for {arity} params"
                )));
            }
        })
    }

    fn call(&self, store: &mut Store, a: [i32; 5]) -> Result<Returned, RuntimeError> {
        let [a, b, c, d, e] = a;
        Ok(match self {
            Typed::V0(f) => f.call(store).map(|()| Returned::Nothing)?,
            Typed::R0(f) => Returned::Value(f.call(store)?),
            Typed::V1(f) => f.call(store, a).map(|()| Returned::Nothing)?,
            Typed::R1(f) => Returned::Value(f.call(store, a)?),
            Typed::V2(f) => f.call(store, a, b).map(|()| Returned::Nothing)?,
            Typed::R2(f) => Returned::Value(f.call(store, a, b)?),
            Typed::V3(f) => f.call(store, a, b, c).map(|()| Returned::Nothing)?,
            Typed::R3(f) => Returned::Value(f.call(store, a, b, c)?),
            Typed::V5(f) => f.call(store, a, b, c, d, e).map(|()| Returned::Nothing)?,
        })
    }
}

impl<H: 'static> WrInstance<H> {
    /// Whether the calling thread is the one that made the instance.
    pub(crate) fn is_home(&self) -> bool {
        std::thread::current().id() == self.home
    }

    fn bound(&self) -> Option<&Bound<H>> {
        self.is_home().then_some(&*self.bound)
    }

    fn bound_mut(&mut self) -> Option<&mut Bound<H>> {
        match self.is_home() {
            true => Some(&mut *self.bound),
            false => None,
        }
    }
}

/// What a wasmer instance moved off its home thread answers a call with.
fn away_from_home() -> Trap {
    Trap {
        kind: TrapKind::Other,
        message: "a wasmer instance was used on a thread other than the one that made it".into(),
    }
}

/// What `host()` says when it cannot answer.
const AWAY_FROM_HOME: &str =
    "a wasmer instance's host state was used on a thread other than the one that made it";

impl<H: Hostcalls> WrInstance<H> {
    pub(crate) fn has(&self, callback: Callback) -> bool {
        self.bound().is_some_and(|b| b.has(callback))
    }

    pub(crate) fn call(&mut self, callback: Callback, args: &[i32]) -> Result<Returned, Trap> {
        match self.bound_mut() {
            Some(bound) => bound.call(callback, args),
            None => Err(away_from_home()),
        }
    }

    pub(crate) fn set_deadline(&mut self, deadline: Option<Duration>) {
        if let Some(bound) = self.bound_mut() {
            bound.set_deadline(deadline);
        }
    }

    pub(crate) fn host(&self) -> &H {
        match self.bound() {
            Some(bound) => bound.host(),
            None => panic!("{AWAY_FROM_HOME}"),
        }
    }

    pub(crate) fn host_mut(&mut self) -> &mut H {
        match self.bound_mut() {
            Some(bound) => bound.host_mut(),
            None => panic!("{AWAY_FROM_HOME}"),
        }
    }

    pub(crate) fn memory_size(&mut self) -> usize {
        self.bound_mut().map_or(0, Bound::memory_size)
    }
}

impl<H: Hostcalls> Bound<H> {
    fn has(&self, callback: Callback) -> bool {
        matches!(self.funcs.get(callback as usize), Some(Some(_)))
    }

    fn call(&mut self, callback: Callback, args: &[i32]) -> Result<Returned, Trap> {
        let Some(Some(func)) = self.funcs.get(callback as usize) else {
            return Ok(Returned::Missing);
        };
        let mut params = [0; 5];
        for (slot, arg) in params.iter_mut().zip(args) {
            *slot = *arg;
        }
        if let Some((left, exhausted)) = &self.points {
            // The globals were made by the middleware with these types; a failed set would
            // leave the previous budget, never an unbounded one.
            let _ = left.set(&mut self.store, Value::I64(self.deadline_points as i64));
            let _ = exhausted.set(&mut self.store, Value::I32(0));
        }
        let deadline = match self.interruptible {
            true => self.deadline.and_then(|d| Instant::now().checked_add(d)),
            false => None,
        };
        self.env.as_mut(&mut self.store).deadline = deadline;
        let watch = Watch::start(&self.store, deadline);
        let outcome = func.call(&mut self.store, params);
        drop(watch);
        let data = self.env.as_mut(&mut self.store);
        data.pending_trap = None;
        data.deadline = None;
        outcome.map_err(|e| {
            let mut trap = classify(&e);
            if self.points_exhausted() {
                trap.kind = TrapKind::Interrupted;
                trap.message = "metering budget of the deadline used up".into();
            }
            trap
        })
    }

    fn points_exhausted(&mut self) -> bool {
        match &self.points {
            Some((_, exhausted)) => matches!(exhausted.get(&mut self.store), Value::I32(1)),
            None => false,
        }
    }

    fn set_deadline(&mut self, deadline: Option<Duration>) {
        self.deadline_points = points_for(deadline);
        self.deadline = deadline;
    }

    fn host(&self) -> &H {
        &self.env.as_ref(&self.store).host
    }

    fn host_mut(&mut self) -> &mut H {
        &mut self.env.as_mut(&mut self.store).host
    }

    fn memory_size(&mut self) -> usize {
        match &self.env.as_ref(&self.store).memory {
            Some(m) => m.view(&self.store).data_size() as usize,
            None => 0,
        }
    }
}
