//! Header maps as proxy-wasm sees them: an ordered list of byte pairs where pseudo headers
//! (`:path`, `:method`, ...) are ordinary entries and duplicates are kept.

use bytes::Bytes;
use triomphe::Arc;

/// An ordered multimap of header names to values. Names compare ASCII case-insensitively;
/// names added through a plugin are stored lower-cased, as Envoy does.
///
/// Cloning is cheap: clones share their entries until one of them changes (the host keeps a
/// copy of every request's headers for `request.*` attributes, which then costs nothing
/// unless the proxy edits the map afterwards).
#[derive(Debug, Clone, Default)]
pub struct HeaderMap {
    /// `None` while empty, so that an empty map (and `mem::take`) allocates nothing.
    entries: Option<Arc<Entries>>,
}

/// A map's entries, shared by its clones until one of them changes.
#[derive(Debug, Clone, Default)]
struct Entries {
    list: Vec<(Bytes, Bytes)>,
    /// The entries are as a conversion from `http` made them ([`HeaderMap::is_pristine`]).
    /// Kept here rather than beside the pointer, so that a map stays one word: a change
    /// copies shared entries first, so clones never disagree about it.
    pristine: bool,
}

impl Entries {
    fn new(list: Vec<(Bytes, Bytes)>) -> Arc<Entries> {
        Arc::new(Entries {
            list,
            pristine: false,
        })
    }
}

impl PartialEq for HeaderMap {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for HeaderMap {}

impl HeaderMap {
    /// An empty map.
    pub fn new() -> Self {
        HeaderMap::default()
    }

    /// An empty map with room for `n` entries (and a couple more a plugin may add); with
    /// none, it allocates nothing, as [`HeaderMap::new`].
    #[cfg(feature = "http")]
    pub(crate) fn with_capacity(n: usize) -> Self {
        HeaderMap {
            entries: (n > 0).then(|| Entries::new(with_spare(n, std::iter::empty()))),
        }
    }

    /// Whether the map is as a conversion from `http` parts or headers made it
    /// ([`HeaderMap::from_request_parts`], [`HeaderMap::from_response_parts`],
    /// [`HeaderMap::from_http`]), or is a clone of such a map: nothing was added, replaced or
    /// removed since. The parts it came from already say what the plugins left, so a proxy
    /// can skip writing it back (most plugins only read most messages' headers). Writing it
    /// back would only drop a response's hop-by-hop headers and fold repeated `host`
    /// headers, which the parts also keep when no plugin runs. Any change, even one that
    /// restores the old value, makes it `false`; so does every other way of making a map.
    /// An empty map is never pristine.
    pub fn is_pristine(&self) -> bool {
        self.entries
            .as_ref()
            .is_some_and(|entries| entries.pristine)
    }

    /// Marks the map, just converted, as a conversion's output ([`HeaderMap::is_pristine`]).
    #[cfg(feature = "http")]
    pub(crate) fn set_pristine(&mut self) {
        if let Some(entries) = self.entries.as_mut().and_then(Arc::get_mut) {
            entries.pristine = true;
        }
    }

    /// Number of entries (duplicates counted).
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// Whether the map has no entries.
    pub fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    /// Entries in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&Bytes, &Bytes)> {
        self.as_slice().iter().map(|(k, v)| (k, v))
    }

    /// Entries in order, as a slice of pairs.
    pub fn as_slice(&self) -> &[(Bytes, Bytes)] {
        self.entries
            .as_deref()
            .map_or(&[], |entries| entries.list.as_slice())
    }

    /// The first value of `name`.
    pub fn get(&self, name: impl AsRef<[u8]>) -> Option<&Bytes> {
        let name = name.as_ref();
        self.as_slice()
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
        self.as_slice()
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// Appends an entry, keeping any existing ones of the same name.
    pub fn add(&mut self, name: impl Into<Bytes>, value: impl Into<Bytes>) {
        self.entries_mut().push((name.into(), value.into()));
    }

    /// Replaces every value of `name` with one value, in the place of the first, or appends it.
    pub fn replace(&mut self, name: impl Into<Bytes>, value: impl Into<Bytes>) {
        let (name, value) = (name.into(), value.into());
        let entries = self.entries_mut();
        match entries
            .iter()
            .position(|(k, _)| k.eq_ignore_ascii_case(&name))
        {
            Some(first) => {
                if let Some(entry) = entries.get_mut(first) {
                    entry.1 = value;
                }
                let mut index = 0;
                entries.retain(|(k, _)| {
                    index += 1;
                    index - 1 == first || !k.eq_ignore_ascii_case(&name)
                });
            }
            None => entries.push((name, value)),
        }
    }

    /// Removes every entry of `name`; returns how many there were.
    pub fn remove(&mut self, name: impl AsRef<[u8]>) -> usize {
        let name = name.as_ref();
        let before = self.len();
        if !self
            .as_slice()
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case(name))
        {
            return 0;
        }
        let entries = self.entries_mut();
        entries.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        before - entries.len()
    }

    /// Removes every entry.
    pub fn clear(&mut self) {
        match self.entries.as_mut().and_then(Arc::get_mut) {
            Some(entries) => {
                entries.list.clear();
                entries.pristine = false;
            }
            None => self.entries = None,
        }
    }

    /// Total bytes of names and values (what Envoy reports as a header map's size).
    pub fn byte_size(&self) -> usize {
        self.as_slice().iter().map(|(k, v)| k.len() + v.len()).sum()
    }

    /// The entries to change, copied first if another clone shares them.
    fn entries_mut(&mut self) -> &mut Vec<(Bytes, Bytes)> {
        let entries = self.entries.get_or_insert_with(Arc::default);
        if Arc::get_mut(entries).is_none() {
            let list = &entries.list;
            *entries = Entries::new(with_spare(list.len(), list.iter().cloned()));
        }
        let entries = Arc::make_mut(entries);
        entries.pristine = false;
        &mut entries.list
    }
}

impl IntoIterator for HeaderMap {
    type Item = (Bytes, Bytes);
    type IntoIter = std::vec::IntoIter<(Bytes, Bytes)>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries
            .map(|entries| Arc::unwrap_or_clone(entries).list)
            .unwrap_or_default()
            .into_iter()
    }
}

impl<K: Into<Bytes>, V: Into<Bytes>> FromIterator<(K, V)> for HeaderMap {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let iter = iter.into_iter();
        let entries = with_spare(iter.size_hint().0, iter.map(|(k, v)| (k.into(), v.into())));
        HeaderMap {
            entries: (!entries.is_empty()).then(|| Entries::new(entries)),
        }
    }
}

impl<K: Into<Bytes>, V: Into<Bytes>> Extend<(K, V)> for HeaderMap {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        self.entries_mut()
            .extend(iter.into_iter().map(|(k, v)| (k.into(), v.into())));
    }
}

/// Room left in a map built or copied for a change: plugins mostly add a header or two, and
/// growing the vector then would copy it again.
const SPARE_ENTRIES: usize = 2;

/// `entries` in a vector with room for `len` and [`SPARE_ENTRIES`] more.
fn with_spare(len: usize, entries: impl Iterator<Item = (Bytes, Bytes)>) -> Vec<(Bytes, Bytes)> {
    let mut out = Vec::with_capacity(len.saturating_add(SPARE_ENTRIES));
    out.extend(entries);
    out
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
