//! Conversions between [`HeaderMap`] and the `http` crate's request and response parts, with
//! the pseudo headers proxy-wasm plugins expect (`:method`, `:scheme`, `:authority`, `:path`
//! on requests; `:status` on responses), as Envoy presents them.

use crate::HeaderMap;
use bytes::{Bytes, BytesMut};
use core::fmt;
use http::header::{HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, request, response};

/// Why a header map a plugin left could not become `http` parts.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HttpPartsError {
    /// A header name is not a valid HTTP token (or is an unknown pseudo header).
    BadName(Bytes),
    /// A header value holds bytes HTTP forbids (CR, LF, NUL).
    BadValue {
        /// The header.
        name: Bytes,
    },
    /// `:method` is not a method.
    BadMethod(Bytes),
    /// `:scheme`, `:authority` and `:path` do not make a URI.
    BadUri(String),
    /// `:status` is not a status code from 100 to 999.
    BadStatus(Bytes),
    /// More headers than an `http` header map can hold.
    TooManyHeaders,
}

impl fmt::Display for HttpPartsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = |b: &Bytes| String::from_utf8_lossy(b).into_owned();
        match self {
            HttpPartsError::BadName(name) => write!(f, "invalid header name {:?}", text(name)),
            HttpPartsError::BadValue { name } => {
                write!(f, "invalid value for header {:?}", text(name))
            }
            HttpPartsError::BadMethod(m) => write!(f, "invalid :method {:?}", text(m)),
            HttpPartsError::BadUri(reason) => write!(f, "invalid request URI: {reason}"),
            HttpPartsError::BadStatus(s) => write!(f, "invalid :status {:?}", text(s)),
            HttpPartsError::TooManyHeaders => f.write_str("more headers than HTTP can carry"),
        }
    }
}

impl std::error::Error for HttpPartsError {}

impl HeaderMap {
    /// The request's headers as a plugin sees them: `:method`, `:scheme` (if the URI has
    /// one), `:authority` (the URI's, else the `host` header's), `:path` (path and query),
    /// then the headers in order.
    pub fn from_request_parts(parts: &request::Parts) -> HeaderMap {
        HeaderMap::from_request_parts_with_scheme(parts, None)
    }

    /// [`HeaderMap::from_request_parts`], with `:scheme` `scheme` when the URI has none: a
    /// server knows it from the connection (`"http"` or `"https"`), and an origin-form
    /// request's URI does not say it. The map is [pristine](HeaderMap::is_pristine), as
    /// [`HeaderMap::from_request_parts`]'s is.
    pub fn from_request_parts_with_scheme(
        parts: &request::Parts,
        scheme: Option<&'static str>,
    ) -> HeaderMap {
        let method = parts.method.as_str().as_bytes();
        let uri_scheme = parts.uri.scheme_str().map(str::as_bytes);
        let authority = match parts.uri.authority() {
            Some(authority) => Some(authority.as_str().as_bytes()),
            None => parts
                .headers
                .get(http::header::HOST)
                .map(HeaderValue::as_bytes),
        };
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let copied = [Some(method), uri_scheme, authority, Some(path.as_bytes())]
            .iter()
            .flatten()
            .map(|bytes| bytes.len())
            .sum::<usize>()
            + http_bytes(&parts.headers);
        let mut arena = Arena::with_capacity(copied);
        let mut map = HeaderMap::with_capacity(parts.headers.len() + 4);
        map.add(
            ":method",
            known(method, &METHODS).unwrap_or_else(|| arena.copy(method)),
        );
        match (uri_scheme, scheme) {
            (Some(scheme), _) => map.add(
                ":scheme",
                known(scheme, &SCHEMES).unwrap_or_else(|| arena.copy(scheme)),
            ),
            (None, Some(scheme)) => map.add(":scheme", scheme),
            (None, None) => {}
        }
        if let Some(authority) = authority {
            map.add(":authority", arena.copy(authority));
        }
        map.add(":path", arena.copy(path.as_bytes()));
        map.extend_from_http(&parts.headers, &mut arena);
        map.set_pristine();
        map
    }

    /// The response's headers as a plugin sees them: `:status`, then the headers in order.
    pub fn from_response_parts(parts: &response::Parts) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(parts.headers.len() + 1);
        map.add(":status", status_text(parts.status));
        if !parts.headers.is_empty() {
            let mut arena = Arena::with_capacity(http_bytes(&parts.headers));
            map.extend_from_http(&parts.headers, &mut arena);
        }
        map.set_pristine();
        map
    }

    /// `http` headers (no pseudo headers), in order.
    pub fn from_http(headers: &http::HeaderMap) -> HeaderMap {
        let mut arena = Arena::with_capacity(http_bytes(headers));
        let mut map = HeaderMap::with_capacity(headers.len());
        map.extend_from_http(headers, &mut arena);
        map.set_pristine();
        map
    }

    fn extend_from_http(&mut self, headers: &http::HeaderMap, arena: &mut Arena) {
        for (name, value) in headers {
            self.add(
                arena.copy(name.as_str().as_bytes()),
                arena.copy(value.as_bytes()),
            );
        }
    }

    /// Writes this map (as a plugin left it) into request parts: the pseudo headers set the
    /// method and URI, the rest replace `parts.headers`. A missing pseudo header keeps what
    /// the parts had. On error `parts` is unchanged.
    pub fn to_request_parts(&self, parts: &mut request::Parts) -> Result<(), HttpPartsError> {
        self.request_changes(parts)?.apply(parts)
    }

    /// What [`HeaderMap::to_request_parts`] would change in `parts`, worked out without
    /// changing them: for an embedder whose request is not `http` parts it can replace (it
    /// applies the [`RequestChanges`] to its own type). Every error is found here.
    #[inline]
    pub fn request_changes(
        &self,
        parts: &request::Parts,
    ) -> Result<RequestChanges, HttpPartsError> {
        self.request_changes_with(parts, |_| false)
    }

    /// [`HeaderMap::request_changes`] for a proxy that sends requests in origin form (the
    /// form a server receives them in): the `:scheme` a plugin sees is the connection's, not
    /// part of the URI, and changes nothing here.
    pub fn origin_form_request_changes(
        &self,
        parts: &request::Parts,
    ) -> Result<RequestChanges, HttpPartsError> {
        self.request_changes_with(parts, |_| true)
    }

    /// [`HeaderMap::request_changes`], with a `:scheme` for which `implied` holds taken as
    /// absent (what the connection says rather than a URI change): that costs no copy of
    /// the map, as removing the entry would once the map is shared.
    #[inline]
    pub(crate) fn request_changes_with(
        &self,
        parts: &request::Parts,
        implied: impl Fn(&Bytes) -> bool,
    ) -> Result<RequestChanges, HttpPartsError> {
        let mut method = None;
        let (mut scheme, mut authority, mut path) = (None, None, None);
        for (name, value) in self.iter() {
            match name.as_ref() {
                b":method" => method = Some(value),
                b":scheme" => scheme = (!implied(value)).then_some(value),
                b":authority" => authority = Some(value),
                b":path" => path = Some(value),
                _ => {}
            }
        }
        let regular = |(name, _): &&(Bytes, Bytes)| {
            !matches!(
                name.as_ref(),
                b":method" | b":scheme" | b":authority" | b":path"
            )
        };
        let headers = HeaderChanges::of(&parts.headers, self.as_slice().iter().filter(regular))?;
        // `None`: the parts keep theirs (the usual case: nothing to parse, clone or drop).
        let method = match method {
            Some(m) if m.as_ref() == parts.method.as_str().as_bytes() => None,
            Some(m) => {
                Some(Method::from_bytes(m).map_err(|_| HttpPartsError::BadMethod(m.clone()))?)
            }
            None => None,
        };
        let unchanged = |value: Option<&Bytes>, old: Option<&str>| match value {
            None => true,
            Some(value) => old.is_some_and(|old| old.as_bytes() == value.as_ref()),
        };
        let uri = &parts.uri;
        let has_scheme = scheme.is_some() || uri.scheme().is_some();
        // Without a scheme (origin form: what a server receives) a plugin's `:authority` is a
        // `host` rewrite (as in Envoy), and the URI keeps no authority.
        let host = match authority {
            // The request's one `host`, as the headers will be, already says it (the usual
            // case): nothing to replace.
            Some(a) if !has_scheme && headers.keep_one_host(&parts.headers, a) => None,
            Some(a) if !has_scheme => {
                Some(HeaderValue::from_maybe_shared(a.clone()).map_err(|_| {
                    HttpPartsError::BadValue {
                        name: Bytes::from_static(b":authority"),
                    }
                })?)
            }
            _ => None,
        };
        // Nothing the plugins left changes the URI (the usual case): no need to rebuild it.
        let same_uri = unchanged(path, uri.path_and_query().map(|p| p.as_str()))
            && match has_scheme {
                true => {
                    unchanged(scheme, uri.scheme_str())
                        && unchanged(authority, uri.authority().map(|a| a.as_str()))
                }
                false => authority.is_none() || uri.authority().is_none(),
            };
        let uri = match same_uri {
            true => None,
            false => {
                let old = uri.clone().into_parts();
                let mut builder = Uri::builder();
                match (scheme, old.scheme) {
                    (Some(s), _) => builder = builder.scheme(s.as_ref()),
                    (None, Some(s)) => builder = builder.scheme(s),
                    (None, None) => {}
                }
                match (authority, old.authority) {
                    (Some(a), _) if has_scheme => builder = builder.authority(a.as_ref()),
                    // Set as `host` above.
                    (Some(_), _) => {}
                    (None, Some(a)) => builder = builder.authority(a),
                    (None, None) => {}
                }
                builder = match path {
                    Some(p) => builder.path_and_query(p.as_ref()),
                    None => builder.path_and_query(
                        old.path_and_query
                            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
                    ),
                };
                Some(
                    builder
                        .build()
                        .map_err(|e| HttpPartsError::BadUri(e.to_string()))?,
                )
            }
        };
        Ok(RequestChanges {
            method,
            uri,
            host,
            headers,
        })
    }

    /// Writes this map into response parts: `:status` sets the status, the rest replace
    /// `parts.headers`. On error `parts` is unchanged.
    pub fn to_response_parts(&self, parts: &mut response::Parts) -> Result<(), HttpPartsError> {
        self.response_changes(parts)?.apply(parts)
    }

    /// What [`HeaderMap::to_response_parts`] would change in `parts`, worked out without
    /// changing them (see [`HeaderMap::request_changes`]).
    #[inline]
    pub fn response_changes(
        &self,
        parts: &response::Parts,
    ) -> Result<ResponseChanges, HttpPartsError> {
        let mut status = None;
        for (name, value) in self.iter() {
            if name.as_ref() == b":status" {
                status = Some(
                    StatusCode::from_bytes(value)
                        .map_err(|_| HttpPartsError::BadStatus(value.clone()))?,
                );
            }
        }
        // The proxy frames the message for its own connection; a plugin's framing would
        // describe another body or another hop (response splitting).
        let forwarded = |(name, _): &&(Bytes, Bytes)| {
            name.as_ref() != b":status" && !is_hop_by_hop(name.as_ref())
        };
        let headers = HeaderChanges::of(&parts.headers, self.as_slice().iter().filter(forwarded))?;
        Ok(ResponseChanges {
            status: status.filter(|status| *status != parts.status),
            headers,
        })
    }

    /// The map without pseudo headers, as `http` headers (trailers, local-response headers).
    pub fn to_http(&self) -> Result<http::HeaderMap, HttpPartsError> {
        let mut headers = with_capacity(self.len())?;
        for (name, value) in self.iter().filter(|(n, _)| !n.starts_with(b":")) {
            append(&mut headers, parse(name, value)?)?;
        }
        Ok(headers)
    }
}

/// The methods `:method` is usually, as static bytes: these cost no copy.
const METHODS: [&[u8]; 9] = [
    b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE",
];

/// The schemes `:scheme` is usually.
const SCHEMES: [&[u8]; 2] = [b"http", b"https"];

/// The static bytes in `table` equal to `bytes`, if there are.
fn known(bytes: &[u8], table: &[&'static [u8]]) -> Option<Bytes> {
    table
        .iter()
        .find(|known| **known == bytes)
        .map(|known| Bytes::from_static(known))
}

/// The three digits of every status code `http` can hold (100 to 999), in order: a
/// response's `:status` is a slice of this instead of a copy.
static STATUS_DIGITS: [u8; 2700] = {
    let mut digits = [0u8; 2700];
    let mut code = 100;
    while code < 1000 {
        let at = (code - 100) * 3;
        digits[at] = b'0' + (code / 100) as u8;
        digits[at + 1] = b'0' + (code / 10 % 10) as u8;
        digits[at + 2] = b'0' + (code % 10) as u8;
        code += 1;
    }
    digits
};

/// `status` as three digits, without a copy.
fn status_text(status: StatusCode) -> Bytes {
    let at = usize::from(status.as_u16().saturating_sub(100)) * 3;
    match STATUS_DIGITS.get(at..at + 3) {
        Some(digits) => Bytes::from_static(digits),
        // `http` holds 100 to 999 only; a copy keeps this total anyway.
        None => Bytes::copy_from_slice(status.as_str().as_bytes()),
    }
}

/// The bytes of `headers`' names and values.
fn http_bytes(headers: &http::HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum()
}

/// Copies of many short byte strings in one allocation: each copy is a slice of one shared
/// buffer (a reference count) rather than an allocation of its own, which for a request's
/// headers was most of what converting them cost. A capacity too small only costs another
/// buffer.
struct Arena(BytesMut);

impl Arena {
    fn with_capacity(bytes: usize) -> Arena {
        Arena(BytesMut::with_capacity(bytes))
    }

    fn copy(&mut self, bytes: &[u8]) -> Bytes {
        self.0.extend_from_slice(bytes);
        self.0.split().freeze()
    }
}

/// The headers that describe one connection (RFC 9110 §7.6.1) or frame the message on it.
/// A proxy sets these for each hop itself; it never forwards them.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether `name` (lower case) is one of [`HOP_BY_HOP`].
pub(crate) fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP.iter().any(|h| h.as_bytes() == name)
}

/// Drops the headers that describe one connection (RFC 9110 §7.6.1), and those `connection`
/// names, so that they are not forwarded to the next hop.
pub fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    // One pass over the names finds which of these the message has (most have none, or only
    // `connection`), so that only those are removed: removing by a string name parses and
    // hashes it, and doing that for every one of them cost about 300 ns a message.
    let mut present: [Option<HeaderName>; HOP_BY_HOP.len()] = Default::default();
    for name in headers.keys() {
        let at = HOP_BY_HOP
            .iter()
            .position(|h| h.as_bytes() == name.as_str().as_bytes());
        if let Some(slot) = at.and_then(|at| present.get_mut(at)) {
            *slot = Some(name.clone());
        }
    }
    if present.iter().all(Option::is_none) {
        return;
    }
    // What `connection` names goes too; a name from the list above (`keep-alive`, its usual
    // value) is removed below anyway, and costs no parse here.
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|name| !HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name)))
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    for name in named.iter().chain(present.iter().flatten()) {
        headers.remove(name);
    }
}

/// What writing a plugin's request map back changes ([`HeaderMap::request_changes`]): every
/// value parsed and checked, nothing applied yet. `None` fields stay as the request has them.
#[derive(Debug)]
#[non_exhaustive]
pub struct RequestChanges {
    /// The method, if the plugins changed it.
    pub method: Option<Method>,
    /// The URI, if the plugins changed it.
    pub uri: Option<Uri>,
    /// The `host` header, replacing any, when the plugins' `:authority` on a request whose URI
    /// has no scheme (origin form) is not already the request's one `host`: Envoy's `host`
    /// rewrite.
    pub host: Option<HeaderValue>,
    /// The other headers.
    pub headers: HeaderChanges,
}

impl RequestChanges {
    /// Makes `parts` (those the changes were worked out from) what the changes say. Fails
    /// (changing nothing) only if `http` cannot hold that many headers.
    #[inline]
    pub fn apply(self, parts: &mut request::Parts) -> Result<(), HttpPartsError> {
        self.headers
            .apply_to(&mut parts.headers, usize::from(self.host.is_some()))?;
        if let Some(host) = self.host {
            // Cannot fail: `apply_to` left room for it.
            let _ = parts.headers.try_insert(http::header::HOST, host);
        }
        if let Some(method) = self.method {
            parts.method = method;
        }
        if let Some(uri) = self.uri {
            parts.uri = uri;
        }
        Ok(())
    }
}

/// What writing a plugin's response map back changes ([`HeaderMap::response_changes`]).
#[derive(Debug)]
#[non_exhaustive]
pub struct ResponseChanges {
    /// The status, if the plugins changed it.
    pub status: Option<StatusCode>,
    /// The headers (never hop-by-hop ones: see [`HeaderMap::to_response_parts`]).
    pub headers: HeaderChanges,
}

impl ResponseChanges {
    /// Makes `parts` (those the changes were worked out from) what the changes say. Fails
    /// (changing nothing) only if `http` cannot hold that many headers.
    #[inline]
    pub fn apply(self, parts: &mut response::Parts) -> Result<(), HttpPartsError> {
        self.headers.apply_to(&mut parts.headers, 0)?;
        if let Some(status) = self.status {
            parts.status = status;
        }
        Ok(())
    }
}

/// What a message's headers become so that they are the plugin's entries (in order).
#[derive(Debug)]
pub enum HeaderChanges {
    /// The headers stay, and these come after them: the entries began with all of the
    /// message's own, unchanged (plugins that change nothing or only add headers). The
    /// message keeps its map, with its parsed names and values: only the added entries were
    /// parsed.
    Append(AddedHeaders),
    /// A new map of every entry (each cost a validation, a hash and often an allocation).
    Replace(http::HeaderMap),
}

impl HeaderChanges {
    fn of<'a>(
        original: &http::HeaderMap,
        entries: impl Iterator<Item = &'a (Bytes, Bytes)> + Clone,
    ) -> Result<HeaderChanges, HttpPartsError> {
        let mut rest = entries.clone().peekable();
        let mut kept = 0;
        for (name, value) in original {
            match rest.peek() {
                Some((n, v))
                    if n.as_ref() == name.as_str().as_bytes() && *v == value.as_bytes() =>
                {
                    rest.next();
                    kept += 1;
                }
                _ => break,
            }
        }
        if kept == original.len() {
            let mut added = AddedHeaders::default();
            for (name, value) in rest {
                added.push(parse(name, value)?);
            }
            return Ok(HeaderChanges::Append(added));
        }
        // Room for every entry, as many as the plugin's map holds at most.
        let most = entries.size_hint().1.unwrap_or(original.len());
        let mut headers = with_capacity(most)?;
        for (name, value) in entries {
            append(&mut headers, parse(name, value)?)?;
        }
        Ok(HeaderChanges::Replace(headers))
    }

    /// Whether the headers will have one `host`, of `value` (`original`: what they are now).
    fn keep_one_host(&self, original: &http::HeaderMap, value: &[u8]) -> bool {
        let one_of = |headers: &http::HeaderMap| {
            let mut hosts = headers.get_all(http::header::HOST).iter();
            hosts.next().is_some_and(|h| h.as_bytes() == value) && hosts.next().is_none()
        };
        match self {
            HeaderChanges::Append(added) => {
                one_of(original) && !added.names().any(|name| name == http::header::HOST)
            }
            HeaderChanges::Replace(new) => one_of(new),
        }
    }

    /// Whether the message keeps its headers as they are.
    pub fn is_unchanged(&self) -> bool {
        matches!(self, HeaderChanges::Append(added) if added.is_empty())
    }

    /// Makes `headers` what [`HeaderChanges::of`] worked out, with room for `more` headers
    /// after. Fails (changing nothing) only if `http` cannot hold that many.
    fn apply_to(self, headers: &mut http::HeaderMap, more: usize) -> Result<(), HttpPartsError> {
        match self {
            HeaderChanges::Append(added) => {
                headers
                    .try_reserve(added.len() + more)
                    .map_err(|_| HttpPartsError::TooManyHeaders)?;
                for (name, value) in added {
                    // Cannot fail: the room is reserved.
                    let _ = headers.try_append(name, value);
                }
            }
            HeaderChanges::Replace(mut new) => {
                new.try_reserve(more)
                    .map_err(|_| HttpPartsError::TooManyHeaders)?;
                *headers = new;
            }
        }
        Ok(())
    }
}

/// Headers plugins added, parsed, in order. The first two are kept in place: plugins mostly
/// add one or two, and a vector for them was an allocation per message.
#[derive(Debug, Default)]
pub struct AddedHeaders {
    first: [Option<(HeaderName, HeaderValue)>; 2],
    more: Vec<(HeaderName, HeaderValue)>,
}

impl AddedHeaders {
    fn push(&mut self, header: (HeaderName, HeaderValue)) {
        match self.first.iter_mut().find(|slot| slot.is_none()) {
            Some(slot) => *slot = Some(header),
            None => self.more.push(header),
        }
    }

    fn names(&self) -> impl Iterator<Item = &HeaderName> {
        let first = self.first.iter().flatten();
        first.chain(&self.more).map(|(name, _)| name)
    }

    /// How many headers were added.
    pub fn len(&self) -> usize {
        self.first.iter().flatten().count() + self.more.len()
    }

    /// Whether none was.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl IntoIterator for AddedHeaders {
    type Item = (HeaderName, HeaderValue);
    type IntoIter = std::iter::Chain<
        std::iter::Flatten<std::array::IntoIter<Option<(HeaderName, HeaderValue)>, 2>>,
        std::vec::IntoIter<(HeaderName, HeaderValue)>,
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.first.into_iter().flatten().chain(self.more)
    }
}

/// An `http` header map for `n` headers; `http` holds at most 24,576 and panics past it.
fn with_capacity(n: usize) -> Result<http::HeaderMap, HttpPartsError> {
    http::HeaderMap::try_with_capacity(n).map_err(|_| HttpPartsError::TooManyHeaders)
}

fn append(
    headers: &mut http::HeaderMap,
    (name, value): (HeaderName, HeaderValue),
) -> Result<(), HttpPartsError> {
    headers
        .try_append(name, value)
        .map(|_| ())
        .map_err(|_| HttpPartsError::TooManyHeaders)
}

/// A header as `http` holds it, or why it cannot be one.
fn parse(name: &Bytes, value: &Bytes) -> Result<(HeaderName, HeaderValue), HttpPartsError> {
    let header = recent_names::parse(name).ok_or_else(|| HttpPartsError::BadName(name.clone()))?;
    // A copy: the value a plugin gave is a plain vector, whose first clone would allocate
    // (and then count references with atomics) just the same.
    let value = HeaderValue::from_bytes(value)
        .map_err(|_| HttpPartsError::BadValue { name: name.clone() })?;
    Ok((header, value))
}

/// Header names parsed for `http`, with the last few kept per thread. `http` copies a name
/// it does not know into an allocation of its own each time it parses one, and the names
/// plugins add are mostly the same few on every request: a kept one is cloned instead (a
/// reference count).
mod recent_names {
    use http::header::HeaderName;
    use std::cell::RefCell;

    /// How many names a thread keeps.
    const KEPT: usize = 8;
    /// Longer names are parsed every time (they are rare, and this bounds what is kept).
    const LONGEST: usize = 64;

    struct Recent {
        names: [Option<HeaderName>; KEPT],
        /// Where the next new name goes (the oldest is replaced).
        next: usize,
    }

    thread_local! {
        static RECENT: RefCell<Recent> = const {
            RefCell::new(Recent { names: [const { None }; KEPT], next: 0 })
        };
    }

    /// `name` as an `http` header name, or `None` if it is not one.
    pub(super) fn parse(name: &[u8]) -> Option<HeaderName> {
        if name.len() > LONGEST {
            return HeaderName::from_bytes(name).ok();
        }
        // The thread's cache is unavailable only while the thread is torn down: then every
        // name is parsed.
        let kept = RECENT
            .try_with(|recent| {
                let recent = recent.try_borrow().ok()?;
                let mut names = recent.names.iter().flatten();
                names.find(|kept| kept.as_str().as_bytes() == name).cloned()
            })
            .ok()
            .flatten();
        if kept.is_some() {
            return kept;
        }
        let parsed = HeaderName::from_bytes(name).ok()?;
        let _ = RECENT.try_with(|recent| {
            if let Ok(mut recent) = recent.try_borrow_mut() {
                let next = recent.next;
                if let Some(slot) = recent.names.get_mut(next) {
                    *slot = Some(parsed.clone());
                }
                recent.next = (next + 1) % KEPT;
            }
        });
        Some(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str) -> request::Parts {
        let (parts, ()) = http::Request::builder()
            .method("POST")
            .uri(uri)
            .header("host", "example.com")
            .header("x-a", "1")
            .header("x-a", "2")
            .body(())
            .expect("request")
            .into_parts();
        parts
    }

    fn pairs(map: &HeaderMap) -> Vec<(String, String)> {
        map.iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn requests_gain_pseudo_headers_and_keep_order_and_duplicates() {
        let map = HeaderMap::from_request_parts(&request("/p?q=1"));
        let expected = [
            (":method", "POST"),
            (":authority", "example.com"),
            (":path", "/p?q=1"),
            ("host", "example.com"),
            ("x-a", "1"),
            ("x-a", "2"),
        ];
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(pairs(&map), expected);
        let absolute = HeaderMap::from_request_parts(&request("https://api.test:8443/x"));
        assert_eq!(absolute.get_str(":scheme"), Some("https"));
        assert_eq!(absolute.get_str(":authority"), Some("api.test:8443"));
    }

    #[test]
    fn plugin_edits_go_back_into_the_parts() {
        let mut parts = request("/old");
        let mut map = HeaderMap::from_request_parts(&parts);
        map.replace(":path", "/new?x=y");
        map.replace(":method", "GET");
        map.remove("x-a");
        map.add("x-added", "yes");
        map.to_request_parts(&mut parts).expect("valid");
        assert_eq!(parts.method, Method::GET);
        assert_eq!(parts.uri, "/new?x=y");
        assert_eq!(
            parts.headers.get("x-added").map(|v| v.as_bytes()),
            Some(&b"yes"[..])
        );
        assert!(parts.headers.get("x-a").is_none());

        let mut absolute = request("http://a.test/x");
        let mut map = HeaderMap::from_request_parts(&absolute);
        map.replace(":authority", "b.test");
        map.to_request_parts(&mut absolute).expect("valid");
        assert_eq!(absolute.uri, "http://b.test/x");
    }

    /// What the parts' headers hold, in the `http` map's order.
    fn http_pairs(headers: &http::HeaderMap) -> Vec<(String, String)> {
        headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn kept_headers_and_rebuilt_headers_are_the_same_map() {
        // Each edit, applied both ways: through the parts the map came from (original headers
        // kept where they lead unchanged) and onto parts without headers (all parsed). (The
        // edits leave `host` alone: in an origin-form request `:authority` sets it.)
        type Edit = (&'static str, fn(&mut HeaderMap));
        let edits: [Edit; 6] = [
            ("nothing", |_| {}),
            ("an added header", |m| m.add("x-added", "yes")),
            ("a duplicate of an existing name", |m| m.add("x-a", "3")),
            ("a changed value", |m| m.replace("x-a", "9")),
            ("a removed header", |m| {
                m.remove("x-a");
            }),
            ("headers moved to the end", |m| {
                m.remove("x-a");
                m.add("x-a", "2");
                m.add("x-a", "1");
            }),
        ];
        for (what, edit) in edits {
            let mut parts = request("/p");
            let mut map = HeaderMap::from_request_parts(&parts);
            edit(&mut map);
            let mut fresh = request("/p");
            fresh.headers.clear();
            map.to_request_parts(&mut parts).expect("valid");
            map.to_request_parts(&mut fresh).expect("valid");
            assert_eq!(
                http_pairs(&parts.headers),
                http_pairs(&fresh.headers),
                "{what}"
            );
            let expected: Vec<(String, String)> = pairs(&map)
                .into_iter()
                .filter(|(k, _)| !k.starts_with(':'))
                .collect();
            let mut got = http_pairs(&parts.headers);
            let mut want = expected;
            // `http` groups values by name; the multimap is what must match.
            got.sort();
            want.sort();
            assert_eq!(got, want, "{what}");
        }

        // A response whose upstream sent framing headers: they go whatever path is taken.
        let (mut response, ()) = http::Response::builder()
            .header("content-type", "text/plain")
            .header("connection", "close")
            .body(())
            .expect("response")
            .into_parts();
        let mut map = HeaderMap::from_response_parts(&response);
        map.add("x-added", "yes");
        map.to_response_parts(&mut response).expect("valid");
        assert_eq!(
            http_pairs(&response.headers),
            [
                ("content-type".to_owned(), "text/plain".to_owned()),
                ("x-added".to_owned(), "yes".to_owned())
            ]
        );
    }

    #[test]
    fn invalid_edits_are_errors_and_change_nothing() {
        let mut parts = request("/");
        let before = http_pairs(&parts.headers);
        for (name, value, what) in [
            ("bad name", "v", "name"),
            ("x-crlf", "a\r\nb", "value"),
            (":method", "GE T", "method"),
            (":path", "no slash \u{7f}", "uri"),
            // Origin form: a `host` rewrite, checked before anything changes.
            (":authority", "a\nb", "authority"),
        ] {
            let mut map = HeaderMap::from_request_parts(&parts);
            // A valid header added too: it must not be left behind either.
            map.add("x-valid", "yes");
            map.replace(name, value);
            let error = map.to_request_parts(&mut parts).expect_err(what);
            assert!(!error.to_string().is_empty());
            assert_eq!(parts.uri, "/", "{what}");
            assert_eq!(parts.method, Method::POST, "{what}");
            assert_eq!(http_pairs(&parts.headers), before, "{what}");
        }
    }

    #[test]
    fn authority_rewrites_of_origin_form_requests_rewrite_host() {
        let mut parts = request("/p");
        let mut map = HeaderMap::from_request_parts(&parts);
        map.replace(":authority", "other.test");
        map.to_request_parts(&mut parts).expect("valid");
        assert_eq!(parts.uri, "/p");
        assert_eq!(
            parts.headers.get_all("host").iter().collect::<Vec<_>>(),
            ["other.test"]
        );
    }

    #[test]
    fn plugins_cannot_frame_responses_and_too_many_headers_are_an_error() {
        let (mut parts, ()) = http::Response::builder()
            .status(200)
            .body(())
            .expect("response")
            .into_parts();
        let mut map = HeaderMap::from_response_parts(&parts);
        map.add("transfer-encoding", "chunked");
        map.add("connection", "close");
        map.add("x-kept", "1");
        map.to_response_parts(&mut parts).expect("valid");
        assert!(parts.headers.get("transfer-encoding").is_none());
        assert!(parts.headers.get("connection").is_none());
        assert!(parts.headers.get("x-kept").is_some());

        let mut huge = HeaderMap::new();
        for i in 0..30_000 {
            huge.add(format!("x-{i}"), "v");
        }
        assert_eq!(huge.to_http(), Err(HttpPartsError::TooManyHeaders));
        assert_eq!(
            huge.to_response_parts(&mut parts),
            Err(HttpPartsError::TooManyHeaders)
        );
        let mut strip = http::HeaderMap::new();
        strip.insert("connection", "x-private".parse().expect("value"));
        strip.insert("x-private", "1".parse().expect("value"));
        strip.insert("x-public", "1".parse().expect("value"));
        strip_hop_by_hop(&mut strip);
        assert_eq!(strip.keys().collect::<Vec<_>>(), ["x-public"]);
    }

    #[test]
    fn kept_header_names_parse_as_http_does() {
        let long = "x".repeat(100);
        // Twice each, more names than a thread keeps: kept and evicted names alike.
        for _ in 0..2 {
            for i in 0..20 {
                let name = format!("x-name-{i}");
                let parsed = recent_names::parse(name.as_bytes()).expect("valid");
                assert_eq!(parsed.as_str(), name);
            }
            for name in ["host", "X-Mixed-Case", long.as_str()] {
                let parsed = recent_names::parse(name.as_bytes()).expect("valid");
                assert_eq!(parsed.as_str(), name.to_ascii_lowercase());
            }
            for bad in ["bad name", "", "x\r\n"] {
                assert!(recent_names::parse(bad.as_bytes()).is_none(), "{bad:?}");
            }
        }
    }

    #[test]
    fn static_pseudo_values_are_the_parts_values() {
        for code in 100..1000 {
            let status = StatusCode::from_u16(code).expect("status");
            assert_eq!(status_text(status), status.as_str().as_bytes());
        }
        for method in ["GET", "PATCH", "PURGE"] {
            let mut parts = request("https://a.test/");
            parts.method = Method::from_bytes(method.as_bytes()).expect("method");
            let map = HeaderMap::from_request_parts(&parts);
            assert_eq!(map.get_str(":method"), Some(method));
            assert_eq!(map.get_str(":scheme"), Some("https"));
        }
        let mut parts = request("foo://a.test/");
        parts.method = Method::GET;
        assert_eq!(
            HeaderMap::from_request_parts(&parts).get_str(":scheme"),
            Some("foo")
        );
    }

    #[test]
    fn responses_map_status_both_ways() {
        let (mut parts, ()) = http::Response::builder()
            .status(200)
            .header("server", "up")
            .body(())
            .expect("response")
            .into_parts();
        let mut map = HeaderMap::from_response_parts(&parts);
        assert_eq!(map.get_str(":status"), Some("200"));
        map.replace(":status", "418");
        map.to_response_parts(&mut parts).expect("valid");
        assert_eq!(parts.status, StatusCode::IM_A_TEAPOT);
        map.replace(":status", "abc");
        assert!(matches!(
            map.to_response_parts(&mut parts),
            Err(HttpPartsError::BadStatus(_))
        ));
        assert_eq!(parts.status, StatusCode::IM_A_TEAPOT);
    }

    #[test]
    fn converted_maps_are_pristine_until_changed() {
        let parts = request("/p?q=1");
        let map = HeaderMap::from_request_parts(&parts);
        assert!(map.is_pristine());
        // Pristine means writing back changes nothing: the check a proxy skips.
        assert!(
            map.request_changes(&parts)
                .is_ok_and(|c| c.headers.is_unchanged()
                    && c.method.is_none()
                    && c.uri.is_none()
                    && c.host.is_none())
        );
        let mut copy = map.clone();
        assert!(copy.is_pristine(), "a clone is the same map");
        assert_eq!(copy.remove("x-absent"), 0);
        assert!(copy.is_pristine(), "removing nothing changes nothing");
        copy.add("x-b", "3");
        assert!(!copy.is_pristine());
        assert!(map.is_pristine(), "the original is not the changed clone");
        let mut same = map.clone();
        same.replace("x-a", "1");
        assert!(
            !same.is_pristine(),
            "any change counts, even to an equal value"
        );
        let mut cleared = map.clone();
        cleared.clear();
        assert!(!cleared.is_pristine());
        let (response, ()) = http::Response::builder()
            .header("x-r", "1")
            .body(())
            .expect("response")
            .into_parts();
        assert!(HeaderMap::from_response_parts(&response).is_pristine());
        assert!(HeaderMap::from_http(&response.headers).is_pristine());
        let built: HeaderMap = [("x-a", "1")].into_iter().collect();
        assert!(!built.is_pristine(), "only conversions make pristine maps");
        assert!(!HeaderMap::new().is_pristine());
    }

    #[test]
    fn changes_say_what_writing_a_map_back_would_do() {
        let parts = request("/a?b=1");
        let map = HeaderMap::from_request_parts(&parts);
        let changes = map.request_changes(&parts).expect("valid");
        assert!(changes.method.is_none() && changes.uri.is_none() && changes.host.is_none());
        assert!(changes.headers.is_unchanged());

        let mut added = map.clone();
        added.add("x-new", "1");
        added.replace(":method", "PUT");
        added.replace(":authority", "other.example");
        let changes = added.request_changes(&parts).expect("valid");
        assert_eq!(changes.method, Some(Method::PUT));
        assert!(changes.uri.is_none(), "the path did not change");
        assert_eq!(
            changes.host,
            Some(HeaderValue::from_static("other.example"))
        );
        match &changes.headers {
            HeaderChanges::Append(new) => assert_eq!(new.len(), 1),
            other => panic!("only added: {other:?}"),
        }
        let mut applied = parts.clone();
        changes.apply(&mut applied).expect("applies");
        let mut written = parts.clone();
        added.to_request_parts(&mut written).expect("valid");
        assert_eq!(applied.headers, written.headers);
        assert_eq!((applied.method, applied.uri), (written.method, written.uri));

        let mut removed = map.clone();
        removed.remove("x-a");
        assert!(matches!(
            removed.request_changes(&parts).expect("valid").headers,
            HeaderChanges::Replace(headers) if !headers.contains_key("x-a")
        ));

        // A server's request: `:scheme` is the connection's. Taken as a URI change it makes
        // the URI absolute; in origin form it changes nothing.
        let mut schemed = map.clone();
        schemed.add(":scheme", "https");
        let absolute = schemed.request_changes(&parts).expect("valid").uri;
        assert_eq!(
            absolute.map(|u| u.to_string()),
            Some("https://example.com/a?b=1".into())
        );
        let origin = schemed.origin_form_request_changes(&parts).expect("valid");
        assert!(origin.uri.is_none() && origin.host.is_none());
        let implied = schemed
            .request_changes_with(&parts, |s| s == "https")
            .expect("valid");
        assert!(implied.uri.is_none());

        // `:authority` still says what `host` did: a plugin that removed `host` gets it back.
        let mut no_host = map.clone();
        no_host.remove("host");
        let mut written = parts.clone();
        no_host.to_request_parts(&mut written).expect("valid");
        assert_eq!(written.headers.get_all("host").iter().count(), 1);
        assert_eq!(written.headers["host"], "example.com");

        let (mut response, ()) = http::Response::builder()
            .status(200)
            .body(())
            .expect("response")
            .into_parts();
        response
            .headers
            .insert("x-b", HeaderValue::from_static("1"));
        let mut map = HeaderMap::from_response_parts(&response);
        assert!(
            map.response_changes(&response)
                .expect("valid")
                .status
                .is_none()
        );
        map.replace(":status", "404");
        let changes = map.response_changes(&response).expect("valid");
        assert_eq!(changes.status, Some(StatusCode::NOT_FOUND));
        assert!(changes.headers.is_unchanged());
    }

    /// What [`strip_hop_by_hop`] must leave: every header but those of [`HOP_BY_HOP`] and
    /// those the `connection` values name (the plain way: remove each by name).
    fn stripped_plainly(headers: &http::HeaderMap) -> http::HeaderMap {
        let mut out = headers.clone();
        let named: Vec<HeaderName> = headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in named {
            out.remove(name);
        }
        for name in HOP_BY_HOP {
            out.remove(name);
        }
        out
    }

    #[test]
    fn strip_hop_by_hop_removes_listed_and_named_headers() {
        let cases: [&[(&str, &str)]; 6] = [
            &[("content-type", "text/plain"), ("content-length", "5")],
            &[
                ("connection", "keep-alive"),
                ("keep-alive", "timeout=5"),
                ("x-a", "1"),
            ],
            &[
                ("connection", "Keep-Alive, X-Private"),
                ("x-private", "1"),
                ("x-a", "1"),
            ],
            &[
                ("connection", "close"),
                ("close", "odd"),
                ("te", "trailers"),
            ],
            &[
                ("connection", "x-one"),
                ("connection", "x-two, ,"),
                ("x-one", "1"),
                ("x-two", "2"),
            ],
            &[
                ("transfer-encoding", "chunked"),
                ("upgrade", "h2c"),
                ("trailer", "x"),
                ("x-a", "1"),
            ],
        ];
        for case in cases {
            let mut headers = http::HeaderMap::new();
            for (name, value) in case {
                headers.append(
                    HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                );
            }
            let expected = stripped_plainly(&headers);
            strip_hop_by_hop(&mut headers);
            assert_eq!(headers, expected, "{case:?}");
            assert!(
                headers
                    .keys()
                    .all(|n| !is_hop_by_hop(n.as_str().as_bytes()))
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn strip_hop_by_hop_matches_removing_by_name(
            entries in proptest::collection::vec(
                (
                    proptest::sample::select(vec![
                        "connection", "keep-alive", "te", "upgrade", "x-a", "x-b", "close",
                        "proxy-connection", "transfer-encoding", "content-type",
                    ]),
                    proptest::sample::select(vec![
                        "x-a", "X-B, te", "keep-alive", "close", "", " , x-a ,UPGRADE", "v",
                    ]),
                ),
                0..8,
            )
        ) {
            let mut headers = http::HeaderMap::new();
            for (name, value) in entries {
                headers.append(HeaderName::from_static(name), HeaderValue::from_static(value));
            }
            let expected = stripped_plainly(&headers);
            strip_hop_by_hop(&mut headers);
            proptest::prop_assert_eq!(headers, expected);
        }
    }
}
