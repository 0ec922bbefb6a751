//! Plain `http://` HTTP/1.1 upstream connections kept per worker thread.
//!
//! A worker's upstream connections are used on the worker's thread only (its runtime drives
//! them), so they need no pool shared between threads: each worker keeps, per address, a list
//! of its open connections. A request takes the oldest one that is free, or opens one, and
//! puts it back as soon as the request is on its way; the connection is free again once its
//! response has been read to the end. hyper-util's general client does more per request
//! (it boxes its request future, keys a pool shared by every thread, and spawns a task per
//! response to put the connection back): about 1 µs of `serve`'s user CPU per request in a
//! perf profile with no plugin, against 0.25 µs here. TLS and HTTP/2 upstreams keep using
//! that client.
//!
//! What crosses this module: a request in origin form with its `host` header and the
//! address's host and port in; the upstream's response, or whether the connection could not
//! be made ([`SendError::is_connect`]), out.

use super::SendError;
use filterbox::FilteredBody;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

/// How long a connection may wait unused before it is closed (hyper-util's default).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Connections kept per worker and address; more in use at once are closed after their
/// response.
const KEPT: usize = 1024;

/// One address's connections, a list per worker thread.
#[derive(Debug)]
pub struct Connections {
    /// Index: worker number − 1.
    workers: Vec<Mutex<VecDeque<Kept>>>,
}

struct Kept {
    sender: SendRequest<FilteredBody>,
    /// When the connection was last put back.
    since: Instant,
}

impl fmt::Debug for Kept {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kept").field("since", &self.since).finish()
    }
}

impl Connections {
    /// Lists for workers 1 to `workers`.
    pub fn new(workers: usize) -> Connections {
        Connections {
            workers: (0..workers).map(|_| Mutex::default()).collect(),
        }
    }

    /// Worker `worker`'s list, if it has one (worker numbers start at 1).
    fn list(&self, worker: usize) -> Option<&Mutex<VecDeque<Kept>>> {
        worker
            .checked_sub(1)
            .and_then(|index| self.workers.get(index))
    }

    /// Whether requests from worker `worker` are sent here (else: the general client).
    pub fn serves(&self, worker: usize) -> bool {
        self.list(worker).is_some()
    }

    /// The oldest free connection of `worker`'s, dropping those closed or unused too long.
    fn take(&self, worker: usize) -> Option<SendRequest<FilteredBody>> {
        let mut list = self.list(worker)?.lock();
        let now = Instant::now();
        // Each connection is looked at once: busy ones go back behind the others.
        for _ in 0..list.len() {
            let kept = list.pop_front()?;
            if kept.sender.is_closed() || now.duration_since(kept.since) > IDLE_TIMEOUT {
                continue;
            }
            if kept.sender.is_ready() {
                return Some(kept.sender);
            }
            list.push_back(kept);
        }
        None
    }

    /// Keeps `sender` for `worker`'s next requests (unless it keeps [`KEPT`] already).
    fn put(&self, worker: usize, sender: SendRequest<FilteredBody>) {
        if let Some(list) = self.list(worker) {
            let mut list = list.lock();
            if list.len() < KEPT {
                list.push_back(Kept {
                    sender,
                    since: Instant::now(),
                });
            }
        }
    }

    /// Sends `request` (origin form, with its `host` header) to `host`:`port` on a
    /// connection of worker `worker` (the calling thread's): a kept one, or a new one.
    pub async fn send(
        &self,
        worker: usize,
        host: &str,
        port: u16,
        mut request: http::Request<FilteredBody>,
    ) -> Result<http::Response<Incoming>, SendError> {
        loop {
            let (mut sender, reused) = match self.take(worker) {
                Some(sender) => (sender, true),
                None => (connect(host, port).await?, false),
            };
            let response = sender.try_send_request(request);
            // The connection is free for another request once this one's response has been
            // read: it waits in the list until then.
            self.put(worker, sender);
            match response.await {
                Ok(response) => return Ok(response),
                Err(mut error) => match error.take_message() {
                    // A kept connection the upstream closed before the request went out: the
                    // request is whole, it goes on a new connection.
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(SendError::request(error.into_error())),
                },
            }
        }
    }
}

/// A new connection to `host`:`port` (TCP with `TCP_NODELAY`), driven by a task of the
/// calling thread's runtime.
async fn connect(host: &str, port: u16) -> Result<SendRequest<FilteredBody>, SendError> {
    let stream = tokio::net::TcpStream::connect((socket_host(host), port))
        .await
        .map_err(SendError::connect)?;
    stream.set_nodelay(true).map_err(SendError::connect)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(SendError::request)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!("upstream connection: {error}");
        }
    });
    Ok(sender)
}

/// A URI's host as a socket address takes it: an IPv6 literal without its brackets.
fn socket_host(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|inner| inner.strip_suffix(']'))
        .unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An upstream on 127.0.0.1 answering every request with its path (`/big`: 4 MiB, more
    /// than a connection reads ahead of its reader); with `keep_alive` false it closes each
    /// connection after one response. Returns its port and how many connections it
    /// accepted.
    async fn upstream(keep_alive: bool) -> (u16, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let service = hyper::service::service_fn(|request: http::Request<Incoming>| {
                    let body = match request.uri().path() {
                        "/big" => bytes::Bytes::from(vec![b'x'; 4 << 20]),
                        path => bytes::Bytes::from(path.to_owned()),
                    };
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(body),
                        ))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .keep_alive(keep_alive)
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        (port, accepted)
    }

    fn request(path: &str) -> http::Request<FilteredBody> {
        let mut request = http::Request::new(FilteredBody::empty());
        *request.uri_mut() = path.parse().expect("path");
        request
            .headers_mut()
            .insert(http::header::HOST, http::HeaderValue::from_static("test"));
        request
    }

    /// Sends `path` and returns the response's body.
    async fn get(connections: &Connections, port: u16, path: &str) -> String {
        let response = connections
            .send(1, "127.0.0.1", port, request(path))
            .await
            .expect("response");
        let body = response.into_body().collect().await.expect("body");
        String::from_utf8_lossy(&body.to_bytes()).into_owned()
    }

    /// Sends each of `paths` after the previous response was read, checking its answer.
    async fn get_in_turn(connections: &Connections, port: u16, paths: &[&str]) {
        for path in paths {
            assert_eq!(get(connections, port, path).await, *path);
            // The connection's task marks it free once it has seen the response end.
            tokio::task::yield_now().await;
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn a_worker_reuses_its_connection_once_the_response_is_read() {
        runtime().block_on(async {
            let (port, accepted) = upstream(true).await;
            let connections = Connections::new(1);
            get_in_turn(&connections, port, &["/a", "/b", "/c"]).await;
            assert_eq!(accepted.load(Ordering::SeqCst), 1);
        });
    }

    #[test]
    fn connections_in_use_are_not_shared_and_closed_ones_are_replaced() {
        runtime().block_on(async {
            let (port, accepted) = upstream(true).await;
            let connections = Connections::new(1);
            // A response still being read holds its connection: the next request opens
            // another.
            let big = connections
                .send(1, "127.0.0.1", port, request("/big"))
                .await
                .expect("big");
            assert_eq!(get(&connections, port, "/2").await, "/2");
            assert_eq!(accepted.load(Ordering::SeqCst), 2);
            let body = big.into_body().collect().await.expect("big body");
            assert_eq!(body.to_bytes().len(), 4 << 20);

            // An upstream that closes every connection after its response: each request
            // gets a connection that works, whatever the kept ones became.
            let (port, accepted) = upstream(false).await;
            let connections = Connections::new(1);
            get_in_turn(&connections, port, &["/x", "/y", "/z"]).await;
            assert_eq!(accepted.load(Ordering::SeqCst), 3);
        });
    }

    #[test]
    fn ipv6_literals_lose_their_brackets_to_connect() {
        assert_eq!(socket_host("[::1]"), "::1");
        assert_eq!(socket_host("127.0.0.1"), "127.0.0.1");
        assert_eq!(socket_host("backend.internal"), "backend.internal");
    }

    #[test]
    fn a_refused_connection_is_a_connect_error() {
        runtime().block_on(async {
            // A port just freed: nothing listens there.
            let port = {
                let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                listener.local_addr().expect("address").port()
            };
            let error = Connections::new(1)
                .send(1, "127.0.0.1", port, request("/"))
                .await
                .expect_err("refused");
            assert!(error.is_connect(), "{error}");
        });
    }
}
