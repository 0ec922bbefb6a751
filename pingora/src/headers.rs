//! Pingora's request and response headers to and from the header maps plugins see.

use filterbox::{HeaderChanges, HeaderMap, LocalReply, LocalResponse};
use http::{HeaderName, HeaderValue, StatusCode};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::{Error, Result};

/// Whether a response with `status` to `request` carries a body (RFC 9110 §6.4.1).
pub(crate) fn has_body(request: &RequestHeader, status: StatusCode) -> bool {
    request.method != http::Method::HEAD
        && !status.is_informational()
        && status != StatusCode::NO_CONTENT
        && status != StatusCode::NOT_MODIFIED
}

/// Writes the request headers the plugins left into Pingora's request: method and path from
/// the pseudo headers, `:authority` as `host`, the rest replacing the headers. Only what
/// changed is written: headers a plugin added are appended (the usual case), and the headers
/// are rewritten whole only when a plugin changed or removed one.
pub(crate) fn apply_request(
    request: &mut RequestHeader,
    passed: HeaderMap,
) -> std::result::Result<(), LocalResponse> {
    // Pingora forwards origin-form requests: the `:scheme` shown to the plugins is not
    // part of the URI it sends.
    let changes = passed.origin_form_request_changes(request)?;
    if let Some(method) = changes.method {
        request.set_method(method);
    }
    if let Some(uri) = changes.uri {
        request.set_uri(uri);
    }
    write_headers(request, changes.headers)?;
    if let Some(host) = changes.host {
        request
            .insert_header(http::header::HOST, host)
            .map_err(|e| invalid(&e))?;
    }
    Ok(())
}

/// Writes the response headers the plugins left into Pingora's response, as
/// [`apply_request`] does. The message keeps its framing: a plugin's framing headers are not
/// taken (see `to_response_parts`), and a body that lost its length goes out chunked
/// (`ended`: the response has no body).
pub(crate) fn apply_response(
    response: &mut ResponseHeader,
    passed: HeaderMap,
    ended: bool,
) -> std::result::Result<(), LocalResponse> {
    let changes = passed.response_changes(response)?;
    if let Some(status) = changes.status {
        response.set_status(status).map_err(|e| invalid(&e))?;
    }
    match changes.headers {
        HeaderChanges::Replace(mut headers) => {
            if !ended && !headers.contains_key(http::header::CONTENT_LENGTH) {
                let framing = response
                    .headers
                    .get(http::header::TRANSFER_ENCODING)
                    .cloned();
                let chunked = HeaderValue::from_static("chunked");
                headers.insert(http::header::TRANSFER_ENCODING, framing.unwrap_or(chunked));
            }
            write_headers(response, HeaderChanges::Replace(headers))
        }
        // The response kept every header, so it has no framing header of its own (a
        // hop-by-hop one is never among the plugin's: a response with one is rewritten whole).
        added => {
            write_headers(response, added)?;
            if !ended && !response.headers.contains_key(http::header::CONTENT_LENGTH) {
                response
                    .insert_header(http::header::TRANSFER_ENCODING, "chunked")
                    .map_err(|e| invalid(&e))?;
            }
            Ok(())
        }
    }
}

/// Pingora's request or response header, edited through its own methods (which keep its
/// case-preserving map of names in step).
trait Message {
    fn headers(&self) -> &http::HeaderMap;
    fn remove(&mut self, name: &HeaderName);
    fn append(&mut self, name: HeaderName, value: HeaderValue) -> Result<()>;
}

/// The same methods on both of Pingora's header types.
macro_rules! impl_message {
    ($($message:ty),*) => {$(
        impl Message for $message {
            fn headers(&self) -> &http::HeaderMap {
                &self.headers
            }
            fn remove(&mut self, name: &HeaderName) {
                self.remove_header(name);
            }
            fn append(&mut self, name: HeaderName, value: HeaderValue) -> Result<()> {
                self.append_header(name, value).map(drop)
            }
        }
    )*};
}

impl_message!(RequestHeader, ResponseHeader);

/// Makes `message`'s headers what `changes` say: the added ones after its own, or all of
/// them replaced (in the plugins' order).
fn write_headers(
    message: &mut impl Message,
    changes: HeaderChanges,
) -> std::result::Result<(), LocalResponse> {
    let headers = match changes {
        HeaderChanges::Append(added) => {
            for (name, value) in added {
                message.append(name, value).map_err(|e| invalid(&e))?;
            }
            return Ok(());
        }
        HeaderChanges::Replace(headers) => headers,
    };
    let old: Vec<HeaderName> = message.headers().keys().cloned().collect();
    for name in &old {
        message.remove(name);
    }
    for (name, value) in entries(headers) {
        message.append(name, value).map_err(|e| invalid(&e))?;
    }
    Ok(())
}

/// Every entry of `headers` in order, each with its name (`http`'s owned iterator names
/// only the first value of a header).
fn entries(headers: http::HeaderMap) -> impl Iterator<Item = (HeaderName, HeaderValue)> {
    let mut last = None;
    headers.into_iter().filter_map(move |(name, value)| {
        if let Some(name) = name {
            last = Some(name);
        }
        last.clone().map(|name| (name, value))
    })
}

/// Pingora refused a header the plugins left.
fn invalid(error: &Error) -> LocalResponse {
    tracing::warn!("plugin left headers Pingora refuses: {error}");
    LocalResponse::new(500, "filterbox_invalid_headers")
}

/// The response header of a local reply: its status and headers, and the length of its body.
pub(crate) fn reply_header(reply: &LocalReply) -> Result<ResponseHeader> {
    let headers = reply.http_headers();
    let mut header = ResponseHeader::build(reply.status, Some(headers.len() + 1))?;
    for (name, value) in entries(headers) {
        header.append_header(name, value)?;
    }
    header.insert_header(http::header::CONTENT_LENGTH, reply.body.len())?;
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_keep_every_value_of_a_header_in_order() {
        let mut headers = http::HeaderMap::new();
        headers.append("a", HeaderValue::from_static("1"));
        headers.append("b", HeaderValue::from_static("2"));
        headers.append("a", HeaderValue::from_static("3"));
        let got: Vec<(String, String)> = entries(headers)
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("?").to_owned()))
            .collect();
        let want = [("a", "1"), ("a", "3"), ("b", "2")].map(|(n, v)| (n.to_owned(), v.to_owned()));
        assert_eq!(got, want);
    }

    #[test]
    fn head_requests_and_bodiless_statuses_have_no_body() {
        let get = RequestHeader::build("GET", b"/", None).expect("get");
        let head = RequestHeader::build("HEAD", b"/", None).expect("head");
        assert!(has_body(&get, StatusCode::OK));
        assert!(!has_body(&head, StatusCode::OK));
        assert!(!has_body(&get, StatusCode::NO_CONTENT));
        assert!(!has_body(&get, StatusCode::NOT_MODIFIED));
    }
}
