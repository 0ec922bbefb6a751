//! The same plugins and inputs on every built engine give the same observable results:
//! actions, headers, bodies, local responses, logs and trap classes.

use bytes::BytesMut;
use filterbox::{EngineKind, LogLevel, PluginConfig, Vm};
use filterbox_conformance::{Harness, guests, headers, pairs_of};

/// Everything a proxy could observe from one scripted exchange, as text.
fn observe(
    engine: EngineKind,
    wasm: &[u8],
    configuration: &str,
    request: &[(&str, &str)],
    body: &[u8],
) -> Vec<String> {
    let harness = Harness::new(engine).expect("engine is built");
    let config = PluginConfig::named("diff")
        .with_configuration(configuration)
        .with_log_level(LogLevel::Trace);
    let (plugin, logs) = harness.load(wasm, config).expect("loads");
    let mut seen = Vec::new();
    let mut vm = match Vm::new(&plugin) {
        Ok(vm) => vm,
        Err(e) => return vec![format!("start: {e}")],
    };
    let stream = vm.create_http_stream().expect("stream");
    let mut req = headers(request);
    seen.push(format!(
        "request headers: {:?}",
        vm.on_request_headers(&stream, &mut req, body.is_empty())
            .map_err(|e| e.to_string())
    ));
    seen.push(format!("after: {:?}", pairs_of(&req)));
    if !body.is_empty() {
        let mut chunk = BytesMut::from(body);
        seen.push(format!(
            "request body: {:?}",
            vm.on_request_body(&stream, &mut chunk, true)
                .map_err(|e| e.to_string())
        ));
        seen.push(format!("body after: {:?}", chunk));
    }
    let mut resp = headers(&[(":status", "200")]);
    seen.push(format!(
        "response headers: {:?}",
        vm.on_response_headers(&stream, &mut resp, true)
            .map_err(|e| e.to_string())
    ));
    seen.push(format!("after: {:?}", pairs_of(&resp)));
    seen.push(format!(
        "log: {:?}",
        vm.on_log(&stream, &mut req, &mut resp)
            .map_err(|e| e.to_string())
    ));
    seen.push(format!(
        "finish: {:?}",
        vm.finish_stream(stream).map_err(|e| e.to_string())
    ));
    seen.extend(
        logs.lines()
            .into_iter()
            .map(|(level, message)| format!("log {level}: {message}")),
    );
    seen
}

/// One scripted exchange: name, plugin, its configuration, request headers, request body.
type Script<'a> = (
    &'a str,
    &'a [u8],
    &'a str,
    &'a [(&'a str, &'a str)],
    &'a [u8],
);

#[test]
fn every_engine_observes_the_same() {
    let engines = EngineKind::built();
    let scripts: &[Script<'_>] = &[
        (
            "headers",
            guests::HEADERS,
            "add x-a 1\nreplace x-b 2\nremove x-c\nresponse-add x-r 3\ncopy-property x-n plugin_name",
            &[(":path", "/"), ("x-b", "old"), ("x-c", "gone")],
            b"",
        ),
        (
            "body",
            guests::BODY,
            "a=>bb",
            &[(":path", "/upload")],
            b"banana",
        ),
        (
            "deny",
            guests::DENY,
            "/admin",
            &[(":path", "/admin/x")],
            b"",
        ),
        (
            "deny-allow",
            guests::DENY,
            "/admin",
            &[(":path", "/public")],
            b"",
        ),
        ("logger", guests::LOGGER, "", &[(":path", "/hello")], b""),
        (
            "logger-panic",
            guests::LOGGER,
            "",
            &[(":path", "/"), ("x-panic", "1")],
            b"",
        ),
        ("bad-config", guests::HEADERS, "nonsense", &[], b""),
    ];
    // What each script's transcript must show on the first engine, so that the engines
    // agree on the plugin doing its work rather than on all failing alike.
    let shows: &[(&str, &str)] = &[
        ("headers", r#"("x-a", "1")"#),
        ("body", "bbbnbbnbb"),
        ("deny", "status_code: 403"),
        ("deny-allow", "request headers: Ok(Continue)"),
        ("logger", "/hello"),
        ("logger-panic", "unreachable trap"),
        ("bad-config", "start: "),
    ];
    for (name, wasm, configuration, request, body) in scripts {
        let reference = observe(engines[0], wasm, configuration, request, body);
        let wanted = shows
            .iter()
            .find(|(script, _)| script == name)
            .map(|(_, text)| *text)
            .unwrap_or_else(|| panic!("{name}: no expected observation"));
        assert!(
            reference.iter().any(|line| line.contains(wanted)),
            "{name} on {}: {wanted:?} is not in {reference:?}",
            engines[0]
        );
        for &engine in &engines[1..] {
            let other = observe(engine, wasm, configuration, request, body);
            // Trap messages are the engines' own words; compare everything up to them.
            let normalize = |lines: &[String]| -> Vec<String> {
                lines
                    .iter()
                    .map(|l| l.split(" trap: ").next().unwrap_or(l).to_owned())
                    .collect()
            };
            assert_eq!(
                normalize(&reference),
                normalize(&other),
                "{name}: {} and {engine} differ",
                engines[0]
            );
        }
    }
}
