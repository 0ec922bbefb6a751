//! proxy-wasm plugins in a [Pingora](https://github.com/cloudflare/pingora) proxy.
//!
//! Pingora runs an HTTP exchange as a series of phases of your [`ProxyHttp`]
//! (`request_filter`, `request_body_filter`, `response_filter`, …). This crate drives
//! filterbox's exchange core ([`filterbox::Exchange`]) from those phases, so that a chain of
//! proxy-wasm plugins sees the exchange as it would in Envoy. Two ways in:
//!
//! 1. [`WasmFilters`]: helpers you call from your own `ProxyHttp` methods, with the state of
//!    one exchange ([`WasmCtx`]) kept in your `CTX`;
//! 2. [`WasmProxy`]: a ready `ProxyHttp` that runs the chain around your
//!    [`UpstreamPeer`] logic.
//!
//! Threads: plugin callbacks run on the thread of the Pingora task that reaches the phase,
//! inline on a VM of the chain's slot when that slot is free (wasmtime, wasmi), otherwise on
//! the slot's own thread (wasmer, whose VMs never move threads, or a busy slot). Guest code
//! never blocks other exchanges of the same thread longer than one callback (bounded by the
//! plugin's deadline). With `ServerConf { threads: <cores>, work_stealing: false, .. }`
//! (a runtime per thread, as `filterbox serve` runs by default) an exchange never leaves its
//! thread, so it finds that thread's slot free; with work stealing an exchange moved to
//! another thread meets its slot busy there (`filterbox serve` measured both: BENCHMARKS.md).
//!
//! What differs from Envoy, because of Pingora's phases:
//! - Pingora's response body filter is synchronous. A plugin that pauses the response at its
//!   last body chunk (to answer it after an HTTP call) is waited for by blocking the thread
//!   that runs the phase, up to the chain's pause timeout. Run callouts on a runtime of their
//!   own (for [`filterbox::HyperCallouts`], a runtime handle other than Pingora's), so the
//!   answer can arrive while the thread waits.
//! - Trailers a plugin adds to a message that had none, and body bytes a plugin still holds
//!   when the response trailers arrive, cannot be sent through Pingora's filters: they are
//!   dropped with a warning.
//! - A plugin that answers after the response headers went out ends the response early
//!   (the client sees it cut), as Envoy resets such a stream.
//!
//! [`ProxyHttp`]: pingora::proxy::ProxyHttp

mod block;
mod ctx;
mod headers;
mod proxy;

pub use ctx::{WasmCtx, WasmFilters};
pub use proxy::{UpstreamPeer, WasmProxy};
