//! The exchange core: the proxy-wasm protocol of one HTTP exchange through a chain, apart from
//! any HTTP crate's service or body types. What crosses it: header maps and body bytes in,
//! the maps and bytes the plugins let through (or the local response one of them gave) out.
//! Phases run in chain order for the request and reversed for the response; a pause waits
//! (up to the chain's pause timeout) until the plugin resumes the exchange, answers it, or
//! fails; the end of the exchange runs `proxy_on_log` and ends every stream, also when the
//! exchange is dropped half-way.

use super::FilterChain;
use super::local::local;
use super::phase::{Direction, MapPhase, Step};
use super::slot::{Done, Job, Slot};
use crate::HeaderMap;
use crate::vm::LocalResponse;
use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::Notify;

static NEXT_EXCHANGE: AtomicU64 = AtomicU64::new(1);

/// One exchange on its slot. Ends its streams (`proxy_on_done`, `proxy_on_delete`) when
/// dropped, so a client that goes away leaves no stream contexts behind.
pub(super) struct Exchange {
    pub(super) chain: FilterChain,
    slot: usize,
    id: u64,
    ended: bool,
    /// What `proxy_on_log` sees of the request and the response.
    pub(super) request_headers: HeaderMap,
    pub(super) response_headers: HeaderMap,
    /// Notified when a plugin this exchange waits on has news for it.
    resumed: Arc<Notify>,
}

impl Exchange {
    pub(super) fn new(chain: FilterChain) -> Exchange {
        let slot = chain.slot_index();
        Exchange {
            chain,
            slot,
            id: NEXT_EXCHANGE.fetch_add(1, Ordering::Relaxed),
            ended: false,
            request_headers: HeaderMap::new(),
            response_headers: HeaderMap::new(),
            resumed: Arc::new(Notify::new()),
        }
    }

    /// Whether the chain has no plugins (nothing to run).
    pub(super) fn is_empty(&self) -> bool {
        self.chain.inner.plugins.is_empty()
    }

    fn slot(&self) -> Option<&Slot> {
        self.chain.inner.slots.get(self.slot)
    }

    /// Does `job` on the exchange's slot; a slot that is gone (or a job of ours that
    /// panicked) answers 503.
    async fn run(&self, job: Job) -> Result<Done, LocalResponse> {
        let unavailable = || local(503, "filterbox_slot_unavailable");
        let slot = self.slot().ok_or_else(unavailable)?;
        slot.run(self.id, job).await.ok_or_else(unavailable)
    }

    /// Waits until plugin `index` resumes `direction` (giving the headers as it left them,
    /// in a header phase), answers the exchange, or the pause times out (504). Woken by
    /// whatever gives the plugin's news (a callout answer, another exchange's callback).
    async fn wait_resumed(
        &self,
        index: usize,
        direction: Direction,
    ) -> Result<Option<HeaderMap>, LocalResponse> {
        let deadline = tokio::time::Instant::now() + self.chain.inner.pause_timeout;
        loop {
            let job = Job::Resumed {
                index,
                direction,
                notify: self.resumed.clone(),
            };
            match self.run(job).await? {
                Done::Resumed(Some(resumed)) => return resumed,
                Done::Resumed(None) => {}
                _ => return Err(mismatched()),
            }
            if tokio::time::timeout_at(deadline, self.resumed.notified())
                .await
                .is_err()
            {
                let plugin = self
                    .chain
                    .inner
                    .plugins
                    .get(index)
                    .map(|p| p.config().name.clone());
                tracing::warn!(
                    plugin = plugin.unwrap_or_default(),
                    "exchange paused past the pause timeout"
                );
                return Err(local(504, "filterbox_pause_timeout"));
            }
        }
    }

    /// The header (or trailer) phase of `direction`; returns the map as the plugins left it.
    pub(super) async fn map_phase(
        &self,
        direction: Direction,
        phase: MapPhase,
        mut map: HeaderMap,
    ) -> Result<HeaderMap, LocalResponse> {
        if self.is_empty() {
            return Ok(map);
        }
        let mut from = 0;
        loop {
            let job = Job::Map {
                direction,
                phase,
                map,
                from,
            };
            let Done::Map(step, back) = self.run(job).await? else {
                return Err(mismatched());
            };
            map = back;
            match step {
                Step::Continue => return Ok(map),
                Step::Respond(response) => return Err(response),
                Step::Paused { position, index } => {
                    let parked = self.wait_resumed(index, direction).await?;
                    // A plugin resumed from elsewhere may have changed the headers it paused on.
                    if let (MapPhase::Headers { .. }, Some(parked)) = (phase, parked) {
                        map = parked;
                    }
                    from = position + 1;
                }
            }
        }
    }

    /// The trailers plugins added at the end of `direction`'s body (none had come); `None`
    /// if they added none.
    pub(super) async fn added_trailers(
        &self,
        direction: Direction,
    ) -> Result<Option<HeaderMap>, LocalResponse> {
        if self.is_empty() {
            return Ok(None);
        }
        match self.run(Job::AddedTrailers { direction }).await? {
            Done::Trailers(added) => Ok(added),
            _ => Err(mismatched()),
        }
    }

    /// One body chunk through the plugins of `direction`; returns what left the chain.
    pub(super) async fn body_chunk(
        &self,
        direction: Direction,
        chunk: Bytes,
        end_of_stream: bool,
    ) -> Result<BytesMut, LocalResponse> {
        if self.is_empty() {
            return Ok(BytesMut::from(chunk));
        }
        let mut job = Job::Body {
            direction,
            input: BytesMut::from(chunk),
            end_of_stream,
            from: 0,
        };
        loop {
            let Done::Body(step, out) = self.run(job).await? else {
                return Err(mismatched());
            };
            match step {
                Step::Continue => return Ok(out),
                Step::Respond(response) => return Err(response),
                Step::Paused { position, index } => {
                    // Nothing more will come: the plugin has to resume (after a callout, say).
                    self.wait_resumed(index, direction).await?;
                    job = Job::ResumeBody {
                        direction,
                        position,
                    };
                }
            }
        }
    }

    /// What plugins still held of `direction`'s body once its trailers went through, in
    /// order.
    pub(super) async fn release_buffers(&self) -> Result<BytesMut, LocalResponse> {
        if self.is_empty() {
            return Ok(BytesMut::new());
        }
        match self.run(Job::ReleaseBuffers).await? {
            Done::Released(released) => Ok(released),
            _ => Err(mismatched()),
        }
    }

    /// Marks the exchange ended without running anything (nothing was started on the VMs).
    pub(super) fn pass_through(&mut self) {
        self.ended = true;
    }

    /// Ends the exchange's streams on its slot, after `proxy_on_log` if `log`. Nobody waits.
    pub(super) fn end(&mut self, log: bool) {
        if self.ended {
            return;
        }
        self.ended = true;
        if self.is_empty() {
            return;
        }
        let log = log.then(|| {
            (
                std::mem::take(&mut self.request_headers),
                std::mem::take(&mut self.response_headers),
            )
        });
        if let Some(slot) = self.slot() {
            slot.run_detached(self.id, Job::End { log });
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        // An exchange dropped mid-way (the client went away) still frees its contexts.
        self.end(false);
    }
}

/// A slot answered a job with another job's answer: a bug of ours, answered like a slot
/// that is gone.
fn mismatched() -> LocalResponse {
    tracing::error!("a filter chain slot answered the wrong job");
    local(503, "filterbox_slot_unavailable")
}
