//! The errors of a filter chain: building it ([`ChainError`]) and running an exchange through
//! it without an HTTP answer ([`FilterError`]).

use crate::VmError;
use crate::vm::LocalResponse;
use core::fmt;

/// An error that boxes whatever a body or the inner service failed with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a [`FilterChain`](super::FilterChain) could not be built.
#[derive(Debug)]
#[non_exhaustive]
pub enum ChainError {
    /// A slot thread could not be started.
    Thread(std::io::Error),
    /// A plugin's first VM did not start (instantiation, `proxy_on_vm_start` or
    /// `proxy_on_configure` failed), so the chain is refused before it takes traffic.
    Start(VmError),
    /// A route names a plugin the chain does not have.
    UnknownPlugin {
        /// The route.
        route: String,
        /// The name it gave.
        plugin: String,
    },
    /// Two routes have the same name.
    DuplicateRoute(String),
    /// A route's order ([`Route::order`](super::Route::order)) names a plugin twice.
    PluginTwiceInRoute {
        /// The route.
        route: String,
        /// The plugin named twice.
        plugin: String,
    },
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChainError::Thread(error) => write!(f, "starting a slot thread: {error}"),
            ChainError::Start(error) => write!(f, "{error}"),
            ChainError::UnknownPlugin { route, plugin } => {
                write!(
                    f,
                    "route {route:?} names plugin {plugin:?}, which the chain does not have"
                )
            }
            ChainError::DuplicateRoute(route) => write!(f, "route {route:?} is given twice"),
            ChainError::PluginTwiceInRoute { route, plugin } => {
                write!(f, "route {route:?} runs plugin {plugin:?} twice")
            }
        }
    }
}

// The inner error is part of the message, so it is not also a `source()` (printed twice
// by error reporters that walk the chain).
impl std::error::Error for ChainError {}

/// Why a filtered exchange failed without an HTTP answer.
#[derive(Debug)]
#[non_exhaustive]
pub enum FilterError {
    /// Reading the request body failed.
    RequestBody(BoxError),
    /// Reading the response body failed.
    ResponseBody(BoxError),
    /// The inner service failed.
    Service(BoxError),
    /// A plugin answered the exchange (or a limit was hit) after the response headers had
    /// gone to the client: the response body ends with this error, which resets the stream.
    Reset(LocalResponse),
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FilterError::RequestBody(e) => write!(f, "reading the request body: {e}"),
            FilterError::ResponseBody(e) => write!(f, "reading the response body: {e}"),
            FilterError::Service(e) => write!(f, "inner service: {e}"),
            FilterError::Reset(response) => write!(
                f,
                "the filter chain answered {} ({}) after the response headers were sent",
                response.status_code, response.details
            ),
        }
    }
}

// The inner error is part of the message, so it is not also a `source()` (printed twice
// by error reporters that walk the chain).
impl std::error::Error for FilterError {}
