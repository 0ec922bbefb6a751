//! The cases. Each is a name, a group and a check run against one engine.

use crate::ensure;
use crate::guests::{self, wat_module};
use crate::harness::{CaseResult, Failure, Harness, headers, pairs_of};
use crate::{calls, envoy_parity, hardening, hostile};
use bytes::BytesMut;
use filterbox::abi::{AbiError, Callback};
use filterbox::{
    Action, EngineError, LoadError, LogLevel, PluginConfig, PluginError, TrapKind, Vm, VmError,
};

/// One conformance case.
pub struct Case {
    /// Its name, unique within the group.
    pub name: &'static str,
    /// Its group; hostile-module cases are in `hostile`.
    pub group: &'static str,
    /// The check.
    pub run: fn(&Harness) -> CaseResult,
}

/// Every case, in report order.
pub static CASES: &[Case] = &[
    Case {
        name: "start-and-configure",
        group: "lifecycle",
        run: start_and_configure,
    },
    Case {
        name: "configure-false-refuses-the-vm",
        group: "lifecycle",
        run: configure_false_refuses_the_vm,
    },
    Case {
        name: "stream-contexts-come-and-go",
        group: "lifecycle",
        run: stream_contexts_come_and_go,
    },
    Case {
        name: "add",
        group: "headers",
        run: headers_add,
    },
    Case {
        name: "log-every-header",
        group: "headers",
        run: headers_logged,
    },
    Case {
        name: "replace-collapses-duplicates",
        group: "headers",
        run: headers_replace,
    },
    Case {
        name: "remove",
        group: "headers",
        run: headers_remove,
    },
    Case {
        name: "pseudo-headers-and-order",
        group: "headers",
        run: headers_pseudo_and_order,
    },
    Case {
        name: "missing-header-is-none",
        group: "headers",
        run: headers_missing,
    },
    Case {
        name: "response-add",
        group: "headers",
        run: headers_response_add,
    },
    Case {
        name: "plugin-configuration-drives-rules",
        group: "config",
        run: config_drives_rules,
    },
    Case {
        name: "vm-configuration",
        group: "config",
        run: config_vm_configuration,
    },
    Case {
        name: "plugin-properties",
        group: "properties",
        run: plugin_properties,
    },
    Case {
        name: "unknown-property-is-none",
        group: "properties",
        run: unknown_property,
    },
    Case {
        name: "request-rewrite-after-buffering",
        group: "body",
        run: body_request_rewrite,
    },
    Case {
        name: "response-rewrite",
        group: "body",
        run: body_response_rewrite,
    },
    Case {
        name: "deny-with-403",
        group: "local-response",
        run: deny_with_403,
    },
    Case {
        name: "allow-other-paths",
        group: "local-response",
        run: allow_other_paths,
    },
    Case {
        name: "every-level",
        group: "logging",
        run: log_every_level,
    },
    Case {
        name: "wasi-stdout-stderr",
        group: "logging",
        run: log_wasi_stdio,
    },
    Case {
        name: "on-log-reads-response-headers",
        group: "logging",
        run: log_on_log,
    },
    Case {
        name: "guest-panic-fails-the-vm",
        group: "traps",
        run: guest_panic_fails_the_vm,
    },
    Case {
        name: "no-abi-marker-is-refused",
        group: "abi",
        run: no_marker_refused,
    },
    Case {
        name: "unknown-abi-marker-is-refused",
        group: "abi",
        run: unknown_marker_refused,
    },
    Case {
        name: "missing-allocator-is-refused",
        group: "abi",
        run: missing_allocator_refused,
    },
    Case {
        name: "unsupported-import-is-refused",
        group: "abi",
        run: unsupported_import_refused,
    },
    Case {
        name: "out-of-bounds-read",
        group: "hostile",
        run: hostile_out_of_bounds_read,
    },
    Case {
        name: "pointer-overflow",
        group: "hostile",
        run: hostile_pointer_overflow,
    },
    Case {
        name: "bad-out-pointer",
        group: "hostile",
        run: hostile_bad_out_pointer,
    },
    Case {
        name: "allocator-returns-out-of-bounds",
        group: "hostile",
        run: hostile_allocator,
    },
    Case {
        name: "bad-enum-values",
        group: "hostile",
        run: hostile_bad_enums,
    },
    Case {
        name: "loop-in-every-stream-callback",
        group: "hostile",
        run: hostile::loop_in_every_stream_callback,
    },
    Case {
        name: "loop-while-starting",
        group: "hostile",
        run: hostile::loop_while_starting,
    },
    Case {
        name: "memory-bomb",
        group: "hostile",
        run: hostile::memory_bomb,
    },
    Case {
        name: "stack-overflow",
        group: "hostile",
        run: hostile::stack_overflow,
    },
    Case {
        name: "panic-once-then-recover",
        group: "hostile",
        run: hostile::panic_once_then_recover,
    },
    Case {
        name: "bad-pointers-to-every-hostcall",
        group: "hostile",
        run: hostile::bad_pointers_to_every_hostcall,
    },
    Case {
        name: "reentrant-allocator",
        group: "hostile",
        run: hostile::reentrant_allocator,
    },
    Case {
        name: "bad-exports-are-refused",
        group: "hostile",
        run: hostile::bad_exports_are_refused,
    },
    Case {
        name: "hundred-thousand-functions",
        group: "hostile",
        run: hostile::hundred_thousand_functions,
    },
    Case {
        name: "huge-memory-and-data",
        group: "hostile",
        run: hostile::huge_memory_and_data,
    },
    Case {
        name: "fail-open-lets-the-stream-through",
        group: "isolation",
        run: hostile::fail_open_lets_the_stream_through,
    },
    Case {
        name: "crash-loop-stops-rebuilding",
        group: "isolation",
        run: hostile::crash_loop_stops_rebuilding,
    },
    Case {
        name: "local-response-in-on-log-is-refused",
        group: "isolation",
        run: hostile::local_response_in_on_log_is_refused,
    },
    Case {
        name: "denied-capabilities",
        group: "isolation",
        run: hostile::denied_capabilities,
    },
    Case {
        name: "host-bounds",
        group: "isolation",
        run: hostile::host_bounds,
    },
    Case {
        name: "amplifying-hostcalls-stay-bounded",
        group: "hostile",
        run: hardening::amplifying_hostcalls_stay_bounded,
    },
    Case {
        name: "deadlines-hold-in-hostcall-loops",
        group: "hostile",
        run: hardening::deadlines_hold_in_hostcall_loops,
    },
    Case {
        name: "handed-over-buffers-are-bounded",
        group: "hostile",
        run: hardening::handed_over_buffers_are_bounded,
    },
    Case {
        name: "ticks-use-at-most-their-share",
        group: "hostile",
        run: hardening::ticks_use_at_most_their_share,
    },
    Case {
        name: "callouts-end-with-their-vm",
        group: "callouts",
        run: hardening::callouts_end_with_their_vm,
    },
    Case {
        name: "proc-exit-in-the-allocator-ends-the-vm",
        group: "hostile",
        run: hardening::proc_exit_in_the_allocator_ends_the_vm,
    },
    Case {
        name: "service-plugin-runs-on-its-own",
        group: "lifecycle",
        run: hardening::service_plugin_runs_on_its_own,
    },
    Case {
        name: "callout-bytes-are-bounded",
        group: "hostile",
        run: hardening::callout_bytes_are_bounded,
    },
    Case {
        name: "close-stream-resets-whatever-the-callback-returns",
        group: "contexts",
        run: envoy_parity::close_stream_resets_whatever_the_callback_returns,
    },
    Case {
        name: "local-response-wins-over-a-resume-in-the-same-callback",
        group: "local-response",
        run: envoy_parity::local_response_wins_over_a_resume_in_the_same_callback,
    },
    Case {
        name: "callback-results-read-as-envoy-reads-them",
        group: "headers",
        run: envoy_parity::callback_results_read_as_envoy_reads_them,
    },
    Case {
        name: "abi-0-1-0-header-callbacks-with-end-of-stream",
        group: "versions",
        run: envoy_parity::abi_0_1_0_header_callbacks_with_end_of_stream,
    },
    Case {
        name: "output-lines-are-logged-whole",
        group: "logging",
        run: envoy_parity::output_lines_are_logged_whole,
    },
    Case {
        name: "trailers-added-at-the-end-of-the-body",
        group: "body",
        run: envoy_parity::trailers_added_at_the_end_of_the_body,
    },
    Case {
        name: "request-headers-are-not-readable-in-the-response-phase",
        group: "headers",
        run: envoy_parity::request_headers_are_not_readable_in_the_response_phase,
    },
    Case {
        name: "set-envoy-filter-state-is-read-as-a-property",
        group: "properties",
        run: envoy_parity::set_envoy_filter_state_is_read_as_a_property,
    },
    Case {
        name: "rust-sdk-calls-as-envoy-answers-them",
        group: "local-response",
        run: envoy_parity::rust_sdk_calls_as_envoy_answers_them,
    },
    Case {
        name: "large-functions-and-bulk-copies-run-under-deadlines",
        group: "lifecycle",
        run: hardening::large_functions_and_bulk_copies_run_under_deadlines,
    },
    Case {
        name: "floods-stop-at-their-bounds",
        group: "hostile",
        run: calls::floods_stop_at_their_bounds,
    },
    Case {
        name: "rust-sdk-http-call",
        group: "callouts",
        run: calls::rust_sdk_http_call,
    },
    Case {
        name: "rust-sdk-grpc",
        group: "callouts",
        run: calls::rust_sdk_grpc,
    },
    Case {
        name: "http-call-statuses",
        group: "callouts",
        run: calls::http_call_statuses,
    },
    Case {
        name: "grpc-statuses",
        group: "callouts",
        run: calls::grpc_statuses,
    },
    Case {
        name: "shared-data",
        group: "shared",
        run: calls::shared_data,
    },
    Case {
        name: "shared-queues",
        group: "shared",
        run: calls::shared_queues,
    },
    Case {
        name: "ticks",
        group: "timers",
        run: calls::ticks,
    },
    Case {
        name: "metrics",
        group: "metrics",
        run: calls::metrics,
    },
    Case {
        name: "foreign-functions",
        group: "contexts",
        run: calls::foreign_functions,
    },
    Case {
        name: "contexts-and-properties",
        group: "contexts",
        run: calls::contexts_and_properties,
    },
    Case {
        name: "proc-exit",
        group: "wasi",
        run: calls::proc_exit,
    },
    Case {
        name: "abi-0-1-0-plugin",
        group: "versions",
        run: calls::abi_0_1_0_plugin,
    },
    Case {
        name: "cpp-plugin",
        group: "versions",
        run: calls::cpp_plugin,
    },
    Case {
        name: "assemblyscript-plugin",
        group: "versions",
        run: calls::assemblyscript_plugin,
    },
    Case {
        name: "envoy-attributes",
        group: "properties",
        run: calls::envoy_attributes,
    },
    Case {
        name: "validate-configuration-and-metadata",
        group: "contexts",
        run: calls::validate_configuration_and_metadata,
    },
    Case {
        name: "stream-control-and-queries",
        group: "contexts",
        run: calls::stream_control_and_queries,
    },
    Case {
        name: "tcp-connection",
        group: "l4",
        run: calls::tcp_connection,
    },
];

fn config(name: &str, configuration: &str) -> PluginConfig {
    PluginConfig::named(name)
        .with_configuration(configuration)
        .with_log_level(LogLevel::Trace)
}

/// Runs request headers through a fresh stream and finishes it.
fn request(
    vm: &mut Vm,
    pairs: &[(&str, &str)],
) -> Result<(Action, Vec<(String, String)>), Failure> {
    let stream = vm.create_http_stream().map_err(|e| e.to_string())?;
    let mut h = headers(pairs);
    let action = vm
        .on_request_headers(&stream, &mut h, true)
        .map_err(|e| e.to_string())?;
    vm.finish_stream(stream).map_err(|e| e.to_string())?;
    Ok((action, pairs_of(&h)))
}

fn find<'a>(pairs: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    pairs
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

fn start_and_configure(h: &Harness) -> CaseResult {
    let (vm, logs) = h.start(guests::HEADERS, config("headers", "add x-a 1\nremove x-b"))?;
    ensure!(
        logs.has(LogLevel::Info, "configured 2 rules"),
        "logs: {:?}",
        logs.messages()
    );
    ensure!(
        vm.root_context_id() == 1,
        "root context id {}",
        vm.root_context_id()
    );
    ensure!(
        vm.context_count() == 1,
        "live contexts {}",
        vm.context_count()
    );
    Ok(())
}

fn configure_false_refuses_the_vm(h: &Harness) -> CaseResult {
    let (plugin, _) = h
        .load(guests::HEADERS, config("headers", "frobnicate"))
        .map_err(|e| e.to_string())?;
    match Vm::new(&plugin) {
        Err(VmError::Rejected {
            callback: Callback::ProxyOnConfigure,
            ..
        }) => Ok(()),
        other => Err(format!("expected on_configure rejection, got {other:?}").into()),
    }
}

fn stream_contexts_come_and_go(h: &Harness) -> CaseResult {
    let (mut vm, _) = h.start(guests::HEADERS, config("headers", ""))?;
    let a = vm.create_http_stream().map_err(|e| e.to_string())?;
    let b = vm.create_http_stream().map_err(|e| e.to_string())?;
    ensure!(
        a.context_id() != b.context_id() && a.context_id() > 1,
        "ids {} {}",
        a.context_id(),
        b.context_id()
    );
    ensure!(
        vm.context_count() == 3,
        "live contexts {}",
        vm.context_count()
    );
    vm.finish_stream(a).map_err(|e| e.to_string())?;
    vm.finish_stream(b).map_err(|e| e.to_string())?;
    ensure!(
        vm.context_count() == 1,
        "live contexts after finish {}",
        vm.context_count()
    );
    Ok(())
}

fn headers_add(h: &Harness) -> CaseResult {
    let (mut vm, _) = h.start(
        guests::HEADERS,
        config("headers", "add x-added yes\nadd x-added again"),
    )?;
    let (action, out) = request(&mut vm, &[(":path", "/"), ("x-added", "client")])?;
    ensure!(action == Action::Continue, "action {action:?}");
    ensure!(
        find(&out, "x-added") == ["client", "yes", "again"],
        "headers {out:?}"
    );
    Ok(())
}

/// The Rust SDK's `http_headers` example's work: every request header logged by name and
/// value through `get_http_request_headers` (one `proxy_get_header_map_pairs`), then the end
/// of the stream from `on_log`.
fn headers_logged(h: &Harness) -> CaseResult {
    let (mut vm, logs) = h.start(guests::HEADERS, config("headers", "log-headers"))?;
    let stream = vm.create_http_stream().map_err(|e| e.to_string())?;
    let mut request = headers(&[(":path", "/x"), ("x-a", "1"), ("x-a", "2")]);
    let mut response = headers(&[(":status", "200")]);
    vm.on_request_headers(&stream, &mut request, true)
        .map_err(|e| e.to_string())?;
    vm.on_log(&stream, &mut request, &mut response)
        .map_err(|e| e.to_string())?;
    vm.finish_stream(stream).map_err(|e| e.to_string())?;
    for line in [
        "#2 -> :path: /x",
        "#2 -> x-a: 1",
        "#2 -> x-a: 2",
        "#2 completed.",
    ] {
        ensure!(
            logs.has(LogLevel::Info, line),
            "no {line:?} in {:?}",
            logs.messages()
        );
    }
    Ok(())
}

fn headers_replace(h: &Harness) -> CaseResult {
    let (mut vm, _) = h.start(guests::HEADERS, config("headers", "replace x-r new"))?;
    let (_, out) = request(&mut vm, &[("x-r", "1"), ("x-other", "o"), ("x-r", "2")])?;
    ensure!(
        out == [("x-r".into(), "new".into()), ("x-other".into(), "o".into())],
        "headers {out:?}"
    );
    let (_, out) = request(&mut vm, &[("x-other", "o")])?;
    ensure!(
        find(&out, "x-r") == ["new"],
        "replace of an absent header adds it: {out:?}"
    );
    Ok(())
}

fn headers_remove(h: &Harness) -> CaseResult {
    let (mut vm, _) = h.start(guests::HEADERS, config("headers", "remove x-secret"))?;
    let (_, out) = request(
        &mut vm,
        &[("x-secret", "1"), ("keep", "k"), ("X-Secret", "2")],
    )?;
    ensure!(out == [("keep".into(), "k".into())], "headers {out:?}");
    Ok(())
}

fn headers_pseudo_and_order(h: &Harness) -> CaseResult {
    let (mut vm, _) = h.start(
        guests::HEADERS,
        config(
            "headers",
            "copy-header :path x-path\ncopy-header :method x-method",
        ),
    )?;
    let input = [
        (":method", "POST"),
        (":path", "/a?b=c"),
        (":authority", "example.com"),
        ("dup", "1"),
        ("dup", "2"),
    ];
    let (_, out) = request(&mut vm, &input)?;
    let mut expected: Vec<(String, String)> = input
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    expected.push(("x-path".into(), "/a?b=c".into()));
    expected.push(("x-method".into(), "POST".into()));
    ensure!(out == expected, "headers {out:?}");
    Ok(())
}

fn headers_missing(h: &Harness) -> CaseResult {
    let (mut vm, _) = h.start(
        guests::HEADERS,
        config("headers", "copy-header x-nope x-got"),
    )?;
    let (_, out) = request(&mut vm, &[(":path", "/")])?;
    ensure!(find(&out, "x-got") == ["missing"], "headers {out:?}");
    Ok(())
}

fn headers_response_add(h: &Harness) -> CaseResult {
    let (mut vm, _) = h.start(
        guests::HEADERS,
        config("headers", "response-add x-served-by filterbox"),
    )?;
    let stream = vm.create_http_stream().map_err(|e| e.to_string())?;
    let mut req = headers(&[(":path", "/")]);
    vm.on_request_headers(&stream, &mut req, true)
        .map_err(|e| e.to_string())?;
    let mut resp = headers(&[(":status", "200")]);
    let action = vm
        .on_response_headers(&stream, &mut resp, false)
        .map_err(|e| e.to_string())?;
    ensure!(action == Action::Continue, "action {action:?}");
    let out = pairs_of(&resp);
    ensure!(
        out == [
            (":status".into(), "200".into()),
            ("x-served-by".into(), "filterbox".into())
        ],
        "headers {out:?}"
    );
    ensure!(
        pairs_of(&req) == [(":path".to_string(), "/".to_string())],
        "request untouched: {:?}",
        pairs_of(&req)
    );
    vm.finish_stream(stream).map_err(|e| e.to_string())?;
    Ok(())
}

fn config_drives_rules(h: &Harness) -> CaseResult {
    for (configuration, expected) in [("add x-config one", "one"), ("add x-config two", "two")] {
        let (mut vm, _) = h.start(guests::HEADERS, config("headers", configuration))?;
        let (_, out) = request(&mut vm, &[])?;
        ensure!(
            find(&out, "x-config") == [expected],
            "config {configuration:?} gave {out:?}"
        );
    }
    Ok(())
}

fn config_vm_configuration(h: &Harness) -> CaseResult {
    let cfg = config("headers", "copy-vm-config x-vm").with_vm_configuration("vm-config-42");
    let (mut vm, _) = h.start(guests::HEADERS, cfg)?;
    let (_, out) = request(&mut vm, &[])?;
    ensure!(find(&out, "x-vm") == ["vm-config-42"], "headers {out:?}");
    Ok(())
}

fn plugin_properties(h: &Harness) -> CaseResult {
    let mut cfg = config(
        "props",
        "copy-property x-name plugin_name\ncopy-property x-root plugin_root_id\ncopy-property x-vm plugin_vm_id",
    );
    cfg.root_id = "root-7".into();
    cfg.vm_id = "vm-9".into();
    let (mut vm, _) = h.start(guests::HEADERS, cfg)?;
    let (_, out) = request(&mut vm, &[])?;
    ensure!(find(&out, "x-name") == ["props"], "headers {out:?}");
    ensure!(find(&out, "x-root") == ["root-7"], "headers {out:?}");
    ensure!(find(&out, "x-vm") == ["vm-9"], "headers {out:?}");
    Ok(())
}

fn unknown_property(h: &Harness) -> CaseResult {
    let (mut vm, _) = h.start(
        guests::HEADERS,
        config("props", "copy-property x-p no.such.property"),
    )?;
    let (_, out) = request(&mut vm, &[])?;
    ensure!(find(&out, "x-p") == ["missing"], "headers {out:?}");
    Ok(())
}

fn body_request_rewrite(h: &Harness) -> CaseResult {
    let (mut vm, logs) = h.start(guests::BODY, config("body", "world=>filterbox"))?;
    let stream = vm.create_http_stream().map_err(|e| e.to_string())?;
    let mut body = BytesMut::from(&b"hello wor"[..]);
    let first = vm
        .on_request_body(&stream, &mut body, false)
        .map_err(|e| e.to_string())?;
    ensure!(first == Action::Pause, "first chunk: {first:?}");
    ensure!(
        &body[..] == b"hello wor",
        "a paused chunk is untouched: {:?}",
        body
    );
    body.extend_from_slice(b"ld, world!");
    let last = vm
        .on_request_body(&stream, &mut body, true)
        .map_err(|e| e.to_string())?;
    ensure!(last == Action::Continue, "last chunk: {last:?}");
    ensure!(
        &body[..] == b"hello filterbox, filterbox!",
        "body {:?}",
        String::from_utf8_lossy(&body)
    );
    ensure!(
        logs.has(LogLevel::Info, "request body 19 -> 27 bytes"),
        "logs {:?}",
        logs.messages()
    );
    vm.finish_stream(stream).map_err(|e| e.to_string())?;
    Ok(())
}

fn body_response_rewrite(h: &Harness) -> CaseResult {
    let (mut vm, _) = h.start(guests::BODY, config("body", "secret=>[redacted]"))?;
    let stream = vm.create_http_stream().map_err(|e| e.to_string())?;
    let mut body = BytesMut::from(&b"the secret is secret"[..]);
    let action = vm
        .on_response_body(&stream, &mut body, true)
        .map_err(|e| e.to_string())?;
    ensure!(action == Action::Continue, "action {action:?}");
    ensure!(
        &body[..] == b"the [redacted] is [redacted]",
        "body {:?}",
        String::from_utf8_lossy(&body)
    );
    vm.finish_stream(stream).map_err(|e| e.to_string())?;
    Ok(())
}

fn deny_with_403(h: &Harness) -> CaseResult {
    let (mut vm, logs) = h.start(guests::DENY, config("deny", "/admin"))?;
    let (action, _) = request(&mut vm, &[(":method", "GET"), (":path", "/admin/users")])?;
    let Action::Respond(response) = action else {
        return Err(format!("expected a local response, got {action:?}").into());
    };
    ensure!(
        response.status_code == 403,
        "status {}",
        response.status_code
    );
    ensure!(
        &response.body[..] == b"denied by policy\n",
        "body {:?}",
        response.body
    );
    let hdrs = pairs_of(&response.headers);
    ensure!(
        hdrs == [
            ("x-denied-by".into(), "filterbox-guest".into()),
            ("content-type".into(), "text/plain".into())
        ],
        "headers {hdrs:?}"
    );
    ensure!(
        response.grpc_status.is_none(),
        "grpc status {:?}",
        response.grpc_status
    );
    ensure!(
        logs.has(LogLevel::Warn, "denied /admin/users"),
        "logs {:?}",
        logs.messages()
    );
    let (action, _) = request(&mut vm, &[(":path", "/ok"), ("x-deny", "1")])?;
    ensure!(
        matches!(action, Action::Respond(_)),
        "x-deny header: {action:?}"
    );
    Ok(())
}

fn allow_other_paths(h: &Harness) -> CaseResult {
    let (mut vm, _) = h.start(guests::DENY, config("deny", "/admin"))?;
    let (action, out) = request(&mut vm, &[(":path", "/public")])?;
    ensure!(action == Action::Continue, "action {action:?}");
    ensure!(
        out == [(":path".into(), "/public".into())],
        "headers {out:?}"
    );
    Ok(())
}

fn log_every_level(h: &Harness) -> CaseResult {
    let (_, logs) = h.start(guests::LOGGER, config("logger", ""))?;
    for (level, name) in [
        (LogLevel::Trace, "trace"),
        (LogLevel::Debug, "debug"),
        (LogLevel::Info, "info"),
        (LogLevel::Warn, "warn"),
        (LogLevel::Error, "error"),
        (LogLevel::Critical, "critical"),
    ] {
        ensure!(
            logs.has(level, &format!("vm start at {name}")),
            "no {name} line in {:?}",
            logs.lines()
        );
    }
    Ok(())
}

fn log_wasi_stdio(h: &Harness) -> CaseResult {
    let (_, logs) = h.start(guests::LOGGER, config("logger", ""))?;
    ensure!(
        logs.has(LogLevel::Info, "hello from stdout"),
        "logs {:?}",
        logs.lines()
    );
    ensure!(
        logs.has(LogLevel::Error, "hello from stderr"),
        "logs {:?}",
        logs.lines()
    );
    Ok(())
}

fn log_on_log(h: &Harness) -> CaseResult {
    let (mut vm, logs) = h.start(guests::LOGGER, config("logger", ""))?;
    let stream = vm.create_http_stream().map_err(|e| e.to_string())?;
    let mut req = headers(&[(":path", "/x")]);
    vm.on_request_headers(&stream, &mut req, true)
        .map_err(|e| e.to_string())?;
    let mut resp = headers(&[(":status", "204")]);
    vm.on_response_headers(&stream, &mut resp, true)
        .map_err(|e| e.to_string())?;
    vm.on_log(&stream, &mut req, &mut resp)
        .map_err(|e| e.to_string())?;
    vm.finish_stream(stream).map_err(|e| e.to_string())?;
    ensure!(
        logs.has(LogLevel::Info, "request /x"),
        "logs {:?}",
        logs.messages()
    );
    ensure!(
        logs.has(LogLevel::Info, "log status 204"),
        "logs {:?}",
        logs.messages()
    );
    ensure!(
        pairs_of(&resp) == [(":status".to_string(), "204".to_string())],
        "headers handed back: {:?}",
        pairs_of(&resp)
    );
    Ok(())
}

fn guest_panic_fails_the_vm(h: &Harness) -> CaseResult {
    let (mut vm, logs) = h.start(guests::LOGGER, config("logger", ""))?;
    let stream = vm.create_http_stream().map_err(|e| e.to_string())?;
    let mut req = headers(&[(":path", "/"), ("x-panic", "1")]);
    match vm.on_request_headers(&stream, &mut req, true) {
        Err(VmError::Trap {
            callback: Callback::ProxyOnRequestHeaders,
            trap,
            ..
        }) => {
            ensure!(trap.kind == TrapKind::Unreachable, "trap {trap:?}");
        }
        other => return Err(format!("expected a trap, got {other:?}").into()),
    }
    ensure!(
        pairs_of(&req).len() == 2,
        "headers are handed back after a trap: {:?}",
        pairs_of(&req)
    );
    ensure!(
        logs.lines()
            .iter()
            .any(|(l, m)| *l == LogLevel::Critical && m.contains("asked to panic")),
        "the SDK's panic hook logs at critical: {:?}",
        logs.lines()
    );
    ensure!(vm.failure().is_some(), "VM not marked failed");
    match vm.create_http_stream() {
        Err(VmError::Failed { .. }) => {}
        other => return Err(format!("a failed VM must refuse new work, got {other:?}").into()),
    }
    vm.finish_stream(stream)
        .map_err(|e| format!("finishing on a failed VM: {e}"))?;
    Ok(())
}

/// Loads `wasm` with `config` and passes if the load fails with an error `check` accepts.
pub(crate) fn expect_load_error(
    h: &Harness,
    wasm: &[u8],
    config: PluginConfig,
    check: impl Fn(&PluginError) -> bool,
    what: &str,
) -> CaseResult {
    match h.load(wasm, config) {
        Ok(_) => Err(format!("loaded, expected {what}").into()),
        Err(e) if check(&e) => Ok(()),
        Err(e) => Err(format!("expected {what}, got: {e}").into()),
    }
}

fn no_marker_refused(h: &Harness) -> CaseResult {
    let wasm = wat_module(None, r#"(func (export "proxy_on_tick") (param i32))"#)?;
    expect_load_error(
        h,
        &wasm,
        PluginConfig::named("bad"),
        |e| {
            matches!(&e.reason, LoadError::Abi(AbiError::MissingAbiVersion { exports }) if exports.iter().any(|n| n == "proxy_on_tick"))
                && e_display(&e.reason).contains("proxy_on_tick")
        },
        "a missing-marker error naming the exports",
    )
}

fn e_display(e: &LoadError) -> String {
    match e {
        LoadError::Abi(a) => a.to_string(),
        other => format!("{other:?}"),
    }
}

fn unknown_marker_refused(h: &Harness) -> CaseResult {
    let wasm = wat_module(Some("proxy_abi_version_0_3_0"), "")?;
    expect_load_error(
        h,
        &wasm,
        PluginConfig::named("bad"),
        |e| matches!(&e.reason, LoadError::Abi(AbiError::UnknownAbiVersion { found, .. }) if found == "proxy_abi_version_0_3_0"),
        "an unknown-version error",
    )
}

fn missing_allocator_refused(h: &Harness) -> CaseResult {
    let wasm = wat::parse_str(
        r#"(module (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_1")))"#,
    )
    .map_err(|e| e.to_string())?;
    expect_load_error(
        h,
        &wasm,
        PluginConfig::named("bad"),
        |e| matches!(&e.reason, LoadError::Engine(EngineError::MissingExport(_))),
        "a missing-allocator error",
    )
}

fn unsupported_import_refused(h: &Harness) -> CaseResult {
    let wasm = wat::parse_str(
        r#"(module (import "env" "proxy_frobnicate" (func)) (memory (export "memory") 1)
            (func (export "proxy_abi_version_0_2_1")) (func (export "malloc") (param i32) (result i32) (i32.const 0)))"#,
    )
    .map_err(|e| e.to_string())?;
    expect_load_error(
        h,
        &wasm,
        PluginConfig::named("bad"),
        |e| matches!(&e.reason, LoadError::Engine(EngineError::UnsupportedImports(names)) if names == &["env.proxy_frobnicate"]),
        "an unsupported-import error naming it",
    )
}

/// Runs a hostile module whose `proxy_on_request_headers` does `body` (reporting statuses with
/// `$report`), and returns the statuses it reported, decoded from its log lines.
fn hostile_statuses(h: &Harness, body: &str) -> Result<Vec<u32>, Failure> {
    let wasm = wat_module(
        Some("proxy_abi_version_0_2_1"),
        &format!(
            r#"(data (i32.const 16) "x-key")
               (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) {body} (i32.const 0))"#
        ),
    )?;
    let (mut vm, logs) = h.start(&wasm, PluginConfig::named("hostile"))?;
    let stream = vm.create_http_stream().map_err(|e| e.to_string())?;
    let mut req = headers(&[("x-key", "value")]);
    let action = vm
        .on_request_headers(&stream, &mut req, true)
        .map_err(|e| format!("host failed the call: {e}"))?;
    ensure!(action == Action::Continue, "action {action:?}");
    ensure!(vm.failure().is_none(), "VM failed: {:?}", vm.failure());
    ensure!(
        pairs_of(&req) == [("x-key".to_string(), "value".to_string())],
        "headers changed: {:?}",
        pairs_of(&req)
    );
    // Only the one-letter lines are reports; the host may log other lines.
    let reports = logs.messages().into_iter().filter(|m| m.len() == 1);
    Ok(reports
        .filter_map(|m| m.bytes().next())
        .map(|b| u32::from(b.wrapping_sub(b'a')))
        .collect())
}

const INVALID_MEMORY_ACCESS: u32 = 6;
const BAD_ARGUMENT: u32 = 2;
const OK: u32 = 0;

fn hostile_out_of_bounds_read(h: &Harness) -> CaseResult {
    // One page is 65536 bytes: a message that starts inside and runs past the end.
    let statuses = hostile_statuses(
        h,
        "(call $report (call $log (i32.const 2) (i32.const 65530) (i32.const 100)))",
    )?;
    ensure!(statuses == [INVALID_MEMORY_ACCESS], "statuses {statuses:?}");
    Ok(())
}

fn hostile_pointer_overflow(h: &Harness) -> CaseResult {
    let statuses = hostile_statuses(
        h,
        "(call $report (call $log (i32.const 2) (i32.const -1) (i32.const 2)))
         (call $report (call $log (i32.const 2) (i32.const 8) (i32.const -1)))
         (call $report (call $add_header (i32.const 0) (i32.const 16) (i32.const 5) (i32.const -16) (i32.const 32)))",
    )?;
    ensure!(
        statuses == [INVALID_MEMORY_ACCESS; 3],
        "statuses {statuses:?}"
    );
    Ok(())
}

fn hostile_bad_out_pointer(h: &Harness) -> CaseResult {
    let statuses = hostile_statuses(
        h,
        "(call $report (call $get_header (i32.const 0) (i32.const 16) (i32.const 5) (i32.const 65534) (i32.const 100)))
         (call $report (call $get_pairs (i32.const 0) (i32.const 100) (i32.const -4)))
         (call $report (call $get_header (i32.const 0) (i32.const 16) (i32.const 5) (i32.const 100) (i32.const 104)))",
    )?;
    ensure!(
        statuses == [INVALID_MEMORY_ACCESS, INVALID_MEMORY_ACCESS, OK],
        "statuses {statuses:?}"
    );
    Ok(())
}

fn hostile_allocator(h: &Harness) -> CaseResult {
    // The allocator returns a block that runs past the end of memory, then a null pointer.
    let statuses = hostile_statuses(
        h,
        "(global.set $alloc_result (i32.const 65533))
         (call $report (call $get_header (i32.const 0) (i32.const 16) (i32.const 5) (i32.const 100) (i32.const 104)))
         (global.set $alloc_result (i32.const 0))
         (call $report (call $get_pairs (i32.const 0) (i32.const 100) (i32.const 104)))
         (global.set $alloc_result (i32.const -1))",
    )?;
    ensure!(
        statuses == [INVALID_MEMORY_ACCESS, INVALID_MEMORY_ACCESS],
        "statuses {statuses:?}"
    );
    Ok(())
}

fn hostile_bad_enums(h: &Harness) -> CaseResult {
    let statuses = hostile_statuses(
        h,
        "(call $report (call $get_pairs (i32.const 8) (i32.const 100) (i32.const 104)))
         (call $report (call $get_pairs (i32.const -1) (i32.const 100) (i32.const 104)))
         (call $report (call $log (i32.const 6) (i32.const 16) (i32.const 5)))
         (call $report (call $add_header (i32.const 4) (i32.const 16) (i32.const 5) (i32.const 16) (i32.const 5)))",
    )?;
    ensure!(statuses == [BAD_ARGUMENT; 4], "statuses {statuses:?}");
    Ok(())
}
