//! Load-tests `filterbox serve` with wrk on loopback: requests per second and p99 latency
//! straight to an upstream, through nginx as the reference proxy (when `nginx` is installed),
//! then through `filterbox serve` and through the Pingora example (when it is built) with 0, 1
//! and 5 plugins. Writes the table into BENCHMARKS.md between its proxy markers (bench-report
//! keeps that block).
//!
//! ```sh
//! cargo build --release -p filterbox-cli   # or --profile dist, and --filterbox target/dist/filterbox
//! cargo build --release -p filterbox-pingora --example pingora_proxy
//! cargo run -p filterbox-benches --release --bin bench-proxy [-- --seconds N] [--rounds N] \
//!     [--connections N] [--filterbox PATH] [--pingora PATH] [--compare PATH] [--out FILE]
//! ```
//!
//! `--compare PATH` adds rows for a second `filterbox` binary (its default threads) to the
//! same interleaved rounds: an A/B of two builds that the drift between runs on a shared
//! machine cannot blur.
//!
//! Needs `wrk` (Debian: `apt-get install wrk`); the nginx row needs Debian's `nginx-light`.

use anyhow::{Context as _, Result, bail};
use filterbox_benches::NOOP_PLUGIN;
use filterbox_benches::load::{Proxy, free_port, interleaved, spawn_proxy, start_upstream};
use filterbox_conformance::guests;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

const START: &str = "<!-- proxy-bench -->";
const END: &str = "<!-- /proxy-bench -->";

struct Args {
    seconds: u64,
    connections: u32,
    rounds: u32,
    filterbox: PathBuf,
    pingora: PathBuf,
    /// A second `filterbox` binary to measure beside the first.
    compare: Option<PathBuf>,
    out: PathBuf,
}

fn args() -> Result<Args> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| {
        raw.iter()
            .position(|a| a == name)
            .and_then(|i| raw.get(i + 1))
            .cloned()
    };
    Ok(Args {
        seconds: value("--seconds")
            .map_or(Ok(5), |v| v.parse())
            .context("--seconds")?,
        rounds: value("--rounds")
            .map_or(Ok(3), |v| v.parse())
            .context("--rounds")?,
        connections: value("--connections")
            .map_or(Ok(32), |v| v.parse())
            .context("--connections")?,
        filterbox: value("--filterbox")
            .map_or_else(|| PathBuf::from("target/release/filterbox"), PathBuf::from),
        pingora: value("--pingora").map_or_else(
            || PathBuf::from("target/release/examples/pingora_proxy"),
            PathBuf::from,
        ),
        compare: value("--compare").map(PathBuf::from),
        out: value("--out").map_or_else(|| PathBuf::from("BENCHMARKS.md"), PathBuf::from),
    })
}

/// The plugins of an `n`-plugin chain (name, configuration, file): header rewrites and a
/// deny rule that never matches, so every request reaches the upstream through every plugin.
fn chain(n: usize) -> impl Iterator<Item = (&'static str, &'static str, &'static str)> {
    [
        ("add", "add x-bench-a 1", "headers.wasm"),
        ("deny", "/admin", "deny.wasm"),
        ("replace", "replace x-bench-b 2", "headers.wasm"),
        ("response", "response-add x-bench-c 3", "headers.wasm"),
        ("copy", "copy-header x-bench-a x-bench-d", "headers.wasm"),
    ]
    .into_iter()
    .take(n)
}

/// The `plugins` section of a chain of the no-op plugin alone ([`NOOP_PLUGIN`]).
const NOOP_CHAIN: &str = "plugins:\n  - { name: noop, configuration: \"\", vm_config: { code: { local: { filename: noop.wasm } } } }\n";

/// The `plugins:` entries of `serve`'s config for an `n`-plugin chain.
fn plugins(n: usize) -> String {
    let mut out = String::from("plugins:\n");
    for (name, configuration, file) in chain(n) {
        let _ = writeln!(
            out,
            "  - {{ name: {name}, configuration: \"{configuration}\", vm_config: {{ code: {{ local: {{ filename: {file} }} }} }} }}"
        );
    }
    if n == 0 {
        out = "plugins: []\n".into();
    }
    out
}

/// nginx as the reference proxy: one worker, keepalive connections to the upstream; `None`
/// (with a note) when nginx is not installed.
fn start_nginx(dir: &Path, upstream: SocketAddr) -> Result<Option<(Proxy, SocketAddr)>> {
    let Some(nginx) = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
    else {
        eprintln!("nginx not found (Debian: nginx-light): no reference row");
        return Ok(None);
    };
    let listen = free_port()?;
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(prefix.join("logs"))?;
    let config = format!(
        // One process (no master): killing it at the end stops nginx whole.
        "master_process off;\ndaemon off;\npid {pid};\nerror_log {log} error;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  upstream backend {{ server {upstream}; keepalive 64; }}\n\
           server {{\n    listen {listen};\n    location / {{\n      proxy_pass http://backend;\n\
               proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n",
        pid = prefix.join("nginx.pid").display(),
        log = prefix.join("logs/error.log").display(),
    );
    let path = prefix.join("nginx.conf");
    std::fs::write(&path, config)?;
    let mut command = Command::new(nginx);
    command.arg("-p").arg(&prefix).arg("-c").arg(&path);
    Ok(Some((spawn_proxy(&mut command, listen)?, listen)))
}

fn main() -> Result<()> {
    let args = args()?;
    // What else the machine was doing, for the report.
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(", "))
        .unwrap_or_else(|_| "unknown".to_owned());
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build of the upstream; use --release");
    }
    if !args.filterbox.exists() {
        bail!(
            "{} not found: cargo build --release -p filterbox-cli",
            args.filterbox.display()
        );
    }
    let dir = std::env::temp_dir().join(format!("filterbox-bench-proxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("headers.wasm"), guests::HEADERS)?;
    std::fs::write(dir.join("deny.wasm"), guests::DENY)?;
    std::fs::write(dir.join("noop.wasm"), wat::parse_str(NOOP_PLUGIN)?)?;
    let (upstream, _runtime) = start_upstream()?;

    // Every configuration runs at once, and each round measures them one after the other,
    // so that the machine's drift hits every row alike.
    let mut targets = vec![(
        "direct to upstream".to_owned(),
        format!("http://{upstream}/bench"),
    )];
    let mut proxies = Vec::new();
    if let Some((proxy, listen)) = start_nginx(&dir, upstream)? {
        proxies.push(proxy);
        targets.push((
            "nginx proxy_pass (1 worker)".to_owned(),
            format!("http://{listen}/bench"),
        ));
    }
    let pingora = args.pingora.exists();
    if !pingora {
        eprintln!(
            "{} not found (cargo build --release -p filterbox-pingora --example pingora_proxy): no Pingora rows",
            args.pingora.display()
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    for n in [0, 1, 5] {
        // serve's default (a runtime per worker thread), then its `work_stealing` option, then
        // the binary to compare with, if any.
        let mut serves = vec![
            ("filterbox serve".to_owned(), &args.filterbox, false),
            (
                "filterbox serve, work stealing".to_owned(),
                &args.filterbox,
                true,
            ),
        ];
        if let Some(compare) = &args.compare {
            serves.push((
                format!("filterbox serve {}", compare.display()),
                compare,
                false,
            ));
        }
        // With one plugin, also serve's default with the no-op plugin: the host's own path.
        let noop = (n == 1).then(|| ("filterbox serve".to_owned(), &args.filterbox, false));
        let runs = serves
            .into_iter()
            .map(|serve| (serve, plugins(n), count(n)));
        let runs =
            runs.chain(noop.map(|serve| (serve, NOOP_CHAIN.to_owned(), "1 no-op plugin".into())));
        for (index, ((name, binary, stealing), plugins, count)) in runs.enumerate() {
            let listen = free_port()?;
            let config = format!(
                "listeners: [{{ address: \"{listen}\", upstream: backend }}]\nupstreams: {{ backend: \"http://{upstream}\" }}\nwork_stealing: {stealing}\n{plugins}",
            );
            // A file per process: serve reloads when its file changes.
            let path = dir.join(format!("serve-{n}-{index}.yaml"));
            std::fs::write(&path, config)?;
            let mut command = Command::new(binary);
            command.args(["serve", "--config"]).arg(&path);
            proxies.push(spawn_proxy(&mut command, listen)?);
            targets.push((format!("{name}, {count}"), format!("http://{listen}/bench")));
        }
        if pingora {
            let listen = free_port()?;
            let mut command = Command::new(&args.pingora);
            // As serve: a thread per core, each with its own runtime.
            command
                .env("PINGORA_THREADS", cores.to_string())
                .env("PINGORA_WORK_STEALING", "0");
            command.arg(listen.to_string()).arg(upstream.to_string());
            for (_, configuration, file) in chain(n) {
                command.arg(format!("{}={configuration}", dir.join(file).display()));
            }
            proxies.push(spawn_proxy(&mut command, listen)?);
            targets.push((
                format!("Pingora + filterbox-pingora, {}", count(n)),
                format!("http://{listen}/bench"),
            ));
        }
    }
    let rows = interleaved(&targets, args.rounds, args.seconds, args.connections)?;
    drop(proxies);
    let block = table(&rows, &args, &load);
    print!("{block}");
    filterbox_benches::report::write_block(&args.out, (START, END), &block)?;
    eprintln!("updated {}", args.out.display());
    Ok(())
}

/// "1 plugin", "5 plugins".
fn count(n: usize) -> String {
    format!("{n} plugin{}", if n == 1 { "" } else { "s" })
}

fn table(rows: &[(String, f64, f64)], args: &Args, load: &str) -> String {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let mut out = format!(
        "{START}\n## Proxy on loopback (wrk)\n\nWritten by `cargo run -p filterbox-benches --release --bin bench-proxy` with `{filterbox}` (wasmtime; the binary allocates with mimalloc; by default one worker thread per core, each with a runtime of its own; the `work stealing` rows set `work_stealing: true`: one multi-thread runtime) and `{pingora}`, the example of `filterbox-pingora` (wasmtime, one worker thread per core without work stealing, mimalloc as serve). nginx (Debian's nginx-light) runs one worker with keepalive to the upstream. \
         `wrk -t1 -c{} -d{}s --latency` against `GET /bench`, {} interleaved rounds (every row once per round), the median of each row; the upstream (hyper, one thread) answers `200 hello`. \
         Plugins are the SDK-built conformance guests: header rewrites and a deny rule that never matches (4 of the 5 plugins are one file, which both proxies compile once and share); the `no-op plugin` row runs a module whose callbacks return at once and make no hostcall, so it shows what filterbox's own path costs for one plugin. \
         wrk, the upstream and the proxy share this machine's {cores} cores, so the numbers compare configurations, not hardware limits; they also vary by tens of percent between runs on this VM (direct: 69k to 115k requests/s on one day), so compare rows of one run. Load average (1, 5, 15 min) when the run started: {load}.\n\n\
         | path | requests/s | p99 latency | throughput lost to the plugins |\n|---|---|---|---|\n",
        args.connections,
        args.seconds,
        args.rounds,
        filterbox = args.filterbox.display(),
        pingora = args.pingora.display(),
    );
    // Each proxy's rows compare with its own 0-plugin row.
    let family = |name: &str| name.rsplit_once(", ").map(|(family, _)| family.to_owned());
    for (name, rps, p99) in rows {
        let none = family(name).and_then(|f| {
            rows.iter()
                .find(|(other, _, _)| *other == format!("{f}, 0 plugins"))
                .map(|row| row.1)
        });
        let lost = match none {
            Some(none) if !name.ends_with(" 0 plugins") => {
                format!("{:.0}%", (1.0 - rps / none) * 100.0)
            }
            _ => String::new(),
        };
        let _ = writeln!(out, "| {name} | {rps:.0} | {p99:.2} ms | {lost} |");
    }
    out.push_str(END);
    out.push('\n');
    out
}
