//! A rate limiter on shared data: at most `limit` requests per `window` seconds across every
//! VM (and, with a remote shared-state store, every proxy instance) with this plugin's vm_id.
//! The count lives under one key, `ratelimit`, as `<window index> <count>`, and is raised with
//! CAS: a write that lost a race reads again and retries. Past the limit: a local 429.
//!
//! Configuration: `limit=100 window=60 queue=events instance=a` (any order; `window=0`: one
//! window forever). When the store cannot be written (a CAS loop that never lands), the
//! request passes and its response carries `x-ratelimit: unavailable` (fail open).
//!
//! Queues, for the cross-instance tests: with `queue=NAME` the root registers that queue and,
//! on `proxy_on_queue_ready`, stores every message under `got:<instance>`. A request with
//! `x-enqueue: MSG` enqueues MSG on queue `events` of its own vm_id (answered 202, or 404 when
//! no instance registered it); `x-read: KEY` answers 200 with the value under KEY (404 if none).
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, Status};
use std::rc::Rc;
use std::time::UNIX_EPOCH;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

const KEY: &str = "ratelimit";
/// CAS attempts before the request is let through as "unavailable": enough for the races of
/// a few concurrent writers, few enough that a store that is away is given up on quickly.
const ATTEMPTS: usize = 16;

#[derive(Default)]
struct Settings {
    limit: u64,
    window: u64,
    instance: String,
}

#[derive(Default)]
struct Root {
    settings: Rc<Settings>,
    queue: Option<u32>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = String::from_utf8(self.get_plugin_configuration().unwrap_or_default()).unwrap_or_default();
        let mut settings = Settings { limit: 100, window: 60, instance: String::new() };
        for pair in config.split_whitespace() {
            match pair.split_once('=') {
                Some(("limit", v)) => settings.limit = v.parse().unwrap_or(settings.limit),
                Some(("window", v)) => settings.window = v.parse().unwrap_or(settings.window),
                Some(("instance", v)) => settings.instance = v.to_string(),
                Some(("queue", v)) => self.queue = Some(self.register_shared_queue(v)),
                _ => {}
            }
        }
        // The counter exists before traffic: a key that is absent can only be written without
        // CAS, and two first writers would both count from zero.
        if self.get_shared_data(KEY).0.is_none() {
            let _ = self.set_shared_data(KEY, Some(b"0 0"), None);
        }
        self.settings = Rc::new(settings);
        true
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        while let Ok(Some(message)) = self.dequeue_shared_queue(queue_id) {
            let key = format!("got:{}", self.settings.instance);
            let _ = self.set_shared_data(&key, Some(&message), None);
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Filter { settings: self.settings.clone(), unavailable: false }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Filter {
    settings: Rc<Settings>,
    unavailable: bool,
}

impl Context for Filter {}

enum Verdict {
    Pass,
    Limited,
    Unavailable,
}

impl Filter {
    fn count(&self) -> Verdict {
        let now = self.get_current_time().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let window = now.checked_div(self.settings.window).unwrap_or(0);
        for _ in 0..ATTEMPTS {
            let (value, cas) = self.get_shared_data(KEY);
            let text = value.map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_default();
            let mut parts = text.split(' ').map(|p| p.parse::<u64>().ok());
            let (stored_window, count) = match (parts.next().flatten(), parts.next().flatten()) {
                (Some(w), Some(c)) => (w, c),
                _ => (window, 0),
            };
            let count = if stored_window == window { count } else { 0 };
            if count >= self.settings.limit {
                return Verdict::Limited;
            }
            let next = format!("{window} {}", count + 1);
            match self.set_shared_data(KEY, Some(next.as_bytes()), cas) {
                Ok(()) => return Verdict::Pass,
                Err(Status::CasMismatch) => continue,
                Err(_) => return Verdict::Unavailable,
            }
        }
        Verdict::Unavailable
    }
}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if let Some(message) = self.get_http_request_header("x-enqueue") {
            let status = match self.resolve_shared_queue("", "events") {
                Some(queue) if self.enqueue_shared_queue(queue, Some(message.as_bytes())).is_ok() => 202,
                _ => 404,
            };
            self.send_http_response(status, vec![], None);
            return Action::Pause;
        }
        if let Some(key) = self.get_http_request_header("x-read") {
            match self.get_shared_data(&key).0 {
                Some(value) => self.send_http_response(200, vec![], Some(&value)),
                None => self.send_http_response(404, vec![], None),
            }
            return Action::Pause;
        }
        match self.count() {
            Verdict::Pass => Action::Continue,
            Verdict::Limited => {
                self.send_http_response(429, vec![("retry-after", "1")], Some(b"rate limited\n"));
                Action::Pause
            }
            Verdict::Unavailable => {
                self.unavailable = true;
                Action::Continue
            }
        }
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if self.unavailable {
            self.set_http_response_header("x-ratelimit", Some("unavailable"));
        }
        Action::Continue
    }
}
