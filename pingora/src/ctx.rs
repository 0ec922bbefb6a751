//! The helpers a `ProxyHttp` calls from its phases, and the state of one exchange between
//! them. What crosses this module: Pingora's session, request and response headers and body
//! chunks in; the same, as the plugins left them (or the local reply one of them gave), out.

use crate::block::block_within;
use crate::headers::{apply_request, apply_response, has_body, reply_header};
use bytes::Bytes;
use filterbox::{ConnectionInfo, Exchange, FilterChain, HeaderMap, LocalResponse, SharedChain};
use pingora::http::ResponseHeader;
use pingora::proxy::{FailToProxy, Session};
use pingora::upstreams::peer::{HttpPeer, Peer};
use pingora::{Error, ErrorSource, ErrorType, Result};
use std::time::Duration;

/// A chain of proxy-wasm plugins for a Pingora proxy: call its methods from the phases of
/// your `ProxyHttp` of the same names, with the exchange's [`WasmCtx`] (from
/// [`WasmFilters::new_ctx`], kept in your `CTX`).
///
/// | your `ProxyHttp` method | call |
/// |---|---|
/// | `new_ctx` | [`WasmFilters::new_ctx`] |
/// | `request_filter` | [`WasmFilters::request_filter`] (return early if it returns `true`) |
/// | `request_body_filter` | [`WasmFilters::request_body_filter`] |
/// | `response_filter` | [`WasmFilters::response_filter`] |
/// | `response_body_filter` | [`WasmFilters::response_body_filter`] |
/// | `response_trailer_filter` | [`WasmFilters::response_trailer_filter`] |
/// | `connected_to_upstream` | [`WasmFilters::connected_to_upstream`] |
/// | `fail_to_proxy` | [`WasmFilters::fail_to_proxy`] |
/// | `logging` | [`WasmFilters::logging`] |
///
/// Cloning is cheap; clones share the chain, and [`WasmFilters::chain`] swaps it for every
/// clone at once (exchanges in flight finish on the chain they started with).
///
/// A chain per route: keep a `WasmFilters` per route and make the exchange's context in
/// `request_filter` (once the request is known) with the route's [`WasmFilters::new_ctx`].
/// The phase methods act on the chain of the context they are given, whichever
/// `WasmFilters` they are called on.
#[derive(Clone, Debug)]
pub struct WasmFilters {
    chain: SharedChain,
}

/// The plugins' state of one exchange: made by [`WasmFilters::new_ctx`], passed to every
/// phase. Dropping it before [`WasmFilters::logging`] ends the plugins' streams without
/// `proxy_on_log` (a client that went away).
#[derive(Debug)]
pub struct WasmCtx {
    /// `None` once the exchange ended.
    exchange: Option<Exchange>,
    /// How long the synchronous response body phase waits for a paused plugin.
    pause_timeout: Duration,
    /// The status of the local reply this crate sent or put in place of the response.
    replied: Option<u16>,
    /// The request had no body (its headers ended it).
    request_ended: bool,
    /// The response has no body (its headers ended it).
    response_ended: bool,
    /// A local reply replaced the upstream's response: its body, until sent.
    reply_body: Option<Option<Bytes>>,
}

impl WasmCtx {
    /// The status of the local reply the plugins (or the chain: a limit, a failure policy)
    /// gave this exchange, if they answered it.
    pub fn replied(&self) -> Option<u16> {
        self.replied
    }
}

/// The exchange, while it runs plugins (none once it ended, or for an empty chain). A
/// function of the field, so that the other fields of the context stay writable.
fn running(exchange: &mut Option<Exchange>) -> Option<&mut Exchange> {
    exchange.as_mut().filter(|e| !e.is_empty())
}

impl WasmFilters {
    /// Runs every exchange through `chain`.
    pub fn new(chain: FilterChain) -> Self {
        WasmFilters {
            chain: SharedChain::new(chain),
        }
    }

    /// Runs every exchange through whatever chain `chain` holds when the exchange starts.
    pub fn shared(chain: SharedChain) -> Self {
        WasmFilters { chain }
    }

    /// The chain new exchanges start on; [`SharedChain::replace`] swaps it while traffic
    /// flows.
    pub fn chain(&self) -> &SharedChain {
        &self.chain
    }

    /// The state of a new exchange, on the current chain.
    pub fn new_ctx(&self) -> WasmCtx {
        self.ctx_for(None)
    }

    /// [`WasmFilters::new_ctx`] on the chain's route `route` (see
    /// [`FilterChainBuilder::route`](filterbox::FilterChainBuilder::route)): the plugins it
    /// skips do not run, the ones it configures run under its configuration, in the same VMs.
    /// A name the current chain does not have runs every plugin with its own configuration.
    pub fn new_ctx_on(&self, route: &str) -> WasmCtx {
        self.ctx_for(Some(route))
    }

    fn ctx_for(&self, route: Option<&str>) -> WasmCtx {
        let chain = self.chain.current();
        let exchange = match route.and_then(|name| chain.route(name)) {
            Some(route) => chain.exchange_on(route),
            None => chain.exchange(),
        };
        WasmCtx {
            pause_timeout: chain.pause_timeout(),
            exchange: Some(exchange),
            replied: None,
            request_ended: false,
            response_ended: false,
            reply_body: None,
        }
    }

    /// The request headers through the plugins (`proxy_on_request_headers`), with what
    /// Pingora knows of the connection as Envoy's attributes (`source.address`, `source.port`,
    /// `destination.address`, `destination.port`, and on TLS `connection.tls_version`,
    /// `connection.mtls`). The request goes on as the plugins left it. Returns `true` when a
    /// plugin answered it: the reply has been sent, and your `request_filter` should return
    /// `Ok(true)` as well.
    pub async fn request_filter(&self, session: &mut Session, ctx: &mut WasmCtx) -> Result<bool> {
        let Some(exchange) = running(&mut ctx.exchange) else {
            return Ok(false);
        };
        set_connection_attributes(exchange, session);
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        let scheme = if tls { "https" } else { "http" };
        let headers = HeaderMap::from_request_parts_with_scheme(session.req_header(), Some(scheme));
        let ended = session.is_body_empty();
        ctx.request_ended = ended;
        let passed = match exchange.request_headers(headers, ended).await {
            Ok(passed) => passed,
            Err(local) => return reply(session, ctx, local).await.map(|()| true),
        };
        // A map no plugin changed changes nothing (most plugins only read the headers).
        if !passed.is_pristine()
            && let Err(local) = apply_request(session.req_header_mut(), passed)
        {
            return reply(session, ctx, local).await.map(|()| true);
        }
        Ok(false)
    }

    /// A request body chunk through the plugins (`proxy_on_request_body`): `body` becomes
    /// what they let through (`None` while one of them holds the body). A plugin that answers
    /// here gets its reply sent, and the phase fails so that Pingora stops proxying (see
    /// [`WasmFilters::fail_to_proxy`]).
    pub async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut WasmCtx,
    ) -> Result<()> {
        if ctx.request_ended {
            return Ok(());
        }
        let Some(exchange) = running(&mut ctx.exchange) else {
            return Ok(());
        };
        let chunk = body.take().unwrap_or_default();
        let passed = match exchange.request_body(chunk, end_of_stream).await {
            Ok(passed) => passed,
            Err(local) => {
                let status = local.status_code;
                reply(session, ctx, local).await?;
                return Err(answered(status));
            }
        };
        *body = (!passed.is_empty()).then_some(passed);
        if end_of_stream {
            ctx.request_ended = true;
            if let Ok(Some(_)) = exchange.request_added_trailers().await {
                tracing::warn!("a plugin added request trailers; Pingora cannot send them");
            }
        }
        Ok(())
    }

    /// The response headers through the plugins (`proxy_on_response_headers`, in reverse
    /// chain order); `response` becomes what they left. A plugin that answers here replaces
    /// the upstream's response with its reply (status, headers and, in the body phase, body).
    pub async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut WasmCtx,
    ) -> Result<()> {
        if response.status.is_informational() {
            return Ok(());
        }
        let ended = !has_body(session.req_header(), response.status);
        let Some(exchange) = running(&mut ctx.exchange) else {
            return Ok(());
        };
        let sent = HeaderMap::from_response_parts(response);
        let outcome = match exchange.response_headers(sent, ended).await {
            Ok(passed) if passed.is_pristine() => Ok(()),
            Ok(passed) => apply_response(response, passed, ended),
            Err(local) => Err(local),
        };
        ctx.response_ended = ended;
        if let Err(local) = outcome {
            let reply = exchange.reply_directly(local);
            *response = reply_header(&reply)?;
            ctx.replied = Some(reply.status);
            ctx.reply_body = Some(Some(reply.body));
        }
        Ok(())
    }

    /// A response body chunk through the plugins (`proxy_on_response_body`): `body` becomes
    /// what they let through. Pingora calls this phase synchronously: a plugin that pauses
    /// at the last chunk is waited for on this thread, up to the chain's pause timeout. A
    /// plugin that answers here, after the headers went out, ends the response (the phase
    /// fails).
    pub fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut WasmCtx,
    ) -> Result<Option<Duration>> {
        if let Some(reply) = &mut ctx.reply_body {
            // The upstream's body is dropped; the reply's goes out once.
            *body = reply.take().filter(|b| !b.is_empty());
            return Ok(None);
        }
        if ctx.response_ended {
            return Ok(None);
        }
        let limit = ctx.pause_timeout;
        let Some(exchange) = running(&mut ctx.exchange) else {
            return Ok(None);
        };
        let chunk = body.take().unwrap_or_default();
        let passed = block_within(exchange.response_body(chunk, end_of_stream), limit)
            .unwrap_or_else(|| Err(timed_out()));
        let passed = match passed {
            Ok(passed) => passed,
            Err(local) => {
                tracing::warn!(
                    status = local.status_code,
                    details = %local.details,
                    "a plugin answered after the response headers were sent; ending the response"
                );
                let status = local.status_code;
                exchange.reply_directly(local);
                return Err(answered(status));
            }
        };
        *body = (!passed.is_empty()).then_some(passed);
        if end_of_stream {
            ctx.response_ended = true;
            let added = block_within(exchange.response_added_trailers(), limit);
            if let Some(Ok(Some(_))) = added {
                tracing::warn!("a plugin added response trailers; Pingora cannot send them");
            }
        }
        Ok(None)
    }

    /// The response trailers through the plugins (`proxy_on_response_trailers`); `trailers`
    /// becomes what they left.
    pub async fn response_trailer_filter(
        &self,
        _session: &mut Session,
        trailers: &mut http::HeaderMap,
        ctx: &mut WasmCtx,
    ) -> Result<Option<Bytes>> {
        if ctx.reply_body.is_some() || ctx.response_ended {
            return Ok(None);
        }
        let Some(exchange) = running(&mut ctx.exchange) else {
            return Ok(None);
        };
        ctx.response_ended = true;
        match exchange
            .response_trailers(HeaderMap::from_http(trailers))
            .await
        {
            Ok((held, passed)) => {
                if !held.is_empty() {
                    tracing::warn!(
                        bytes = held.len(),
                        "a plugin held response body until the trailers; Pingora cannot send it"
                    );
                }
                *trailers = passed.to_http().map_err(|e| {
                    Error::explain(ErrorType::InternalError, format!("plugin trailers: {e}"))
                })?;
                Ok(None)
            }
            Err(local) => {
                let status = local.status_code;
                exchange.reply_directly(local);
                Err(answered(status))
            }
        }
    }

    /// Tells the plugins which upstream the exchange went to (Envoy's `upstream.address` and
    /// `upstream.port`), for their response phase and `proxy_on_log`. Call it from
    /// `connected_to_upstream`.
    pub async fn connected_to_upstream(&self, peer: &HttpPeer, ctx: &mut WasmCtx) {
        let Some(exchange) = running(&mut ctx.exchange) else {
            return;
        };
        let Some(address) = peer.address().as_inet() else {
            return;
        };
        // A slot that failed here fails the exchange's next phase as well, which answers it.
        if let Err(local) = exchange.set_upstream_address(*address).await {
            tracing::debug!(details = %local.details, "cannot set the upstream's attributes");
        }
    }

    /// What your `fail_to_proxy` should do first: when the failure is a plugin's answer that
    /// this crate already sent, report its status without writing another response;
    /// otherwise `None`, and Pingora's usual error response is yours to send.
    pub fn fail_to_proxy(&self, _error: &Error, ctx: &WasmCtx) -> Option<FailToProxy> {
        ctx.replied.map(|status| FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        })
    }

    /// Ends the exchange: `proxy_on_log` in every plugin (with the headers as the phases
    /// left them), then the end of their streams. Call it from `logging`.
    pub async fn logging(&self, _session: &mut Session, _error: Option<&Error>, ctx: &mut WasmCtx) {
        if let Some(exchange) = ctx.exchange.take() {
            exchange.finish_and_wait().await;
        }
    }
}

/// Tells the plugins what Pingora knows of the connection: where it comes from and goes to,
/// and its TLS version and whether the client showed a certificate.
fn set_connection_attributes(exchange: &mut Exchange, session: &Session) {
    let tls = session.digest().and_then(|d| d.ssl_digest.as_ref());
    let connection = ConnectionInfo {
        source: session.client_addr().and_then(|a| a.as_inet()).copied(),
        destination: session.server_addr().and_then(|a| a.as_inet()).copied(),
        // Envoy writes `TLSv1.3`; Pingora's rustls digest says `TLSv1_3`.
        tls_version: tls.map(|tls| tls.version.replace("TLSv1_", "TLSv1.")),
        mtls: tls.is_some_and(|tls| !tls.cert_digest.is_empty()),
        requested_server_name: None,
    };
    exchange.set_connection(std::sync::Arc::new(connection));
}

/// The synchronous wait for a paused response body outlived the chain's pause timeout.
fn timed_out() -> LocalResponse {
    LocalResponse::new(504, "filterbox_pause_timeout")
}

/// Answers the exchange with `local` before the response started: through the plugins'
/// response phase ([`Exchange::reply`]), then to the client.
async fn reply(session: &mut Session, ctx: &mut WasmCtx, local: LocalResponse) -> Result<()> {
    let Some(exchange) = ctx.exchange.as_mut() else {
        return Ok(());
    };
    let reply = exchange.reply(local).await;
    ctx.replied = Some(reply.status);
    ctx.request_ended = true;
    ctx.response_ended = true;
    let header = reply_header(&reply)?;
    let ended = reply.body.is_empty();
    session
        .write_response_header(Box::new(header), ended)
        .await?;
    if !ended {
        session.write_response_body(Some(reply.body), true).await?;
    }
    Ok(())
}

/// The error a phase returns after a plugin answered: Pingora stops proxying and calls
/// `fail_to_proxy` (where [`WasmFilters::fail_to_proxy`] says the reply was sent).
fn answered(status: u32) -> Box<Error> {
    let status = u16::try_from(status).unwrap_or(500);
    let mut error = Error::explain(
        ErrorType::HTTPStatus(status),
        "answered by a proxy-wasm plugin",
    );
    error.esource = ErrorSource::Internal;
    error
}
