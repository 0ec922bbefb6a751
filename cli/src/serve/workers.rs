//! The threads that serve client connections.
//!
//! By default each worker thread runs a tokio runtime of its own (current-thread, no work
//! stealing), as Pingora's and nginx's workers do: a connection, its requests, their plugin
//! exchanges, the response-body pumps and the upstream connections they use all stay on one
//! thread from accept to close. An exchange then always finds its slot's VMs on its own
//! thread, free (no lock contention, no hand-off), and no wake-up crosses threads. The accept
//! loop hands each new connection to the worker with the fewest open ones.
//!
//! With `work_stealing: true` in the config, connections are served on the main multi-thread
//! runtime instead: a long plugin callback then delays only its own task, at the price of
//! exchanges meeting their slot busy on another thread.

use anyhow::{Context as _, Result};
use std::cell::Cell;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    /// This thread's worker number, from 1; 0 on every other thread.
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The calling thread's worker number (from 1), or 0 off the workers: what picks the
/// worker's own upstream client.
pub(super) fn current() -> usize {
    WORKER.with(Cell::get)
}

/// How long a stopping worker gives the blocking tasks of its runtime.
const STOP_TIMEOUT: Duration = Duration::from_millis(100);

/// Where connections are served.
pub(super) enum Workers {
    /// On the runtime of this handle (multi-thread, with work stealing).
    Stealing(Handle),
    /// Each on one of these threads, for its whole life.
    Pinned(Vec<Worker>),
}

/// A worker thread and its runtime.
pub(super) struct Worker {
    handle: Handle,
    /// Connections open on this worker.
    open: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Workers {
    /// `count` worker threads with a current-thread runtime each; returns once they run.
    pub(super) fn pinned(count: usize) -> Result<Workers> {
        let mut workers = Vec::with_capacity(count);
        for number in 1..=count.max(1) {
            let (started, handle) = std::sync::mpsc::channel();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("filterbox-worker-{number}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(number));
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(error) => {
                            let _ = started.send(Err(error));
                            return;
                        }
                    };
                    let _ = started.send(Ok(runtime.handle().clone()));
                    // The connections are tasks of this runtime: they run while it waits.
                    let _ = runtime.block_on(stopped);
                    runtime.shutdown_timeout(STOP_TIMEOUT);
                })
                .context("starting a worker thread")?;
            let handle = handle
                .recv()
                .context("a worker thread ended as it started")?
                .context("starting a worker's tokio runtime")?;
            workers.push(Worker {
                handle,
                open: Arc::new(AtomicUsize::new(0)),
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(Workers::Pinned(workers))
    }

    /// Each worker's count of open connections, in worker order (none with work stealing).
    pub(super) fn open_connections(&self) -> Vec<Arc<AtomicUsize>> {
        match self {
            Workers::Stealing(_) => Vec::new(),
            Workers::Pinned(workers) => workers.iter().map(|w| w.open.clone()).collect(),
        }
    }

    /// Serves a connection: `serve` is given the accepted stream on the worker that takes it.
    pub(super) fn serve<F, Fut>(&self, stream: tokio::net::TcpStream, serve: F)
    where
        F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let workers = match self {
            Workers::Stealing(handle) => {
                handle.spawn(serve(stream));
                return;
            }
            Workers::Pinned(workers) => workers,
        };
        let Some(worker) = workers
            .iter()
            .min_by_key(|w| w.open.load(Ordering::Relaxed))
        else {
            return;
        };
        // The stream is registered with the accepting runtime's reactor: it moves to the
        // worker's as a plain socket.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => return tracing::warn!("handing a connection to a worker: {error}"),
        };
        let open = OpenConnection::new(worker.open.clone());
        worker.handle.spawn(async move {
            let _open = open;
            match tokio::net::TcpStream::from_std(stream) {
                Ok(stream) => serve(stream).await,
                Err(error) => tracing::warn!("taking a connection on a worker: {error}"),
            }
        });
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Counts a connection open on its worker until dropped.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn new(open: Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(open)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
