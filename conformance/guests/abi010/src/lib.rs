//! An ABI 0.1.0 plugin (the `proxy-wasm` crate 0.1.x): logs its configuration (read with
//! `proxy_get_configuration`), adds `x-abi: 0.1.0` to requests, and on `/pause` pauses the
//! request on an HTTP call to `backend`, resuming it with `proxy_continue_request`.
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, LogLevel};
use std::time::Duration;

#[unsafe(no_mangle)]
pub fn _start() {
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Filter) });
}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_configuration().unwrap_or_default();
        proxy_wasm::hostcalls::log(
            LogLevel::Info,
            &format!("configuration {}", String::from_utf8_lossy(&config)),
        )
        .ok();
        true
    }
}

struct Filter;

impl Context for Filter {
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, size: usize, _t: usize) {
        let body = self.get_http_call_response_body(0, size).unwrap_or_default();
        self.set_http_request_header("x-lookup", Some(&String::from_utf8_lossy(&body)));
        self.resume_http_request();
    }
}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _num_headers: usize) -> Action {
        self.add_http_request_header("x-abi", "0.1.0");
        if self.get_http_request_header(":path").as_deref() == Some("/pause") {
            let headers = vec![(":method", "GET"), (":path", "/lookup"), (":authority", "b")];
            if self
                .dispatch_http_call("backend", headers, None, vec![], Duration::from_secs(5))
                .is_ok()
            {
                return Action::Pause;
            }
        }
        Action::Continue
    }
}
