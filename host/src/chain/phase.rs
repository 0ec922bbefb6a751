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

    /// From position `from` of the order this direction runs `plugins` plugins in: each
    /// position with its plugin's index (requests in chain order, responses reversed).
    pub(super) fn positions(
        self,
        plugins: usize,
        from: usize,
    ) -> impl Iterator<Item = (usize, usize)> {
        (from..plugins).map(move |position| match self {
            Direction::Request => (position, position),
            Direction::Response => (position, plugins - 1 - position),
        })
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
