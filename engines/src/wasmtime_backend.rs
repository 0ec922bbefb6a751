//! The wasmtime backend.

use crate::{
    Caller, EngineConfig, EngineError, GuestMemory, HostTrap, Hostcalls, InstanceLimits,
    MemoryError, Returned, RunClock, Trap, TrapKind,
};
use filterbox_abi::{AbiVersion, Callback};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};
use wasmtime::{
    EngineWeak, Extern, Func, Linker, Memory, ModuleExport, Store, StoreLimits, StoreLimitsBuilder,
    TypedFunc, ValRaw,
};

/// The epoch period: deadlines are counted in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(1);

/// A deadline far enough away to mean "none" without overflowing the epoch counter.
const NO_DEADLINE: u64 = 1 << 48;

/// Every live interruptible engine; one thread ticks them all.
static TICKED: OnceLock<Mutex<Vec<EngineWeak>>> = OnceLock::new();

/// The epoch thread, once started (to wake it).
static TICKER: OnceLock<std::thread::Thread> = OnceLock::new();

/// The epoch thread sleeps: no call ran for [`IDLE_TICKS`] ticks, so it stopped ticking (a
/// thousand wake-ups a second cost an idle process CPU for nothing). The first call that
/// finds it set wakes the thread.
static TICKER_ASLEEP: AtomicBool = AtomicBool::new(false);

/// Ticks without a call before the epoch thread sleeps.
const IDLE_TICKS: u32 = 100;

/// How often the sleeping epoch thread looks for running calls anyway.
const ASLEEP_CHECK: Duration = Duration::from_secs(1);

/// Per thread that calls into an interruptible store: calls started and calls ended. Only
/// the owning thread writes them (no shared cache line is written per call); the epoch thread
/// reads them all.
#[derive(Default)]
struct CallCounts {
    started: AtomicU64,
    ended: AtomicU64,
}

/// The [`CallCounts`] of every thread that made a call (a thread that ended drops out).
static CALLERS: Mutex<Vec<Weak<CallCounts>>> = Mutex::new(Vec::new());

thread_local! {
    static CALLS: Arc<CallCounts> = {
        let counts = Arc::new(CallCounts::default());
        lock(&CALLERS).push(Arc::downgrade(&counts));
        counts
    };
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Marks a call into a store as running on this thread from `enter` until dropped, and wakes
/// the epoch thread if it sleeps, so that the call's deadline is enforced.
struct Running;

impl Running {
    fn enter() -> Running {
        // SeqCst on both sides (here: this store then the flag's load; the epoch thread: the
        // flag's store then these loads): either this call sees the thread asleep and wakes
        // it, or the thread sees the call and stays awake. A thread being torn down has no
        // counters left and cannot be running wasm.
        let _ = CALLS.try_with(|counts| {
            let started = counts.started.load(Ordering::Relaxed);
            counts
                .started
                .store(started.wrapping_add(1), Ordering::SeqCst);
        });
        if TICKER_ASLEEP.load(Ordering::SeqCst)
            && TICKER_ASLEEP.swap(false, Ordering::SeqCst)
            && let Some(thread) = TICKER.get()
        {
            thread.unpark();
        }
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = CALLS.try_with(|counts| {
            let ended = counts.ended.load(Ordering::Relaxed);
            counts.ended.store(ended.wrapping_add(1), Ordering::Release);
        });
    }
}

/// Calls started so far on every thread, and whether one is running now.
fn call_activity() -> (u64, bool) {
    let mut callers = lock(&CALLERS);
    let (mut started, mut running) = (0u64, false);
    callers.retain(|weak| match weak.upgrade() {
        Some(counts) => {
            let begun = counts.started.load(Ordering::SeqCst);
            running |= begun != counts.ended.load(Ordering::SeqCst);
            started = started.wrapping_add(begun);
            true
        }
        None => false,
    });
    (started, running)
}

/// The epoch thread: ticks every live engine each [`EPOCH_TICK`] while calls run or ran
/// recently; sleeps after [`IDLE_TICKS`] ticks without one until a call wakes it.
fn tick_epochs() {
    let _ = TICKER.set(std::thread::current());
    let (mut seen, mut idle) = (0u64, 0u32);
    loop {
        std::thread::sleep(EPOCH_TICK);
        if let Some(list) = TICKED.get() {
            lock(list).retain(|weak| match weak.upgrade() {
                Some(engine) => {
                    engine.increment_epoch();
                    true
                }
                None => false,
            });
        }
        let (started, running) = call_activity();
        if running || started != seen {
            (seen, idle) = (started, 0);
            continue;
        }
        idle += 1;
        if idle < IDLE_TICKS {
            continue;
        }
        TICKER_ASLEEP.store(true, Ordering::SeqCst);
        // A call that began before the flag was up did not see it: look once more.
        if call_activity().1 {
            TICKER_ASLEEP.store(false, Ordering::SeqCst);
            continue;
        }
        while TICKER_ASLEEP.load(Ordering::SeqCst) {
            std::thread::park_timeout(ASLEEP_CHECK);
            // A safety net: a running call the wake-up missed still gets its deadline.
            if call_activity().1 {
                TICKER_ASLEEP.store(false, Ordering::SeqCst);
            }
        }
        idle = 0;
    }
}

/// Adds `engine` to the engines the epoch thread ticks, starting the thread the first time.
/// The thread holds only weak references, so dropping an engine takes it off the list.
fn tick_epochs_of(engine: &wasmtime::Engine) -> Result<(), EngineError> {
    let mut started = Ok(());
    let list = TICKED.get_or_init(|| {
        started = std::thread::Builder::new()
            .name("filterbox-epoch".into())
            .spawn(tick_epochs)
            .map(drop)
            .map_err(|e| EngineError::Config(format!("cannot start the epoch thread: {e}")));
        Mutex::new(Vec::new())
    });
    started?;
    lock(list).push(engine.weak());
    Ok(())
}

/// Epoch ticks that cover `left` (at least one: a deadline is never now).
fn ticks_for(left: Duration) -> u64 {
    u64::try_from(left.as_nanos().div_ceil(EPOCH_TICK.as_nanos()))
        .unwrap_or(NO_DEADLINE)
        .clamp(1, NO_DEADLINE)
}

/// Starts `deadline` for the store's next call: the epoch first fires one tick in, so that
/// the call's [`RunClock`] reads the thread's CPU clock; see [`on_epoch_deadline`].
fn arm<H>(store: &mut Store<StoreData<H>>, deadline: Option<Duration>) {
    let clock = deadline.and_then(RunClock::from_first_tick);
    let armed = match clock {
        Some(_) => 1,
        None => NO_DEADLINE,
    };
    store.data_mut().clock = clock;
    store.set_epoch_deadline(armed);
}

/// The epoch callback: stop the call once its clock says it has run its deadline, else wait
/// for what is left of it.
fn on_epoch_deadline(clock: Option<&mut RunClock>) -> wasmtime::UpdateDeadline {
    use wasmtime::UpdateDeadline::{Continue, Interrupt};
    let Some(clock) = clock else {
        return Continue(NO_DEADLINE);
    };
    let now = Instant::now();
    clock.read_cpu();
    match clock.passed(now) {
        true => Interrupt,
        false => Continue(ticks_for(clock.left(now))),
    }
}

fn store_limits(limits: &InstanceLimits) -> StoreLimits {
    StoreLimitsBuilder::new()
        .memory_size(limits.memory_pages() as usize * crate::WASM_PAGE)
        .table_elements(limits.max_table_elements)
        .trap_on_grow_failure(false)
        .build()
}

#[derive(Clone)]
pub(crate) struct WtEngine {
    engine: wasmtime::Engine,
    interruptible: bool,
    start_deadline: Duration,
}

impl WtEngine {
    pub(crate) fn new(config: &EngineConfig) -> Result<Self, EngineError> {
        let mut c = wasmtime::Config::new();
        c.max_wasm_stack(config.max_wasm_stack);
        c.memory_init_cow(config.memory_init_cow);
        c.epoch_interruption(config.interruptible);
        if let Some(pool) = config.pooling {
            let mut pooling = wasmtime::PoolingAllocationConfig::default();
            pooling
                .total_core_instances(pool.max_instances)
                .total_memories(pool.max_instances)
                .total_tables(pool.max_instances)
                .max_memory_size(pool.max_memory_bytes);
            c.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pooling));
        }
        let engine = wasmtime::Engine::new(&c).map_err(|e| EngineError::Config(e.to_string()))?;
        if config.interruptible {
            tick_epochs_of(&engine)?;
        }
        Ok(WtEngine {
            engine,
            interruptible: config.interruptible,
            start_deadline: config.start_deadline,
        })
    }

    /// Covers wasmtime's version and every setting that changes generated code.
    pub(crate) fn fingerprint(&self) -> String {
        use std::hash::Hash;
        let mut hasher = crate::cache::Fingerprint::default();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        hasher.hex()
    }

    pub(crate) fn deserialize(&self, artifact: &[u8]) -> Result<wasmtime::Module, String> {
        // SAFETY: the bytes come from a cache entry whose magic, source-module hash and
        // checksum were verified, written by `Module::serialize` of a wasmtime engine;
        // wasmtime itself also refuses artifacts of another version or configuration.
        unsafe { wasmtime::Module::deserialize(&self.engine, artifact) }
            .map_err(|e| format!("{e:#}"))
    }

    pub(crate) fn compile(&self, wasm: &[u8]) -> Result<wasmtime::Module, EngineError> {
        wasmtime::Module::new(&self.engine, wasm)
            .map_err(|e| EngineError::Compile(format!("{e:#}")))
    }
}

/// What lives in the wasmtime store beside the host state.
pub(crate) struct StoreData<H> {
    host: H,
    /// The running call's deadline, which the epoch callback keeps.
    clock: Option<RunClock>,
    memory: Option<Memory>,
    allocator: Option<TypedFunc<i32, i32>>,
    /// A trap raised inside a nested guest call (the allocator) during a hostcall; it fails
    /// the outer call once the hostcall returns.
    pending_trap: Option<Trap>,
    limits: StoreLimits,
}

fn classify(err: &wasmtime::Error) -> Trap {
    if let Some(HostTrap(trap)) = err.downcast_ref::<HostTrap>() {
        return trap.clone();
    }
    use wasmtime::Trap as T;
    let Some(trap) = err.downcast_ref::<T>() else {
        return Trap {
            kind: TrapKind::Other,
            message: format!("{err:#}"),
        };
    };
    let kind = match trap {
        T::StackOverflow => TrapKind::StackOverflow,
        T::MemoryOutOfBounds | T::TableOutOfBounds | T::HeapMisaligned | T::ArrayOutOfBounds => {
            TrapKind::OutOfBounds
        }
        T::IndirectCallToNull | T::BadSignature | T::NullReference | T::CastFailure => {
            TrapKind::BadCall
        }
        T::IntegerOverflow | T::IntegerDivisionByZero | T::BadConversionToInteger => {
            TrapKind::Arithmetic
        }
        T::UnreachableCodeReached => TrapKind::Unreachable,
        T::Interrupt | T::OutOfFuel => TrapKind::Interrupted,
        T::AllocationTooLarge => TrapKind::OutOfMemory,
        _ => TrapKind::Other,
    };
    Trap {
        kind,
        message: trap.to_string(),
    }
}

struct WtCaller<'a, 'b, H: 'static> {
    caller: &'a mut wasmtime::Caller<'b, StoreData<H>>,
}

impl<H: 'static> Caller<H> for WtCaller<'_, '_, H> {
    fn host(&mut self) -> &mut H {
        &mut self.caller.data_mut().host
    }

    fn memory(&mut self) -> GuestMemory<'_> {
        match self.caller.data().memory {
            Some(memory) => GuestMemory::new(memory.data_mut(&mut *self.caller)),
            None => GuestMemory::empty(),
        }
    }

    fn split(&mut self) -> (&mut H, GuestMemory<'_>) {
        match self.caller.data().memory {
            Some(memory) => {
                let (bytes, data) = memory.data_and_store_mut(&mut *self.caller);
                (&mut data.host, GuestMemory::new(bytes))
            }
            None => (&mut self.caller.data_mut().host, GuestMemory::empty()),
        }
    }

    fn trap(&mut self, trap: Trap) {
        self.caller.data_mut().pending_trap = Some(trap);
    }

    fn allocate(&mut self, size: u32) -> Result<u32, MemoryError> {
        let Some(allocator) = self.caller.data().allocator.clone() else {
            return Err(MemoryError::AllocatorFailed { size });
        };
        // The size is a u32 on the wire; the allocator takes it as an i32 bit pattern.
        match allocator.call(&mut *self.caller, size as i32) {
            Ok(ptr) => crate::check_allocation(ptr, size, &self.memory()),
            Err(err) => {
                self.caller.data_mut().pending_trap = Some(classify(&err));
                Err(MemoryError::AllocatorTrapped)
            }
        }
    }
}

/// Ends a host function: a panic becomes a host trap (it never unwinds through wasm frames),
/// and a trap raised by a nested guest call fails the outer call.
fn finish<H, R>(
    caller: &mut wasmtime::Caller<'_, StoreData<H>>,
    name: &str,
    result: std::thread::Result<R>,
) -> wasmtime::Result<R> {
    let value =
        result.map_err(|panic| wasmtime::Error::new(HostTrap(crate::panic_trap(name, &*panic))))?;
    match caller.data_mut().pending_trap.take() {
        Some(trap) => Err(wasmtime::Error::new(HostTrap(trap))),
        None => Ok(value),
    }
}

macro_rules! define_imports {
    ($($variant:ident : $module:ident $name:ident ( $($arg:ident : $ty:ident),* ) -> $ret:tt , $vers:ident ;)*) => {
        fn define_imports<H: Hostcalls>(linker: &mut Linker<StoreData<H>>) -> wasmtime::Result<()> {
            $(
                for module in crate::module_names(stringify!($module)) {
                    linker.func_wrap(
                        module,
                        stringify!($name),
                        |mut caller: wasmtime::Caller<'_, StoreData<H>>, $($arg: $ty),*| -> wasmtime::Result<$ret> {
                            let result = catch_unwind(AssertUnwindSafe(|| {
                                crate::dispatch(&mut WtCaller { caller: &mut caller }, filterbox_abi::Import::$variant, &[$(i64::from($arg)),*], |cx| H::$name(cx, $($arg),*))
                            }));
                            finish(&mut caller, stringify!($name), result)
                        },
                    )?;
                }
            )*
            Ok(())
        }
    };
}
filterbox_abi::for_each_import!(define_imports);

fn type_name(ty: wasmtime::ValType) -> &'static str {
    match ty {
        wasmtime::ValType::I32 => "i32",
        wasmtime::ValType::I64 => "i64",
        wasmtime::ValType::F32 => "f32",
        wasmtime::ValType::F64 => "f64",
        wasmtime::ValType::V128 => "v128",
        wasmtime::ValType::Ref(_) => "ref",
    }
}

pub(crate) struct WtInstancePre<H> {
    pre: wasmtime::InstancePre<StoreData<H>>,
    /// Per callback: where to find it in an instance, if the module exports it.
    callbacks: Vec<Option<ModuleExport>>,
    allocator: Option<ModuleExport>,
    memory: ModuleExport,
    abi: AbiVersion,
    interruptible: bool,
    start_deadline: Duration,
}

impl<H> Clone for WtInstancePre<H> {
    fn clone(&self) -> Self {
        WtInstancePre {
            pre: self.pre.clone(),
            callbacks: self.callbacks.clone(),
            allocator: self.allocator,
            memory: self.memory,
            abi: self.abi,
            interruptible: self.interruptible,
            start_deadline: self.start_deadline,
        }
    }
}

impl<H: Hostcalls> WtInstancePre<H> {
    pub(crate) fn new(
        engine: &WtEngine,
        module: &wasmtime::Module,
        abi: AbiVersion,
    ) -> Result<Self, EngineError> {
        let memory = match module.get_export("memory") {
            Some(wasmtime::ExternType::Memory(_)) => module.get_export_index("memory"),
            _ => None,
        }
        .ok_or(EngineError::MissingExport("memory"))?;
        let (present, abi) = crate::check_callbacks(abi, |name| match module.get_export(name) {
            Some(wasmtime::ExternType::Func(ty)) => Some((
                ty.params().map(type_name).collect(),
                ty.results().map(type_name).collect(),
            )),
            _ => None,
        })?;
        let allocator = module.get_export_index(crate::pick_allocator(&present)?.name());
        let callbacks = Callback::ALL
            .iter()
            .zip(&present)
            .map(|(c, present)| {
                if *present {
                    module.get_export_index(c.name())
                } else {
                    None
                }
            })
            .collect();
        let mut linker = Linker::new(module.engine());
        define_imports::<H>(&mut linker).map_err(|e| EngineError::Instantiate(format!("{e:#}")))?;
        let pre = linker
            .instantiate_pre(module)
            .map_err(|e| EngineError::Instantiate(format!("{e:#}")))?;
        Ok(WtInstancePre {
            pre,
            callbacks,
            allocator,
            memory,
            abi,
            interruptible: engine.interruptible,
            start_deadline: engine.start_deadline,
        })
    }

    pub(crate) fn instantiate(
        &self,
        host: H,
        limits: &InstanceLimits,
    ) -> Result<WtInstance<H>, EngineError> {
        let data = StoreData {
            host,
            clock: None,
            memory: None,
            allocator: None,
            pending_trap: None,
            limits: store_limits(limits),
        };
        let mut store = Store::new(self.pre.module().engine(), data);
        store.limiter(|data| &mut data.limits);
        if self.interruptible {
            store.epoch_deadline_callback(|mut store| {
                Ok(on_epoch_deadline(store.data_mut().clock.as_mut()))
            });
            arm(
                &mut store,
                Some(limits.start_deadline.unwrap_or(self.start_deadline)),
            );
        }
        let running = self.interruptible.then(Running::enter);
        let instance = self.pre.instantiate(&mut store);
        drop(running);
        let instance = instance.map_err(|e| match e.downcast_ref::<wasmtime::Trap>() {
            Some(_) => EngineError::StartTrapped(classify(&e)),
            None => EngineError::Instantiate(format!("{e:#}")),
        })?;
        let memory = match instance.get_module_export(&mut store, &self.memory) {
            Some(Extern::Memory(m)) => m,
            _ => return Err(EngineError::MissingExport("memory")),
        };
        let allocator = match self
            .allocator
            .and_then(|a| instance.get_module_export(&mut store, &a))
        {
            Some(Extern::Func(f)) => f
                .typed::<i32, i32>(&store)
                .map_err(|e| EngineError::Instantiate(format!("{e:#}")))?,
            _ => {
                return Err(EngineError::MissingExport(
                    "proxy_on_memory_allocate or malloc",
                ));
            }
        };
        let mut funcs = Vec::with_capacity(self.callbacks.len());
        for (export, callback) in self.callbacks.iter().zip(Callback::ALL) {
            funcs.push(
                match export.and_then(|e| instance.get_module_export(&mut store, &e)) {
                    // Types were checked against the ABI when linking, so the arity is the ABI's.
                    Some(Extern::Func(f)) => Some((f, callback.params(self.abi).len())),
                    _ => None,
                },
            );
        }
        let data = store.data_mut();
        data.memory = Some(memory);
        data.allocator = Some(allocator);
        Ok(WtInstance {
            store,
            funcs,
            interruptible: self.interruptible,
            deadline: None,
        })
    }
}

pub(crate) struct WtInstance<H: 'static> {
    store: Store<StoreData<H>>,
    /// Per callback: the export and its number of parameters.
    funcs: Vec<Option<(Func, usize)>>,
    interruptible: bool,
    /// How long each call may run.
    deadline: Option<Duration>,
}

impl<H: Hostcalls> WtInstance<H> {
    pub(crate) fn has(&self, callback: Callback) -> bool {
        matches!(self.funcs.get(callback as usize), Some(Some(_)))
    }

    pub(crate) fn call(&mut self, callback: Callback, args: &[i32]) -> Result<Returned, Trap> {
        const MAX_CALLBACK_PARAMS: usize = 6;
        let Some(Some((func, arity))) = self.funcs.get(callback as usize) else {
            return Ok(Returned::Missing);
        };
        let (func, arity) = (*func, *arity);
        // Every callback takes only i32s and returns one i32 or nothing (ABI table), and
        // MAX_CALLBACK_PARAMS bounds the arity.
        let mut slots = [ValRaw::i32(0); MAX_CALLBACK_PARAMS];
        for (slot, arg) in slots.iter_mut().zip(args.iter().take(arity)) {
            *slot = ValRaw::i32(*arg);
        }
        let returns = usize::from(callback.result().is_some());
        let len = arity.max(returns).min(MAX_CALLBACK_PARAMS);
        if self.interruptible {
            arm(&mut self.store, self.deadline);
        }
        let slots = slots.get_mut(..len).unwrap_or(&mut []);
        let running = self.interruptible.then(Running::enter);
        // SAFETY: the export's type was checked against the ABI when the module was linked
        // (`check_callbacks`): `arity` i32 parameters and `returns` i32 results. `slots` holds
        // max(arity, returns) slots, the parameters are written as i32s, and no reference
        // types are involved; the function belongs to this store.
        let outcome = unsafe { func.call_unchecked(&mut self.store, slots as *mut [ValRaw]) };
        drop(running);
        self.store.data_mut().pending_trap = None;
        outcome.map_err(|e| classify(&e))?;
        Ok(match (returns, slots.first()) {
            (1, Some(v)) => Returned::Value(v.get_i32()),
            _ => Returned::Nothing,
        })
    }

    pub(crate) fn set_deadline(&mut self, deadline: Option<Duration>) {
        self.deadline = deadline;
    }

    pub(crate) fn host(&self) -> &H {
        &self.store.data().host
    }

    pub(crate) fn host_mut(&mut self) -> &mut H {
        &mut self.store.data_mut().host
    }

    pub(crate) fn memory_size(&mut self) -> usize {
        match self.store.data().memory {
            Some(m) => m.data_size(&self.store),
            None => 0,
        }
    }
}
