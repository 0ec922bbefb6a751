//! filterbox against `proxy-wasm-host` 0.2.0 (wasmtime 49), the other Rust host library, on
//! the same guest bytes and the same callback sequence, in interleaved rounds in one process:
//!
//! ```sh
//! cargo build --release -p filterbox-conformance        # builds the guests
//! cd benches/peer && cargo run --release --ignore-rust-version -- \
//!     ../../target/guests/wasm32-wasip1/release/guest_headers.wasm [--out ../../BENCHMARKS.md]
//! ```
//!
//! With `--out FILE` the table also replaces the peer block of that file (`bench-report`
//! keeps the block when it rewrites BENCHMARKS.md). For `perf`: `--profile filterbox`,
//! `--profile filterbox-logging`, `--profile peer`, `--profile peer-logging` or
//! `--profile new-vm` runs only that loop for 10 s (with `--iterations N`, N times: for
//! counting instructions under valgrind, `--toggle-collect='*_exchange*'` counts just the
//! exchanges), and `--threads N` filterbox's lifecycles on N
//! threads sharing one plugin. `--only TEXT` runs only the rows
//! whose scenario contains TEXT (a quick A/B of one row).
//!
//! The guest is the suite's Rust-SDK header plugin configured to add one request and one
//! response header (and in one row to log every header as well, the work of the Rust SDK's
//! `http_headers` example). A lifecycle is the issue's sequence: context create, request headers,
//! request body, response headers, response body, done, log, delete. VM creation is timed with
//! filterbox's default engine and with its pooling allocator (the peer has no pooling option),
//! and thread scaling as lifecycles per second on two threads sharing one plugin (one module
//! for the peer), each thread with its own VM, against one thread. Each round times each host
//! for about a second per scenario, alternating who goes first; the medians of the rounds are
//! printed with their ratio.

use bytes::BytesMut;
use proxy_wasm_host::abi::v0_2_1::types::{Action, LogLevel, MapType, Status};
use proxy_wasm_host::abi::v0_2_1::{
    Access, ContextId, Guest, Host, Invocation, LogContext, LogSink, PluginConfig, Started,
    StreamState, VmServices,
};
use proxy_wasm_host::{HeaderMap as PeerMap, Limits, Module, VecHeaderMap};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const CONFIGURATION: &str = "add x-request yes\nresponse-add x-response yes";
/// The same, and every request and response header logged (one `proxy_log` each, by name
/// and value, after reading the whole map) with the stream's end logged from `on_log`: the
/// work of the Rust SDK's `http_headers` example. Both hosts discard the log lines.
const LOGGING_CONFIGURATION: &str = "log-headers\nadd x-request yes\nresponse-add x-response yes";
const ROUNDS: usize = 7;

fn request(extra: usize) -> Vec<(String, String)> {
    let mut headers = vec![
        (":method".to_owned(), "GET".to_owned()),
        (":path".to_owned(), "/index.html".to_owned()),
        (":authority".to_owned(), "example.test".to_owned()),
    ];
    for i in 0..extra {
        headers.push((format!("x-extra-{i}"), format!("value {i}")));
    }
    headers
}

fn response() -> Vec<(String, String)> {
    vec![
        (":status".to_owned(), "200".to_owned()),
        ("content-type".to_owned(), "text/html".to_owned()),
    ]
}

/// Nanoseconds per call of `run`: the median of 9 batches filling `budget`.
fn time(run: &mut dyn FnMut(), budget: Duration) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget / 10 {
        run();
        n += 1;
    }
    let per = start.elapsed().as_secs_f64() / n.max(1) as f64;
    let batch = ((budget.as_secs_f64() / 9.0 / per) as u64).max(1);
    let mut times: Vec<f64> = (0..9)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..batch {
                run();
            }
            t.elapsed().as_secs_f64() * 1e9 / batch as f64
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[4]
}

// --- filterbox ---

fn filterbox_plugin(wasm: &[u8], pooling: bool, configuration: &str) -> filterbox::Plugin {
    let config = filterbox::PluginConfig::named("bench").with_configuration(configuration);
    let mut engine_config = filterbox::EngineConfig::default();
    if pooling {
        engine_config = engine_config.with_pooling(filterbox::PoolingConfig::default());
    }
    let engine = filterbox::Engine::new(filterbox::EngineKind::Wasmtime, &engine_config)
        .expect("filterbox engine");
    filterbox::Plugin::builder(config)
        .engine(&engine)
        .build(wasm)
        .expect("filterbox loads the guest")
}

const BODY: &[u8] = b"hello";

/// Each host's maps are built once and cloned per exchange (as a proxy hands over the maps it
/// parsed), so neither side's timing includes building them from strings.
/// One exchange's callbacks on filterbox; returns the maps as the plugin left them (dropped
/// by the caller, inside the timing, as the peer's are).
fn filterbox_lifecycle(
    vm: &mut filterbox::Vm,
    (request, response): &(filterbox::HeaderMap, filterbox::HeaderMap),
) -> (filterbox::HeaderMap, filterbox::HeaderMap) {
    let mut req = request.clone();
    let mut resp = response.clone();
    let stream = vm.create_http_stream().expect("stream");
    black_box(
        vm.on_request_headers(&stream, &mut req, false)
            .expect("request"),
    );
    let mut body = BytesMut::from(BODY);
    black_box(vm.on_request_body(&stream, &mut body, true).expect("body"));
    black_box(
        vm.on_response_headers(&stream, &mut resp, false)
            .expect("response"),
    );
    let mut body = BytesMut::from(BODY);
    black_box(vm.on_response_body(&stream, &mut body, true).expect("body"));
    vm.on_log(&stream, &mut req, &mut resp).expect("log");
    vm.finish_stream(stream).expect("finish");
    (req, resp)
}

/// A thread's VM and maps. Each thread builds its own maps: clones of one map shared between
/// threads would count reference-count traffic between the cores that a proxy's fresh maps do
/// not have.
fn filterbox_thread_state(
    plugin: &filterbox::Plugin,
) -> (filterbox::Vm, (filterbox::HeaderMap, filterbox::HeaderMap)) {
    let maps = (
        request(0).into_iter().collect(),
        response().into_iter().collect(),
    );
    (filterbox::Vm::new(plugin).expect("vm"), maps)
}

// --- proxy-wasm-host ---

struct Quiet;

impl LogSink for Quiet {
    fn log(&self, _: LogContext<'_>, _: LogLevel, _: &[u8]) {}
}

/// The peer's stream: it lends the maps to the guest.
struct Exchange {
    request: VecHeaderMap,
    response: VecHeaderMap,
}

impl StreamState for Exchange {
    fn header_map(
        &mut self,
        _: Invocation,
        _: Access,
        map: MapType,
    ) -> Result<&mut dyn PeerMap, Status> {
        match map {
            MapType::HttpRequestHeaders => Ok(&mut self.request),
            MapType::HttpResponseHeaders => Ok(&mut self.response),
            _ => Err(Status::NotFound),
        }
    }
}

fn pairs(list: Vec<(String, String)>) -> VecHeaderMap {
    list.into_iter()
        .map(|(k, v)| (k.into_bytes(), v.into_bytes()))
        .collect()
}

struct Peer {
    host: Host,
    module: Module,
}

impl Peer {
    fn new(wasm: &[u8]) -> Peer {
        let engine = proxy_wasm_host::Engine::new().expect("peer engine");
        let module = Module::new(&engine, wasm).expect("peer compiles the guest");
        let host = Host::new(&engine).expect("peer host");
        Peer { host, module }
    }

    fn guest(&self) -> (Guest, ContextId) {
        self.guest_with(CONFIGURATION)
    }

    fn guest_with(&self, configuration: &str) -> (Guest, ContextId) {
        let services = VmServices::new(Arc::new(Quiet));
        let mut guest =
            Guest::new(&self.host, &self.module, services, &Limits::default()).expect("guest");
        let config = PluginConfig::new().with_configuration(configuration);
        match guest.start(config).expect("peer starts the guest") {
            Started::Serving(root) => (guest, root),
            _ => panic!("the guest refused its start on the peer"),
        }
    }
}

/// One exchange's callbacks on the peer; returns its maps as the plugin left them.
fn peer_lifecycle(
    guest: &mut Guest,
    root: ContextId,
    maps: &(VecHeaderMap, VecHeaderMap, u32),
) -> Exchange {
    let (request, response, n_request) = maps;
    let exchange = Exchange {
        request: request.clone(),
        response: response.clone(),
    };
    let n_request = *n_request;
    let (answer, exchange) = guest.with(exchange, |scope| {
        let stream = scope.on_context_create(Some(root))?;
        let a = scope.on_request_headers(stream, n_request, false)?;
        black_box(scope.on_request_body(stream, BODY.len() as u32, true)?);
        let b = scope.on_response_headers(stream, 2, false)?;
        black_box(scope.on_response_body(stream, BODY.len() as u32, true)?);
        scope.on_done(stream)?;
        scope.on_log(stream)?;
        scope.on_delete(stream)?;
        Ok::<_, proxy_wasm_host::abi::v0_2_1::GuestError>((a, b))
    });
    let (a, b) = answer.expect("peer lifecycle");
    assert!(a == Action::Continue && b == Action::Continue);
    exchange
}

/// A whole exchange on filterbox, its maps dropped: what the timings and `--profile` run (a
/// function of its own, for `valgrind --toggle-collect='*_exchange*'`).
#[inline(never)]
fn filterbox_exchange(vm: &mut filterbox::Vm, maps: &(filterbox::HeaderMap, filterbox::HeaderMap)) {
    drop(black_box(filterbox_lifecycle(vm, maps)));
}

/// A whole exchange on the peer, its maps dropped.
#[inline(never)]
fn peer_exchange(guest: &mut Guest, root: ContextId, maps: &(VecHeaderMap, VecHeaderMap, u32)) {
    drop(black_box(peer_lifecycle(guest, root, maps)));
}

/// Checks once, outside any timing, that both hosts ran the plugin: it added its request and
/// response headers. (Checked inside the timed lifecycle, the lookups counted as host work on
/// one side only.)
fn check_both(
    vm: &mut filterbox::Vm,
    ours: &(filterbox::HeaderMap, filterbox::HeaderMap),
    guest: &mut Guest,
    root: ContextId,
    theirs: &(VecHeaderMap, VecHeaderMap, u32),
) {
    let (req, resp) = filterbox_lifecycle(vm, ours);
    assert!(req.get("x-request").is_some() && resp.get("x-response").is_some());
    let exchange = peer_lifecycle(guest, root, theirs);
    assert!(
        exchange.request.get(b"x-request").is_some()
            && exchange.response.get(b"x-response").is_some()
    );
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn human(ns: f64) -> String {
    if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

/// Runs `a` and `b` once each, the first alternating with the round.
fn pair(round: usize, a: &mut dyn FnMut() -> f64, b: &mut dyn FnMut() -> f64) -> (f64, f64) {
    if round.is_multiple_of(2) {
        let x = a();
        (x, b())
    } else {
        let y = b();
        (a(), y)
    }
}

/// Lifecycles per second on `threads` threads, each with its own VM made by `make` from the
/// shared plugin, all running for the same `window`: every thread counts what it did until the
/// window closes, so a thread the OS holds back does not leave the other running alone at the
/// end (timing a fixed number of lifecycles per thread counted that tail as lost scaling).
fn rate<V>(
    threads: usize,
    window: Duration,
    make: &(dyn Fn() -> V + Sync),
    run: &(dyn Fn(&mut V) + Sync),
) -> f64 {
    let ready = Barrier::new(threads + 1);
    let stop = AtomicBool::new(false);
    let done = AtomicUsize::new(0);
    let elapsed = std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut vm = make();
                ready.wait();
                let mut lifecycles = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    run(&mut vm);
                    lifecycles += 1;
                }
                done.fetch_add(lifecycles, Ordering::Relaxed);
            });
        }
        ready.wait();
        let start = Instant::now();
        std::thread::sleep(window);
        stop.store(true, Ordering::Relaxed);
        start.elapsed()
        // The scope joins the threads before it returns.
    });
    done.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64()
}

/// How long each thread-scaling measurement runs its threads.
const WINDOW: Duration = Duration::from_millis(300);

const START: &str = "<!-- peer-bench -->";
const END: &str = "<!-- /peer-bench -->";

/// Replaces the peer block of `file`, or appends one.
fn write_block(file: &str, block: &str) {
    let old = std::fs::read_to_string(file).unwrap_or_default();
    let new = match (old.find(START), old.find(END)) {
        (Some(start), Some(end)) if start < end => {
            format!("{}{block}{}", &old[..start], &old[end + END.len()..])
        }
        _ => format!("{}\n\n{block}\n", old.trim_end_matches('\n')),
    };
    std::fs::write(file, new).expect("writing the report");
}

/// The value after `--name` on the command line, if it is there.
fn option<'a>(args: &'a [String], name: &str) -> Option<&'a String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args
        .first()
        .expect("usage: filterbox-peer-bench path/to/guest_headers.wasm [--out FILE]");
    let out = option(&args, "--out");
    let wasm = std::fs::read(path).expect("reading the guest");
    let budget = Duration::from_millis(800);
    let plugin = filterbox_plugin(&wasm, false, CONFIGURATION);
    let logging = filterbox_plugin(&wasm, false, LOGGING_CONFIGURATION);
    let peer = Peer::new(&wasm);

    // `--profile filterbox|peer|new-vm`: that host's 3-header lifecycle (or filterbox's pooled
    // VM creation) for 10 s, for `perf`.
    if let Some(who) = option(&args, "--profile") {
        // `--iterations N`: exactly N instead of 10 s (for counting instructions under
        // valgrind, where time means little).
        let iterations = option(&args, "--iterations").and_then(|n| n.parse::<u64>().ok());
        // Compiled before the clock starts: its compile is not a VM's creation.
        let pooled = (who == "new-vm").then(|| filterbox_plugin(&wasm, true, CONFIGURATION));
        let start = Instant::now();
        let mut n = 0u64;
        let more = |n: u64| match iterations {
            Some(limit) => n < limit,
            None => start.elapsed() < Duration::from_secs(10),
        };
        if let Some(pooled) = &pooled {
            while more(n) {
                drop(black_box(filterbox::Vm::new(pooled).expect("vm")));
                n += 1;
            }
        } else if who.starts_with("peer") {
            let maps = (
                pairs(request(0)),
                pairs(response()),
                request(0).len() as u32,
            );
            let (mut guest, root) = match who.as_str() {
                "peer-logging" => peer.guest_with(LOGGING_CONFIGURATION),
                _ => peer.guest(),
            };
            while more(n) {
                peer_exchange(&mut guest, root, &maps);
                n += 1;
            }
        } else {
            let plugin = match who.as_str() {
                "filterbox-logging" => &logging,
                _ => &plugin,
            };
            let (mut vm, maps) = filterbox_thread_state(plugin);
            while more(n) {
                filterbox_exchange(&mut vm, &maps);
                n += 1;
            }
        }
        let per = start.elapsed().as_secs_f64() * 1e9 / n.max(1) as f64;
        eprintln!("{who}: {n} lifecycles, {per:.0} ns each");
        return;
    }
    // `--threads N`: filterbox's lifecycles on N threads sharing the plugin for 10 s, for `perf`.
    if let Some(threads) = option(&args, "--threads").and_then(|n| n.parse::<usize>().ok()) {
        let make = || filterbox_thread_state(&plugin);
        let run = |(vm, maps): &mut (filterbox::Vm, _)| {
            filterbox_exchange(vm, maps);
        };
        let start = Instant::now();
        let mut rates = Vec::new();
        while start.elapsed() < Duration::from_secs(10) {
            rates.push(rate(threads, WINDOW, &make, &run));
        }
        eprintln!("{threads} threads: {:.0} lifecycles/s", median(rates));
        return;
    }

    // `--only TEXT`: only the rows whose scenario contains TEXT (for quick A/B runs).
    let only = option(&args, "--only").map(String::as_str);
    let mut rows: Vec<(String, Vec<f64>, Vec<f64>)> = Vec::new();
    let mut row = |name: String| {
        rows.push((name, Vec::new(), Vec::new()));
        rows.len() - 1
    };
    // (extra request headers, row, filterbox's plugin, the guest's configuration)
    let mut lifecycle_rows: Vec<(usize, usize, &filterbox::Plugin, &str)> = [0usize, 10]
        .into_iter()
        .map(|extra| {
            let n = request(extra).len();
            (
                extra,
                row(format!("lifecycle with bodies, {n} request headers")),
                &plugin,
                CONFIGURATION,
            )
        })
        .collect();
    lifecycle_rows.push((
        0,
        row(format!(
            "lifecycle with bodies, {} request headers, every header logged (SDK `http_headers` example's work)",
            request(0).len()
        )),
        &logging,
        LOGGING_CONFIGURATION,
    ));
    let new_vm = row("new VM + start + drop".to_owned());
    // Made here, not before the profiling loops: its address-space reservation fails under
    // valgrind.
    let pooled = filterbox_plugin(&wasm, true, CONFIGURATION);
    let new_vm_pooled = row("new VM + start + drop, filterbox pooling".to_owned());
    let threads_row = row("2 threads sharing one plugin / 1 thread (lifecycles/s)".to_owned());

    let wanted: Vec<bool> = rows
        .iter()
        .map(|(name, ..)| only.is_none_or(|text| name.contains(text)))
        .collect();
    for round in 0..ROUNDS {
        eprintln!("round {}/{ROUNDS}", round + 1);
        for &(extra, index, plugin, configuration) in &lifecycle_rows {
            if !wanted[index] {
                continue;
            }
            let list = request(extra);
            let ours: (filterbox::HeaderMap, filterbox::HeaderMap) = (
                list.clone().into_iter().collect(),
                response().into_iter().collect(),
            );
            let theirs = (pairs(list.clone()), pairs(response()), list.len() as u32);
            let mut vm = filterbox::Vm::new(plugin).expect("vm");
            let (mut guest, root) = peer.guest_with(configuration);
            check_both(&mut vm, &ours, &mut guest, root, &theirs);
            let (f, p) = pair(
                round,
                &mut || {
                    let mut run = || filterbox_exchange(&mut vm, &ours);
                    time(&mut run, budget)
                },
                &mut || {
                    let mut run = || peer_exchange(&mut guest, root, &theirs);
                    time(&mut run, budget)
                },
            );
            rows[index].1.push(f);
            rows[index].2.push(p);
        }
        for (index, plugin) in [(new_vm, &plugin), (new_vm_pooled, &pooled)] {
            if !wanted[index] {
                continue;
            }
            let (f, p) = pair(
                round,
                &mut || {
                    time(
                        &mut || drop(black_box(filterbox::Vm::new(plugin).expect("vm"))),
                        budget,
                    )
                },
                &mut || time(&mut || drop(black_box(peer.guest())), budget),
            );
            rows[index].1.push(f);
            rows[index].2.push(p);
        }
        if !wanted[threads_row] {
            continue;
        }
        let make_ours = || filterbox_thread_state(&plugin);
        let run_ours = |(vm, maps): &mut (filterbox::Vm, _)| {
            filterbox_exchange(vm, maps);
        };
        let make_theirs = || {
            let maps = (
                pairs(request(0)),
                pairs(response()),
                request(0).len() as u32,
            );
            (peer.guest(), maps)
        };
        let run_theirs = |((guest, root), maps): &mut ((Guest, ContextId), _)| {
            peer_exchange(guest, *root, maps);
        };
        let (f, p) = pair(
            round,
            &mut || rate(2, WINDOW, &make_ours, &run_ours) / rate(1, WINDOW, &make_ours, &run_ours),
            &mut || {
                rate(2, WINDOW, &make_theirs, &run_theirs)
                    / rate(1, WINDOW, &make_theirs, &run_theirs)
            },
        );
        rows[threads_row].1.push(f);
        rows[threads_row].2.push(p);
    }

    let mut table = String::from(
        "| scenario | filterbox | proxy-wasm-host 0.2.0 | filterbox / peer |\n|---|---|---|---|\n",
    );
    for (index, (name, ours, theirs)) in rows.into_iter().enumerate() {
        if ours.is_empty() {
            continue;
        }
        let (f, p) = (median(ours), median(theirs));
        table.push_str(&if index == threads_row {
            format!("| {name} | {f:.2}× | {p:.2}× | – |\n")
        } else {
            format!("| {name} | {} | {} | {:.2}× |\n", human(f), human(p), f / p)
        });
    }
    print!("{table}");
    if only.is_some() && out.is_some() {
        eprintln!("--only: some rows were not run, so the report is not written");
    }
    if let Some(out) = out.filter(|_| only.is_none()) {
        let block = format!(
            "{START}\n## Against the other Rust host (`benches/peer`)\n\n\
             filterbox (wasmtime 48) and `proxy-wasm-host` 0.2.0 (wasmtime 49) in one process on \
             the same guest bytes (the suite's Rust-SDK header plugin adding one request and one \
             response header; in the logging row it also logs every header, as the Rust SDK's \
             `http_headers` example does, and both hosts discard the lines: filterbox's default sink, \
             `tracing` with no subscriber here, says so before a line is decoded, the peer's sink \
             is handed every line and drops it) and the same callbacks: context create, request headers, request \
             body, response headers, response body, done, log, delete; each host's maps are \
             cloned from prebuilt ones and dropped inside the timing, and whether the plugin \
             added its headers is checked once per row before it. filterbox runs with its \
             defaults (callback latency timed for one call in 16 of each callback; the pool keeps \
             up to 1 MiB of a dropped VM's memory resident). Thread scaling: lifecycles per \
             second of 2 and of 1 threads each running for the same {window} ms window. \
             {ROUNDS} interleaved rounds alternating who goes first, medians. Single runs on this VM vary by up to \
             ±30 %; compare the ratio of one run, or count instructions (`--profile` under \
             valgrind). Command: see `benches/peer/src/main.rs`.\n\n\
             {table}{END}",
            window = WINDOW.as_millis()
        );
        write_block(out, &block);
        eprintln!("wrote {out}");
    }
}
