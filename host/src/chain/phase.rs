//! The vocabulary of a phase: which way it runs ([`Direction`]), over which map
//! ([`MapPhase`]), and where it stopped ([`Step`]).

use crate::vm::LocalResponse;
use filterbox_abi::{MapType, StreamType};

/// Which way a phase runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Direction {
    Request,
    Response,
}

impl Direction {
    pub(super) fn stream_type(self) -> StreamType {
        match self {
            Direction::Request => StreamType::HttpRequest,
            Direction::Response => StreamType::HttpResponse,
        }
    }

    pub(super) fn header_map(self) -> MapType {
        match self {
            Direction::Request => MapType::HttpRequestHeaders,
            Direction::Response => MapType::HttpResponseHeaders,
        }
    }

    pub(super) fn trailer_map(self) -> MapType {
        match self {
            Direction::Request => MapType::HttpRequestTrailers,
            Direction::Response => MapType::HttpResponseTrailers,
        }
    }

    /// The plugin (its index) at `position` of the order this direction runs a route's
    /// plugins in (`order`: the route's request order; responses run it reversed).
    pub(super) fn plugin_at(self, order: &[usize], position: usize) -> Option<usize> {
        let at = match self {
            Direction::Request => position,
            Direction::Response => order.len().checked_sub(position + 1)?,
        };
        order.get(at).copied()
    }
}

/// Where a phase stopped.
pub(super) enum Step {
    /// Every plugin let it through.
    Continue,
    /// Answer the client with this.
    Respond(LocalResponse),
    /// The plugin at `position` of the phase's order (plugin `index`) paused it.
    Paused { position: usize, index: usize },
}

/// Which header map a map phase runs over.
#[derive(Clone, Copy, Debug)]
pub(super) enum MapPhase {
    Headers { end_of_stream: bool },
    Trailers,
}
