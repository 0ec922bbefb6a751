//! Long-running checks, not in the default test run:
//!
//! ```text
//! cargo test -p filterbox-conformance --test soak -- --ignored --nocapture
//! FILTERBOX_SOAK_ENGINE=wasmi FILTERBOX_SOAK_STREAMS=200000 cargo test ... (same)
//! ```
//!
//! - `soak_traps_one_in_a_thousand`: 1,000,000 streams through a Rust-SDK plugin that panics
//!   on 1 request in 1,000; every panic fails one stream closed and rebuilds the VM. The
//!   process RSS at the end must be within 10% of what it was after the first 10,000.
//! - `deadline_precision_and_overhead`: per built engine, how long a runaway loop runs past a
//!   10 ms deadline, and what the deadline mechanism costs a CPU-bound guest.

use filterbox::{
    Action, Engine, EngineConfig, EngineKind, HeaderMap, LogLevel, LogSink, Plugin, PluginConfig,
    Worker,
};
use filterbox_conformance::guests;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Discard;

impl LogSink for Discard {
    fn log(&self, _plugin: &str, _level: LogLevel, _message: &str) {}
}

/// Resident set size of this process in bytes, from /proc.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
#[ignore = "long: run with --ignored (see the file's doc)"]
fn soak_traps_one_in_a_thousand() {
    let engine: EngineKind = std::env::var("FILTERBOX_SOAK_ENGINE")
        .unwrap_or_else(|_| "wasmtime".into())
        .parse()
        .expect("engine name");
    let streams: u64 = env_or("FILTERBOX_SOAK_STREAMS", 1_000_000);
    let plugin = Plugin::builder(PluginConfig::named("soak").with_engine(engine))
        .log_sink(Arc::new(Discard))
        .build(guests::LOGGER)
        .expect("plugin loads");
    let mut worker = Worker::new(&plugin).expect("worker starts");
    let (mut failed, mut served, mut baseline) = (0u64, 0u64, 0u64);
    let started = Instant::now();
    for i in 1..=streams {
        let mut req: HeaderMap = [(":path", "/"), (":method", "GET")].into_iter().collect();
        if i % 1000 == 0 {
            req.add("x-panic", "1");
        }
        let mut stream = worker.create_stream();
        match worker.on_request_headers(&mut stream, &mut req, true) {
            Ok(Action::Continue) => {
                let mut resp: HeaderMap = [(":status", "200")].into_iter().collect();
                let outcome = worker
                    .on_response_headers(&mut stream, &mut resp, true)
                    .and_then(|_| worker.on_log(&mut stream, &mut req, &mut resp));
                assert!(outcome.is_ok(), "stream {i}: {outcome:?}");
                served += 1;
            }
            Ok(other) => panic!("stream {i}: unexpected {other:?}"),
            Err(f) => {
                assert!(matches!(f.action(), Action::Respond(r) if r.status_code == 503));
                failed += 1;
            }
        }
        worker.finish_stream(stream).expect("finish");
        if i == 10_000 {
            baseline = rss_bytes();
        }
    }
    let end = rss_bytes();
    let m = plugin.metrics();
    println!(
        "{engine}: {streams} streams in {:?}: {served} served, {failed} failed closed, \
         {} VMs rebuilt, {} live; RSS after 10k {} KiB, at end {} KiB ({:+.1}%)",
        started.elapsed(),
        m.vms_restarted(),
        m.vms_active(),
        baseline / 1024,
        end / 1024,
        (end as f64 - baseline as f64) * 100.0 / baseline as f64
    );
    assert_eq!(failed, streams / 1000);
    // The last stream panics too, and the rebuild after it waits for a next stream.
    assert_eq!(m.vms_restarted(), streams / 1000 - 1);
    assert!(m.vms_active() <= 1);
    assert!(
        end as f64 <= baseline as f64 * 1.10,
        "RSS grew from {baseline} to {end} bytes"
    );
}

/// A module with one stream callback that runs `body`.
fn spin_module(body: &str) -> Vec<u8> {
    let text = format!(
        r#"(module
            (memory (export "memory") 1)
            (func (export "proxy_abi_version_0_2_1"))
            (func (export "malloc") (param i32) (result i32) (i32.const 4096))
            (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) {body}))"#
    );
    wat::parse_str(text).expect("WAT")
}

/// Runs request headers on a fresh stream; returns how long it took and whether it failed.
fn one_call(worker: &mut Worker) -> (Duration, bool) {
    let mut stream = worker.create_stream();
    let mut req = HeaderMap::new();
    let started = Instant::now();
    let failed = worker
        .on_request_headers(&mut stream, &mut req, true)
        .is_err();
    let elapsed = started.elapsed();
    let _ = worker.finish_stream(stream);
    (elapsed, failed)
}

fn worker_on(kind: EngineKind, wasm: &[u8], interruptible: bool, deadline: Option<u64>) -> Worker {
    let engine = Engine::new(
        kind,
        &EngineConfig::default().with_interruptible(interruptible),
    )
    .expect("engine");
    let mut config = PluginConfig::named("spin").with_engine(kind);
    config.limits.callback_deadline_ms = deadline;
    config.reload.backoff_initial_ms = 0;
    config.reload.crash_loop_limit = u32::MAX;
    let plugin = Plugin::builder(config)
        .engine(&engine)
        .build(wasm)
        .expect("plugin");
    Worker::new(&plugin).expect("worker")
}

#[test]
#[ignore = "measurement: run with --ignored --nocapture"]
fn deadline_precision_and_overhead() {
    let runaway = spin_module("(loop $l (br $l)) (unreachable)");
    // About 50 M loop iterations of integer work, well under any deadline here.
    let busy = spin_module(
        "(local $i i32) (local $x i32)
         (loop $l
            (local.set $x (i32.add (i32.mul (local.get $x) (i32.const 31)) (local.get $i)))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br_if $l (i32.lt_u (local.get $i) (i32.const 50000000))))
         (i32.and (local.get $x) (i32.const 0))",
    );
    for kind in EngineKind::built() {
        let mut worker = worker_on(kind, &runaway, true, Some(10));
        let mut times: Vec<Duration> = (0..20)
            .map(|_| {
                let (t, failed) = one_call(&mut worker);
                assert!(failed, "{kind}: the loop was not stopped");
                t
            })
            .collect();
        times.sort();
        let runs = 3;
        let timed = |interruptible: bool| {
            let mut worker = worker_on(kind, &busy, interruptible, None);
            let mut best = Duration::MAX;
            for _ in 0..runs {
                let (t, failed) = one_call(&mut worker);
                assert!(!failed, "{kind}: busy guest failed");
                best = best.min(t);
            }
            best
        };
        let (with, without) = (timed(true), timed(false));
        println!(
            "{kind}: 10 ms deadline stopped a loop after min {:?} / median {:?} / max {:?}; \
             CPU-bound guest {:?} with the mechanism, {:?} without ({:+.1}%)",
            times[0],
            times[times.len() / 2],
            times[times.len() - 1],
            with,
            without,
            (with.as_secs_f64() / without.as_secs_f64() - 1.0) * 100.0
        );
    }
}
