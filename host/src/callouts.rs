//! The trait through which the embedder carries out a plugin's callouts, and the reply handles
//! it answers with: they carry the answer into the VM's inbox from any thread. What a callout
//! is (requests, answers, errors, the byte budget) is in `callout`.

use crate::callout::{
    CalloutError, Claim, GrpcEvent, GrpcRequest, HttpCallOutcome, HttpCallRequest, OverBudget,
};
use crate::inbox::{Gone, Inbox, Pending};
use bytes::Bytes;
use filterbox_abi::GrpcStatus;
use std::sync::{Arc, Weak};

/// Answers one HTTP call. Send it to any thread; [`HttpCallReply::send`] once.
#[derive(Debug)]
pub struct HttpCallReply {
    inbox: Weak<Inbox>,
    gone: Arc<Gone>,
    token: u32,
    sent: bool,
    /// What the answer holds of the VM's callout budget, from when the client reads it.
    claim: Claim,
}

impl HttpCallReply {
    pub(crate) fn new(inbox: &Arc<Inbox>, token: u32) -> Self {
        HttpCallReply {
            inbox: Arc::downgrade(inbox),
            gone: inbox.gone(),
            token,
            sent: false,
            claim: Claim::new(inbox.budget()),
        }
    }

    /// Counts `bytes` of the answer (a body chunk just read) against the VM's budget for
    /// pending callouts. Call it as the answer is read, so that many large answers cannot be
    /// buffered at once; on `Err`, stop reading and send a failure. [`HttpCallReply::send`]
    /// counts whatever was not reserved, and fails the call if it does not fit.
    pub fn reserve(&self, bytes: usize) -> Result<(), OverBudget> {
        self.claim.grow(bytes)
    }

    /// Whether the VM that made the call is gone (it trapped and was rebuilt, its plugin was
    /// reloaded, or it was dropped): nobody will hear the answer, so stop the call and free
    /// what it holds.
    pub fn is_abandoned(&self) -> bool {
        self.gone.is_set()
    }

    /// Resolves once [`HttpCallReply::is_abandoned`] turns true: race the call against it.
    #[cfg(feature = "tokio")]
    pub async fn abandoned(&self) {
        self.gone.wait().await
    }

    /// Delivers the outcome to the VM (dropped if the VM is gone).
    pub fn send(mut self, outcome: HttpCallOutcome) {
        self.deliver(outcome);
    }

    fn deliver(&mut self, outcome: HttpCallOutcome) {
        self.sent = true;
        let Some(inbox) = self.inbox.upgrade() else {
            return;
        };
        let mut outcome = outcome;
        if let HttpCallOutcome::Response(response) = &outcome {
            let size =
                response.headers.byte_size() + response.body.len() + response.trailers.byte_size();
            if let Err(over) = self.reserve(size.saturating_sub(self.claim.bytes())) {
                outcome = HttpCallOutcome::Failed(format!("response of {size} bytes is {over}"));
            }
        }
        let claim = std::mem::replace(&mut self.claim, Claim::new(inbox.budget()));
        inbox.push(Pending::HttpResponse {
            token: self.token,
            outcome,
            claim,
        });
    }
}

impl Drop for HttpCallReply {
    fn drop(&mut self) {
        if !self.sent {
            self.deliver(HttpCallOutcome::Failed(
                "callout dropped without an answer".into(),
            ));
        }
    }
}

/// Delivers the events of one gRPC call or stream to the VM. Send it to any thread. Dropped
/// before a [`GrpcEvent::Close`], it closes with `UNAVAILABLE`.
#[derive(Debug)]
pub struct GrpcReply {
    inbox: Weak<Inbox>,
    gone: Arc<Gone>,
    token: u32,
    closed: bool,
}

impl GrpcReply {
    pub(crate) fn new(inbox: &Arc<Inbox>, token: u32) -> Self {
        GrpcReply {
            inbox: Arc::downgrade(inbox),
            gone: inbox.gone(),
            token,
            closed: false,
        }
    }

    /// Whether the VM that opened the call is gone: stop the call (see
    /// [`HttpCallReply::is_abandoned`]).
    pub fn is_abandoned(&self) -> bool {
        self.gone.is_set()
    }

    /// Resolves once [`GrpcReply::is_abandoned`] turns true.
    #[cfg(feature = "tokio")]
    pub async fn abandoned(&self) {
        self.gone.wait().await
    }

    /// Whether a close was delivered (sent, or because a message was over the VM's budget
    /// for pending callouts): stop the call, nothing more is heard.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Delivers one event. Nothing is delivered after a close. A message that would take the
    /// VM past its budget for pending callouts closes the call with `RESOURCE_EXHAUSTED`
    /// instead.
    pub fn send(&mut self, event: GrpcEvent) {
        if self.closed {
            return;
        }
        let Some(inbox) = self.inbox.upgrade() else {
            self.closed = true;
            return;
        };
        let claim = Claim::new(inbox.budget());
        let mut event = event;
        if let GrpcEvent::Message(message) = &event
            && let Err(over) = claim.grow(message.len())
        {
            let why = format!("message of {} bytes is {over}", message.len());
            event = GrpcEvent::close(GrpcStatus::ResourceExhausted, why);
        }
        self.closed = matches!(event, GrpcEvent::Close { .. });
        inbox.push(Pending::Grpc {
            token: self.token,
            event,
            claim,
        });
    }
}

impl Drop for GrpcReply {
    fn drop(&mut self) {
        self.send(GrpcEvent::close(
            GrpcStatus::Unavailable,
            "callout dropped without a close",
        ));
    }
}

/// The plugin's side of an open gRPC call or stream, held by the host.
pub trait GrpcStream: Send {
    /// Sends one message; `end_of_stream` half-closes after it.
    fn send(&mut self, message: Bytes, end_of_stream: bool);
    /// Half-closes: no more messages from the plugin; responses may still arrive.
    fn close(&mut self);
    /// Resets the call; nothing more is delivered.
    fn cancel(&mut self);
}

/// Carries out a plugin's outbound calls. Both methods must return quickly: start the call
/// and answer through the reply handle later, from any thread.
pub trait Callouts: Send + Sync {
    /// Starts an HTTP call.
    fn http_call(&self, request: HttpCallRequest, reply: HttpCallReply)
    -> Result<(), CalloutError>;

    /// Opens a gRPC call or stream. Unary calls are streams the host sends one message on,
    /// with `end_of_stream`.
    fn grpc_open(
        &self,
        request: GrpcRequest,
        reply: GrpcReply,
    ) -> Result<Box<dyn GrpcStream>, CalloutError>;
}

/// The default: no callouts. Every call answers [`CalloutError::Unsupported`].
#[derive(Debug, Default, Clone, Copy)]
pub struct NoCallouts;

impl Callouts for NoCallouts {
    fn http_call(&self, _: HttpCallRequest, _: HttpCallReply) -> Result<(), CalloutError> {
        Err(CalloutError::Unsupported)
    }

    fn grpc_open(&self, _: GrpcRequest, _: GrpcReply) -> Result<Box<dyn GrpcStream>, CalloutError> {
        Err(CalloutError::Unsupported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::callout::{CalloutBytes, HttpCallResponse};

    #[test]
    fn counted_bytes_hold_their_budget_until_the_last_clone_drops() {
        let budget = CalloutBytes::new(100);
        let held = budget.counted(Bytes::from(vec![7u8; 60])).expect("fits");
        let clone = held.clone();
        assert_eq!(budget.held(), 60);
        assert!(budget.counted(Bytes::from(vec![7u8; 41])).is_none());
        drop(held);
        assert_eq!(budget.held(), 60, "a clone still holds the bytes");
        assert_eq!(&clone[..], &[7u8; 60][..]);
        drop(clone);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn a_grpc_message_over_the_budget_closes_the_call() {
        let inbox = Arc::new(Inbox::new(100));
        let mut reply = GrpcReply::new(&inbox, 2);
        reply.send(GrpcEvent::Message(Bytes::from(vec![1u8; 80])));
        assert_eq!(inbox.budget().held(), 80);
        reply.send(GrpcEvent::Message(Bytes::from(vec![1u8; 80])));
        assert!(reply.is_closed());
        let events: Vec<_> = inbox.take().into_iter().collect();
        assert!(matches!(
            events.as_slice(),
            [
                Pending::Grpc { event: GrpcEvent::Message(_), .. },
                Pending::Grpc { event: GrpcEvent::Close { status, .. }, .. },
            ] if *status == GrpcStatus::ResourceExhausted.as_u32()
        ));
        drop(events);
        assert_eq!(
            inbox.budget().held(),
            0,
            "delivered events give their bytes back"
        );
    }

    #[test]
    fn an_http_answer_over_the_budget_fails_the_call() {
        let inbox = Arc::new(Inbox::new(100));
        let reply = HttpCallReply::new(&inbox, 1);
        assert!(reply.reserve(60).is_ok());
        assert_eq!(reply.reserve(41).map_err(|e| e.limit()), Err(100));
        reply.send(HttpCallOutcome::Response(HttpCallResponse {
            body: Bytes::from(vec![0u8; 101]),
            ..HttpCallResponse::default()
        }));
        let events: Vec<_> = inbox.take().into_iter().collect();
        assert!(matches!(
            events.as_slice(),
            [Pending::HttpResponse { outcome: HttpCallOutcome::Failed(why), .. }]
                if why.contains("100-byte budget")
        ));
        drop(events);
        assert_eq!(inbox.budget().held(), 0);
    }
}
