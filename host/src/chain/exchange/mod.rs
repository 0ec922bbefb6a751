//! The exchange core: the proxy-wasm protocol of one HTTP exchange through a chain, apart from
//! any HTTP crate's service or body types. What crosses it: header maps and body bytes in, the
//! maps and bytes the plugins let through (or the local response one of them gave) out.
//!
//! Phases run in chain order for the request and reversed for the response; a pause waits (up
//! to the chain's pause timeout) until the plugin resumes the exchange, answers it, or fails;
//! the end of the exchange runs `proxy_on_log` and ends every stream, also when the exchange is
//! dropped half-way. The tower layer, `filterbox run` and `filterbox serve` drive exchanges
//! through this type; so can any other proxy.

mod jobs;

use jobs::mismatched;

use super::FilterChain;
use super::local::{LocalReply, is_grpc, local_message};
use super::phase::{Direction, MapPhase};
use super::slot::{Done, Job};
use crate::HeaderMap;
use crate::vm::LocalResponse;
use bytes::Bytes;
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

static NEXT_EXCHANGE: AtomicU64 = AtomicU64::new(1);

/// How many exchange ids a thread takes from [`NEXT_EXCHANGE`] at a time: the shared counter
/// is written once per block, not by every exchange of every thread.
const ID_BLOCK: u64 = 1024;

thread_local! {
    /// This thread's next exchange id and the end of its block.
    static IDS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// A process-wide unique exchange id.
fn next_exchange_id() -> u64 {
    IDS.try_with(|ids| {
        let (mut next, mut end) = ids.get();
        if next == end {
            next = NEXT_EXCHANGE.fetch_add(ID_BLOCK, Ordering::Relaxed);
            end = next + ID_BLOCK;
        }
        ids.set((next + 1, end));
        next
    })
    // A thread being torn down has no block left: one id straight from the counter.
    .unwrap_or_else(|_| NEXT_EXCHANGE.fetch_add(1, Ordering::Relaxed))
}

/// One HTTP exchange through a [`FilterChain`], from [`FilterChain::exchange`]: the proxy
/// calls the phases in the order the exchange goes (request headers, request body chunks or
/// trailers, then the same for the response) and sends on what each returns.
///
/// A phase returns what the plugins let through, or `Err` with the local response a plugin
/// (or the chain: a limit, a pause past the timeout, a failed plugin's policy) gave instead.
/// Answer the client with [`Exchange::reply`] before the response started, with
/// [`Exchange::reply_directly`] after; either ends the exchange. A phase a plugin pauses
/// returns when the plugin resumes it: the future waits, never a thread. Callbacks run on the
/// calling thread when the chain's engines allow it and no other thread is running the same
/// slot; otherwise on the slot's own thread.
///
/// [`Exchange::finish`] runs `proxy_on_log` (with the headers the phases returned) and ends
/// the plugins' streams; dropping the exchange ends them without `proxy_on_log` (a client
/// that went away).
pub struct Exchange {
    chain: FilterChain,
    slot: usize,
    id: u64,
    /// The chain's route the exchange runs on (0: every plugin, own configurations).
    route: usize,
    /// The client connection, for the plugins' streams with the request headers.
    connection: Option<Arc<crate::ConnectionInfo>>,
    /// Per direction, the trailers plugins added, as the end of the body brought them back
    /// (until asked for).
    added_at_end: parking_lot::Mutex<[Option<Option<HeaderMap>>; 2]>,
    ended: bool,
    /// What `proxy_on_log` sees of the request and the response.
    request_headers: HeaderMap,
    response_headers: HeaderMap,
}

impl core::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Exchange")
            .field("id", &self.id)
            .field("slot", &self.slot)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl Exchange {
    pub(super) fn new(chain: FilterChain, route: usize) -> Exchange {
        let slot = chain.slot_index();
        Exchange {
            chain,
            slot,
            id: next_exchange_id(),
            route,
            connection: None,
            added_at_end: Default::default(),
            ended: false,
            request_headers: HeaderMap::new(),
            response_headers: HeaderMap::new(),
        }
    }

    /// Sets a property every plugin's stream context of this exchange reads with
    /// `proxy_get_property` (Envoy attributes such as `source.address`, or anything of the
    /// proxy's).
    pub async fn set_property(&mut self, path: &[&str], value: Bytes) -> Result<(), LocalResponse> {
        self.set_properties(&[(path, value)]).await
    }

    /// [`Exchange::set_property`] for several properties at once (one trip to the slot).
    pub async fn set_properties(
        &mut self,
        properties: &[(&[&str], Bytes)],
    ) -> Result<(), LocalResponse> {
        if self.is_empty() || properties.is_empty() {
            return Ok(());
        }
        let properties = properties
            .iter()
            .map(|(path, value)| {
                (
                    path.iter().map(|p| (*p).to_owned()).collect(),
                    value.clone(),
                )
            })
            .collect();
        match self.run(Job::SetProperties(properties)).await? {
            Done::PropertySet => Ok(()),
            _ => Err(mismatched()),
        }
    }

    /// The upstream address the exchange's request goes to, once the proxy has connected: the
    /// plugins read it as `upstream.address` (`ip:port`) and `upstream.port`. The same as
    /// [`Exchange::set_properties`] with those two, without formatting them for plugins that
    /// never ask.
    pub async fn set_upstream_address(
        &mut self,
        address: std::net::SocketAddr,
    ) -> Result<(), LocalResponse> {
        if self.is_empty() {
            return Ok(());
        }
        match self.run(Job::SetUpstream(address)).await? {
            Done::PropertySet => Ok(()),
            _ => Err(mismatched()),
        }
    }

    /// The client connection the exchange's request came on: the plugins read its
    /// attributes (`source.address`, `connection.tls_version`, … see
    /// [`ConnectionInfo`](crate::ConnectionInfo)) with `proxy_get_property`. It goes to the
    /// plugins with the request headers (no trip of its own); their streams keep a reference,
    /// and nothing is encoded until a plugin asks. Call it before the request headers.
    pub fn set_connection(&mut self, connection: Arc<crate::ConnectionInfo>) {
        self.connection = Some(connection);
    }

    /// The request headers (with the pseudo headers `:method`, `:path`, `:authority`,
    /// `:scheme`) through the plugins' `proxy_on_request_headers`; `end_of_stream` when the
    /// request has no body. Returns the headers as the plugins left them.
    pub async fn request_headers(
        &mut self,
        headers: HeaderMap,
        end_of_stream: bool,
    ) -> Result<HeaderMap, LocalResponse> {
        let phase = MapPhase::Headers { end_of_stream };
        let (passed, headers) = self.map_phase(Direction::Request, phase, headers).await;
        // `proxy_on_log` sees them as the plugins left them, also after a local response.
        match passed {
            Ok(()) => {
                self.request_headers = headers.clone();
                Ok(headers)
            }
            Err(response) => {
                self.request_headers = headers;
                Err(response)
            }
        }
    }

    /// A request body chunk through the plugins; returns what they let through (empty while
    /// one of them holds the body). A plugin that pauses at `end_of_stream` is waited for.
    pub async fn request_body(
        &mut self,
        chunk: Bytes,
        end_of_stream: bool,
    ) -> Result<Bytes, LocalResponse> {
        let out = self
            .body_chunk(Direction::Request, chunk, end_of_stream)
            .await?;
        Ok(out.freeze())
    }

    /// The request trailers (the end of the request) through the plugins; returns what the
    /// plugins still held of the body, to send before the trailers, and the trailers.
    pub async fn request_trailers(
        &mut self,
        trailers: HeaderMap,
    ) -> Result<(Bytes, HeaderMap), LocalResponse> {
        self.trailers(Direction::Request, trailers).await
    }

    /// Trailers the plugins added to a request that had none, to send after the last body
    /// chunk (ask after the chunk with `end_of_stream`).
    pub async fn request_added_trailers(&mut self) -> Result<Option<HeaderMap>, LocalResponse> {
        self.added_trailers(Direction::Request).await
    }

    /// The response headers (with `:status`) through the plugins' `proxy_on_response_headers`,
    /// in reverse chain order; returns them as the plugins left them.
    pub async fn response_headers(
        &mut self,
        headers: HeaderMap,
        end_of_stream: bool,
    ) -> Result<HeaderMap, LocalResponse> {
        let phase = MapPhase::Headers { end_of_stream };
        let (passed, headers) = self.map_phase(Direction::Response, phase, headers).await;
        passed?;
        self.response_headers = headers.clone();
        Ok(headers)
    }

    /// A response body chunk through the plugins: see [`Exchange::request_body`].
    pub async fn response_body(
        &mut self,
        chunk: Bytes,
        end_of_stream: bool,
    ) -> Result<Bytes, LocalResponse> {
        let out = self
            .body_chunk(Direction::Response, chunk, end_of_stream)
            .await?;
        Ok(out.freeze())
    }

    /// The response trailers through the plugins: see [`Exchange::request_trailers`].
    pub async fn response_trailers(
        &mut self,
        trailers: HeaderMap,
    ) -> Result<(Bytes, HeaderMap), LocalResponse> {
        self.trailers(Direction::Response, trailers).await
    }

    /// Trailers the plugins added to a response that had none: see
    /// [`Exchange::request_added_trailers`].
    pub async fn response_added_trailers(&mut self) -> Result<Option<HeaderMap>, LocalResponse> {
        self.added_trailers(Direction::Response).await
    }

    /// Answers the exchange with `local` before the response started, as Envoy sends a local
    /// reply: through every plugin's response phase, so that plugins add their headers to it
    /// (a rate limiter's `Retry-After`) and see its body. If a plugin answers again there, or
    /// its pause times out, `local` goes out as it was. A gRPC request gets a trailers-only
    /// gRPC answer. Ends the exchange, returning once `proxy_on_log` has run.
    pub async fn reply(&mut self, local: LocalResponse) -> LocalReply {
        let (status, headers, body) = local_message(&local, is_grpc(&self.request_headers));
        let phase = MapPhase::Headers {
            end_of_stream: body.is_empty(),
        };
        let (Ok(()), headers) = self.map_phase(Direction::Response, phase, headers).await else {
            return self.reply_directly(local);
        };
        let body = match body.is_empty() {
            true => Bytes::new(),
            false => match self.body_chunk(Direction::Response, body, true).await {
                Ok(body) => body.freeze(),
                Err(_) => return self.reply_directly(local),
            },
        };
        let status = headers
            .get_str(":status")
            .and_then(|s| s.parse().ok())
            .unwrap_or(status.as_u16());
        self.response_headers = headers.clone();
        self.end_and_wait().await;
        LocalReply {
            status,
            headers,
            body,
            details: local.details,
        }
    }

    /// Answers the exchange with `local` as it is, without the response phase: for answers
    /// after the response started (as Envoy sends those). Ends the exchange.
    pub fn reply_directly(&mut self, local: LocalResponse) -> LocalReply {
        let (status, headers, body) = local_message(&local, is_grpc(&self.request_headers));
        self.response_headers = headers.clone();
        self.finish_in_place();
        LocalReply {
            status: status.as_u16(),
            headers,
            body,
            details: local.details,
        }
    }

    /// Ends the exchange: `proxy_on_log` with the request and response headers as the phases
    /// returned them, then the end of every plugin's stream. Nobody waits for it.
    pub fn finish(mut self) {
        self.finish_in_place();
    }

    /// [`Exchange::finish`], returning once `proxy_on_log` and the end of the streams have
    /// run (what the plugins logged there has been logged).
    pub async fn finish_and_wait(mut self) {
        self.end_and_wait().await;
    }

    /// Ends the exchange (`proxy_on_log` included) and waits until that has run.
    async fn end_and_wait(&mut self) {
        if let Some(log) = self.take_end(true) {
            // Whatever the answer, the streams are gone; a slot that is gone has none.
            let _ = self.run(Job::End { log }).await;
        }
    }

    /// Whether the exchange runs no plugin (its chain has none, or its route skips them
    /// all): every phase then returns its input, and a proxy may skip them.
    pub fn is_empty(&self) -> bool {
        let plan = &self.chain.inner.plan;
        plan.roots
            .get(self.route)
            .is_none_or(|roots| roots.iter().all(Option::is_none))
    }

    /// Marks the exchange ended without running anything (nothing was started on the VMs).
    pub(super) fn pass_through(&mut self) {
        self.ended = true;
    }

    /// [`Exchange::finish`] for an exchange the caller keeps (its future still runs).
    pub(super) fn finish_in_place(&mut self) {
        self.end(true);
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        // An exchange dropped mid-way (the client went away) still frees its contexts.
        self.end(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_ids_are_unique_across_threads_and_blocks() {
        let per_thread = usize::try_from(ID_BLOCK * 2 + 7).unwrap_or(usize::MAX);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    (0..per_thread)
                        .map(|_| next_exchange_id())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut ids: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap_or_default())
            .collect();
        assert_eq!(ids.len(), per_thread * 4);
        assert!(ids.iter().all(|&id| id != 0));
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), per_thread * 4, "an id was given twice");
    }
}
