//! The benchmark scenarios, shared by the criterion benches (`cargo bench`) and the report
//! command (`cargo run -p filterbox-benches --release --bin bench-report`), so both measure
//! the same work.
//!
//! Every scenario is one closure doing one unit of work (a stream, a callback with 100
//! hostcalls, a VM start). Each names its floor (the same work's unavoidable part on the bare
//! engine) and the native Rust filter doing the same header work, so ratios come from one run.

#![warn(missing_docs)]

pub mod exchange;
pub mod floors;
pub mod load;
pub mod report;

use bytes::BytesMut;
use filterbox::{
    Engine, EngineConfig, EngineKind, HeaderMap, LogLevel, ModuleCache, Plugin, PluginConfig,
    PoolingConfig, Vm,
};
use filterbox_conformance::guests;
use std::hint::black_box;

/// How many hostcalls one hostcall scenario makes per unit of work.
pub const HOSTCALLS_PER_ITER: u32 = 100;

/// One unit of work to time.
pub struct Scenario {
    /// `group/name`, e.g. `stream/lifecycle_3_headers`.
    pub name: String,
    /// How many operations one run does (the time is reported per operation).
    pub ops: u32,
    /// The scenario this one is compared with on the bare engine, if any.
    pub floor: Option<&'static str>,
    /// The native scenario doing the same work, if any.
    pub native: Option<String>,
    /// Does the work once.
    pub run: Box<dyn FnMut()>,
}

impl Scenario {
    fn new(name: impl Into<String>, run: impl FnMut() + 'static) -> Self {
        Scenario {
            name: name.into(),
            ops: 1,
            floor: None,
            native: None,
            run: Box::new(run),
        }
    }

    fn per(mut self, ops: u32) -> Self {
        self.ops = ops;
        self
    }

    fn floor(mut self, floor: &'static str) -> Self {
        self.floor = Some(floor);
        self
    }

    fn native(mut self, native: impl Into<String>) -> Self {
        self.native = Some(native.into());
        self
    }
}

fn fail(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

/// The header plugin (adds one request and one response header) on `engine`.
pub fn header_plugin(engine: &Engine) -> Result<Plugin, String> {
    header_plugin_timed(engine, 16)
}

/// A plugin whose callbacks return at once and call nothing (WAT). Beside a header plugin it
/// shows what the host's own path costs for one plugin (the exchange core, the header
/// conversions, the calls into wasm), apart from any SDK's work.
pub const NOOP_PLUGIN: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_log") (param i32))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_delete") (param i32))
)"#;

/// [`NOOP_PLUGIN`] on `engine`.
pub fn noop_plugin(engine: &Engine) -> Result<Plugin, String> {
    let wasm = wat::parse_str(NOOP_PLUGIN).map_err(|e| fail("no-op plugin", e))?;
    let config = PluginConfig::named("noop").with_engine(engine.kind());
    Plugin::builder(config)
        .engine(engine)
        .build(&wasm)
        .map_err(|e| fail("no-op plugin", e))
}

/// [`header_plugin`], timing one callback in `every` for the latency histogram (0: none).
fn header_plugin_timed(engine: &Engine, every: u32) -> Result<Plugin, String> {
    let config = PluginConfig::named("bench")
        .with_configuration("add x-request yes\nresponse-add x-response yes")
        .with_engine(engine.kind())
        .with_log_level(LogLevel::Warn);
    Plugin::builder(config)
        .engine(engine)
        .callback_latency_sampling(every)
        .build(guests::HEADERS)
        .map_err(|e| fail("header plugin", e))
}

/// A request with the three pseudo headers and `extra` more.
pub fn request_headers(extra: usize) -> HeaderMap {
    let mut h: HeaderMap = [
        (":method", "GET"),
        (":path", "/index.html"),
        (":authority", "example.com"),
    ]
    .into_iter()
    .collect();
    h.extend((0..extra).map(|i| (format!("x-extra-{i}"), "value")));
    h
}

pub(crate) fn response_headers() -> HeaderMap {
    [(":status", "200")].into_iter().collect()
}

/// The native filter: the header plugin's work in Rust on the same header type.
fn native_filter(request: &mut HeaderMap, response: &mut HeaderMap) {
    request.add("x-request", "yes");
    response.add("x-response", "yes");
}

/// Engine-independent scenarios: the native filter, and the conversions between `http`
/// parts and filterbox's header map an `http` embedder pays per exchange.
pub fn native_scenarios() -> Vec<Scenario> {
    let mut out: Vec<Scenario> = [0usize, 10, 50]
        .into_iter()
        .map(|extra| {
            let request = request_headers(extra);
            let name = format!("native/lifecycle_{}_headers", request.len());
            Scenario::new(name, move || {
                let (mut req, mut resp) = (request.clone(), response_headers());
                native_filter(&mut req, &mut resp);
                black_box((req, resp));
            })
        })
        .collect();
    out.extend(exchange::conversion_scenarios());
    out
}

/// A full stream through each VM of `vms` in turn.
fn lifecycle(vms: &mut [Vm], request: &HeaderMap) {
    let (mut req, mut resp) = (request.clone(), response_headers());
    for vm in vms.iter_mut() {
        let stream = vm.create_http_stream().expect("stream");
        black_box(
            vm.on_request_headers(&stream, &mut req, true)
                .expect("request"),
        );
        black_box(
            vm.on_response_headers(&stream, &mut resp, true)
                .expect("response"),
        );
        vm.on_log(&stream, &mut req, &mut resp).expect("log");
        vm.finish_stream(stream).expect("finish");
    }
}

/// A full stream of the 3-header request through chains of `lengths` VMs of `plugin`
/// (`chain/N_plugins`), driven on the VMs directly.
pub fn chain_scenarios(plugin: &Plugin, lengths: &[usize]) -> Result<Vec<Scenario>, String> {
    let mut out = Vec::with_capacity(lengths.len());
    for &n in lengths {
        let mut vms = (0..n)
            .map(|_| Vm::new(plugin))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| fail("vm", e))?;
        let request = request_headers(0);
        out.push(
            Scenario::new(format!("chain/{n}_plugins"), move || {
                lifecycle(&mut vms, &request)
            })
            .native("native/lifecycle_3_headers"),
        );
    }
    Ok(out)
}

/// Every scenario of `kind` (floors first).
pub fn scenarios(kind: EngineKind, quick: bool) -> Result<Vec<Scenario>, String> {
    let engine = Engine::new(kind, &EngineConfig::default()).map_err(|e| fail("engine", e))?;
    let mut out = floors::scenarios(kind)?;
    let plugin = header_plugin(&engine)?;

    for extra in [0usize, 10, 50] {
        let request = request_headers(extra);
        let n = request.len();
        let mut vms = vec![Vm::new(&plugin).map_err(|e| fail("vm", e))?];
        out.push(
            Scenario::new(format!("stream/lifecycle_{n}_headers"), move || {
                lifecycle(&mut vms, &request)
            })
            .floor(floors::EXPORT_CALL)
            .native(format!("native/lifecycle_{n}_headers")),
        );
    }
    // The same with every callback timed and with none: what the latency histogram costs
    // per request (the default times one call in 16).
    for (name, every) in [("every_call_timed", 1), ("untimed", 0)] {
        let plugin = header_plugin_timed(&engine, every)?;
        let mut vms = vec![Vm::new(&plugin).map_err(|e| fail("vm", e))?];
        let request = request_headers(0);
        out.push(
            Scenario::new(format!("stream/lifecycle_3_headers_{name}"), move || {
                lifecycle(&mut vms, &request)
            })
            .floor(floors::EXPORT_CALL)
            .native("native/lifecycle_3_headers"),
        );
    }
    let mut vm = Vm::new(&plugin).map_err(|e| fail("vm", e))?;
    out.push(
        Scenario::new("stream/create_delete", move || {
            let stream = vm.create_http_stream().expect("stream");
            vm.finish_stream(stream).expect("finish");
        })
        .floor(floors::EXPORT_CALL),
    );

    out.extend(hostcall_scenarios(&engine)?);
    out.extend(body_scenarios(&engine)?);

    // VM creation: the instance alone (`Vm::instantiate`), then with the plugin's own start.
    let p = plugin.clone();
    out.push(Scenario::new("vm/instantiate", move || {
        black_box(Vm::instantiate(&p).expect("instance"));
    }));
    let p = plugin.clone();
    out.push(Scenario::new("vm/new_and_start", move || {
        black_box(Vm::new(&p).expect("vm"));
    }));
    // wasmtime pools instance slots; wasmi pools the mappings its memories live in.
    if matches!(kind, EngineKind::Wasmtime | EngineKind::Wasmi) {
        let pooled = Engine::new(
            kind,
            &EngineConfig::default().with_pooling(PoolingConfig::default()),
        )
        .map_err(|e| fail("pooling engine", e))?;
        let p = header_plugin(&pooled)?;
        let q = p.clone();
        out.push(Scenario::new("vm/instantiate_pooling", move || {
            black_box(Vm::instantiate(&q).expect("instance"));
        }));
        out.push(Scenario::new("vm/new_and_start_pooling", move || {
            black_box(Vm::new(&p).expect("vm"));
        }));
    }
    let e = engine.clone();
    out.push(Scenario::new("vm/cold_compile", move || {
        black_box(header_plugin(&e).expect("plugin"));
    }));
    if kind != EngineKind::Wasmi {
        let dir = std::env::temp_dir().join(format!("filterbox-bench-cache-{}", kind.name()));
        let cache = ModuleCache::new(dir);
        let e = engine.clone();
        let load = move || {
            let config = PluginConfig::named("bench")
                .with_configuration("add x-request yes\nresponse-add x-response yes")
                .with_engine(e.kind());
            Plugin::builder(config)
                .engine(&e)
                .module_cache(cache.clone())
                .build(guests::HEADERS)
                .expect("cached plugin")
        };
        load(); // fills the cache
        out.push(Scenario::new("vm/load_from_cache", move || {
            black_box(load());
        }));
    }

    // Chains of plugins.
    let lengths: &[usize] = if quick {
        &[1, 4, 5, 16]
    } else {
        &[1, 2, 4, 5, 8, 16]
    };
    out.extend(chain_scenarios(&plugin, lengths)?);

    // The same chains of 1 and 5 (and none) through the tower layer.
    out.extend(exchange::service_scenarios(&engine)?);

    out.extend(floors::deadline_scenarios(kind)?);
    Ok(out)
}

/// A module whose `proxy_on_request_headers` (or `proxy_on_request_body`) runs `call`
/// [`HOSTCALLS_PER_ITER`] times. The allocator always answers the same 1.5 MiB-sized block,
/// so repeated returns of data never run out of memory. A call that answers anything but
/// `Ok` traps, so the benchmark fails instead of timing an error path under the call's name.
fn hostcall_module(
    imports: &str,
    callback: &str,
    call: &str,
    data: &str,
) -> Result<Vec<u8>, String> {
    let params = match callback {
        "proxy_on_request_headers" | "proxy_on_request_body" => "(param i32 i32 i32)",
        _ => "(param i32)",
    };
    let text = format!(
        r#"(module
            {imports}
            (memory (export "memory") 48)
            (func (export "proxy_abi_version_0_2_1"))
            (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1048576))
            (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
            (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
            (func (export "{callback}") {params} (result i32)
                (local $i i32)
                (loop $next
                    (if {call} (then unreachable))
                    (local.set $i (i32.add (local.get $i) (i32.const 1)))
                    (br_if $next (i32.lt_u (local.get $i) (i32.const {HOSTCALLS_PER_ITER}))))
                (i32.const 0))
            {data}
        )"#
    );
    wat::parse_str(text).map_err(|e| fail("hostcall module", e))
}

fn hostcall_scenarios(engine: &Engine) -> Result<Vec<Scenario>, String> {
    let imp = |name: &str, params: usize| {
        let params = vec!["i32"; params].join(" ");
        format!(r#"(import "env" "{name}" (func ${name} (param {params}) (result i32)))"#)
    };
    let data = r#"(data (i32.const 100) ":path") (data (i32.const 120) "x-a")
        (data (i32.const 140) "plugin_name") (data (i32.const 160) "key")
        (data (i32.const 180) "value")"#;
    let headers_calls: [(&str, String, String); 5] = [
        (
            "get_header_map_value",
            imp("proxy_get_header_map_value", 5),
            "(call $proxy_get_header_map_value (i32.const 0) (i32.const 100) (i32.const 5) (i32.const 16) (i32.const 20))".into(),
        ),
        (
            "add_header_map_value",
            imp("proxy_add_header_map_value", 5),
            // Add then remove, so the map does not grow: two hostcalls, reported per call.
            "(call $proxy_add_header_map_value (i32.const 0) (i32.const 120) (i32.const 3) (i32.const 180) (i32.const 5))".into(),
        ),
        (
            "replace_header_map_value",
            imp("proxy_replace_header_map_value", 5),
            "(call $proxy_replace_header_map_value (i32.const 0) (i32.const 120) (i32.const 3) (i32.const 180) (i32.const 5))".into(),
        ),
        (
            "get_property",
            imp("proxy_get_property", 4),
            "(call $proxy_get_property (i32.const 140) (i32.const 11) (i32.const 16) (i32.const 20))".into(),
        ),
        (
            "get_shared_data",
            imp("proxy_get_shared_data", 5),
            "(call $proxy_get_shared_data (i32.const 160) (i32.const 3) (i32.const 16) (i32.const 20) (i32.const 24))".into(),
        ),
    ];
    let mut out = Vec::new();
    for (name, import, call) in headers_calls {
        let mut extra = String::new();
        if name == "add_header_map_value" {
            extra = imp("proxy_remove_header_map_value", 3);
        }
        let call = if name == "add_header_map_value" {
            format!(
                "(i32.or {call} (call $proxy_remove_header_map_value (i32.const 0) (i32.const 120) (i32.const 3)))"
            )
        } else {
            call
        };
        let ops = if name == "add_header_map_value" {
            2 * HOSTCALLS_PER_ITER
        } else {
            HOSTCALLS_PER_ITER
        };
        let wasm = hostcall_module(
            &format!("{import}\n{extra}"),
            "proxy_on_request_headers",
            &call,
            data,
        )?;
        let plugin = load(engine, &wasm, name)?;
        let mut vm = Vm::new(&plugin).map_err(|e| fail("vm", e))?;
        let stream = vm.create_http_stream().map_err(|e| fail("stream", e))?;
        if name == "get_shared_data" {
            store_shared_key(&plugin);
        }
        let mut request = request_headers(10);
        // One call now: a status other than Ok fails here, before any timing.
        vm.on_request_headers(&stream, &mut request.clone(), true)
            .map_err(|e| fail(name, e))?;
        out.push(
            Scenario::new(format!("hostcall/{name}"), move || {
                black_box(
                    vm.on_request_headers(&stream, &mut request, true)
                        .expect("call"),
                );
            })
            .per(ops)
            .floor(floors::HOST_CALL),
        );
    }
    // A whole map handed over: the 13 headers of `request_headers(10)`, set 100 times.
    let encoded = filterbox_abi::pairs::encode(request_headers(10).as_slice());
    let wasm = hostcall_module(
        &imp("proxy_set_header_map_pairs", 3),
        "proxy_on_request_headers",
        &format!(
            "(call $proxy_set_header_map_pairs (i32.const 0) (i32.const 4096) (i32.const {}))",
            encoded.len()
        ),
        &format!(
            "(data (i32.const 4096) \"{}\")",
            guests::wat_bytes(&encoded)
        ),
    )?;
    let plugin = load(engine, &wasm, "set_header_map_pairs")?;
    let mut vm = Vm::new(&plugin).map_err(|e| fail("vm", e))?;
    let stream = vm.create_http_stream().map_err(|e| fail("stream", e))?;
    let mut request = request_headers(10);
    vm.on_request_headers(&stream, &mut request.clone(), true)
        .map_err(|e| fail("set_header_map_pairs", e))?;
    out.push(
        Scenario::new("hostcall/set_header_map_pairs_13", move || {
            black_box(
                vm.on_request_headers(&stream, &mut request, true)
                    .expect("call"),
            );
        })
        .per(HOSTCALLS_PER_ITER)
        .floor(floors::HOST_CALL),
    );
    for (label, size) in [("64B", 64usize), ("16KiB", 16 << 10), ("1MiB", 1 << 20)] {
        for (op, import, call) in [
            (
                "get_buffer_bytes",
                imp("proxy_get_buffer_bytes", 5),
                format!(
                    "(call $proxy_get_buffer_bytes (i32.const 0) (i32.const 0) (i32.const {size}) (i32.const 16) (i32.const 20))"
                ),
            ),
            (
                "set_buffer_bytes",
                imp("proxy_set_buffer_bytes", 5),
                format!(
                    "(call $proxy_set_buffer_bytes (i32.const 0) (i32.const 0) (i32.const {size}) (i32.const 1048576) (i32.const {size}))"
                ),
            ),
        ] {
            let wasm = hostcall_module(&import, "proxy_on_request_body", &call, "")?;
            let plugin = load(engine, &wasm, op)?;
            let mut vm = Vm::new(&plugin).map_err(|e| fail("vm", e))?;
            let stream = vm.create_http_stream().map_err(|e| fail("stream", e))?;
            let mut body = BytesMut::from(&vec![b'x'; size][..]);
            vm.on_request_body(&stream, &mut body.clone(), true)
                .map_err(|e| fail(op, e))?;
            out.push(
                Scenario::new(format!("hostcall/{op}_{label}"), move || {
                    black_box(vm.on_request_body(&stream, &mut body, true).expect("call"));
                })
                .per(HOSTCALLS_PER_ITER)
                .floor(floors::HOST_CALL),
            );
        }
    }
    Ok(out)
}

/// Stores `key` in the plugin's shared state through a one-off module (the public API reads
/// shared data but only plugins write it).
fn store_shared_key(plugin: &Plugin) {
    let wasm = wat::parse_str(
        r#"(module
            (import "env" "proxy_set_shared_data" (func $set (param i32 i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (data (i32.const 100) "keyvalue")
            (func (export "proxy_abi_version_0_2_1"))
            (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
            (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
                (drop (call $set (i32.const 100) (i32.const 3) (i32.const 103) (i32.const 5) (i32.const 0)))
                (i32.const 1)))"#,
    )
    .expect("setter module");
    let config = PluginConfig::named("setter")
        .with_engine(plugin.engine())
        .with_vm_id(plugin.config().vm_id.clone());
    let setter = Plugin::builder(config)
        .shared_state(plugin.shared_state().clone())
        .build(&wasm)
        .expect("setter plugin");
    Vm::new(&setter).expect("setter runs");
}

/// Loads a benchmark module with no callback deadline (1 MiB copies take a while on wasmi).
fn load(engine: &Engine, wasm: &[u8], name: &str) -> Result<Plugin, String> {
    let mut config = PluginConfig::named(name)
        .with_engine(engine.kind())
        .with_log_level(LogLevel::Warn);
    config.limits.callback_deadline_ms = None;
    Plugin::builder(config)
        .engine(engine)
        .build(wasm)
        .map_err(|e| fail(name, e))
}

fn body_scenarios(engine: &Engine) -> Result<Vec<Scenario>, String> {
    let mut config = PluginConfig::named("body")
        .with_configuration("a=>b")
        .with_engine(engine.kind())
        .with_log_level(LogLevel::Warn);
    config.limits.callback_deadline_ms = None;
    let plugin = Plugin::builder(config)
        .engine(engine)
        .build(guests::BODY)
        .map_err(|e| fail("body plugin", e))?;
    let mut out = Vec::new();
    for (label, size) in [
        ("1KiB", 1usize << 10),
        ("64KiB", 64 << 10),
        ("1MiB", 1 << 20),
    ] {
        let mut vm = Vm::new(&plugin).map_err(|e| fail("vm", e))?;
        let body = BytesMut::from(&vec![b'a'; size][..]);
        out.push(Scenario::new(format!("body/rewrite_{label}"), move || {
            let stream = vm.create_http_stream().expect("stream");
            let mut req = request_headers(0);
            vm.on_request_headers(&stream, &mut req, false)
                .expect("headers");
            let mut b = body.clone();
            black_box(vm.on_request_body(&stream, &mut b, true).expect("body"));
            vm.finish_stream(stream).expect("finish");
        }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Building the hostcall scenarios runs each once: every hostcall a benchmark times
    /// answers `Ok` on every built engine (an error path timed under a hostcall's name would
    /// make its number meaningless).
    #[test]
    fn every_timed_hostcall_answers_ok_on_every_engine() {
        for kind in EngineKind::built() {
            let engine = Engine::new(kind, &EngineConfig::default())
                .unwrap_or_else(|e| panic!("{kind}: {e}"));
            let scenarios = hostcall_scenarios(&engine).unwrap_or_else(|e| panic!("{kind}: {e}"));
            assert_eq!(scenarios.len(), 12, "{kind}");
        }
    }
}
