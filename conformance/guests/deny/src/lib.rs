//! Denies requests whose `:path` starts with the configured prefix, or that carry
//! `x-deny`, with a local 403 response.
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default)]
struct Root {
    prefix: Rc<String>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = String::from_utf8(self.get_plugin_configuration().unwrap_or_default()).unwrap_or_default();
        self.prefix = Rc::new(if config.is_empty() { "/admin".to_string() } else { config });
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Filter { prefix: self.prefix.clone() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Filter {
    prefix: Rc<String>,
}

impl Context for Filter {}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        if path.starts_with(self.prefix.as_str()) || self.get_http_request_header("x-deny").is_some() {
            proxy_wasm::hostcalls::log(LogLevel::Warn, &format!("denied {path}")).ok();
            self.send_http_response(403, vec![("x-denied-by", "filterbox-guest"), ("content-type", "text/plain")], Some(b"denied by policy\n"));
            return Action::Pause;
        }
        Action::Continue
    }
}
