//! VMs and the HTTP streams that run on them.

use crate::state::{ContextKind, Phase, VmState};
use crate::{HeaderMap, Plugin};
use bytes::{Bytes, BytesMut};
use core::fmt;
use filterbox_abi::{BufferType, Callback, GrpcStatus, MapType, StreamType};
use filterbox_engines::{EngineError, EngineKind, Instance, Returned, Trap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

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

/// Something a plugin asked of a stream outside the return value of a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEvent {
    /// Resume a paused direction (`proxy_continue_stream`, `proxy_continue_request/response`).
    Continue(StreamType),
    /// Reset the stream (`proxy_close_stream`).
    Close(StreamType),
}

/// Why a VM could not start or a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
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

static NEXT_VM: AtomicU64 = AtomicU64::new(1);

/// One instance of a plugin with its root context, started and configured. `Send`, not `Sync`:
/// a proxy keeps one per worker thread and runs that thread's streams on it.
pub struct Vm {
    plugin: Plugin,
    instance: Instance<VmState>,
    serial: u64,
    root_context: u32,
    next_context: u32,
    failure: Option<Trap>,
    /// Linear memory size after the last call.
    memory: usize,
    memory_high_water: usize,
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.plugin.metrics().vm_dropped(self.memory);
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
            next_context: 1,
            failure: None,
            memory: 0,
            memory_high_water: 0,
        };
        vm.note_memory();
        let started = vm.start();
        if let Err(VmError::Rejected { .. }) = &started {
            metrics.vm_failed();
        }
        started?;
        vm.instance.set_deadline(limits.callback_deadline());
        Ok(vm)
    }

    fn start(&mut self) -> Result<(), VmError> {
        self.state().phase = Phase::Start;
        let started = self.run_start_function();
        self.state().phase = Phase::Other;
        started?;
        let root = self.create_context(ContextKind::Root, 0)?;
        self.root_context = root;
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
        let started = Instant::now();
        let outcome = self.instance.call(callback, args);
        let elapsed = started.elapsed();
        self.note_memory();
        self.plugin.metrics().callback(callback, elapsed);
        match outcome {
            Ok(returned) => Ok(returned),
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
        self.state().contexts.insert(id, kind);
        if let Err(e) = self.call(
            id,
            Callback::ProxyOnContextCreate,
            &[id as i32, parent as i32],
        ) {
            self.state().contexts.remove(&id);
            return Err(e);
        }
        Ok(id)
    }

    /// Creates an HTTP stream context (`proxy_on_context_create(id, root)`).
    pub fn create_http_stream(&mut self) -> Result<HttpStream, VmError> {
        let id = self.create_context(ContextKind::Http, self.root_context)?;
        Ok(HttpStream {
            vm: self.serial,
            id,
        })
    }

    fn check(&self, stream: &HttpStream) -> Result<(), VmError> {
        if stream.vm == self.serial {
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
        self.check(stream)?;
        self.state().local_response = None;
        let returned = self.call(stream.id, callback, args);
        let local = self.state().local_response.take();
        Ok(match (local, returned?) {
            (Some(response), _) => Action::Respond(response),
            (None, Returned::Value(0) | Returned::Missing | Returned::Nothing) => Action::Continue,
            (None, Returned::Value(_)) => Action::Pause,
        })
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
        self.with_map(map, headers, |vm| vm.filter_call(stream, callback, &args))
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
        self.with_body(kind, body, |vm| vm.filter_call(stream, callback, &args))
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
        let state = self.state();
        state.contexts.remove(&id);
        state.events.retain(|(context, _)| *context != id);
        result
    }

    /// Takes what the plugin asked of `stream` (resume, close) since the last call.
    pub fn take_stream_events(&mut self, stream: &HttpStream) -> Vec<StreamEvent> {
        let events = &mut self.state().events;
        let mut taken = Vec::new();
        events.retain(|(context, event)| {
            let mine = *context == stream.id;
            if mine {
                taken.push(*event);
            }
            !mine
        });
        taken
    }
}
