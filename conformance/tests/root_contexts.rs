//! Several root contexts in one VM (`Vm::add_root_context`), with SDK-built plugins on every
//! built engine: each root reads its own configuration, its streams run under it, its timer is
//! its own, and shutdown ends every root.

use filterbox::abi::Callback;
use filterbox::{EngineKind, HeaderMap, Plugin, PluginConfig, Vm, VmError};
use filterbox_conformance::guests;
use std::time::{Duration, Instant};

fn request() -> HeaderMap {
    [(":method", "GET"), (":path", "/"), (":authority", "a")]
        .into_iter()
        .collect()
}

#[test]
fn each_root_context_configures_and_runs_its_own_streams() {
    for engine in EngineKind::built() {
        let config = PluginConfig::named("headers")
            .with_configuration("add x-root first")
            .with_engine(engine);
        let plugin = Plugin::load(config, guests::HEADERS).expect("plugin");
        let mut vm = Vm::new(&plugin).expect("vm");
        let second = vm
            .add_root_context("add x-root second".into())
            .expect("second root");
        assert_ne!(second, vm.root_context_id(), "{engine}");
        assert_eq!(vm.extra_root_contexts(), &[second], "{engine}");
        for (root, expected) in [(None, "first"), (Some(second), "second")] {
            let stream = match root {
                Some(root) => vm.create_http_stream_under(root),
                None => vm.create_http_stream(),
            }
            .expect("stream");
            let mut headers = request();
            vm.on_request_headers(&stream, &mut headers, true)
                .expect("headers");
            assert_eq!(headers.get_str("x-root"), Some(expected), "{engine}");
            vm.finish_stream(stream).expect("finish");
        }
        let unknown = vm.create_http_stream_under(second + 100);
        assert!(
            matches!(unknown, Err(VmError::UnknownRoot { .. })),
            "{engine}: {unknown:?}"
        );
        // A configuration the plugin rejects leaves no root behind.
        let rejected = vm.add_root_context("nonsense".into());
        assert!(
            matches!(rejected, Err(VmError::Rejected { .. })),
            "{engine}"
        );
        assert_eq!(vm.extra_root_contexts(), &[second], "{engine}");
        assert_eq!(vm.context_count(), 2, "{engine}: the two roots, no stream");
        assert!(vm.shutdown().expect("shutdown"), "{engine}");
        let metrics = plugin.metrics();
        assert_eq!(
            metrics.callback_calls(Callback::ProxyOnDone),
            2 + 2,
            "{engine}"
        );
        assert_eq!(
            metrics.callback_calls(Callback::ProxyOnDelete),
            2 + 2,
            "{engine}"
        );
        assert_eq!(vm.context_count(), 0, "{engine}");
    }
}

#[test]
fn a_timer_set_by_one_root_ticks_that_root_only() {
    for engine in EngineKind::built() {
        let config = PluginConfig::named("parity")
            .with_configuration("reset")
            .with_engine(engine);
        let plugin = Plugin::load(config, guests::PARITY).expect("plugin");
        let mut vm = Vm::new(&plugin).expect("vm");
        assert_eq!(vm.next_tick(), None, "{engine}");
        // The `service` configuration ticks every 10 ms; the first root has no timer.
        vm.add_root_context("service".into()).expect("service root");
        assert_eq!(vm.tick_period(), None, "{engine}: the first root's timer");
        let due = vm.next_tick().expect("the added root's timer");
        let started = Instant::now();
        while vm.run_due(Instant::now()).expect("run") == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{engine}: no tick"
            );
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        assert_eq!(
            plugin.metrics().callback_calls(Callback::ProxyOnTick),
            1,
            "{engine}"
        );
        assert!(vm.next_tick().is_some_and(|next| next > due), "{engine}");
    }
}

#[test]
fn callback_latency_times_one_call_in_the_sampling_interval() {
    for engine in EngineKind::built() {
        for (every, timed) in [(1, 10), (4, 3), (16, 1), (0, 0)] {
            let config = PluginConfig::named("headers").with_engine(engine);
            let plugin = Plugin::builder(config)
                .callback_latency_sampling(every)
                .build(guests::HEADERS)
                .expect("plugin");
            let mut vm = Vm::new(&plugin).expect("vm");
            for _ in 0..10 {
                let stream = vm.create_http_stream().expect("stream");
                let mut headers = request();
                vm.on_request_headers(&stream, &mut headers, true)
                    .expect("headers");
                vm.finish_stream(stream).expect("finish");
            }
            let metrics = plugin.metrics();
            let callback = Callback::ProxyOnRequestHeaders;
            assert_eq!(metrics.callback_calls(callback), 10, "{engine}");
            // The first call of each callback is timed, then one in `every`.
            assert_eq!(
                metrics.callback_timed_calls(callback),
                timed,
                "{engine}, one in {every}"
            );
            // A callback called once is timed unless timing is off.
            let configure = metrics.callback_timed_calls(Callback::ProxyOnConfigure);
            assert_eq!(configure, u64::from(every != 0), "{engine}, one in {every}");
        }
    }
}
