//! Envoy-parity guest: Rust-SDK calls whose effect Envoy defines, one behaviour per
//! configuration (the plugin configuration is the mode's name):
//!
//! - `reset`: `reset_http_request()` in the request headers, then `Continue`;
//! - `deny-after-call`: an HTTP call to `backend`; in its answer `send_http_response(403)`
//!   then `resume_http_request()`;
//! - `ratelimit`: answers 429 from the request headers, and adds `retry-after: 1` in its
//!   response headers (which Envoy runs for a local reply too);
//! - `trailers`: at the end of the response body adds the trailer `x-body-bytes`;
//! - `grpc-bad-method`: a gRPC call with a method name that is not one, logging the status;
//! - `service`: a root context only (a service plugin): every 10 ms tick stores the number of
//!   ticks so far in shared data `service-ticks`.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { mode: String::new(), ticks: 0 })
    });
}}

struct Root {
    mode: String,
    ticks: u64,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        self.mode = String::from_utf8_lossy(&bytes).trim().to_owned();
        if self.mode == "service" {
            self.set_tick_period(Duration::from_millis(10));
        }
        true
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        let ticks = self.ticks.to_string();
        if let Err(status) = self.set_shared_data("service-ticks", Some(ticks.as_bytes()), None) {
            proxy_wasm::hostcalls::log(LogLevel::Error, &format!("set_shared_data: {status:?}")).ok();
        }
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            mode: self.mode.clone(),
            body_bytes: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    mode: String,
    body_bytes: usize,
}

impl Context for Stream {
    fn on_http_call_response(&mut self, _: u32, _: usize, _: usize, _: usize) {
        if self.mode == "deny-after-call" {
            self.send_http_response(403, vec![("x-denied-by", "parity")], Some(b"denied\n"));
            self.resume_http_request();
        }
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        match self.mode.as_str() {
            "reset" => {
                self.reset_http_request();
                Action::Continue
            }
            "deny-after-call" => {
                let headers = vec![(":method", "GET"), (":path", "/check"), (":authority", "backend")];
                match self.dispatch_http_call("backend", headers, None, vec![], Duration::from_secs(5)) {
                    Ok(_) => Action::Pause,
                    Err(status) => {
                        proxy_wasm::hostcalls::log(LogLevel::Error, &format!("call: {status:?}")).ok();
                        Action::Continue
                    }
                }
            }
            "ratelimit" => {
                self.send_http_response(429, vec![], Some(b"slow down\n"));
                Action::Pause
            }
            "grpc-bad-method" => {
                let result = self.dispatch_grpc_call(
                    "backend",
                    "svc.Service",
                    "bad method",
                    vec![],
                    Some(b"m"),
                    Duration::from_secs(1),
                );
                let line = match result {
                    Ok(_) => "grpc call: Ok".to_owned(),
                    Err(status) => format!("grpc call: {status:?}"),
                };
                proxy_wasm::hostcalls::log(LogLevel::Info, &line).ok();
                Action::Continue
            }
            _ => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        if self.mode == "ratelimit" {
            self.add_http_response_header("retry-after", "1");
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if self.mode == "trailers" {
            self.body_bytes = size;
            if end_of_stream {
                self.add_http_response_trailer("x-body-bytes", &self.body_bytes.to_string());
            }
        }
        Action::Continue
    }
}
