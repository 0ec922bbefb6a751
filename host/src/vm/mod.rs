//! VMs and the HTTP streams that run on them.
//!
//! The `Vm` type and its life (instantiate, start, call, contexts) are here; its other
//! methods are split by concern: `http` (HTTP streams), `l4` (TCP connections), `events`
//! (root contexts, timers, callout answers, queues, shutdown).

use crate::callout::{GrpcEvent, HttpCallOutcome};
use crate::inbox::{Pending, Wake};
use crate::metrics::CallbackStats;
use crate::state::{ContextKind, Phase, VmState};
pub(crate) use crate::stream::{Action, LocalResponse, StreamEvent};
use crate::{HeaderMap, Plugin};
use bytes::{Bytes, BytesMut};
use core::fmt;
use filterbox_abi::{BufferType, Callback, MapType, PeerType, Status};
use filterbox_engines::{Instance, Returned, Trap, TrapKind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A body callback's `StopIterationNoBuffer` (C++ SDK `FilterDataStatus`).
const STOP_ITERATION_NO_BUFFER: i32 = 3;

/// Whether a filter callback's result lets the stream go on (ABI.md §2.2). 0 does everywhere;
/// so does a header callback's 2 (`ContinueAndEndStream`, which Envoy treats as Continue) and
/// anything a metadata callback returns (Envoy ignores it). Every other value stops: 1 and the
/// C++ SDK's stop-all values 3 and 4 for headers, and 1, 2 and 3 for bodies.
fn continues(callback: Callback, value: i32) -> bool {
    match callback {
        Callback::ProxyOnRequestHeaders | Callback::ProxyOnResponseHeaders => {
            matches!(value, 0 | 2)
        }
        Callback::ProxyOnRequestMetadata | Callback::ProxyOnResponseMetadata => true,
        _ => value == 0,
    }
}

/// An HTTP stream (a stream context) on one [`Vm`]. Drive it with the `Vm::on_*` methods and
/// end it with [`Vm::finish_stream`].
#[derive(Debug)]
pub struct HttpStream {
    vm: u64,
    id: u32,
}

impl HttpStream {
    /// The stream's context id.
    pub fn context_id(&self) -> u32 {
        self.id
    }
}

/// A TCP connection (a stream context of an L4 filter) on one [`Vm`]. Drive it with the
/// `Vm::on_*_data` and `Vm::on_*_connection_close` methods and end it with
/// [`Vm::finish_connection`].
#[derive(Debug)]
pub struct Connection {
    vm: u64,
    id: u32,
}

impl Connection {
    /// The connection's context id.
    pub fn context_id(&self) -> u32 {
        self.id
    }
}

static NEXT_VM: AtomicU64 = AtomicU64::new(1);

/// One instance of a plugin with its root context, started and configured. `Send`, never
/// `Sync`. A VM of a [thread-bound](filterbox_engines::EngineKind::thread_bound) engine
/// (wasmer) must stay on the thread that made it: moved elsewhere, its callbacks fail as
/// traps and reading its state panics. A proxy makes VMs on its worker threads and runs each
/// thread's streams on them; wasmtime and wasmi VMs may also be handed between threads.
pub struct Vm {
    plugin: Plugin,
    instance: Instance<VmState>,
    serial: u64,
    root_context: u32,
    /// Root contexts added after the first ([`Vm::add_root_context`]), in order.
    extra_roots: Vec<u32>,
    next_context: u32,
    failure: Option<Trap>,
    /// The root context is gone (shut down with `proxy_on_done` / `proxy_done`).
    done: bool,
    /// Linear memory size after the last call.
    memory: usize,
    memory_high_water: usize,
    /// This VM's callback latencies (its own, so threads do not share cache lines).
    callback_stats: Arc<CallbackStats>,
    /// Per callback: calls left before the next timed one (0: time the next call).
    untimed_left: [u32; Callback::COUNT],
}

impl Drop for Vm {
    fn drop(&mut self) {
        let metrics = self.plugin.metrics();
        metrics.vm_dropped(self.memory);
        metrics.retire_callback_stats(self.callback_stats.clone());
    }
}

impl fmt::Debug for Vm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm")
            .field("plugin", &self.plugin.config().name)
            .field("root_context", &self.root_context)
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

/// A plugin instance whose code has not run yet ([`Vm::instantiate`]).
#[derive(Debug)]
pub struct UnstartedVm {
    vm: Vm,
}

impl UnstartedVm {
    /// The second half of [`Vm::new`]: runs the start function, creates the root context and
    /// calls `proxy_on_vm_start` and `proxy_on_configure` (each under the start deadline).
    pub fn start(self) -> Result<Vm, VmError> {
        let mut vm = self.vm;
        let started = vm.start();
        if let Err(VmError::Rejected { .. }) = &started {
            vm.plugin.metrics().vm_failed();
        }
        started?;
        let deadline = vm.plugin.config().limits.callback_deadline();
        vm.instance.set_deadline(deadline);
        Ok(vm)
    }
}

fn wasm_i32(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

impl Vm {
    /// Instantiates `plugin` and starts it in the reference order: start function
    /// (`_initialize` then `main`/`__main_void`, or `_start`), root context creation,
    /// `proxy_on_vm_start`, `proxy_on_configure`. A false from either is an error.
    ///
    /// Memory and table limits and the start deadline come from the plugin config's
    /// `limits`; after `proxy_on_configure` every call runs under the callback deadline.
    pub fn new(plugin: &Plugin) -> Result<Vm, VmError> {
        Vm::instantiate(plugin)?.start()
    }

    /// The first half of [`Vm::new`]: instantiates `plugin` (memory, tables, imports linked)
    /// without running any of its code. An embedder may keep instances ready and
    /// [`UnstartedVm::start`] one when it needs a VM.
    pub fn instantiate(plugin: &Plugin) -> Result<UnstartedVm, VmError> {
        let state = VmState::new(plugin.shared().clone());
        let limits = &plugin.config().limits;
        let metrics = plugin.metrics();
        let mut instance = plugin
            .instance_pre()
            .instantiate(state, &limits.instance())
            .map_err(|error| {
                metrics.vm_failed();
                VmError::Instantiate {
                    plugin: plugin.config().name.clone(),
                    engine: plugin.engine(),
                    error,
                }
            })?;
        metrics.vm_created();
        instance.set_deadline(limits.start_deadline());
        let serial = NEXT_VM.fetch_add(1, Ordering::Relaxed);
        let mut vm = Vm {
            plugin: plugin.clone(),
            instance,
            serial,
            root_context: 0,
            extra_roots: Vec::new(),
            next_context: 1,
            failure: None,
            done: false,
            memory: 0,
            memory_high_water: 0,
            callback_stats: metrics.callback_stats(),
            untimed_left: [0; Callback::COUNT],
        };
        vm.note_memory();
        Ok(UnstartedVm { vm })
    }

    fn start(&mut self) -> Result<(), VmError> {
        self.state().phase = Phase::Start;
        let started = self.run_start_function();
        self.state().phase = Phase::Other;
        started?;
        let root = self.create_context(ContextKind::Root, 0)?;
        self.root_context = root;
        self.state().root_context = root;
        let vm_config = wasm_i32(self.plugin.config().vm_configuration.len());
        self.expect_true(Callback::ProxyOnVmStart, root, &[root as i32, vm_config])?;
        let config = wasm_i32(self.plugin.config().configuration.len());
        self.state().phase = Phase::Configure;
        let configured = self.expect_true(Callback::ProxyOnConfigure, root, &[root as i32, config]);
        self.state().phase = Phase::Other;
        configured
    }

    /// Accounts for the guest's memory after a call.
    fn note_memory(&mut self) {
        let now = self.instance.memory_size();
        if now != self.memory {
            self.plugin.metrics().memory_changed(self.memory, now);
            self.memory = now;
            self.memory_high_water = self.memory_high_water.max(now);
        }
    }

    fn run_start_function(&mut self) -> Result<(), VmError> {
        if self.instance.has(Callback::Initialize) {
            self.call(0, Callback::Initialize, &[])?;
            if self.instance.has(Callback::Main) {
                self.call(0, Callback::Main, &[0, 0])?;
            } else {
                self.call(0, Callback::MainVoid, &[])?;
            }
        } else {
            self.call(0, Callback::Start, &[])?;
        }
        Ok(())
    }

    /// A missing callback counts as true, as in the reference host.
    fn expect_true(
        &mut self,
        callback: Callback,
        context: u32,
        args: &[i32],
    ) -> Result<(), VmError> {
        match self.call(context, callback, args)? {
            Returned::Value(0) => Err(VmError::Rejected {
                plugin: self.plugin.config().name.clone(),
                callback,
            }),
            _ => Ok(()),
        }
    }

    /// The plugin this VM runs.
    pub fn plugin(&self) -> &Plugin {
        &self.plugin
    }

    /// The root context's id.
    pub fn root_context_id(&self) -> u32 {
        self.root_context
    }

    /// The trap that failed this VM, if one did.
    pub fn failure(&self) -> Option<&Trap> {
        self.failure.as_ref()
    }

    /// Number of live contexts (the root and every unfinished stream).
    pub fn context_count(&self) -> usize {
        self.instance.host().contexts.len()
    }

    /// Current size of the guest's linear memory in bytes.
    pub fn memory_size(&mut self) -> usize {
        self.instance.memory_size()
    }

    /// The largest the guest's linear memory has been, in bytes.
    pub fn memory_high_water(&self) -> usize {
        self.memory_high_water
    }

    fn state(&mut self) -> &mut VmState {
        self.instance.host_mut()
    }

    fn call(
        &mut self,
        context: u32,
        callback: Callback,
        args: &[i32],
    ) -> Result<Returned, VmError> {
        if let Some(trap) = &self.failure {
            return Err(VmError::Failed {
                plugin: self.plugin.config().name.clone(),
                trap: trap.clone(),
            });
        }
        let state = self.state();
        state.current_context = context;
        state.effective_context = None;
        state.exit_code = None;
        // quanta reads the TSC where it is invariant: a few ns against clock_gettime's ~25.
        let started = self.time_this_call(callback).then(quanta::Instant::now);
        let mut outcome = self.instance.call(callback, args);
        let state = self.state();
        state.flush_output();
        if let Err(trap) = &outcome
            && trap.kind == TrapKind::Exit
            && state.exit_code == Some(0)
            && state.phase == Phase::Start
        {
            // proc_exit(0) ends a start function cleanly (Go's wasip1 runtime does that).
            outcome = Ok(Returned::Nothing);
        }
        let elapsed = started.map(|started| started.elapsed());
        self.note_memory();
        self.callback_stats.record(callback, elapsed);
        match outcome {
            Ok(returned) => {
                if std::mem::take(&mut self.state().done_requested) {
                    // proxy_done: the root context's shutdown finishes after the call.
                    self.delete_root()?;
                }
                Ok(returned)
            }
            Err(trap) => {
                let metrics = self.plugin.metrics();
                metrics.trap(trap.kind);
                metrics.vm_failed();
                self.failure = Some(trap.clone());
                Err(VmError::Trap {
                    plugin: self.plugin.config().name.clone(),
                    callback,
                    trap,
                })
            }
        }
    }

    /// Whether this call of `callback` is one the latency histogram samples.
    fn time_this_call(&mut self, callback: Callback) -> bool {
        let every = self.plugin.shared().latency_every;
        if every == 0 {
            return false;
        }
        let Some(left) = self.untimed_left.get_mut(callback as usize) else {
            return false;
        };
        if *left == 0 {
            *left = every - 1;
            true
        } else {
            *left -= 1;
            false
        }
    }

    fn create_context(&mut self, kind: ContextKind, parent: u32) -> Result<u32, VmError> {
        let id = self.next_context;
        self.next_context = self.next_context.wrapping_add(1).max(1);
        let state = self.state();
        state.contexts.insert(id, kind);
        if kind != ContextKind::Root && parent != state.root_context {
            state.stream_roots.insert(id, parent);
        }
        if let Err(e) = self.call(
            id,
            Callback::ProxyOnContextCreate,
            &[id as i32, parent as i32],
        ) {
            let state = self.state();
            state.contexts.remove(&id);
            state.stream_roots.remove(&id);
            return Err(e);
        }
        Ok(id)
    }

    fn forget_context(&mut self, id: u32) {
        let state = self.state();
        state.contexts.remove(&id);
        state.events.retain(|(context, _)| *context != id);
        // Most of these maps are empty on a stream's way out; an empty one is not even hashed
        // or scanned.
        if !state.properties.is_empty() {
            state.properties.retain(|(context, _), _| *context != id);
        }
        if !state.parked.is_empty() {
            state.parked.retain(|(context, _), _| *context != id);
        }
        if !state.added_trailers.is_empty() {
            state
                .added_trailers
                .retain(|(context, _), _| *context != id);
        }
        if !state.stream_info.is_empty() {
            state.stream_info.remove(&id);
        }
        if !state.stream_roots.is_empty() {
            state.stream_roots.remove(&id);
        }
        if !state.ticks.is_empty() {
            state.ticks.remove(&id);
        }
    }
}

mod error;
mod events;
mod http;
mod l4;

pub use error::VmError;
