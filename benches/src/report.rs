//! The report: times every scenario on every built engine with a small harness (median of
//! batches), measures memory per VM and thread scaling, and writes BENCHMARKS.md.

use crate::{Scenario, header_plugin, native_scenarios, request_headers, scenarios};
use filterbox::{Engine, EngineConfig, EngineKind, Vm};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// Nanoseconds per run of `run`: warm up, then the median of 15 batches filling `budget`.
pub fn measure(run: &mut dyn FnMut(), budget: Duration) -> f64 {
    let warm = Instant::now();
    let mut n = 0u64;
    while warm.elapsed() < budget / 10 || n < 2 {
        run();
        n += 1;
    }
    let per = warm.elapsed().as_secs_f64() / n as f64;
    let batches = 15;
    let batch = ((budget.as_secs_f64() / batches as f64 / per) as u64).max(1);
    let mut times: Vec<f64> = (0..batches)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..batch {
                run();
            }
            t.elapsed().as_secs_f64() * 1e9 / batch as f64
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[batches / 2]
}

fn human(ns: f64) -> String {
    match ns {
        n if n >= 1e6 => format!("{:.2} ms", n / 1e6),
        n if n >= 1e3 => format!("{:.2} µs", n / 1e3),
        n => format!("{n:.0} ns"),
    }
}

/// Resident set size of this process in bytes.
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Versions of the engine crates in the lock file this was built from.
fn engine_versions() -> String {
    let lock = include_str!("../../Cargo.lock");
    let mut out = Vec::new();
    for name in ["wasmtime", "wasmer", "wasmi"] {
        let needle = format!("name = \"{name}\"\nversion = \"");
        if let Some(at) = lock.find(&needle) {
            let rest = &lock[at + needle.len()..];
            if let Some(end) = rest.find('"') {
                out.push(format!("{name} {}", &rest[..end]));
            }
        }
    }
    out.join(", ")
}

/// One measured row.
struct Row {
    name: String,
    ns_per_op: f64,
    floor: Option<&'static str>,
    native: Option<String>,
}

/// The engines to measure: every built one, or those named in `FILTERBOX_BENCH_ENGINES`
/// (comma-separated; for profiling one engine).
fn engines() -> Vec<EngineKind> {
    let wanted = std::env::var("FILTERBOX_BENCH_ENGINES").unwrap_or_default();
    EngineKind::built()
        .into_iter()
        .filter(|k| wanted.is_empty() || wanted.split(',').any(|w| w.trim() == k.name()))
        .collect()
}

/// How many rounds each scenario list is timed in (`FILTERBOX_BENCH_ROUNDS`, default 3): every
/// scenario once per round, in turn, so that a machine whose speed drifts (this VM's does)
/// hits every scenario alike; each scenario reports the median of its rounds.
fn rounds() -> u32 {
    std::env::var("FILTERBOX_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1)
}

fn run_all(list: Vec<Scenario>, budget: Duration) -> Vec<Row> {
    // For profiling one scenario: FILTERBOX_BENCH_FILTER=lifecycle_3
    // FILTERBOX_BENCH_PROFILE_SECS=20 perf record ... (the scenario first runs that long, so
    // the profile is mostly it rather than the set-up's compiling).
    let filter = std::env::var("FILTERBOX_BENCH_FILTER").unwrap_or_default();
    let profile = std::env::var("FILTERBOX_BENCH_PROFILE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs);
    let mut list: Vec<Scenario> = list
        .into_iter()
        .filter(|s| s.name.contains(&filter))
        .collect();
    if let Some(span) = profile {
        for s in &mut list {
            eprintln!("  {} (profiling)", s.name);
            let until = Instant::now() + span;
            while Instant::now() < until {
                (s.run)();
            }
        }
    }
    let rounds = rounds();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); list.len()];
    for round in 1..=rounds {
        for (s, times) in list.iter_mut().zip(&mut times) {
            eprintln!("  {} (round {round} of {rounds})", s.name);
            times.push(measure(&mut s.run, budget / rounds) / f64::from(s.ops));
        }
    }
    list.into_iter()
        .zip(times)
        .map(|(s, mut times)| {
            times.sort_by(f64::total_cmp);
            Row {
                name: s.name,
                ns_per_op: times.get(times.len() / 2).copied().unwrap_or(0.0),
                floor: s.floor,
                native: s.native,
            }
        })
        .collect()
}

/// Measures everything and returns BENCHMARKS.md.
pub fn run(quick: bool) -> Result<String, String> {
    let budget = if quick {
        Duration::from_millis(150)
    } else {
        Duration::from_secs(2)
    };
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Written by `cargo run -p filterbox-benches --release --bin bench-report{}`. Each time \
         is the median of {} interleaved rounds (every scenario of an engine once per round), \
         each round the median of 15 batches after a warm-up ({} per scenario in all); hostcall \
         scenarios make 100 calls per callback and report the time per call, beside the bare \
         engine's wasm→host call in the same loop shape.\n",
        if quick { " -- --quick" } else { "" },
        rounds(),
        human(budget.as_nanos() as f64)
    );
    let _ = writeln!(
        md,
        "- CPU: {} ({} threads available)\n- allocator: the system allocator (glibc malloc); \
         release profile\n- engines: {}\n",
        cpu_model(),
        std::thread::available_parallelism().map_or(0, usize::from),
        engine_versions()
    );

    eprintln!("native");
    let native = run_all(native_scenarios(), budget);
    let native_ns: HashMap<String, f64> = native
        .iter()
        .map(|r| (r.name.clone(), r.ns_per_op))
        .collect();
    let _ = writeln!(
        md,
        "## Native filter and header conversions\n\n| scenario | time |\n|---|---|"
    );
    for r in &native {
        let _ = writeln!(md, "| {} | {} |", r.name, human(r.ns_per_op));
    }
    let mut summary: HashMap<(EngineKind, String), f64> = HashMap::new();
    for kind in engines() {
        eprintln!("{kind}");
        let rows = run_all(scenarios(kind, quick)?, budget);
        let by_name: HashMap<&str, f64> = rows
            .iter()
            .map(|r| (r.name.as_str(), r.ns_per_op))
            .collect();
        let _ = writeln!(
            md,
            "\n## {kind}\n\n| scenario | time per op | × floor | × native | above native |\n|---|---|---|---|---|"
        );
        for r in &rows {
            let floor = r.floor.and_then(|f| by_name.get(f));
            let nat = r.native.as_ref().and_then(|n| native_ns.get(n));
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                r.name,
                human(r.ns_per_op),
                floor.map_or("".into(), |f| format!("{:.1}", r.ns_per_op / f)),
                nat.map_or("".into(), |n| format!("{:.1}", r.ns_per_op / n)),
                nat.map_or("".into(), |n| human(r.ns_per_op - n)),
            );
            summary.insert((kind, r.name.clone()), r.ns_per_op);
        }
    }
    md.push_str(&layer_section(&summary));
    md.push_str(&resume_section(quick)?);
    md.push_str(&memory_section(quick)?);
    md.push_str(&threads_section(quick)?);
    md.push_str(&targets_section(&summary, &native_ns));
    Ok(md)
}

/// What the tower layer adds per plugin per exchange: `service/N_plugins` less
/// `service/0_plugins` (the runtime and the inner service) and `chain/N_plugins` (the same
/// callbacks on the VMs directly), over N; and what each plugin after the first adds (the
/// same difference between 5 plugins and 1, over 4), where the once-per-exchange part (the
/// header conversions, the exchange's future) is left out. The last column is one plugin whose
/// callbacks do nothing: the host's whole path for a plugin, with almost no guest work.
fn layer_section(summary: &HashMap<(EngineKind, String), f64>) -> String {
    let mut md = String::from(
        "\n## The tower layer (one exchange in-process, header plugins)\n\n| engine | 0 plugins | 1 plugin | 5 plugins | layer per plugin per exchange (1) | (5) | each plugin after the first | 1 no-op plugin |\n|---|---|---|---|---|---|---|---|\n",
    );
    for kind in engines() {
        let get = |name: &str| summary.get(&(kind, name.to_owned())).copied();
        let (Some(zero), Some(one), Some(five)) = (
            get("service/0_plugins"),
            get("service/1_plugins"),
            get("service/5_plugins"),
        ) else {
            continue;
        };
        let per_plugin = |service: f64, n: f64, direct: Option<f64>| {
            direct.map_or(String::new(), |d| human((service - zero - d) / n))
        };
        let marginal = match (get("chain/1_plugins"), get("chain/5_plugins")) {
            (Some(direct_one), Some(direct_five)) => {
                human(((five - direct_five) - (one - direct_one)) / 4.0)
            }
            _ => String::new(),
        };
        let _ = writeln!(
            md,
            "| {kind} | {} | {} | {} | {} | {} | {marginal} | {} |",
            human(zero),
            human(one),
            human(five),
            per_plugin(one, 1.0, get("chain/1_plugins")),
            per_plugin(five, 5.0, get("chain/5_plugins")),
            get("service/1_noop_plugin").map_or(String::new(), human),
        );
    }
    md
}

/// How soon a paused exchange goes on once its callout is answered.
fn resume_section(quick: bool) -> Result<String, String> {
    let exchanges = if quick { 10 } else { 50 };
    let mut md = format!(
        "\n## Resuming after a callout ({exchanges} exchanges; the callout answers after 20 ms; from the answer handed to filterbox to the upstream called)\n\n| engine | median | 90th percentile | worst |\n|---|---|---|---|\n"
    );
    for kind in engines() {
        let engine = Engine::new(kind, &EngineConfig::default()).map_err(|e| e.to_string())?;
        let gaps = crate::exchange::resume_gaps(&engine, exchanges)?;
        let at = |q: f64| {
            let i = ((gaps.len() as f64 - 1.0) * q).round() as usize;
            gaps.get(i)
                .map_or(String::new(), |d| human(d.as_nanos() as f64))
        };
        let _ = writeln!(md, "| {kind} | {} | {} | {} |", at(0.5), at(0.9), at(1.0));
    }
    Ok(md)
}

fn memory_section(quick: bool) -> Result<String, String> {
    let counts: &[usize] = if quick {
        &[1, 10, 100]
    } else {
        &[1, 10, 100, 1000]
    };
    let mut md = String::from(
        "\n## Memory per VM (header plugin)\n\nRSS is the process's resident memory around making the VMs, and again once they are dropped (what the process still holds for them).\n\n| engine | VMs | RSS per extra VM | linear memory per VM | RSS still held per VM after drop |\n|---|---|---|---|---|\n",
    );
    for kind in engines() {
        let engine = Engine::new(kind, &EngineConfig::default()).map_err(|e| e.to_string())?;
        let plugin = header_plugin(&engine)?;
        // One VM first, so the code and the engine are counted once, not per VM.
        let first = Vm::new(&plugin).map_err(|e| e.to_string())?;
        for &n in counts {
            let before = rss_bytes().unwrap_or(0);
            let mut vms = Vec::with_capacity(n);
            for _ in 0..n {
                vms.push(Vm::new(&plugin).map_err(|e| e.to_string())?);
            }
            let after = rss_bytes().unwrap_or(0);
            let linear: usize = vms.iter_mut().map(Vm::memory_size).sum();
            drop(vms);
            let held = rss_bytes().unwrap_or(0);
            let per_vm = |bytes: u64| bytes as f64 / n as f64 / 1024.0;
            let _ = writeln!(
                md,
                "| {kind} | {n} | {:.0} KiB | {:.0} KiB | {:.0} KiB |",
                per_vm(after.saturating_sub(before)),
                per_vm(linear as u64),
                per_vm(held.saturating_sub(before)),
            );
        }
        drop(first);
    }
    md.push_str(
        "\n## Memory per route configuration (header plugin: each distinct configuration is one more root context in the same VM)\n\n| engine | root contexts | RSS per extra root context | linear memory per extra root context |\n|---|---|---|---|\n",
    );
    for kind in engines() {
        let engine = Engine::new(kind, &EngineConfig::default()).map_err(|e| e.to_string())?;
        let plugin = header_plugin(&engine)?;
        for &n in counts {
            let mut vm = Vm::new(&plugin).map_err(|e| e.to_string())?;
            let (before, linear_before) = (rss_bytes().unwrap_or(0), vm.memory_size());
            for i in 0..n {
                let configuration = format!("add x-route r{i}");
                vm.add_root_context(configuration.into())
                    .map_err(|e| e.to_string())?;
            }
            let after = rss_bytes().unwrap_or(0);
            let linear = vm.memory_size().saturating_sub(linear_before);
            let _ = writeln!(
                md,
                "| {kind} | {n} | {:.1} KiB | {:.1} KiB |",
                after.saturating_sub(before) as f64 / n as f64 / 1024.0,
                linear as f64 / n as f64 / 1024.0
            );
        }
    }
    Ok(md)
}

fn threads_section(quick: bool) -> Result<String, String> {
    let streams = if quick { 2_000 } else { 50_000 };
    let mut md = format!(
        "\n## Threads ({streams} streams of the header plugin per thread, one VM per thread)\n\n| engine | 1 thread | 2 threads | speed-up |\n|---|---|---|---|\n"
    );
    for kind in engines() {
        let engine = Engine::new(kind, &EngineConfig::default()).map_err(|e| e.to_string())?;
        let plugin = header_plugin(&engine)?;
        // Each thread makes its own VM (a wasmer VM cannot move between threads) and waits
        // for the others before the clock starts.
        let rate = |threads: usize| -> f64 {
            let ready = std::sync::Barrier::new(threads + 1);
            let done = std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| {
                        let mut vm = [Vm::new(&plugin).expect("vm")];
                        let request = request_headers(0);
                        ready.wait();
                        for _ in 0..streams {
                            crate::lifecycle(&mut vm, &request);
                        }
                    });
                }
                ready.wait();
                Instant::now()
            });
            (threads * streams) as f64 / done.elapsed().as_secs_f64()
        };
        let (one, two) = (rate(1), rate(2));
        let _ = writeln!(
            md,
            "| {kind} | {:.0} streams/s | {:.0} streams/s | {:.2}× |",
            one,
            two,
            two / one
        );
    }
    Ok(md)
}

fn targets_section(
    summary: &HashMap<(EngineKind, String), f64>,
    native: &HashMap<String, f64>,
) -> String {
    let get = |kind, name: &str| summary.get(&(kind, name.to_owned())).copied();
    let native3 = native.get("native/lifecycle_3_headers").copied();
    let mut md = String::from("\n## Targets\n\n| target | measured |\n|---|---|\n");
    if let (Some(t), Some(n)) = (
        get(EngineKind::Wasmtime, "stream/lifecycle_3_headers"),
        native3,
    ) {
        let _ = writeln!(
            md,
            "| wasmtime lifecycle ≤ 2 µs above native and ≤ 3× native | {} above, {:.1}× |",
            human(t - n),
            t / n
        );
    }
    if let (Some(t), Some(n)) = (
        get(EngineKind::Wasmi, "stream/lifecycle_3_headers"),
        native3,
    ) {
        let _ = writeln!(
            md,
            "| wasmi lifecycle ≤ 5 µs above native | {} above |",
            human(t - n)
        );
    }
    if let Some(floor) = get(EngineKind::Wasmtime, crate::floors::HOST_CALL) {
        let worst = summary
            .iter()
            .filter(|((k, n), _)| *k == EngineKind::Wasmtime && n.starts_with("hostcall/"))
            .map(|((_, n), t)| (n.clone(), t / floor))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((name, ratio)) = worst {
            let _ = writeln!(
                md,
                "| each hostcall ≤ 1.5× its floor on wasmtime | worst {name}: {ratio:.1}× |"
            );
        }
    }
    if let Some(t) = get(EngineKind::Wasmtime, "vm/new_and_start_pooling") {
        let _ = writeln!(
            md,
            "| new VM with pooling ≤ 10 µs | {} (includes plugin start) |",
            human(t)
        );
    }
    if let Some(t) = get(EngineKind::Wasmtime, "stream/create_delete") {
        let _ = writeln!(md, "| stream context create+delete ≤ 1 µs | {} |", human(t));
    }
    md.push_str("\nRSS per VM, chain linearity and thread scaling: see the tables above.\n");
    md
}

/// Replaces the block between `markers` in `file` (or appends `block`, which starts and ends
/// with them): the blocks other programs measured stay as they are.
pub fn write_block(
    file: &std::path::Path,
    (start, end): (&str, &str),
    block: &str,
) -> std::io::Result<()> {
    let old = std::fs::read_to_string(file).unwrap_or_default();
    let new = match (old.find(start), old.find(end)) {
        (Some(from), Some(to)) if from < to => format!(
            "{}{block}{}",
            &old[..from],
            old[to + end.len()..].trim_start_matches('\n')
        ),
        _ if old.is_empty() => block.to_owned(),
        _ => format!("{}\n\n{block}", old.trim_end_matches('\n')),
    };
    std::fs::write(file, new)
}
