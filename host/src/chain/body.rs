//! [`FilteredBody`]: the body type of filtered requests and responses. What crosses it: frames
//! the chain let through, from a channel (or from a pump the reader drives), and the
//! [`FilterError`] that ended the body early.

use super::error::{BoxError, FilterError};
use bytes::{Buf, Bytes};
use core::fmt;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// How many body frames may wait between the chain and the reader of a filtered body.
pub(super) const BODY_FRAMES_IN_FLIGHT: usize = 4;

/// Where the chain sends the frames of a body it filters.
pub(super) type BodySender = tokio::sync::mpsc::Sender<Result<Frame<Bytes>, FilterError>>;

/// A body that went through the chain: what the plugins let through, frame by frame as they
/// let it through (so a body no plugin pauses on streams), then its trailers. A plugin that
/// changes a body's length owns the `content-length` header, as in Envoy (SDK plugins remove
/// it in their header callback).
#[derive(Debug, Default)]
pub struct FilteredBody {
    kind: BodyKind,
}

#[derive(Default)]
enum BodyKind {
    #[default]
    Empty,
    Full(Bytes),
    Stream(tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, FilterError>>),
    /// Frames from a pump that this body drives as it is read.
    Pumped {
        frames: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, FilterError>>,
        pump: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    },
    /// A body no plugin sees, passed through as it is.
    Boxed(UnsyncBoxBody<Bytes, FilterError>),
}

impl fmt::Debug for BodyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BodyKind::Empty => "Empty",
            BodyKind::Full(_) => "Full",
            BodyKind::Stream(_) => "Stream",
            BodyKind::Pumped { .. } => "Pumped",
            BodyKind::Boxed(_) => "Boxed",
        })
    }
}

impl FilteredBody {
    /// An empty body.
    pub fn empty() -> Self {
        FilteredBody::default()
    }

    /// A body of `data`.
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data: Bytes = data.into();
        FilteredBody {
            kind: match data.is_empty() {
                true => BodyKind::Empty,
                false => BodyKind::Full(data),
            },
        }
    }

    /// A body of `data` followed by `trailers`.
    pub(super) fn with_trailers(data: Bytes, trailers: http::HeaderMap) -> Self {
        let (sender, receiver) = tokio::sync::mpsc::channel(2);
        // Two frames fit in a fresh channel of two.
        let _ = sender.try_send(Ok(Frame::data(data)));
        let _ = sender.try_send(Ok(Frame::trailers(trailers)));
        FilteredBody::stream(receiver)
    }

    /// `body` as it is, its errors wrapped by `error`.
    pub(super) fn boxed<B>(body: B, error: fn(BoxError) -> FilterError) -> Self
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let body = body
            .map_frame(|frame| frame.map_data(|mut data| data.copy_to_bytes(data.remaining())))
            .map_err(move |e| error(e.into()))
            .boxed_unsync();
        FilteredBody {
            kind: BodyKind::Boxed(body),
        }
    }

    pub(super) fn pumped(
        frames: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, FilterError>>,
        pump: Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> Self {
        FilteredBody {
            kind: BodyKind::Pumped {
                frames,
                pump: Some(pump),
            },
        }
    }

    pub(super) fn stream(
        receiver: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, FilterError>>,
    ) -> Self {
        FilteredBody {
            kind: BodyKind::Stream(receiver),
        }
    }
}

impl Body for FilteredBody {
    type Data = Bytes;
    type Error = FilterError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, FilterError>>> {
        match &mut self.kind {
            BodyKind::Empty => Poll::Ready(None),
            BodyKind::Full(_) => match std::mem::take(&mut self.kind) {
                BodyKind::Full(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                _ => Poll::Ready(None),
            },
            BodyKind::Stream(receiver) => receiver.poll_recv(cx),
            BodyKind::Pumped { frames, pump } => {
                if let Poll::Ready(frame) = frames.poll_recv(cx) {
                    return Poll::Ready(frame);
                }
                // Run the pump until it sends a frame, waits, or ends (its sender then drops
                // and the frames end once read).
                if let Some(running) = pump
                    && running.as_mut().poll(cx).is_ready()
                {
                    *pump = None;
                }
                frames.poll_recv(cx)
            }
            BodyKind::Boxed(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            BodyKind::Empty => true,
            BodyKind::Boxed(body) => body.is_end_stream(),
            BodyKind::Full(_) | BodyKind::Stream(_) | BodyKind::Pumped { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::Empty => SizeHint::with_exact(0),
            BodyKind::Full(data) => SizeHint::with_exact(data.len() as u64),
            BodyKind::Stream(_) | BodyKind::Pumped { .. } => SizeHint::default(),
            BodyKind::Boxed(body) => body.size_hint(),
        }
    }
}
