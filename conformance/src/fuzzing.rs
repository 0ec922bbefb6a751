//! Fuzzing harnesses: one function per cargo-fuzz target in `fuzz/`, each taking the
//! fuzzer's bytes and panicking when the host breaks a promise (a panic of its own, a status
//! out of range, a limit not held, engines that disagree). Anything else, including a plugin
//! that traps or fails to load, is a pass.
//!
//! They live here rather than in `fuzz/` so that `cargo test` on stable replays the
//! checked-in inputs (`fuzz/regressions/<target>/`, `fuzz/seeds/<target>/`) through the same
//! code (`tests/fuzz_regressions.rs`).

use crate::guests;
use crate::harness::LogCapture;
use crate::hostile::{callback_params, import_decl};
use arbitrary::{Arbitrary, Unstructured};
use bytes::{Bytes, BytesMut};
use filterbox::abi::{AbiVersion, Callback, Import, ImportModule, ValType, pairs, property_path};
use filterbox::{
    Action, Engine, EngineConfig, EngineKind, HeaderMap, Limits, MetricRegistry, Plugin,
    PluginConfig, SharedState, Trap, TrapKind, Vm, VmError,
};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};

/// A harness: the fuzzer's bytes in, a panic if the host broke a promise.
pub type Target = fn(&[u8]);

/// Every target by name, as `fuzz/fuzz_targets/<name>.rs` calls it.
pub const TARGETS: &[(&str, Target)] = &[
    ("codecs", codecs),
    ("hostcalls", hostcalls),
    ("modules", modules),
    ("streams", streams),
    ("differential", differential),
    ("config", config),
];

/// One engine of each built kind, made once per process (engines are costly to create).
fn engine(kind: EngineKind) -> &'static Engine {
    static ENGINES: OnceLock<HashMap<EngineKind, Engine>> = OnceLock::new();
    let engines = ENGINES.get_or_init(|| {
        EngineKind::built()
            .into_iter()
            .filter_map(|kind| {
                let engine = Engine::new(kind, &EngineConfig::default()).ok()?;
                Some((kind, engine))
            })
            .collect()
    });
    match engines.get(&kind) {
        Some(engine) => engine,
        None => panic!("the {kind} engine is built but could not be created"),
    }
}

/// A plugin of the module `compiled` was built from, with `config` and fresh shared state,
/// metrics and log capture, so no input sees what an earlier one left behind.
fn fresh_plugin(compiled: &Plugin, config: PluginConfig) -> Option<(Plugin, Arc<LogCapture>)> {
    let logs = Arc::new(LogCapture::default());
    let plugin = Plugin::builder(config.with_engine(compiled.engine()))
        .log_sink(logs.clone())
        .shared_state(SharedState::default())
        .metric_registry(Arc::new(MetricRegistry::default()))
        .foreign_function(
            "echo",
            Arc::new(|args: &[u8]| Ok(Bytes::copy_from_slice(args))),
        )
        .build_from(compiled)
        .ok()?;
    Some((plugin, logs))
}

fn compile(kind: EngineKind, wasm: &[u8], what: &str) -> Plugin {
    Plugin::builder(PluginConfig::named(what).with_engine(kind))
        .engine(engine(kind))
        .build(wasm)
        .unwrap_or_else(|e| panic!("the {what} module does not load on {kind}: {e}"))
}

// --- 1. codecs -------------------------------------------------------------------------

/// Header-map and property-path codecs: the decoders never panic, what they accept
/// re-encodes to the input, and decode(encode(x)) == x for any well-formed x.
pub fn codecs(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    match selector % 4 {
        0 => {
            if let Ok(decoded) = pairs::decode(rest)
                && !rest.is_empty()
            {
                assert_eq!(pairs::encode(&decoded), rest, "pairs re-encode differently");
            }
        }
        1 => {
            if let Ok(segments) = property_path::decode(rest) {
                assert!(segments.iter().all(|s| !s.is_empty() && !s.contains(&0)));
                let again = property_path::encode(&segments);
                assert_eq!(property_path::decode(&again).ok(), Some(segments));
            }
        }
        2 => {
            let mut u = Unstructured::new(rest);
            let Ok(list) = Vec::<(Vec<u8>, Vec<u8>)>::arbitrary(&mut u) else {
                return;
            };
            let bytes = pairs::encode(&list);
            assert_eq!(bytes.len(), pairs::encoded_len(&list));
            let decoded = pairs::decode(&bytes).unwrap_or_else(|e| panic!("own encoding: {e}"));
            let decoded: Vec<(Vec<u8>, Vec<u8>)> = decoded
                .into_iter()
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect();
            // An empty map encodes as nothing at all, which decodes as empty too.
            assert_eq!(decoded, list, "pairs round trip");
        }
        _ => {
            let mut u = Unstructured::new(rest);
            let Ok(raw) = Vec::<Vec<u8>>::arbitrary(&mut u) else {
                return;
            };
            let segments: Vec<Vec<u8>> = raw
                .into_iter()
                .map(|s| s.into_iter().filter(|b| *b != 0).collect::<Vec<u8>>())
                .filter(|s| !s.is_empty())
                .collect();
            let bytes = property_path::encode(&segments);
            let decoded = property_path::decode(&bytes)
                .map(|d| d.into_iter().map(<[u8]>::to_vec).collect::<Vec<Vec<u8>>>());
            match segments.is_empty() {
                true => assert!(decoded.map_or(true, |d| d.is_empty())),
                false => assert_eq!(decoded.ok(), Some(segments), "path round trip"),
            }
        }
    }
}

// --- 2. hostcalls: a program of hostcalls run by a fixed guest --------------------------

/// Where the guest keeps the program (its plugin configuration), its result letters and the
/// two words `proxy_get_buffer_bytes` answers into. Below `PROGRAM` the fuzzer may write.
const PROGRAM: u32 = 0x30000;
/// The memory limit of program guests, in 64 KiB pages (they start with 4).
const PROGRAM_MEMORY_PAGES: usize = 16;
const PROGRAM_MAX: u32 = 0xF000;
const RESULTS: u32 = 0x3F000;
const RETURN_SLOTS: u32 = 0x3FFF0;

/// The imports a program may call on `version`, in the order their index selects them.
fn program_imports(version: AbiVersion) -> Vec<Import> {
    Import::ALL
        .iter()
        .copied()
        .filter(|i| i.versions().contains(version))
        .collect()
}

/// The callbacks a program-running guest exports: all of `version` but the start functions
/// and allocators, each running the program up to its next yield.
fn program_callbacks(version: AbiVersion) -> String {
    let mut out = String::new();
    for callback in Callback::ALL.iter().copied() {
        if !callback.versions().contains(version)
            || matches!(
                callback,
                Callback::Initialize
                    | Callback::Main
                    | Callback::MainVoid
                    | Callback::Start
                    | Callback::Malloc
                    | Callback::ProxyOnMemoryAllocate
            )
        {
            continue;
        }
        let params = callback_params(callback, version);
        let (result, body) = match (callback.result(), callback) {
            (Some(_), Callback::ProxyOnConfigure) => (
                "(result i32)",
                "(call $load) (drop (call $run)) (i32.const 1)",
            ),
            (
                Some(_),
                Callback::ProxyOnVmStart
                | Callback::ProxyValidateConfiguration
                | Callback::ProxyOnDone,
            ) => ("(result i32)", "(drop (call $run)) (i32.const 1)"),
            (Some(_), _) => ("(result i32)", "(call $run)"),
            (None, _) => ("", "(drop (call $run))"),
        };
        let _ = writeln!(
            out,
            r#"(func (export "{}") {params} {result} {body})"#,
            callback.name()
        );
    }
    out
}

/// The guest that runs a hostcall program. Records of the program (its configuration):
///
/// - `op%4 == 0` write: u32 address (mod 0x30000), u16 length, bytes: copied into memory;
/// - `op%4 == 1` call: u8 import index, then 8 bytes per parameter: calls that import and
///   traps (`unreachable`) if a proxy hostcall answers a status outside `proxy_status_t` or
///   a WASI function an errno outside WASI's;
/// - `op%4 == 2` yield: u8 action: the callback returns (bit 0: 0 continue, 1 pause); with
///   bit 1 set it first grows memory by `action >> 2` pages (the limit is
///   [`PROGRAM_MEMORY_PAGES`], so a program can reach it and the check that memory stays
///   within its limit can fail);
/// - `op%4 == 3` allocator: i32: what `proxy_on_memory_allocate` answers from now on
///   (-1: a working bump allocator again).
///
/// Every result is logged (two letters each) when the callback returns.
fn program_module(version: AbiVersion) -> Vec<u8> {
    let imports = program_imports(version);
    let mut decls = String::new();
    let mut dispatch = String::new();
    let mut nparams = String::new();
    for (index, import) in imports.iter().enumerate() {
        let _ = writeln!(decls, "{}", import_decl(*import));
        let mut args = String::new();
        for (j, t) in import.params().iter().enumerate() {
            let load = format!("(i64.load (i32.add (local.get $a) (i32.const {})))", j * 8);
            let _ = match t {
                ValType::I32 => write!(args, " (i32.wrap_i64 {load})"),
                ValType::I64 => write!(args, " {load}"),
            };
        }
        let call = format!("(call ${}{args})", import.name());
        let checked = match (import.result(), import.module()) {
            (None, _) => format!("{call} (return (i32.const 0))"),
            (Some(_), ImportModule::Env) => format!("(return (call $status {call}))"),
            (Some(_), ImportModule::Wasi) => format!("(return (call $errno {call}))"),
        };
        let _ = writeln!(
            dispatch,
            "(if (i32.eq (local.get $i) (i32.const {index})) (then {checked}))"
        );
        let _ = writeln!(
            nparams,
            "(if (i32.eq (local.get $i) (i32.const {index})) (then (return (i32.const {}))))",
            import.params().len()
        );
    }
    let count = imports.len();
    let max_status = filterbox::abi::Status::Unimplemented.as_u32();
    let callbacks = program_callbacks(version);
    let marker = version.marker();
    let text = format!(
        r#"(module
        {decls}
        (memory (export "memory") 4)
        (global $pc (mut i32) (i32.const 0))
        (global $end (mut i32) (i32.const 0))
        (global $loading (mut i32) (i32.const 0))
        (global $next (mut i32) (i32.const 0x10000))
        (global $forced (mut i32) (i32.const -1))
        (global $results (mut i32) (i32.const 0))
        (func (export "{marker}"))
        (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
            (local $p i32)
            (if (global.get $loading) (then
                (global.set $loading (i32.const 0))
                (if (i32.gt_u (local.get $size) (i32.const {PROGRAM_MAX})) (then (return (i32.const 0))))
                (return (i32.const {PROGRAM}))))
            (if (i32.ne (global.get $forced) (i32.const -1)) (then (return (global.get $forced))))
            (if (i32.gt_u (local.get $size) (i32.const 0x10000)) (then (return (i32.const 0))))
            (if (i32.gt_u (i32.add (global.get $next) (local.get $size)) (i32.const {PROGRAM}))
                (then (global.set $next (i32.const 0x10000))))
            (local.set $p (global.get $next))
            (global.set $next (i32.and (i32.add (i32.add (local.get $p) (local.get $size)) (i32.const 7)) (i32.const -8)))
            (local.get $p))
        (func $load
            (global.set $loading (i32.const 1))
            (if (i32.eqz (call $proxy_get_buffer_bytes (i32.const 7) (i32.const 0) (i32.const {PROGRAM_MAX})
                    (i32.const {RETURN_SLOTS}) (i32.const {ret_size})))
                (then
                    (global.set $pc (i32.load (i32.const {RETURN_SLOTS})))
                    (global.set $end (i32.add (global.get $pc) (i32.load (i32.const {ret_size}))))
                    (if (i32.or (i32.ne (global.get $pc) (i32.const {PROGRAM}))
                                (i32.gt_u (global.get $end) (i32.const {RESULTS})))
                        (then (global.set $end (global.get $pc))))))
            (global.set $loading (i32.const 0)))
        (func $status (param $s i32) (result i32)
            (if (i32.gt_u (local.get $s) (i32.const {max_status})) (then unreachable))
            (local.get $s))
        (func $errno (param $e i32) (result i32)
            (if (i32.gt_u (local.get $e) (i32.const 76)) (then unreachable))
            (local.get $e))
        (func $dispatch (param $i i32) (param $a i32) (result i32)
            {dispatch}
            (i32.const 0))
        (func $nparams (param $i i32) (result i32)
            {nparams}
            (i32.const 0))
        (func $record (param $r i32)
            (local $at i32)
            (if (i32.ge_u (global.get $results) (i32.const 2000)) (then (return)))
            (local.set $at (i32.add (i32.const {RESULTS}) (i32.shl (global.get $results) (i32.const 1))))
            (i32.store8 (local.get $at) (i32.add (i32.const 97) (i32.shr_u (local.get $r) (i32.const 4))))
            (i32.store8 (i32.add (local.get $at) (i32.const 1)) (i32.add (i32.const 97) (i32.and (local.get $r) (i32.const 15))))
            (global.set $results (i32.add (global.get $results) (i32.const 1))))
        (func $flush
            (if (global.get $results) (then
                (drop (call $proxy_log (i32.const 2) (i32.const {RESULTS}) (i32.shl (global.get $results) (i32.const 1))))
                (global.set $results (i32.const 0)))))
        (func $run (result i32)
            (local $op i32) (local $a i32) (local $len i32) (local $avail i32) (local $action i32)
            (block $out (loop $step
                (br_if $out (i32.ge_u (global.get $pc) (global.get $end)))
                (local.set $op (i32.rem_u (i32.load8_u (global.get $pc)) (i32.const 4)))
                (if (i32.eqz (local.get $op)) (then
                    (local.set $a (i32.rem_u (i32.load (i32.add (global.get $pc) (i32.const 1))) (i32.const {PROGRAM})))
                    (local.set $len (i32.load16_u (i32.add (global.get $pc) (i32.const 5))))
                    (local.set $avail (i32.sub (global.get $end) (i32.add (global.get $pc) (i32.const 7))))
                    (if (i32.lt_s (local.get $avail) (i32.const 0)) (then (local.set $avail (i32.const 0))))
                    (if (i32.gt_u (local.get $len) (local.get $avail)) (then (local.set $len (local.get $avail))))
                    (if (i32.gt_u (local.get $len) (i32.sub (i32.const {PROGRAM}) (local.get $a)))
                        (then (local.set $len (i32.sub (i32.const {PROGRAM}) (local.get $a)))))
                    (memory.copy (local.get $a) (i32.add (global.get $pc) (i32.const 7)) (local.get $len))
                    (global.set $pc (i32.add (global.get $pc) (i32.add (i32.const 7) (local.get $len))))
                    (br $step)))
                (if (i32.eq (local.get $op) (i32.const 1)) (then
                    (local.set $len (i32.rem_u (i32.load8_u (i32.add (global.get $pc) (i32.const 1))) (i32.const {count})))
                    (local.set $a (i32.add (global.get $pc) (i32.const 2)))
                    (global.set $pc (i32.add (local.get $a) (i32.shl (call $nparams (local.get $len)) (i32.const 3))))
                    (call $record (call $dispatch (local.get $len) (local.get $a)))
                    (br $step)))
                (if (i32.eq (local.get $op) (i32.const 2)) (then
                    (local.set $action (i32.load8_u (i32.add (global.get $pc) (i32.const 1))))
                    (if (i32.and (local.get $action) (i32.const 2)) (then
                        (drop (memory.grow (i32.shr_u (local.get $action) (i32.const 2))))))
                    (local.set $action (i32.and (local.get $action) (i32.const 1)))
                    (global.set $pc (i32.add (global.get $pc) (i32.const 2)))
                    (call $flush)
                    (return (local.get $action))))
                (global.set $forced (i32.load (i32.add (global.get $pc) (i32.const 1))))
                (global.set $pc (i32.add (global.get $pc) (i32.const 5)))
                (br $step)))
            (call $flush)
            (i32.const 0))
        {callbacks}
        )"#,
        ret_size = RETURN_SLOTS + 4,
    );
    wat::parse_str(&text).unwrap_or_else(|e| panic!("the program guest does not parse: {e}"))
}

/// Plugins compiled once per process and key: harnesses run millions of inputs, and a
/// compile per input would be most of the work.
type PluginCache<K> = OnceLock<parking_lot::Mutex<HashMap<K, &'static Plugin>>>;

fn cached<K: std::hash::Hash + Eq>(
    cache: &'static PluginCache<K>,
    key: K,
    compile: impl FnOnce() -> Plugin,
) -> &'static Plugin {
    let mut plugins = cache.get_or_init(Default::default).lock();
    plugins
        .entry(key)
        .or_insert_with(|| Box::leak(Box::new(compile())))
}

/// The program guest on `kind` for `version`.
fn program_plugin(kind: EngineKind, version: AbiVersion) -> &'static Plugin {
    static PLUGINS: PluginCache<(EngineKind, AbiVersion)> = OnceLock::new();
    cached(&PLUGINS, (kind, version), || {
        compile(kind, &program_module(version), "program")
    })
}

/// One hostcall program and the stream around it, decoded from the fuzzer's bytes.
struct ProgramInput {
    version: AbiVersion,
    request: Vec<(String, String)>,
    program: Vec<u8>,
}

impl ProgramInput {
    fn decode(data: &[u8]) -> Option<ProgramInput> {
        let mut u = Unstructured::new(data);
        let version = match u8::arbitrary(&mut u).ok()? % 3 {
            0 => AbiVersion::V0_1_0,
            1 => AbiVersion::V0_2_0,
            _ => AbiVersion::V0_2_1,
        };
        let count = usize::from(u8::arbitrary(&mut u).ok()? % 8);
        let mut request = vec![(":path".to_string(), "/".to_string())];
        for _ in 0..count {
            request.push((
                String::arbitrary(&mut u).ok()?,
                String::arbitrary(&mut u).ok()?,
            ));
        }
        let program = u.take_rest().to_vec();
        (program.len() <= PROGRAM_MAX as usize).then_some(ProgramInput {
            version,
            request,
            program,
        })
    }
}

/// What a run shows from outside: each step's outcome, what the plugin left in the maps and
/// bodies, its log lines and events. Engines must agree on it.
type Transcript = Vec<String>;

fn outcome<T: std::fmt::Debug>(result: &Result<T, VmError>) -> String {
    match result {
        Ok(value) => format!("{value:?}"),
        Err(error) => error_class(error),
    }
}

/// An error without the engine's own words (trap messages differ between engines).
fn error_class(error: &VmError) -> String {
    match error {
        VmError::Instantiate { .. } => "instantiate error".into(),
        VmError::Rejected { callback, .. } => format!("rejected by {}", callback.name()),
        VmError::Trap { callback, trap, .. } => {
            format!("{:?} trap in {}", trap.kind, callback.name())
        }
        VmError::Failed { trap, .. } => format!("failed ({:?})", trap.kind),
        VmError::ForeignStream { .. } => "foreign stream".into(),
        // A kind added later: its text is still engine-independent.
        other => other.to_string(),
    }
}

fn program_config(program: &[u8]) -> PluginConfig {
    let limits = {
        let mut limits = Limits::default();
        // Programs are bounded; no deadline keeps runs alike on every engine.
        limits.callback_deadline_ms = None;
        limits.start_deadline_ms = None;
        limits.memory_bytes = PROGRAM_MEMORY_PAGES << 16;
        limits
    };
    PluginConfig::named("program")
        .with_limits(limits)
        .with_configuration(program.to_vec())
}

/// Runs a program through every callback the host has, on one engine, and returns what
/// it saw. Panics if the guest trapped on a status out of range.
fn run_program(kind: EngineKind, input: &ProgramInput) -> Transcript {
    let compiled = program_plugin(kind, input.version);
    let Some((plugin, logs)) = fresh_plugin(compiled, program_config(&input.program)) else {
        return vec!["load refused".into()];
    };
    let mut t = Transcript::new();
    let mut vm = match Vm::new(&plugin) {
        Ok(vm) => vm,
        Err(e) => {
            t.push(format!("start: {}", error_class(&e)));
            check_statuses(&e);
            t.extend(logs.messages());
            return t;
        }
    };
    drive_stream(&mut vm, &input.request, &mut t);
    t.push(format!("pending: {}", outcome(&vm.dispatch_pending())));
    t.push(format!("tick: {}", outcome(&vm.on_tick())));
    t.push(format!(
        "foreign: {}",
        outcome(&vm.on_foreign_function(1, b"args"))
    ));
    match vm.create_connection() {
        Ok((connection, action)) => {
            t.push(format!("connection: {action:?}"));
            let mut data = BytesMut::from(&b"downstream"[..]);
            t.push(outcome(&vm.on_downstream_data(
                &connection,
                &mut data,
                false,
            )));
            let mut data = BytesMut::from(&b"upstream"[..]);
            t.push(outcome(&vm.on_upstream_data(&connection, &mut data, true)));
            t.push(format!("{:?}", vm.take_connection_events(&connection)));
            t.push(outcome(&vm.finish_connection(connection)));
        }
        Err(e) => t.push(format!("connection: {}", error_class(&e))),
    }
    t.push(format!(
        "validate: {}",
        outcome(&vm.validate_configuration(b"next"))
    ));
    t.push(format!("shutdown: {}", outcome(&vm.shutdown())));
    if let Some(trap) = vm.failure() {
        assert_no_host_panic(trap);
        assert!(
            trap.kind != TrapKind::Unreachable,
            "a hostcall answered a status out of range: {trap}; logs: {:?}",
            logs.messages()
        );
        t.push(format!("failed: {:?}", trap.kind));
    }
    let limit = plugin.config().limits.memory_bytes;
    assert!(vm.memory_size() <= limit, "memory past its limit");
    t.extend(logs.messages());
    t
}

/// A panic inside the host (a hostcall, the dispatch around it) reaches the VM as a trap of
/// kind `Host`: the guest survives it, but it is a host bug, so a replay must fail on it.
fn assert_no_host_panic(trap: &Trap) {
    assert!(trap.kind != TrapKind::Host, "the host panicked: {trap}");
}

fn check_statuses(error: &VmError) {
    if let VmError::Trap { trap, .. } = error {
        assert_no_host_panic(trap);
        assert!(
            trap.kind != TrapKind::Unreachable,
            "a hostcall answered a status out of range while starting: {trap}"
        );
    }
}

/// One whole HTTP stream with small bodies and trailers, recorded into `t`.
fn drive_stream(vm: &mut Vm, request: &[(String, String)], t: &mut Transcript) {
    let stream = match vm.create_http_stream() {
        Ok(stream) => stream,
        Err(e) => {
            t.push(format!("stream: {}", error_class(&e)));
            return;
        }
    };
    let mut req: HeaderMap = request.iter().cloned().collect();
    t.push(outcome(&vm.on_request_headers(&stream, &mut req, false)));
    let mut body = BytesMut::from(&b"hello"[..]);
    t.push(outcome(&vm.on_request_body(&stream, &mut body, false)));
    body.extend_from_slice(b" world");
    t.push(outcome(&vm.on_request_body(&stream, &mut body, true)));
    t.push(format!("request body {body:?}"));
    let mut trailers: HeaderMap = [("x-t", "1")].into_iter().collect();
    t.push(outcome(&vm.on_request_trailers(&stream, &mut trailers)));
    let mut resp: HeaderMap = [(":status", "200")].into_iter().collect();
    t.push(outcome(&vm.on_response_headers(&stream, &mut resp, false)));
    let mut body = BytesMut::from(&b"response"[..]);
    t.push(outcome(&vm.on_response_body(&stream, &mut body, true)));
    t.push(format!("response body {body:?}"));
    let mut trailers: HeaderMap = [("x-t", "2")].into_iter().collect();
    t.push(outcome(&vm.on_response_trailers(&stream, &mut trailers)));
    t.push(outcome(&vm.on_log(&stream, &mut req, &mut resp)));
    t.push(format!("request {req:?}"));
    t.push(format!("response {resp:?}"));
    t.push(format!("events {:?}", vm.take_stream_events(&stream)));
    t.push(outcome(&vm.finish_stream(stream)));
}

/// The hostcall boundary: a fixed guest calls fuzzer-chosen hostcalls with fuzzer-chosen
/// arguments and memory, in every callback, through a real VM on wasmtime (or the first
/// built engine). The host never panics and answers every call with a status in range.
pub fn hostcalls(data: &[u8]) {
    let Some(input) = ProgramInput::decode(data) else {
        return;
    };
    let kind = EngineKind::built()
        .first()
        .copied()
        .unwrap_or_else(|| panic!("no engine is built"));
    run_program(kind, &input);
}

// --- 3. modules: wasm-smith modules with proxy-wasm imports and exports -----------------

/// A module importing every hostcall and WASI function of ABI 0.2.1, for wasm-smith's
/// `available_imports`.
fn smith_imports() -> &'static [u8] {
    static IMPORTS: OnceLock<Vec<u8>> = OnceLock::new();
    IMPORTS.get_or_init(|| {
        let decls: String = program_imports(AbiVersion::V0_2_1)
            .into_iter()
            .map(import_decl)
            .collect::<Vec<String>>()
            .join("\n");
        wat::parse_str(format!("(module {decls})"))
            .unwrap_or_else(|e| panic!("imports module: {e}"))
    })
}

/// The exports every generated module must have: memory, the 0.2.1 marker, an allocator
/// and the callbacks a stream and a timer use.
fn smith_exports() -> &'static [u8] {
    static EXPORTS: OnceLock<Vec<u8>> = OnceLock::new();
    EXPORTS.get_or_init(|| {
        let mut text = String::from(
            r#"(module (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_1"))"#,
        );
        for callback in [
            Callback::ProxyOnMemoryAllocate,
            Callback::ProxyOnContextCreate,
            Callback::ProxyOnVmStart,
            Callback::ProxyOnConfigure,
            Callback::ProxyOnRequestHeaders,
            Callback::ProxyOnRequestBody,
            Callback::ProxyOnResponseHeaders,
            Callback::ProxyOnLog,
            Callback::ProxyOnDone,
            Callback::ProxyOnDelete,
            Callback::ProxyOnTick,
        ] {
            let params = callback_params(callback, AbiVersion::V0_2_1);
            let result = match callback.result() {
                Some(_) => "(result i32)",
                None => "",
            };
            let _ = write!(
                text,
                r#"(func (export "{}") {params} {result} unreachable)"#,
                callback.name()
            );
        }
        text.push(')');
        wat::parse_str(&text).unwrap_or_else(|e| panic!("exports module: {e}"))
    })
}

/// A valid module wasm-smith builds from `u`: only features every engine has, proxy-wasm
/// imports and exports, at most 16 MiB of memory. With `fuel`, every loop and call burns
/// fuel and traps when it runs out, so the module always terminates.
fn smith_module(u: &mut Unstructured, fuel: Option<u32>) -> arbitrary::Result<Vec<u8>> {
    let config = wasm_smith::Config {
        available_imports: Some(smith_imports().to_vec()),
        exports: Some(smith_exports().to_vec()),
        simd_enabled: false,
        relaxed_simd_enabled: false,
        threads_enabled: false,
        gc_enabled: false,
        exceptions_enabled: false,
        memory64_enabled: false,
        tail_call_enabled: false,
        wide_arithmetic_enabled: false,
        custom_page_sizes_enabled: false,
        compact_imports_enabled: false,
        extended_const_enabled: false,
        max_memories: 1,
        max_tables: 2,
        max_memory32_bytes: 16 << 20,
        max_table_elements: 10_000,
        max_funcs: 30,
        max_instructions: 200,
        canonicalize_nans: fuel.is_some(),
        ..wasm_smith::Config::default()
    };
    let mut module = wasm_smith::Module::new(config, u)?;
    if let Some(fuel) = fuel {
        module
            .ensure_termination(fuel)
            .map_err(|_| arbitrary::Error::IncorrectFormat)?;
    }
    Ok(module.to_bytes())
}

fn module_limits(deadlines: bool) -> Limits {
    {
        let mut limits = Limits::default();
        limits.memory_bytes = 16 << 20;
        limits.table_elements = 10_000;
        limits.callback_deadline_ms = deadlines.then_some(20);
        limits.start_deadline_ms = deadlines.then_some(100);
        limits
    }
}

/// Loads `wasm` on `kind` and drives a stream, a tick and a shutdown through it.
fn run_module(kind: EngineKind, wasm: &[u8], deadlines: bool) -> Transcript {
    let logs = Arc::new(LogCapture::default());
    let config = PluginConfig::named("smith")
        .with_engine(kind)
        .with_limits(module_limits(deadlines))
        .with_configuration(b"config".to_vec());
    let plugin = match Plugin::builder(config)
        .engine(engine(kind))
        .log_sink(logs.clone())
        .shared_state(SharedState::default())
        .metric_registry(Arc::new(MetricRegistry::default()))
        .build(wasm)
    {
        Ok(plugin) => plugin,
        Err(_) => return vec!["load refused".into()],
    };
    let mut t = Transcript::new();
    {
        let mut vm = match Vm::new(&plugin) {
            Ok(vm) => vm,
            Err(e) => {
                t.push(format!("start: {}", error_class(&e)));
                t.extend(logs.messages());
                return t;
            }
        };
        drive_stream(&mut vm, &[(":path".into(), "/".into())], &mut t);
        t.push(format!("tick: {}", outcome(&vm.on_tick())));
        t.push(format!("shutdown: {}", outcome(&vm.shutdown())));
        let limit = plugin.config().limits.memory_bytes;
        let size = vm.memory_size();
        assert!(
            size <= limit,
            "memory {size} past its limit {limit} on {kind}"
        );
        t.push(format!("memory {size}"));
    }
    let metrics = plugin.metrics();
    assert_eq!(
        metrics.vms_active(),
        0,
        "a dropped VM is still counted on {kind}"
    );
    assert_eq!(
        metrics.memory_live_bytes(),
        0,
        "a dropped VM's memory is still counted on {kind}"
    );
    t.extend(logs.messages());
    t
}

/// The engines `modules` and `differential` run on: every built engine, except that under
/// cargo fuzz (`--cfg fuzzing`) wasmer runs only when `FILTERBOX_FUZZ_WASMER=1` says the
/// build has no AddressSanitizer: wasmer's trap unwinding trips ASan's no-return stack check
/// on the first trap (ASan itself warns "false positive error reports may follow").
/// `cargo test`'s replay always runs all of them.
fn module_engines() -> Vec<EngineKind> {
    let mut engines = EngineKind::built();
    let wasmer = std::env::var("FILTERBOX_FUZZ_WASMER").is_ok_and(|v| v == "1");
    if cfg!(fuzzing) && !wasmer {
        engines.retain(|k| matches!(k, EngineKind::Wasmtime | EngineKind::Wasmi));
    }
    engines
}

/// Whole modules: wasm-smith modules with proxy-wasm imports and exports mixed in, loaded
/// on a fuzzer-chosen engine and driven through a stream under deadlines and limits. The
/// host never crashes, memory stays under its limit, and nothing outlives the VM.
pub fn modules(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let built = module_engines();
    let Ok(kind) = u.choose(&built).copied() else {
        return;
    };
    let Ok(wasm) = smith_module(&mut u, None) else {
        return;
    };
    run_module(kind, &wasm, true);
}

// --- 4. streams through Rust-SDK plugins ----------------------------------------------

/// One step of a stream; the harness plays a proxy that calls them in any order.
#[derive(Debug, Arbitrary)]
enum StreamStep {
    RequestHeaders(Vec<(String, String)>, bool),
    RequestBody(Vec<u8>, bool),
    RequestTrailers(Vec<(String, String)>),
    ResponseHeaders(Vec<(String, String)>, bool),
    ResponseBody(Vec<u8>, bool),
    ResponseTrailers(Vec<(String, String)>),
    Log,
    /// Finish this stream and start another.
    NextStream,
    Pending,
    Tick,
}

/// The Rust-SDK (and AssemblyScript) plugins the stream target drives, with the
/// configurations it picks from.
const STREAM_PLUGINS: &[(&str, &[&str])] = &[
    (
        "headers",
        &[
            "add x-a 1\nremove x-b",
            "replace x-r new\nresponse-add x-s f",
            "copy-header :path x-path\ncopy-property request.path x-p",
        ],
    ),
    ("body", &["a=>bb", "hello=>", "x=>yyyyyyyy"]),
    ("deny", &["/deny"]),
    ("logger", &[""]),
    ("abi010", &["abi010 config"]),
    ("assemblyscript", &["as config"]),
];

fn stream_plugin(name: &str) -> &'static Plugin {
    static PLUGINS: OnceLock<HashMap<&'static str, Plugin>> = OnceLock::new();
    let plugins = PLUGINS.get_or_init(|| {
        let kind = EngineKind::built()
            .first()
            .copied()
            .unwrap_or_else(|| panic!("no engine is built"));
        guests::ALL
            .iter()
            .map(|(name, wasm)| (*name, compile(kind, wasm, name)))
            .collect()
    });
    match plugins.get(name) {
        Some(plugin) => plugin,
        None => panic!("no guest {name}"),
    }
}

fn header_map(pairs: &[(String, String)]) -> HeaderMap {
    pairs.iter().cloned().collect()
}

/// Streams: arbitrary headers, bodies cut into arbitrary chunks and arbitrary callback
/// orders through real SDK-built plugins. The host never panics; it buffers as proxies do
/// (a paused body accumulates); and two plugin behaviours are checked: the deny plugin
/// answers 403 for its prefix, the body plugin's rewrite covers every chunk it paused on.
pub fn streams(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok((name, configs)) = u.choose(STREAM_PLUGINS).copied() else {
        return;
    };
    let Ok(configuration) = u.choose(configs).copied() else {
        return;
    };
    let Ok(steps) = Vec::<StreamStep>::arbitrary_take_rest(u) else {
        return;
    };
    let mut config =
        PluginConfig::named(name).with_configuration(configuration.as_bytes().to_vec());
    if name == "assemblyscript" {
        // The AssemblyScript SDK finds its root context by this id (and exits without it).
        config.root_id = "as_root".into();
    }
    // These are the suite's own well-behaved guests: any configuration they are given here
    // loads and starts, so a failure to is a host bug.
    let (plugin, _logs) = fresh_plugin(stream_plugin(name), config)
        .unwrap_or_else(|| panic!("{name} does not load with {configuration:?}"));
    let mut vm = Vm::new(&plugin)
        .unwrap_or_else(|e| panic!("{name} does not start with {configuration:?}: {e}"));
    let mut stream = vm
        .create_http_stream()
        .unwrap_or_else(|e| panic!("{name}: no stream: {e}"));
    let mut request = HeaderMap::new();
    let mut response = HeaderMap::new();
    let check = BodyCheck {
        plugin: name,
        configuration,
    };
    let (mut request_body, mut response_body) = (Buffered::default(), Buffered::default());
    for step in steps {
        match step {
            StreamStep::RequestHeaders(pairs, end) => {
                request = header_map(&pairs);
                let result = vm.on_request_headers(&stream, &mut request, end);
                if name == "deny" && vm.failure().is_none() {
                    check_deny(&pairs, &result);
                }
            }
            StreamStep::RequestBody(chunk, end) => {
                request_body.step(&chunk, end, check, |body| {
                    vm.on_request_body(&stream, body, end)
                });
            }
            StreamStep::RequestTrailers(pairs) => {
                let _ = vm.on_request_trailers(&stream, &mut header_map(&pairs));
            }
            StreamStep::ResponseHeaders(pairs, end) => {
                response = header_map(&pairs);
                let _ = vm.on_response_headers(&stream, &mut response, end);
            }
            StreamStep::ResponseBody(chunk, end) => {
                response_body.step(&chunk, end, check, |body| {
                    vm.on_response_body(&stream, body, end)
                });
            }
            StreamStep::ResponseTrailers(pairs) => {
                let _ = vm.on_response_trailers(&stream, &mut header_map(&pairs));
            }
            StreamStep::Log => {
                let _ = vm.on_log(&stream, &mut request, &mut response);
            }
            StreamStep::NextStream => {
                let _ = vm.take_stream_events(&stream);
                let _ = vm.finish_stream(stream);
                request_body = Buffered::default();
                response_body = Buffered::default();
                stream = match vm.create_http_stream() {
                    Ok(stream) => stream,
                    Err(_) => return,
                };
            }
            StreamStep::Pending => {
                let _ = vm.dispatch_pending();
            }
            StreamStep::Tick => {
                let _ = vm.on_tick();
            }
        }
        let limit = plugin.config().limits.memory_bytes;
        assert!(vm.memory_size() <= limit, "memory past its limit");
        if let Some(trap) = vm.failure() {
            // The suite's guests trap only at a deadline (a loaded machine) or, the logger,
            // when asked to panic: any other trap is a bug the checks above would not see.
            assert_no_host_panic(trap);
            assert!(
                trap.kind == TrapKind::Interrupted
                    || (name == "logger" && trap.kind == TrapKind::Unreachable),
                "{name} trapped: {trap}"
            );
        }
    }
    let _ = vm.finish_stream(stream);
}

/// One direction's body as a proxy buffers it: what the plugin holds (`body`, which it may
/// rewrite) and what it was given since the last forwarded body (`sent`).
#[derive(Default)]
struct Buffered {
    body: BytesMut,
    sent: Vec<u8>,
}

impl Buffered {
    /// Adds `chunk`, runs the body callback on everything buffered, checks the result, and
    /// forwards (empties the buffer) unless the plugin paused: a paused body accumulates.
    fn step(
        &mut self,
        chunk: &[u8],
        end: bool,
        check: BodyCheck,
        callback: impl FnOnce(&mut BytesMut) -> Result<Action, VmError>,
    ) {
        self.body.extend_from_slice(chunk);
        self.sent.extend_from_slice(chunk);
        let result = callback(&mut self.body);
        check.body(end, &result, &self.sent, &self.body);
        if !matches!(result, Ok(Action::Pause)) {
            self.body.clear();
            self.sent.clear();
        }
    }
}

/// Which plugin a stream runs, for the behaviour checks.
#[derive(Clone, Copy)]
struct BodyCheck<'a> {
    plugin: &'a str,
    configuration: &'a str,
}

impl BodyCheck<'_> {
    /// The body plugin pauses until the end of the stream, then replaces `<from>` with
    /// `<to>` in all it was given since the last forwarded body.
    fn body(self, end: bool, result: &Result<Action, VmError>, sent: &[u8], body: &[u8]) {
        if self.plugin != "body" || result.is_err() {
            return;
        }
        let Some((from, to)) = self.configuration.split_once("=>") else {
            return;
        };
        match end {
            false => assert!(
                matches!(result, Ok(Action::Pause)),
                "body continued before the end: {result:?}"
            ),
            true => {
                let expected = String::from_utf8_lossy(sent).replace(from, to);
                assert_eq!(body, expected.as_bytes(), "body rewrite of {sent:?}");
            }
        }
    }
}

/// The deny plugin answers 403 to a request whose only `:path` starts with its prefix, or
/// that has an `x-deny` header.
fn check_deny(pairs: &[(String, String)], result: &Result<Action, VmError>) {
    let paths: Vec<&String> = pairs
        .iter()
        .filter(|(k, _)| k == ":path")
        .map(|(_, v)| v)
        .collect();
    let denied_path = matches!(paths.as_slice(), [p] if p.starts_with("/deny"));
    let flagged = pairs.iter().any(|(k, _)| k == "x-deny");
    if denied_path || flagged {
        match result {
            Ok(Action::Respond(r)) => assert_eq!(r.status_code, 403, "deny answered {r:?}"),
            other => panic!("deny let {pairs:?} through: {other:?}"),
        }
    }
}

// --- 5. differential ---------------------------------------------------------------------

/// Hostcalls whose answers differ from run to run (clocks, randomness): a differential
/// input that calls them is not compared.
const NONDETERMINISTIC: &[Import] = &[
    Import::ProxyGetCurrentTimeNanoseconds,
    Import::ClockTimeGet,
    Import::RandomGet,
];

/// Differential: the same input on every built engine gives the same transcript. The first
/// byte picks the input: a hostcall program (as [`hostcalls`]) or a wasm-smith module made
/// to terminate (fuel checks in every loop and call, NaNs canonicalized) run without
/// deadlines. A run that overflows the stack on any engine is not compared: how deep a
/// stack goes is each engine's own.
pub fn differential(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let engines = module_engines();
    let transcripts: Vec<(EngineKind, Transcript)> = match selector % 2 {
        0 => {
            let Some(input) = ProgramInput::decode(rest) else {
                return;
            };
            if calls_nondeterministic(&input) {
                return;
            }
            engines
                .iter()
                .map(|kind| (*kind, run_program(*kind, &input)))
                .collect()
        }
        _ => {
            let mut u = Unstructured::new(rest);
            let Ok(wasm) = smith_module(&mut u, Some(1000)) else {
                return;
            };
            engines
                .iter()
                .map(|kind| (*kind, run_module(*kind, &wasm, false)))
                .collect()
        }
    };
    // Engines differ in the proposals they accept (a module one refuses another may run),
    // and in how deep a stack may go: such runs are not compared.
    if transcripts.iter().any(|(_, t)| {
        t.first().is_some_and(|line| line == "load refused")
            || t.iter().any(|line| line.contains("StackOverflow"))
    }) {
        return;
    }
    let Some((first_kind, first)) = transcripts.first() else {
        return;
    };
    for (kind, transcript) in &transcripts[1..] {
        if transcript != first {
            let at = first
                .iter()
                .zip(transcript)
                .position(|(a, b)| a != b)
                .unwrap_or(first.len().min(transcript.len()));
            panic!(
                "{first_kind} and {kind} disagree at step {at}:\n  {first_kind}: {:?}\n  {kind}: {:?}",
                first.get(at),
                transcript.get(at)
            );
        }
    }
}

/// Whether a program (read as the guest will) calls a nondeterministic import. Conservative:
/// any call record naming one counts, reached or not.
fn calls_nondeterministic(input: &ProgramInput) -> bool {
    let imports = program_imports(input.version);
    let bad: Vec<usize> = imports
        .iter()
        .enumerate()
        .filter(|(_, i)| NONDETERMINISTIC.contains(i))
        .map(|(n, _)| n)
        .collect();
    let p = &input.program;
    let mut pc = 0usize;
    while let Some(&op) = p.get(pc) {
        match op % 4 {
            0 => {
                let len = p
                    .get(pc + 5..pc + 7)
                    .map_or(0, |b| usize::from(u16::from_le_bytes([b[0], b[1]])));
                pc += 7 + len;
            }
            1 => {
                let Some(&index) = p.get(pc + 1) else {
                    return false;
                };
                let index = usize::from(index) % imports.len();
                if bad.contains(&index) {
                    return true;
                }
                pc += 2 + 8 * imports.get(index).map_or(0, |i| i.params().len());
            }
            2 => pc += 2,
            _ => pc += 5,
        }
    }
    false
}

// --- 6. config -----------------------------------------------------------------------------

/// A module that does nothing, to load configs on.
fn tiny_plugin(kind: EngineKind) -> &'static Plugin {
    static PLUGINS: PluginCache<EngineKind> = OnceLock::new();
    cached(&PLUGINS, kind, || {
        let wasm = wat::parse_str(
            r#"(module
                (import "env" "proxy_log" (func (param i32 i32 i32) (result i32)))
                (memory (export "memory") 1)
                (func (export "proxy_abi_version_0_2_1"))
                (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
                (func (export "proxy_on_context_create") (param i32 i32))
                (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0)))"#,
        )
        .unwrap_or_else(|e| panic!("tiny module: {e}"));
        compile(kind, &wasm, "tiny")
    })
}

/// Config: arbitrary bytes as a JSON plugin config never panic; what parses serializes and
/// parses back to itself; a plugin loads and runs a stream under it (whatever its limits
/// say) or is refused with an error.
pub fn config(data: &[u8]) {
    let Ok(config) = serde_json::from_slice::<PluginConfig>(data) else {
        return;
    };
    let text = serde_json::to_string(&config)
        .unwrap_or_else(|e| panic!("a parsed config does not serialize: {e}"));
    let again: PluginConfig = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("a serialized config does not parse: {e}: {text}"));
    assert_eq!(again, config, "config round trip through {text}");
    if !config.engine.is_built() {
        return;
    }
    let compiled = tiny_plugin(config.engine);
    let Ok(plugin) = Plugin::builder(config).build_from(compiled) else {
        return;
    };
    if let Ok(mut vm) = Vm::new(&plugin)
        && let Ok(stream) = vm.create_http_stream()
    {
        let mut headers: HeaderMap = [(":path", "/")].into_iter().collect();
        let _ = vm.on_request_headers(&stream, &mut headers, true);
        let _ = vm.finish_stream(stream);
    }
}

/// Builds hostcall programs for tests and seed inputs.
pub mod program {
    use super::program_imports;
    use filterbox::abi::{AbiVersion, Import};

    /// A program input for ABI 0.2.1 with only `:path: /` as request headers.
    pub fn input(records: &[u8]) -> Vec<u8> {
        let mut input = vec![2, 0];
        input.extend_from_slice(records);
        input
    }

    /// Appends a write of `bytes` at `address`.
    pub fn write(p: &mut Vec<u8>, address: u32, bytes: &[u8]) {
        p.push(0);
        p.extend_from_slice(&address.to_le_bytes());
        p.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        p.extend_from_slice(bytes);
    }

    /// Appends a call of `import` (ABI 0.2.1) with `args`.
    pub fn call(p: &mut Vec<u8>, import: Import, args: &[i64]) {
        let index = program_imports(AbiVersion::V0_2_1)
            .iter()
            .position(|i| *i == import)
            .unwrap_or_else(|| panic!("{} is not in ABI 0.2.1", import.name()));
        p.push(1);
        p.push(index as u8);
        for arg in args {
            p.extend_from_slice(&arg.to_le_bytes());
        }
    }

    /// Appends a yield: the callback returns `action` (0 continue, 1 pause).
    pub fn yield_(p: &mut Vec<u8>, action: u8) {
        p.extend_from_slice(&[2, action]);
    }

    /// Appends a yield that first grows memory by `pages` (at most 63).
    pub fn grow_and_yield(p: &mut Vec<u8>, pages: u8, action: u8) {
        p.extend_from_slice(&[2, (pages.min(63) << 2) | 2 | (action & 1)]);
    }

    /// A program that logs, reads a header, pauses the request, passes a bad pointer and
    /// enqueues onto a queue it registered (a wake-up for `on_queue_ready`).
    pub fn sample() -> Vec<u8> {
        let mut p = Vec::new();
        // on_configure: log "hello", register queue "q" (id at 0x400).
        write(&mut p, 0x100, b"hello");
        call(&mut p, Import::ProxyLog, &[2, 0x100, 5]);
        write(&mut p, 0x110, b"q");
        call(&mut p, Import::ProxyRegisterSharedQueue, &[0x110, 1, 0x400]);
        yield_(&mut p, 0);
        // on_context_create of the stream.
        yield_(&mut p, 0);
        // on_request_headers: read :path, a bad pointer, enqueue, pause.
        write(&mut p, 0x200, b":path");
        call(
            &mut p,
            Import::ProxyGetHeaderMapValue,
            &[0, 0x200, 5, 0x300, 0x304],
        );
        call(&mut p, Import::ProxyLog, &[2, 0xFFFF_FFF0, 100]);
        write(&mut p, 0x120, b"m");
        // The queue id the host wrote at 0x400 is read by nobody but the host: queue ids
        // start at 1 in a fresh SharedState.
        call(&mut p, Import::ProxyEnqueueSharedQueue, &[1, 0x120, 1]);
        yield_(&mut p, 1);
        input(&p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_calls_hostcalls_and_logs_their_statuses() {
        let input = ProgramInput::decode(&program::sample()).expect("decodes");
        let kind = EngineKind::built()[0];
        let t = run_program(kind, &input);
        // on_configure: "hello", then the statuses of log and register (Ok, Ok).
        let hello = t.iter().position(|l| l == "hello").expect("logged hello");
        assert_eq!(t[hello + 1], "aaaa", "{t:#?}");
        // on_request_headers paused after Ok, InvalidMemoryAccess (6) and Ok; the enqueue
        // woke the root context once.
        assert_eq!(t[0], "Pause", "{t:#?}");
        assert!(t.iter().any(|l| l == "pending: 1"), "queue wake-up: {t:#?}");
        assert!(t.iter().any(|l| l == "aaagaa"), "{t:#?}");
    }

    #[test]
    fn a_program_that_grows_memory_stops_at_its_limit_on_every_engine() {
        // 4 pages, +8 (fits: 12), +8 (refused: 20 > 16), +4 (fits: 16), +1 (refused).
        let mut p = Vec::new();
        for pages in [8, 8, 4, 1] {
            program::grow_and_yield(&mut p, pages, 0);
        }
        let input = ProgramInput::decode(&program::input(&p)).expect("decodes");
        for kind in EngineKind::built() {
            let compiled = program_plugin(kind, input.version);
            let (plugin, _) =
                fresh_plugin(compiled, program_config(&input.program)).expect("loads");
            let mut vm = Vm::new(&plugin).expect("starts");
            let mut t = Transcript::new();
            drive_stream(&mut vm, &input.request, &mut t);
            assert_eq!(
                vm.memory_size(),
                PROGRAM_MEMORY_PAGES << 16,
                "{kind:?}: {t:?}"
            );
        }
    }

    #[test]
    fn engines_agree_on_the_sample_program() {
        let mut input = vec![0];
        input.extend(program::sample());
        differential(&input);
    }

    /// Writes the seed inputs into `fuzz/seeds/` (run by hand after changing them).
    #[test]
    #[ignore]
    fn write_seeds() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
        let mut differential = vec![0];
        differential.extend(program::sample());
        for (target, bytes) in [
            ("hostcalls", program::sample()),
            ("differential", differential),
        ] {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).expect("seed dir");
            std::fs::write(dir.join("sample"), bytes).expect("seed written");
        }
    }
}
