//! Exercises the asynchronous ABI together: every request makes an HTTP call to upstream
//! `backend` (paused until it answers, then the answer's body becomes header `x-lookup`),
//! stores the path in shared data, counts in metrics and announces itself on a shared queue;
//! the root context ticks every 10 ms and, on its first tick, makes a unary gRPC call and
//! opens a gRPC stream to upstream `grpc`. Everything it sees goes to the log.
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

fn log(message: String) {
    hostcalls::log(LogLevel::Info, &message).ok();
}

#[derive(Default)]
struct Root {
    queue: u32,
    ticks: u32,
    ticks_gauge: u32,
    stream: Option<u32>,
}

impl Context for Root {
    fn on_grpc_call_response(&mut self, token: u32, status: u32, size: usize) {
        let body = self.get_grpc_call_response_body(0, size).unwrap_or_default();
        log(format!("grpc unary status {status} body {}", String::from_utf8_lossy(&body)));
        let _ = token;
    }

    fn on_grpc_stream_initial_metadata(&mut self, _token: u32, _n: u32) {
        let value = self.get_grpc_stream_initial_metadata_value("x-echo").unwrap_or_default();
        log(format!("grpc stream metadata x-echo={}", String::from_utf8_lossy(&value)));
    }

    fn on_grpc_stream_message(&mut self, token: u32, size: usize) {
        let body = self.get_grpc_stream_message(0, size).unwrap_or_default();
        log(format!("grpc stream message {}", String::from_utf8_lossy(&body)));
        // One answer is enough: half-close, the server then ends the stream.
        self.close_grpc_stream(token);
    }

    fn on_grpc_stream_trailing_metadata(&mut self, _token: u32, n: u32) {
        log(format!("grpc stream trailers {n}"));
    }

    fn on_grpc_stream_close(&mut self, _token: u32, status: u32) {
        log(format!("grpc stream close {status}"));
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        self.queue = self.register_shared_queue("events");
        self.ticks_gauge = hostcalls::define_metric(MetricType::Gauge, "ticks").unwrap_or(0);
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        self.set_tick_period(Duration::from_millis(10));
        true
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        hostcalls::increment_metric(self.ticks_gauge, 1).ok();
        if self.ticks == 1 {
            match self.dispatch_grpc_call(
                "grpc",
                "test.Echo",
                "Unary",
                vec![("x-call", b"unary")],
                Some(b"hello"),
                Duration::from_secs(5),
            ) {
                Ok(_) => log("grpc unary sent".into()),
                Err(e) => log(format!("grpc unary failed {e:?}")),
            }
            match self.open_grpc_stream("grpc", "test.Echo", "Stream", vec![("x-echo", b"yes")]) {
                Ok(token) => {
                    self.send_grpc_stream_message(token, Some(b"ping"), false);
                    self.stream = Some(token);
                }
                Err(e) => log(format!("grpc stream failed {e:?}")),
            }
        }
    }

    fn on_queue_ready(&mut self, queue: u32) {
        while let Ok(Some(message)) = self.dequeue_shared_queue(queue) {
            log(format!("queue {}", String::from_utf8_lossy(&message)));
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        let requests = hostcalls::define_metric(MetricType::Counter, "requests").unwrap_or(0);
        let sizes = hostcalls::define_metric(MetricType::Histogram, "lookup_bytes").unwrap_or(0);
        Some(Box::new(Filter { queue: self.queue, requests, sizes }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Filter {
    queue: u32,
    requests: u32,
    sizes: u32,
}

impl Context for Filter {
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, size: usize, _trailers: usize) {
        let status = self.get_http_call_response_header(":status").unwrap_or_default();
        let body = self.get_http_call_response_body(0, size).unwrap_or_default();
        let body = String::from_utf8_lossy(&body).into_owned();
        hostcalls::record_metric(self.sizes, size as u64).ok();
        self.set_http_request_header("x-lookup", Some(&format!("{status} {body}")));
        self.resume_http_request();
    }
}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        hostcalls::increment_metric(self.requests, 1).ok();
        let path = self.get_http_request_header(":path").unwrap_or_default();
        // A CAS update: read the token, write with it.
        let (_, cas) = self.get_shared_data("last_path");
        if let Err(e) = self.set_shared_data("last_path", Some(path.as_bytes()), cas) {
            log(format!("shared data failed {e:?}"));
        }
        self.enqueue_shared_queue(self.queue, Some(format!("seen {path}").as_bytes())).ok();
        let headers = vec![(":method", "GET"), (":path", "/lookup"), (":authority", "backend")];
        match self.dispatch_http_call("backend", headers, None, vec![], Duration::from_secs(5)) {
            Ok(_) => Action::Pause,
            Err(e) => {
                log(format!("http call failed {e:?}"));
                Action::Continue
            }
        }
    }
}
