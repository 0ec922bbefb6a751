//! Cases for the asynchronous and shared parts of the ABI: HTTP and gRPC callouts against
//! real loopback servers, shared data, shared queues across threads, timers, metrics,
//! foreign functions, root-context shutdown, properties set by plugins, `proc_exit`, and L4
//! connections. Exact statuses are checked with WAT modules that report every hostcall's
//! answer; the Rust-SDK `callouts` plugin checks that real SDK code runs on top.

use crate::guests::wat_bytes;
use crate::harness::{CaseResult, Failure, Harness, LogCapture, headers};
use crate::hostile::{import_decl, module, reports};
use crate::servers::Servers;
use crate::{ensure, guests};
use bytes::{Bytes, BytesMut};
use filterbox::abi::{Callback, Import, MapType, PeerType, Status, StreamType, property_path};
use filterbox::{
    Action, CalloutError, Callouts, GrpcReply, GrpcRequest, GrpcStream, HeaderMap, HttpCallReply,
    HttpCallRequest, HttpStream, Limits, LogLevel, MetricValue, PluginConfig, SharedLimits,
    SharedState, StreamEvent, TrapKind, Vm, VmError,
};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a case waits for callouts to come back before it fails.
const PATIENCE: Duration = Duration::from_secs(15);

/// The WAT imports of `list`, one per line.
pub(crate) fn imports(list: &[Import]) -> String {
    list.iter().map(|i| import_decl(*i) + "\n").collect()
}

/// The proxy-wasm pairs encoding of `pairs`.
pub(crate) fn encode_pairs(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

fn config(name: &str) -> PluginConfig {
    PluginConfig::named(name).with_log_level(LogLevel::Trace)
}

fn vm_error(e: VmError) -> Failure {
    Failure::Fail(e.to_string())
}

/// Runs `vm`'s events and timers until `done` holds or [`PATIENCE`] runs out.
fn drive_until(vm: &mut Vm, what: &str, mut done: impl FnMut(&mut Vm) -> bool) -> CaseResult {
    let start = Instant::now();
    while !done(vm) {
        ensure!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        vm.wait_and_run(Duration::from_millis(50))
            .map_err(vm_error)?;
    }
    Ok(())
}

/// A stream whose request headers (none) have been through the plugin.
fn empty_request(vm: &mut Vm) -> Result<HttpStream, Failure> {
    let stream = vm.create_http_stream().map_err(vm_error)?;
    vm.on_request_headers(&stream, &mut headers(&[]), true)
        .map_err(vm_error)?;
    Ok(stream)
}

/// Sends a GET of `path` that the plugin must pause on, drives the VM until the plugin
/// resumes the request, and returns the stream and the headers as the plugin left them.
fn pause_until_resumed(vm: &mut Vm, path: &str) -> Result<(HttpStream, HeaderMap), Failure> {
    let stream = vm.create_http_stream().map_err(vm_error)?;
    let mut request = headers(&[(":method", "GET"), (":path", path), (":authority", "x")]);
    let action = vm
        .on_request_headers(&stream, &mut request, true)
        .map_err(vm_error)?;
    ensure!(
        action == Action::Pause,
        "request headers of {path}: {action:?}"
    );
    let mut events = Vec::new();
    drive_until(vm, "the plugin to resume the request", |vm| {
        events.extend(vm.take_stream_events(&stream));
        events.contains(&StreamEvent::Continue(StreamType::HttpRequest))
    })?;
    let resumed = vm
        .take_paused_headers(&stream, MapType::HttpRequestHeaders)
        .ok_or("no paused headers")?;
    Ok((stream, resumed))
}

/// Loads `wasm` with a callout client to the loopback servers and starts a VM.
pub(crate) fn start_with_servers(
    h: &Harness,
    wasm: &[u8],
    config: PluginConfig,
) -> Result<(Vm, Arc<LogCapture>), Failure> {
    let callouts = servers()?.callouts()?;
    let (plugin, logs) = h
        .load_with(wasm, config, |b| b.callouts(callouts))
        .map_err(|e| e.to_string())?;
    let vm = Vm::new(&plugin).map_err(|e| format!("{e}; logs: {:?}", logs.messages()))?;
    Ok((vm, logs))
}

fn servers() -> Result<&'static Servers, Failure> {
    Servers::get().map_err(|e| Failure::Fail(format!("loopback servers: {e}")))
}

/// Log line `line` appears in `logs`.
fn logged(logs: &LogCapture, line: &str) -> bool {
    logs.messages().iter().any(|m| m == line)
}

/// The Rust-SDK plugin pauses a request on an HTTP call to a real upstream, resumes it from
/// the answer with a header added, and counts, stores and enqueues along the way.
pub(crate) fn rust_sdk_http_call(h: &Harness) -> CaseResult {
    let (mut vm, logs) = start_with_servers(h, guests::CALLOUTS, config("callouts"))?;
    let plugin = vm.plugin().clone();
    let (stream, resumed) = pause_until_resumed(&mut vm, "/a")?;
    let lookup = resumed.get_str("x-lookup");
    ensure!(lookup == Some("200 found"), "x-lookup: {lookup:?}");
    vm.finish_stream(stream).map_err(vm_error)?;
    drive_until(&mut vm, "the queue message", |_| {
        logged(&logs, "queue seen /a")
    })?;
    let registry = plugin.metric_registry();
    ensure!(
        registry.value("requests") == Some(MetricValue::Counter(1)),
        "requests: {:?}",
        registry.value("requests")
    );
    ensure!(
        registry.value("lookup_bytes") == Some(MetricValue::Histogram { count: 1, sum: 5 }),
        "lookup_bytes: {:?}",
        registry.value("lookup_bytes")
    );
    let stored = plugin
        .shared_state()
        .get(&plugin.config().vm_id, b"last_path");
    ensure!(
        matches!(&stored, Ok(Some((v, _))) if v.as_ref() == b"/a"),
        "shared data: {stored:?}"
    );
    Ok(())
}

/// The Rust-SDK plugin's first tick makes a unary gRPC call and opens a gRPC stream to a
/// real HTTP/2 server; both answers come back through the SDK's callbacks.
pub(crate) fn rust_sdk_grpc(h: &Harness) -> CaseResult {
    let (mut vm, logs) = start_with_servers(h, guests::CALLOUTS, config("callouts"))?;
    let plugin = vm.plugin().clone();
    let wanted = [
        "grpc unary status 0 body echo: hello",
        "grpc stream metadata x-echo=yes",
        "grpc stream message pong: ping",
        "grpc stream close 0",
    ];
    drive_until(&mut vm, "the gRPC answers", |_| {
        wanted.iter().all(|line| logged(&logs, line))
    })
    .map_err(|e| match e {
        Failure::Fail(m) => Failure::Fail(format!("{m}; logs: {:?}", logs.messages())),
        other => other,
    })?;
    let ticks = plugin.metric_registry().value("ticks");
    ensure!(
        matches!(ticks, Some(MetricValue::Gauge(n)) if n >= 1),
        "ticks gauge: {ticks:?}"
    );
    Ok(())
}

/// The HTTP-call statuses: unknown upstream, missing pseudo headers and a negative timeout
/// are `BadArgument`, a bad token pointer `InvalidMemoryAccess`; an unreachable upstream
/// answers 503, a timeout 504, a broken call comes back without headers and with
/// `proxy_get_status` = `BrokenConnection`; the pending-call limit answers `InternalFailure`.
pub(crate) fn http_call_statuses(h: &Harness) -> CaseResult {
    let good = encode_pairs(&[
        (":method", "GET"),
        (":path", "/lookup"),
        (":authority", "b"),
    ]);
    let no_path = encode_pairs(&[(":method", "GET"), (":authority", "b")]);
    let slow = encode_pairs(&[(":method", "GET"), (":path", "/slow"), (":authority", "b")]);
    let call = |name: (u32, u32), hdrs: (u32, usize), timeout: i32, token: u32| {
        format!(
            "(call $report (call $proxy_http_call (i32.const {}) (i32.const {}) (i32.const {}) (i32.const {}) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const {timeout}) (i32.const {token})))",
            name.0, name.1, hdrs.0, hdrs.1
        )
    };
    let body = [
        call((110, 7), (200, good.len()), 5000, 3000),
        call((100, 7), (400, no_path.len()), 5000, 3000),
        call((100, 7), (200, good.len()), -1, 3000),
        call((100, 7), (200, good.len()), 5000, 65533),
        call((100, 7), (200, good.len()), 5000, 3000),
        call((120, 6), (200, good.len()), 5000, 3000),
        call((100, 7), (600, slow.len()), 100, 3000),
    ]
    .join("\n");
    let extra = format!(
        r#"(data (i32.const 50) ":status")
           (data (i32.const 100) "backend")
           (data (i32.const 110) "nowhere")
           (data (i32.const 120) "closed")
           (data (i32.const 200) "{}")
           (data (i32.const 400) "{}")
           (data (i32.const 600) "{}")
           (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
             (if (i32.eqz (local.get 2))
               (then
                 (call $report (call $proxy_get_status (i32.const 3008) (i32.const 3012) (i32.const 3016)))
                 (call $report (i32.load (i32.const 3008)))
                 (drop (call $log (i32.const 2) (i32.load (i32.const 3012)) (i32.load (i32.const 3016)))))
               (else
                 (drop (call $proxy_get_header_map_value (i32.const 6) (i32.const 50) (i32.const 7) (i32.const 3020) (i32.const 3024)))
                 (drop (call $log (i32.const 2) (i32.load (i32.const 3020)) (i32.load (i32.const 3024)))))))"#,
        wat_bytes(&good),
        wat_bytes(&no_path),
        wat_bytes(&slow)
    );
    let wasm = module(
        &imports(&[
            Import::ProxyHttpCall,
            Import::ProxyGetStatus,
            Import::ProxyGetHeaderMapValue,
        ]),
        &[(
            Callback::ProxyOnRequestHeaders,
            &format!("{body} (i32.const 0)"),
        )],
        &extra,
    )?;
    let run = |config: PluginConfig, callouts: Arc<dyn Callouts>, answers: usize| {
        let (plugin, logs) = h
            .load_with(&wasm, config, |b| b.callouts(callouts))
            .map_err(|e| e.to_string())?;
        let mut vm = Vm::new(&plugin).map_err(vm_error)?;
        empty_request(&mut vm)?;
        let lines = |logs: &LogCapture| {
            logs.messages()
                .into_iter()
                .filter(|m| m.len() == 3 || m.starts_with("callout"))
                .count()
        };
        drive_until(&mut vm, "the HTTP-call answers", |_| {
            lines(&logs) >= answers
        })?;
        Ok::<_, Failure>(logs)
    };
    let logs = run(config("http"), servers()?.callouts()?, 3)?;
    let got = reports(&logs);
    ensure!(got == [2, 2, 2, 6, 0, 0, 0], "statuses: {got:?}");
    for status in ["200", "503", "504"] {
        ensure!(
            logged(&logs, status),
            "no {status} answer: {:?}",
            logs.messages()
        );
    }
    // A client that drops the call: the plugin hears a failure and proxy_get_status says why.
    let logs = run(config("http-broken"), Arc::new(Dropping), 4)?;
    let got = reports(&logs);
    let broken = [Status::Ok.as_u32(), Status::BrokenConnection.as_u32()];
    ensure!(
        got.windows(2).filter(|w| *w == broken).count() == 4,
        "statuses with a dropping client: {got:?}"
    );
    ensure!(
        logged(&logs, "callout dropped without an answer"),
        "logs: {:?}",
        logs.messages()
    );
    // One call may wait at a time: the next ones are refused.
    let limited = config("http-limited").with_limits({
        let mut limits = Limits::default();
        limits.max_pending_callouts = 1;
        limits
    });
    let logs = run(limited, servers()?.callouts()?, 1)?;
    let got = reports(&logs);
    ensure!(
        got == [2, 2, 2, 6, 0, 10, 10],
        "statuses with a limit of 1: {got:?}"
    );
    Ok(())
}

/// A client that accepts every call and drops its reply handle.
pub(crate) struct Dropping;

impl Callouts for Dropping {
    fn http_call(&self, _: HttpCallRequest, reply: HttpCallReply) -> Result<(), CalloutError> {
        drop(reply);
        Ok(())
    }

    fn grpc_open(&self, _: GrpcRequest, _: GrpcReply) -> Result<Box<dyn GrpcStream>, CalloutError> {
        Err(CalloutError::Unsupported)
    }
}

/// The gRPC statuses (unknown upstream `ParseFailure`; wrong token kinds `BadArgument`;
/// unknown tokens `NotFound`) and the callbacks of a unary call, a failing call and a stream
/// against a real HTTP/2 server.
pub(crate) fn grpc_statuses(h: &Harness) -> CaseResult {
    let grpc_call = |upstream: (u32, u32), method: (u32, u32)| {
        format!(
            "(call $report (call $proxy_grpc_call (i32.const {}) (i32.const {}) (i32.const 130) (i32.const 9) (i32.const {}) (i32.const {}) (i32.const 0) (i32.const 0) (i32.const 170) (i32.const 2) (i32.const 5000) (i32.const 3000)))",
            upstream.0, upstream.1, method.0, method.1
        )
    };
    let body = [
        grpc_call((110, 7), (140, 5)),
        "(call $report (call $proxy_grpc_send (i32.const 5) (i32.const 170) (i32.const 2) (i32.const 0)))".into(),
        "(call $report (call $proxy_grpc_send (i32.const 6) (i32.const 170) (i32.const 2) (i32.const 0)))".into(),
        "(call $report (call $proxy_grpc_cancel (i32.const 7)))".into(),
        "(call $report (call $proxy_grpc_close (i32.const 4)))".into(),
        "(call $report (call $proxy_grpc_cancel (i32.const 9)))".into(),
        grpc_call((100, 4), (150, 4)),
        grpc_call((100, 4), (140, 5)),
        "(call $report (call $proxy_grpc_stream (i32.const 100) (i32.const 4) (i32.const 130) (i32.const 9) (i32.const 160) (i32.const 6) (i32.const 0) (i32.const 0) (i32.const 3010)))".into(),
        "(call $report (call $proxy_grpc_send (i32.load (i32.const 3010)) (i32.const 170) (i32.const 2) (i32.const 1)))".into(),
        // A method no request path can carry: InternalFailure, as Envoy (the Rust SDK panics
        // on any other status here).
        grpc_call((100, 4), (200, 6)),
    ]
    .join("\n");
    let extra = r#"(data (i32.const 100) "grpc")
        (data (i32.const 110) "nowhere")
        (data (i32.const 130) "test.Echo")
        (data (i32.const 140) "Unary")
        (data (i32.const 150) "Fail")
        (data (i32.const 160) "Stream")
        (data (i32.const 170) "hi")
        (data (i32.const 180) "initialtrailing")
        (data (i32.const 200) "bad me")
        (func $log_buffer (param $size i32)
          (drop (call $proxy_get_buffer_bytes (i32.const 5) (i32.const 0) (local.get $size) (i32.const 3020) (i32.const 3024)))
          (drop (call $log (i32.const 2) (i32.load (i32.const 3020)) (i32.load (i32.const 3024)))))
        (func (export "proxy_on_grpc_receive") (param i32 i32 i32) (call $log_buffer (local.get 2)))
        (func (export "proxy_on_grpc_receive_initial_metadata") (param i32 i32 i32)
          (drop (call $log (i32.const 2) (i32.const 180) (i32.const 7))))
        (func (export "proxy_on_grpc_receive_trailing_metadata") (param i32 i32 i32)
          (drop (call $log (i32.const 2) (i32.const 187) (i32.const 8))))
        (func (export "proxy_on_grpc_close") (param i32 i32 i32)
          (call $report (local.get 2))
          (drop (call $proxy_get_status (i32.const 3030) (i32.const 3034) (i32.const 3038)))
          (drop (call $log (i32.const 2) (i32.load (i32.const 3034)) (i32.load (i32.const 3038)))))"#;
    let wasm = module(
        &imports(&[
            Import::ProxyGrpcCall,
            Import::ProxyGrpcStream,
            Import::ProxyGrpcSend,
            Import::ProxyGrpcCancel,
            Import::ProxyGrpcClose,
            Import::ProxyGetStatus,
            Import::ProxyGetBufferBytes,
        ]),
        &[(
            Callback::ProxyOnRequestHeaders,
            &format!("{body} (i32.const 0)"),
        )],
        extra,
    )?;
    let (mut vm, logs) = start_with_servers(h, &wasm, config("grpc"))?;
    empty_request(&mut vm)?;
    let wanted = ["echo: hi", "nope", "initial", "pong: hi", "trailing"];
    drive_until(&mut vm, "the gRPC answers", |_| {
        wanted.iter().all(|w| logged(&logs, w)) && reports(&logs).len() >= 13
    })
    .map_err(|e| match e {
        Failure::Fail(m) => Failure::Fail(format!("{m}; logs: {:?}", logs.messages())),
        other => other,
    })?;
    let got = reports(&logs);
    ensure!(
        got.get(..11) == Some(&[4, 2, 1, 2, 2, 1, 0, 0, 0, 0, 10][..]),
        "statuses: {got:?}"
    );
    // The failing call closes with NOT_FOUND (5), the stream with OK; the unary success
    // is a receive, not a close.
    let mut closes = got.get(11..).unwrap_or_default().to_vec();
    closes.sort_unstable();
    ensure!(closes == [0, 5], "close statuses: {closes:?}");
    Ok(())
}

/// Shared data: `NotFound` before a set, CAS mismatches, a bad out-pointer, the key bound;
/// another VM on another thread with the same vm_id reads what was written, one with another
/// vm_id does not.
pub(crate) fn shared_data(h: &Harness) -> CaseResult {
    let get = |out: u32| {
        format!(
            "(call $proxy_get_shared_data (i32.const 100) (i32.const 1) (i32.const {out}) (i32.const 3004) (i32.const 3008))"
        )
    };
    let set = |value: u32, cas: &str| {
        format!(
            "(call $report (call $proxy_set_shared_data (i32.const 100) (i32.const 1) (i32.const {value}) (i32.const 2) {cas}))"
        )
    };
    let writer_body = [
        format!("(call $report {})", get(3000)),
        set(110, "(i32.const 0)"),
        format!("(call $report {})", get(3000)),
        set(120, "(i32.add (i32.load (i32.const 3008)) (i32.const 1))"),
        set(120, "(i32.load (i32.const 3008))"),
        set(110, "(i32.load (i32.const 3008))"),
        format!("(call $report {})", get(65533)),
        "(call $report (call $proxy_set_shared_data (i32.const 101) (i32.const 1) (i32.const 110) (i32.const 2) (i32.const 0)))".into(),
    ]
    .join("\n");
    let reader_body = format!(
        "(call $report {}) (drop (call $log (i32.const 2) (i32.load (i32.const 3000)) (i32.load (i32.const 3004))))",
        get(3000)
    );
    let data =
        r#"(data (i32.const 100) "kl") (data (i32.const 110) "v1") (data (i32.const 120) "v2")"#;
    let imports = imports(&[Import::ProxyGetSharedData, Import::ProxySetSharedData]);
    let writer = module(
        &imports,
        &[(
            Callback::ProxyOnRequestHeaders,
            &format!("{writer_body} (i32.const 0)"),
        )],
        data,
    )?;
    let reader = module(
        &imports,
        &[(
            Callback::ProxyOnRequestHeaders,
            &format!("{reader_body} (i32.const 0)"),
        )],
        data,
    )?;
    let world = SharedState::new(SharedLimits::default().with_max_keys(1));
    let run = |wasm: &[u8], vm_id: &str| -> Result<Arc<LogCapture>, Failure> {
        let config = config("shared").with_vm_id(vm_id);
        let (plugin, logs) = h
            .load_with(wasm, config, |b| b.shared_state(world.clone()))
            .map_err(|e| e.to_string())?;
        let mut vm = Vm::new(&plugin).map_err(vm_error)?;
        empty_request(&mut vm)?;
        Ok(logs)
    };
    let logs = run(&writer, "one")?;
    let got = reports(&logs);
    ensure!(got == [1, 0, 0, 8, 0, 8, 6, 10], "writer statuses: {got:?}");
    let (same, other) = std::thread::scope(|s| {
        let same = s.spawn(|| run(&reader, "one"));
        let other = s.spawn(|| run(&reader, "two"));
        (same.join(), other.join())
    });
    let same = same.map_err(|_| "reader thread panicked")??;
    let other = other.map_err(|_| "reader thread panicked")??;
    ensure!(
        reports(&same) == [0] && logged(&same, "v2"),
        "same vm_id read: {:?}",
        same.messages()
    );
    ensure!(
        reports(&other) == [1],
        "other vm_id read: {:?}",
        other.messages()
    );
    Ok(())
}

/// Shared queues: register, resolve, `Empty` and `NotFound`, FIFO order, and an enqueue from
/// another VM on another thread that wakes the owner and reaches its `proxy_on_queue_ready`.
pub(crate) fn shared_queues(h: &Harness) -> CaseResult {
    let owner_body = r#"
        (call $report (call $proxy_register_shared_queue (i32.const 100) (i32.const 1) (i32.const 3000)))
        (call $report (call $proxy_resolve_shared_queue (i32.const 0) (i32.const 0) (i32.const 100) (i32.const 1) (i32.const 3004)))
        (call $report (i32.ne (i32.load (i32.const 3000)) (i32.load (i32.const 3004))))
        (call $report (call $proxy_resolve_shared_queue (i32.const 0) (i32.const 0) (i32.const 101) (i32.const 1) (i32.const 3004)))
        (call $report (call $proxy_dequeue_shared_queue (i32.load (i32.const 3000)) (i32.const 3010) (i32.const 3014)))
        (call $report (call $proxy_dequeue_shared_queue (i32.const 999) (i32.const 3010) (i32.const 3014)))
        (call $report (call $proxy_enqueue_shared_queue (i32.const 999) (i32.const 110) (i32.const 2)))
        (call $report (call $proxy_enqueue_shared_queue (i32.load (i32.const 3000)) (i32.const 110) (i32.const 2)))
        (call $report (call $proxy_enqueue_shared_queue (i32.load (i32.const 3000)) (i32.const 120) (i32.const 2)))
        (i32.const 0)"#;
    let producer_body = r#"
        (call $report (call $proxy_resolve_shared_queue (i32.const 140) (i32.const 6) (i32.const 100) (i32.const 1) (i32.const 3004)))
        (call $report (call $proxy_enqueue_shared_queue (i32.load (i32.const 3004)) (i32.const 130) (i32.const 2)))
        (i32.const 0)"#;
    let extra = r#"(data (i32.const 100) "qx") (data (i32.const 110) "m1") (data (i32.const 120) "m2")
        (data (i32.const 130) "m3") (data (i32.const 140) "queues")
        (func (export "proxy_on_queue_ready") (param i32 i32)
          (call $report (call $proxy_dequeue_shared_queue (local.get 1) (i32.const 3020) (i32.const 3024)))
          (drop (call $log (i32.const 2) (i32.load (i32.const 3020)) (i32.load (i32.const 3024)))))"#;
    let imports = imports(&[
        Import::ProxyRegisterSharedQueue,
        Import::ProxyResolveSharedQueue,
        Import::ProxyEnqueueSharedQueue,
        Import::ProxyDequeueSharedQueue,
    ]);
    let owner = module(
        &imports,
        &[(Callback::ProxyOnRequestHeaders, owner_body)],
        extra,
    )?;
    let producer = module(
        &imports,
        &[(Callback::ProxyOnRequestHeaders, producer_body)],
        extra,
    )?;
    let world = SharedState::default();
    let load = |wasm: &[u8]| {
        h.load_with(wasm, config("queues").with_vm_id("queues"), |b| {
            b.shared_state(world.clone())
        })
        .map_err(|e| Failure::Fail(e.to_string()))
    };
    let (plugin, logs) = load(&owner)?;
    let mut vm = Vm::new(&plugin).map_err(vm_error)?;
    let woken = Arc::new(AtomicUsize::new(0));
    let counter = woken.clone();
    vm.set_wake(Some(Arc::new(move || {
        counter.fetch_add(1, Ordering::Relaxed);
    })));
    empty_request(&mut vm)?;
    let got = reports(&logs);
    ensure!(
        got == [0, 0, 0, 1, 7, 1, 1, 0, 0],
        "owner statuses: {got:?}"
    );
    vm.dispatch_pending().map_err(vm_error)?;
    let (producer_plugin, producer_logs) = load(&producer)?;
    std::thread::scope(|s| {
        s.spawn(|| -> CaseResult {
            let mut vm = Vm::new(&producer_plugin).map_err(vm_error)?;
            empty_request(&mut vm)?;
            Ok(())
        })
        .join()
        .map_err(|_| Failure::Fail("producer thread panicked".into()))
    })??;
    ensure!(
        reports(&producer_logs) == [0, 0],
        "producer statuses: {:?}",
        reports(&producer_logs)
    );
    drive_until(&mut vm, "the message from the other thread", |_| {
        logged(&logs, "m3")
    })?;
    let order: Vec<String> = logs
        .messages()
        .into_iter()
        .filter(|m| m.starts_with('m'))
        .collect();
    ensure!(order == ["m1", "m2", "m3"], "queue order: {order:?}");
    ensure!(
        woken.load(Ordering::Relaxed) == 3,
        "woken {} times",
        woken.load(Ordering::Relaxed)
    );
    Ok(())
}

/// `proxy_set_tick_period_milliseconds` drives `proxy_on_tick` on the root context until the
/// plugin sets 0.
pub(crate) fn ticks(h: &Harness) -> CaseResult {
    let extra = r#"(global $ticks (mut i32) (i32.const 0))
        (func (export "proxy_on_tick") (param i32)
          (global.set $ticks (i32.add (global.get $ticks) (i32.const 1)))
          (call $report (global.get $ticks))
          (if (i32.eq (global.get $ticks) (i32.const 3))
            (then (drop (call $proxy_set_tick_period_milliseconds (i32.const 0))))))"#;
    let wasm = module(
        &imports(&[Import::ProxySetTickPeriodMilliseconds]),
        &[(
            Callback::ProxyOnConfigure,
            "(drop (call $proxy_set_tick_period_milliseconds (i32.const 5))) (i32.const 1)",
        )],
        extra,
    )?;
    let (plugin, logs) = h.load(&wasm, config("ticks")).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut vm = Vm::new(&plugin).map_err(vm_error)?;
    ensure!(
        vm.tick_period() == Some(Duration::from_millis(5)),
        "period {:?}",
        vm.tick_period()
    );
    drive_until(&mut vm, "three ticks", |vm| vm.tick_period().is_none())?;
    let elapsed = started.elapsed();
    ensure!(reports(&logs) == [1, 2, 3], "ticks: {:?}", reports(&logs));
    ensure!(
        elapsed >= Duration::from_millis(15),
        "three 5 ms ticks in {elapsed:?}"
    );
    // Stopped: nothing more runs.
    vm.wait_and_run(Duration::from_millis(30))
        .map_err(vm_error)?;
    ensure!(
        reports(&logs) == [1, 2, 3],
        "ticked after 0: {:?}",
        reports(&logs)
    );
    Ok(())
}

/// Metrics: define, increment, record and get with Envoy's statuses, and the registry the
/// embedder reads.
pub(crate) fn metrics(h: &Harness) -> CaseResult {
    let body = r#"
        (call $report (call $proxy_define_metric (i32.const 0) (i32.const 100) (i32.const 1) (i32.const 3000)))
        (call $report (call $proxy_define_metric (i32.const 1) (i32.const 101) (i32.const 1) (i32.const 3004)))
        (call $report (call $proxy_define_metric (i32.const 2) (i32.const 102) (i32.const 1) (i32.const 3008)))
        (call $report (call $proxy_define_metric (i32.const 3) (i32.const 100) (i32.const 1) (i32.const 3012)))
        (call $report (call $proxy_increment_metric (i32.load (i32.const 3000)) (i64.const 0)))
        (call $report (call $proxy_increment_metric (i32.load (i32.const 3000)) (i64.const 5)))
        (call $report (call $proxy_record_metric (i32.load (i32.const 3000)) (i64.const 2)))
        (call $report (call $proxy_increment_metric (i32.load (i32.const 3004)) (i64.const -3)))
        (call $report (call $proxy_record_metric (i32.load (i32.const 3008)) (i64.const 42)))
        (call $report (call $proxy_increment_metric (i32.load (i32.const 3008)) (i64.const 1)))
        (call $report (call $proxy_get_metric (i32.load (i32.const 3008)) (i32.const 3020)))
        (call $report (call $proxy_get_metric (i32.const 12345) (i32.const 3020)))
        (call $report (call $proxy_get_metric (i32.load (i32.const 3000)) (i32.const 3020)))
        (call $report (i32.wrap_i64 (i64.load (i32.const 3020))))
        (i32.const 0)"#;
    let wasm = module(
        &imports(&[
            Import::ProxyDefineMetric,
            Import::ProxyIncrementMetric,
            Import::ProxyRecordMetric,
            Import::ProxyGetMetric,
        ]),
        &[(Callback::ProxyOnRequestHeaders, body)],
        r#"(data (i32.const 100) "cgh")"#,
    )?;
    let (mut vm, logs) = h.start(&wasm, config("metrics"))?;
    empty_request(&mut vm)?;
    let got = reports(&logs);
    ensure!(
        got == [0, 0, 0, 2, 2, 0, 0, 0, 0, 2, 2, 1, 0, 7],
        "statuses: {got:?}"
    );
    let registry = vm.plugin().metric_registry().clone();
    ensure!(registry.value("c") == Some(MetricValue::Counter(7)), "c");
    ensure!(registry.value("g") == Some(MetricValue::Gauge(-3)), "g");
    ensure!(
        registry.value("h") == Some(MetricValue::Histogram { count: 1, sum: 42 }),
        "h: {:?}",
        registry.value("h")
    );
    let mut text = String::new();
    registry.render_prometheus(&mut text);
    ensure!(
        text.contains("wasmcustom_c 7\n") && text.contains("wasmcustom_g -3\n"),
        "prometheus text: {text}"
    );
    Ok(())
}

/// Foreign functions: a registered one answers (results through the allocator), an unknown
/// name is `NotFound`, a function's error status reaches the guest; the built-in `compress`
/// and `uncompress` round-trip; the embedder calls back with `proxy_on_foreign_function` and
/// the arguments in the call-data buffer.
pub(crate) fn foreign_functions(h: &Harness) -> CaseResult {
    let call = |name: (u32, u32)| {
        format!(
            "(call $report (call $proxy_call_foreign_function (i32.const {}) (i32.const {}) (i32.const 120) (i32.const 3) (i32.const 3000) (i32.const 3004)))",
            name.0, name.1
        )
    };
    // The built-ins: "abc" compressed, then uncompressed and logged.
    let builtins = "(call $report (call $proxy_call_foreign_function (i32.const 140) (i32.const 8)
            (i32.const 120) (i32.const 3) (i32.const 3020) (i32.const 3024)))
        (call $report (call $proxy_call_foreign_function (i32.const 150) (i32.const 10)
            (i32.load (i32.const 3020)) (i32.load (i32.const 3024)) (i32.const 3030) (i32.const 3034)))
        (drop (call $log (i32.const 2) (i32.load (i32.const 3030)) (i32.load (i32.const 3034))))";
    let body = format!(
        "{} (drop (call $log (i32.const 2) (i32.load (i32.const 3000)) (i32.load (i32.const 3004)))) {} {} {builtins} (i32.const 0)",
        call((100, 7)),
        call((110, 4)),
        call((130, 4))
    );
    let extra = r#"(data (i32.const 100) "reverse") (data (i32.const 110) "nope")
        (data (i32.const 120) "abc") (data (i32.const 130) "fail")
        (data (i32.const 140) "compress") (data (i32.const 150) "uncompress")
        (func (export "proxy_on_foreign_function") (param i32 i32 i32)
          (call $report (local.get 1))
          (drop (call $proxy_get_buffer_bytes (i32.const 8) (i32.const 0) (local.get 2) (i32.const 3010) (i32.const 3014)))
          (drop (call $log (i32.const 2) (i32.load (i32.const 3010)) (i32.load (i32.const 3014)))))"#;
    let wasm = module(
        &imports(&[
            Import::ProxyCallForeignFunction,
            Import::ProxyGetBufferBytes,
        ]),
        &[(Callback::ProxyOnRequestHeaders, &body)],
        extra,
    )?;
    let reverse = |args: &[u8]| -> Result<Bytes, Status> {
        Ok(args.iter().rev().copied().collect::<Vec<u8>>().into())
    };
    let fail = |_: &[u8]| -> Result<Bytes, Status> { Err(Status::BadArgument) };
    let (plugin, logs) = h
        .load_with(&wasm, config("foreign"), |b| {
            b.foreign_function("reverse", Arc::new(reverse))
                .foreign_function("fail", Arc::new(fail))
        })
        .map_err(|e| e.to_string())?;
    let mut vm = Vm::new(&plugin).map_err(vm_error)?;
    empty_request(&mut vm)?;
    vm.on_foreign_function(7, b"from the host")
        .map_err(vm_error)?;
    let got = reports(&logs);
    ensure!(got == [0, 1, 2, 0, 0, 7], "statuses: {got:?}");
    ensure!(
        logged(&logs, "cba") && logged(&logs, "abc") && logged(&logs, "from the host"),
        "logs: {:?}",
        logs.messages()
    );
    Ok(())
}

/// Root-context shutdown (`proxy_on_done` false, then `proxy_done` from a later callback),
/// `proxy_done` outside it, `proxy_get_status` outside a callout, and properties a plugin
/// sets and reads back.
pub(crate) fn contexts_and_properties(h: &Harness) -> CaseResult {
    let path = property_path::encode(&["my", "key"]);
    let body = r#"
        (call $report (call $proxy_done))
        (call $report (call $proxy_get_status (i32.const 3000) (i32.const 3004) (i32.const 3008)))
        (call $report (i32.load (i32.const 3000)))
        (call $report (call $proxy_set_property (i32.const 100) (i32.const 6) (i32.const 120) (i32.const 5)))
        (call $report (call $proxy_get_property (i32.const 100) (i32.const 6) (i32.const 3010) (i32.const 3014)))
        (drop (call $log (i32.const 2) (i32.load (i32.const 3010)) (i32.load (i32.const 3014))))
        (call $report (call $proxy_set_property (i32.const 100) (i32.const 0) (i32.const 120) (i32.const 5)))
        (i32.const 0)"#;
    let extra = format!(
        r#"(data (i32.const 100) "{}") (data (i32.const 120) "value") (data (i32.const 130) "deleted")
        (func (export "proxy_on_tick") (param i32) (call $report (call $proxy_done)))"#,
        wat_bytes(&path)
    );
    let wasm = module(
        &imports(&[
            Import::ProxyDone,
            Import::ProxyGetStatus,
            Import::ProxySetProperty,
            Import::ProxyGetProperty,
        ]),
        &[
            (Callback::ProxyOnRequestHeaders, body),
            // The root context (id 1) asks to finish later; streams are done at once.
            (
                Callback::ProxyOnDone,
                "(i32.ne (local.get 0) (i32.const 1))",
            ),
            (
                Callback::ProxyOnDelete,
                "(if (i32.eq (local.get 0) (i32.const 1)) (then (drop (call $log (i32.const 2) (i32.const 130) (i32.const 7)))))",
            ),
        ],
        &extra,
    )?;
    let (mut vm, logs) = h.start(&wasm, config("contexts"))?;
    let stream = empty_request(&mut vm)?;
    vm.finish_stream(stream).map_err(vm_error)?;
    let got = reports(&logs);
    ensure!(got == [1, 0, 0, 0, 0, 2], "statuses: {got:?}");
    ensure!(
        logged(&logs, "value"),
        "property read back: {:?}",
        logs.messages()
    );
    ensure!(
        !vm.shutdown().map_err(vm_error)?,
        "shutdown finished at once"
    );
    ensure!(
        !vm.is_done() && !logged(&logs, "deleted"),
        "root deleted early"
    );
    vm.on_tick().map_err(vm_error)?;
    ensure!(
        vm.is_done() && logged(&logs, "deleted"),
        "proxy_done did not finish the root: {:?}",
        logs.messages()
    );
    ensure!(
        reports(&logs).last() == Some(&0),
        "proxy_done: {:?}",
        reports(&logs)
    );
    Ok(())
}

/// `proc_exit` ends the VM with an exit trap, except `proc_exit(0)` in a start function,
/// which ends the start cleanly.
pub(crate) fn proc_exit(h: &Harness) -> CaseResult {
    let exit_import = imports(&[Import::ProcExit]);
    let wasm = module(
        &exit_import,
        &[(
            Callback::ProxyOnRequestHeaders,
            "(call $proc_exit (i32.const 3)) (i32.const 0)",
        )],
        r#"(func (export "_start") (call $proc_exit (i32.const 0)) (unreachable))"#,
    )?;
    let (mut vm, _) = h.start(&wasm, config("exit"))?;
    let stream = vm.create_http_stream().map_err(vm_error)?;
    match vm.on_request_headers(&stream, &mut headers(&[]), true) {
        Err(VmError::Trap { trap, .. }) if trap.kind == TrapKind::Exit => Ok(()),
        other => Err(format!("proc_exit(3): {other:?}").into()),
    }
}

/// An L4 filter: a new connection, downstream data the plugin reads and prefixes, upstream
/// data it pauses, and the close callbacks with their peer type.
pub(crate) fn tcp_connection(h: &Harness) -> CaseResult {
    let extra = r#"(data (i32.const 100) "pre-")
        (func (export "proxy_on_new_connection") (param i32) (result i32)
          (call $report (i32.const 9)) (i32.const 0))
        (func (export "proxy_on_downstream_data") (param i32 i32 i32) (result i32)
          (drop (call $proxy_get_buffer_bytes (i32.const 2) (i32.const 0) (local.get 1) (i32.const 3000) (i32.const 3004)))
          (drop (call $log (i32.const 2) (i32.load (i32.const 3000)) (i32.load (i32.const 3004))))
          (call $report (call $proxy_set_buffer_bytes (i32.const 2) (i32.const 0) (i32.const 0) (i32.const 100) (i32.const 4)))
          (i32.const 0))
        (func (export "proxy_on_upstream_data") (param i32 i32 i32) (result i32)
          (call $report (call $proxy_continue_stream (i32.const 3)))
          (i32.const 1))
        (func (export "proxy_on_downstream_connection_close") (param i32 i32)
          (call $report (local.get 1)))
        (func (export "proxy_on_upstream_connection_close") (param i32 i32)
          (call $report (local.get 1)))"#;
    let wasm = module(
        &imports(&[
            Import::ProxyGetBufferBytes,
            Import::ProxySetBufferBytes,
            Import::ProxyContinueStream,
        ]),
        &[],
        extra,
    )?;
    let (mut vm, logs) = h.start(&wasm, config("tcp"))?;
    let (connection, action) = vm.create_connection().map_err(vm_error)?;
    ensure!(action == Action::Continue, "new connection: {action:?}");
    let mut data = BytesMut::from(&b"hello"[..]);
    let action = vm
        .on_downstream_data(&connection, &mut data, false)
        .map_err(vm_error)?;
    ensure!(
        action == Action::Continue && data == b"pre-hello"[..],
        "downstream: {action:?} {data:?}"
    );
    let mut up = BytesMut::from(&b"answer"[..]);
    let action = vm
        .on_upstream_data(&connection, &mut up, true)
        .map_err(vm_error)?;
    ensure!(action == Action::Pause, "upstream: {action:?}");
    vm.on_downstream_connection_close(&connection, PeerType::Remote)
        .map_err(vm_error)?;
    vm.on_upstream_connection_close(&connection, PeerType::Local)
        .map_err(vm_error)?;
    vm.finish_connection(connection).map_err(vm_error)?;
    ensure!(logged(&logs, "hello"), "logs: {:?}", logs.messages());
    let got = reports(&logs);
    // Resuming an upstream is Unimplemented (12) as in Envoy.
    ensure!(got == [9, 0, 12, 2, 1], "statuses: {got:?}");
    ensure!(
        vm.context_count() == 1,
        "contexts left: {}",
        vm.context_count()
    );
    Ok(())
}

/// A plugin built with the Rust SDK 0.1.x (ABI 0.1.0): `proxy_get_configuration` in
/// `proxy_on_configure`, header callbacks without `end_of_stream`, an HTTP call answered
/// through the 0.1.0 callback and the request resumed with `proxy_continue_request`.
pub(crate) fn abi_0_1_0_plugin(h: &Harness) -> CaseResult {
    let config = config("abi010").with_configuration("cfg-text");
    let (mut vm, logs) = start_with_servers(h, guests::ABI010, config)?;
    let abi = vm.plugin().abi_version();
    ensure!(abi == filterbox::AbiVersion::V0_1_0, "ABI {abi:?}");
    ensure!(
        logged(&logs, "configuration cfg-text"),
        "logs: {:?}",
        logs.messages()
    );
    let stream = vm.create_http_stream().map_err(vm_error)?;
    let mut request = headers(&[(":method", "GET"), (":path", "/"), (":authority", "x")]);
    let action = vm
        .on_request_headers(&stream, &mut request, true)
        .map_err(vm_error)?;
    ensure!(
        action == Action::Continue && request.get_str("x-abi") == Some("0.1.0"),
        "plain request: {action:?} {request:?}"
    );
    vm.finish_stream(stream).map_err(vm_error)?;
    let (stream, resumed) = pause_until_resumed(&mut vm, "/pause")?;
    ensure!(
        resumed.get_str("x-lookup") == Some("found") && resumed.get_str("x-abi") == Some("0.1.0"),
        "resumed headers: {resumed:?}"
    );
    vm.finish_stream(stream).map_err(vm_error)?;
    Ok(())
}

/// A plugin built with the AssemblyScript SDK (ABI 0.2.0, `malloc` allocator, no start
/// function, root context found by its root id): headers added on both sides, a local
/// response, a metric. Its configuration is three bytes on purpose: the SDK passes the
/// configuration size where `proxy_get_buffer_bytes` wants the size out-pointer, so the host
/// (as Envoy) writes the size to address 3, in the reserved low bytes of AssemblyScript's
/// memory; an empty one makes the SDK free a stale buffer.
/// A GET of `/x` through both header phases of `vm`: each must continue, the request leaving
/// with header `added[0]` and the response with `added[1]`. Returns the stream and the maps.
fn get_x_through(
    vm: &mut Vm,
    logs: &LogCapture,
    added: [(&str, &str); 2],
) -> Result<(HttpStream, HeaderMap, HeaderMap), Failure> {
    let [
        (request_name, request_value),
        (response_name, response_value),
    ] = added;
    let stream = vm.create_http_stream().map_err(vm_error)?;
    let mut request = headers(&[(":method", "GET"), (":path", "/x"), (":authority", "a")]);
    let action = vm
        .on_request_headers(&stream, &mut request, false)
        .map_err(vm_error)?;
    ensure!(
        action == Action::Continue && request.get_str(request_name) == Some(request_value),
        "request: {action:?} {request:?}; logs {:?}",
        logs.messages()
    );
    let mut response = headers(&[(":status", "200")]);
    let action = vm
        .on_response_headers(&stream, &mut response, true)
        .map_err(vm_error)?;
    ensure!(
        action == Action::Continue && response.get_str(response_name) == Some(response_value),
        "response: {action:?} {response:?}"
    );
    Ok((stream, request, response))
}

/// The C++ guest (clang + libc++ + wasi-libc, reactor, `malloc` as its allocator): its
/// static constructors ran in `_initialize` before `proxy_on_vm_start`, it reads its
/// configuration and the request path through buffers the host allocated with its `malloc`
/// (and it frees), adds headers both ways, and answers `/deny` with a local response.
pub(crate) fn cpp_plugin(h: &Harness) -> CaseResult {
    let (mut vm, logs) = h.start(guests::CPP, config("cpp").with_configuration("from-config"))?;
    let added = [("x-cpp", "from-config"), ("x-cpp-response", "yes")];
    let (stream, _, _) = get_x_through(&mut vm, &logs, added)?;
    vm.finish_stream(stream).map_err(vm_error)?;
    let stream = vm.create_http_stream().map_err(vm_error)?;
    let mut request = headers(&[
        (":method", "GET"),
        (":path", "/deny/me"),
        (":authority", "a"),
    ]);
    match vm
        .on_request_headers(&stream, &mut request, true)
        .map_err(vm_error)?
    {
        Action::Respond(r)
            if r.status_code == 403
                && r.body == "denied by c++\n"
                && r.headers.get_str("x-denied-by") == Some("cpp") => {}
        other => return Err(format!("/deny/me: {other:?}").into()),
    }
    vm.finish_stream(stream).map_err(vm_error)?;
    let lines = logs.messages();
    let wanted = [
        "hello from c++",
        "configured: from-config",
        "stream 2 saw /x",
        "stream 3 saw /deny/me",
    ];
    ensure!(
        wanted.iter().all(|w| lines.iter().any(|l| l == w)),
        "logs: {lines:?}"
    );
    ensure!(
        vm.context_count() == 1,
        "contexts left: {}",
        vm.context_count()
    );
    Ok(())
}

pub(crate) fn assemblyscript_plugin(h: &Harness) -> CaseResult {
    let mut config = config("assemblyscript").with_configuration("abc");
    config.root_id = "as_root".into();
    let (mut vm, logs) = h.start(guests::ASSEMBLYSCRIPT, config)?;
    ensure!(
        vm.plugin().abi_version() == filterbox::AbiVersion::V0_2_0,
        "ABI {:?}",
        vm.plugin().abi_version()
    );
    let added = [("x-as", "/x"), ("x-as-response", "yes")];
    let (stream, mut request, mut response) = get_x_through(&mut vm, &logs, added)?;
    vm.on_log(&stream, &mut request, &mut response)
        .map_err(vm_error)?;
    vm.finish_stream(stream).map_err(vm_error)?;
    let stream = vm.create_http_stream().map_err(vm_error)?;
    let mut request = headers(&[(":method", "GET"), (":path", "/deny"), (":authority", "a")]);
    match vm
        .on_request_headers(&stream, &mut request, true)
        .map_err(vm_error)?
    {
        Action::Respond(r) if r.status_code == 403 && r.body == "denied by as" => {}
        other => return Err(format!("/deny: {other:?}").into()),
    }
    vm.finish_stream(stream).map_err(vm_error)?;
    ensure!(
        logged(&logs, "as request /x") && logged(&logs, "as request /deny"),
        "logs: {:?}",
        logs.messages()
    );
    let requests = vm.plugin().metric_registry().value("as_requests");
    ensure!(
        requests == Some(MetricValue::Counter(2)),
        "as_requests: {requests:?}"
    );
    ensure!(
        vm.context_count() == 1,
        "contexts left: {}",
        vm.context_count()
    );
    Ok(())
}

/// Envoy's attributes: `request.*` from the stream (also after the request headers went
/// back to the proxy), `response.code` as an 8-byte integer, a per-stream value the embedder
/// set (`source.address`), and node metadata from the embedder's provider asked under the
/// old spelling (`node.id`) while it answers the new one (`xds.node.id`).
pub(crate) fn envoy_attributes(h: &Harness) -> CaseResult {
    let paths: [&[&str]; 6] = [
        &["request", "url_path"],
        &["request", "headers", "x-key"],
        &["source", "address"],
        &["node", "id"],
        &["request", "method"],
        &["response", "code"],
    ];
    let mut data = String::new();
    let mut at = Vec::new();
    let mut offset = 100;
    for path in paths {
        let encoded = property_path::encode(path);
        let _ = write!(
            data,
            r#"(data (i32.const {offset}) "{}")"#,
            wat_bytes(&encoded)
        );
        at.push((offset, encoded.len()));
        offset += encoded.len() + 8;
    }
    let get_and_log = |(ptr, len): (usize, usize)| {
        format!(
            "(call $report (call $proxy_get_property (i32.const {ptr}) (i32.const {len}) (i32.const 3000) (i32.const 3004)))
             (drop (call $log (i32.const 2) (i32.load (i32.const 3000)) (i32.load (i32.const 3004))))"
        )
    };
    let request_body: String = at[..4].iter().map(|a| get_and_log(*a)).collect();
    let (code_ptr, code_len) = at[5];
    let response_body = format!(
        "{} (call $report (call $proxy_get_property (i32.const {code_ptr}) (i32.const {code_len}) (i32.const 3000) (i32.const 3004)))
         (call $report (i32.load (i32.load (i32.const 3000))))
         (call $report (i32.load (i32.const 3004)))",
        get_and_log(at[4])
    );
    let wasm = module(
        &imports(&[Import::ProxyGetProperty]),
        &[
            (
                Callback::ProxyOnRequestHeaders,
                &format!("{request_body} (i32.const 0)"),
            ),
            (
                Callback::ProxyOnResponseHeaders,
                &format!("{response_body} (i32.const 0)"),
            ),
        ],
        &data,
    )?;
    struct Node;
    impl filterbox::PropertyProvider for Node {
        fn property(&self, path: &[&[u8]]) -> Option<Bytes> {
            (path == [&b"xds"[..], b"node", b"id"]).then(|| Bytes::from_static(b"node-1"))
        }
    }
    let (plugin, logs) = h
        .load_with(&wasm, config("attributes"), |b| {
            b.properties(Arc::new(Node))
        })
        .map_err(|e| e.to_string())?;
    let mut vm = Vm::new(&plugin).map_err(vm_error)?;
    let stream = vm.create_http_stream().map_err(vm_error)?;
    vm.set_stream_property(
        &stream,
        &["source", "address"],
        Bytes::from_static(b"10.0.0.1:5555"),
    );
    let mut request = headers(&[
        (":method", "PUT"),
        (":path", "/p/q?z=1"),
        (":authority", "a"),
        ("x-key", "one"),
        ("x-key", "two"),
    ]);
    vm.on_request_headers(&stream, &mut request, true)
        .map_err(vm_error)?;
    let mut response = headers(&[(":status", "200")]);
    vm.on_response_headers(&stream, &mut response, true)
        .map_err(vm_error)?;
    vm.finish_stream(stream).map_err(vm_error)?;
    let lines: Vec<String> = logs
        .messages()
        .into_iter()
        .filter(|m| m.len() != 2)
        .collect();
    ensure!(
        lines == ["/p/q", "one,two", "10.0.0.1:5555", "node-1", "PUT"],
        "values: {lines:?}"
    );
    let got = reports(&logs);
    ensure!(
        got == [0, 0, 0, 0, 0, 0, 200, 8],
        "statuses and response.code: {got:?}"
    );
    Ok(())
}

/// A client that never answers: it keeps every reply handle until it is dropped.
#[derive(Default)]
struct Silent(parking_lot::Mutex<Vec<HttpCallReply>>);

impl Callouts for Silent {
    fn http_call(&self, _: HttpCallRequest, reply: HttpCallReply) -> Result<(), CalloutError> {
        self.0.lock().push(reply);
        Ok(())
    }

    fn grpc_open(&self, _: GrpcRequest, _: GrpcReply) -> Result<Box<dyn GrpcStream>, CalloutError> {
        Err(CalloutError::Unsupported)
    }
}

/// A plugin that writes as fast as it can into every host-held store (shared data keys,
/// one queue, metric definitions, pending HTTP calls) is stopped at each bound with
/// `InternalFailure`, after exactly as many successes as the bound allows; the VM stays
/// healthy.
pub(crate) fn floods_stop_at_their_bounds(h: &Harness) -> CaseResult {
    let headers_pairs = encode_pairs(&[(":method", "GET"), (":path", "/"), (":authority", "a")]);
    // Each flood calls `$call` with the loop counter stored at 200 (a fresh key or name)
    // until it fails, then reports how many calls succeeded and the failing status.
    let flood = |call: &str| {
        format!(
            "(local.set $i (i32.const 0)) (local.set $ok (i32.const 0))
             (block $done (loop $next
               (i32.store (i32.const 200) (local.get $i))
               (local.set $s {call})
               (br_if $done (local.get $s))
               (local.set $ok (i32.add (local.get $ok) (i32.const 1)))
               (local.set $i (i32.add (local.get $i) (i32.const 1)))
               (br_if $next (i32.lt_u (local.get $i) (i32.const 1000)))))
             (call $report (local.get $ok)) (call $report (local.get $s))"
        )
    };
    let body = [
        flood("(call $proxy_set_shared_data (i32.const 200) (i32.const 4) (i32.const 300) (i32.const 100) (i32.const 0))"),
        "(drop (call $proxy_register_shared_queue (i32.const 210) (i32.const 1) (i32.const 220)))".into(),
        flood("(call $proxy_enqueue_shared_queue (i32.load (i32.const 220)) (i32.const 300) (i32.const 100))"),
        flood("(call $proxy_define_metric (i32.const 0) (i32.const 200) (i32.const 4) (i32.const 230))"),
        flood(&format!(
            "(call $proxy_http_call (i32.const 240) (i32.const 7) (i32.const 500) (i32.const {}) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 250))",
            headers_pairs.len()
        )),
    ]
    .join("\n");
    let wasm = module(
        &imports(&[
            Import::ProxySetSharedData,
            Import::ProxyRegisterSharedQueue,
            Import::ProxyEnqueueSharedQueue,
            Import::ProxyDefineMetric,
            Import::ProxyHttpCall,
        ]),
        &[(
            Callback::ProxyOnRequestHeaders,
            &format!("(local $i i32) (local $ok i32) (local $s i32) {body} (i32.const 0)"),
        )],
        &format!(
            r#"(data (i32.const 210) "q") (data (i32.const 240) "backend") (data (i32.const 500) "{}")"#,
            wat_bytes(&headers_pairs)
        ),
    )?;
    let limits = {
        let mut limits = Limits::default();
        limits.max_pending_callouts = 30;
        limits.callback_deadline_ms = Some(2000);
        limits
    };
    let world = SharedState::new(
        SharedLimits::default()
            .with_max_keys(50)
            .with_max_queue_messages(20),
    );
    let silent = Arc::new(Silent::default());
    let (plugin, logs) = h
        .load_with(&wasm, config("floods").with_limits(limits), |b| {
            b.shared_state(world)
                .metric_registry(Arc::new(filterbox::MetricRegistry::new(40)))
                .callouts(silent.clone())
        })
        .map_err(|e| e.to_string())?;
    let mut vm = Vm::new(&plugin).map_err(vm_error)?;
    empty_request(&mut vm)?;
    let full = Status::InternalFailure.as_u32();
    let got = reports(&logs);
    ensure!(
        got == [50, full, 20, full, 40, full, 30, full],
        "successes and statuses (data, queue, metrics, callouts): {got:?}"
    );
    ensure!(
        silent.0.lock().len() == 30,
        "calls sent: {}",
        silent.0.lock().len()
    );
    ensure!(vm.failure().is_none(), "VM failed: {:?}", vm.failure());
    Ok(())
}

/// `proxy_validate_configuration` sees the candidate configuration (not the applied one) and
/// its answer is returned; the metadata callbacks get the element count and their return
/// value decides the action.
pub(crate) fn validate_configuration_and_metadata(h: &Harness) -> CaseResult {
    // Accepts a candidate whose first byte is 'y'; logs what it read.
    let extra = r#"(func (export "proxy_validate_configuration") (param i32 i32) (result i32)
          (drop (call $proxy_get_buffer_bytes (i32.const 7) (i32.const 0) (local.get 1) (i32.const 3000) (i32.const 3004)))
          (drop (call $log (i32.const 2) (i32.load (i32.const 3000)) (i32.load (i32.const 3004))))
          (i32.eq (i32.load8_u (i32.load (i32.const 3000))) (i32.const 121)))
        (func (export "proxy_on_request_metadata") (param i32 i32) (result i32)
          (call $report (local.get 1)) (i32.const 0))
        (func (export "proxy_on_response_metadata") (param i32 i32) (result i32)
          (call $report (local.get 1)) (i32.const 1))"#;
    let wasm = module(&imports(&[Import::ProxyGetBufferBytes]), &[], extra)?;
    let (mut vm, logs) = h.start(&wasm, config("validate").with_configuration("applied"))?;
    ensure!(
        vm.validate_configuration(b"yes please").map_err(vm_error)?,
        "refused 'yes please'"
    );
    ensure!(
        !vm.validate_configuration(b"nope").map_err(vm_error)?,
        "accepted nope"
    );
    ensure!(
        logged(&logs, "yes please") && logged(&logs, "nope") && !logged(&logs, "applied"),
        "what validation read: {:?}",
        logs.messages()
    );
    let stream = vm.create_http_stream().map_err(vm_error)?;
    let request = vm.on_request_metadata(&stream, 3).map_err(vm_error)?;
    let response = vm.on_response_metadata(&stream, 5).map_err(vm_error)?;
    // Envoy ignores what metadata callbacks return: both continue.
    ensure!(
        request == Action::Continue && response == Action::Continue,
        "actions: {request:?} {response:?}"
    );
    ensure!(reports(&logs) == [3, 5], "counts: {:?}", reports(&logs));
    vm.finish_stream(stream).map_err(vm_error)?;
    Ok(())
}

/// The hostcalls without pointers or with only an out-pointer, each with its effect:
/// `clear_route_cache`, `continue_request`/`continue_response` (0.1.0, linked for every
/// version), `continue_stream`/`close_stream` become stream events in order;
/// `get_header_map_size` is Envoy's byte count; `get_log_level` the configured level;
/// `get_current_time_nanoseconds` the wall clock (checked to be a plausible date).
pub(crate) fn stream_control_and_queries(h: &Harness) -> CaseResult {
    let body = r#"
        (call $report (call $proxy_clear_route_cache))
        (call $report (call $proxy_continue_request))
        (call $report (call $proxy_continue_response))
        (call $report (call $proxy_continue_stream (i32.const 1)))
        (call $report (call $proxy_close_stream (i32.const 0)))
        (call $report (call $proxy_close_stream (i32.const 9)))
        (call $report (call $proxy_get_header_map_size (i32.const 0) (i32.const 3000)))
        (call $report (i32.load (i32.const 3000)))
        (call $report (call $proxy_get_log_level (i32.const 3004)))
        (call $report (i32.load (i32.const 3004)))
        (call $report (call $proxy_get_current_time_nanoseconds (i32.const 3008)))
        ;; Wall-clock nanoseconds: after 2020-09-13 (1.6e18) and before 2100 (4.1e18).
        (call $report (i32.and
            (i64.gt_u (i64.load (i32.const 3008)) (i64.const 1600000000000000000))
            (i64.lt_u (i64.load (i32.const 3008)) (i64.const 4102444800000000000))))
        (i32.const 0)"#;
    let wasm = module(
        &imports(&[
            Import::ProxyClearRouteCache,
            Import::ProxyContinueRequest,
            Import::ProxyContinueResponse,
            Import::ProxyContinueStream,
            Import::ProxyCloseStream,
            Import::ProxyGetHeaderMapSize,
            Import::ProxyGetLogLevel,
            Import::ProxyGetCurrentTimeNanoseconds,
        ]),
        &[(Callback::ProxyOnRequestHeaders, body)],
        "",
    )?;
    let config = config("control").with_log_level(LogLevel::Warn);
    let (mut vm, logs) = h.start(&wasm, config)?;
    let stream = vm.create_http_stream().map_err(vm_error)?;
    // ":path" + "/ab" = 8 bytes.
    vm.on_request_headers(&stream, &mut headers(&[(":path", "/ab")]), true)
        .map_err(vm_error)?;
    let got = reports(&logs);
    let warn = LogLevel::Warn.as_u32();
    ensure!(
        got == [0, 0, 0, 0, 0, 2, 0, 8, 0, warn, 0, 1],
        "statuses and values: {got:?}"
    );
    let events = vm.take_stream_events(&stream);
    ensure!(
        events
            == [
                StreamEvent::ClearRouteCache,
                StreamEvent::Continue(StreamType::HttpRequest),
                StreamEvent::Continue(StreamType::HttpResponse),
                StreamEvent::Continue(StreamType::HttpResponse),
                StreamEvent::Close(StreamType::HttpRequest),
            ],
        "events: {events:?}"
    );
    vm.finish_stream(stream).map_err(vm_error)?;
    Ok(())
}
