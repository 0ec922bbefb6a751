//! Header rewriting driven by the plugin configuration, one rule per line:
//!
//! ```text
//! add <name> <value>            add a request header
//! replace <name> <value>        replace (or add) a request header
//! remove <name>                 remove a request header
//! response-add <name> <value>   add a response header
//! copy-property <name> <path>   add a request header with a property's value (path in dots)
//! response-copy-property <name> <path>   the same for a response header
//! copy-vm-config <name>         add a request header with the VM configuration
//! copy-header <from> <to>       add request header <to> with the value of <from>, or "missing"
//! copy-shared <name> <key>      add a request header with shared data <key>, or "missing"
//! log-headers                   log every request and response header, and each stream's
//!                               end (what the Rust SDK's `http_headers` example does)
//! ```
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Clone)]
enum Rule {
    Add(String, String),
    Replace(String, String),
    Remove(String),
    ResponseAdd(String, String),
    CopyProperty(String, Vec<String>),
    ResponseCopyProperty(String, Vec<String>),
    CopyVmConfig(String),
    CopyHeader(String, String),
    CopyShared(String, String),
    LogHeaders,
}

#[derive(Default)]
struct Root {
    rules: Rc<Vec<Rule>>,
    vm_config: Rc<String>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        let bytes = self.get_vm_configuration().unwrap_or_default();
        self.vm_config = Rc::new(String::from_utf8_lossy(&bytes).into_owned());
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        let mut rules = Vec::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let words: Vec<&str> = line.splitn(3, ' ').collect();
            let rule = match words.as_slice() {
                ["add", n, v] => Rule::Add(n.to_string(), v.to_string()),
                ["replace", n, v] => Rule::Replace(n.to_string(), v.to_string()),
                ["remove", n] => Rule::Remove(n.to_string()),
                ["response-add", n, v] => Rule::ResponseAdd(n.to_string(), v.to_string()),
                ["copy-property", n, p] => Rule::CopyProperty(n.to_string(), p.split('.').map(String::from).collect()),
                ["response-copy-property", n, p] => {
                    Rule::ResponseCopyProperty(n.to_string(), p.split('.').map(String::from).collect())
                }
                ["copy-vm-config", n] => Rule::CopyVmConfig(n.to_string()),
                ["copy-header", from, to] => Rule::CopyHeader(from.to_string(), to.to_string()),
                ["copy-shared", n, key] => Rule::CopyShared(n.to_string(), key.to_string()),
                ["log-headers"] => Rule::LogHeaders,
                _ => {
                    proxy_wasm::hostcalls::log(LogLevel::Error, &format!("bad rule: {line}")).ok();
                    return false;
                }
            };
            rules.push(rule);
        }
        proxy_wasm::hostcalls::log(LogLevel::Info, &format!("configured {} rules", rules.len())).ok();
        self.rules = Rc::new(rules);
        true
    }

    fn create_http_context(&self, id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Filter { id, rules: self.rules.clone(), vm_config: self.vm_config.clone() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Filter {
    id: u32,
    rules: Rc<Vec<Rule>>,
    vm_config: Rc<String>,
}

impl Context for Filter {}

impl Filter {
    fn logs_headers(&self) -> bool {
        self.rules.iter().any(|rule| matches!(rule, Rule::LogHeaders))
    }

    fn log_headers(&self, headers: Vec<(String, String)>) {
        for (name, value) in headers {
            proxy_wasm::hostcalls::log(LogLevel::Info, &format!("#{} -> {name}: {value}", self.id)).ok();
        }
    }
}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        for rule in self.rules.iter() {
            match rule {
                Rule::Add(n, v) => self.add_http_request_header(n, v),
                Rule::Replace(n, v) => self.set_http_request_header(n, Some(v)),
                Rule::Remove(n) => self.set_http_request_header(n, None),
                Rule::CopyProperty(n, path) => {
                    let path: Vec<&str> = path.iter().map(String::as_str).collect();
                    let value = self.get_property(path).map(|v| String::from_utf8_lossy(&v).into_owned());
                    self.add_http_request_header(n, value.as_deref().unwrap_or("missing"));
                }
                Rule::CopyVmConfig(n) => {
                    let value = self.vm_config.clone();
                    self.add_http_request_header(n, &value);
                }
                Rule::CopyHeader(from, to) => {
                    let value = self.get_http_request_header(from);
                    self.add_http_request_header(to, value.as_deref().unwrap_or("missing"));
                }
                Rule::CopyShared(n, key) => {
                    let (value, _) = self.get_shared_data(key);
                    let value = value.map(|v| String::from_utf8_lossy(&v).into_owned());
                    self.add_http_request_header(n, value.as_deref().unwrap_or("missing"));
                }
                Rule::LogHeaders => self.log_headers(self.get_http_request_headers()),
                Rule::ResponseAdd(..) | Rule::ResponseCopyProperty(..) => {}
            }
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        for rule in self.rules.iter() {
            match rule {
                Rule::ResponseAdd(n, v) => self.add_http_response_header(n, v),
                Rule::ResponseCopyProperty(n, path) => {
                    let path: Vec<&str> = path.iter().map(String::as_str).collect();
                    let value = self.get_property(path).map(|v| String::from_utf8_lossy(&v).into_owned());
                    self.add_http_response_header(n, value.as_deref().unwrap_or("missing"));
                }
                Rule::LogHeaders => self.log_headers(self.get_http_response_headers()),
                _ => {}
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if self.logs_headers() {
            proxy_wasm::hostcalls::log(LogLevel::Info, &format!("#{} completed.", self.id)).ok();
        }
    }
}
