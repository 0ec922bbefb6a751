//! filterbox: a proxy-wasm host runtime for Rust proxies.
//!
//! Load a plugin built with any proxy-wasm SDK (ABI 0.1.0, 0.2.0 or 0.2.1), start a [`Vm`] per
//! worker thread, and drive each HTTP stream through it:
//!
//! ```no_run
//! use filterbox::{Action, HeaderMap, Plugin, PluginConfig, Vm};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let wasm = std::fs::read("plugin.wasm")?;
//! let plugin = Plugin::load(PluginConfig::named("add-header"), &wasm)?; // Send + Sync
//! let mut vm = Vm::new(&plugin)?; // one per worker thread
//!
//! let stream = vm.create_http_stream()?;
//! let mut headers: HeaderMap = [(":method", "GET"), (":path", "/")].into_iter().collect();
//! match vm.on_request_headers(&stream, &mut headers, true)? {
//!     Action::Continue => { /* forward `headers` upstream */ }
//!     Action::Pause => { /* hold the request until the plugin resumes it */ }
//!     Action::Respond(response) => { /* answer with response.status_code, response.body */ }
//! }
//! vm.finish_stream(stream)?;
//! # Ok(()) }
//! ```
//!
//! In a tower or hyper service, [`FilterLayer`] (feature `tower`) does this for a whole chain
//! of plugins: a [`FilterChain`] runs one VM per plugin on each of its slot threads, and each
//! exchange goes through the request phase, the inner service and the response phase, with
//! pauses, local responses and body buffering as the ABI describes.
//!
//! A plugin that serves no streams (Envoy's bootstrap `WasmService`: a queue receiver, a
//! fetcher that keeps shared data fresh) runs as a [`Service`] on a thread of its own.
//!
//! A [`Vm`] that traps stays failed. [`Worker`] wraps one for a worker thread: it applies the
//! plugin's [`FailurePolicy`] to the streams a failed VM cannot serve, rebuilds the VM with
//! backoff up to a crash-loop limit, and counts everything in [`HostMetrics`]. Every VM runs
//! under the plugin's [`Limits`]: memory and table ceilings, and a deadline per callback.
//!
//! Every hostcall and callback of ABI 0.1.0, 0.2.0 and 0.2.1 is implemented: HTTP and gRPC
//! callouts go through the plugin's [`Callouts`] ([`HyperCallouts`] by default with the
//! `hyper-client` feature), shared data and queues through a [`SharedState`], plugin metrics
//! into a [`MetricRegistry`]; events that arrive from other threads wait in the VM until
//! [`Vm::dispatch_pending`] (or [`Vm::run_due`], [`Vm::wait_and_run`]) delivers them on the
//! VM's thread. WASI functions no plugin may use (files, sockets) answer `ENOSYS`. Choices
//! where the spec and the reference host differ are documented on the hostcalls and in the
//! README.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod attributes;
mod callout;
mod callouts;
#[cfg(feature = "tower")]
mod chain;
mod config;
mod embedder;
mod foreign;
mod headers;
mod hostcalls;
#[cfg(feature = "http")]
mod http_parts;
#[cfg(feature = "hyper-client")]
mod hyper_client;
mod inbox;
mod metrics;
mod packed;
mod plugin;
mod plugin_metrics;
mod prometheus;
mod service;
mod shared;
#[cfg(feature = "hyper-client")]
mod source;
mod state;
mod stream;
mod vm;
mod worker;

pub use attributes::{ConnectionInfo, PropertyValue};
pub use callout::{
    CalloutError, GrpcEvent, GrpcRequest, HttpCallOutcome, HttpCallRequest, HttpCallResponse,
    OverBudget,
};
pub use callouts::{Callouts, GrpcReply, GrpcStream, HttpCallReply, NoCallouts};
#[cfg(feature = "tower")]
pub use chain::{
    BoxError, ChainError, Exchange, FilterChain, FilterChainBuilder, FilterError, FilterLayer,
    FilterService, FilteredBody, LocalReply, Route, RouteId, RouteName, SharedChain,
};
pub use config::{DeniedCapability, FailurePolicy, Limits, PluginConfig, ReloadPolicy};
pub use embedder::{ForeignFunction, LogSink, NoProperties, PropertyProvider, TracingLogSink};
pub use headers::HeaderMap;
pub use hostcalls::is_implemented;
#[cfg(feature = "http")]
pub use http_parts::{
    AddedHeaders, HeaderChanges, HttpPartsError, RequestChanges, ResponseChanges, strip_hop_by_hop,
};
#[cfg(feature = "hyper-client")]
pub use hyper_client::HyperCallouts;
pub use inbox::Wake;
pub use metrics::HostMetrics;
pub use plugin::{LoadError, Plugin, PluginBuilder, PluginError};
pub use plugin_metrics::{MetricRegistry, MetricValue};
pub use prometheus::PrometheusText;
pub use service::{Service, ServiceError};
pub use shared::{QueueError, SharedError, SharedLimits, SharedState, StoreStats};
#[cfg(feature = "redis")]
pub use shared::{RedisConfig, RedisConfigError};
#[cfg(feature = "hyper-client")]
pub use source::{Code, CodeFetcher, ModuleStore, PluginSource, Sha256, SourceError};
#[cfg(feature = "oci")]
pub use source::{Progress, PullPolicy, Pushed, RegistryAuth};
pub use stream::{Action, LocalResponse, StreamEvent};
pub use vm::{Connection, HttpStream, UnstartedVm, Vm, VmError};
pub use worker::{Failure, Worker, WorkerStream};

pub use filterbox_abi as abi;
pub use filterbox_abi::{AbiVersion, LogLevel};
pub use filterbox_engines::{
    CacheOutcome, Engine, EngineConfig, EngineError, EngineKind, InstanceLimits, ModuleCache,
    PoolingConfig, Trap, TrapKind,
};

/// The README's examples, compiled as doc tests.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
