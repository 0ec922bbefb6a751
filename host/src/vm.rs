//! VMs and the HTTP streams that run on them.

use crate::callout::{GrpcEvent, HttpCallOutcome};
use crate::inbox::{Pending, Wake};
use crate::metrics::CallbackStats;
use crate::state::{ContextKind, Phase, VmState};
use crate::{HeaderMap, Plugin};
use bytes::{Bytes, BytesMut};
use core::fmt;
use filterbox_abi::{BufferType, Callback, GrpcStatus, MapType, PeerType, Status, StreamType};
use filterbox_engines::{EngineError, EngineKind, Instance, Returned, Trap, TrapKind};
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

/// What the proxy must do after a stream callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Go on with the next filter or the upstream.
    Continue,
    /// Stop here: hold headers, or buffer the body and call again with more of it, until the
    /// plugin resumes the stream (see [`Vm::take_stream_events`]).
    Pause,
    /// Answer the client with this response instead.
    Respond(LocalResponse),
}

/// A response a plugin sent with `proxy_send_local_response`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    /// HTTP status code.
    pub status_code: u32,
    /// Response code details (why the plugin answered).
    pub details: String,
    /// Response body.
    pub body: Bytes,
    /// Additional headers (names lower-cased).
    pub headers: HeaderMap,
    /// gRPC status, for a gRPC response.
    pub grpc_status: Option<GrpcStatus>,
}

impl LocalResponse {
    /// A response with `status_code` and `details` and no body, headers or gRPC status: what
    /// the host (a failure policy, a limit, a proxy's own check) answers on its own.
    pub fn new(status_code: u32, details: impl Into<String>) -> Self {
        LocalResponse {
            status_code,
            details: details.into(),
            body: Bytes::new(),
            headers: HeaderMap::new(),
            grpc_status: None,
        }
    }
}

/// Something a plugin asked of a stream outside the return value of a callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// Resume a paused direction (`proxy_continue_stream`, `proxy_continue_request/response`).
    Continue(StreamType),
    /// Reset the stream (`proxy_close_stream`).
    Close(StreamType),
    /// Answer the client with this response (sent from a callback that was not the
    /// stream's own, such as an HTTP-call answer).
    Respond(LocalResponse),
    /// Recompute the route (`proxy_clear_route_cache`, ABI 0.1.0): headers that choose it
    /// changed.
    ClearRouteCache,
}

/// Why a VM could not start or a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum VmError {
    /// The module could not be instantiated (or its start section trapped).
    Instantiate {
        /// The plugin.
        plugin: String,
        /// The engine.
        engine: EngineKind,
        /// The engine's reason.
        error: EngineError,
    },
    /// `proxy_on_vm_start` or `proxy_on_configure` returned false.
    Rejected {
        /// The plugin.
        plugin: String,
        /// The callback that said no.
        callback: Callback,
    },
    /// The guest trapped; the VM is failed from now on.
    Trap {
        /// The plugin.
        plugin: String,
        /// The callback that trapped.
        callback: Callback,
        /// The trap.
        trap: Trap,
    },
    /// The VM failed earlier and runs nothing more.
    Failed {
        /// The plugin.
        plugin: String,
        /// The trap that failed it.
        trap: Trap,
    },
    /// The stream belongs to another VM.
    ForeignStream {
        /// The plugin.
        plugin: String,
    },
    /// No live root context of the VM has this id.
    UnknownRoot {
        /// The plugin.
        plugin: String,
        /// The id asked for.
        root: u32,
    },
}

impl VmError {
    /// The name of the plugin the error is about.
    pub fn plugin(&self) -> &str {
        match self {
            VmError::Instantiate { plugin, .. }
            | VmError::Rejected { plugin, .. }
            | VmError::Trap { plugin, .. }
            | VmError::Failed { plugin, .. }
            | VmError::ForeignStream { plugin }
            | VmError::UnknownRoot { plugin, .. } => plugin,
        }
    }
}

impl fmt::Display for VmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmError::Instantiate {
                plugin,
                engine,
                error,
            } => write!(f, "plugin {plugin:?} on {engine}: {error}"),
            VmError::Rejected { plugin, callback } => {
                write!(f, "plugin {plugin:?}: {} returned false", callback.name())
            }
            VmError::Trap {
                plugin,
                callback,
                trap,
            } => write!(
                f,
                "plugin {plugin:?} trapped in {}: {trap}",
                callback.name()
            ),
            VmError::Failed { plugin, trap } => {
                write!(f, "plugin {plugin:?} is failed after an earlier {trap}")
            }
            VmError::ForeignStream { plugin } => {
                write!(f, "plugin {plugin:?}: stream belongs to another VM")
            }
            VmError::UnknownRoot { plugin, root } => {
                write!(f, "plugin {plugin:?}: no root context {root}")
            }
        }
    }
}

impl std::error::Error for VmError {}

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

    /// Adds a root context whose plugin configuration is `configuration`: one plugin, one VM,
    /// several configurations (per-route configuration without a VM per route; proxy-wasm
    /// lets a VM hold several root contexts). Runs `proxy_on_context_create(id, 0)`,
    /// `proxy_on_vm_start` and `proxy_on_configure` on it, as for the first root; a false from
    /// either, or a trap, is an error and the root is gone. Streams made with
    /// [`Vm::create_http_stream_under`] run under it and read its configuration; its timer
    /// (`proxy_set_tick_period_milliseconds`) and the callouts, queues and properties of its
    /// streams are its own.
    pub fn add_root_context(&mut self, configuration: Bytes) -> Result<u32, VmError> {
        let root = self.create_context(ContextKind::Root, 0)?;
        let vm_config = wasm_i32(self.plugin.config().vm_configuration.len());
        let started = self.expect_true(Callback::ProxyOnVmStart, root, &[root as i32, vm_config]);
        let configured = started.and_then(|()| {
            let len = wasm_i32(configuration.len());
            let state = self.state();
            state.configuring = Some(configuration);
            state.phase = Phase::Configure;
            let configured =
                self.expect_true(Callback::ProxyOnConfigure, root, &[root as i32, len]);
            let state = self.state();
            state.configuring = None;
            state.phase = Phase::Other;
            configured
        });
        match configured {
            Ok(()) => {
                self.extra_roots.push(root);
                Ok(root)
            }
            Err(error) => {
                self.forget_context(root);
                Err(error)
            }
        }
    }

    /// The root contexts added with [`Vm::add_root_context`], in order.
    pub fn extra_root_contexts(&self) -> &[u32] {
        &self.extra_roots
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
        let started = self
            .plugin
            .shared()
            .callback_latency
            .then(quanta::Instant::now);
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

    /// Creates an HTTP stream context (`proxy_on_context_create(id, root)`).
    pub fn create_http_stream(&mut self) -> Result<HttpStream, VmError> {
        self.create_http_stream_under(self.root_context)
    }

    /// Creates an HTTP stream context under root context `root` (the first root, or one
    /// from [`Vm::add_root_context`]).
    pub fn create_http_stream_under(&mut self, root: u32) -> Result<HttpStream, VmError> {
        if root != self.root_context && !self.extra_roots.contains(&root) {
            return Err(VmError::UnknownRoot {
                plugin: self.plugin.config().name.clone(),
                root,
            });
        }
        let id = self.create_context(ContextKind::Http, root)?;
        if self.plugin.shared().reads_properties {
            let info = crate::attributes::StreamInfo {
                started: Some(std::time::SystemTime::now()),
                request_headers: None,
                connection: None,
            };
            self.state().stream_info.insert(id, info);
        }
        Ok(HttpStream {
            vm: self.serial,
            id,
        })
    }

    fn check(&self, stream: &HttpStream) -> Result<(), VmError> {
        self.check_serial(stream.vm)
    }

    fn check_serial(&self, vm: u64) -> Result<(), VmError> {
        if vm == self.serial {
            Ok(())
        } else {
            Err(VmError::ForeignStream {
                plugin: self.plugin.config().name.clone(),
            })
        }
    }

    /// Hands `headers` to the plugin for the length of `f`, then takes them back (also when
    /// the guest traps).
    fn with_map<R>(
        &mut self,
        map: MapType,
        headers: &mut HeaderMap,
        f: impl FnOnce(&mut Self) -> R,
    ) -> R {
        self.state().maps[map as usize] = Some(std::mem::take(headers));
        let result = f(self);
        *headers = self.state().maps[map as usize].take().unwrap_or_default();
        result
    }

    fn with_body<R>(
        &mut self,
        kind: BufferType,
        body: &mut BytesMut,
        f: impl FnOnce(&mut Self) -> R,
    ) -> R {
        self.state().body = Some((kind, std::mem::take(body)));
        let result = f(self);
        *body = self.state().body.take().map(|(_, b)| b).unwrap_or_default();
        result
    }

    /// Calls a filter callback and turns its result into an [`Action`]: a local response sent
    /// during the call wins; 0 (or a missing export) continues; anything else pauses.
    fn filter_call(
        &mut self,
        stream: &HttpStream,
        callback: Callback,
        args: &[i32],
    ) -> Result<Action, VmError> {
        self.filter_call_on((stream.vm, stream.id), callback, args)
    }

    fn filter_call_on(
        &mut self,
        on: (u64, u32),
        callback: Callback,
        args: &[i32],
    ) -> Result<Action, VmError> {
        self.filter_call_returning(on, callback, args)
            .map(|(action, _)| action)
    }

    /// [`Vm::filter_call_on`], with the value the callback returned (if it returned one).
    fn filter_call_returning(
        &mut self,
        (vm, id): (u64, u32),
        callback: Callback,
        args: &[i32],
    ) -> Result<(Action, Option<i32>), VmError> {
        self.check_serial(vm)?;
        self.state().local_response = None;
        let before = self.state().events.len();
        let returned = self.call(id, callback, args);
        // A stream the callback closed is reset whatever the callback returns (as in
        // Envoy): it pauses here, and its `Close` event tells the embedder to reset it.
        let closed = self.state().events.get(before..).is_some_and(|new| {
            new.iter()
                .any(|(c, e)| *c == id && matches!(e, StreamEvent::Close(_)))
        });
        let local = match self.state().local_response.take() {
            Some((context, response)) if context == id => Some(response),
            Some((context, response)) => {
                // Sent for another stream (through proxy_set_effective_context).
                let events = &mut self.state().events;
                events.push((context, StreamEvent::Respond(response)));
                None
            }
            None => None,
        };
        let returned = returned?;
        let action = match (local, returned) {
            (Some(response), _) => Action::Respond(response),
            (None, _) if closed => Action::Pause,
            (None, Returned::Missing | Returned::Nothing) => Action::Continue,
            (None, Returned::Value(value)) if continues(callback, value) => Action::Continue,
            (None, Returned::Value(_)) => Action::Pause,
        };
        let value = match returned {
            Returned::Value(value) => Some(value),
            Returned::Missing | Returned::Nothing => None,
        };
        Ok((action, value))
    }

    fn headers_call(
        &mut self,
        stream: &HttpStream,
        (map, callback): (MapType, Callback),
        headers: &mut HeaderMap,
        end_of_stream: bool,
    ) -> Result<Action, VmError> {
        // ABI 0.1.0 header callbacks take no end_of_stream; the engine passes only as many
        // arguments as the export has.
        let args = [
            stream.id as i32,
            wasm_i32(headers.len()),
            i32::from(end_of_stream),
        ];
        let action = self.with_map(map, headers, |vm| vm.filter_call(stream, callback, &args))?;
        let state = self.state();
        if map == MapType::HttpRequestHeaders
            && let Some(info) = state.stream_info.get_mut(&stream.id)
        {
            // For request.* attributes in later callbacks.
            info.request_headers = Some(headers.clone());
        }
        let parked = &mut state.parked;
        match action {
            Action::Pause => parked.insert((stream.id, map), headers.clone()),
            _ => parked.remove(&(stream.id, map)),
        };
        Ok(action)
    }

    /// Trailers the plugin added to a message that had none, from its body callback with
    /// `end_of_stream` (`map` is [`MapType::HttpRequestTrailers`] or
    /// [`MapType::HttpResponseTrailers`]). Send them after the body; `None` if it added none.
    pub fn take_added_trailers(&mut self, stream: &HttpStream, map: MapType) -> Option<HeaderMap> {
        self.state().added_trailers.remove(&(stream.id, map))
    }

    /// The headers of `stream` as the plugin left them after pausing in a header callback:
    /// a plugin that resumes from a later callback (an HTTP-call answer, a tick) may have
    /// changed them since. Take them when the stream is resumed; `None` if the stream did not
    /// pause on `map`.
    pub fn take_paused_headers(&mut self, stream: &HttpStream, map: MapType) -> Option<HeaderMap> {
        self.state().parked.remove(&(stream.id, map))
    }

    fn body_call(
        &mut self,
        stream: &HttpStream,
        (kind, callback): (BufferType, Callback),
        body: &mut BytesMut,
        end_of_stream: bool,
    ) -> Result<Action, VmError> {
        let args = [
            stream.id as i32,
            wasm_i32(body.len()),
            i32::from(end_of_stream),
        ];
        let on = (stream.vm, stream.id);
        let call = |vm: &mut Self, body: &mut BytesMut| {
            vm.with_body(kind, body, |vm| {
                vm.filter_call_returning(on, callback, &args)
            })
        };
        let (action, value) = match end_of_stream {
            // The last body callback of a message may add trailers it did not have (Envoy's
            // addDecodedTrailers/addEncodedTrailers): the plugin gets an empty map to fill.
            true => {
                let map = match kind {
                    BufferType::HttpRequestBody => MapType::HttpRequestTrailers,
                    _ => MapType::HttpResponseTrailers,
                };
                let mut added = HeaderMap::new();
                let result = self.with_map(map, &mut added, |vm| call(vm, body));
                if !added.is_empty() {
                    self.state().added_trailers.insert((stream.id, map), added);
                }
                result?
            }
            false => call(self, body)?,
        };
        if action == Action::Pause && value == Some(STOP_ITERATION_NO_BUFFER) {
            // The plugin took what it was given: nothing is kept for its next call, which
            // sees only new data (Envoy's StopIterationNoBuffer).
            body.clear();
        }
        Ok(action)
    }

    fn trailers_call(
        &mut self,
        stream: &HttpStream,
        (map, callback): (MapType, Callback),
        trailers: &mut HeaderMap,
    ) -> Result<Action, VmError> {
        let args = [stream.id as i32, wasm_i32(trailers.len())];
        self.with_map(map, trailers, |vm| vm.filter_call(stream, callback, &args))
    }

    /// Request headers arrived (`proxy_on_request_headers`). The plugin may change `headers`.
    pub fn on_request_headers(
        &mut self,
        stream: &HttpStream,
        headers: &mut HeaderMap,
        end_of_stream: bool,
    ) -> Result<Action, VmError> {
        let phase = (MapType::HttpRequestHeaders, Callback::ProxyOnRequestHeaders);
        self.headers_call(stream, phase, headers, end_of_stream)
    }

    /// Request body data arrived (`proxy_on_request_body`). `body` is everything buffered so
    /// far; the plugin may change it. [`Action::Pause`] asks the proxy to buffer and call again.
    pub fn on_request_body(
        &mut self,
        stream: &HttpStream,
        body: &mut BytesMut,
        end_of_stream: bool,
    ) -> Result<Action, VmError> {
        let phase = (BufferType::HttpRequestBody, Callback::ProxyOnRequestBody);
        self.body_call(stream, phase, body, end_of_stream)
    }

    /// Request trailers arrived (`proxy_on_request_trailers`).
    pub fn on_request_trailers(
        &mut self,
        stream: &HttpStream,
        trailers: &mut HeaderMap,
    ) -> Result<Action, VmError> {
        let phase = (
            MapType::HttpRequestTrailers,
            Callback::ProxyOnRequestTrailers,
        );
        self.trailers_call(stream, phase, trailers)
    }

    /// Response headers arrived (`proxy_on_response_headers`).
    pub fn on_response_headers(
        &mut self,
        stream: &HttpStream,
        headers: &mut HeaderMap,
        end_of_stream: bool,
    ) -> Result<Action, VmError> {
        let phase = (
            MapType::HttpResponseHeaders,
            Callback::ProxyOnResponseHeaders,
        );
        self.headers_call(stream, phase, headers, end_of_stream)
    }

    /// Response body data arrived (`proxy_on_response_body`).
    pub fn on_response_body(
        &mut self,
        stream: &HttpStream,
        body: &mut BytesMut,
        end_of_stream: bool,
    ) -> Result<Action, VmError> {
        let phase = (BufferType::HttpResponseBody, Callback::ProxyOnResponseBody);
        self.body_call(stream, phase, body, end_of_stream)
    }

    /// Response trailers arrived (`proxy_on_response_trailers`).
    pub fn on_response_trailers(
        &mut self,
        stream: &HttpStream,
        trailers: &mut HeaderMap,
    ) -> Result<Action, VmError> {
        let phase = (
            MapType::HttpResponseTrailers,
            Callback::ProxyOnResponseTrailers,
        );
        self.trailers_call(stream, phase, trailers)
    }

    /// The exchange is complete (`proxy_on_log`): the plugin may read, not change, the
    /// request and response headers.
    pub fn on_log(
        &mut self,
        stream: &HttpStream,
        request_headers: &mut HeaderMap,
        response_headers: &mut HeaderMap,
    ) -> Result<(), VmError> {
        self.check(stream)?;
        self.state().phase = Phase::Log;
        let result = self.with_map(MapType::HttpRequestHeaders, request_headers, |vm| {
            vm.with_map(MapType::HttpResponseHeaders, response_headers, |vm| {
                vm.call(stream.id, Callback::ProxyOnLog, &[stream.id as i32])
            })
        });
        self.state().phase = Phase::Other;
        result.map(drop)
    }

    /// Ends a stream: `proxy_on_done` then `proxy_on_delete`, and forgets its context. On a
    /// failed VM nothing runs and the context is still forgotten.
    pub fn finish_stream(&mut self, stream: HttpStream) -> Result<(), VmError> {
        self.check(&stream)?;
        let id = stream.id;
        let result = match self.failure {
            Some(_) => Ok(()),
            None => self
                .call(id, Callback::ProxyOnDone, &[id as i32])
                .and_then(|_| self.call(id, Callback::ProxyOnDelete, &[id as i32]))
                .map(drop),
        };
        self.forget_context(id);
        result
    }

    fn forget_context(&mut self, id: u32) {
        let state = self.state();
        state.contexts.remove(&id);
        state.events.retain(|(context, _)| *context != id);
        state.properties.retain(|(context, _), _| *context != id);
        state.parked.retain(|(context, _), _| *context != id);
        state
            .added_trailers
            .retain(|(context, _), _| *context != id);
        state.stream_info.remove(&id);
        state.stream_roots.remove(&id);
        state.ticks.remove(&id);
    }

    /// Sets a property of `stream` that `proxy_get_property` answers with `value` (see
    /// [`PropertyValue`](crate::PropertyValue) for Envoy's encodings): how an embedder supplies
    /// per-stream attributes such as `source.address`, `connection.id` or
    /// `request.protocol`. A plugin's own `proxy_set_property` writes the same place.
    pub fn set_stream_property(&mut self, stream: &HttpStream, path: &[&str], value: Bytes) {
        let path = filterbox_abi::property_path::encode(path);
        self.state().properties.insert((stream.id, path), value);
    }

    /// The client connection `stream`'s request came on: its attributes (`source.address`
    /// and the rest, see [`ConnectionInfo`](crate::ConnectionInfo)) answer the plugin's
    /// `proxy_get_property`, encoded only when asked. Nothing is kept for a plugin that does
    /// not import `proxy_get_property`.
    pub fn set_stream_connection(
        &mut self,
        stream: &HttpStream,
        connection: std::sync::Arc<crate::ConnectionInfo>,
    ) {
        if let Some(info) = self.state().stream_info.get_mut(&stream.id) {
            info.connection = Some(connection);
        }
    }

    /// A property set on `stream` by the plugin (`proxy_set_property`, Envoy's filter state
    /// through `set_envoy_filter_state`: path `["filter_state", key]`) or by the embedder;
    /// how an embedder reads what a plugin left for the access log or the next filter.
    pub fn stream_property(&mut self, stream: &HttpStream, path: &[&str]) -> Option<Bytes> {
        let path = filterbox_abi::property_path::encode(path);
        self.state().properties.get(&(stream.id, path)).cloned()
    }

    /// Sets a property every context of this VM sees unless a stream sets its own (node
    /// metadata, cluster and listener names).
    pub fn set_root_property(&mut self, path: &[&str], value: Bytes) {
        let path = filterbox_abi::property_path::encode(path);
        let root = self.root_context;
        self.state().properties.insert((root, path), value);
    }

    /// Takes what the plugin asked of `stream` (resume, close) since the last call.
    pub fn take_stream_events(&mut self, stream: &HttpStream) -> Vec<StreamEvent> {
        let events = &mut self.state().events;
        let mut taken = Vec::new();
        events.retain(|(context, event)| {
            let mine = *context == stream.id;
            if mine {
                taken.push(event.clone());
            }
            !mine
        });
        taken
    }

    /// Whether the plugin asked anything of `stream` that [`Vm::take_stream_events`] would
    /// take, without taking it.
    pub fn has_stream_events(&mut self, stream: &HttpStream) -> bool {
        self.state()
            .events
            .iter()
            .any(|(context, _)| *context == stream.id)
    }

    /// Request metadata arrived (`proxy_on_request_metadata`, ABI 0.1.0 era; there is no map
    /// type to read it through, so the plugin gets only the count).
    pub fn on_request_metadata(
        &mut self,
        stream: &HttpStream,
        elements: usize,
    ) -> Result<Action, VmError> {
        let args = [stream.id as i32, wasm_i32(elements)];
        self.filter_call(stream, Callback::ProxyOnRequestMetadata, &args)
    }

    /// Response metadata arrived (`proxy_on_response_metadata`; see
    /// [`Vm::on_request_metadata`]).
    pub fn on_response_metadata(
        &mut self,
        stream: &HttpStream,
        elements: usize,
    ) -> Result<Action, VmError> {
        let args = [stream.id as i32, wasm_i32(elements)];
        self.filter_call(stream, Callback::ProxyOnResponseMetadata, &args)
    }

    // --- L4 connections ---

    /// Opens a TCP connection context: `proxy_on_context_create(id, root)` then
    /// `proxy_on_new_connection`. A plugin that answers pause holds the connection until it
    /// resumes it.
    pub fn create_connection(&mut self) -> Result<(Connection, Action), VmError> {
        let id = self.create_context(ContextKind::Tcp, self.root_context)?;
        let connection = Connection {
            vm: self.serial,
            id,
        };
        let action = self.filter_call_on(
            (self.serial, id),
            Callback::ProxyOnNewConnection,
            &[id as i32],
        );
        Ok((connection, action?))
    }

    fn data_call(
        &mut self,
        connection: &Connection,
        (kind, callback): (BufferType, Callback),
        data: &mut BytesMut,
        end_of_stream: bool,
    ) -> Result<Action, VmError> {
        let args = [
            connection.id as i32,
            wasm_i32(data.len()),
            i32::from(end_of_stream),
        ];
        let on = (connection.vm, connection.id);
        self.with_body(kind, data, |vm| vm.filter_call_on(on, callback, &args))
    }

    /// Bytes from the client (`proxy_on_downstream_data`): `data` is everything not yet
    /// forwarded; the plugin may change it.
    pub fn on_downstream_data(
        &mut self,
        connection: &Connection,
        data: &mut BytesMut,
        end_of_stream: bool,
    ) -> Result<Action, VmError> {
        let phase = (BufferType::DownstreamData, Callback::ProxyOnDownstreamData);
        self.data_call(connection, phase, data, end_of_stream)
    }

    /// Bytes from the upstream (`proxy_on_upstream_data`).
    pub fn on_upstream_data(
        &mut self,
        connection: &Connection,
        data: &mut BytesMut,
        end_of_stream: bool,
    ) -> Result<Action, VmError> {
        let phase = (BufferType::UpstreamData, Callback::ProxyOnUpstreamData);
        self.data_call(connection, phase, data, end_of_stream)
    }

    /// The client side closed (`proxy_on_downstream_connection_close`).
    pub fn on_downstream_connection_close(
        &mut self,
        connection: &Connection,
        peer: PeerType,
    ) -> Result<(), VmError> {
        self.close_call(connection, Callback::ProxyOnDownstreamConnectionClose, peer)
    }

    /// The upstream side closed (`proxy_on_upstream_connection_close`).
    pub fn on_upstream_connection_close(
        &mut self,
        connection: &Connection,
        peer: PeerType,
    ) -> Result<(), VmError> {
        self.close_call(connection, Callback::ProxyOnUpstreamConnectionClose, peer)
    }

    fn close_call(
        &mut self,
        connection: &Connection,
        callback: Callback,
        peer: PeerType,
    ) -> Result<(), VmError> {
        self.check_serial(connection.vm)?;
        let args = [connection.id as i32, peer.as_u32() as i32];
        self.call(connection.id, callback, &args).map(drop)
    }

    /// Ends a connection: `proxy_on_done`, `proxy_on_delete`, and forgets its context.
    pub fn finish_connection(&mut self, connection: Connection) -> Result<(), VmError> {
        self.finish_stream(HttpStream {
            vm: connection.vm,
            id: connection.id,
        })
    }

    /// Takes what the plugin asked of `connection` (resume, close) since the last call.
    pub fn take_connection_events(&mut self, connection: &Connection) -> Vec<StreamEvent> {
        self.take_stream_events(&HttpStream {
            vm: connection.vm,
            id: connection.id,
        })
    }

    // --- timers and asynchronous events ---

    /// The tick period the plugin set (`proxy_set_tick_period_milliseconds`), if any.
    pub fn tick_period(&self) -> Option<Duration> {
        let state = self.instance.host();
        state
            .ticks
            .get(&self.root_context)
            .map(|(period, _)| *period)
    }

    /// When the next `proxy_on_tick` is due (of any root context), if the plugin set a period.
    pub fn next_tick(&self) -> Option<Instant> {
        self.instance
            .host()
            .ticks
            .values()
            .map(|(_, next)| *next)
            .min()
    }

    /// Calls `proxy_on_tick` on the root context now and schedules the next tick one period
    /// from now. For an embedder that drives the timer by hand.
    ///
    /// The next tick also waits long enough to hold the plugin's ticks to
    /// [`Limits::max_tick_cpu_percent`](crate::Limits) of a core.
    pub fn on_tick(&mut self) -> Result<(), VmError> {
        self.tick_root(self.root_context)
    }

    /// `proxy_on_tick` on `root` now; its next tick one period (or the CPU budget) later.
    fn tick_root(&mut self, root: u32) -> Result<(), VmError> {
        let started = Instant::now();
        if let Some((period, next)) = self.state().ticks.get_mut(&root) {
            *next = started + *period;
        }
        let called = self.call(root, Callback::ProxyOnTick, &[root as i32]);
        let percent = u64::from(
            self.plugin
                .config()
                .limits
                .max_tick_cpu_percent
                .clamp(1, 100),
        );
        let ran = started.elapsed();
        // Busy for `ran`, then idle for ran × (100 − p) / p: the ticks use p% of a core.
        let idle = ran.saturating_mul(u32::try_from(100 - percent).unwrap_or(0))
            / u32::try_from(percent).unwrap_or(1);
        if let Some((_, next)) = self.state().ticks.get_mut(&root) {
            let earliest = started + ran + idle;
            if earliest > *next {
                *next = earliest;
                self.plugin.metrics().tick_postponed();
            }
        }
        called.map(drop)
    }

    /// Whether events wait for [`Vm::dispatch_pending`].
    pub fn has_pending(&self) -> bool {
        !self.instance.host().inbox.is_empty()
    }

    /// Calls `wake` (on the producing thread) whenever an event arrives for this VM: a queue
    /// it registered got a message, or a callout answered. The embedder then has its thread
    /// call [`Vm::dispatch_pending`].
    pub fn set_wake(&mut self, wake: Option<Wake>) {
        self.state().inbox.set_wake(wake);
    }

    /// Delivers what waits for this VM, in arrival order: `proxy_on_queue_ready` for queue
    /// messages, `proxy_on_http_call_response` for HTTP calls, the `proxy_on_grpc_*` callbacks
    /// for gRPC calls and streams. Answers to calls the plugin cancelled, and events for
    /// contexts that are gone, are dropped. Returns how many callbacks ran.
    pub fn dispatch_pending(&mut self) -> Result<usize, VmError> {
        let events = self.state().inbox.take();
        let mut ran = 0;
        for event in events {
            if self.deliver(event)? {
                ran += 1;
            }
        }
        Ok(ran)
    }

    /// Runs what is due at `now`: pending events, then the tick if its time has come.
    pub fn run_due(&mut self, now: Instant) -> Result<usize, VmError> {
        let mut ran = self.dispatch_pending()?;
        let due: Vec<u32> = match self.next_tick() {
            Some(next) if next <= now => {
                let mut due: Vec<u32> = (self.state().ticks.iter())
                    .filter(|(_, (_, next))| *next <= now)
                    .map(|(root, _)| *root)
                    .collect();
                due.sort_unstable();
                due
            }
            _ => Vec::new(),
        };
        for root in due {
            self.tick_root(root)?;
            ran += 1;
        }
        Ok(ran)
    }

    /// Blocks the thread until an event waits, the next tick is due, or `timeout` passes;
    /// then runs what is due ([`Vm::run_due`]).
    pub fn wait_and_run(&mut self, timeout: Duration) -> Result<usize, VmError> {
        let mut until = Instant::now() + timeout;
        if let Some(tick) = self.next_tick() {
            until = until.min(tick);
        }
        let inbox = self.state().inbox.clone();
        inbox.wait(until);
        self.run_due(Instant::now())
    }

    /// Waits (on tokio) until an event waits or the next tick is due, then runs what is due.
    /// A worker task loops on it beside its streams; it never returns `Ok(0)` forever: with
    /// nothing scheduled it waits for an event.
    #[cfg(feature = "tokio")]
    pub async fn wait_and_run_async(&mut self) -> Result<usize, VmError> {
        let inbox = self.state().inbox.clone();
        inbox.wait_async(self.next_tick()).await;
        self.run_due(Instant::now())
    }

    /// Asks the plugin to shut its root context down (`proxy_on_done`). `Ok(true)`: it is
    /// gone (`proxy_on_delete` ran). `Ok(false)`: the plugin asked to finish first and will
    /// call `proxy_done` from a later callback; [`Vm::is_done`] tells when.
    ///
    /// Root contexts added with [`Vm::add_root_context`] go first: `proxy_on_done` then
    /// `proxy_on_delete` each, without waiting for a `proxy_done` (only the first root
    /// context's shutdown may be finished later).
    pub fn shutdown(&mut self) -> Result<bool, VmError> {
        if self.done {
            return Ok(true);
        }
        for root in std::mem::take(&mut self.extra_roots) {
            let done = self.call(root, Callback::ProxyOnDone, &[root as i32]);
            let deleted = self.call(root, Callback::ProxyOnDelete, &[root as i32]);
            self.forget_context(root);
            done.and(deleted)?;
        }
        let root = self.root_context;
        match self.call(root, Callback::ProxyOnDone, &[root as i32])? {
            Returned::Value(0) if !self.done => {
                self.state().done_pending = true;
                Ok(false)
            }
            _ => {
                if !self.done {
                    self.delete_root()?;
                }
                Ok(true)
            }
        }
    }

    /// Asks the plugin whether `configuration` would be acceptable
    /// (`proxy_validate_configuration`), without applying it: during the call the plugin
    /// configuration buffer reads `configuration`. A plugin without the export accepts
    /// everything, as in the reference host.
    pub fn validate_configuration(&mut self, configuration: &[u8]) -> Result<bool, VmError> {
        let root = self.root_context;
        let state = self.state();
        state.configuring = Some(Bytes::copy_from_slice(configuration));
        state.phase = Phase::Configure;
        let args = [root as i32, wasm_i32(configuration.len())];
        let result = self.call(root, Callback::ProxyValidateConfiguration, &args);
        let state = self.state();
        state.configuring = None;
        state.phase = Phase::Other;
        Ok(!matches!(result?, Returned::Value(0)))
    }

    /// [`Vm::shutdown`], and for a plugin that asks to finish first, its events delivered
    /// until it calls `proxy_done` or `grace` passes. Returns whether the root context is gone.
    pub fn shutdown_within(&mut self, grace: Duration) -> Result<bool, VmError> {
        if self.shutdown()? {
            return Ok(true);
        }
        let until = Instant::now() + grace;
        while !self.done && Instant::now() < until {
            self.wait_and_run(until.saturating_duration_since(Instant::now()))?;
        }
        Ok(self.done)
    }

    /// Whether the root context has been shut down.
    pub fn is_done(&self) -> bool {
        self.done
    }

    fn delete_root(&mut self) -> Result<(), VmError> {
        self.done = true;
        self.state().done_pending = false;
        let root = self.root_context;
        let result = self.call(root, Callback::ProxyOnDelete, &[root as i32]);
        self.forget_context(root);
        result.map(drop)
    }

    /// Calls `proxy_on_foreign_function(root, function_id, size)` with `args` readable as the
    /// call-data buffer: how an embedder's extension calls back into a plugin.
    pub fn on_foreign_function(&mut self, function_id: u32, args: &[u8]) -> Result<(), VmError> {
        let root = self.root_context;
        let mut data = BytesMut::from(args);
        let call_args = [root as i32, function_id as i32, wasm_i32(args.len())];
        self.with_body(BufferType::CallData, &mut data, |vm| {
            vm.call(root, Callback::ProxyOnForeignFunction, &call_args)
        })
        .map(drop)
    }

    /// Delivers one event; false if it was dropped. A local response the plugin sent from
    /// it becomes a [`StreamEvent::Respond`] of its stream.
    fn deliver(&mut self, event: Pending) -> Result<bool, VmError> {
        self.state().local_response = None;
        let before = self.state().events.len();
        let delivered = self.deliver_event(event);
        let state = self.state();
        if let Some((context, response)) = state.local_response.take() {
            // The local response wins over a resume of the same stream in the same callback
            // (`send_http_response` then `resume_http_request`), as in Envoy.
            let mut added = state.events.split_off(before.min(state.events.len()));
            added.retain(|(c, e)| !(*c == context && matches!(e, StreamEvent::Continue(_))));
            state.events.extend(added);
            state.events.push((context, StreamEvent::Respond(response)));
        }
        delivered
    }

    fn deliver_event(&mut self, event: Pending) -> Result<bool, VmError> {
        match event {
            Pending::QueueReady { root, token } => {
                if !self.state().contexts.contains_key(&root) {
                    return Ok(false);
                }
                let args = [root as i32, token as i32];
                self.call(root, Callback::ProxyOnQueueReady, &args)?;
            }
            // The claim is given back once the callback has run.
            Pending::HttpResponse {
                token,
                outcome,
                claim: _claim,
            } => {
                let Some(root) = self.state().http_calls.remove(&token) else {
                    return Ok(false);
                };
                self.deliver_http(root, token, outcome)?;
            }
            Pending::Grpc {
                token,
                event,
                claim: _claim,
            } => return self.deliver_grpc(token, event),
        }
        Ok(true)
    }

    fn deliver_http(
        &mut self,
        root: u32,
        token: u32,
        outcome: HttpCallOutcome,
    ) -> Result<(), VmError> {
        let limits = &self.plugin.config().limits;
        let fits = |m: &HeaderMap| m.len() <= limits.max_header_count;
        let outcome = match outcome {
            HttpCallOutcome::Response(r)
                if r.body.len() > limits.max_body_bytes
                    || !fits(&r.headers)
                    || !fits(&r.trailers) =>
            {
                HttpCallOutcome::Failed("response too large".into())
            }
            other => other,
        };
        match outcome {
            HttpCallOutcome::Response(response) => {
                let args = [
                    root as i32,
                    token as i32,
                    wasm_i32(response.headers.len()),
                    wasm_i32(response.body.len()),
                    wasm_i32(response.trailers.len()),
                ];
                let state = self.state();
                state.maps[MapType::HttpCallResponseHeaders as usize] = Some(response.headers);
                state.maps[MapType::HttpCallResponseTrailers as usize] = Some(response.trailers);
                state.body = Some((
                    BufferType::HttpCallResponseBody,
                    BytesMut::from(&response.body[..]),
                ));
                let result = self.call(root, Callback::ProxyOnHttpCallResponse, &args);
                let state = self.state();
                state.maps[MapType::HttpCallResponseHeaders as usize] = None;
                state.maps[MapType::HttpCallResponseTrailers as usize] = None;
                state.body = None;
                result.map(drop)
            }
            HttpCallOutcome::Failed(message) => {
                // Envoy's failure: no headers, and proxy_get_status says why.
                let status = (Status::BrokenConnection.as_u32(), Bytes::from(message));
                self.with_status(status, |vm| {
                    let args = [root as i32, token as i32, 0, 0, 0];
                    vm.call(root, Callback::ProxyOnHttpCallResponse, &args)
                })
            }
        }
    }

    fn with_status(
        &mut self,
        status: (u32, Bytes),
        f: impl FnOnce(&mut Self) -> Result<Returned, VmError>,
    ) -> Result<(), VmError> {
        self.state().status = status;
        let result = f(self);
        self.state().status = (0, Bytes::new());
        result.map(drop)
    }

    fn metadata_call(
        &mut self,
        root: u32,
        (map, callback): (MapType, Callback),
        metadata: &mut HeaderMap,
        args: &[i32],
    ) -> Result<Returned, VmError> {
        self.with_map(map, metadata, |vm| vm.call(root, callback, args))
    }

    fn deliver_grpc(&mut self, token: u32, event: GrpcEvent) -> Result<bool, VmError> {
        let Some(open) = self.state().grpc.get_mut(&token) else {
            return Ok(false);
        };
        let (root, unary) = (open.root, open.unary);
        let t = token as i32;
        match event {
            // A unary call hears one callback: the message on success, the close otherwise
            // (as Envoy's async request client).
            GrpcEvent::InitialMetadata(_) | GrpcEvent::TrailingMetadata(_) if unary => {
                return Ok(false);
            }
            GrpcEvent::Message(message) if unary => {
                open.message = Some(message);
                return Ok(false);
            }
            GrpcEvent::InitialMetadata(mut map) => {
                let args = [root as i32, t, wasm_i32(map.len())];
                let phase = (
                    MapType::GrpcReceiveInitialMetadata,
                    Callback::ProxyOnGrpcReceiveInitialMetadata,
                );
                self.metadata_call(root, phase, &mut map, &args)?;
            }
            GrpcEvent::TrailingMetadata(mut map) => {
                let args = [root as i32, t, wasm_i32(map.len())];
                let phase = (
                    MapType::GrpcReceiveTrailingMetadata,
                    Callback::ProxyOnGrpcReceiveTrailingMetadata,
                );
                self.metadata_call(root, phase, &mut map, &args)?;
            }
            GrpcEvent::Message(message) => {
                let args = [root as i32, t, wasm_i32(message.len())];
                let mut body = BytesMut::from(&message[..]);
                self.with_body(BufferType::GrpcReceiveBuffer, &mut body, |vm| {
                    vm.call(root, Callback::ProxyOnGrpcReceive, &args)
                })?;
            }
            GrpcEvent::Close { status, message } => {
                let open = self.state().grpc.remove(&token);
                match open.and_then(|o| o.message) {
                    Some(response) if unary && status == 0 => {
                        let args = [root as i32, t, wasm_i32(response.len())];
                        let mut body = BytesMut::from(&response[..]);
                        self.with_body(BufferType::GrpcReceiveBuffer, &mut body, |vm| {
                            vm.call(root, Callback::ProxyOnGrpcReceive, &args)
                        })?;
                    }
                    _ => {
                        let status_pair = (status, Bytes::from(message));
                        self.with_status(status_pair, |vm| {
                            let args = [root as i32, t, status as i32];
                            vm.call(root, Callback::ProxyOnGrpcClose, &args)
                        })?;
                    }
                }
            }
        }
        Ok(true)
    }
}
