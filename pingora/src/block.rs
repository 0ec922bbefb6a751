//! A wait for a future on the calling thread, for Pingora's synchronous phases.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

/// Wakes the thread blocked in [`block_within`].
struct ThreadWaker(std::thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs `future` on this thread until it is done or `limit` has passed (`None`). For
/// Pingora's synchronous phases: a callback that runs inline finishes at the first poll; a
/// paused plugin is woken by whoever answers it on another thread. The wait does not depend
/// on the runtime this thread belongs to, which may be the one blocked here.
pub(crate) fn block_within<F: Future>(future: F, limit: Duration) -> Option<F::Output> {
    thread_local! {
        // Made once per thread: this runs for every response body chunk.
        static WAKER: Waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    }
    let mut future = std::pin::pin!(future);
    WAKER.with(|waker| {
        let mut cx = Context::from_waker(waker);
        // Read the clock only once the future has to be waited for (the usual inline
        // callback is ready at the first poll).
        let mut deadline = None;
        loop {
            if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
                return Some(output);
            }
            let now = Instant::now();
            let left = deadline
                .get_or_insert(now + limit)
                .saturating_duration_since(now);
            if left.is_zero() {
                return None;
            }
            std::thread::park_timeout(left);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_within_returns_what_is_ready_and_gives_up_at_the_limit() {
        assert_eq!(block_within(async { 7 }, Duration::ZERO), Some(7));
        let started = Instant::now();
        let never = std::future::pending::<()>();
        assert_eq!(block_within(never, Duration::from_millis(30)), None);
        assert!(started.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn block_within_is_woken_by_another_thread() {
        let (send, receive) = tokio::sync::oneshot::channel();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            let _ = send.send(5);
        });
        // Far more than the sender needs, however busy the machine: the answer wakes it.
        let got = block_within(receive, Duration::from_secs(60));
        assert_eq!(got, Some(Ok(5)));
        sender.join().expect("sender");
    }
}
