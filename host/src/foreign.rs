//! The foreign functions every plugin can call (`proxy_call_foreign_function`) without the
//! embedder registering them: Envoy's built-ins that an embedder can offer as they are.
//! `compress` and `uncompress` use zlib's format, as Envoy's do; `set_envoy_filter_state`
//! (which needs the calling context, so the hostcalls run it) stores a value the plugin and
//! the embedder then read as the property `filter_state.<key>`. An embedder's own function of
//! the same name replaces a built-in.

use crate::ForeignFunction;
use bytes::Bytes;
use filterbox_abi::Status;
use flate2::Compression;
use std::io::{Read, Write};
use std::sync::Arc;

/// The built-ins, by name; `uncompress` stops at `max_output` bytes (a small input can
/// inflate to gigabytes).
pub(crate) fn builtins(max_output: usize) -> Vec<(String, Arc<dyn ForeignFunction>)> {
    let compress = |args: &[u8]| -> Result<Bytes, Status> {
        let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), Compression::default());
        encoder
            .write_all(args)
            .and_then(|()| encoder.finish())
            .map(Bytes::from)
            .map_err(|_| Status::SerializationFailure)
    };
    let uncompress = move |args: &[u8]| -> Result<Bytes, Status> {
        let mut out = Vec::new();
        let limit = u64::try_from(max_output)
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        flate2::read::ZlibDecoder::new(args)
            .take(limit)
            .read_to_end(&mut out)
            .map_err(|_| Status::SerializationFailure)?;
        // Past the limit: refused like a corrupt input, never cut silently.
        if out.len() > max_output {
            return Err(Status::SerializationFailure);
        }
        Ok(Bytes::from(out))
    };
    vec![
        ("compress".to_owned(), Arc::new(compress)),
        ("uncompress".to_owned(), Arc::new(uncompress)),
    ]
}

/// The name of Envoy's filter-state built-in.
pub(crate) const SET_ENVOY_FILTER_STATE: &str = "set_envoy_filter_state";

/// The key and value of `set_envoy_filter_state`'s argument, Envoy's serialized
/// `SetEnvoyFilterStateArguments` (`string path = 1; string value = 2; LifeSpan span = 3;`);
/// `None` if it is not one or has no key. The life span is not kept: a value lives as long as
/// the context that set it (Envoy's default, `FilterChain`).
pub(crate) fn filter_state_args(mut args: &[u8]) -> Option<(&[u8], &[u8])> {
    let (mut key, mut value) = (None, &b""[..]);
    while !args.is_empty() {
        let tag = varint(&mut args)?;
        match (tag >> 3, tag & 7) {
            (field, 2) => {
                let len = usize::try_from(varint(&mut args)?).ok()?;
                let (bytes, rest) = args.split_at_checked(len)?;
                args = rest;
                match field {
                    1 => key = Some(bytes),
                    2 => value = bytes,
                    _ => {}
                }
            }
            (_, 0) => {
                varint(&mut args)?;
            }
            (_, 1) => args = args.get(8..)?,
            (_, 5) => args = args.get(4..)?,
            _ => return None,
        }
    }
    let key = key.filter(|k| !k.is_empty() && std::str::from_utf8(k).is_ok())?;
    std::str::from_utf8(value).ok()?;
    Some((key, value))
}

/// A protobuf varint off the front of `bytes`.
fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_state_arguments_decode_and_bad_ones_are_refused() {
        // path "a.b", value "v", span 1, and an unknown fixed32 field.
        let args = b"\x0a\x03a.b\x12\x01v\x18\x01\x25\x00\x00\x00\x00";
        assert_eq!(filter_state_args(args), Some((&b"a.b"[..], &b"v"[..])));
        assert_eq!(
            filter_state_args(b"\x0a\x03a.b"),
            Some((&b"a.b"[..], &b""[..]))
        );
        for bad in [
            &b""[..],                                            // no key
            b"\x0a\x05a.b",                                      // length past the end
            b"\x0a\x00",                                         // empty key
            b"\x0b",                                             // wire type 3
            b"\x18\xff",                                         // varint cut short
            b"\x0a\x02\xff\xfe",                                 // key not UTF-8
            b"\x18\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", // varint over 64 bits
        ] {
            assert_eq!(filter_state_args(bad), None, "{bad:?}");
        }
    }

    fn call(name: &str, args: &[u8], max: usize) -> Result<Bytes, Status> {
        let functions = builtins(max);
        let (_, function) = functions
            .iter()
            .find(|(n, _)| n == name)
            .expect("a built-in");
        function.call(args)
    }

    #[test]
    fn compress_and_uncompress_round_trip_and_bound_what_they_inflate() {
        let text = b"proxy-wasm ".repeat(100);
        let packed = call("compress", &text, 4096).expect("compress");
        assert!(packed.len() < text.len());
        assert_eq!(
            call("uncompress", &packed, 4096).expect("uncompress"),
            &text[..]
        );
        // 1100 bytes do not fit in 1000.
        assert_eq!(
            call("uncompress", &packed, 1000),
            Err(Status::SerializationFailure)
        );
        assert_eq!(
            call("uncompress", b"not zlib", 4096),
            Err(Status::SerializationFailure)
        );
    }
}
