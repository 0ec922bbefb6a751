//! Many short byte strings (the names and values of a header map a plugin hands over) copied
//! into one allocation that also holds its reference count, handed out as [`Bytes`] slices of
//! it: one allocation for the map instead of two per header.
//!
//! Why not `BytesMut` or a `Vec`: turning either into shared `Bytes` allocates the reference
//! count separately on the first split or clone. Here the only allocation is the one
//! [`Bytes::from_owner`] makes. Not used for a single header a plugin adds: that one is mostly
//! dropped without being shared, and a plain `Bytes` is freed without the atomic counting a
//! slice pays (measured: packing it made a stream slower).

use bytes::Bytes;

/// Headers a plugin gave (names lower-cased), in one allocation (a whole map: one
/// allocation instead of two per header).
pub(crate) fn headers(pairs: &[(&[u8], &[u8])]) -> Vec<(Bytes, Bytes)> {
    let len = pairs
        .iter()
        .map(|(name, value)| name.len() + value.len())
        .sum();
    let mut rest = filled(len, |out| {
        let mut out = out;
        for &(name, value) in pairs {
            for (piece, lower) in [(name, true), (value, false)] {
                let Some((dst, tail)) = out.split_at_mut_checked(piece.len()) else {
                    return;
                };
                dst.copy_from_slice(piece);
                if lower {
                    dst.make_ascii_lowercase();
                }
                out = tail;
            }
        }
    });
    pairs
        .iter()
        .map(|(name, value)| {
            let name = split_front(&mut rest, name.len());
            (name, split_front(&mut rest, value.len()))
        })
        .collect()
}

/// The first `len` bytes of `rest` (which keeps the others): split off (a reference count),
/// or, for the last piece, all that is left (no count at all).
fn split_front(rest: &mut Bytes, len: usize) -> Bytes {
    match len {
        0 => Bytes::new(),
        len if len < rest.len() => rest.split_to(len),
        _ => std::mem::take(rest),
    }
}

/// `len` bytes written by `fill`, in one allocation with their reference count where they
/// fit one of a few inline sizes (header sets mostly do); larger ones take two.
fn filled(len: usize, fill: impl FnOnce(&mut [u8])) -> Bytes {
    match len {
        0 => Bytes::new(),
        1..=32 => inline::<32>(len, fill),
        33..=64 => inline::<64>(len, fill),
        65..=128 => inline::<128>(len, fill),
        129..=256 => inline::<256>(len, fill),
        257..=512 => inline::<512>(len, fill),
        513..=1024 => inline::<1024>(len, fill),
        1025..=2048 => inline::<2048>(len, fill),
        _ => {
            let mut buffer = vec![0; len];
            fill(&mut buffer);
            Bytes::from_owner(buffer)
        }
    }
}

fn inline<const N: usize>(len: usize, fill: impl FnOnce(&mut [u8])) -> Bytes {
    let mut data = [0; N];
    let len = len.min(N);
    if let Some(used) = data.get_mut(..len) {
        fill(used);
    }
    Bytes::from_owner(Inline { len, data })
}

/// Up to `N` bytes stored in place, so that the `Bytes` owning them is one allocation.
struct Inline<const N: usize> {
    len: usize,
    data: [u8; N],
}

impl<const N: usize> AsRef<[u8]> for Inline<N> {
    fn as_ref(&self) -> &[u8] {
        self.data.get(..self.len).unwrap_or(&self.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_come_back_in_order_with_names_lower_cased_at_every_size() {
        for size in [0, 1, 31, 32, 33, 500, 2048, 2049, 10_000] {
            let long = vec![b'V'; size];
            let pairs: [(&[u8], &[u8]); 2] = [(b"X-Name", &long), (b"", b"Tail")];
            let out = headers(&pairs);
            assert_eq!(out.len(), 2);
            assert_eq!(out[0].0, "x-name");
            assert_eq!(out[0].1, long);
            assert_eq!(out[1].0, "");
            assert_eq!(out[1].1, "Tail");
            // Clones and slices outlive the vector and each other.
            let kept = out[1].1.clone();
            drop(out);
            assert_eq!(kept, "Tail");
        }
    }

    #[test]
    fn a_map_s_headers_share_one_buffer_and_names_are_lower_cased() {
        let pairs: [(&[u8], &[u8]); 3] = [(b"X-A", b"1"), (b"x-b", b""), (b"Set-Cookie", b"c=2")];
        let out = headers(&pairs);
        let expected: [(&[u8], &[u8]); 3] =
            [(b"x-a", b"1"), (b"x-b", b""), (b"set-cookie", b"c=2")];
        assert_eq!(out.len(), 3);
        for ((name, value), (want_name, want_value)) in out.iter().zip(expected) {
            assert_eq!((name.as_ref(), value.as_ref()), (want_name, want_value));
        }
        assert!(headers(&[]).is_empty());
    }
}
