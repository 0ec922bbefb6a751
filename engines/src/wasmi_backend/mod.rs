//! The wasmi backend: a pure-Rust interpreter, for hosts without a JIT.

#[cfg(unix)]
mod memory;

use crate::EngineKind;
use crate::backend::{Backend, BackendInstance};
use crate::{
    Caller, EngineConfig, EngineError, GuestMemory, HostTrap, Hostcalls, InstanceLimits,
    MemoryError, Returned, RunClock, Trap, TrapKind, WASM_PAGE,
};
use filterbox_abi::{AbiVersion, Callback};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmi::{
    Func, Linker, Memory, ResumableCall, Store, StoreLimits, StoreLimitsBuilder, TypedFunc, Val,
};

impl wasmi::errors::HostError for HostTrap {}

/// Fuel in one slice of a call with a deadline: the clock is read between slices. Well
/// under a millisecond of interpretation even in an unoptimised build.
const FUEL_SLICE: u64 = 200_000;

/// Fuel for work that cannot be resumed (a start section, the allocator inside a
/// hostcall), per millisecond of deadline: a low rate (optimised wasmi runs several times
/// more), so such work is cut off no later than its deadline, at the risk of earlier.
const FUEL_PER_MS: u64 = 100_000;

fn fuel_for(deadline: Duration) -> u64 {
    u64::try_from(deadline.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
        .saturating_mul(FUEL_PER_MS)
}

#[derive(Clone)]
pub(crate) struct WiEngine {
    engine: wasmi::Engine,
    interruptible: bool,
    start_deadline: Duration,
    /// Mappings kept for new instances' memories, with `EngineConfig::pooling`.
    #[cfg(unix)]
    pool: Option<Arc<memory::MappingPool>>,
}

impl WiEngine {
    pub(crate) fn new(config: &EngineConfig) -> Result<Self, EngineError> {
        // wasmi bounds recursion with its own value stack; its defaults trap deep recursion
        // as a stack overflow, which is what max_wasm_stack is for on the JIT engines.
        let mut c = wasmi::Config::default();
        c.consume_fuel(config.interruptible);
        // wasmi's default translates each function on its first call and charges the
        // translation to the call's fuel; when what is left of a slice is less than that,
        // the call ends with an out-of-fuel error that cannot be resumed, so a large
        // function (Go SDK plugins' `_initialize`) could never run under a deadline.
        // Translating everything when the module is compiled takes that off the calls.
        c.compilation_mode(wasmi::CompilationMode::Eager);
        Ok(WiEngine {
            engine: wasmi::Engine::new(&c),
            interruptible: config.interruptible,
            start_deadline: config.start_deadline,
            #[cfg(unix)]
            pool: config
                .pooling
                .map(|pool| Arc::new(memory::MappingPool::new(&pool))),
        })
    }

    pub(crate) fn compile(&self, wasm: &[u8]) -> Result<wasmi::Module, EngineError> {
        // A module whose memory was turned into an import gets it from a mapping of its own
        // (see `memory`); should the rewritten bytes not compile, the module is compiled as
        // given, so that any error is about the user's bytes.
        #[cfg(unix)]
        if let Some(rewritten) = memory::import_own_memory(wasm)
            && let Ok(module) = wasmi::Module::new(&self.engine, rewritten)
        {
            return Ok(module);
        }
        wasmi::Module::new(&self.engine, wasm).map_err(|e| EngineError::Compile(e.to_string()))
    }
}

pub(crate) struct StoreData<H> {
    host: H,
    memory: Option<Memory>,
    allocator: Option<TypedFunc<i32, i32>>,
    pending_trap: Option<Trap>,
    limits: StoreLimits,
    /// The running call's deadline (`None`: no deadline or not interruptible).
    deadline: Option<RunClock>,
}

fn classify(err: &wasmi::Error) -> Trap {
    if let Some(HostTrap(trap)) = err.downcast_ref::<HostTrap>() {
        return trap.clone();
    }
    use wasmi::TrapCode as T;
    let kind = match err.as_trap_code() {
        Some(T::StackOverflow) => TrapKind::StackOverflow,
        Some(T::MemoryOutOfBounds | T::TableOutOfBounds) => TrapKind::OutOfBounds,
        Some(T::IndirectCallToNull | T::BadSignature) => TrapKind::BadCall,
        Some(T::IntegerDivisionByZero | T::IntegerOverflow | T::BadConversionToInteger) => {
            TrapKind::Arithmetic
        }
        Some(T::UnreachableCodeReached) => TrapKind::Unreachable,
        Some(T::OutOfFuel) => TrapKind::Interrupted,
        Some(T::GrowthOperationLimited | T::OutOfSystemMemory) => TrapKind::OutOfMemory,
        _ => TrapKind::Other,
    };
    Trap {
        kind,
        message: err.to_string(),
    }
}

struct WiCaller<'a, 'b, H: 'static> {
    caller: &'a mut wasmi::Caller<'b, StoreData<H>>,
}

impl<H: Send + 'static> crate::hostcalls::PendingTrap for WiCaller<'_, '_, H> {
    fn take_pending_trap(&mut self) -> Option<Trap> {
        self.caller.data_mut().pending_trap.take()
    }
}

impl<H: 'static> Caller<H> for WiCaller<'_, '_, H> {
    crate::hostcalls::store_caller_basics!();

    fn deadline_passed(&mut self) -> bool {
        self.caller
            .data_mut()
            .deadline
            .as_mut()
            .is_some_and(|clock| clock.passed(Instant::now()))
    }

    fn allocate(&mut self, size: u32) -> Result<u32, MemoryError> {
        let Some(allocator) = self.caller.data().allocator else {
            return Err(MemoryError::AllocatorFailed { size });
        };
        // The allocator cannot be resumed when its fuel runs out, so it gets what is left of
        // the deadline up front; what it burns is then taken from the caller's slice, so
        // calling an allocating hostcall in a loop cannot refill the slice for ever.
        let budget = self.caller.data().deadline.map(|mut clock| {
            let left = clock.left(Instant::now());
            let before = self.caller.get_fuel().unwrap_or(0);
            let granted = fuel_for(left);
            let _ = self.caller.set_fuel(granted);
            (before, granted)
        });
        // The size is a u32 on the wire; the allocator takes it as an i32 bit pattern.
        let result = allocator.call(&mut *self.caller, size as i32);
        if let Some((before, granted)) = budget {
            let burnt = granted.saturating_sub(self.caller.get_fuel().unwrap_or(0));
            let _ = self.caller.set_fuel(before.saturating_sub(burnt));
        }
        match result {
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
        fn define_imports<H: Hostcalls>(linker: &mut Linker<StoreData<H>>) -> Result<(), wasmi::errors::LinkerError> {
            $(
                for module in crate::module_names(stringify!($module)) {
                    linker.func_wrap(
                        module,
                        stringify!($name),
                        |mut caller: wasmi::Caller<'_, StoreData<H>>, $($arg: $ty),*| -> Result<$ret, wasmi::Error> {
                            crate::run_import(&mut WiCaller { caller: &mut caller }, filterbox_abi::Import::$variant, &[$(i64::from($arg)),*], |cx| H::$name(cx, $($arg),*))
                                .map_err(|trap| wasmi::Error::host(HostTrap(trap)))
                        },
                    )?;
                }
            )*
            Ok(())
        }
    };
}
filterbox_abi::for_each_import!(define_imports);

fn type_name(ty: &wasmi::ValType) -> &'static str {
    match ty {
        wasmi::ValType::I32 => "i32",
        wasmi::ValType::I64 => "i64",
        wasmi::ValType::F32 => "f32",
        wasmi::ValType::F64 => "f64",
        _ => "ref",
    }
}

pub(crate) struct WiInstancePre<H> {
    module: wasmi::Module,
    linker: Arc<Linker<StoreData<H>>>,
    present: Vec<bool>,
    allocator: Callback,
    abi: AbiVersion,
    interruptible: bool,
    start_deadline: Duration,
    /// The type of the memory the module imports from `memory::MODULE` (it was rewritten so).
    own_memory: Option<wasmi::MemoryType>,
    #[cfg(unix)]
    pool: Option<Arc<memory::MappingPool>>,
}

impl<H> Clone for WiInstancePre<H> {
    fn clone(&self) -> Self {
        WiInstancePre {
            module: self.module.clone(),
            linker: self.linker.clone(),
            present: self.present.clone(),
            allocator: self.allocator,
            abi: self.abi,
            interruptible: self.interruptible,
            start_deadline: self.start_deadline,
            own_memory: self.own_memory,
            #[cfg(unix)]
            pool: self.pool.clone(),
        }
    }
}

impl<H: Hostcalls> WiInstancePre<H> {
    pub(crate) fn new(
        engine: &WiEngine,
        module: &wasmi::Module,
        abi: AbiVersion,
    ) -> Result<Self, EngineError> {
        if !matches!(
            module.get_export("memory"),
            Some(wasmi::ExternType::Memory(_))
        ) {
            return Err(EngineError::MissingExport("memory"));
        }
        let (present, abi) = crate::check_callbacks(abi, |name| match module.get_export(name) {
            Some(wasmi::ExternType::Func(ty)) => Some((
                ty.params().iter().map(type_name).collect(),
                ty.results().iter().map(type_name).collect(),
            )),
            _ => None,
        })?;
        let allocator = crate::pick_allocator(&present)?;
        #[cfg(unix)]
        let own_memory = module.imports().find_map(|import| match import.ty() {
            wasmi::ExternType::Memory(ty)
                if import.module() == memory::MODULE && import.name() == memory::NAME =>
            {
                Some(*ty)
            }
            _ => None,
        });
        #[cfg(not(unix))]
        let own_memory = None;
        let mut linker = Linker::new(module.engine());
        define_imports::<H>(&mut linker).map_err(|e| EngineError::Instantiate(e.to_string()))?;
        Ok(WiInstancePre {
            module: module.clone(),
            linker: Arc::new(linker),
            present,
            allocator,
            abi,
            interruptible: engine.interruptible,
            start_deadline: engine.start_deadline,
            own_memory,
            #[cfg(unix)]
            pool: engine.pool.clone(),
        })
    }

    pub(crate) fn instantiate(
        &self,
        host: H,
        limits: &InstanceLimits,
    ) -> Result<WiInstance<H>, EngineError> {
        let start_deadline = limits.start_deadline.unwrap_or(self.start_deadline);
        #[cfg_attr(not(unix), allow(unused_mut))]
        let mut memory_limit = limits.memory_pages() as usize * crate::WASM_PAGE;
        #[cfg(unix)]
        if let (Some(_), Some(pool)) = (self.own_memory, &self.pool) {
            memory_limit = memory_limit.min(pool.mapping_len());
        }
        let data = StoreData {
            host,
            memory: None,
            allocator: None,
            pending_trap: None,
            limits: StoreLimitsBuilder::new()
                .memory_size(memory_limit)
                .table_elements(limits.max_table_elements)
                .trap_on_grow_failure(false)
                .build(),
            // The start section's hostcalls check this; its fuel is a fixed budget.
            deadline: self
                .interruptible
                .then(|| RunClock::start(start_deadline))
                .flatten(),
        };
        // Declared before the store, so that it is dropped after it (the store's memory lives
        // in it).
        #[cfg(unix)]
        let mut memory_home = None;
        let mut store = Store::new(self.module.engine(), data);
        store.limiter(|data| &mut data.limits);
        if self.interruptible {
            store
                .set_fuel(fuel_for(start_deadline))
                .map_err(|e| EngineError::Instantiate(e.to_string()))?;
        }
        #[cfg_attr(not(unix), allow(unused_mut))]
        let mut own_linker = None;
        #[cfg(unix)]
        if let Some(ty) = self.own_memory {
            let (memory, mapped) =
                own_memory(&mut store, ty, limits.memory_pages(), self.pool.as_ref())
                    .map_err(|e| EngineError::Instantiate(e.to_string()))?;
            memory_home = mapped;
            let mut linker = (*self.linker).clone();
            linker
                .define(memory::MODULE, memory::NAME, memory)
                .map_err(|e| EngineError::Instantiate(e.to_string()))?;
            own_linker = Some(linker);
        }
        let instance = own_linker
            .as_ref()
            .unwrap_or(&self.linker)
            .instantiate_and_start(&mut store, &self.module)
            .map_err(|e| match e.as_trap_code() {
                Some(_) => EngineError::StartTrapped(classify(&e)),
                None => EngineError::Instantiate(e.to_string()),
            })?;
        let memory = instance
            .get_memory(&store, "memory")
            .ok_or(EngineError::MissingExport("memory"))?;
        let allocator = instance
            .get_typed_func::<i32, i32>(&store, self.allocator.name())
            .map_err(|e| EngineError::Instantiate(e.to_string()))?;
        let funcs = Callback::ALL
            .iter()
            .zip(&self.present)
            .map(|(c, present)| {
                let func = if *present {
                    instance.get_func(&store, c.name())
                } else {
                    None
                };
                // Types were checked against the ABI when linking, so the arity is the ABI's.
                func.map(|f| (f, c.params(self.abi).len()))
            })
            .collect();
        let data = store.data_mut();
        data.memory = Some(memory);
        data.allocator = Some(allocator);
        data.deadline = None;
        Ok(WiInstance {
            store,
            funcs,
            interruptible: self.interruptible,
            deadline: None,
            #[cfg(unix)]
            _memory_home: memory_home,
        })
    }
}

/// The memory a rewritten module imports, in a mapping of its own (see `memory`): a new one
/// gets its initial pages made resident in one go before wasmi fills them, and handed back
/// after; a pooled one is already resident and stays so. When the kernel refuses a mapping,
/// the memory is wasmi's usual heap buffer.
#[cfg(unix)]
fn own_memory<H>(
    store: &mut Store<StoreData<H>>,
    ty: wasmi::MemoryType,
    limit_pages: u32,
    pool: Option<&Arc<memory::MappingPool>>,
) -> Result<(Memory, Option<memory::InstanceMemory>), wasmi::Error> {
    let mut home = memory::InstanceMemory::new(ty, limit_pages, pool);
    let Some(mapping) = home.as_mut().and_then(memory::InstanceMemory::mapping) else {
        return Ok((Memory::new(&mut *store, ty)?, None));
    };
    // SAFETY: the mapping goes back to the caller with the memory, which keeps it until the
    // store is dropped; a memory that fails to be made keeps no reference to the buffer.
    let buffer = unsafe { mapping.buffer() };
    let fresh = pool.is_none();
    if fresh {
        let initial = ty.minimum().saturating_mul(WASM_PAGE as u64);
        mapping.populate(usize::try_from(initial).unwrap_or(usize::MAX));
    }
    let memory = Memory::new_static(&mut *store, ty, buffer)?;
    if fresh {
        mapping.release_zeroed(memory.data_mut(&mut *store));
    }
    Ok((memory, home))
}

pub(crate) struct WiInstance<H: 'static> {
    store: Store<StoreData<H>>,
    funcs: Vec<Option<(Func, usize)>>,
    interruptible: bool,
    deadline: Option<Duration>,
    /// Where the store's memory lives, if the module's memory was made an import. After the
    /// store, so that it is dropped after it.
    #[cfg(unix)]
    _memory_home: Option<memory::InstanceMemory>,
}

impl<H: Hostcalls> WiInstance<H> {
    /// Runs `func` in fuel slices, reading the clock between them, until it returns or its
    /// deadline passes.
    fn call_sliced(
        &mut self,
        func: Func,
        params: &[Val],
        results: &mut [Val],
    ) -> Result<(), wasmi::Error> {
        // A deadline too far to represent is no deadline.
        let deadline = self.deadline.and_then(RunClock::start);
        self.store.data_mut().deadline = deadline;
        let slice = match deadline {
            Some(_) => FUEL_SLICE,
            None => u64::MAX,
        };
        self.store.set_fuel(slice)?;
        let mut call = func.call_resumable(&mut self.store, params, results)?;
        loop {
            match call {
                ResumableCall::Finished => return Ok(()),
                ResumableCall::HostTrap(trap) => return Err(trap.into_host_error()),
                ResumableCall::OutOfFuel(rest) => {
                    let passed = self
                        .store
                        .data_mut()
                        .deadline
                        .as_mut()
                        .is_some_and(|clock| clock.passed(Instant::now()));
                    if passed {
                        return Err(wasmi::Error::from(wasmi::TrapCode::OutOfFuel));
                    }
                    // One instruction may need more than a slice (`memory.fill` and
                    // `memory.copy` cost fuel per byte): give it what it needs, or it would
                    // never run. The clock is read again when that is spent.
                    self.store.set_fuel(slice.max(rest.required_fuel()))?;
                    call = rest.resume(&mut self.store, results)?;
                }
            }
        }
    }
}

impl<H: Hostcalls> BackendInstance<H> for WiInstance<H> {
    fn has(&self, callback: Callback) -> bool {
        matches!(self.funcs.get(callback as usize), Some(Some(_)))
    }

    fn call(&mut self, callback: Callback, args: &[i32]) -> Result<Returned, Trap> {
        let Some(Some((func, arity))) = self.funcs.get(callback as usize) else {
            return Ok(Returned::Missing);
        };
        let (func, arity) = (*func, *arity);
        let mut params = [
            Val::I32(0),
            Val::I32(0),
            Val::I32(0),
            Val::I32(0),
            Val::I32(0),
            Val::I32(0),
        ];
        for (slot, arg) in params.iter_mut().zip(args) {
            *slot = Val::I32(*arg);
        }
        let mut results = [Val::I32(0)];
        let returns = usize::from(callback.result().is_some());
        let (params, results) = (
            params.get(..arity).unwrap_or(&[]),
            results.get_mut(..returns).unwrap_or(&mut []),
        );
        let outcome = match self.interruptible {
            true => self.call_sliced(func, params, results),
            false => func.call(&mut self.store, params, results),
        };
        let data = self.store.data_mut();
        data.pending_trap = None;
        data.deadline = None;
        outcome.map_err(|e| classify(&e))?;
        Ok(match results.first() {
            Some(Val::I32(v)) => Returned::Value(*v),
            _ => Returned::Nothing,
        })
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
        match self.store.data().memory {
            Some(m) => m.data_size(&self.store),
            None => 0,
        }
    }
}

/// The wasmi backend.
pub(crate) struct Wasmi;

impl Backend for Wasmi {
    type Engine = WiEngine;
    type Module = (wasmi::Module, WiEngine);
    type InstancePre<H: Hostcalls> = WiInstancePre<H>;
    // wasmi's store is large; boxing keeps every instance the size of the smallest.
    type Instance<H: Hostcalls> = Box<WiInstance<H>>;

    fn new_engine(_: EngineKind, config: &EngineConfig) -> Result<WiEngine, EngineError> {
        WiEngine::new(config)
    }

    fn compile(engine: &WiEngine, wasm: &[u8]) -> Result<Self::Module, EngineError> {
        Ok((engine.compile(wasm)?, engine.clone()))
    }

    fn link<H: Hostcalls>(
        (module, engine): &Self::Module,
        abi: AbiVersion,
    ) -> Result<WiInstancePre<H>, EngineError> {
        WiInstancePre::new(engine, module, abi)
    }

    fn instantiate<H: Hostcalls>(
        pre: &WiInstancePre<H>,
        host: H,
        limits: &InstanceLimits,
    ) -> Result<Box<WiInstance<H>>, EngineError> {
        pre.instantiate(host, limits).map(Box::new)
    }
}
