//! Property paths (ABI.md §3.2): segments joined by a single NUL byte, no trailing NUL
//! (`["request", "headers", ":path"]` is `request\0headers\0:path`).

use core::fmt;

/// Why a property path was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PathError {
    /// The path has no segments.
    Empty,
    /// Segment `index` is empty (two NULs in a row, or a leading NUL).
    EmptySegment {
        /// Index of the empty segment.
        index: usize,
    },
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathError::Empty => f.write_str("property path is empty"),
            PathError::EmptySegment { index } => {
                write!(f, "property path segment {index} is empty")
            }
        }
    }
}

impl std::error::Error for PathError {}

/// Splits a path into its segments. One trailing NUL is tolerated, as Envoy does.
pub fn decode(bytes: &[u8]) -> Result<Vec<&[u8]>, PathError> {
    let bytes = bytes.strip_suffix(&[0]).unwrap_or(bytes);
    if bytes.is_empty() {
        return Err(PathError::Empty);
    }
    let segments: Vec<&[u8]> = bytes.split(|b| *b == 0).collect();
    match segments.iter().position(|s| s.is_empty()) {
        Some(index) => Err(PathError::EmptySegment { index }),
        None => Ok(segments),
    }
}

/// Joins segments with NUL bytes.
pub fn encode<S: AsRef<[u8]>>(segments: &[S]) -> Vec<u8> {
    segments
        .iter()
        .map(AsRef::as_ref)
        .collect::<Vec<_>>()
        .join(&0u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reference_example() {
        let path = encode(&["request", "headers", ":path"]);
        assert_eq!(path, b"request\0headers\0:path");
        assert_eq!(
            decode(&path).unwrap(),
            vec![&b"request"[..], b"headers", b":path"]
        );
        assert_eq!(decode(b"plugin_name\0").unwrap(), vec![&b"plugin_name"[..]]);
        assert_eq!(decode(b""), Err(PathError::Empty));
        assert_eq!(decode(b"a\0\0b"), Err(PathError::EmptySegment { index: 1 }));
    }

    proptest! {
        #[test]
        fn round_trip(segments in proptest::collection::vec(proptest::collection::vec(1u8..=255, 1..12), 1..6)) {
            let bytes = encode(&segments);
            let decoded = decode(&bytes).unwrap();
            let expected: Vec<&[u8]> = segments.iter().map(Vec::as_slice).collect();
            prop_assert_eq!(decoded, expected);
        }

        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(segments) = decode(&bytes) {
                prop_assert!(segments.iter().all(|s| !s.is_empty() && !s.contains(&0)));
            }
        }
    }
}
