//! Stream lifecycle through the Rust-SDK header plugin on every built engine: context create,
//! request headers, response headers, log, done and delete; and VM start.

use criterion::{Criterion, criterion_group, criterion_main};
use filterbox::{EngineKind, HeaderMap, LogLevel, Plugin, PluginConfig, Vm};
use filterbox_conformance::guests;
use std::hint::black_box;

fn plugin(engine: EngineKind) -> Plugin {
    let config = PluginConfig::named("bench")
        .with_configuration("add x-request yes\nresponse-add x-response yes")
        .with_engine(engine)
        .with_log_level(LogLevel::Warn);
    Plugin::load(config, guests::HEADERS).expect("the header guest loads")
}

fn request_headers(extra: usize) -> HeaderMap {
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

fn stream_lifecycle(c: &mut Criterion) {
    for engine in EngineKind::built() {
        let plugin = plugin(engine);
        let mut vm = Vm::new(&plugin).expect("the VM starts");
        for extra in [0usize, 10, 50] {
            let request = request_headers(extra);
            let response: HeaderMap = [(":status", "200")].into_iter().collect();
            c.bench_function(
                &format!("{engine}/stream_lifecycle/{}_headers", request.len()),
                |b| {
                    b.iter(|| {
                        let stream = vm.create_http_stream().expect("stream");
                        let (mut req, mut resp) = (request.clone(), response.clone());
                        black_box(
                            vm.on_request_headers(&stream, &mut req, true)
                                .expect("request headers"),
                        );
                        black_box(
                            vm.on_response_headers(&stream, &mut resp, true)
                                .expect("response headers"),
                        );
                        vm.on_log(&stream, &mut req, &mut resp).expect("log");
                        vm.finish_stream(stream).expect("finish");
                    })
                },
            );
        }
        c.bench_function(&format!("{engine}/vm_start"), |b| {
            b.iter(|| black_box(Vm::new(&plugin).expect("the VM starts")))
        });
    }
}

criterion_group!(benches, stream_lifecycle);
criterion_main!(benches);
