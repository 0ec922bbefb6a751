//! Conversions between [`HeaderMap`] and the `http` crate's request and response parts, with
//! the pseudo headers proxy-wasm plugins expect (`:method`, `:scheme`, `:authority`, `:path`
//! on requests; `:status` on responses), as Envoy presents them.

use crate::HeaderMap;
use bytes::Bytes;
use core::fmt;
use http::header::{HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, request, response};

/// Why a header map a plugin left could not become `http` parts.
#[derive(Debug, Clone, PartialEq, Eq)]
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
        }
    }
}

impl std::error::Error for HttpPartsError {}

impl HeaderMap {
    /// The request's headers as a plugin sees them: `:method`, `:scheme` (if the URI has
    /// one), `:authority` (the URI's, else the `host` header's), `:path` (path and query),
    /// then the headers in order.
    pub fn from_request_parts(parts: &request::Parts) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.add(
            ":method",
            Bytes::copy_from_slice(parts.method.as_str().as_bytes()),
        );
        if let Some(scheme) = parts.uri.scheme_str() {
            map.add(":scheme", Bytes::copy_from_slice(scheme.as_bytes()));
        }
        let authority = parts
            .uri
            .authority()
            .map(|a| Bytes::copy_from_slice(a.as_str().as_bytes()))
            .or_else(|| {
                parts
                    .headers
                    .get(http::header::HOST)
                    .map(|h| Bytes::copy_from_slice(h.as_bytes()))
            });
        if let Some(authority) = authority {
            map.add(":authority", authority);
        }
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        map.add(":path", Bytes::copy_from_slice(path.as_bytes()));
        map.extend_from_http(&parts.headers);
        map
    }

    /// The response's headers as a plugin sees them: `:status`, then the headers in order.
    pub fn from_response_parts(parts: &response::Parts) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.add(
            ":status",
            Bytes::copy_from_slice(parts.status.as_str().as_bytes()),
        );
        map.extend_from_http(&parts.headers);
        map
    }

    /// `http` headers (no pseudo headers), in order.
    pub fn from_http(headers: &http::HeaderMap) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.extend_from_http(headers);
        map
    }

    fn extend_from_http(&mut self, headers: &http::HeaderMap) {
        for (name, value) in headers {
            self.add(
                Bytes::copy_from_slice(name.as_str().as_bytes()),
                Bytes::copy_from_slice(value.as_bytes()),
            );
        }
    }

    /// Writes this map (as a plugin left it) into request parts: the pseudo headers set the
    /// method and URI, the rest replace `parts.headers`. A missing pseudo header keeps what
    /// the parts had. On error `parts` is unchanged.
    pub fn to_request_parts(&self, parts: &mut request::Parts) -> Result<(), HttpPartsError> {
        let mut method = None;
        let (mut scheme, mut authority, mut path) = (None, None, None);
        let mut headers = http::HeaderMap::with_capacity(self.len());
        for (name, value) in self.iter() {
            match name.as_ref() {
                b":method" => method = Some(value),
                b":scheme" => scheme = Some(value),
                b":authority" => authority = Some(value),
                b":path" => path = Some(value),
                _ => append(&mut headers, name, value)?,
            }
        }
        let method = match method {
            Some(m) => Method::from_bytes(m).map_err(|_| HttpPartsError::BadMethod(m.clone()))?,
            None => parts.method.clone(),
        };
        let uri = match (scheme, authority, path) {
            (None, None, None) => parts.uri.clone(),
            (scheme, authority, path) => {
                let old = parts.uri.clone().into_parts();
                let mut builder = Uri::builder();
                let has_scheme = scheme.is_some() || old.scheme.is_some();
                match (scheme, old.scheme) {
                    (Some(s), _) => builder = builder.scheme(s.as_ref()),
                    (None, Some(s)) => builder = builder.scheme(s),
                    (None, None) => {}
                }
                match (authority, old.authority) {
                    // An origin-form request (no scheme) carries its authority in `host`.
                    (Some(a), _) if has_scheme => builder = builder.authority(a.as_ref()),
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
                builder
                    .build()
                    .map_err(|e| HttpPartsError::BadUri(e.to_string()))?
            }
        };
        parts.method = method;
        parts.uri = uri;
        parts.headers = headers;
        Ok(())
    }

    /// Writes this map into response parts: `:status` sets the status, the rest replace
    /// `parts.headers`. On error `parts` is unchanged.
    pub fn to_response_parts(&self, parts: &mut response::Parts) -> Result<(), HttpPartsError> {
        let mut status = None;
        let mut headers = http::HeaderMap::with_capacity(self.len());
        for (name, value) in self.iter() {
            match name.as_ref() {
                b":status" => {
                    status = Some(
                        StatusCode::from_bytes(value)
                            .map_err(|_| HttpPartsError::BadStatus(value.clone()))?,
                    )
                }
                _ => append(&mut headers, name, value)?,
            }
        }
        if let Some(status) = status {
            parts.status = status;
        }
        parts.headers = headers;
        Ok(())
    }

    /// The map without pseudo headers, as `http` headers (trailers, local-response headers).
    pub fn to_http(&self) -> Result<http::HeaderMap, HttpPartsError> {
        let mut headers = http::HeaderMap::with_capacity(self.len());
        for (name, value) in self.iter().filter(|(n, _)| !n.starts_with(b":")) {
            append(&mut headers, name, value)?;
        }
        Ok(headers)
    }
}

fn append(
    headers: &mut http::HeaderMap,
    name: &Bytes,
    value: &Bytes,
) -> Result<(), HttpPartsError> {
    let header = HeaderName::from_bytes(name).map_err(|_| HttpPartsError::BadName(name.clone()))?;
    let value = HeaderValue::from_maybe_shared(value.clone())
        .map_err(|_| HttpPartsError::BadValue { name: name.clone() })?;
    headers.append(header, value);
    Ok(())
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

    #[test]
    fn invalid_edits_are_errors_and_change_nothing() {
        let mut parts = request("/");
        for (name, value, what) in [
            ("bad name", "v", "name"),
            ("x-crlf", "a\r\nb", "value"),
            (":method", "GE T", "method"),
            (":path", "no slash \u{7f}", "uri"),
        ] {
            let mut map = HeaderMap::from_request_parts(&parts);
            map.replace(name, value);
            let error = map.to_request_parts(&mut parts).expect_err(what);
            assert!(!error.to_string().is_empty());
            assert_eq!(parts.uri, "/", "{what}");
            assert_eq!(parts.method, Method::POST, "{what}");
        }
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
}
