//! Header maps as proxy-wasm sees them: an ordered list of byte pairs where pseudo headers
//! (`:path`, `:method`, ...) are ordinary entries and duplicates are kept.

use bytes::Bytes;

/// An ordered multimap of header names to values. Names compare ASCII case-insensitively;
/// names added through a plugin are stored lower-cased, as Envoy does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderMap {
    entries: Vec<(Bytes, Bytes)>,
}

impl HeaderMap {
    /// An empty map.
    pub fn new() -> Self {
        HeaderMap::default()
    }

    /// Number of entries (duplicates counted).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the map has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&Bytes, &Bytes)> {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    /// Entries in order, as a slice of pairs.
    pub fn as_slice(&self) -> &[(Bytes, Bytes)] {
        &self.entries
    }

    /// The first value of `name`.
    pub fn get(&self, name: impl AsRef<[u8]>) -> Option<&Bytes> {
        let name = name.as_ref();
        self.entries
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The first value of `name` as UTF-8, if it is.
    pub fn get_str(&self, name: impl AsRef<[u8]>) -> Option<&str> {
        self.get(name).and_then(|v| core::str::from_utf8(v).ok())
    }

    /// Every value of `name`, in order.
    pub fn get_all<'a>(&'a self, name: &'a [u8]) -> impl Iterator<Item = &'a Bytes> + 'a {
        self.entries
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// Appends an entry, keeping any existing ones of the same name.
    pub fn add(&mut self, name: impl Into<Bytes>, value: impl Into<Bytes>) {
        self.entries.push((name.into(), value.into()));
    }

    /// Replaces every value of `name` with one value, in the place of the first, or appends it.
    pub fn replace(&mut self, name: impl Into<Bytes>, value: impl Into<Bytes>) {
        let (name, value) = (name.into(), value.into());
        match self
            .entries
            .iter()
            .position(|(k, _)| k.eq_ignore_ascii_case(&name))
        {
            Some(first) => {
                self.entries[first].1 = value;
                let mut index = 0;
                self.entries.retain(|(k, _)| {
                    index += 1;
                    index - 1 == first || !k.eq_ignore_ascii_case(&name)
                });
            }
            None => self.entries.push((name, value)),
        }
    }

    /// Removes every entry of `name`; returns how many there were.
    pub fn remove(&mut self, name: impl AsRef<[u8]>) -> usize {
        let name = name.as_ref();
        let before = self.entries.len();
        self.entries.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        before - self.entries.len()
    }

    /// Removes every entry.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Total bytes of names and values (what Envoy reports as a header map's size).
    pub fn byte_size(&self) -> usize {
        self.entries.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

impl IntoIterator for HeaderMap {
    type Item = (Bytes, Bytes);
    type IntoIter = std::vec::IntoIter<(Bytes, Bytes)>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

impl<K: Into<Bytes>, V: Into<Bytes>> FromIterator<(K, V)> for HeaderMap {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        HeaderMap {
            entries: iter
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }
}

impl<K: Into<Bytes>, V: Into<Bytes>> Extend<(K, V)> for HeaderMap {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        self.entries
            .extend(iter.into_iter().map(|(k, v)| (k.into(), v.into())));
    }
}

/// Lower-cases a header name coming from a plugin.
pub(crate) fn lower(name: &[u8]) -> Bytes {
    Bytes::from(name.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_duplicates_and_case() {
        let mut h: HeaderMap = [(":path", "/"), ("x-a", "1"), ("X-A", "2"), ("x-b", "3")]
            .into_iter()
            .collect();
        assert_eq!(h.get("x-a").map(|v| &v[..]), Some(&b"1"[..]));
        assert_eq!(h.get_all(b"X-a").count(), 2);
        h.replace("x-a", "9");
        let names: Vec<_> = h.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        assert_eq!(
            names,
            vec![
                (Bytes::from(":path"), Bytes::from("/")),
                (Bytes::from("x-a"), Bytes::from("9")),
                (Bytes::from("x-b"), Bytes::from("3"))
            ]
        );
        assert_eq!(h.remove("X-B"), 1);
        assert_eq!(h.byte_size(), ":path".len() + 1 + 3 + 1);
    }
}
