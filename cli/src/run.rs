//! `filterbox run plugin.wasm`: one plugin, one request (and response), everything printed.
//! The plugin author's quickest test loop. `--service-ms` runs a root-only plugin instead (its
//! ticks, queues and callouts for a while), `--tcp` one L4 connection.

use anyhow::{Context as _, Result, bail};
use bytes::{Bytes, BytesMut};
use filterbox::abi::PeerType;
use filterbox::{
    Action, CacheOutcome, EngineKind, Exchange, FilterChain, HeaderMap, HyperCallouts, LocalReply,
    LocalResponse, LogLevel, LogSink, ModuleCache, Plugin, PluginConfig, Vm,
};
use parking_lot::Mutex;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What `filterbox run` was asked.
#[derive(clap::Args)]
pub struct RunArgs {
    /// The plugin's .wasm file.
    plugin: PathBuf,
    /// Plugin configuration (what `proxy_on_configure` reads); `@file` reads a file.
    #[arg(long, default_value = "")]
    config: String,
    /// VM configuration (what `proxy_on_vm_start` reads); `@file` reads a file.
    #[arg(long, default_value = "")]
    vm_config: String,
    /// Root id the plugin registered.
    #[arg(long, default_value = "")]
    root_id: String,
    /// VM id (`plugin_vm_id`; VMs with one id share data and queues).
    #[arg(long, default_value = "")]
    vm_id: String,
    /// Environment variable `NAME=value` the plugin sees through WASI (repeatable).
    #[arg(long = "env")]
    environment: Vec<String>,
    /// Limits as JSON, the fields `limits` takes in a plugin config (the rest default), e.g.
    /// `{"callback_deadline_ms": 100, "memory_bytes": 67108864}`; `@file` reads a file.
    #[arg(long)]
    limits: Option<String>,
    /// Engine: wasmtime, wasmer-cranelift, wasmer-singlepass, wasmi.
    #[arg(long, default_value = "wasmtime")]
    engine: String,
    /// Request method.
    #[arg(long, short = 'X', default_value = "GET")]
    method: String,
    /// Request path (with query).
    #[arg(long, default_value = "/")]
    path: String,
    /// Request header `name: value` (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// Request body; `@file` reads a file.
    #[arg(long, short = 'd', default_value = "")]
    body: String,
    /// The whole request as a raw HTTP/1.1 file (request line, headers, blank line, body);
    /// replaces --method, --path, --header and --body.
    #[arg(long)]
    request: Option<PathBuf>,
    /// Status of the upstream's response.
    #[arg(long, default_value_t = 200)]
    response_status: u16,
    /// Upstream response header `name: value` (repeatable).
    #[arg(long = "response-header")]
    response_headers: Vec<String>,
    /// Upstream response body; `@file` reads a file.
    #[arg(long, default_value = "")]
    response_body: String,
    /// The upstream's response as a raw HTTP/1.1 file (status line, headers, blank line,
    /// body); replaces the --response-* options.
    #[arg(long)]
    response: Option<PathBuf>,
    /// Upstream `name=http://host:port` for the plugin's HTTP and gRPC calls (repeatable).
    #[arg(long = "upstream")]
    upstreams: Vec<String>,
    /// How long to wait for a plugin that pauses (for a callout, say), in milliseconds; then
    /// filterbox answers 504 (`filterbox_pause_timeout`), as `serve` does.
    #[arg(long, default_value_t = 5000)]
    wait_ms: u64,
    /// A property the plugin reads, `path=value` with the path in dots (Envoy's
    /// `metadata.filter_metadata.ns.key`, `source.address`, ...; repeatable). Set on the
    /// stream; for `--service-ms` and `--tcp` on the root context, which every context sees.
    #[arg(long = "property")]
    properties: Vec<String>,
    /// Run the plugin as a service (root context only, no request): start it, run its ticks,
    /// queue messages and callouts for this many milliseconds, shut it down, and print its
    /// logs and metrics.
    #[arg(long, conflicts_with = "tcp")]
    service_ms: Option<u64>,
    /// Run one L4 (TCP) connection instead of an HTTP exchange: `--downstream-data` from the
    /// client, `--upstream-data` from the upstream, then both sides close.
    #[arg(long)]
    tcp: bool,
    /// Bytes the client sends on the `--tcp` connection; `@file` reads a file.
    #[arg(long, default_value = "")]
    downstream_data: String,
    /// Bytes the upstream answers on the `--tcp` connection; `@file` reads a file.
    #[arg(long, default_value = "")]
    upstream_data: String,
    /// Where compiled modules are kept between runs (default: `$XDG_CACHE_HOME/filterbox`
    /// or `~/.cache/filterbox`), so a large plugin compiles once.
    #[arg(long, conflicts_with = "no_cache")]
    cache_dir: Option<PathBuf>,
    /// Compile the plugin afresh and keep nothing.
    #[arg(long)]
    no_cache: bool,
    /// Print every hostcall the plugin makes (name, arguments, result) on stderr.
    #[arg(long)]
    pub trace: bool,
}

impl RunArgs {
    /// The module cache to use, if any.
    fn module_cache(&self) -> Option<ModuleCache> {
        if self.no_cache {
            return None;
        }
        if let Some(dir) = &self.cache_dir {
            return Some(ModuleCache::new(dir));
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
        Some(ModuleCache::new(base.join("filterbox")))
    }

    /// The `--property` values as (path, value).
    fn properties(&self) -> Result<Vec<(Vec<String>, Bytes)>> {
        self.properties
            .iter()
            .map(|property| {
                let Some((path, value)) = property.split_once('=') else {
                    bail!("--property {property:?} is not path=value");
                };
                let path: Vec<String> = path.split('.').map(str::to_owned).collect();
                if path.iter().any(String::is_empty) {
                    bail!("--property {property:?}: an empty segment in the path");
                }
                Ok((path, Bytes::from(value.to_owned())))
            })
            .collect()
    }
}

/// Plugin log lines, kept for the report.
#[derive(Default)]
struct Logs(Mutex<Vec<(LogLevel, String)>>);

impl LogSink for Logs {
    fn log(&self, _plugin: &str, level: LogLevel, message: &str) {
        self.0.lock().push((level, message.to_owned()));
    }
}

/// Text given inline or as `@file`.
fn text_arg(value: &str) -> Result<Vec<u8>> {
    match value.strip_prefix('@') {
        Some(file) => std::fs::read(file).with_context(|| format!("reading {file}")),
        None => Ok(value.as_bytes().to_vec()),
    }
}

fn header_arg(map: &mut HeaderMap, line: &str) -> Result<()> {
    let Some((name, value)) = line.split_once(':') else {
        bail!("header {line:?} is not `name: value`");
    };
    map.add(name.trim().to_ascii_lowercase(), value.trim().to_owned());
    Ok(())
}

/// A raw HTTP/1.1 message: the start line's words, headers, body.
fn parse_raw(path: &Path) -> Result<(Vec<String>, HeaderMap, Bytes)> {
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| (at, 4))
        .or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|at| (at, 2)));
    let (head, body) = match split {
        Some((at, gap)) => (&raw[..at], Bytes::copy_from_slice(&raw[at + gap..])),
        None => (&raw[..], Bytes::new()),
    };
    let head = String::from_utf8_lossy(head);
    let mut lines = head.lines();
    let start = lines
        .next()
        .with_context(|| format!("{}: empty", path.display()))?
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let mut headers = HeaderMap::new();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        header_arg(&mut headers, line).with_context(|| path.display().to_string())?;
    }
    Ok((start, headers, body))
}

/// Runs the plugin on the request and response and returns the report.
pub fn run(args: &RunArgs) -> Result<String> {
    let wasm = std::fs::read(&args.plugin)
        .with_context(|| format!("reading {}", args.plugin.display()))?;
    let engine = EngineKind::from_name(&args.engine).map_err(|e| anyhow::anyhow!("{e}"))?;
    let name = args
        .plugin
        .file_stem()
        .map_or_else(|| "plugin".to_owned(), |s| s.to_string_lossy().into_owned());
    let mut config = PluginConfig::named(&name)
        .with_configuration(text_arg(&args.config)?)
        .with_vm_configuration(text_arg(&args.vm_config)?)
        .with_engine(engine)
        .with_log_level(LogLevel::Trace);
    config.root_id = args.root_id.clone();
    config.vm_id = args.vm_id.clone();
    for variable in &args.environment {
        let Some((name, value)) = variable.split_once('=') else {
            bail!("--env {variable:?} is not NAME=value");
        };
        config
            .environment_variables
            .push((name.to_owned(), value.to_owned()));
    }
    if let Some(limits) = &args.limits {
        config.limits = serde_json::from_slice(&text_arg(limits)?)
            .with_context(|| format!("--limits {limits:?}"))?;
    }
    let logs = Arc::new(Logs::default());
    let mut builder = Plugin::builder(config).log_sink(logs.clone());
    // Callouts need a runtime; it lives as long as the run.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    if !args.upstreams.is_empty() {
        let mut callouts = HyperCallouts::new(runtime.handle().clone());
        for upstream in &args.upstreams {
            let Some((name, url)) = upstream.split_once('=') else {
                bail!("upstream {upstream:?} is not name=http://host:port");
            };
            callouts = callouts
                .upstream(name, url)
                .map_err(|e| anyhow::anyhow!("upstream {name:?}: {e}"))?;
        }
        builder = builder.callouts(Arc::new(callouts));
    }
    if let Some(cache) = args.module_cache() {
        builder = builder.module_cache(cache);
    }
    let properties = args.properties()?;
    let file = args.plugin.display();
    let plugin = builder
        .build(&wasm)
        .map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "plugin: {file} (ABI {}, {engine}; {})",
        plugin.abi_version(),
        cache_note(plugin.cache_outcome())
    );
    if args.service_ms.is_some() || args.tcp {
        let mut vm = match Vm::new(&plugin) {
            Ok(vm) => vm,
            Err(error) => {
                print_logs(&mut out, &logs);
                bail!("{out}{file}: {error}");
            }
        };
        // No HTTP stream to carry them: root properties, which every context sees.
        for (path, value) in &properties {
            let path: Vec<&str> = path.iter().map(String::as_str).collect();
            vm.set_root_property(&path, value.clone());
        }
        match args.service_ms {
            Some(ms) => run_service(&mut vm, Duration::from_millis(ms), &mut out),
            None => run_connection(&mut vm, args, &mut out)?,
        }
        print_tail(&mut out, &logs, &plugin);
        return Ok(out);
    }

    let (request, request_body) = match &args.request {
        Some(path) => {
            let (start, mut headers, body) = parse_raw(path)?;
            let (method, target) = match start.as_slice() {
                [method, target, ..] => (method.clone(), target.clone()),
                _ => bail!(
                    "{}: the first line is not `METHOD /path HTTP/1.1`",
                    path.display()
                ),
            };
            let mut map = pseudo_request(&method, &target, &headers);
            map.extend_from(&mut headers);
            (map, body)
        }
        None => {
            let mut headers = HeaderMap::new();
            for line in &args.headers {
                header_arg(&mut headers, line)?;
            }
            let mut map = pseudo_request(&args.method, &args.path, &headers);
            map.extend_from(&mut headers);
            (map, Bytes::from(text_arg(&args.body)?))
        }
    };
    let (response, response_body) = match &args.response {
        Some(path) => {
            let (start, mut headers, body) = parse_raw(path)?;
            let status = start.get(1).cloned().unwrap_or_else(|| "200".into());
            let mut map = HeaderMap::new();
            map.add(":status", status);
            map.extend_from(&mut headers);
            (map, body)
        }
        None => {
            let mut map = HeaderMap::new();
            map.add(":status", args.response_status.to_string());
            for line in &args.response_headers {
                header_arg(&mut map, line)?;
            }
            (map, Bytes::from(text_arg(&args.response_body)?))
        }
    };

    // One slot, and the exchange core that `serve` runs exchanges through.
    let chain = match FilterChain::builder()
        .slots(1)
        .pause_timeout(Duration::from_millis(args.wait_ms))
        .build(vec![plugin.clone()])
    {
        Ok(chain) => chain,
        Err(error) => {
            // The plugin's own words (a panic message, say) say more than the trap.
            print_logs(&mut out, &logs);
            bail!("{out}{file}: {error}");
        }
    };
    let exchange = Message {
        headers: request,
        body: request_body,
        trailers: None,
    };
    let upstream = Message {
        headers: response,
        body: response_body,
        trailers: None,
    };
    match runtime.block_on(run_exchange(&chain, &properties, exchange, upstream)) {
        Outcome::Forwarded { request, response } => {
            let _ = writeln!(out, "\n== request, as forwarded upstream");
            print_message(&mut out, &request.headers, &request.body);
            print_trailers(&mut out, request.trailers.as_ref());
            let _ = writeln!(out, "\n== response, as sent to the client");
            print_message(&mut out, &response.headers, &response.body);
            print_trailers(&mut out, response.trailers.as_ref());
        }
        Outcome::Local {
            reply,
            upstream_called,
        } => {
            let details = match reply.details.is_empty() {
                true => "no details",
                false => reply.details.as_str(),
            };
            let upstream = match upstream_called {
                true => "the upstream's response was replaced",
                false => "the upstream was not called",
            };
            // The chain's own answers (a pause past --wait-ms, a limit) name themselves.
            let from = match reply.details.starts_with("filterbox_") {
                true => "filterbox",
                false => "the plugin",
            };
            let _ = writeln!(
                out,
                "\n== local response from {from} ({details}); {upstream}"
            );
            print_message(&mut out, &reply.headers, &reply.body);
        }
    }
    drop(chain);
    print_tail(&mut out, &logs, &plugin);
    drop(runtime);
    Ok(out)
}

/// One HTTP message: headers (with pseudo headers), body, and the trailers the plugin added.
struct Message {
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

enum Outcome {
    Forwarded {
        request: Message,
        response: Message,
    },
    Local {
        reply: LocalReply,
        upstream_called: bool,
    },
}

/// The request through the plugin, the upstream's `response` back through it, as `serve`
/// would send them (with the stream properties set first).
async fn run_exchange(
    chain: &FilterChain,
    properties: &[(Vec<String>, Bytes)],
    request: Message,
    response: Message,
) -> Outcome {
    let mut exchange = chain.exchange();
    for (path, value) in properties {
        let path: Vec<&str> = path.iter().map(String::as_str).collect();
        if let Err(local) = exchange.set_property(&path, value.clone()).await {
            let reply = exchange.reply(local).await;
            return Outcome::Local {
                reply,
                upstream_called: false,
            };
        }
    }
    let request = match through(&mut exchange, true, request).await {
        Ok(request) => request,
        Err(local) => {
            let reply = exchange.reply(local).await;
            return Outcome::Local {
                reply,
                upstream_called: false,
            };
        }
    };
    let response = match through(&mut exchange, false, response).await {
        Ok(response) => response,
        Err(local) => {
            let reply = exchange.reply_directly(local);
            return Outcome::Local {
                reply,
                upstream_called: true,
            };
        }
    };
    exchange.finish_and_wait().await;
    Outcome::Forwarded { request, response }
}

/// A whole message (the request if `request`, else the response) through the plugin's
/// header and body phases.
async fn through(
    exchange: &mut Exchange,
    request: bool,
    message: Message,
) -> Result<Message, LocalResponse> {
    let end = message.body.is_empty();
    let headers = match request {
        true => exchange.request_headers(message.headers, end).await?,
        false => exchange.response_headers(message.headers, end).await?,
    };
    if end {
        return Ok(Message {
            headers,
            body: Bytes::new(),
            trailers: None,
        });
    }
    let (body, trailers) = match request {
        true => (
            exchange.request_body(message.body, true).await?,
            exchange.request_added_trailers().await?,
        ),
        false => (
            exchange.response_body(message.body, true).await?,
            exchange.response_added_trailers().await?,
        ),
    };
    Ok(Message {
        headers,
        body,
        trailers,
    })
}

/// What the module cache did, for the report.
fn cache_note(outcome: Option<&CacheOutcome>) -> String {
    match outcome {
        None => "compiled, not cached".into(),
        Some(CacheOutcome::Hit) => "loaded from the module cache".into(),
        Some(CacheOutcome::Miss) => "compiled and cached".into(),
        Some(CacheOutcome::Rebuilt(why)) => format!("compiled again and cached ({why})"),
        Some(CacheOutcome::Unsupported) => "compiled (this engine caches nothing)".into(),
        Some(CacheOutcome::NotStored(why)) => format!("compiled, not cached: {why}"),
    }
}

/// The plugin's logs, its metrics and the host's view, after any kind of run.
fn print_tail(out: &mut String, logs: &Logs, plugin: &Plugin) {
    print_logs(out, logs);
    let mut metrics = String::new();
    plugin.metric_registry().render_prometheus(&mut metrics);
    let metrics: Vec<&str> = metrics.lines().filter(|l| !l.starts_with('#')).collect();
    let _ = writeln!(out, "\n== plugin metrics ({})", metrics.len());
    for line in metrics {
        let _ = writeln!(out, "{line}");
    }
    let host = plugin.metrics();
    let _ = writeln!(
        out,
        "\n== host\nmemory high water: {} bytes\nVMs failed: {}",
        host.memory_high_water_bytes(),
        host.vms_failed()
    );
}

/// Runs a root-only plugin for `span`: ticks, queue messages, callout answers; then asks it
/// to shut down (giving it the rest of a second to finish if it asks to).
fn run_service(vm: &mut Vm, span: Duration, out: &mut String) {
    let until = Instant::now() + span;
    let mut callbacks = 0;
    let mut failure = None;
    while Instant::now() < until {
        match vm.wait_and_run(until.saturating_duration_since(Instant::now())) {
            Ok(ran) => callbacks += ran,
            Err(error) => {
                failure = Some(error);
                break;
            }
        }
    }
    let _ = writeln!(
        out,
        "\n== service: {} ms, {callbacks} callback(s) ran",
        span.as_millis()
    );
    if let Some(error) = failure {
        let _ = writeln!(out, "the plugin failed: {error}");
        return;
    }
    match vm.shutdown_within(Duration::from_secs(1)) {
        Ok(true) => {}
        Ok(false) => {
            let _ = writeln!(out, "the plugin did not finish within 1 s of proxy_on_done");
        }
        Err(error) => {
            let _ = writeln!(out, "shutting down: {error}");
        }
    }
}

/// Runs one L4 connection: the client's bytes, the upstream's, then both sides close.
fn run_connection(vm: &mut Vm, args: &RunArgs, out: &mut String) -> Result<()> {
    let (connection, action) = vm.create_connection()?;
    let _ = writeln!(out, "\n== connection opened: {}", action_name(&action));
    let mut downstream = BytesMut::from(&text_arg(&args.downstream_data)?[..]);
    let action = vm.on_downstream_data(&connection, &mut downstream, false)?;
    let _ = writeln!(
        out,
        "\n== client data, as forwarded upstream ({})",
        action_name(&action)
    );
    let _ = writeln!(out, "{}", String::from_utf8_lossy(&downstream));
    let mut upstream = BytesMut::from(&text_arg(&args.upstream_data)?[..]);
    let action = vm.on_upstream_data(&connection, &mut upstream, false)?;
    let _ = writeln!(
        out,
        "\n== upstream data, as sent to the client ({})",
        action_name(&action)
    );
    let _ = writeln!(out, "{}", String::from_utf8_lossy(&upstream));
    vm.on_downstream_connection_close(&connection, PeerType::Remote)?;
    vm.on_upstream_connection_close(&connection, PeerType::Remote)?;
    let events = vm.take_connection_events(&connection);
    if !events.is_empty() {
        let _ = writeln!(out, "\n== plugin asked: {events:?}");
    }
    vm.finish_connection(connection)?;
    Ok(())
}

fn action_name(action: &Action) -> &'static str {
    match action {
        Action::Continue => "continue",
        Action::Pause => "paused",
        Action::Respond(_) => "local response",
    }
}

/// Pseudo headers of a request; `:authority` from `host` if there is one.
fn pseudo_request(method: &str, path: &str, headers: &HeaderMap) -> HeaderMap {
    let mut map = HeaderMap::new();
    map.add(":method", method.to_owned());
    map.add(":path", path.to_owned());
    map.add(":scheme", "http");
    let authority = headers.get_str("host").unwrap_or("localhost").to_owned();
    map.add(":authority", authority);
    map
}

trait AppendAll {
    fn extend_from(&mut self, other: &mut HeaderMap);
}

impl AppendAll for HeaderMap {
    fn extend_from(&mut self, other: &mut HeaderMap) {
        for (name, value) in other.iter() {
            self.add(name.clone(), value.clone());
        }
        other.clear();
    }
}

fn print_message(out: &mut String, headers: &HeaderMap, body: &[u8]) {
    for (name, value) in headers.iter() {
        let _ = writeln!(
            out,
            "{}: {}",
            String::from_utf8_lossy(name),
            String::from_utf8_lossy(value)
        );
    }
    if !body.is_empty() {
        let _ = writeln!(out, "\n{}", String::from_utf8_lossy(body));
    }
}

/// Trailers the plugin added to a message.
fn print_trailers(out: &mut String, trailers: Option<&HeaderMap>) {
    if let Some(trailers) = trailers {
        let _ = writeln!(out, "-- trailers added by the plugin");
        print_message(out, trailers, &[]);
    }
}

fn print_logs(out: &mut String, logs: &Logs) {
    let logs = logs.0.lock();
    let _ = writeln!(out, "\n== plugin logs ({})", logs.len());
    for (level, message) in logs.iter() {
        let _ = writeln!(out, "[{}] {message}", level.name().to_ascii_lowercase());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: RunArgs,
    }

    fn run_with(dir: &Path, wasm: &[u8], args: &[&str]) -> Result<String> {
        let file = dir.join("plugin.wasm");
        std::fs::write(&file, wasm)?;
        let mut argv = vec!["run".to_owned(), file.display().to_string()];
        argv.extend(args.iter().map(|a| a.to_string()));
        // Tests keep their compiled modules to themselves, not in the user's cache.
        if !args.contains(&"--cache-dir") {
            argv.push("--no-cache".into());
        }
        run(&Cli::try_parse_from(argv)?.args)
    }

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("filterbox-run-{name}-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        dir
    }

    #[test]
    fn run_prints_the_forwarded_request_the_response_and_the_logs() {
        let report = run_with(
            &dir("headers"),
            filterbox_conformance::guests::HEADERS,
            &[
                "--config",
                "add x-added one\nresponse-add x-r two",
                "--path",
                "/p",
                "-H",
                "host: h",
            ],
        )
        .expect("run");
        assert!(
            report.contains("== request, as forwarded upstream"),
            "{report}"
        );
        assert!(report.contains("x-added: one"), "{report}");
        assert!(report.contains(":authority: h"), "{report}");
        assert!(report.contains("x-r: two"), "{report}");
        assert!(report.contains("[info] configured 2 rules"), "{report}");
    }

    #[test]
    fn run_prints_a_local_response_from_a_raw_request_file() {
        let dir = dir("deny");
        let request = dir.join("request.http");
        std::fs::write(&request, "GET /admin/x HTTP/1.1\r\nhost: example\r\n\r\n").expect("write");
        let report = run_with(
            &dir,
            filterbox_conformance::guests::DENY,
            &["--request", &request.display().to_string()],
        )
        .expect("run");
        assert!(
            report.contains("== local response from the plugin"),
            "{report}"
        );
        assert!(report.contains(":status: 403"), "{report}");
        assert!(report.contains("denied by policy"), "{report}");
    }

    #[test]
    fn run_takes_the_vm_id_environment_and_limits() {
        let dir = dir("settings");
        let report = run_with(
            &dir,
            filterbox_conformance::guests::HEADERS,
            &[
                "--config",
                "copy-property x-vm plugin_vm_id",
                "--vm-id",
                "shared",
                "--env",
                "MODE=test",
                "--limits",
                r#"{"callback_deadline_ms": 50}"#,
            ],
        )
        .expect("run");
        assert!(report.contains("x-vm: shared"), "{report}");
        let error = run_with(
            &dir,
            filterbox_conformance::guests::HEADERS,
            &["--limits", r#"{"callback_deadline": 50}"#],
        )
        .expect_err("an unknown limit accepted");
        assert!(
            format!("{error:#}").contains("callback_deadline"),
            "{error:#}"
        );
    }

    #[test]
    fn a_plugin_that_does_not_configure_is_named_with_its_file_and_reason() {
        let error = run_with(
            &dir("bad"),
            filterbox_conformance::guests::HEADERS,
            &["--config", "nonsense"],
        )
        .expect_err("bad config accepted");
        let message = format!("{error:#}");
        assert!(message.contains("plugin.wasm"), "{message}");
        assert!(
            message.contains("proxy_on_configure returned false"),
            "{message}"
        );
        assert!(message.contains("bad rule: nonsense"), "{message}");
    }

    #[test]
    fn run_keeps_compiled_modules_in_its_cache() {
        let dir = dir("cache");
        let cache = dir.join("modules");
        let _ = std::fs::remove_dir_all(&cache);
        let cache = cache.display().to_string();
        let args = ["--cache-dir", cache.as_str()];
        let first = run_with(&dir, filterbox_conformance::guests::HEADERS, &args).expect("run");
        assert!(first.contains("compiled and cached"), "{first}");
        let second = run_with(&dir, filterbox_conformance::guests::HEADERS, &args).expect("run");
        assert!(second.contains("loaded from the module cache"), "{second}");
    }

    #[test]
    fn run_sets_properties_the_plugin_reads() {
        let report = run_with(
            &dir("properties"),
            filterbox_conformance::guests::HEADERS,
            &[
                "--config",
                "copy-property x-meta metadata.filter_metadata.ns.key",
                "--property",
                "metadata.filter_metadata.ns.key=from-cli",
            ],
        )
        .expect("run");
        assert!(report.contains("x-meta: from-cli"), "{report}");
        let error = run_with(
            &dir("properties"),
            filterbox_conformance::guests::HEADERS,
            &["--property", "a..b=c"],
        )
        .expect_err("an empty path segment accepted");
        assert!(format!("{error:#}").contains("empty segment"), "{error:#}");
    }

    #[test]
    fn run_runs_a_service_plugin_for_a_while() {
        let report = run_with(
            &dir("service"),
            filterbox_conformance::guests::PARITY,
            &["--config", "service", "--service-ms", "200"],
        )
        .expect("run");
        let ran = report
            .lines()
            .find_map(|l| l.strip_prefix("== service: 200 ms, "))
            .and_then(|l| l.split(' ').next())
            .and_then(|n| n.parse::<u32>().ok());
        // Ticks every 10 ms: a loaded machine still gets a few in 200 ms.
        assert!(ran.is_some_and(|n| n >= 2), "{report}");
        assert!(!report.contains("== request"), "{report}");
    }

    #[test]
    fn run_runs_one_tcp_connection() {
        let wasm = wat::parse_str(
            r#"(module
                (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
                (import "env" "proxy_get_buffer_bytes"
                    (func $get (param i32 i32 i32 i32 i32) (result i32)))
                (memory (export "memory") 1)
                (global $next (mut i32) (i32.const 4096))
                (func (export "proxy_abi_version_0_2_1"))
                (func (export "proxy_on_memory_allocate") (param i32) (result i32)
                    (local $p i32)
                    (local.set $p (global.get $next))
                    (global.set $next (i32.add (global.get $next) (i32.const 1024)))
                    (local.get $p))
                (func (export "proxy_on_context_create") (param i32 i32))
                (func (export "proxy_on_new_connection") (param i32) (result i32) (i32.const 0))
                ;; Logs what the client sent.
                (func (export "proxy_on_downstream_data") (param i32 i32 i32) (result i32)
                    (drop (call $get (i32.const 2) (i32.const 0) (local.get 1) (i32.const 16) (i32.const 20)))
                    (drop (call $log (i32.const 2) (i32.load (i32.const 16)) (i32.load (i32.const 20))))
                    (i32.const 0))
                (func (export "proxy_on_upstream_data") (param i32 i32 i32) (result i32) (i32.const 0)))"#,
        )
        .expect("WAT");
        let report = run_with(
            &dir("tcp"),
            &wasm,
            &[
                "--tcp",
                "--downstream-data",
                "ping",
                "--upstream-data",
                "pong",
            ],
        )
        .expect("run");
        assert!(
            report.contains("== connection opened: continue"),
            "{report}"
        );
        assert!(report.contains("[info] ping"), "{report}");
        assert!(
            report.contains("== upstream data, as sent to the client (continue)\npong"),
            "{report}"
        );
    }
}
