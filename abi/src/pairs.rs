//! The header-map ("pairs") format used by `proxy_get/set_header_map_pairs`,
//! `proxy_send_local_response`, `proxy_http_call` and map-valued properties (ABI.md §3.1):
//!
//! ```text
//! u32 N                                  number of pairs (all integers little-endian)
//! N × { u32 key_len; u32 value_len }     all lengths first
//! N × { key, 0x00, value, 0x00 }         then the data, each NUL-terminated
//! ```
//!
//! The decoder is strict: any inconsistency is an error naming it, it never panics, and it
//! allocates at most one slot per pair the input can actually hold.

use core::fmt;

/// Bytes each pair needs at least: two length words and two NUL terminators.
const MIN_PAIR_BYTES: usize = 4 + 4 + 1 + 1;

/// Why a pairs buffer was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PairsError {
    /// Shorter than the 4-byte count.
    TooShort {
        /// Length of the input.
        len: usize,
    },
    /// The count promises more pairs than the input can hold.
    CountTooLarge {
        /// The declared count.
        count: u32,
        /// The most pairs `len` bytes can hold.
        max: usize,
    },
    /// A key or value runs past the end of the input.
    Truncated {
        /// Index of the pair.
        pair: usize,
    },
    /// A key or value is not followed by a NUL byte.
    MissingNul {
        /// Index of the pair.
        pair: usize,
    },
    /// Bytes are left after the last pair.
    TrailingBytes {
        /// How many.
        extra: usize,
    },
}

impl fmt::Display for PairsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PairsError::TooShort { len } => {
                write!(f, "pairs buffer of {len} bytes has no 4-byte count")
            }
            PairsError::CountTooLarge { count, max } => {
                write!(
                    f,
                    "pairs buffer declares {count} pairs but can hold at most {max}"
                )
            }
            PairsError::Truncated { pair } => {
                write!(f, "pair {pair} runs past the end of the buffer")
            }
            PairsError::MissingNul { pair } => write!(f, "pair {pair} is missing a NUL terminator"),
            PairsError::TrailingBytes { extra } => write!(f, "{extra} bytes follow the last pair"),
        }
    }
}

impl std::error::Error for PairsError {}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let word = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(word.try_into().ok()?))
}

/// A decoded `(key, value)` pair borrowed from the buffer.
pub type Pair<'a> = (&'a [u8], &'a [u8]);

/// Decodes a pairs buffer into `(key, value)` slices borrowed from `bytes`.
///
/// An empty input is an empty map (SDKs send `size = 0` for "no pairs").
pub fn decode(bytes: &[u8]) -> Result<Vec<Pair<'_>>, PairsError> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let count = read_u32(bytes, 0).ok_or(PairsError::TooShort { len: bytes.len() })?;
    let max = (bytes.len() - 4) / MIN_PAIR_BYTES;
    let n = usize::try_from(count)
        .ok()
        .filter(|n| *n <= max)
        .ok_or(PairsError::CountTooLarge { count, max })?;
    let mut pairs = Vec::with_capacity(n);
    let mut data = 4 + n * 8;
    for pair in 0..n {
        let at = 4 + pair * 8;
        let (Some(key_len), Some(value_len)) = (read_u32(bytes, at), read_u32(bytes, at + 4))
        else {
            return Err(PairsError::Truncated { pair });
        };
        let key = take_nul_terminated(bytes, &mut data, key_len, pair)?;
        let value = take_nul_terminated(bytes, &mut data, value_len, pair)?;
        pairs.push((key, value));
    }
    match bytes.len() - data {
        0 => Ok(pairs),
        extra => Err(PairsError::TrailingBytes { extra }),
    }
}

fn take_nul_terminated<'a>(
    bytes: &'a [u8],
    at: &mut usize,
    len: u32,
    pair: usize,
) -> Result<&'a [u8], PairsError> {
    let start = *at;
    let end = usize::try_from(len)
        .ok()
        .and_then(|len| start.checked_add(len))
        .ok_or(PairsError::Truncated { pair })?;
    let field = bytes
        .get(start..end)
        .ok_or(PairsError::Truncated { pair })?;
    match bytes.get(end) {
        Some(0) => {
            *at = end + 1;
            Ok(field)
        }
        Some(_) => Err(PairsError::MissingNul { pair }),
        None => Err(PairsError::Truncated { pair }),
    }
}

/// The encoded size of `pairs`: `4 + Σ (8 + key + 1 + value + 1)`.
pub fn encoded_len<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> usize {
    pairs.iter().fold(4, |n, (k, v)| {
        n + MIN_PAIR_BYTES + k.as_ref().len() + v.as_ref().len()
    })
}

/// Encodes `pairs` into `out`, which must be exactly [`encoded_len`] bytes long (so the host
/// can write straight into guest memory). Returns `false`, writing nothing, if it is not or if
/// a length does not fit in `u32`.
pub fn encode_into<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)], out: &mut [u8]) -> bool {
    if out.len() != encoded_len(pairs) || u32::try_from(out.len()).is_err() {
        return false;
    }
    let Ok(count) = u32::try_from(pairs.len()) else {
        return false;
    };
    let (head, mut data) = out.split_at_mut(4 + pairs.len() * 8);
    let (count_word, mut lens) = head.split_at_mut(4);
    count_word.copy_from_slice(&count.to_le_bytes());
    for (k, v) in pairs {
        for field in [k.as_ref(), v.as_ref()] {
            // Lengths fit in u32 because the whole buffer does.
            let (len_word, rest) = lens.split_at_mut(4);
            len_word.copy_from_slice(&(field.len() as u32).to_le_bytes());
            lens = rest;
            let (dst, rest) = data.split_at_mut(field.len() + 1);
            let (bytes, nul) = dst.split_at_mut(field.len());
            bytes.copy_from_slice(field);
            nul[0] = 0;
            data = rest;
        }
    }
    true
}

/// Encodes `pairs` into a new buffer.
pub fn encode<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> Vec<u8> {
    let mut out = vec![0; encoded_len(pairs)];
    let written = encode_into(pairs, &mut out);
    debug_assert!(written, "buffer was sized by encoded_len");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reference_example() {
        let bytes = encode(&[(":method", "GET")]);
        assert_eq!(
            bytes,
            [
                1, 0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, b':', b'm', b'e', b't', b'h', b'o', b'd', 0,
                b'G', b'E', b'T', 0
            ]
        );
        assert_eq!(
            decode(&bytes).unwrap(),
            vec![(&b":method"[..], &b"GET"[..])]
        );
    }

    #[test]
    fn malformed_inputs_are_named() {
        assert_eq!(decode(&[]).unwrap(), vec![]);
        assert_eq!(decode(&[0, 0, 0, 0]).unwrap(), vec![]);
        assert_eq!(decode(&[1]), Err(PairsError::TooShort { len: 1 }));
        assert_eq!(
            decode(&[0xff, 0xff, 0xff, 0xff]),
            Err(PairsError::CountTooLarge {
                count: u32::MAX,
                max: 0
            })
        );
        let mut good = encode(&[("a", "b")]);
        good.push(7);
        assert_eq!(decode(&good), Err(PairsError::TrailingBytes { extra: 1 }));
        let mut no_nul = encode(&[("a", "b")]);
        let last = no_nul.len() - 1;
        no_nul[last] = b'x';
        assert_eq!(decode(&no_nul), Err(PairsError::MissingNul { pair: 0 }));
        let mut huge_len = encode(&[("a", "b")]);
        huge_len[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&huge_len), Err(PairsError::Truncated { pair: 0 }));
    }

    proptest! {
        #[test]
        fn round_trip(pairs in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..16), proptest::collection::vec(any::<u8>(), 0..16)), 0..12)) {
            let bytes = encode(&pairs);
            prop_assert_eq!(bytes.len(), encoded_len(&pairs));
            let decoded = decode(&bytes).unwrap();
            let expected: Vec<(&[u8], &[u8])> = pairs.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
            prop_assert_eq!(decoded, expected);
        }

        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(pairs) = decode(&bytes) {
                // Anything accepted re-encodes to exactly the input (an empty input is the
                // one other spelling of the empty map).
                let expected = if bytes.is_empty() { vec![0; 4] } else { bytes.clone() };
                prop_assert_eq!(encode(&pairs), expected);
            }
        }

        #[test]
        fn encode_into_rejects_wrong_sizes(extra in 1usize..8) {
            let pairs = [("k", "v")];
            let mut out = vec![0; encoded_len(&pairs) + extra];
            prop_assert!(!encode_into(&pairs, &mut out));
        }
    }
}
