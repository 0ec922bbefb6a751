//! Hostile modules against isolation: runaway loops in every callback, memory bombs, stack
//! overflows, bad pointers to every hostcall, re-entrant allocators, oversized modules, and
//! the recovery that must follow (fail policy, rebuilt VM, nothing leaked).

use crate::cases::expect_load_error;
use crate::harness::{CaseResult, Failure, Harness, LogCapture, headers};
use crate::{ensure, guests};
use bytes::BytesMut;
use filterbox::abi::{AbiVersion, Callback, Import, ImportModule, Status, ValType};
use filterbox::{
    Action, DeniedCapability, FailurePolicy, Limits, Plugin, PluginConfig, TrapKind, Worker,
    WorkerStream,
};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How far past its deadline a stopped loop may run before the case fails. Deadlines are
/// wall-clock time on every engine (wasmer's watchdog, wasmi's clock between fuel slices and
/// before hostcalls, wasmtime's epochs), so this only covers scheduling delays on a loaded
/// machine and unoptimised builds, not the engine.
pub(crate) const SLACK: Duration = Duration::from_millis(500);

/// Stream callbacks in the order a full stream calls them.
const STREAM_CALLBACKS: [Callback; 10] = [
    Callback::ProxyOnContextCreate,
    Callback::ProxyOnRequestHeaders,
    Callback::ProxyOnRequestBody,
    Callback::ProxyOnRequestTrailers,
    Callback::ProxyOnResponseHeaders,
    Callback::ProxyOnResponseBody,
    Callback::ProxyOnResponseTrailers,
    Callback::ProxyOnLog,
    Callback::ProxyOnDone,
    Callback::ProxyOnDelete,
];

fn wat_type(t: ValType) -> &'static str {
    match t {
        ValType::I32 => "i32",
        ValType::I64 => "i64",
    }
}

/// The WAT parameter list of `callback` on `version` (empty for none).
pub(crate) fn callback_params(callback: Callback, version: AbiVersion) -> String {
    let params: Vec<&str> = callback
        .params(version)
        .iter()
        .map(|t| wat_type(*t))
        .collect();
    match params.is_empty() {
        true => String::new(),
        false => format!("(param {})", params.join(" ")),
    }
}

/// An export of `callback` with its ABI 0.2.1 type whose body is `body`, or, with `None`, a
/// well-behaved one: true for the start callbacks and `proxy_on_done`, 0 (continue) else.
fn callback_export(callback: Callback, body: Option<&str>) -> String {
    let params = callback_params(callback, AbiVersion::V0_2_1);
    let (result, default) = match (callback.result(), callback) {
        (None, _) => ("", ""),
        (
            Some(_),
            Callback::ProxyOnVmStart | Callback::ProxyOnConfigure | Callback::ProxyOnDone,
        ) => ("(result i32)", "(i32.const 1)"),
        (Some(_), _) => ("(result i32)", "(i32.const 0)"),
    };
    let body = body.unwrap_or(default);
    format!(
        r#"(func (export "{}") {params} {result} {body})"#,
        callback.name()
    )
}

pub(crate) const OK: u32 = 0;
pub(crate) const BAD_ARGUMENT: u32 = 2;

/// A runaway loop; `unreachable` after it only satisfies the validator's result type.
const LOOP: &str = "(loop $forever (br $forever)) (unreachable)";

/// A module with memory, a bump allocator, every callback of `special` with its body and the
/// others well-behaved, plus `extra` (imports go first in `imports`).
pub(crate) fn module(
    imports: &str,
    special: &[(Callback, &str)],
    extra: &str,
) -> Result<Vec<u8>, Failure> {
    let mut callbacks = String::new();
    for callback in STREAM_CALLBACKS
        .iter()
        .chain(&[Callback::ProxyOnVmStart, Callback::ProxyOnConfigure])
    {
        let body = special.iter().find(|(c, _)| c == callback).map(|(_, b)| *b);
        callbacks.push_str(&callback_export(*callback, body));
        callbacks.push('\n');
    }
    let text = format!(
        r#"(module
            (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
            {imports}
            (memory (export "memory") 1)
            (global $next (mut i32) (i32.const 4096))
            (func (export "proxy_abi_version_0_2_1"))
            (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
                (local $p i32)
                (local.set $p (global.get $next))
                (global.set $next (i32.add (global.get $next) (i32.const 1024)))
                (local.get $p))
            ;; Logs a status or errno as two letters, 'a' + s / 16 and 'a' + s % 16.
            (func $report (param $s i32)
                (i32.store8 (i32.const 0) (i32.add (i32.const 97) (i32.shr_u (local.get $s) (i32.const 4))))
                (i32.store8 (i32.const 1) (i32.add (i32.const 97) (i32.and (local.get $s) (i32.const 15))))
                (drop (call $log (i32.const 2) (i32.const 0) (i32.const 2))))
            {callbacks}
            {extra}
        )"#
    );
    wat::parse_str(&text).map_err(|e| Failure::Fail(format!("hostile WAT does not parse: {e}")))
}

/// The config the cases use: short deadlines so loops end quickly, immediate rebuilds.
pub(crate) fn config(name: &str) -> PluginConfig {
    let limits = {
        let mut limits = Limits::default();
        limits.callback_deadline_ms = Some(20);
        limits.start_deadline_ms = Some(100);
        limits
    };
    PluginConfig::named(name).with_limits(limits)
}

/// The statuses a module reported with `$report`, from its two-letter log lines.
pub(crate) fn reports(logs: &LogCapture) -> Vec<u32> {
    logs.messages()
        .iter()
        .filter_map(|m| match m.as_bytes() {
            [hi @ b'a'..=b'p', lo @ b'a'..=b'p'] => {
                Some(u32::from(hi - b'a') * 16 + u32::from(lo - b'a'))
            }
            _ => None,
        })
        .collect()
}

/// Loads `wasm` and starts a worker on it.
pub(crate) fn worker(
    h: &Harness,
    wasm: &[u8],
    config: PluginConfig,
) -> Result<(Worker, Plugin, Arc<LogCapture>), Failure> {
    let (plugin, logs) = h
        .load(wasm, config)
        .map_err(|e| format!("load failed: {e}"))?;
    let worker = Worker::new(&plugin)
        .map_err(|e| format!("start failed: {e}; logs: {:?}", logs.messages()))?;
    Ok((worker, plugin, logs))
}

/// Drives one whole stream (every phase, small bodies, trailers) and returns the first
/// failure, or `None` if the plugin served it.
pub(crate) fn full_stream(
    worker: &mut Worker,
    request: &[(&str, &str)],
) -> Option<filterbox::Failure> {
    let mut stream = worker.create_stream();
    let outcome = run_phases(worker, &mut stream, request);
    let finished = worker.finish_stream(stream);
    outcome.err().or(finished.err())
}

fn run_phases(
    worker: &mut Worker,
    stream: &mut WorkerStream,
    request: &[(&str, &str)],
) -> Result<(), filterbox::Failure> {
    if let Some(failure) = stream.failure() {
        return Err(failure.clone());
    }
    let mut req = headers(request);
    worker.on_request_headers(stream, &mut req, false)?;
    worker.on_request_body(stream, &mut BytesMut::from(&b"body"[..]), false)?;
    worker.on_request_trailers(stream, &mut headers(&[("x-t", "1")]))?;
    let mut resp = headers(&[(":status", "200")]);
    worker.on_response_headers(stream, &mut resp, false)?;
    worker.on_response_body(stream, &mut BytesMut::from(&b"body"[..]), false)?;
    worker.on_response_trailers(stream, &mut headers(&[("x-t", "1")]))?;
    worker.on_log(stream, &mut req, &mut resp)
}

/// Checks that a failure is a trap of `kind` and that the stream got the default
/// fail-closed answer (503).
pub(crate) fn expect_trap(failure: &filterbox::Failure, kind: TrapKind, what: &str) -> CaseResult {
    let trap = failure
        .trap()
        .ok_or_else(|| format!("{what}: no trap in {failure}"))?;
    ensure!(trap.kind == kind, "{what}: trap {trap}, wanted {kind:?}");
    match failure.action() {
        Action::Respond(r) if r.status_code == 503 => Ok(()),
        other => Err(format!("{what}: fail-closed must answer 503, got {other:?}").into()),
    }
}

/// After the worker is gone, no VM of the plugin and none of its memory may be left.
pub(crate) fn expect_nothing_leaked(plugin: &Plugin) -> CaseResult {
    let m = plugin.metrics();
    ensure!(
        m.vms_active() == 0 && m.memory_live_bytes() == 0,
        "leaked: {} VMs, {} bytes of memory still live",
        m.vms_active(),
        m.memory_live_bytes()
    );
    Ok(())
}

/// A runaway loop in each stream callback in turn: the loop is stopped, the stream gets
/// the policy, the next stream runs on a rebuilt VM, and nothing is leaked.
pub(crate) fn loop_in_every_stream_callback(h: &Harness) -> CaseResult {
    for callback in STREAM_CALLBACKS {
        // The root context is created with parent 0; loop only in stream contexts.
        let body = match callback {
            Callback::ProxyOnContextCreate => {
                "(if (local.get 1) (then (loop $forever (br $forever))))"
            }
            _ => LOOP,
        };
        let wasm = module("", &[(callback, body)], "")?;
        let (mut worker, plugin, _) = worker(h, &wasm, config("loop"))?;
        let started = Instant::now();
        let failure = full_stream(&mut worker, &[(":path", "/")])
            .ok_or_else(|| format!("{}: the loop was not stopped", callback.name()))?;
        let elapsed = started.elapsed();
        expect_trap(&failure, TrapKind::Interrupted, callback.name())?;
        ensure!(
            elapsed < Duration::from_millis(20) + SLACK,
            "{}: stopped after {elapsed:?}",
            callback.name()
        );
        // The stream after it gets a fresh VM (which loops in turn, so it fails the same
        // way, on a new VM each time).
        let again = full_stream(&mut worker, &[(":path", "/")]);
        ensure!(
            again.as_ref().and_then(|f| f.trap()).map(|t| t.kind) == Some(TrapKind::Interrupted),
            "{}: second stream: {again:?}",
            callback.name()
        );
        ensure!(
            plugin.metrics().vms_restarted() == 1,
            "{}: {} rebuilds, wanted 1",
            callback.name(),
            plugin.metrics().vms_restarted()
        );
        drop(worker);
        expect_nothing_leaked(&plugin)?;
    }
    Ok(())
}

/// A runaway loop while the VM starts (`_initialize`, a wasm start section,
/// `proxy_on_vm_start`, `proxy_on_configure`): the start fails with a deadline trap.
pub(crate) fn loop_while_starting(h: &Harness) -> CaseResult {
    let cases: [(&str, Vec<u8>); 4] = [
        (
            "_initialize",
            module("", &[], &format!(r#"(func (export "_initialize") {LOOP})"#))?,
        ),
        (
            "start section",
            module("", &[], "(func $spin (loop $l (br $l))) (start $spin)")?,
        ),
        (
            "proxy_on_vm_start",
            module("", &[(Callback::ProxyOnVmStart, LOOP)], "")?,
        ),
        (
            "proxy_on_configure",
            module("", &[(Callback::ProxyOnConfigure, LOOP)], "")?,
        ),
    ];
    for (what, wasm) in cases {
        let (plugin, _) = h
            .load(&wasm, config("start-loop"))
            .map_err(|e| format!("{what}: load failed: {e}"))?;
        let started = Instant::now();
        let error = match Worker::new(&plugin) {
            Ok(_) => return Err(format!("{what}: the loop was not stopped").into()),
            Err(e) => e,
        };
        let elapsed = started.elapsed();
        let text = error.to_string();
        // Wasmer's metering ends a start section with `unreachable` and no instance is
        // left to ask whether the budget ran out, so there any trap in time is right.
        let wasmer_start = what == "start section" && h.kind().name().starts_with("wasmer");
        ensure!(
            text.contains("interrupted")
                || (wasmer_start && text.contains("start section trapped")),
            "{what}: wanted a deadline trap, got {text}"
        );
        ensure!(
            elapsed < Duration::from_millis(100) + SLACK,
            "{what}: stopped after {elapsed:?}"
        );
        expect_nothing_leaked(&plugin)?;
    }
    Ok(())
}

/// `memory.grow` in a loop: growth stops at the configured limit inside the guest (grow
/// returns -1), the guest then traps as an SDK would, and the host is untouched.
pub(crate) fn memory_bomb(h: &Harness) -> CaseResult {
    let wasm = module(
        "",
        &[(
            Callback::ProxyOnRequestHeaders,
            "(local $pages i32)
             (block $full (loop $grow
                 (br_if $full (i32.eq (memory.grow (i32.const 16)) (i32.const -1)))
                 (local.set $pages (i32.add (local.get $pages) (i32.const 16)))
                 (br $grow)))
             (call $report (i32.div_u (local.get $pages) (i32.const 16)))
             (unreachable)",
        )],
        "",
    )?;
    let limit = 4 << 20;
    let mut config = config("memory-bomb");
    config.limits.memory_bytes = limit;
    let (mut worker, plugin, logs) = worker(h, &wasm, config)?;
    let failure = full_stream(&mut worker, &[]).ok_or("the bomb did not trap")?;
    expect_trap(&failure, TrapKind::Unreachable, "memory bomb")?;
    // 4 MiB is 64 pages: one page at start, then 3 grows of 16 fit (49 pages), a fourth
    // (65) does not.
    let grows = reports(&logs);
    ensure!(grows == [3], "grows before the limit: {grows:?}");
    let high = plugin.metrics().memory_high_water_bytes();
    ensure!(
        high as usize <= limit,
        "memory reached {high} bytes, over the {limit} limit"
    );
    drop(worker);
    expect_nothing_leaked(&plugin)
}

/// Unbounded recursion traps as a stack overflow.
pub(crate) fn stack_overflow(h: &Harness) -> CaseResult {
    let wasm = module(
        "",
        &[(
            Callback::ProxyOnRequestHeaders,
            "(call $deep (i32.const 0)) (drop) (i32.const 0)",
        )],
        "(func $deep (param i32) (result i32)
             (i32.add (call $deep (i32.add (local.get 0) (i32.const 1))) (i32.const 1)))",
    )?;
    let (mut worker, plugin, _) = worker(h, &wasm, config("stack"))?;
    let failure = full_stream(&mut worker, &[]).ok_or("recursion did not trap")?;
    expect_trap(&failure, TrapKind::StackOverflow, "recursion")?;
    drop(worker);
    expect_nothing_leaked(&plugin)
}

/// A plugin that panics on one request: that stream fails closed, the next one runs on a
/// rebuilt VM and is served, and a stream that finishes resets the crash-loop count.
pub(crate) fn panic_once_then_recover(h: &Harness) -> CaseResult {
    let (mut worker, plugin, _) = worker(h, guests::LOGGER, config("logger"))?;
    let failure =
        full_stream(&mut worker, &[(":path", "/"), ("x-panic", "1")]).ok_or("no panic")?;
    expect_trap(&failure, TrapKind::Unreachable, "panic")?;
    for i in 0..3 {
        if let Some(f) = full_stream(&mut worker, &[(":path", "/")]) {
            return Err(format!("stream {i} after the panic failed: {f}").into());
        }
    }
    let m = plugin.metrics();
    ensure!(
        m.vms_restarted() == 1 && m.vms_failed() == 1 && m.traps(TrapKind::Unreachable) == 1,
        "restarted {}, failed {}, unreachable traps {}",
        m.vms_restarted(),
        m.vms_failed(),
        m.traps(TrapKind::Unreachable)
    );
    ensure!(
        m.streams_failed_closed() == 1,
        "fail-closed streams {}",
        m.streams_failed_closed()
    );
    ensure!(!worker.is_crash_looping(), "marked crash-looping");
    drop(worker);
    expect_nothing_leaked(&plugin)
}

/// Fail-open: the stream that hit the trap goes on untouched, headers as they came.
pub(crate) fn fail_open_lets_the_stream_through(h: &Harness) -> CaseResult {
    let config = config("logger").with_failure_policy(FailurePolicy::FailOpen);
    let (mut worker, plugin, _) = worker(h, guests::LOGGER, config)?;
    let mut stream = worker.create_stream();
    let mut req = headers(&[(":path", "/"), ("x-panic", "1")]);
    let failure = match worker.on_request_headers(&mut stream, &mut req, true) {
        Err(f) => f,
        Ok(a) => return Err(format!("no failure, got {a:?}").into()),
    };
    ensure!(
        failure.action() == &Action::Continue,
        "action {:?}",
        failure.action()
    );
    ensure!(req.len() == 2, "headers changed: {req:?}");
    // Later calls on the failed stream give the same answer without running anything.
    let later = worker.on_response_headers(&mut stream, &mut headers(&[]), true);
    ensure!(later == Err(failure), "later call: {later:?}");
    worker.finish_stream(stream).map_err(|e| e.to_string())?;
    ensure!(
        plugin.metrics().streams_failed_open() == 1,
        "fail-open count {}",
        plugin.metrics().streams_failed_open()
    );
    Ok(())
}

/// A VM that keeps failing is rebuilt only up to the crash-loop limit, then stays failed,
/// and says so.
pub(crate) fn crash_loop_stops_rebuilding(h: &Harness) -> CaseResult {
    let wasm = module(
        "",
        &[(Callback::ProxyOnRequestHeaders, "(unreachable)")],
        "",
    )?;
    let mut config = config("crash-loop");
    config.reload.crash_loop_limit = 3;
    config.reload.backoff_initial_ms = 1;
    config.reload.backoff_max_ms = 1;
    let (mut worker, plugin, _) = worker(h, &wasm, config)?;
    for i in 0..20 {
        // Every stream fails closed: on a trap while the VM still comes back, then because
        // the plugin stays failed.
        let failure = full_stream(&mut worker, &[])
            .ok_or_else(|| format!("stream {i} was served by a plugin that always traps"))?;
        match failure.action() {
            Action::Respond(r) if r.status_code == 503 => {}
            other => return Err(format!("stream {i}: wanted a 503, got {other:?}").into()),
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let m = plugin.metrics();
    ensure!(worker.is_crash_looping(), "not crash-looping");
    ensure!(
        m.vms_restarted() == 2 && m.crash_looped() == 1,
        "rebuilds {}, crash-looped gauge {}",
        m.vms_restarted(),
        m.crash_looped()
    );
    let mut text = String::new();
    m.render_prometheus("crash-loop", &mut text);
    ensure!(
        text.contains("filterbox_crash_looped_workers{plugin=\"crash-loop\"} 1"),
        "metrics: {text}"
    );
    drop(worker);
    ensure!(m.crash_looped() == 0, "gauge not cleared on drop");
    expect_nothing_leaked(&plugin)
}

/// The WAT import of `import`, as the function `$<name>`.
pub(crate) fn import_decl(import: Import) -> String {
    let module_name = match import.module() {
        ImportModule::Env => "env",
        ImportModule::Wasi => "wasi_snapshot_preview1",
    };
    let params: Vec<&str> = import.params().iter().map(|t| wat_type(*t)).collect();
    let result = match import.result() {
        Some(t) => format!("(result {})", wat_type(t)),
        None => String::new(),
    };
    format!(
        r#"(import "{module_name}" "{}" (func ${} (param {}) {result}))"#,
        import.name(),
        import.name(),
        params.join(" ")
    )
}

/// The argument list for `import` with every pointer (`*_ptr`) set to `ptr` and every size
/// set to `size`; other arguments are 0.
fn hostile_args(import: Import, ptr: i32, size: i32) -> String {
    let mut args = String::new();
    for (name, ty) in import.param_names().iter().zip(import.params()) {
        let value = if name.ends_with("_ptr") {
            ptr
        } else if name.ends_with("_size") || name.ends_with("_len") {
            size
        } else {
            0
        };
        let _ = write!(args, " ({}.const {value})", wat_type(*ty));
    }
    args
}

/// Every import that takes a pointer, called with pointers that run past the end of memory
/// and with pointer + size that overflow 32 bits: the host answers an error status (WASI: an
/// errno) every time, the VM stays healthy, and its memory is as it was.
pub(crate) fn bad_pointers_to_every_hostcall(h: &Harness) -> CaseResult {
    let targets: Vec<Import> = Import::ALL
        .iter()
        .copied()
        .filter(|i| i.param_names().iter().any(|n| n.ends_with("_ptr")))
        .filter(|i| *i != Import::ProxyLog)
        .collect();
    let mut imports = String::new();
    let mut calls = String::new();
    for import in &targets {
        let _ = writeln!(imports, "{}", import_decl(*import));
        // 65533: any word or wider written there runs past the end of the 64 KiB memory.
        for (ptr, size) in [(65533, 100), (-16, 32), (-1, -1)] {
            let call = format!(
                "(call ${}{})",
                import.name(),
                hostile_args(*import, ptr, size)
            );
            let _ = writeln!(
                calls,
                "{}",
                match import.result() {
                    Some(_) => format!("(call $report {call})"),
                    None => call,
                }
            );
        }
    }
    let body = format!(
        "{calls}
         ;; Below the allocator's blocks and at the end of memory, where the bad pointers aim,
         ;; every byte must still be zero: the host wrote nothing it should not have.
         (call $report (i32.ne (i32.add (call $sum (i32.const 2) (i32.const 4096))
                                        (call $sum (i32.const 61440) (i32.const 65536)))
                               (i32.const 0)))
         (i32.const 0)"
    );
    // The sum of bytes from..to (all are bytes, so it cannot wrap).
    let sum = "(func $sum (param $i i32) (param $to i32) (result i32) (local $s i32)
        (block $done (loop $l
            (br_if $done (i32.ge_u (local.get $i) (local.get $to)))
            (local.set $s (i32.add (local.get $s) (i32.load8_u (local.get $i))))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br $l)))
        (local.get $s))";
    let wasm = module(&imports, &[(Callback::ProxyOnRequestHeaders, &body)], sum)?;
    let (mut worker, plugin, logs) = worker(h, &wasm, config("bad-pointers"))?;
    if let Some(f) = full_stream(&mut worker, &[(":path", "/"), ("x-key", "v")]) {
        return Err(format!("the VM failed: {f}").into());
    }
    let reports = reports(&logs);
    let answered: Vec<Import> = targets
        .iter()
        .copied()
        .filter(|i| i.result().is_some())
        .flat_map(|i| [i, i, i])
        .collect();
    ensure!(
        reports.len() == answered.len() + 1,
        "{} reports for {} calls",
        reports.len(),
        answered.len()
    );
    for (import, status) in answered.iter().zip(&reports) {
        let valid = match import.module() {
            // Any error is right (which one depends on what the call checks first), Ok is not.
            ImportModule::Env => {
                Status::from_u32(*status).is_some() && *status != Status::Ok.as_u32()
            }
            // environ_get and args_get with nothing configured write nothing and succeed.
            ImportModule::Wasi => {
                *status != 0
                    || matches!(
                        import,
                        Import::EnvironGet | Import::ArgsGet | Import::ProcExit
                    )
            }
        };
        ensure!(valid, "{} answered {status}", import.name());
    }
    // The allocator's blocks (from 4096, 1 KiB each) stay well below 61440 here.
    ensure!(
        reports.last() == Some(&0),
        "guest memory changed: {:?}",
        reports.last()
    );
    drop(worker);
    expect_nothing_leaked(&plugin)
}

/// The allocator calls hostcalls while the host is waiting for it: logging is allowed, a
/// header edit and a local response are refused (`BadArgument`), and the outer call works.
pub(crate) fn reentrant_allocator(h: &Harness) -> CaseResult {
    let text = r#"(module
        (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
        (import "env" "proxy_get_header_map_value" (func $get_header (param i32 i32 i32 i32 i32) (result i32)))
        (import "env" "proxy_add_header_map_value" (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
        (import "env" "proxy_send_local_response" (func $respond (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
        (memory (export "memory") 1)
        (data (i32.const 16) "x-key")
        (global $next (mut i32) (i32.const 4096))
        (func (export "proxy_abi_version_0_2_1"))
        (func $report (param $s i32)
            (i32.store8 (i32.const 0) (i32.const 97))
            (i32.store8 (i32.const 1) (i32.add (i32.const 97) (local.get $s)))
            (drop (call $log (i32.const 2) (i32.const 0) (i32.const 2))))
        (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
            (local $p i32)
            (call $report (i32.const 0))
            (call $report (call $add_header (i32.const 0) (i32.const 16) (i32.const 5) (i32.const 16) (i32.const 5)))
            (call $report (call $respond (i32.const 403) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const -1)))
            (local.set $p (global.get $next))
            (global.set $next (i32.add (global.get $next) (i32.const 1024)))
            (local.get $p))
        (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
            (call $report (call $get_header (i32.const 0) (i32.const 16) (i32.const 5) (i32.const 100) (i32.const 104)))
            (i32.const 0))
    )"#;
    let wasm = wat::parse_str(text).map_err(|e| format!("WAT: {e}"))?;
    let (mut worker, _, logs) = worker(h, &wasm, config("reentrant"))?;
    let mut stream = worker.create_stream();
    let mut req = headers(&[("x-key", "v")]);
    let action = worker
        .on_request_headers(&mut stream, &mut req, true)
        .map_err(|f| f.to_string())?;
    ensure!(action == Action::Continue, "action {action:?}");
    ensure!(req.len() == 1, "the allocator changed headers: {req:?}");
    worker.finish_stream(stream).map_err(|f| f.to_string())?;
    let reports = reports(&logs);
    // In the allocator: log Ok, add refused, respond refused; then the outer get_header
    // succeeds.
    ensure!(
        reports == [OK, BAD_ARGUMENT, BAD_ARGUMENT, OK],
        "reports {reports:?}"
    );
    Ok(())
}

/// A local response from `proxy_on_log` is refused with `BadArgument`: the exchange is over.
pub(crate) fn local_response_in_on_log_is_refused(h: &Harness) -> CaseResult {
    let wasm = module(
        r#"(import "env" "proxy_send_local_response" (func $respond (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))"#,
        &[(
            Callback::ProxyOnLog,
            "(call $report (call $respond (i32.const 403) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const -1)))",
        )],
        "",
    )?;
    let (mut worker, _, logs) = worker(h, &wasm, config("log-respond"))?;
    if let Some(f) = full_stream(&mut worker, &[]) {
        return Err(format!("stream failed: {f}").into());
    }
    let reports = reports(&logs);
    ensure!(reports == [BAD_ARGUMENT], "reports {reports:?}");
    Ok(())
}

/// Capabilities: a denied import answers `Unimplemented` as a stub, or refuses the load.
pub(crate) fn denied_capabilities(h: &Harness) -> CaseResult {
    let wasm = module(
        r#"(import "env" "proxy_get_header_map_value" (func $get_header (param i32 i32 i32 i32 i32) (result i32)))
           (data (i32.const 16) "x-key")"#,
        &[(
            Callback::ProxyOnRequestHeaders,
            "(call $report (call $get_header (i32.const 0) (i32.const 16) (i32.const 5) (i32.const 100) (i32.const 104))) (i32.const 0)",
        )],
        "",
    )?;
    let stub = config("caps").with_allowed_capabilities(["proxy_log"], DeniedCapability::Stub);
    let (mut worker, _, logs) = worker(h, &wasm, stub)?;
    if let Some(f) = full_stream(&mut worker, &[("x-key", "v")]) {
        return Err(format!("stream failed: {f}").into());
    }
    let reports = reports(&logs);
    ensure!(
        reports == [Status::Unimplemented.as_u32()],
        "a stubbed import must answer Unimplemented: {reports:?}"
    );
    let refuse = config("caps").with_allowed_capabilities(["proxy_log"], DeniedCapability::Refuse);
    expect_load_error(
        h,
        &wasm,
        refuse,
        |e| {
            e.to_string()
                .contains("proxy_get_header_map_value outside allowed_capabilities")
        },
        "a refusal naming the denied import",
    )?;
    let unknown =
        config("caps").with_allowed_capabilities(["proxy_teleport"], DeniedCapability::Stub);
    expect_load_error(
        h,
        &wasm,
        unknown,
        |e| e.to_string().contains("proxy_teleport"),
        "an error naming the unknown capability",
    )
}

/// Wrong-typed and missing exports are refused at load, naming the export.
pub(crate) fn bad_exports_are_refused(h: &Harness) -> CaseResult {
    let text = r#"(module
        (memory (export "memory") 1)
        (func (export "proxy_abi_version_0_2_1"))
        (func (export "malloc") (param i32) (result i32) (i32.const 4096))
        (func (export "proxy_on_request_headers") (param i64) (result i32) (i32.const 0)))"#;
    let wasm = wat::parse_str(text).map_err(|e| format!("WAT: {e}"))?;
    expect_load_error(
        h,
        &wasm,
        config("bad-export"),
        |e| {
            e.to_string()
                .contains("proxy_on_request_headers has type (i64) -> (i32)")
        },
        "an error naming the mistyped export",
    )?;
    let text = r#"(module
        (func (export "proxy_abi_version_0_2_1"))
        (func (export "malloc") (param i32) (result i32) (i32.const 4096)))"#;
    let wasm = wat::parse_str(text).map_err(|e| format!("WAT: {e}"))?;
    expect_load_error(
        h,
        &wasm,
        config("no-memory"),
        |e| e.to_string().contains("does not export memory"),
        "a missing-memory error",
    )
}

/// A module with 100,000 functions loads and serves a stream (or is refused with a clear
/// error, never a crash).
pub(crate) fn hundred_thousand_functions(h: &Harness) -> CaseResult {
    let mut extra = String::with_capacity(100_000 * 40);
    for i in 0..100_000 {
        let _ = write!(extra, "(func $f{i} (result i32) (i32.const {i}))");
    }
    let wasm = module(
        "",
        &[(
            Callback::ProxyOnRequestHeaders,
            "(drop (call $f99999)) (i32.const 0)",
        )],
        &extra,
    )?;
    let (mut worker, plugin, _) = worker(h, &wasm, config("many-functions"))?;
    if let Some(f) = full_stream(&mut worker, &[]) {
        return Err(format!("stream failed: {f}").into());
    }
    drop(worker);
    expect_nothing_leaked(&plugin)
}

/// Huge data: a module whose initial memory is over the limit is refused at VM start with a
/// clear error; one with a 2 MiB data segment inside the limit works.
pub(crate) fn huge_memory_and_data(h: &Harness) -> CaseResult {
    let text = r#"(module
        (memory (export "memory") 1024)
        (func (export "proxy_abi_version_0_2_1"))
        (func (export "malloc") (param i32) (result i32) (i32.const 4096)))"#;
    let wasm = wat::parse_str(text).map_err(|e| format!("WAT: {e}"))?;
    let mut small = config("huge-memory");
    small.limits.memory_bytes = 16 << 20;
    let (plugin, _) = h.load(&wasm, small).map_err(|e| format!("load: {e}"))?;
    match Worker::new(&plugin) {
        Err(e) => ensure!(e.to_string().contains("instantiation failed"), "error: {e}"),
        Ok(_) => return Err("a 64 MiB initial memory started under a 16 MiB limit".into()),
    }
    expect_nothing_leaked(&plugin)?;
    let data = "\\ff".repeat(2 << 20);
    let text = format!(
        r#"(module
        (memory (export "memory") 64)
        (data (i32.const 65536) "{data}")
        (func (export "proxy_abi_version_0_2_1"))
        (func (export "malloc") (param i32) (result i32) (i32.const 4096)))"#
    );
    let wasm = wat::parse_str(&text).map_err(|e| format!("WAT: {e}"))?;
    let (plugin, _) = h
        .load(&wasm, config("big-data"))
        .map_err(|e| format!("load: {e}"))?;
    let mut worker = Worker::new(&plugin).map_err(|e| format!("start: {e}"))?;
    if let Some(f) = full_stream(&mut worker, &[]) {
        return Err(format!("stream failed: {f}").into());
    }
    Ok(())
}

/// Host-side bounds: a header edit past `max_header_count` and a body past `max_body_bytes`
/// are `BadArgument` and change nothing; a log line past `max_log_line_bytes` is cut.
pub(crate) fn host_bounds(h: &Harness) -> CaseResult {
    let wasm = module(
        r#"(import "env" "proxy_add_header_map_value" (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
           (import "env" "proxy_set_buffer_bytes" (func $set_body (param i32 i32 i32 i32 i32) (result i32)))
           (data (i32.const 16) "x-key")
           (data (i32.const 32) "0123456789abcdef")"#,
        &[
            (
                Callback::ProxyOnRequestHeaders,
                "(call $report (call $add_header (i32.const 0) (i32.const 16) (i32.const 5) (i32.const 16) (i32.const 5)))
                 (call $report (call $add_header (i32.const 0) (i32.const 16) (i32.const 5) (i32.const 16) (i32.const 5)))
                 (drop (call $log (i32.const 2) (i32.const 32) (i32.const 10)))
                 (i32.const 0)",
            ),
            (
                Callback::ProxyOnRequestBody,
                "(call $report (call $set_body (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 32) (i32.const 16)))
                 (i32.const 0)",
            ),
        ],
        "",
    )?;
    let mut config = config("bounds");
    config.limits.max_header_count = 2;
    config.limits.max_body_bytes = 8;
    config.limits.max_log_line_bytes = 4;
    let (mut worker, _, logs) = worker(h, &wasm, config)?;
    let mut stream = worker.create_stream();
    let mut req = headers(&[(":path", "/")]);
    worker
        .on_request_headers(&mut stream, &mut req, false)
        .map_err(|f| f.to_string())?;
    ensure!(req.len() == 2, "headers: {req:?}");
    let mut body = BytesMut::from(&b"body"[..]);
    worker
        .on_request_body(&mut stream, &mut body, true)
        .map_err(|f| f.to_string())?;
    ensure!(&body[..] == b"body", "body changed: {body:?}");
    worker.finish_stream(stream).map_err(|f| f.to_string())?;
    let statuses = reports(&logs);
    ensure!(
        statuses == [OK, BAD_ARGUMENT, BAD_ARGUMENT],
        "statuses {statuses:?}"
    );
    ensure!(
        logs.messages()
            .iter()
            .any(|m| m == "0123... [6 more bytes cut]"),
        "logs: {:?}",
        logs.messages()
    );
    Ok(())
}
