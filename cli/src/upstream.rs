//! `serve`'s upstreams: one or several `http://host:port` addresses per name, taken in turn
//! (round robin); an address that refused a connection is left out for a while (passive
//! health), and a request without a body that could not connect is tried on the next one.
//!
//! What crosses this module: the `upstreams` entries of the config in, a [`Pool`] per name
//! out, which gives the order in which to try its addresses for one request.

use anyhow::{Result, bail};
use serde::Deserialize;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// An `upstreams` value in the config: one URL, or a list of them.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum UpstreamEntry {
    /// `backend: "http://127.0.0.1:9000"`.
    One(String),
    /// `backend: ["http://10.0.0.1:80", "http://10.0.0.2:80"]`.
    Several(Vec<String>),
}

impl UpstreamEntry {
    /// The URLs, in the order given.
    pub fn urls(&self) -> &[String] {
        match self {
            UpstreamEntry::One(url) => std::slice::from_ref(url),
            UpstreamEntry::Several(urls) => urls,
        }
    }
}

/// How long an address that refused a connection is left out.
const COOL_DOWN: Duration = Duration::from_secs(5);

/// One upstream's addresses and whose turn it is.
#[derive(Debug)]
pub struct Pool {
    addresses: Vec<Address>,
    next: AtomicUsize,
    /// When the pool was made: the clock `down_until` counts from.
    epoch: Instant,
}

#[derive(Debug)]
struct Address {
    uri: http::Uri,
    /// Milliseconds since the pool's epoch until which the address is left out (0: never).
    down_until: AtomicU64,
}

impl Pool {
    /// The pool of upstream `name`: each URL must be `http://host[:port]` (a path is ignored).
    pub fn new(name: &str, entry: &UpstreamEntry) -> Result<Pool> {
        if entry.urls().is_empty() {
            bail!("upstream {name:?}: no address");
        }
        let mut addresses = Vec::with_capacity(entry.urls().len());
        for url in entry.urls() {
            let uri: http::Uri = match url.parse() {
                Ok(uri) => uri,
                Err(e) => bail!("upstream {name:?}: bad URL {url:?}: {e}"),
            };
            if uri.scheme_str() != Some("http") || uri.authority().is_none() {
                bail!("upstream {name:?}: {url:?} is not an http://host:port URL");
            }
            addresses.push(Address {
                uri,
                down_until: AtomicU64::new(0),
            });
        }
        Ok(Pool {
            addresses,
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
        })
    }

    /// The addresses to try for one request, in order: from the next one in turn, those not
    /// left out first, then the rest (so a pool whose addresses all failed still tries).
    pub fn order(&self) -> Vec<&http::Uri> {
        let count = self.addresses.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % count.max(1);
        let now = self.now_ms();
        let rotated = (0..count).filter_map(|i| self.addresses.get((start + i) % count));
        let (up, down): (Vec<&Address>, Vec<&Address>) =
            rotated.partition(|a| a.down_until.load(Ordering::Relaxed) <= now);
        up.into_iter().chain(down).map(|a| &a.uri).collect()
    }

    /// `uri` refused a connection: leave it out for [`COOL_DOWN`].
    pub fn mark_down(&self, uri: &http::Uri) {
        let until = self.now_ms() + u64::try_from(COOL_DOWN.as_millis()).unwrap_or(u64::MAX);
        if let Some(address) = self.addresses.iter().find(|a| a.uri == *uri) {
            address.down_until.store(until, Ordering::Relaxed);
        }
    }

    /// Milliseconds since the epoch; at least 1, so that 0 means "never down".
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(urls: &[&str]) -> Pool {
        let entry = UpstreamEntry::Several(urls.iter().map(|u| (*u).to_owned()).collect());
        Pool::new("p", &entry).expect("pool")
    }

    fn hosts(order: Vec<&http::Uri>) -> Vec<String> {
        order
            .iter()
            .map(|u| u.authority().map(|a| a.to_string()).unwrap_or_default())
            .collect()
    }

    #[test]
    fn addresses_take_turns_and_one_that_refused_goes_last_for_a_while() {
        let pool = pool(&["http://a:1", "http://b:2", "http://c:3"]);
        assert_eq!(hosts(pool.order()), ["a:1", "b:2", "c:3"]);
        assert_eq!(hosts(pool.order()), ["b:2", "c:3", "a:1"]);
        assert_eq!(hosts(pool.order()), ["c:3", "a:1", "b:2"]);
        pool.mark_down(&"http://a:1".parse().expect("uri"));
        assert_eq!(hosts(pool.order()), ["b:2", "c:3", "a:1"]);
        assert_eq!(hosts(pool.order()), ["b:2", "c:3", "a:1"]);
        assert_eq!(hosts(pool.order()), ["c:3", "b:2", "a:1"]);
    }

    #[test]
    fn bad_entries_are_refused_with_the_upstream_named() {
        for (entry, why) in [
            (UpstreamEntry::Several(Vec::new()), "no address"),
            (
                UpstreamEntry::One("https://a:1".into()),
                "not an http://host:port URL",
            ),
            (UpstreamEntry::One("http://".into()), "bad URL"),
        ] {
            let error = Pool::new("api", &entry).expect_err("refused").to_string();
            assert!(error.contains("\"api\"") && error.contains(why), "{error}");
        }
        let one: UpstreamEntry = serde_yaml::from_str("http://a:1").expect("one");
        assert_eq!(one.urls(), ["http://a:1"]);
        let several: UpstreamEntry =
            serde_yaml::from_str("[http://a:1, http://b:2]").expect("list");
        assert_eq!(several.urls().len(), 2);
    }
}
