//! Shared state per call, in this process against Redis on loopback (a `redis-server` the
//! program starts): `get_shared_data`, `set_shared_data` with CAS, a CAS increment (get then
//! set, as a rate limiter does), and one request through the suite's rate-limit guest on
//! wasmtime; then requests/s of `filterbox serve` with that guest on each backend (wrk).
//! Writes the tables into BENCHMARKS.md between its markers (bench-report keeps them).
//!
//! ```sh
//! cargo build --release -p filterbox-cli
//! cargo run -p filterbox-benches --release --bin bench-shared [-- --seconds N] [--rounds N] \
//!     [--filterbox PATH] [--out FILE]
//! ```
//!
//! Needs Debian's `redis-server`, and `wrk` for the serve rows.

use anyhow::{Context as _, Result};
use filterbox::{
    EngineKind, HeaderMap, Plugin, PluginConfig, RedisConfig, SharedLimits, SharedState, Vm,
};
use filterbox_benches::load::{free_port, interleaved, median, spawn_proxy, start_upstream};
use filterbox_conformance::guests;
use filterbox_conformance::redis_server::RedisServer;
use std::fmt::Write as _;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const START: &str = "<!-- shared-bench -->";
const END: &str = "<!-- /shared-bench -->";
const ROUNDS: usize = 7;

/// The median over [`ROUNDS`] rounds of `n` calls of `op`, in µs per call.
fn per_call(n: u32, mut op: impl FnMut()) -> f64 {
    let rounds: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..n {
                op();
            }
            started.elapsed().as_secs_f64() * 1e6 / f64::from(n)
        })
        .collect();
    median(rounds)
}

/// The floor: one `PING` round trip to the server on a kept-open socket, µs.
fn ping_round_trip(server: &RedisServer) -> Result<f64> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(server.address())?;
    stream.set_nodelay(true)?;
    let mut reply = [0u8; 7];
    let mut failed = None;
    let micros = per_call(2_000, || {
        let sent = stream
            .write_all(b"*1\r\n$4\r\nPING\r\n")
            .and_then(|()| stream.read_exact(&mut reply));
        if let Err(e) = sent {
            failed = Some(e);
        }
    });
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(micros),
    }
}

fn rate_limited_request(vm: &mut Vm) {
    let mut request: HeaderMap = [(":method", "GET"), (":path", "/"), (":authority", "a")]
        .into_iter()
        .collect();
    let stream = vm.create_http_stream().expect("stream");
    black_box(
        vm.on_request_headers(&stream, &mut request, true)
            .expect("request"),
    );
    vm.finish_stream(stream).expect("finish");
}

/// Requests/s and p99 (ms) of `filterbox serve` with no plugin, and with the rate-limit
/// guest on each backend: interleaved wrk rounds, medians.
fn serve_rows(
    filterbox: &Path,
    redis_url: &str,
    seconds: u64,
    rounds: u32,
) -> Result<Vec<(String, f64, f64)>> {
    let dir = std::env::temp_dir().join(format!("filterbox-bench-shared-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("ratelimit.wasm"), guests::RATELIMIT)?;
    let (upstream, _runtime) = start_upstream()?;
    let limiter = |backend: &str| {
        format!(
            "plugins:\n  - name: ratelimit\n    configuration: \"limit={} window=0\"\n    \
             vm_config: {{ vm_id: bench, code: {{ local: {{ filename: ratelimit.wasm }} }} }}\n    \
             shared_state: {backend}\n",
            u64::MAX
        )
    };
    let configs = [
        ("no plugin".to_owned(), "plugins: []\n".to_owned()),
        (
            "rate-limit guest, in-process".to_owned(),
            limiter("{ backend: local }"),
        ),
        (
            "rate-limit guest, Redis".to_owned(),
            limiter(&format!(
                "{{ backend: redis, url: \"{redis_url}\", timeout_ms: 100 }}"
            )),
        ),
    ];
    let mut targets = Vec::new();
    let mut proxies = Vec::new();
    for (i, (name, plugins)) in configs.into_iter().enumerate() {
        let listen = free_port()?;
        let path = dir.join(format!("serve-{i}.yaml"));
        std::fs::write(
            &path,
            format!(
                "listeners: [{{ address: \"{listen}\", upstream: backend }}]\n\
                 upstreams: {{ backend: \"http://{upstream}\" }}\n{plugins}"
            ),
        )?;
        let mut command = Command::new(filterbox);
        command.args(["serve", "--config"]).arg(&path);
        proxies.push(spawn_proxy(&mut command, listen)?);
        targets.push((name, format!("http://{listen}/bench")));
    }
    let rows = interleaved(&targets, rounds, seconds, 32)?;
    drop(proxies);
    Ok(rows)
}

fn main() -> Result<()> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| {
        raw.iter()
            .position(|a| a == name)
            .and_then(|i| raw.get(i + 1))
            .cloned()
    };
    let out = value("--out").map_or_else(|| PathBuf::from("BENCHMARKS.md"), PathBuf::from);
    let filterbox = value("--filterbox")
        .map_or_else(|| PathBuf::from("target/release/filterbox"), PathBuf::from);
    let seconds: u64 = value("--seconds")
        .map_or(Ok(5), |v| v.parse())
        .context("--seconds")?;
    let rounds: u32 = value("--rounds")
        .map_or(Ok(3), |v| v.parse())
        .context("--rounds")?;
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(", "))
        .unwrap_or_else(|_| "unknown".to_owned());
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build; numbers are only meaningful with --release");
    }
    let server = RedisServer::start().map_err(anyhow::Error::msg)?;
    let redis = |cache: bool| -> Result<SharedState> {
        let config = RedisConfig::new(server.url())
            .with_timeout(Duration::from_secs(1))
            .with_local_cache(cache);
        SharedState::redis(config, SharedLimits::default()).context("redis world")
    };
    let worlds = [
        ("in-process", SharedState::new(SharedLimits::default())),
        ("Redis, local cache", redis(true)?),
        ("Redis, no cache", redis(false)?),
    ];
    // The cache answers once its subscriber listens.
    let started = Instant::now();
    worlds[1].1.set("bench", b"warm", b"1", 0).ok();
    while worlds[1].1.store_stats().is_none_or(|s| s.cache_hits == 0) {
        let _ = worlds[1].1.get("bench", b"warm");
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(10),
            "the cache never answered"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    let mut rows: Vec<(&str, Vec<f64>)> = vec![
        ("`get_shared_data` of an unchanged key", vec![]),
        ("`set_shared_data` with CAS", vec![]),
        ("CAS increment (get, then set with its token)", vec![]),
        ("rate-limit guest, one request (wasmtime)", vec![]),
    ];
    for (name, world) in &worlds {
        eprintln!("{name} …");
        world.set("bench", b"key", b"value", 0).ok();
        rows[0].1.push(per_call(2_000, || {
            black_box(world.get("bench", b"key").ok());
        }));
        let mut token = world.set("bench", b"cas", b"0", 0).unwrap_or(0);
        rows[1].1.push(per_call(2_000, || {
            token = world.set("bench", b"cas", b"1", token).unwrap_or(0);
        }));
        rows[2].1.push(per_call(2_000, || {
            if let Ok(Some((value, token))) = world.get("bench", b"counter") {
                let n: u64 = std::str::from_utf8(&value)
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                black_box(
                    world
                        .set("bench", b"counter", (n + 1).to_string().as_bytes(), token)
                        .ok(),
                );
            } else {
                world.set("bench", b"counter", b"0", 0).ok();
            }
        }));
        let config = PluginConfig::named("ratelimit")
            .with_configuration(format!("limit={} window=0", u64::MAX))
            .with_vm_id("bench-limiter")
            .with_engine(EngineKind::Wasmtime);
        let plugin = Plugin::builder(config)
            .shared_state(world.clone())
            .build(guests::RATELIMIT)
            .context("ratelimit plugin")?;
        let mut vm = Vm::new(&plugin).context("vm")?;
        rows[3]
            .1
            .push(per_call(1_000, || rate_limited_request(&mut vm)));
        if let Some(stats) = world.store_stats() {
            eprintln!("  {stats:?}");
        }
    }

    let floor = ping_round_trip(&server)?;
    let mut block = format!(
        "{START}\n## Shared state: in-process against Redis on loopback\n\n\
         `cargo run -p filterbox-benches --release --bin bench-shared` ({} rounds, medians; a \
         `redis-server` on 127.0.0.1 started by the program, on the same 2 cores). µs per call. \
         The floor, one `PING` round trip on an open socket: {floor:.0} µs.\n\n\
         | operation |",
        ROUNDS
    );
    for (name, _) in &worlds {
        let _ = write!(block, " {name} |");
    }
    block.push_str("\n|---|");
    block.push_str(&"---|".repeat(worlds.len()));
    block.push('\n');
    for (row, values) in &rows {
        let _ = write!(block, "| {row} |");
        for value in values {
            let _ = write!(block, " {value:.2} |");
        }
        block.push('\n');
    }
    if filterbox.exists() {
        let rows = serve_rows(&filterbox, &server.url(), seconds, rounds)?;
        let _ = write!(
            block,
            "\n`filterbox serve` (release, wasmtime) with the rate-limit guest (a CAS increment \
             per request, a limit never reached), `wrk -t1 -c32 -d{seconds}s`, {rounds} \
             interleaved rounds, medians; the upstream, wrk, Redis and the proxy share the 2 \
             cores. Load average when the run started: {load}.\n\n\
             | serve | requests/s | p99 latency |\n|---|---|---|\n"
        );
        for (name, rps, p99) in rows {
            let _ = writeln!(block, "| {name} | {rps:.0} | {p99:.2} ms |");
        }
    } else {
        eprintln!(
            "{} not found (cargo build --release -p filterbox-cli): no serve rows",
            filterbox.display()
        );
    }
    let _ = writeln!(block, "{END}");
    print!("{block}");
    filterbox_benches::report::write_block(&out, (START, END), &block)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
