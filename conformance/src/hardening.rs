//! Hostile modules against the host's own resources: hostcalls that would make the host copy
//! or convert far more than their result can hold, loops whose body is a hostcall (which
//! engines counting guest work alone do not see), and buffers sized to be expensive to
//! decode. Each case failed on a host without the bound it checks.

use crate::calls::{encode_pairs, imports};
use crate::ensure;
use crate::guests::wat_bytes;
use crate::harness::{CaseResult, Harness, headers};
use crate::hostile::{
    BAD_ARGUMENT, OK, SLACK, config, expect_nothing_leaked, expect_trap, full_stream, import_decl,
    module, reports, worker,
};
use filterbox::abi::{Callback, Import, Status};
use filterbox::{
    CalloutError, Callouts, GrpcReply, GrpcRequest, GrpcStream, HeaderMap, HttpCallOutcome,
    HttpCallReply, HttpCallRequest, HttpCallResponse, TrapKind, Vm, Worker,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// WASI's `EINVAL`.
const EINVAL: u32 = 28;

/// Resident memory of this process (Linux): the peak since the last reset and the current
/// size, in bytes. `None` where `/proc` does not tell.
fn resident() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

/// How far the process's resident memory peaked above where it was while `run` ran, or `None`
/// where that cannot be measured (no `/proc`, or the peak cannot be reset).
fn peak_growth<T>(run: impl FnOnce() -> T) -> (T, Option<u64>) {
    // Writing 5 to clear_refs resets the peak (VmHWM) to the current size.
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let before = resident().filter(|_| reset);
    let result = run();
    let growth = before.and_then(|(_, rss)| resident().map(|(peak, _)| peak.saturating_sub(rss)));
    (result, growth)
}

/// `fd_write` with 1000 iovecs that all point at the same 4 MiB, and `proxy_log` of 48 MiB
/// of bytes that are not UTF-8: each is one cut log line, and the host's memory grows by no
/// more than the guest's own (a host that gathers every iovec first holds 4000 MiB, one that
/// converts the whole message holds three times its size).
pub(crate) fn amplifying_hostcalls_stay_bounded(h: &Harness) -> CaseResult {
    let wasm = module(
        &import_decl(Import::FdWrite),
        &[(
            Callback::ProxyOnRequestHeaders,
            "(local $i i32)
             ;; 64 MiB of memory: iovecs at 64 KiB, their bytes at 1 MiB, the log text at 8 MiB.
             (drop (memory.grow (i32.const 1023)))
             (loop $iovecs
                 (i32.store (i32.add (i32.const 65536) (i32.shl (local.get $i) (i32.const 3))) (i32.const 1048576))
                 (i32.store (i32.add (i32.const 65540) (i32.shl (local.get $i) (i32.const 3))) (i32.const 4194304))
                 (local.set $i (i32.add (local.get $i) (i32.const 1)))
                 (br_if $iovecs (i32.lt_u (local.get $i) (i32.const 1000))))
             (call $report (call $fd_write (i32.const 1) (i32.const 65536) (i32.const 1000) (i32.const 8)))
             (call $report (i32.ne (i32.load (i32.const 8)) (i32.const 4194304000)))
             (memory.fill (i32.const 8388608) (i32.const 255) (i32.const 50331648))
             (call $report (call $log (i32.const 2) (i32.const 8388608) (i32.const 50331648)))
             (i32.const 0)",
        )],
        "",
    )?;
    // Filling 48 MiB takes longer than the cases' usual 20 ms; this case is about memory.
    let mut config = config("amplify");
    config.limits.callback_deadline_ms = Some(10_000);
    let (mut worker, plugin, logs) = worker(h, &wasm, config)?;
    let (failure, growth) = peak_growth(|| full_stream(&mut worker, &[(":path", "/")]));
    if let Some(failure) = failure {
        return Err(format!("the stream failed: {failure}").into());
    }
    let statuses = reports(&logs);
    ensure!(statuses == [OK, 0, OK], "statuses {statuses:?}");
    let max_line = filterbox::Limits::default().max_log_line_bytes;
    let cut: Vec<String> = logs
        .messages()
        .into_iter()
        .filter(|m| m.ends_with("more bytes cut]"))
        .collect();
    // fd_write's line ends with the callback (it has no newline), after proxy_log's.
    let ends = |suffix: &str| cut.iter().any(|m| m.ends_with(suffix));
    ensure!(
        cut.len() == 2
            && ends("... [4194287616 more bytes cut]")
            && ends("... [50315264 more bytes cut]")
            && cut.iter().all(|m| m.len() <= 3 * max_line + 64),
        "cut lines: {:?}",
        cut.iter().map(|m| m.len()).collect::<Vec<_>>()
    );
    // The guest's 64 MiB (which wasmi touches whole when it grows) and room for the rest.
    const ALLOWED: u64 = 128 << 20;
    if let Some(growth) = growth {
        ensure!(
            growth < ALLOWED,
            "resident memory peaked {} MiB above where it was",
            growth >> 20
        );
    }
    drop(worker);
    expect_nothing_leaked(&plugin)
}

/// Loops whose body is one hostcall (`random_get` of 64 KiB, `proxy_set_shared_data` of
/// 4 MiB), in a stream callback and in `_initialize`: each stops at its deadline on every
/// engine, though the guest itself does almost no work between calls.
pub(crate) fn deadlines_hold_in_hostcall_loops(h: &Harness) -> CaseResult {
    let imports = imports(&[Import::RandomGet, Import::ProxySetSharedData]);
    let random = "(loop $l (drop (call $random_get (i32.const 0) (i32.const 65536))) (br $l))
                  (unreachable)";
    let shared = "(drop (memory.grow (i32.const 64)))
                  (loop $l
                      (drop (call $proxy_set_shared_data (i32.const 16) (i32.const 1)
                          (i32.const 65536) (i32.const 4194304) (i32.const 0)))
                      (br $l))
                  (unreachable)";
    for (what, body) in [("random_get", random), ("proxy_set_shared_data", shared)] {
        let wasm = module(&imports, &[(Callback::ProxyOnRequestHeaders, body)], "")?;
        let (mut worker, plugin, _) = worker(h, &wasm, config("hostcall-loop"))?;
        let started = Instant::now();
        let failure = full_stream(&mut worker, &[(":path", "/")])
            .ok_or_else(|| format!("{what}: the loop was not stopped"))?;
        let elapsed = started.elapsed();
        expect_trap(&failure, TrapKind::Interrupted, what)?;
        ensure!(
            elapsed < Duration::from_millis(20) + SLACK,
            "{what}: stopped after {elapsed:?} (deadline 20 ms)"
        );
        drop(worker);
        expect_nothing_leaked(&plugin)?;
    }
    let wasm = module(
        &imports,
        &[],
        &format!(r#"(func (export "_initialize") {random})"#),
    )?;
    let (plugin, _) = h
        .load(&wasm, config("hostcall-loop-start"))
        .map_err(|e| format!("load failed: {e}"))?;
    let started = Instant::now();
    let error = match Worker::new(&plugin) {
        Ok(_) => return Err("_initialize: the loop was not stopped".into()),
        Err(e) => e.to_string(),
    };
    let elapsed = started.elapsed();
    ensure!(
        error.contains("interrupted"),
        "_initialize: wanted a deadline trap, got {error}"
    );
    ensure!(
        elapsed < Duration::from_millis(100) + SLACK,
        "_initialize: stopped after {elapsed:?} (deadline 100 ms)"
    );
    expect_nothing_leaked(&plugin)
}

/// A function of about 36 KB (as Go SDK plugins and large Rust plugins have) and a 32 MiB
/// `memory.fill` (one instruction; `memcpy` and `memset` compile to bulk-memory ones) run
/// under a deadline on every engine: an engine that charges the translation of a function to
/// the call's fuel, or that gives an instruction no more fuel than a slice, could never run
/// them however long the deadline.
pub(crate) fn large_functions_and_bulk_copies_run_under_deadlines(h: &Harness) -> CaseResult {
    let body = "(i32.const 1) (i32.add) ".repeat(12_000);
    let wasm = module(
        "",
        &[(
            Callback::ProxyOnRequestHeaders,
            "(call $report (i32.ne (call $big) (i32.const 12000)))
             (call $report (i32.eq (memory.grow (i32.const 512)) (i32.const -1)))
             (memory.fill (i32.const 65536) (i32.const 1) (i32.const 33554432))
             (call $report (i32.ne (i32.load8_u (i32.const 33619967)) (i32.const 1)))
             (i32.const 0)",
        )],
        &format!("(func $big (result i32) (i32.const 0) {body})"),
    )?;
    let mut config = config("large-function");
    config.limits.callback_deadline_ms = Some(2_000);
    let (mut worker, plugin, logs) = worker(h, &wasm, config)?;
    for _ in 0..2 {
        if let Some(failure) = full_stream(&mut worker, &[(":path", "/")]) {
            return Err(format!("the plugin did not run: {failure}").into());
        }
    }
    let statuses = reports(&logs);
    ensure!(statuses == [OK; 6], "results {statuses:?}");
    drop(worker);
    expect_nothing_leaked(&plugin)
}

/// Pair buffers and bodies a plugin hands over are bounded before the host decodes or copies
/// them: a local response with more headers than `max_header_count` (announced by a buffer
/// of empty pairs) or a larger body than `max_body_bytes`, a header map set with too many
/// pairs, and a property whose path and value together pass `max_header_bytes`, are
/// `BadArgument`; `random_get` past 64 KiB is `EINVAL`; the same within the limits is `Ok`.
pub(crate) fn handed_over_buffers_are_bounded(h: &Harness) -> CaseResult {
    let imports = imports(&[
        Import::ProxySendLocalResponse,
        Import::ProxySetHeaderMapPairs,
        Import::ProxySetProperty,
        Import::RandomGet,
    ]);
    // A pairs buffer of n empty pairs is the count, then n zero sizes and 2n NULs: zero
    // memory after a count at 65536.
    let wasm = module(
        &imports,
        &[(
            Callback::ProxyOnRequestHeaders,
            "(drop (memory.grow (i32.const 1)))
             (i32.store (i32.const 65536) (i32.const 300))
             ;; 300 pairs: over the limit of 100.
             (call $report (call $proxy_set_header_map_pairs (i32.const 0) (i32.const 65536) (i32.const 3004)))
             (call $report (call $proxy_send_local_response (i32.const 403) (i32.const 0) (i32.const 0)
                 (i32.const 0) (i32.const 0) (i32.const 65536) (i32.const 3004) (i32.const -1)))
             ;; a body of 16 bytes: over the limit of 8.
             (call $report (call $proxy_send_local_response (i32.const 403) (i32.const 0) (i32.const 0)
                 (i32.const 32) (i32.const 16) (i32.const 0) (i32.const 0) (i32.const -1)))
             ;; a property of a 40-byte path and a 30-byte value: over 64 bytes; 20 and 30 fit.
             (memory.fill (i32.const 69000) (i32.const 97) (i32.const 40))
             (call $report (call $proxy_set_property (i32.const 69000) (i32.const 40) (i32.const 70000) (i32.const 30)))
             (call $report (call $proxy_set_property (i32.const 69000) (i32.const 20) (i32.const 70000) (i32.const 30)))
             (call $report (call $random_get (i32.const 70000) (i32.const 65537)))
             ;; 3 pairs and 8 bytes: within.
             (i32.store (i32.const 65536) (i32.const 3))
             (call $report (call $proxy_send_local_response (i32.const 403) (i32.const 0) (i32.const 0)
                 (i32.const 32) (i32.const 8) (i32.const 65536) (i32.const 34) (i32.const -1)))
             (i32.const 1)",
        )],
        "",
    )?;
    let mut config = config("handed-over");
    config.limits.max_header_count = 100;
    config.limits.max_body_bytes = 8;
    config.limits.max_header_bytes = 64;
    let (mut worker, _, logs) = worker(h, &wasm, config)?;
    let mut stream = worker.create_stream();
    let mut req = headers(&[(":path", "/")]);
    let action = worker
        .on_request_headers(&mut stream, &mut req, true)
        .map_err(|f| f.to_string())?;
    worker.finish_stream(stream).map_err(|f| f.to_string())?;
    let statuses = reports(&logs);
    ensure!(
        statuses
            == [
                BAD_ARGUMENT,
                BAD_ARGUMENT,
                BAD_ARGUMENT,
                BAD_ARGUMENT,
                OK,
                EINVAL,
                OK
            ],
        "statuses {statuses:?}"
    );
    match action {
        filterbox::Action::Respond(r) if r.status_code == 403 && r.body.len() == 8 => Ok(()),
        other => Err(format!("wanted the 403 within the limits, got {other:?}").into()),
    }
}

/// An HTTP call still waiting when its VM goes away ends with the VM: the upstream sees its
/// connection closed. (A host that lets it run holds the connection and the call's buffers
/// until the upstream answers, if ever.)
pub(crate) fn callouts_end_with_their_vm(h: &Harness) -> CaseResult {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("binding a loopback upstream: {e}"))?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let callouts = filterbox::HyperCallouts::new(runtime.handle().clone())
        .upstream("silent", &format!("http://{address}"))
        .map_err(|e| e.to_string())?;
    // Pairs :method GET, :path /, :authority silent.
    let wasm = module(
        &import_decl(Import::ProxyHttpCall),
        &[(
            Callback::ProxyOnRequestHeaders,
            "(call $report (call $proxy_http_call (i32.const 16) (i32.const 6)
                 (i32.const 64) (i32.const 66) (i32.const 0) (i32.const 0)
                 (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 8)))
             (i32.const 1)",
        )],
        r#"(data (i32.const 16) "silent")
           (data (i32.const 64)
               "\03\00\00\00" "\07\00\00\00\03\00\00\00" "\05\00\00\00\01\00\00\00"
               "\0a\00\00\00\06\00\00\00"
               ":method\00GET\00" ":path\00/\00" ":authority\00silent\00")"#,
    )?;
    let (plugin, logs) = h
        .load_with(&wasm, config("silent-upstream"), |b| {
            b.callouts(Arc::new(callouts))
        })
        .map_err(|e| format!("load failed: {e}"))?;
    let mut worker = Worker::new(&plugin).map_err(|e| format!("start failed: {e}"))?;
    let mut stream = worker.create_stream();
    let action = worker
        .on_request_headers(&mut stream, &mut headers(&[(":path", "/")]), true)
        .map_err(|f| f.to_string())?;
    ensure!(
        action == filterbox::Action::Pause && reports(&logs) == [OK],
        "the call did not start: {action:?}, statuses {:?}",
        reports(&logs)
    );
    let (mut upstream, _) = listener
        .accept()
        .map_err(|e| format!("the call never reached the upstream: {e}"))?;
    // The VM goes away with the call still waiting.
    worker.finish_stream(stream).map_err(|f| f.to_string())?;
    drop(worker);
    upstream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut buffer = [0u8; 4096];
    loop {
        match upstream.read(&mut buffer) {
            Ok(0) => break,
            // The request itself; keep reading until the connection ends.
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => {
                return Err(format!(
                    "the call outlived its VM: the connection is still open ({e})"
                )
                .into());
            }
        }
    }
    expect_nothing_leaked(&plugin)
}

/// A plugin asking for a tick every millisecond whose ticks each run 5 ms would keep a core
/// busy with no traffic; its ticks are held to `max_tick_cpu_percent` (10%) of a core, and
/// the postponed ticks are counted.
pub(crate) fn ticks_use_at_most_their_share(h: &Harness) -> CaseResult {
    let wasm = module(
        &imports(&[
            Import::ProxySetTickPeriodMilliseconds,
            Import::ProxyGetCurrentTimeNanoseconds,
        ]),
        &[(
            Callback::ProxyOnVmStart,
            "(drop (call $proxy_set_tick_period_milliseconds (i32.const 1))) (i32.const 1)",
        )],
        r#"(func (export "proxy_on_tick") (param i32)
               (local $until i64)
               (drop (call $proxy_get_current_time_nanoseconds (i32.const 32)))
               (local.set $until (i64.add (i64.load (i32.const 32)) (i64.const 5000000)))
               (loop $spin
                   (drop (call $proxy_get_current_time_nanoseconds (i32.const 32)))
                   (br_if $spin (i64.lt_u (i64.load (i32.const 32)) (local.get $until)))))"#,
    )?;
    let (plugin, _) = h
        .load(&wasm, config("busy-ticks"))
        .map_err(|e| format!("load failed: {e}"))?;
    let mut vm = filterbox::Vm::new(&plugin).map_err(|e| e.to_string())?;
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(300) {
        vm.wait_and_run(Duration::from_millis(5))
            .map_err(|e| e.to_string())?;
    }
    let ticks = plugin.metrics().callback_calls(Callback::ProxyOnTick);
    // At 10% of a core, 5 ms ticks come at most every 50 ms: 7 in 300 ms, with room for one
    // more; unbounded, about 50 would run.
    ensure!(
        (1..=8).contains(&ticks),
        "{ticks} ticks of 5 ms ran in 300 ms"
    );
    ensure!(
        plugin.metrics().ticks_postponed() >= 1,
        "no tick was counted as postponed"
    );
    Ok(())
}

/// A client that holds every HTTP call (request and reply handle) until the case lets go.
#[derive(Default)]
struct Holding(parking_lot::Mutex<Vec<(HttpCallRequest, HttpCallReply)>>);

impl Callouts for Holding {
    fn http_call(
        &self,
        request: HttpCallRequest,
        reply: HttpCallReply,
    ) -> Result<(), CalloutError> {
        self.0.lock().push((request, reply));
        Ok(())
    }

    fn grpc_open(&self, _: GrpcRequest, _: GrpcReply) -> Result<Box<dyn GrpcStream>, CalloutError> {
        Err(CalloutError::Unsupported)
    }
}

/// What one VM's callouts hold at once is bounded by `max_pending_callout_bytes`: a request
/// body the client still holds counts until it is dropped (the next call that does not fit
/// answers `InternalFailure`), and an answer over the budget fails the call
/// (`BrokenConnection`) rather than reaching the plugin. (Before the bound, 20 healthy calls
/// held 690 MB.)
pub(crate) fn callout_bytes_are_bounded(h: &Harness) -> CaseResult {
    const BUDGET: usize = 64 << 10;
    let request = encode_pairs(&[(":method", "GET"), (":path", "/"), (":authority", "b")]);
    // Each stream makes one call with a 40,000-byte body: two cannot wait at once.
    let wasm = module(
        &imports(&[Import::ProxyHttpCall, Import::ProxyGetStatus]),
        &[(
            Callback::ProxyOnRequestHeaders,
            &format!(
                "(call $report (call $proxy_http_call (i32.const 100) (i32.const 1)
                     (i32.const 200) (i32.const {}) (i32.const 8192) (i32.const 40000)
                     (i32.const 0) (i32.const 0) (i32.const 5000) (i32.const 3000)))
                 (i32.const 0)",
                request.len()
            ),
        )],
        &format!(
            r#"(data (i32.const 100) "b")
               (data (i32.const 200) "{}")
               ;; A failure reports proxy_get_status's code; an answer, whether its body
               ;; is the 1,000 bytes sent.
               (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
                 (if (i32.eqz (local.get 2))
                   (then
                     (drop (call $proxy_get_status (i32.const 3008) (i32.const 3012) (i32.const 3016)))
                     (call $report (i32.load (i32.const 3008))))
                   (else (call $report (i32.eq (local.get 3) (i32.const 1000))))))"#,
            wat_bytes(&request)
        ),
    )?;
    let holding = Arc::new(Holding::default());
    let limits = {
        let mut limits = config("callout-bytes").limits;
        limits.max_pending_callout_bytes = BUDGET;
        limits
    };
    let client: Arc<dyn Callouts> = holding.clone();
    let (plugin, logs) = h
        .load_with(&wasm, config("callout-bytes").with_limits(limits), |b| {
            b.callouts(client)
        })
        .map_err(|e| format!("load failed: {e}"))?;
    let mut vm = Vm::new(&plugin).map_err(|e| format!("start failed: {e}"))?;
    let request = |vm: &mut Vm| -> CaseResult {
        let stream = vm.create_http_stream().map_err(|e| e.to_string())?;
        vm.on_request_headers(&stream, &mut headers(&[]), true)
            .map_err(|e| e.to_string())?;
        Ok(())
    };
    let take = |holding: &Holding| holding.0.lock().pop().ok_or("the client got no call");
    request(&mut vm)?;
    request(&mut vm)?;
    let got = reports(&logs);
    ensure!(
        got == [OK, Status::InternalFailure.as_u32()],
        "a second 40,000-byte call fit in a 64 KiB budget while the first was held: {got:?}"
    );
    // The client lets go of the request; its answer is too large to hold.
    let (sent, reply) = take(&holding)?;
    drop(sent);
    match reply.reserve(BUDGET + 1) {
        Err(over) if over.limit() == BUDGET => {}
        other => return Err(format!("reserving past the budget: {other:?}").into()),
    }
    let answer = |body: usize| {
        HttpCallOutcome::Response(HttpCallResponse {
            headers: [(":status", "200")].into_iter().collect(),
            body: vec![b'x'; body].into(),
            trailers: HeaderMap::new(),
        })
    };
    reply.send(answer(100_000));
    vm.dispatch_pending().map_err(|e| e.to_string())?;
    // Everything was given back: a call fits again, and a small answer arrives whole.
    request(&mut vm)?;
    let (_, reply) = take(&holding)?;
    reply.send(answer(1000));
    vm.dispatch_pending().map_err(|e| e.to_string())?;
    request(&mut vm)?;
    let got = reports(&logs);
    let broken = Status::BrokenConnection.as_u32();
    ensure!(
        got == [OK, Status::InternalFailure.as_u32(), broken, OK, 1, OK],
        "statuses {got:?}, wanted [0, 10, {broken}, 0, 1, 0] (logs: {:?})",
        logs.messages()
    );
    drop(vm);
    holding.0.lock().clear();
    expect_nothing_leaked(&plugin)
}

/// `proc_exit` (or any trap) inside `proxy_on_memory_allocate`, which the host calls in the
/// middle of a hostcall, ends the VM: the hostcall that asked for memory does not return to
/// the guest, which would otherwise run on with whatever its allocator left behind.
pub(crate) fn proc_exit_in_the_allocator_ends_the_vm(h: &Harness) -> CaseResult {
    for (name, allocator) in [
        ("proc_exit", "(call $proc_exit (i32.const 3))"),
        ("unreachable", "(unreachable)"),
    ] {
        let text = format!(
            r#"(module
                (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
                {pairs}
                {exit}
                (memory (export "memory") 1)
                (data (i32.const 16) "ran on")
                (func (export "proxy_abi_version_0_2_1"))
                (func (export "proxy_on_memory_allocate") (param i32) (result i32)
                    {allocator}
                    (i32.const 1024))
                (func (export "proxy_on_context_create") (param i32 i32))
                (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
                    (drop (call $proxy_get_header_map_pairs (i32.const 0) (i32.const 100) (i32.const 104)))
                    (drop (call $log (i32.const 2) (i32.const 16) (i32.const 6)))
                    (i32.const 0)))"#,
            pairs = import_decl(Import::ProxyGetHeaderMapPairs),
            exit = import_decl(Import::ProcExit),
        );
        let wasm = wat::parse_str(&text).map_err(|e| format!("WAT: {e}"))?;
        let (mut worker, plugin, logs) = worker(h, &wasm, config("exit-in-allocator"))?;
        let failure = full_stream(&mut worker, &[(":path", "/")]).ok_or_else(|| {
            format!(
                "{name} in the allocator: the stream went through; logs {:?}",
                logs.messages()
            )
        })?;
        let kind = match name {
            "proc_exit" => TrapKind::Exit,
            _ => TrapKind::Unreachable,
        };
        expect_trap(&failure, kind, &format!("{name} in the allocator"))?;
        ensure!(
            !logs.messages().iter().any(|m| m == "ran on"),
            "{name} in the allocator: the guest ran on after the hostcall"
        );
        drop(worker);
        expect_nothing_leaked(&plugin)?;
    }
    Ok(())
}

/// A service plugin (Envoy's bootstrap `WasmService`) runs on its own, with no streams: its
/// ticks run, a message another VM (here the host) enqueues to the queue it registered is
/// delivered, a trap retires its VM and a new one takes over (the queue registered again),
/// and stopping it drops the VM.
pub(crate) fn service_plugin_runs_on_its_own(h: &Harness) -> CaseResult {
    let wasm = module(
        &imports(&[
            Import::ProxyRegisterSharedQueue,
            Import::ProxyDequeueSharedQueue,
            Import::ProxySetSharedData,
            Import::ProxySetTickPeriodMilliseconds,
        ]),
        &[(
            Callback::ProxyOnConfigure,
            "(drop (call $proxy_register_shared_queue (i32.const 16) (i32.const 4) (i32.const 8)))
             (drop (call $proxy_set_tick_period_milliseconds (i32.const 10)))
             (i32.const 1)",
        )],
        r#"(data (i32.const 16) "jobs")
           (data (i32.const 24) "last_job")
           (data (i32.const 48) "ticked")
           (func (export "proxy_on_queue_ready") (param i32 i32)
               (drop (call $proxy_dequeue_shared_queue (local.get 1) (i32.const 32) (i32.const 36)))
               ;; A message starting with 'b' is a bug in the plugin.
               (if (i32.eq (i32.load8_u (i32.load (i32.const 32))) (i32.const 98)) (then unreachable))
               (drop (call $proxy_set_shared_data (i32.const 24) (i32.const 8)
                   (i32.load (i32.const 32)) (i32.load (i32.const 36)) (i32.const 0))))
           (func (export "proxy_on_tick") (param i32)
               (drop (call $proxy_set_shared_data (i32.const 48) (i32.const 6)
                   (i32.const 48) (i32.const 6) (i32.const 0))))"#,
    )?;
    let mut config = config("service").with_vm_id("service-case");
    config.reload.backoff_initial_ms = 1;
    config.reload.backoff_max_ms = 1;
    // The trap counted must be the plugin's `unreachable`: on a loaded machine the default
    // 10 ms deadline could end a tick first, and the case would count a timeout instead.
    config.limits.callback_deadline_ms = Some(30_000);
    let (plugin, logs) = h
        .load(&wasm, config)
        .map_err(|e| format!("load failed: {e}"))?;
    let service = filterbox::Service::start(&plugin).map_err(|e| e.to_string())?;
    let shared = plugin.shared_state();
    let vm_id = plugin.config().vm_id.clone();
    // What the plugin's metrics say, for a wait that timed out: whether the callback ran,
    // trapped, and whether rebuilds were tried and failed.
    let state = || {
        let m = plugin.metrics();
        let traps: Vec<String> = TrapKind::ALL
            .iter()
            .filter(|kind| m.traps(**kind) > 0)
            .map(|kind| format!("{kind:?} {}", m.traps(*kind)))
            .collect();
        format!(
            "VMs created {}, active {}, failed {}, restarted {}, crash-looping {}; \
             traps {traps:?}; queue callbacks {}, ticks {} ({} postponed)",
            m.vms_created(),
            m.vms_active(),
            m.vms_failed(),
            m.vms_restarted(),
            m.crash_looped(),
            m.callback_calls(Callback::ProxyOnQueueReady),
            m.callback_calls(Callback::ProxyOnTick),
            m.ticks_postponed(),
        )
    };
    let wait = |what: &str, done: &dyn Fn() -> bool| -> CaseResult {
        let started = Instant::now();
        while !done() {
            ensure!(
                started.elapsed() < Duration::from_secs(30),
                "service: timed out waiting for {what}; {}; logs {:?}",
                state(),
                logs.messages()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    };
    let value = |key: &[u8]| shared.get(&vm_id, key).ok().flatten().map(|(v, _)| v);
    wait("its first tick", &|| value(b"ticked").is_some())?;
    let send = |message: &[u8]| -> CaseResult {
        let queue = shared
            .resolve_queue(&vm_id, b"jobs")
            .map_err(|e| format!("resolve: {e}"))?
            .ok_or("the service registered no queue")?;
        shared
            .enqueue(queue, message)
            .map_err(|e| format!("enqueue: {e:?}").into())
    };
    send(b"job-1")?;
    wait("job-1", &|| {
        value(b"last_job").as_deref() == Some(&b"job-1"[..])
    })?;
    send(b"boom")?;
    wait("a new VM after the trap", &|| {
        plugin.metrics().vms_restarted() >= 1
    })?;
    send(b"job-2")?;
    wait("job-2 on the new VM", &|| {
        value(b"last_job").as_deref() == Some(&b"job-2"[..])
    })?;
    ensure!(
        plugin.metrics().traps(TrapKind::Unreachable) == 1,
        "{}; logs {:?}",
        state(),
        logs.messages()
    );
    service.stop();
    expect_nothing_leaked(&plugin)
}
