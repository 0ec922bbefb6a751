//! The foreign functions every plugin can call (`proxy_call_foreign_function`) without the
//! embedder registering them: Envoy's built-ins that an embedder can offer as they are.
//! `compress` and `uncompress` use zlib's format, as Envoy's do. An embedder's own
//! function of the same name replaces a built-in.

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

#[cfg(test)]
mod tests {
    use super::*;

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
