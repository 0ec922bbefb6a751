//! The wasmtime backend.

use crate::EngineKind;
use crate::backend::{Backend, BackendInstance};
use crate::{
    Caller, EngineConfig, EngineError, GuestMemory, HostTrap, Hostcalls, InstanceLimits,
    MemoryError, Returned, RunClock, Trap, TrapKind,
};
use filterbox_abi::{AbiVersion, Callback};
use std::sync::Arc;
use std::time::Duration;
use wasmtime::{
    Extern, Func, Linker, Memory, ModuleExport, Store, StoreLimits, StoreLimitsBuilder,
    TypedFunc,
};

mod epoch;

use epoch::{Running, arm, on_epoch_deadline, tick_epochs_of};


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
                .max_memory_size(pool.max_memory_bytes)
                .linear_memory_keep_resident(pool.keep_resident_bytes)
                .table_keep_resident(pool.keep_resident_bytes)
                .pagemap_scan(wasmtime::Enabled::Auto);
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
    limits: GrowthWatch,
}

/// The store's limits, noting when the guest grows its memory so that the size is read from
/// the store only after a growth (reading it costs a tenth of a short callback).
struct GrowthWatch {
    limits: StoreLimits,
    /// A `memory.grow` was asked for since the size was last read.
    memory_grew: bool,
}

impl wasmtime::ResourceLimiter for GrowthWatch {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.memory_grew = true;
        self.limits.memory_growing(current, desired, maximum)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.limits.memory_grow_failed(error)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.limits.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
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

impl<H: Send + 'static> crate::hostcalls::PendingTrap for WtCaller<'_, '_, H> {
    fn take_pending_trap(&mut self) -> Option<Trap> {
        self.caller.data_mut().pending_trap.take()
    }
}

impl<H: 'static> Caller<H> for WtCaller<'_, '_, H> {
    crate::hostcalls::store_caller_basics!();

    fn allocate(&mut self, size: u32) -> Result<u32, MemoryError> {
        // Taken out for the call and put back, not cloned: a clone of a `TypedFunc` bumps its
        // type's shared reference count, on every buffer handed to the guest. A hostcall from
        // inside the allocator that asks for memory again (`admit` lets none through) finds
        // no allocator and fails.
        let Some(allocator) = self.caller.data_mut().allocator.take() else {
            return Err(MemoryError::AllocatorFailed { size });
        };
        // The size is a u32 on the wire; the allocator takes it as an i32 bit pattern.
        let allocated = allocator.call(&mut *self.caller, size as i32);
        self.caller.data_mut().allocator = Some(allocator);
        match allocated {
            Ok(ptr) => crate::check_allocation(ptr, size, &self.memory()),
            Err(err) => {
                self.caller.data_mut().pending_trap = Some(classify(&err));
                Err(MemoryError::AllocatorTrapped)
            }
        }
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
                            crate::run_import(&mut WtCaller { caller: &mut caller }, filterbox_abi::Import::$variant, &[$(i64::from($arg)),*], |cx| H::$name(cx, $($arg),*))
                                .map_err(|trap| wasmtime::Error::new(HostTrap(trap)))
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
    callbacks: Arc<[Option<ModuleExport>]>,
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
            limits: GrowthWatch {
                limits: store_limits(limits),
                memory_grew: true,
            },
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
        let data = store.data_mut();
        data.memory = Some(memory);
        data.allocator = Some(allocator);
        Ok(WtInstance {
            store,
            instance,
            exports: self.callbacks.clone(),
            abi: self.abi,
            funcs: std::iter::repeat_with(|| None)
                .take(self.callbacks.len())
                .collect(),
            interruptible: self.interruptible,
            deadline: None,
            memory_bytes: 0,
        })
    }
}

/// A callback export as a typed function (no `unsafe` raw-slot call). One variant per shape
/// the callback table has: `V` returns nothing, `R` returns an i32; the digit is the number of
/// i32 parameters. The types were checked against the ABI when the module was linked.
enum Typed {
    V0(TypedFunc<(), ()>),
    R0(TypedFunc<(), i32>),
    V1(TypedFunc<i32, ()>),
    R1(TypedFunc<i32, i32>),
    V2(TypedFunc<(i32, i32), ()>),
    R2(TypedFunc<(i32, i32), i32>),
    V3(TypedFunc<(i32, i32, i32), ()>),
    R3(TypedFunc<(i32, i32, i32), i32>),
    V5(TypedFunc<(i32, i32, i32, i32, i32), ()>),
}

impl Typed {
    fn new<H>(
        func: &Func,
        store: &Store<StoreData<H>>,
        arity: usize,
        returns: bool,
    ) -> Result<Typed, EngineError> {
        let bad = |e: wasmtime::Error| EngineError::Instantiate(format!("{e:#}"));
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

    fn call<H>(
        &self,
        store: &mut Store<StoreData<H>>,
        [a, b, c, d, e]: [i32; 5],
    ) -> wasmtime::Result<Returned> {
        Ok(match self {
            Typed::V0(f) => f.call(store, ()).map(|()| Returned::Nothing)?,
            Typed::R0(f) => Returned::Value(f.call(store, ())?),
            Typed::V1(f) => f.call(store, a).map(|()| Returned::Nothing)?,
            Typed::R1(f) => Returned::Value(f.call(store, a)?),
            Typed::V2(f) => f.call(store, (a, b)).map(|()| Returned::Nothing)?,
            Typed::R2(f) => Returned::Value(f.call(store, (a, b))?),
            Typed::V3(f) => f.call(store, (a, b, c)).map(|()| Returned::Nothing)?,
            Typed::R3(f) => Returned::Value(f.call(store, (a, b, c))?),
            Typed::V5(f) => f.call(store, (a, b, c, d, e)).map(|()| Returned::Nothing)?,
        })
    }
}

pub(crate) struct WtInstance<H: 'static> {
    store: Store<StoreData<H>>,
    instance: wasmtime::Instance,
    /// Per callback: where the instance has it, if the module exports it.
    exports: Arc<[Option<ModuleExport>]>,
    abi: AbiVersion,
    /// Per callback: the export, typed on its first call (typing every export when
    /// instantiating cost a sixth of a pooled VM's creation, for callbacks most VMs never call).
    funcs: Vec<Option<Typed>>,
    interruptible: bool,
    /// How long each call may run.
    deadline: Option<Duration>,
    /// The memory's size when last read (valid while the limiter saw no growth).
    memory_bytes: usize,
}

impl<H: Hostcalls> WtInstance<H> {
    /// Looks `callback`'s export up and types it, once; a callback the module does not
    /// export stays `None`.
    fn type_export(&mut self, callback: Callback) -> Result<(), Trap> {
        let index = callback as usize;
        let Some(Some(export)) = self.exports.get(index) else {
            return Ok(());
        };
        let Some(Extern::Func(func)) = self.instance.get_module_export(&mut self.store, export)
        else {
            return Ok(());
        };
        // Types were checked against the ABI when linking, so the arity is the ABI's.
        let typed = Typed::new(
            &func,
            &self.store,
            callback.params(self.abi).len(),
            callback.result().is_some(),
        )
        .map_err(|e| Trap {
            kind: TrapKind::Other,
            message: e.to_string(),
        })?;
        if let Some(slot) = self.funcs.get_mut(index) {
            *slot = Some(typed);
        }
        Ok(())
    }
}

impl<H: Hostcalls> BackendInstance<H> for WtInstance<H> {
    fn has(&self, callback: Callback) -> bool {
        matches!(self.exports.get(callback as usize), Some(Some(_)))
    }

    fn call(&mut self, callback: Callback, args: &[i32]) -> Result<Returned, Trap> {
        if matches!(self.funcs.get(callback as usize), Some(None)) {
            self.type_export(callback)?;
        }
        let Some(Some(func)) = self.funcs.get(callback as usize) else {
            return Ok(Returned::Missing);
        };
        let mut params = [0; 5];
        for (slot, arg) in params.iter_mut().zip(args) {
            *slot = *arg;
        }
        if self.interruptible {
            arm(&mut self.store, self.deadline);
        }
        let running = self.interruptible.then(Running::enter);
        let outcome = func.call(&mut self.store, params);
        drop(running);
        self.store.data_mut().pending_trap = None;
        outcome.map_err(|e| classify(&e))
    }

    fn set_deadline(&mut self, deadline: Option<Duration>) {
        self.deadline = deadline;
    }

    fn host(&self) -> &H {
        &self.store.data().host
    }

    fn host_mut(&mut self) -> &mut H {
        &mut self.store.data_mut().host
    }

    fn memory_size(&mut self) -> usize {
        let data = self.store.data_mut();
        if std::mem::take(&mut data.limits.memory_grew) {
            self.memory_bytes = match data.memory {
                Some(m) => m.data_size(&self.store),
                None => 0,
            };
        }
        self.memory_bytes
    }
}

/// The wasmtime backend.
pub(crate) struct Wasmtime;

impl Backend for Wasmtime {
    type Engine = WtEngine;
    type Module = (wasmtime::Module, WtEngine);
    type InstancePre<H: Hostcalls> = WtInstancePre<H>;
    type Instance<H: Hostcalls> = WtInstance<H>;

    fn new_engine(_: EngineKind, config: &EngineConfig) -> Result<WtEngine, EngineError> {
        WtEngine::new(config)
    }

    fn compile(engine: &WtEngine, wasm: &[u8]) -> Result<Self::Module, EngineError> {
        Ok((engine.compile(wasm)?, engine.clone()))
    }

    fn fingerprint(engine: &WtEngine) -> Option<String> {
        Some(engine.fingerprint())
    }

    fn deserialize(engine: &WtEngine, artifact: &[u8]) -> Result<Self::Module, String> {
        Ok((engine.deserialize(artifact)?, engine.clone()))
    }

    fn serialize((module, _): &Self::Module) -> Result<Vec<u8>, String> {
        module.serialize().map_err(|e| e.to_string())
    }

    fn link<H: Hostcalls>(
        (module, engine): &Self::Module,
        abi: AbiVersion,
    ) -> Result<WtInstancePre<H>, EngineError> {
        WtInstancePre::new(engine, module, abi)
    }

    fn instantiate<H: Hostcalls>(
        pre: &WtInstancePre<H>,
        host: H,
        limits: &InstanceLimits,
    ) -> Result<WtInstance<H>, EngineError> {
        pre.instantiate(host, limits)
    }
}
