//! Envoy's attributes for `proxy_get_property` (ABI.md §8): what filterbox answers from the
//! stream itself, and the value encoding shared with embedders (ABI.md §3.3).

use crate::HeaderMap;
use bytes::Bytes;
use filterbox_abi::pairs;
use std::time::{SystemTime, UNIX_EPOCH};

/// A property value, encoded the way Envoy hands values to plugins: strings and bytes as they
/// are, integers as 8 little-endian bytes, booleans as one byte, timestamps and durations as
/// nanoseconds in 8 bytes, maps in the pairs format.
#[derive(Debug, Clone, PartialEq)]
pub enum PropertyValue {
    /// A string.
    String(String),
    /// Bytes.
    Bytes(Bytes),
    /// A signed integer (`int64`).
    Int(i64),
    /// An unsigned integer (`uint64`).
    Uint(u64),
    /// A float (`double`).
    Double(f64),
    /// A boolean.
    Bool(bool),
    /// A map of strings, such as `request.headers`.
    Map(Vec<(String, String)>),
}

/// What the server that accepted a client's connection knows of it, as Envoy's attributes:
/// `source.address` / `source.port`, `destination.address` / `destination.port`, and on TLS
/// `connection.tls_version`, `connection.mtls` and `connection.requested_server_name`.
///
/// A proxy hands it to the plugins with [`Exchange::set_connection`](crate::Exchange) (or
/// [`Vm::set_stream_connection`](crate::Vm)), or, in front of
/// [`FilterLayer`](crate::FilterLayer), as a request extension `Arc<ConnectionInfo>` made once
/// per connection. The plugins' streams keep a reference, and a value is encoded only when a
/// plugin asks for it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The client's address.
    pub source: Option<std::net::SocketAddr>,
    /// The address the client connected to.
    pub destination: Option<std::net::SocketAddr>,
    /// The TLS version in Envoy's spelling (`TLSv1.3`); `None` for plain connections.
    pub tls_version: Option<String>,
    /// The client showed a certificate (meaningful on TLS only).
    pub mtls: bool,
    /// The server name the client asked for (TLS SNI).
    pub requested_server_name: Option<String>,
}

impl ConnectionInfo {
    /// Every attribute this connection has, encoded as Envoy does (addresses as `ip:port`
    /// strings, ports as int64, `mtls` as a bool).
    pub fn properties(&self) -> Vec<(&'static [&'static str], Bytes)> {
        const PATHS: [&[&str]; 7] = [
            &["source", "address"],
            &["source", "port"],
            &["destination", "address"],
            &["destination", "port"],
            &["connection", "tls_version"],
            &["connection", "mtls"],
            &["connection", "requested_server_name"],
        ];
        PATHS
            .into_iter()
            .filter_map(|path| {
                let raw: Vec<&[u8]> = path.iter().map(|p| p.as_bytes()).collect();
                Some((path, self.attribute(&raw)?))
            })
            .collect()
    }

    /// One attribute by its path (`["source", "address"]`), if this connection has it.
    pub fn attribute(&self, path: &[&[u8]]) -> Option<Bytes> {
        let port = |address: Option<std::net::SocketAddr>| {
            Some(PropertyValue::Int(i64::from(address?.port())).encode())
        };
        let tls = || self.tls_version.as_ref().map(|_| ());
        match path {
            [b"source", b"address"] => Some(Bytes::from(self.source?.to_string())),
            [b"source", b"port"] => port(self.source),
            [b"destination", b"address"] => Some(Bytes::from(self.destination?.to_string())),
            [b"destination", b"port"] => port(self.destination),
            [b"connection", b"tls_version"] => Some(Bytes::from(self.tls_version.clone()?)),
            [b"connection", b"mtls"] => tls().map(|()| PropertyValue::Bool(self.mtls).encode()),
            [b"connection", b"requested_server_name"] => {
                tls()?;
                Some(Bytes::from(self.requested_server_name.clone()?))
            }
            _ => None,
        }
    }
}

impl PropertyValue {
    /// The bytes the plugin receives.
    pub fn encode(&self) -> Bytes {
        match self {
            PropertyValue::String(s) => Bytes::copy_from_slice(s.as_bytes()),
            PropertyValue::Bytes(b) => b.clone(),
            PropertyValue::Int(n) => Bytes::copy_from_slice(&n.to_le_bytes()),
            PropertyValue::Uint(n) => Bytes::copy_from_slice(&n.to_le_bytes()),
            PropertyValue::Double(n) => Bytes::copy_from_slice(&n.to_le_bytes()),
            PropertyValue::Bool(b) => Bytes::copy_from_slice(&[u8::from(*b)]),
            PropertyValue::Map(entries) => {
                let entries: Vec<(&[u8], &[u8])> = entries
                    .iter()
                    .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
                    .collect();
                let mut out = vec![0; pairs::encoded_len(&entries)];
                pairs::encode_into(&entries, &mut out);
                out.into()
            }
        }
    }
}

/// What filterbox remembers of an HTTP stream to answer `request.*` after the request
/// headers have gone back to the proxy.
#[derive(Debug, Clone, Default)]
pub(crate) struct StreamInfo {
    /// When the stream context was created.
    pub(crate) started: Option<SystemTime>,
    /// The request headers as they left `proxy_on_request_headers`.
    pub(crate) request_headers: Option<HeaderMap>,
    /// The client connection the stream's request came on.
    pub(crate) connection: Option<std::sync::Arc<ConnectionInfo>>,
    /// The upstream the proxy sends the stream's request to, once it has connected.
    pub(crate) upstream: Option<std::net::SocketAddr>,
}

impl StreamInfo {
    /// `upstream.address` (`ip:port`) or `upstream.port` (a 64-bit integer, as Envoy's).
    pub(crate) fn upstream_attribute(&self, path: &[&[u8]]) -> Option<Bytes> {
        let address = self.upstream?;
        match path {
            [b"upstream", b"address"] => Some(Bytes::from(address.to_string())),
            [b"upstream", b"port"] => Some(Bytes::copy_from_slice(
                &i64::from(address.port()).to_le_bytes(),
            )),
            _ => None,
        }
    }
}

fn nanos(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// Values joined by commas, as Envoy presents repeated headers.
fn joined(map: &HeaderMap, name: &[u8]) -> Option<Bytes> {
    let mut values = map.get_all(name);
    let first = values.next()?.clone();
    let rest: Vec<&Bytes> = values.collect();
    if rest.is_empty() {
        return Some(first);
    }
    let mut out = first.to_vec();
    for v in rest {
        out.push(b',');
        out.extend_from_slice(v);
    }
    Some(out.into())
}

fn as_map(map: &HeaderMap) -> Bytes {
    let mut names: Vec<&Bytes> = Vec::new();
    for (name, _) in map.iter() {
        if !names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            names.push(name);
        }
    }
    let entries: Vec<(String, String)> = names
        .into_iter()
        .map(|name| {
            let value = joined(map, name).unwrap_or_default();
            (
                String::from_utf8_lossy(name).into_owned(),
                String::from_utf8_lossy(&value).into_owned(),
            )
        })
        .collect();
    PropertyValue::Map(entries).encode()
}

/// A `request.*` or `response.*` attribute of the stream, from the maps the current callback
/// can see and what was remembered of the stream.
pub(crate) fn stream_attribute(
    path: &[&[u8]],
    request: Option<&HeaderMap>,
    response: Option<&HeaderMap>,
    response_trailers: Option<&HeaderMap>,
    info: Option<&StreamInfo>,
) -> Option<Bytes> {
    let request = request.or_else(|| info?.request_headers.as_ref());
    let header = |map: Option<&HeaderMap>, name: &str| joined(map?, name.as_bytes());
    let path_header = || header(request, ":path");
    match path {
        [b"request", b"path"] => path_header(),
        [b"request", b"url_path"] => {
            let p = path_header()?;
            let end = p.iter().position(|b| *b == b'?').unwrap_or(p.len());
            Some(p.slice(..end))
        }
        [b"request", b"query"] => {
            let p = path_header()?;
            let start = p.iter().position(|b| *b == b'?').map_or(p.len(), |i| i + 1);
            Some(p.slice(start..))
        }
        [b"request", b"host"] => header(request, ":authority").or_else(|| header(request, "host")),
        [b"request", b"scheme"] => header(request, ":scheme"),
        [b"request", b"method"] => header(request, ":method"),
        [b"request", b"referer"] => header(request, "referer"),
        [b"request", b"useragent"] => header(request, "user-agent"),
        [b"request", b"id"] => header(request, "x-request-id"),
        [b"request", b"headers"] => request.map(as_map),
        [b"request", b"headers", name] => joined(request?, name),
        [b"request", b"time"] => {
            let started = info?.started?;
            let since = started.duration_since(UNIX_EPOCH).ok()?;
            Some(PropertyValue::Int(nanos(since)).encode())
        }
        [b"request", b"duration"] => {
            let elapsed = info?.started?.elapsed().ok()?;
            Some(PropertyValue::Int(nanos(elapsed)).encode())
        }
        [b"response", b"code"] => {
            let status = header(response, ":status")?;
            let code: i64 = std::str::from_utf8(&status).ok()?.parse().ok()?;
            Some(PropertyValue::Int(code).encode())
        }
        [b"response", b"grpc_status"] => {
            let status = header(response_trailers, "grpc-status")
                .or_else(|| header(response, "grpc-status"))?;
            let code: i64 = std::str::from_utf8(&status).ok()?.parse().ok()?;
            Some(PropertyValue::Int(code).encode())
        }
        [b"response", b"headers"] => response.map(as_map),
        [b"response", b"headers", name] => joined(response?, name),
        [b"response", b"trailers"] => response_trailers.map(as_map),
        [b"response", b"trailers", name] => joined(response_trailers?, name),
        _ => None,
    }
}

/// The other spelling of a path Envoy has had two names for (`node` / `xds.node`,
/// `cluster_name` / `xds.cluster_name`, `connection_id` / `connection.id`, ...).
pub(crate) fn alias(path: &[&[u8]]) -> Option<Vec<Vec<u8>>> {
    const XDS: [&[u8]; 7] = [
        b"node",
        b"cluster_name",
        b"cluster_metadata",
        b"listener_direction",
        b"listener_metadata",
        b"route_name",
        b"route_metadata",
    ];
    let owned = |segments: &[&[u8]]| segments.iter().map(|s| s.to_vec()).collect();
    match path {
        [b"connection_id"] => Some(owned(&[b"connection", b"id"])),
        [b"connection", b"id"] => Some(owned(&[b"connection_id"])),
        [b"request_protocol"] => Some(owned(&[b"request", b"protocol"])),
        [b"request", b"protocol"] => Some(owned(&[b"request_protocol"])),
        [b"xds", rest @ ..] if rest.first().is_some_and(|f| XDS.contains(f)) => Some(owned(rest)),
        [first, ..] if XDS.contains(first) => {
            let mut out = vec![b"xds".to_vec()];
            out.extend(path.iter().map(|s| s.to_vec()));
            Some(out)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_attributes_are_encoded_as_envoy_does_and_tls_ones_only_on_tls() {
        let plain = ConnectionInfo {
            source: "10.0.0.1:4321".parse().ok(),
            destination: "10.0.0.2:443".parse().ok(),
            ..ConnectionInfo::default()
        };
        let at = |c: &ConnectionInfo, path: &[&str]| {
            let raw: Vec<&[u8]> = path.iter().map(|p| p.as_bytes()).collect();
            c.attribute(&raw)
        };
        assert_eq!(
            at(&plain, &["source", "address"]).as_deref(),
            Some(&b"10.0.0.1:4321"[..])
        );
        assert_eq!(
            at(&plain, &["destination", "port"]).as_deref(),
            Some(&443i64.to_le_bytes()[..])
        );
        assert_eq!(at(&plain, &["connection", "mtls"]), None);
        assert_eq!(plain.properties().len(), 4);
        let tls = ConnectionInfo {
            tls_version: Some("TLSv1.3".into()),
            requested_server_name: Some("a.test".into()),
            ..plain
        };
        assert_eq!(
            at(&tls, &["connection", "mtls"]).as_deref(),
            Some(&[0u8][..])
        );
        assert_eq!(
            at(&tls, &["connection", "requested_server_name"]).as_deref(),
            Some(&b"a.test"[..])
        );
        assert_eq!(tls.properties().len(), 7);
        assert_eq!(at(&tls, &["connection", "other"]), None);
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn request_and_response_attributes() {
        let req = map(&[
            (":path", "/a/b?x=1"),
            (":method", "POST"),
            (":authority", "example.com"),
            ("accept", "a"),
            ("accept", "b"),
        ]);
        let resp = map(&[(":status", "404")]);
        let get = |p: &[&[u8]]| stream_attribute(p, Some(&req), Some(&resp), None, None);
        assert_eq!(get(&[b"request", b"url_path"]).unwrap(), "/a/b");
        assert_eq!(get(&[b"request", b"query"]).unwrap(), "x=1");
        assert_eq!(get(&[b"request", b"host"]).unwrap(), "example.com");
        assert_eq!(get(&[b"request", b"headers", b"accept"]).unwrap(), "a,b");
        assert_eq!(
            get(&[b"response", b"code"]).unwrap(),
            &404i64.to_le_bytes()[..]
        );
        let headers = get(&[b"request", b"headers"]).unwrap();
        let decoded = pairs::decode(&headers).unwrap();
        assert!(
            decoded.contains(&(&b"accept"[..], &b"a,b"[..])),
            "{decoded:?}"
        );
        assert_eq!(get(&[b"request", b"id"]), None);
        assert_eq!(get(&[b"source", b"address"]), None);
    }

    #[test]
    fn request_time_and_duration_count_from_the_stream_s_creation() {
        let before = SystemTime::now();
        let info = StreamInfo {
            started: Some(SystemTime::now()),
            ..StreamInfo::default()
        };
        std::thread::sleep(std::time::Duration::from_millis(2));
        let int = |path: &[&[u8]]| {
            let bytes = stream_attribute(path, None, None, None, Some(&info)).unwrap();
            i64::from_le_bytes(bytes.as_ref().try_into().unwrap())
        };
        let time = int(&[b"request", b"time"]);
        let duration = int(&[b"request", b"duration"]);
        let after = SystemTime::now();
        let epoch = |t: SystemTime| nanos(t.duration_since(UNIX_EPOCH).unwrap());
        assert!(time >= epoch(before) && time <= epoch(after), "{time}");
        assert!(duration >= 2_000_000, "{duration}");
        assert!(duration <= nanos(after.duration_since(before).unwrap()));
    }

    #[test]
    fn values_encode_as_envoy() {
        assert_eq!(PropertyValue::Int(-2).encode(), &(-2i64).to_le_bytes()[..]);
        assert_eq!(PropertyValue::Bool(true).encode(), &[1u8][..]);
        assert_eq!(PropertyValue::String("x".into()).encode(), "x");
        let path: &[&[u8]] = &[b"node", b"id"];
        assert_eq!(
            alias(path),
            Some(vec![b"xds".to_vec(), b"node".to_vec(), b"id".to_vec()])
        );
        let path: &[&[u8]] = &[b"xds", b"node", b"id"];
        assert_eq!(alias(path), Some(vec![b"node".to_vec(), b"id".to_vec()]));
    }

    #[test]
    fn upstream_attributes_are_encoded_when_asked() {
        let mut info = StreamInfo::default();
        assert_eq!(info.upstream_attribute(&[b"upstream", b"address"]), None);
        info.upstream = Some("127.0.0.1:8443".parse().expect("address"));
        assert_eq!(
            info.upstream_attribute(&[b"upstream", b"address"]),
            Some(Bytes::from_static(b"127.0.0.1:8443"))
        );
        assert_eq!(
            info.upstream_attribute(&[b"upstream", b"port"]),
            Some(Bytes::copy_from_slice(&8443i64.to_le_bytes()))
        );
        assert_eq!(
            info.upstream_attribute(&[b"upstream", b"tls_version"]),
            None
        );
    }
}
