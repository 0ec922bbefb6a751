//! filterbox against `proxy-wasm-host` 0.2.0 (wasmtime 49), the other Rust host library, on
//! the same guest bytes and the same callback sequence, in interleaved rounds in one process:
//!
//! ```sh
//! cargo build --release -p filterbox-conformance        # builds the guests
//! cd benches/peer && cargo run --release --ignore-rust-version -- \
//!     ../../target/guests/wasm32-wasip1/release/guest_headers.wasm
//! ```
//!
//! The guest is the suite's Rust-SDK header plugin configured to add one request and one
//! response header. A lifecycle is: context create, request headers, response headers, done,
//! log, delete. Each round times each host for about a second per scenario; the medians of the
//! rounds are printed with their ratio.

use proxy_wasm_host::abi::v0_2_1::types::{Action, LogLevel, MapType, Status};
use proxy_wasm_host::abi::v0_2_1::{
    Access, ContextId, Guest, Host, Invocation, LogContext, LogSink, PluginConfig, Started,
    StreamState, VmServices,
};
use proxy_wasm_host::{HeaderMap as PeerMap, Limits, Module, VecHeaderMap};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CONFIGURATION: &str = "add x-request yes\nresponse-add x-response yes";
const ROUNDS: usize = 7;

fn request(extra: usize) -> Vec<(String, String)> {
    let mut headers = vec![
        (":method".to_owned(), "GET".to_owned()),
        (":path".to_owned(), "/index.html".to_owned()),
        (":authority".to_owned(), "example.test".to_owned()),
    ];
    for i in 0..extra {
        headers.push((format!("x-extra-{i}"), format!("value {i}")));
    }
    headers
}

fn response() -> Vec<(String, String)> {
    vec![
        (":status".to_owned(), "200".to_owned()),
        ("content-type".to_owned(), "text/html".to_owned()),
    ]
}

/// Nanoseconds per call of `run`: the median of 9 batches filling `budget`.
fn time(run: &mut dyn FnMut(), budget: Duration) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget / 10 {
        run();
        n += 1;
    }
    let per = start.elapsed().as_secs_f64() / n.max(1) as f64;
    let batch = ((budget.as_secs_f64() / 9.0 / per) as u64).max(1);
    let mut times: Vec<f64> = (0..9)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..batch {
                run();
            }
            t.elapsed().as_secs_f64() * 1e9 / batch as f64
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[4]
}

// --- filterbox ---

fn filterbox_plugin(wasm: &[u8]) -> filterbox::Plugin {
    let config = filterbox::PluginConfig::named("bench").with_configuration(CONFIGURATION);
    filterbox::Plugin::load(config, wasm).expect("filterbox loads the guest")
}

/// Each host's maps are built once and cloned per exchange (as a proxy hands over the maps it
/// parsed), so neither side's timing includes building them from strings.
fn filterbox_lifecycle(
    vm: &mut filterbox::Vm,
    (request, response): &(filterbox::HeaderMap, filterbox::HeaderMap),
) {
    let mut req = request.clone();
    let mut resp = response.clone();
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
    assert!(req.get("x-request").is_some() && resp.get("x-response").is_some());
}

// --- proxy-wasm-host ---

struct Quiet;

impl LogSink for Quiet {
    fn log(&self, _: LogContext<'_>, _: LogLevel, _: &[u8]) {}
}

/// The peer's stream: it lends the maps to the guest.
struct Exchange {
    request: VecHeaderMap,
    response: VecHeaderMap,
}

impl StreamState for Exchange {
    fn header_map(
        &mut self,
        _: Invocation,
        _: Access,
        map: MapType,
    ) -> Result<&mut dyn PeerMap, Status> {
        match map {
            MapType::HttpRequestHeaders => Ok(&mut self.request),
            MapType::HttpResponseHeaders => Ok(&mut self.response),
            _ => Err(Status::NotFound),
        }
    }
}

fn pairs(list: Vec<(String, String)>) -> VecHeaderMap {
    list.into_iter()
        .map(|(k, v)| (k.into_bytes(), v.into_bytes()))
        .collect()
}

struct Peer {
    host: Host,
    module: Module,
}

impl Peer {
    fn new(wasm: &[u8]) -> Peer {
        let engine = proxy_wasm_host::Engine::new().expect("peer engine");
        let module = Module::new(&engine, wasm).expect("peer compiles the guest");
        let host = Host::new(&engine).expect("peer host");
        Peer { host, module }
    }

    fn guest(&self) -> (Guest, ContextId) {
        let services = VmServices::new(Arc::new(Quiet));
        let mut guest =
            Guest::new(&self.host, &self.module, services, &Limits::default()).expect("guest");
        let config = PluginConfig::new().with_configuration(CONFIGURATION);
        match guest.start(config).expect("peer starts the guest") {
            Started::Serving(root) => (guest, root),
            _ => panic!("the guest refused its start on the peer"),
        }
    }
}

fn peer_lifecycle(guest: &mut Guest, root: ContextId, maps: &(VecHeaderMap, VecHeaderMap, u32)) {
    let (request, response, n_request) = maps;
    let exchange = Exchange {
        request: request.clone(),
        response: response.clone(),
    };
    let n_request = *n_request;
    let (answer, _exchange) = guest.with(exchange, |scope| {
        let stream = scope.on_context_create(Some(root))?;
        let a = scope.on_request_headers(stream, n_request, true)?;
        let b = scope.on_response_headers(stream, 2, true)?;
        scope.on_done(stream)?;
        scope.on_log(stream)?;
        scope.on_delete(stream)?;
        Ok::<_, proxy_wasm_host::abi::v0_2_1::GuestError>((a, b))
    });
    let (a, b) = answer.expect("peer lifecycle");
    assert!(a == Action::Continue && b == Action::Continue);
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn human(ns: f64) -> String {
    if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: filterbox-peer-bench path/to/guest_headers.wasm");
    let wasm = std::fs::read(&path).expect("reading the guest");
    let budget = Duration::from_millis(800);
    let plugin = filterbox_plugin(&wasm);
    let peer = Peer::new(&wasm);

    let mut rows: Vec<(String, Vec<f64>, Vec<f64>)> = Vec::new();
    for extra in [0usize, 10] {
        let list = request(extra);
        let name = format!("lifecycle, {} request headers", list.len());
        rows.push((name, Vec::new(), Vec::new()));
    }
    rows.push(("new VM + start + drop".to_owned(), Vec::new(), Vec::new()));

    for round in 0..ROUNDS {
        eprintln!("round {}/{ROUNDS}", round + 1);
        for (row, extra) in [0usize, 10].into_iter().enumerate() {
            let list = request(extra);
            let ours: (filterbox::HeaderMap, filterbox::HeaderMap) = (
                list.clone().into_iter().collect(),
                response().into_iter().collect(),
            );
            let theirs = (pairs(list.clone()), pairs(response()), list.len() as u32);
            let mut vm = filterbox::Vm::new(&plugin).expect("vm");
            let (mut guest, root) = peer.guest();
            let mut ours_run = || filterbox_lifecycle(&mut vm, &ours);
            let mut theirs_run = || peer_lifecycle(&mut guest, root, &theirs);
            // Who goes first alternates, so neither always meets a cold cache or clock.
            let (f, p) = match round % 2 {
                0 => {
                    let f = time(&mut ours_run, budget);
                    (f, time(&mut theirs_run, budget))
                }
                _ => {
                    let p = time(&mut theirs_run, budget);
                    (time(&mut ours_run, budget), p)
                }
            };
            rows[row].1.push(f);
            rows[row].2.push(p);
        }
        let mut ours_new = || drop(black_box(filterbox::Vm::new(&plugin).expect("vm")));
        let mut theirs_new = || drop(black_box(peer.guest()));
        let (f, p) = match round % 2 {
            0 => {
                let f = time(&mut ours_new, budget);
                (f, time(&mut theirs_new, budget))
            }
            _ => {
                let p = time(&mut theirs_new, budget);
                (time(&mut ours_new, budget), p)
            }
        };
        rows[2].1.push(f);
        rows[2].2.push(p);
    }

    println!("| scenario | filterbox | proxy-wasm-host 0.2.0 | filterbox / peer |");
    println!("|---|---|---|---|");
    for (name, ours, theirs) in rows {
        let (f, p) = (median(ours), median(theirs));
        println!("| {name} | {} | {} | {:.2}× |", human(f), human(p), f / p);
    }
}
