//! The threads that enforce deadlines (wasmtime's epoch ticker, wasmer's watchdog) sleep
//! when no call has run for a while; a runaway call after such a pause must still be stopped.

use filterbox::{EngineKind, HeaderMap, Plugin, PluginConfig, TrapKind, Vm, VmError};
use filterbox_conformance::guests;
use std::time::{Duration, Instant};

#[test]
fn a_runaway_call_after_an_idle_pause_is_still_stopped() {
    let wasm = guests::wat_module(
        Some("proxy_abi_version_0_2_1"),
        r#"(func (export "proxy_on_context_create") (param i32 i32))
        (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
            (loop $forever (br $forever)) (unreachable))"#,
    )
    .expect("module");
    for engine in EngineKind::built() {
        let mut config = PluginConfig::named("loop").with_engine(engine);
        config.limits.callback_deadline_ms = Some(50);
        let plugin = Plugin::load(config, &wasm).expect("plugin");
        for round in 0..2 {
            let mut vm = Vm::new(&plugin).expect("vm");
            let stream = vm.create_http_stream().expect("stream");
            // Longer than the deadline threads wait before they sleep (100 ms).
            std::thread::sleep(Duration::from_millis(400));
            let started = Instant::now();
            let mut headers: HeaderMap = [(":path", "/")].into_iter().collect();
            let outcome = vm.on_request_headers(&stream, &mut headers, true);
            let took = started.elapsed();
            assert!(
                matches!(
                    &outcome,
                    Err(VmError::Trap { trap, .. }) if trap.kind == TrapKind::Interrupted
                ),
                "{engine} round {round}: {outcome:?}"
            );
            // Stopped by the woken thread, not by the once-a-second safety check (a loaded
            // machine may delay it, hence the margin).
            assert!(
                took < Duration::from_secs(5),
                "{engine} round {round}: {took:?}"
            );
        }
    }
}
