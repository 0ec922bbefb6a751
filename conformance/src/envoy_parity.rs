//! Behaviours where filterbox follows what Envoy does with real plugins rather than the letter
//! of the specification: a closed stream is reset whatever its callback returns, and a local
//! response wins over a resume sent in the same callback.

use crate::calls::{Dropping, imports};
use crate::ensure;
use crate::harness::{CaseResult, Harness, headers};
use crate::hostile::{OK, config, import_decl, module, reports};
use filterbox::abi::{Callback, Import, StreamType};
use filterbox::{Action, StreamEvent};
use std::sync::Arc;

fn vm_error(e: filterbox::VmError) -> crate::Failure {
    crate::Failure::Fail(e.to_string())
}

/// `proxy_close_stream` from a header callback that then returns Continue (the Rust SDK's
/// `reset_http_request()` does): the stream does not go on; it pauses with a `Close` event
/// for the embedder to reset it, as Envoy resets it.
pub(crate) fn close_stream_resets_whatever_the_callback_returns(h: &Harness) -> CaseResult {
    let wasm = module(
        &import_decl(Import::ProxyCloseStream),
        &[(
            Callback::ProxyOnRequestHeaders,
            "(call $report (call $proxy_close_stream (i32.const 0))) (i32.const 0)",
        )],
        "",
    )?;
    let (mut vm, logs) = h.start(&wasm, config("close"))?;
    let stream = vm.create_http_stream().map_err(vm_error)?;
    let action = vm
        .on_request_headers(&stream, &mut headers(&[(":path", "/")]), true)
        .map_err(vm_error)?;
    let events = vm.take_stream_events(&stream);
    vm.finish_stream(stream).map_err(vm_error)?;
    ensure!(reports(&logs) == [OK], "statuses {:?}", reports(&logs));
    ensure!(action == Action::Pause, "action {action:?}");
    ensure!(
        events == [StreamEvent::Close(StreamType::HttpRequest)],
        "events {events:?}"
    );
    Ok(())
}

/// In an HTTP call's answer, `proxy_send_local_response` and then `proxy_continue_stream`
/// for the same stream (the Rust SDK's `send_http_response(403, ..)` followed by
/// `resume_http_request()`): the stream gets the local response and no resume.
pub(crate) fn local_response_wins_over_a_resume_in_the_same_callback(h: &Harness) -> CaseResult {
    let imports = imports(&[
        Import::ProxyHttpCall,
        Import::ProxySetEffectiveContext,
        Import::ProxySendLocalResponse,
        Import::ProxyContinueStream,
    ]);
    let wasm = module(
        &imports,
        &[(
            Callback::ProxyOnRequestHeaders,
            "(global.set $stream (local.get 0))
             (call $report (call $proxy_http_call (i32.const 16) (i32.const 7)
                 (i32.const 64) (i32.const 67) (i32.const 0) (i32.const 0)
                 (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 8)))
             (i32.const 1)",
        )],
        r#"(global $stream (mut i32) (i32.const 0))
           (data (i32.const 16) "backend")
           (data (i32.const 64)
               "\03\00\00\00" "\07\00\00\00\03\00\00\00" "\05\00\00\00\01\00\00\00"
               "\0a\00\00\00\07\00\00\00"
               ":method\00GET\00" ":path\00/\00" ":authority\00backend\00")
           (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
               (call $report (call $proxy_set_effective_context (global.get $stream)))
               (call $report (call $proxy_send_local_response (i32.const 403) (i32.const 0) (i32.const 0)
                   (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const -1)))
               (call $report (call $proxy_continue_stream (i32.const 0))))"#,
    )?;
    let (plugin, logs) = h
        .load_with(&wasm, config("respond-then-resume"), |b| {
            b.callouts(Arc::new(Dropping))
        })
        .map_err(|e| format!("load failed: {e}"))?;
    let mut vm = filterbox::Vm::new(&plugin).map_err(vm_error)?;
    let stream = vm.create_http_stream().map_err(vm_error)?;
    let action = vm
        .on_request_headers(&stream, &mut headers(&[(":path", "/")]), true)
        .map_err(vm_error)?;
    ensure!(action == Action::Pause, "action {action:?}");
    vm.dispatch_pending().map_err(vm_error)?;
    let events = vm.take_stream_events(&stream);
    vm.finish_stream(stream).map_err(vm_error)?;
    ensure!(
        reports(&logs) == [OK, OK, OK, OK],
        "statuses {:?}",
        reports(&logs)
    );
    match events.as_slice() {
        [StreamEvent::Respond(r)] if r.status_code == 403 => Ok(()),
        other => Err(format!("events {other:?}").into()),
    }
}

/// Callback results beyond 0 and 1, as C++ SDK plugins return them and Envoy reads them: a
/// header callback's 2 (`ContinueAndEndStream`) continues and 3 (`StopAllIterationAndBuffer`)
/// stops; a body callback's 1 stops and keeps the body for the next call, 3
/// (`StopIterationNoBuffer`) stops and keeps nothing.
pub(crate) fn callback_results_read_as_envoy_reads_them(h: &Harness) -> CaseResult {
    // Each callback returns the value of the request header x-r, which it reads first.
    let result_of_header =
        "(drop (call $proxy_get_header_map_value (i32.const 0) (i32.const 16) (i32.const 3)
                               (i32.const 32) (i32.const 36)))
                           (i32.sub (i32.load8_u (i32.load (i32.const 32))) (i32.const 48))";
    let wasm = module(
        &import_decl(Import::ProxyGetHeaderMapValue),
        &[(Callback::ProxyOnRequestHeaders, result_of_header)],
        r#"(data (i32.const 16) "x-r")"#,
    )?;
    let (mut vm, _) = h.start(&wasm, config("results"))?;
    for (value, wanted) in [
        ("0", Action::Continue),
        ("1", Action::Pause),
        ("2", Action::Continue),
        ("3", Action::Pause),
        ("4", Action::Pause),
    ] {
        let stream = vm.create_http_stream().map_err(vm_error)?;
        let action = vm
            .on_request_headers(
                &stream,
                &mut headers(&[(":path", "/"), ("x-r", value)]),
                false,
            )
            .map_err(vm_error)?;
        vm.finish_stream(stream).map_err(vm_error)?;
        ensure!(action == wanted, "headers returning {value}: {action:?}");
    }
    // The body callback returns the body's first byte minus '0'.
    let wasm = module(
        &import_decl(Import::ProxyGetBufferBytes),
        &[(
            Callback::ProxyOnRequestBody,
            "(drop (call $proxy_get_buffer_bytes (i32.const 0) (i32.const 0) (i32.const 1)
                 (i32.const 32) (i32.const 36)))
             (i32.sub (i32.load8_u (i32.load (i32.const 32))) (i32.const 48))",
        )],
        "",
    )?;
    let (mut vm, _) = h.start(&wasm, config("body-results"))?;
    for (value, wanted, kept) in [
        ("1", Action::Pause, "1abc"),
        ("3", Action::Pause, ""),
        ("0", Action::Continue, "0abc"),
    ] {
        let stream = vm.create_http_stream().map_err(vm_error)?;
        let mut body = bytes::BytesMut::from(format!("{value}abc").as_bytes());
        let action = vm
            .on_request_body(&stream, &mut body, false)
            .map_err(vm_error)?;
        vm.finish_stream(stream).map_err(vm_error)?;
        ensure!(
            action == wanted && body == kept.as_bytes(),
            "body returning {value}: {action:?}, body left {body:?}"
        );
    }
    Ok(())
}

/// An ABI 0.1.0 module whose header callbacks take 0.2's third parameter (`end_of_stream`),
/// as early TinyGo SDK builds do: it loads, stays a 0.1.0 module for its hostcalls, and its
/// header callbacks get `end_of_stream`.
pub(crate) fn abi_0_1_0_header_callbacks_with_end_of_stream(h: &Harness) -> CaseResult {
    let wasm = crate::guests::wat_module(
        Some("proxy_abi_version_0_1_0"),
        r#"(func (export "proxy_on_context_create") (param i32 i32))
           (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
               (call $report (local.get 2)) (i32.const 0))
           (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
               (call $report (local.get 2)) (i32.const 0))"#,
    )?;
    let (mut vm, logs) = h.start(&wasm, config("tinygo-0-1-0"))?;
    ensure!(
        vm.plugin().abi_version() == filterbox::AbiVersion::V0_1_0,
        "ABI {:?}",
        vm.plugin().abi_version()
    );
    let stream = vm.create_http_stream().map_err(vm_error)?;
    vm.on_request_headers(&stream, &mut headers(&[(":path", "/")]), false)
        .map_err(vm_error)?;
    vm.on_response_headers(&stream, &mut headers(&[(":status", "200")]), true)
        .map_err(vm_error)?;
    vm.finish_stream(stream).map_err(vm_error)?;
    // `$report` logs 'a' + value: end_of_stream false, then true.
    ensure!(
        logs.messages() == ["a", "b"],
        "end_of_stream seen: {:?}",
        logs.messages()
    );
    Ok(())
}

/// WASI output written in pieces (Go's runtime writes a panic a few bytes at a time) is
/// logged a line at a time: pieces join until their newline, and what is left without one
/// is logged when the callback ends. Stdout logs at Info, stderr at Error.
pub(crate) fn output_lines_are_logged_whole(h: &Harness) -> CaseResult {
    // iovecs at 64: "par", "tial\nsec", "ond\nrest" (data at 16, 19, 27).
    let wasm = module(
        &import_decl(Import::FdWrite),
        &[(
            Callback::ProxyOnRequestHeaders,
            "(i32.store (i32.const 64) (i32.const 16)) (i32.store (i32.const 68) (i32.const 3))
             (i32.store (i32.const 72) (i32.const 19)) (i32.store (i32.const 76) (i32.const 8))
             (i32.store (i32.const 80) (i32.const 27)) (i32.store (i32.const 84) (i32.const 8))
             (drop (call $fd_write (i32.const 2) (i32.const 64) (i32.const 1) (i32.const 8)))
             (drop (call $fd_write (i32.const 2) (i32.const 72) (i32.const 2) (i32.const 8)))
             (drop (call $fd_write (i32.const 1) (i32.const 64) (i32.const 1) (i32.const 8)))
             (i32.const 0)",
        )],
        r#"(data (i32.const 16) "partial\nsecond\nrest")"#,
    )?;
    let (mut vm, logs) = h.start(&wasm, config("output"))?;
    let stream = vm.create_http_stream().map_err(vm_error)?;
    vm.on_request_headers(&stream, &mut headers(&[(":path", "/")]), true)
        .map_err(vm_error)?;
    vm.finish_stream(stream).map_err(vm_error)?;
    use filterbox::LogLevel::{Error, Info};
    let lines = logs.lines();
    // At the end of the callback, stdout's unfinished line is logged, then stderr's.
    let wanted = [
        (Error, "partial"),
        (Error, "second"),
        (Info, "par"),
        (Error, "rest"),
    ];
    ensure!(
        lines.len() == wanted.len()
            && lines
                .iter()
                .zip(wanted)
                .all(|((level, text), (l, t))| *level == l && text == t),
        "lines: {lines:?}"
    );
    Ok(())
}

/// A body callback with `end_of_stream` may add trailers to a message that had none (Envoy's
/// `addDecodedTrailers`/`addEncodedTrailers`, which the Rust SDK's trailer setters reach):
/// the embedder takes them to send after the body. Before the end of the body there is no
/// trailer map to add to (`BadArgument`).
pub(crate) fn trailers_added_at_the_end_of_the_body(h: &Harness) -> CaseResult {
    use filterbox::abi::MapType;
    let add = |map: u32| {
        format!(
            "(call $report (call $proxy_add_header_map_value (i32.const {map}) (i32.const 16)
                 (i32.const 3) (i32.const 24) (i32.const 2)))"
        )
    };
    let wasm = module(
        &import_decl(Import::ProxyAddHeaderMapValue),
        &[
            (
                Callback::ProxyOnRequestBody,
                &format!("{} (i32.const 0)", add(1)),
            ),
            (
                Callback::ProxyOnResponseBody,
                &format!("{} (i32.const 0)", add(3)),
            ),
        ],
        r#"(data (i32.const 16) "x-t") (data (i32.const 24) "ok")"#,
    )?;
    let (mut vm, logs) = h.start(&wasm, config("add-trailers"))?;
    let stream = vm.create_http_stream().map_err(vm_error)?;
    let mut body = bytes::BytesMut::from(&b"part"[..]);
    vm.on_request_body(&stream, &mut body, false)
        .map_err(vm_error)?;
    let early = vm.take_added_trailers(&stream, MapType::HttpRequestTrailers);
    vm.on_request_body(&stream, &mut body, true)
        .map_err(vm_error)?;
    let request = vm.take_added_trailers(&stream, MapType::HttpRequestTrailers);
    vm.on_response_body(&stream, &mut body, true)
        .map_err(vm_error)?;
    let response = vm.take_added_trailers(&stream, MapType::HttpResponseTrailers);
    vm.finish_stream(stream).map_err(vm_error)?;
    ensure!(
        reports(&logs) == [crate::hostile::BAD_ARGUMENT, OK, OK],
        "statuses {:?}",
        reports(&logs)
    );
    let is_ok =
        |t: &Option<filterbox::HeaderMap>| t.as_ref().and_then(|t| t.get_str("x-t")) == Some("ok");
    ensure!(
        early.is_none() && is_ok(&request) && is_ok(&response),
        "added: {early:?} {request:?} {response:?}"
    );
    Ok(())
}

/// Request headers are not readable from response callbacks, as in Envoy (Kong's host
/// allows it): a value lookup is `BadArgument`, the pairs read as empty.
pub(crate) fn request_headers_are_not_readable_in_the_response_phase(h: &Harness) -> CaseResult {
    let wasm = module(
        &imports(&[
            Import::ProxyGetHeaderMapValue,
            Import::ProxyGetHeaderMapPairs,
        ]),
        &[(
            Callback::ProxyOnResponseHeaders,
            "(call $report (call $proxy_get_header_map_value (i32.const 0) (i32.const 16)
                 (i32.const 5) (i32.const 32) (i32.const 36)))
             (call $report (call $proxy_get_header_map_pairs (i32.const 0) (i32.const 32)
                 (i32.const 36)))
             (call $report (i32.load (i32.const 36)))
             (i32.const 0)",
        )],
        r#"(data (i32.const 16) ":path")"#,
    )?;
    let (mut vm, logs) = h.start(&wasm, config("request-in-response"))?;
    let stream = vm.create_http_stream().map_err(vm_error)?;
    vm.on_request_headers(&stream, &mut headers(&[(":path", "/")]), true)
        .map_err(vm_error)?;
    vm.on_response_headers(&stream, &mut headers(&[(":status", "200")]), true)
        .map_err(vm_error)?;
    vm.finish_stream(stream).map_err(vm_error)?;
    ensure!(
        reports(&logs) == [crate::hostile::BAD_ARGUMENT, OK, 0],
        "statuses and size: {:?}",
        reports(&logs)
    );
    Ok(())
}

/// The same behaviours through a plugin built with the Rust SDK (`guests/parity`), as its
/// author writes them: `reset_http_request()` then `Continue` resets the stream;
/// `send_http_response(403)` then `resume_http_request()` in a call's answer sends the 403;
/// `add_http_response_trailer` at the end of the body adds a trailer (the SDK panics on
/// anything but `Ok`); a gRPC call with an invalid method gets `InternalFailure` (the SDK
/// panics on anything but that and `ParseFailure`).
pub(crate) fn rust_sdk_calls_as_envoy_answers_them(h: &Harness) -> CaseResult {
    use filterbox::abi::MapType;
    let start = |mode: &str| {
        let config = filterbox::PluginConfig::named(format!("parity-{mode}"))
            .with_configuration(mode.as_bytes().to_vec());
        crate::calls::start_with_servers(h, crate::guests::PARITY, config)
    };
    let request = || headers(&[(":method", "GET"), (":path", "/"), (":authority", "x")]);

    let (mut vm, logs) = start("reset")?;
    let stream = vm.create_http_stream().map_err(vm_error)?;
    let action = vm
        .on_request_headers(&stream, &mut request(), true)
        .map_err(vm_error)?;
    let events = vm.take_stream_events(&stream);
    ensure!(
        action == Action::Pause && events == [StreamEvent::Close(StreamType::HttpRequest)],
        "reset_http_request: {action:?}, events {events:?}, logs {:?}",
        logs.messages()
    );

    let (mut vm, logs) = start("deny-after-call")?;
    let stream = vm.create_http_stream().map_err(vm_error)?;
    let action = vm
        .on_request_headers(&stream, &mut request(), true)
        .map_err(vm_error)?;
    ensure!(
        action == Action::Pause,
        "the call did not pause: {action:?}"
    );
    let started = std::time::Instant::now();
    let mut events = Vec::new();
    while events.is_empty() && started.elapsed() < std::time::Duration::from_secs(30) {
        vm.wait_and_run(std::time::Duration::from_millis(50))
            .map_err(vm_error)?;
        events = vm.take_stream_events(&stream);
    }
    match events.as_slice() {
        [StreamEvent::Respond(r)]
            if r.status_code == 403 && r.headers.get_str("x-denied-by") == Some("parity") => {}
        other => {
            return Err(format!(
                "send_http_response then resume_http_request: events {other:?}, logs {:?}",
                logs.messages()
            )
            .into());
        }
    }

    let (mut vm, logs) = start("trailers")?;
    let stream = vm.create_http_stream().map_err(vm_error)?;
    vm.on_response_headers(&stream, &mut headers(&[(":status", "200")]), false)
        .map_err(vm_error)?;
    let mut body = bytes::BytesMut::from(&b"twelve bytes"[..]);
    vm.on_response_body(&stream, &mut body, true)
        .map_err(vm_error)?;
    let added = vm.take_added_trailers(&stream, MapType::HttpResponseTrailers);
    ensure!(
        added.as_ref().and_then(|t| t.get_str("x-body-bytes")) == Some("12"),
        "add_http_response_trailer at the end of the body: {added:?}, failure {:?}, logs {:?}",
        vm.failure(),
        logs.messages()
    );

    let (mut vm, logs) = start("grpc-bad-method")?;
    let stream = vm.create_http_stream().map_err(vm_error)?;
    let action = vm.on_request_headers(&stream, &mut request(), true);
    ensure!(
        matches!(action, Ok(Action::Continue))
            && logs
                .messages()
                .iter()
                .any(|m| m == "grpc call: InternalFailure"),
        "dispatch_grpc_call with a bad method: {action:?}, logs {:?}",
        logs.messages()
    );
    Ok(())
}

/// Envoy's `set_envoy_filter_state` foreign function (the SDKs' examples call it with a
/// serialized `SetEnvoyFilterStateArguments`): the value is then the property
/// `filter_state.<key>` for the plugin and for the embedder; arguments that are not that
/// message are `BadArgument`.
pub(crate) fn set_envoy_filter_state_is_read_as_a_property(h: &Harness) -> CaseResult {
    let call = |args: (u32, u32)| {
        format!(
            "(call $report (call $proxy_call_foreign_function (i32.const 16) (i32.const 22)
                 (i32.const {}) (i32.const {}) (i32.const 8) (i32.const 12)))",
            args.0, args.1
        )
    };
    let wasm = module(
        &imports(&[Import::ProxyCallForeignFunction, Import::ProxyGetProperty]),
        &[(
            Callback::ProxyOnRequestHeaders,
            &format!(
                "{}
                 (call $report (call $proxy_get_property (i32.const 96) (i32.const 19)
                     (i32.const 8) (i32.const 12)))
                 (drop (call $log (i32.const 2) (i32.load (i32.const 8)) (i32.load (i32.const 12))))
                 {}
                 (i32.const 0)",
                call((64, 17)),
                call((128, 1))
            ),
        )],
        r#"(data (i32.const 16) "set_envoy_filter_state")
           ;; path "my.key", value "hello", span 1
           (data (i32.const 64) "\0a\06my.key\12\05hello\18\01")
           (data (i32.const 96) "filter_state\00my.key")
           (data (i32.const 128) "\0b")"#,
    )?;
    let (mut vm, logs) = h.start(&wasm, config("filter-state"))?;
    let stream = vm.create_http_stream().map_err(vm_error)?;
    vm.on_request_headers(&stream, &mut headers(&[(":path", "/")]), true)
        .map_err(vm_error)?;
    let seen = vm.stream_property(&stream, &["filter_state", "my.key"]);
    vm.finish_stream(stream).map_err(vm_error)?;
    ensure!(
        reports(&logs) == [OK, OK, crate::hostile::BAD_ARGUMENT],
        "statuses {:?}",
        reports(&logs)
    );
    ensure!(
        logs.messages().iter().any(|m| m == "hello"),
        "the plugin did not read its filter state: {:?}",
        logs.messages()
    );
    ensure!(
        seen.as_deref() == Some(&b"hello"[..]),
        "the embedder reads {seen:?}"
    );
    Ok(())
}
