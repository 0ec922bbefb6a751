//! A ready `ProxyHttp`: the plugin chain around the embedder's choice of upstream.

use crate::{WasmCtx, WasmFilters};
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::protocols::Digest;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType, Result};
use std::time::Duration;

/// Where a [`WasmProxy`] sends an exchange the plugins let through: your `upstream_peer`
/// logic. A fixed [`HttpPeer`] is one.
#[async_trait]
pub trait UpstreamPeer: Send + Sync + 'static {
    /// The peer for this request (after the request headers went through the plugins, so a
    /// plugin's rewrite of `:authority` or `:path` counts).
    async fn upstream_peer(&self, session: &mut Session) -> Result<Box<HttpPeer>>;
}

#[async_trait]
impl UpstreamPeer for HttpPeer {
    async fn upstream_peer(&self, _session: &mut Session) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.clone()))
    }
}

/// A `ProxyHttp` that runs every exchange through a plugin chain ([`WasmFilters`]) on its way
/// to the peer `upstream` picks. Hand it to `pingora::proxy::http_proxy_service`.
#[derive(Debug)]
pub struct WasmProxy<U> {
    filters: WasmFilters,
    upstream: U,
}

impl<U: UpstreamPeer> WasmProxy<U> {
    /// Runs `filters` in front of `upstream`.
    pub fn new(filters: WasmFilters, upstream: U) -> Self {
        WasmProxy { filters, upstream }
    }

    /// The filters (their [`WasmFilters::chain`] swaps the chain while traffic flows).
    pub fn filters(&self) -> &WasmFilters {
        &self.filters
    }
}

#[async_trait]
impl<U: UpstreamPeer> ProxyHttp for WasmProxy<U> {
    type CTX = WasmCtx;

    fn new_ctx(&self) -> WasmCtx {
        self.filters.new_ctx()
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        _ctx: &mut WasmCtx,
    ) -> Result<Box<HttpPeer>> {
        self.upstream.upstream_peer(session).await
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut WasmCtx) -> Result<bool> {
        self.filters.request_filter(session, ctx).await
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut WasmCtx,
    ) -> Result<()> {
        self.filters
            .request_body_filter(session, body, end_of_stream, ctx)
            .await
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut WasmCtx,
    ) -> Result<()> {
        self.filters.response_filter(session, response, ctx).await
    }

    fn response_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut WasmCtx,
    ) -> Result<Option<Duration>> {
        self.filters
            .response_body_filter(session, body, end_of_stream, ctx)
    }

    async fn response_trailer_filter(
        &self,
        session: &mut Session,
        trailers: &mut http::HeaderMap,
        ctx: &mut WasmCtx,
    ) -> Result<Option<Bytes>> {
        self.filters
            .response_trailer_filter(session, trailers, ctx)
            .await
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&Digest>,
        ctx: &mut WasmCtx,
    ) -> Result<()> {
        self.filters.connected_to_upstream(peer, ctx).await;
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        error: &Error,
        ctx: &mut WasmCtx,
    ) -> FailToProxy {
        if let Some(answered) = self.filters.fail_to_proxy(error, ctx) {
            return answered;
        }
        // Pingora's own answer to a failure (its default `fail_to_proxy`).
        let code = match (error.etype(), error.esource()) {
            (ErrorType::HTTPStatus(code), _) => *code,
            (_, ErrorSource::Upstream) => 502,
            (
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed,
                ErrorSource::Downstream,
            ) => 0,
            (_, ErrorSource::Downstream) => 400,
            _ => 500,
        };
        if code > 0
            && let Err(e) = session.respond_error(code).await
        {
            tracing::debug!("cannot send the error response: {e}");
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut WasmCtx) {
        self.filters.logging(session, error, ctx).await;
    }
}
