//! How the exchange's phases become jobs on its slot: the header and body steps through the
//! chain's plugins, the waits while a plugin holds the exchange paused, and the end of the
//! exchange's streams. What crosses it: [`Job`]s to the slot and its [`Done`] answers back.

use super::Exchange;
use crate::HeaderMap;
use crate::chain::phase::{Direction, MapPhase, Step};
use crate::chain::slot::{Done, Job, Slot};
use crate::vm::LocalResponse;
use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use tokio::sync::Notify;

impl Exchange {
    fn slot(&self) -> Option<&Slot> {
        self.chain.inner.slots.get(self.slot)
    }

    /// Does `job` on the exchange's slot; a slot that is gone (or a job of ours that
    /// panicked) answers 503.
    pub(super) async fn run(&self, job: Job) -> Result<Done, LocalResponse> {
        let unavailable = || LocalResponse::new(503, "filterbox_slot_unavailable");
        let slot = self.slot().ok_or_else(unavailable)?;
        slot.run((self.id, self.route), job)
            .await
            .ok_or_else(unavailable)
    }

    /// Waits until plugin `index` resumes `direction` (giving the headers as it left them,
    /// in a header phase), answers the exchange, or the pause times out (504). Woken by
    /// whatever gives the plugin's news (a callout answer, another exchange's callback).
    /// Callers box its future: with its timer it is most of a phase's future, and only a
    /// paused exchange needs it (every other one would carry it for nothing).
    async fn wait_resumed(
        &self,
        index: usize,
        direction: Direction,
    ) -> Result<Option<HeaderMap>, LocalResponse> {
        let deadline = tokio::time::Instant::now() + self.chain.inner.pause_timeout;
        // Notified when the plugin has news for this exchange; made only for exchanges that
        // wait.
        let resumed = Arc::new(Notify::new());
        loop {
            let job = Job::Resumed {
                index,
                direction,
                notify: resumed.clone(),
            };
            match self.run(job).await? {
                Done::Resumed(Some(resumed)) => return resumed,
                Done::Resumed(None) => {}
                _ => return Err(mismatched()),
            }
            if tokio::time::timeout_at(deadline, resumed.notified())
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
                return Err(LocalResponse::new(504, "filterbox_pause_timeout"));
            }
        }
    }

    /// The header (or trailer) phase of `direction`: whether the plugins let it through (or
    /// the local response that ends it), and the map as they left it either way.
    pub(super) async fn map_phase(
        &self,
        direction: Direction,
        phase: MapPhase,
        mut map: HeaderMap,
    ) -> (Result<(), LocalResponse>, HeaderMap) {
        if self.is_empty() {
            return (Ok(()), map);
        }
        let mut from = 0;
        loop {
            let first_request_headers = direction == Direction::Request
                && matches!(phase, MapPhase::Headers { .. })
                && from == 0;
            let job = Job::Map {
                direction,
                phase,
                map,
                from,
                connection: first_request_headers
                    .then(|| self.connection.clone())
                    .flatten(),
            };
            let (step, back) = match self.run(job).await {
                Ok(Done::Map(step, back)) => (step, back),
                // The map is lost with the slot; nothing will read it.
                Ok(_) => return (Err(mismatched()), HeaderMap::new()),
                Err(response) => return (Err(response), HeaderMap::new()),
            };
            map = back;
            match step {
                Step::Continue => return (Ok(()), map),
                Step::Respond(response) => return (Err(response), map),
                Step::Paused { position, index } => {
                    match Box::pin(self.wait_resumed(index, direction)).await {
                        // A plugin resumed from elsewhere may have changed the headers it
                        // paused on.
                        Ok(Some(parked)) if matches!(phase, MapPhase::Headers { .. }) => {
                            map = parked;
                        }
                        Ok(_) => {}
                        Err(response) => return (Err(response), map),
                    }
                    from = position + 1;
                }
            }
        }
    }

    /// The trailers of `direction` through the plugins, then what they still held of the
    /// body (released once the trailers went through, in order).
    pub(in crate::chain) async fn trailers(
        &self,
        direction: Direction,
        trailers: HeaderMap,
    ) -> Result<(Bytes, HeaderMap), LocalResponse> {
        let (passed, trailers) = self
            .map_phase(direction, MapPhase::Trailers, trailers)
            .await;
        passed?;
        if self.is_empty() {
            return Ok((Bytes::new(), trailers));
        }
        match self.run(Job::ReleaseBuffers).await? {
            Done::Released(released) => Ok((released.freeze(), trailers)),
            _ => Err(mismatched()),
        }
    }

    /// The trailers plugins added at the end of `direction`'s body (none had come); `None`
    /// if they added none.
    pub(in crate::chain) async fn added_trailers(
        &self,
        direction: Direction,
    ) -> Result<Option<HeaderMap>, LocalResponse> {
        if self.is_empty() {
            return Ok(None);
        }
        // Taken with the end of the body, if it ended in a body job.
        if let Some(added) = self.added_at_end.lock()[direction as usize].take() {
            return Ok(added);
        }
        match self.run(Job::AddedTrailers { direction }).await? {
            Done::Trailers(added) => Ok(added),
            _ => Err(mismatched()),
        }
    }

    /// One body chunk through the plugins of `direction`; returns what left the chain.
    pub(in crate::chain) async fn body_chunk(
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
            let Done::Body(step, out, added) = self.run(job).await? else {
                return Err(mismatched());
            };
            if let Some(added) = added {
                self.added_at_end.lock()[direction as usize] = Some(added);
            }
            match step {
                Step::Continue => return Ok(out),
                Step::Respond(response) => return Err(response),
                Step::Paused { position, index } => {
                    // Nothing more will come: the plugin has to resume (after a callout, say).
                    Box::pin(self.wait_resumed(index, direction)).await?;
                    job = Job::ResumeBody {
                        direction,
                        position,
                    };
                }
            }
        }
    }

    /// Ends the exchange's streams on its slot, after `proxy_on_log` if `log`. Nobody waits.
    pub(in crate::chain) fn end(&mut self, log: bool) {
        if let (Some(log), Some(slot)) = (self.take_end(log), self.slot()) {
            slot.run_detached((self.id, self.route), Job::End { log });
        }
    }

    /// Marks the exchange ended; what `Job::End` needs if its streams are still to end
    /// (with the headers for `proxy_on_log` if `log`).
    pub(super) fn take_end(&mut self, log: bool) -> Option<Option<(HeaderMap, HeaderMap)>> {
        if self.ended || self.is_empty() {
            self.ended = true;
            return None;
        }
        self.ended = true;
        Some(log.then(|| {
            (
                std::mem::take(&mut self.request_headers),
                std::mem::take(&mut self.response_headers),
            )
        }))
    }
}

/// A slot answered a job with another job's answer: a bug of ours, answered like a slot
/// that is gone.
pub(super) fn mismatched() -> LocalResponse {
    tracing::error!("a filter chain slot answered the wrong job");
    LocalResponse::new(503, "filterbox_slot_unavailable")
}
