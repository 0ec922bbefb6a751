//! The phases of an exchange on a slot, plugin by plugin: header and trailer maps through
//! the plugins in order, body bytes through the buffers each plugin holds, and what the
//! plugins still hold or added at the end. What crosses it: a map or bytes and the position
//! to start from in, the [`Step`] the chain reached and what left it out.

use super::OpenExchange;
use crate::HeaderMap;
use crate::chain::phase::{Direction, MapPhase, Step};
use crate::vm::{Action, LocalResponse};
use bytes::BytesMut;

impl OpenExchange<'_> {
    /// The header (or trailer) callbacks of `direction` over `map`, from position `from` of
    /// its order, until a plugin pauses or answers.
    pub(super) fn map_phase(
        &mut self,
        (direction, phase): (Direction, MapPhase),
        map: &mut HeaderMap,
        from: usize,
    ) -> Step {
        let request_headers = matches!(
            (direction, phase),
            (Direction::Request, MapPhase::Headers { .. })
        );
        let mut step = Step::Continue;
        let mut ran = from;
        for position in from.. {
            let Some(index) = self.plugin_at(direction, position) else {
                break;
            };
            ran = position + 1;
            let action = self.call(index, |worker, stream| match (direction, phase) {
                (Direction::Request, MapPhase::Headers { end_of_stream }) => {
                    worker.on_request_headers(stream, map, end_of_stream)
                }
                (Direction::Response, MapPhase::Headers { end_of_stream }) => {
                    worker.on_response_headers(stream, map, end_of_stream)
                }
                (Direction::Request, MapPhase::Trailers) => worker.on_request_trailers(stream, map),
                (Direction::Response, MapPhase::Trailers) => {
                    worker.on_response_trailers(stream, map)
                }
            });
            match action {
                Action::Continue => {}
                Action::Respond(response) => {
                    step = Step::Respond(response);
                    break;
                }
                Action::Pause => {
                    step = Step::Paused { position, index };
                    break;
                }
            }
        }
        if request_headers {
            // Every plugin that has seen the request reads it as the chain left it.
            for position in 0..ran {
                self.remember_request_headers(position, Some(map.clone()));
            }
        }
        step
    }

    /// Sets what the stream of the plugin at `position` of the request order reads for
    /// `request.*` attributes ([`crate::Vm::set_request_headers_seen`]).
    fn remember_request_headers(&mut self, position: usize, headers: Option<HeaderMap>) {
        let Some(index) = self.plugin_at(Direction::Request, position) else {
            return;
        };
        if let Some((worker, stream)) = self.plugin(index) {
            worker.set_request_headers_seen(stream, headers);
        }
    }

    /// Runs body bytes through the plugins of `direction` from position `from`: each plugin
    /// sees what it paused on so far plus the new bytes, and what it lets through goes to the
    /// next. Returns what left the last plugin. A pause at the end of the stream waits for the
    /// plugin to resume ([`OpenExchange::resume_body`]); any other pause keeps the bytes.
    pub(super) fn body(
        &mut self,
        direction: Direction,
        mut input: BytesMut,
        end_of_stream: bool,
        from: usize,
    ) -> (Step, BytesMut) {
        for position in from.. {
            let Some(index) = self.plugin_at(direction, position) else {
                break;
            };
            let mut body = match self.streams.buffers.get_mut(position) {
                Some(buffer) => {
                    let mut body = buffer.take();
                    body.extend_from_slice(&input);
                    body
                }
                None => break,
            };
            if body.len() > self.held.per_plugin {
                let status = match direction {
                    Direction::Request => 413,
                    Direction::Response => 502,
                };
                return (
                    Step::Respond(LocalResponse::new(status, "filterbox_body_too_large")),
                    BytesMut::new(),
                );
            }
            let mut added = None;
            let action = self.call(index, |worker, stream| {
                let action = match direction {
                    Direction::Request => worker.on_request_body(stream, &mut body, end_of_stream),
                    Direction::Response => {
                        worker.on_response_body(stream, &mut body, end_of_stream)
                    }
                };
                added = worker.take_added_trailers(stream, direction.trailer_map());
                action
            });
            if let Some(added) = added {
                let held = &mut self.streams.added_trailers[direction as usize];
                for (name, value) in added.iter() {
                    held.add(name.clone(), value.clone());
                }
            }
            match action {
                Action::Continue => input = body,
                Action::Respond(response) => return (Step::Respond(response), BytesMut::new()),
                Action::Pause => {
                    if !self.held.has_room(body.len()) {
                        let status = match direction {
                            Direction::Request => 503,
                            Direction::Response => 502,
                        };
                        tracing::warn!(
                            "the plugins hold {} body bytes, the most allowed: an exchange is \
                             answered {status} rather than hold {} more",
                            self.held.total,
                            body.len()
                        );
                        return (
                            Step::Respond(LocalResponse::new(
                                status,
                                "filterbox_held_bodies_over_limit",
                            )),
                            BytesMut::new(),
                        );
                    }
                    if let Some(buffer) = self.streams.buffers.get_mut(position) {
                        buffer.put(body);
                    }
                    let step = match end_of_stream {
                        true => Step::Paused { position, index },
                        false => Step::Continue,
                    };
                    return (step, BytesMut::new());
                }
            }
        }
        (Step::Continue, input)
    }

    /// Goes on with a body the plugin at `position` paused on at the end of the stream.
    pub(super) fn resume_body(
        &mut self,
        direction: Direction,
        position: usize,
    ) -> (Step, BytesMut) {
        let held = match self.streams.buffers.get_mut(position) {
            Some(buffer) => buffer.take(),
            None => BytesMut::new(),
        };
        self.body(direction, held, true, position + 1)
    }

    /// The trailers plugins added to `direction`'s message, if any.
    pub(super) fn take_added_trailers(&mut self, direction: Direction) -> Option<HeaderMap> {
        let held = std::mem::take(&mut self.streams.added_trailers[direction as usize]);
        (!held.is_empty()).then_some(held)
    }

    /// What plugins still hold of the body, in order (released once trailers went through).
    pub(super) fn release_buffers(&mut self) -> BytesMut {
        let mut released = BytesMut::new();
        for buffer in &mut self.streams.buffers {
            released.extend_from_slice(&buffer.take());
        }
        released
    }
}
