//! The per-VM host state that hostcalls act on.

use crate::callouts::{Callouts, GrpcStream};
use crate::embedder::{ForeignFunction, LogSink, PropertyProvider};
use crate::inbox::Inbox;
use crate::metrics::HostMetrics;
use crate::plugin_metrics::MetricRegistry;
use crate::shared::SharedState;
use crate::{HeaderMap, LocalResponse, PluginConfig, StreamEvent};
use bytes::{Bytes, BytesMut};
use filterbox_abi::{AbiVersion, BufferType, Import, LogLevel, MapType, StreamType};
use std::collections::HashMap;

/// A map keyed by context ids (and host enums): keys the host picks, so a fast hash is safe
/// (maps keyed by guest bytes keep the default, DoS-resistant one).
pub(crate) type ContextMap<K, V> = HashMap<K, V, rustc_hash::FxBuildHasher>;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What every VM of a plugin shares.
pub(crate) struct PluginShared {
    pub(crate) config: PluginConfig,
    pub(crate) abi: AbiVersion,
    pub(crate) log: Arc<dyn LogSink>,
    pub(crate) properties: Arc<dyn PropertyProvider>,
    pub(crate) metrics: HostMetrics,
    /// Bit per `Import`: outside `allowed_capabilities`, answered by a stub.
    pub(crate) denied: ImportSet,
    pub(crate) shared_state: SharedState,
    /// The module imports `proxy_get_property`: only then are streams remembered for
    /// `request.*` attributes (a header copy per stream otherwise spent for nothing).
    pub(crate) reads_properties: bool,
    pub(crate) metric_registry: Arc<MetricRegistry>,
    pub(crate) callouts: Arc<dyn Callouts>,
    pub(crate) foreign_functions: HashMap<String, Arc<dyn ForeignFunction>>,
    /// One call in this many of each callback is timed for the latency histogram (0: none;
    /// every call is counted either way).
    pub(crate) latency_every: u32,
}

/// A set of imports, one bit each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ImportSet(u128);

// One bit per import must fit.
const _: () = assert!(Import::ALL.len() <= 128);

impl ImportSet {
    pub(crate) fn insert(&mut self, import: Import) {
        self.0 |= 1 << (import as u32);
    }

    pub(crate) fn contains(self, import: Import) -> bool {
        self.0 & (1 << (import as u32)) != 0
    }
}

impl PluginShared {
    /// Sends a plugin log line to the sink, cut to the configured length. A panicking sink
    /// is the embedder's bug: it is caught and reported as `false`, never unwound into wasm.
    pub(crate) fn log(&self, level: LogLevel, message: &str) -> bool {
        self.log_bytes(level, message.as_bytes(), message.len())
    }

    /// [`PluginShared::log`] of guest bytes: `kept` is what the guest wrote, or its first
    /// bytes when the host stopped reading there, and `total` its whole length. Only what
    /// fits in the line is converted from UTF-8 (invalid bytes become U+FFFD), so the host
    /// never holds more than a few times `max_log_line_bytes` for one line, and nothing is
    /// converted for a line the sink would not keep ([`LogSink::enabled`]).
    pub(crate) fn log_bytes(&self, level: LogLevel, kept: &[u8], total: usize) -> bool {
        match catch_unwind(AssertUnwindSafe(|| {
            self.log.enabled(&self.config.name, level)
        })) {
            Ok(true) => {}
            Ok(false) => return true,
            Err(_) => return false,
        }
        let max = self.config.limits.max_log_line_bytes;
        let head = kept.get(..max).unwrap_or(kept);
        let cut_at = head.len();
        // Borrowed, not copied, when the line is valid UTF-8 and whole (the usual case).
        let mut line = String::from_utf8_lossy(head);
        if total > cut_at {
            let line = line.to_mut();
            // A character cut in two shows as a replacement character; drop it.
            if let Err(e) = std::str::from_utf8(head)
                && e.error_len().is_none()
            {
                line.pop();
            }
            let rest = total - cut_at;
            line.push_str(&format!("... [{rest} more bytes cut]"));
        }
        catch_unwind(AssertUnwindSafe(|| {
            self.log.log(&self.config.name, level, &line)
        }))
        .is_ok()
    }
}

/// The kind of a live context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ContextKind {
    Root,
    Http,
    Tcp,
}

/// A gRPC call or stream the plugin has open.
pub(crate) struct OpenGrpc {
    /// The root context that hears about it.
    pub(crate) root: u32,
    /// A unary call (`proxy_grpc_call`) rather than a stream.
    pub(crate) unary: bool,
    /// A unary call's response, held until the close says whether it succeeded.
    pub(crate) message: Option<Bytes>,
    pub(crate) stream: Box<dyn GrpcStream>,
}

/// The callback the VM is in, where it changes what hostcalls may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Between calls, or in a callback with nothing special.
    Other,
    /// The start function (`_initialize`, `main`, `_start`): only logging, time and WASI.
    Start,
    /// `proxy_on_configure`: the plugin configuration is readable.
    Configure,
    /// `proxy_on_log`: stream headers are readable, not writable.
    Log,
}

pub(crate) struct VmState {
    pub(crate) shared: Arc<PluginShared>,
    pub(crate) contexts: ContextMap<u32, ContextKind>,
    /// The context the host is calling into.
    pub(crate) current_context: u32,
    /// Set by `proxy_set_effective_context` for the rest of one call.
    pub(crate) effective_context: Option<u32>,
    pub(crate) phase: Phase,
    /// Header maps handed in by the embedder for the current callback, by `MapType`.
    pub(crate) maps: [Option<HeaderMap>; 8],
    /// The body handed in for the current callback.
    pub(crate) body: Option<(BufferType, BytesMut)>,
    /// Set by `proxy_send_local_response` during the current callback, with its context.
    pub(crate) local_response: Option<(u32, LocalResponse)>,
    /// Header maps of paused streams, by context and `MapType`: a plugin resumed from a
    /// later callback (a callout answer, a tick) still reads and changes them there.
    pub(crate) parked: ContextMap<(u32, MapType), HeaderMap>,
    /// Stream events (continue, close) requested by the plugin, by context id.
    pub(crate) events: Vec<(u32, StreamEvent)>,
    /// Inside the guest allocator, called from a hostcall.
    pub(crate) in_allocator: bool,
    /// Where events for this VM wait (queue wake-ups, callout answers).
    pub(crate) inbox: Arc<Inbox>,
    /// The VM's first root context (0 until it exists): the one streams run under unless
    /// they were created under another.
    pub(crate) root_context: u32,
    /// Streams created under a root context other than the first: stream → its root.
    pub(crate) stream_roots: ContextMap<u32, u32>,
    /// `proxy_set_tick_period_milliseconds`, by root context: the period and the next tick.
    pub(crate) ticks: ContextMap<u32, (Duration, Instant)>,
    /// What `proxy_get_status` answers: set while delivering a failed callout or a gRPC close.
    pub(crate) status: (u32, Bytes),
    /// HTTP calls waiting for an answer: token → root context.
    pub(crate) http_calls: ContextMap<u32, u32>,
    /// Open gRPC calls and streams by token.
    pub(crate) grpc: ContextMap<u32, OpenGrpc>,
    /// Last callout token handed out (HTTP `& 3 == 0`, gRPC call 1, gRPC stream 2).
    pub(crate) last_token: u32,
    /// `proxy_done` was called while the root context's `proxy_on_done` was pending.
    pub(crate) done_requested: bool,
    /// The root context answered false from `proxy_on_done` and has not called `proxy_done`.
    pub(crate) done_pending: bool,
    /// What the plugin configuration buffer reads during the current configure-phase call
    /// instead of the plugin's own configuration: a candidate being validated
    /// (`proxy_validate_configuration`), or the configuration of a root context added with
    /// [`Vm::add_root_context`](crate::Vm::add_root_context).
    pub(crate) configuring: Option<Bytes>,
    /// What is remembered of each HTTP stream for `request.*` attributes.
    pub(crate) stream_info: ContextMap<u32, crate::attributes::StreamInfo>,
    /// The embedder sets what `request.*` reads ([`crate::Vm::set_request_headers_seen`],
    /// a chain, which gives every plugin the request as the whole chain left it): the
    /// request headers callback keeps no copy of its own.
    pub(crate) request_headers_set_by_caller: bool,
    /// The code of a `proc_exit` the guest called during the current call.
    pub(crate) exit_code: Option<i32>,
    /// Values set with `proxy_set_property`, by context and encoded path.
    pub(crate) properties: HashMap<(u32, Vec<u8>), Bytes>,
    /// Already warned that these are unimplemented or denied.
    warned_unimplemented: ImportSet,
    /// What WASI `fd_write` got for stdout and stderr since the last newline.
    pub(crate) output_lines: [PartialLine; 2],
    /// Trailers a plugin added in the last body callback of a message that had none, by
    /// context and trailer map, until the embedder takes them.
    pub(crate) added_trailers: ContextMap<(u32, MapType), HeaderMap>,
}

/// A line a plugin writes to stdout or stderr in pieces (Go's runtime writes a panic message
/// a few bytes at a time): logged once, when its newline comes or the callback ends. Holds at
/// most `max_log_line_bytes + 1` bytes; `total` counts what was cut.
#[derive(Debug, Default)]
pub(crate) struct PartialLine {
    kept: Vec<u8>,
    total: usize,
}

/// The most bytes of one `fd_write` call searched for line ends; the rest of a larger call
/// only counts towards its line's length (it is cut anyway).
const MAX_OUTPUT_SCAN: usize = 1 << 20;

impl VmState {
    /// WASI output (`fd_write` to 1 or 2): each complete line is one log line at `level`.
    pub(crate) fn write_output(&mut self, stream: usize, level: LogLevel, chunks: &[&[u8]]) {
        let keep = self
            .shared
            .config
            .limits
            .max_log_line_bytes
            .saturating_add(1);
        let mut scanned = 0;
        for chunk in chunks {
            let (searched, rest) = chunk.split_at(chunk.len().min(MAX_OUTPUT_SCAN - scanned));
            scanned += searched.len();
            for piece in searched.split_inclusive(|b| *b == b'\n') {
                let (text, ends) = match piece.strip_suffix(b"\n") {
                    Some(text) => (text, true),
                    None => (piece, false),
                };
                let Some(line) = self.output_lines.get_mut(stream) else {
                    return;
                };
                let room = keep.saturating_sub(line.kept.len());
                line.kept
                    .extend_from_slice(text.get(..room).unwrap_or(text));
                line.total += text.len();
                // An empty line (a lone newline) is not logged, as before line buffering.
                if ends && line.total > 0 {
                    let line = std::mem::take(line);
                    let _ = self.shared.log_bytes(level, &line.kept, line.total);
                }
            }
            if let Some(line) = self.output_lines.get_mut(stream) {
                line.total += rest.len();
            }
        }
    }

    /// Logs what is left of unfinished output lines (at the end of a callback).
    pub(crate) fn flush_output(&mut self) {
        for (stream, level) in [(0, LogLevel::Info), (1, LogLevel::Error)] {
            if let Some(line) = self.output_lines.get_mut(stream)
                && line.total > 0
            {
                let line = std::mem::take(line);
                let _ = self.shared.log_bytes(level, &line.kept, line.total);
            }
        }
    }
}

impl VmState {
    pub(crate) fn new(shared: Arc<PluginShared>) -> Self {
        let inbox = Arc::new(Inbox::new(shared.config.limits.max_pending_callout_bytes));
        VmState {
            shared,
            contexts: ContextMap::default(),
            current_context: 0,
            effective_context: None,
            phase: Phase::Other,
            maps: Default::default(),
            body: None,
            local_response: None,
            parked: ContextMap::default(),
            events: Vec::new(),
            in_allocator: false,
            inbox,
            root_context: 0,
            stream_roots: ContextMap::default(),
            ticks: ContextMap::default(),
            status: (0, Bytes::new()),
            http_calls: ContextMap::default(),
            grpc: ContextMap::default(),
            last_token: 0,
            done_requested: false,
            done_pending: false,
            properties: HashMap::new(),
            exit_code: None,
            stream_info: ContextMap::default(),
            request_headers_set_by_caller: false,
            configuring: None,
            warned_unimplemented: ImportSet::default(),
            output_lines: Default::default(),
            added_trailers: ContextMap::default(),
        }
    }

    pub(crate) fn abi(&self) -> AbiVersion {
        self.shared.abi
    }

    /// The context hostcalls act on.
    pub(crate) fn context(&self) -> u32 {
        self.effective_context.unwrap_or(self.current_context)
    }

    /// The root context `context` belongs to: itself for a root context, else the root its
    /// stream was created under.
    pub(crate) fn root_of(&self, context: u32) -> u32 {
        match self.contexts.get(&context) {
            Some(ContextKind::Root) => context,
            _ => self
                .stream_roots
                .get(&context)
                .copied()
                .unwrap_or(self.root_context),
        }
    }

    /// The root context of the context the current call acts for.
    pub(crate) fn current_root(&self) -> u32 {
        self.root_of(self.context())
    }

    pub(crate) fn context_kind(&self) -> Option<ContextKind> {
        self.contexts.get(&self.context()).copied()
    }

    /// Logs once per VM that the plugin called something filterbox does not implement yet
    /// (or that its config denies it).
    pub(crate) fn warn_unimplemented(&mut self, import: Import) {
        if !self.warned_unimplemented.contains(import) {
            self.warned_unimplemented.insert(import);
            let why = match self.shared.denied.contains(import) {
                true => "is not in allowed_capabilities",
                false => "is not implemented",
            };
            let message = format!(
                "filterbox: {} {why}; returning an error to the plugin",
                import.name()
            );
            self.shared.log(LogLevel::Warn, &message);
        }
    }

    /// The map `map` as the current callback sees it: handed in for this call, or parked
    /// with the context the hostcall acts on.
    pub(crate) fn map(&self, map: MapType) -> Option<&HeaderMap> {
        match self.maps.get(map as usize).and_then(Option::as_ref) {
            Some(handed_in) => Some(handed_in),
            None => self.parked.get(&(self.context(), map)),
        }
    }

    /// A map the plugin may change now: only the stream maps (0–3), only while handed in (or
    /// parked), and not during `proxy_on_log`.
    pub(crate) fn map_mut(&mut self, map: MapType) -> Option<&mut HeaderMap> {
        if map.as_u32() > MapType::HttpResponseTrailers.as_u32() || self.phase == Phase::Log {
            return None;
        }
        let context = self.context();
        match self.maps.get_mut(map as usize).and_then(Option::as_mut) {
            Some(handed_in) => Some(handed_in),
            None => self.parked.get_mut(&(context, map)),
        }
    }

    /// The bytes of buffer `buffer`, as Envoy answers outside and inside the callbacks that own
    /// them (ABI.md §4.3): stream buffers read as empty when not handed in; the HTTP-call
    /// body and the plugin configuration are `NotFound` outside their callbacks.
    pub(crate) fn buffer(&self, buffer: BufferType) -> Result<&[u8], filterbox_abi::Status> {
        use filterbox_abi::Status;
        match buffer {
            BufferType::HttpRequestBody
            | BufferType::HttpResponseBody
            | BufferType::DownstreamData
            | BufferType::UpstreamData
            | BufferType::GrpcReceiveBuffer
            | BufferType::CallData => match &self.body {
                Some((kind, bytes)) if *kind == buffer => Ok(bytes),
                _ => Ok(&[]),
            },
            BufferType::HttpCallResponseBody => match &self.body {
                Some((kind, bytes)) if *kind == buffer => Ok(bytes),
                _ => Err(Status::NotFound),
            },
            BufferType::VmConfiguration => Ok(&self.shared.config.vm_configuration),
            BufferType::PluginConfiguration if self.phase == Phase::Configure => {
                match &self.configuring {
                    Some(candidate) => Ok(candidate),
                    None => Ok(&self.shared.config.configuration),
                }
            }
            BufferType::PluginConfiguration => Err(Status::NotFound),
        }
    }

    /// A fresh callout token of `kind` (0 HTTP, 1 gRPC call, 2 gRPC stream) not in use.
    pub(crate) fn next_token(&mut self, kind: u32) -> u32 {
        loop {
            self.last_token = self.last_token.wrapping_add(4);
            let token = (self.last_token & !3) | kind;
            if token > 3 && !self.http_calls.contains_key(&token) && !self.grpc.contains_key(&token)
            {
                return token;
            }
        }
    }

    /// HTTP calls and gRPC calls and streams waiting for an answer.
    pub(crate) fn pending_callouts(&self) -> usize {
        self.http_calls.len() + self.grpc.len()
    }

    pub(crate) fn record_event(&mut self, event: StreamEvent) {
        let context = self.context();
        self.events.push((context, event));
    }

    pub(crate) fn stream_type_event(&mut self, stream: StreamType, close: bool) {
        self.record_event(if close {
            StreamEvent::Close(stream)
        } else {
            StreamEvent::Continue(stream)
        });
    }
}
