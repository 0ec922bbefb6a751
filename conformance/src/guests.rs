//! The guest plugins: Rust-SDK plugins built from `guests/` by the build script, and
//! hand-written WAT modules for what no SDK would produce.

use std::fmt::Write as _;

/// Header rewriting driven by its plugin configuration (Rust SDK, ABI 0.2.1).
pub const HEADERS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest_headers.wasm"));
/// Buffers and rewrites bodies (Rust SDK, ABI 0.2.1).
pub const BODY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest_body.wasm"));
/// Denies by path prefix with a local response (Rust SDK, ABI 0.2.1).
pub const DENY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest_deny.wasm"));
/// Logs at every level, through WASI, and panics on request (Rust SDK, ABI 0.2.1).
pub const LOGGER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest_logger.wasm"));
/// HTTP calls, gRPC, shared data, a queue, ticks and metrics together (Rust SDK, ABI 0.2.1);
/// see `guests/callouts/src/lib.rs`.
pub const CALLOUTS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest_callouts.wasm"));
/// Adds `x-abi: 0.1.0`, logs its configuration, pauses `/pause` on an HTTP call (Rust SDK
/// 0.1.x, ABI 0.1.0); see `guests/abi010/src/lib.rs`.
pub const ABI010: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest_abi010.wasm"));
/// Rust-SDK calls whose effect Envoy defines (`reset_http_request`, a local reply then a
/// resume, a local reply through the plugin's response phase, trailers added at the end of
/// the body, a gRPC call with a bad method), one per configuration (Rust SDK, ABI 0.2.1); see
/// `guests/parity/src/lib.rs`.
pub const PARITY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest_parity.wasm"));
/// A rate limiter on shared data with CAS (429 past `limit` per `window`), and queue
/// commands for cross-instance tests (Rust SDK, ABI 0.2.1); see `guests/ratelimit/src/lib.rs`.
pub const RATELIMIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest_ratelimit.wasm"));
/// Adds headers, counts requests and denies `/deny` (AssemblyScript SDK
/// `@solo-io/proxy-runtime` 0.1.8, ABI 0.2.0, root id `as_root`); see
/// `guests/assemblyscript/assembly/index.ts`.
pub const ASSEMBLYSCRIPT: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/guest_assemblyscript.wasm"));

/// A filter written in C++ against the ABI and built with clang, libc++ and wasi-libc as a
/// reactor that allocates through `malloc`, as C++ SDK plugins do (ABI 0.2.1); see
/// `guests/cpp/plugin.cc`.
pub const CPP: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest_cpp.wasm"));

/// Every built guest plugin by name, for the CLI and tests.
pub const ALL: &[(&str, &[u8])] = &[
    ("headers", HEADERS),
    ("body", BODY),
    ("deny", DENY),
    ("logger", LOGGER),
    ("callouts", CALLOUTS),
    ("abi010", ABI010),
    ("parity", PARITY),
    ("ratelimit", RATELIMIT),
    ("assemblyscript", ASSEMBLYSCRIPT),
    ("cpp", CPP),
];

/// An ABI 0.2.1 module whose `proxy_on_request_headers` traps when the request has a header
/// `x-boom` (and continues otherwise): a plugin that crashes on demand, for failure policies.
pub fn trapping_on_x_boom() -> Result<Vec<u8>, String> {
    wat_module(
        Some("proxy_abi_version_0_2_1"),
        r#"(data (i32.const 100) "x-boom")
        (func (export "proxy_on_context_create") (param i32 i32))
        (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
            (if (i32.eqz (call $get_header (i32.const 0) (i32.const 100) (i32.const 6) (i32.const 200) (i32.const 204)))
                (then unreachable))
            (i32.const 0))"#,
    )
}

/// Arbitrary bytes as the inside of a WAT string literal (for a `data` segment).
pub fn wat_bytes(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "\\{b:02x}");
        out
    })
}

/// A minimal module: memory, allocator, marker `marker` (if any), and `body` spliced in.
/// The allocator hands out 1 KiB-aligned blocks from 4096 up and returns `alloc_result` when
/// it is not -1 (to play a hostile allocator).
pub fn wat_module(marker: Option<&str>, body: &str) -> Result<Vec<u8>, String> {
    let marker = marker
        .map(|m| format!(r#"(func (export "{m}"))"#))
        .unwrap_or_default();
    let text = format!(
        r#"(module
            (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
            (import "env" "proxy_get_header_map_value" (func $get_header (param i32 i32 i32 i32 i32) (result i32)))
            (import "env" "proxy_get_header_map_pairs" (func $get_pairs (param i32 i32 i32) (result i32)))
            (import "env" "proxy_add_header_map_value" (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (global $next (mut i32) (i32.const 4096))
            (global $alloc_result (mut i32) (i32.const -1))
            {marker}
            (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
                (local $p i32)
                (if (i32.ne (global.get $alloc_result) (i32.const -1))
                    (then (return (global.get $alloc_result))))
                (local.set $p (global.get $next))
                (global.set $next (i32.add (global.get $next) (i32.const 1024)))
                (local.get $p))
            ;; Logs status `s` as one letter: 'a' + s (so Ok = "a", InvalidMemoryAccess = "g").
            (func $report (param $s i32)
                (i32.store8 (i32.const 0) (i32.add (i32.const 97) (local.get $s)))
                (drop (call $log (i32.const 2) (i32.const 0) (i32.const 1))))
            {body}
        )"#
    );
    wat::parse_str(&text).map_err(|e| format!("conformance WAT module does not parse: {e}"))
}
