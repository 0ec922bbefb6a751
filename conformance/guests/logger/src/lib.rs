//! Logs at every level on VM start, the request path on each request, the response status
//! in on_log, and through WASI stdout/stderr. A request with `x-panic` makes it panic.
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        for (level, name) in [
            (LogLevel::Trace, "trace"),
            (LogLevel::Debug, "debug"),
            (LogLevel::Info, "info"),
            (LogLevel::Warn, "warn"),
            (LogLevel::Error, "error"),
            (LogLevel::Critical, "critical"),
        ] {
            proxy_wasm::hostcalls::log(level, &format!("vm start at {name}")).ok();
        }
        println!("hello from stdout");
        eprintln!("hello from stderr");
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Filter))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Filter;

impl Context for Filter {}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if self.get_http_request_header("x-panic").is_some() {
            panic!("asked to panic");
        }
        let path = self.get_http_request_header(":path").unwrap_or_default();
        proxy_wasm::hostcalls::log(LogLevel::Info, &format!("request {path}")).ok();
        Action::Continue
    }

    fn on_log(&mut self) {
        let status = self.get_http_response_header(":status").unwrap_or_else(|| "none".into());
        proxy_wasm::hostcalls::log(LogLevel::Info, &format!("log status {status}")).ok();
    }
}
