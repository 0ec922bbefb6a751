//! Buffers the whole body in each direction, then replaces every `<from>` with `<to>`
//! (configuration `<from>=><to>`) and reports the sizes it saw in `x-body-size`.
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default)]
struct Root {
    rewrite: Rc<(String, String)>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = String::from_utf8(self.get_plugin_configuration().unwrap_or_default()).unwrap_or_default();
        match config.split_once("=>") {
            Some((from, to)) if !from.is_empty() => {
                self.rewrite = Rc::new((from.to_string(), to.to_string()));
                true
            }
            _ => false,
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Filter { rewrite: self.rewrite.clone() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Filter {
    rewrite: Rc<(String, String)>,
}

impl Filter {
    fn rewrite(&self, body: &[u8]) -> Vec<u8> {
        String::from_utf8_lossy(body).replace(&self.rewrite.0, &self.rewrite.1).into_bytes()
    }
}

impl Context for Filter {}

impl HttpContext for Filter {
    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, size).unwrap_or_default();
        let new = self.rewrite(&body);
        self.set_http_request_body(0, size, &new);
        proxy_wasm::hostcalls::log(LogLevel::Info, &format!("request body {} -> {} bytes", size, new.len())).ok();
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            return Action::Pause;
        }
        let body = self.get_http_response_body(0, size).unwrap_or_default();
        let new = self.rewrite(&body);
        self.set_http_response_body(0, size, &new);
        Action::Continue
    }
}
