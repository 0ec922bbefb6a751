//! Metrics plugins define (`proxy_define_metric` and friends, ABI.md §4.10): counters,
//! gauges and histograms in a registry the embedder reads and renders as Prometheus text.

use crate::PrometheusText;
use core::fmt;
use filterbox_abi::{MetricType, Status};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Upper bounds of histogram buckets (1-2-5 steps up to 10^9, then `+Inf`): plugins record
/// values in units of their own choosing.
const BUCKETS: [u64; 28] = [
    1,
    2,
    5,
    10,
    20,
    50,
    100,
    200,
    500,
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    20_000_000,
    50_000_000,
    100_000_000,
    200_000_000,
    500_000_000,
    1_000_000_000,
];

/// Longest metric name a plugin may define.
const MAX_NAME_BYTES: usize = 1024;

struct Metric {
    name: String,
    kind: MetricType,
    /// Counter total, or gauge value as the bits of an i64.
    value: AtomicU64,
    /// Histogram buckets (not cumulative) and the one past the last bound.
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
}

/// One metric as read from a [`MetricRegistry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricValue {
    /// A counter's total.
    Counter(u64),
    /// A gauge's value.
    Gauge(i64),
    /// A histogram's sample count and sum.
    Histogram {
        /// Values recorded.
        count: u64,
        /// Their sum (wrapping).
        sum: u64,
    },
}

/// Why a metric operation failed, with the status the guest gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetricError {
    NotFound,
    BadArgument,
    Full,
}

impl From<MetricError> for Status {
    fn from(e: MetricError) -> Self {
        match e {
            MetricError::NotFound => Status::NotFound,
            MetricError::BadArgument => Status::BadArgument,
            MetricError::Full => Status::InternalFailure,
        }
    }
}

/// The metrics plugins defined. By default each plugin has its own, shared by its VMs; give
/// several plugins the same registry with
/// [`PluginBuilder::metric_registry`](crate::PluginBuilder::metric_registry). Defining the
/// same name and type twice gives the same metric.
///
/// Ids follow the reference host: the type is in the low two bits (counters 4, 8, …;
/// gauges 5, 9, …; histograms 6, 10, …).
pub struct MetricRegistry {
    metrics: RwLock<Vec<Arc<Metric>>>,
    by_name: RwLock<HashMap<(u32, String), u32>>,
    max_metrics: usize,
}

impl Default for MetricRegistry {
    fn default() -> Self {
        MetricRegistry::new(10_000)
    }
}

impl fmt::Debug for MetricRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricRegistry")
            .field("metrics", &self.metrics.read().len())
            .field("max_metrics", &self.max_metrics)
            .finish()
    }
}

impl MetricRegistry {
    /// An empty registry that holds at most `max_metrics` metrics; more definitions answer
    /// `InternalFailure`.
    pub fn new(max_metrics: usize) -> Self {
        MetricRegistry {
            metrics: RwLock::default(),
            by_name: RwLock::default(),
            max_metrics,
        }
    }

    /// Defines (or finds) a metric. Returns its id.
    pub(crate) fn define(&self, kind: MetricType, name: &[u8]) -> Result<u32, MetricError> {
        if name.len() > MAX_NAME_BYTES {
            return Err(MetricError::BadArgument);
        }
        let name = String::from_utf8_lossy(name).into_owned();
        let key = (kind.as_u32(), name);
        if let Some(id) = self.by_name.read().get(&key) {
            return Ok(*id);
        }
        let mut by_name = self.by_name.write();
        if let Some(id) = by_name.get(&key) {
            return Ok(*id);
        }
        let mut metrics = self.metrics.write();
        let index = metrics.len();
        let id = u32::try_from(index + 1)
            .ok()
            .and_then(|n| n.checked_mul(4))
            .filter(|_| index < self.max_metrics)
            .ok_or(MetricError::Full)?
            | kind.as_u32();
        let buckets = match kind {
            MetricType::Histogram => (0..=BUCKETS.len()).map(|_| AtomicU64::new(0)).collect(),
            _ => Box::default(),
        };
        metrics.push(Arc::new(Metric {
            name: key.1.clone(),
            kind,
            value: AtomicU64::new(0),
            buckets,
            sum: AtomicU64::new(0),
        }));
        by_name.insert(key, id);
        Ok(id)
    }

    fn get_metric(&self, id: u32) -> Result<Arc<Metric>, MetricError> {
        let index = (id >> 2).checked_sub(1).ok_or(MetricError::NotFound)? as usize;
        let metrics = self.metrics.read();
        let metric = metrics.get(index).ok_or(MetricError::NotFound)?;
        if metric.kind.as_u32() != id & 3 {
            return Err(MetricError::NotFound);
        }
        Ok(metric.clone())
    }

    /// `proxy_increment_metric`: counters take positive offsets, gauges any; histograms none.
    pub(crate) fn increment(&self, id: u32, offset: i64) -> Result<(), MetricError> {
        let metric = self.get_metric(id)?;
        match metric.kind {
            MetricType::Counter if offset > 0 => {
                metric.value.fetch_add(offset as u64, Relaxed);
            }
            MetricType::Gauge => {
                // Two's complement: adding the bits of a negative i64 subtracts.
                metric.value.fetch_add(offset as u64, Relaxed);
            }
            _ => return Err(MetricError::BadArgument),
        }
        Ok(())
    }

    /// `proxy_record_metric`: a counter adds (as Envoy does), a gauge is set, a histogram
    /// records.
    pub(crate) fn record(&self, id: u32, value: u64) -> Result<(), MetricError> {
        let metric = self.get_metric(id)?;
        match metric.kind {
            MetricType::Counter => {
                metric.value.fetch_add(value, Relaxed);
            }
            MetricType::Gauge => metric.value.store(value, Relaxed),
            MetricType::Histogram => {
                let bucket = BUCKETS
                    .iter()
                    .position(|b| value <= *b)
                    .unwrap_or(BUCKETS.len());
                if let Some(count) = metric.buckets.get(bucket) {
                    count.fetch_add(1, Relaxed);
                }
                metric.sum.fetch_add(value, Relaxed);
            }
        }
        Ok(())
    }

    /// `proxy_get_metric`: counters and gauges only.
    pub(crate) fn get(&self, id: u32) -> Result<u64, MetricError> {
        let metric = self.get_metric(id)?;
        match metric.kind {
            MetricType::Histogram => Err(MetricError::BadArgument),
            _ => Ok(metric.value.load(Relaxed)),
        }
    }

    /// Every metric by name, in definition order.
    pub fn snapshot(&self) -> Vec<(String, MetricValue)> {
        self.metrics
            .read()
            .iter()
            .map(|m| (m.name.clone(), m.read()))
            .collect()
    }

    /// The value of the metric named `name`, of any type.
    pub fn value(&self, name: &str) -> Option<MetricValue> {
        let metrics = self.metrics.read();
        metrics.iter().find(|m| m.name == name).map(|m| m.read())
    }

    /// Appends every metric in the Prometheus text format. Names are prefixed `wasmcustom_`
    /// (Envoy's namespace for plugin stats) with characters Prometheus does not allow turned
    /// into `_`.
    pub fn render_prometheus(&self, out: &mut String) {
        let mut text = PrometheusText::new();
        self.write_prometheus(None, &mut text);
        let _ = write!(out, "{text}");
    }

    /// Adds every metric to `text`, labelled with `plugin` if given; families several sources
    /// report are merged there.
    pub fn write_prometheus(&self, plugin: Option<&str>, text: &mut PrometheusText) {
        let plugin: Vec<(&str, &str)> = plugin.map(|p| ("plugin", p)).into_iter().collect();
        for metric in self.metrics.read().iter() {
            let name = prometheus_name(&metric.name);
            let kind = match metric.kind {
                MetricType::Counter => "counter",
                MetricType::Gauge => "gauge",
                MetricType::Histogram => "histogram",
            };
            match metric.read() {
                MetricValue::Counter(v) => text.sample(&name, kind, None, &name, &plugin, v),
                MetricValue::Gauge(v) => text.sample(&name, kind, None, &name, &plugin, v),
                MetricValue::Histogram { count, sum } => {
                    let bucket = format!("{name}_bucket");
                    let mut cumulative = 0;
                    for (bound, n) in BUCKETS.iter().zip(metric.buckets.iter()) {
                        cumulative += n.load(Relaxed);
                        let le = bound.to_string();
                        let labels = [plugin.as_slice(), &[("le", le.as_str())]].concat();
                        text.sample(&name, kind, None, &bucket, &labels, cumulative);
                    }
                    let labels = [plugin.as_slice(), &[("le", "+Inf")]].concat();
                    text.sample(&name, kind, None, &bucket, &labels, count);
                    text.sample(&name, kind, None, &format!("{name}_sum"), &plugin, sum);
                    text.sample(&name, kind, None, &format!("{name}_count"), &plugin, count);
                }
            }
        }
    }
}

impl Metric {
    fn read(&self) -> MetricValue {
        match self.kind {
            MetricType::Counter => MetricValue::Counter(self.value.load(Relaxed)),
            MetricType::Gauge => MetricValue::Gauge(self.value.load(Relaxed) as i64),
            MetricType::Histogram => MetricValue::Histogram {
                count: self.buckets.iter().map(|b| b.load(Relaxed)).sum(),
                sum: self.sum.load(Relaxed),
            },
        }
    }
}

fn prometheus_name(name: &str) -> String {
    let mut out = String::from("wasmcustom_");
    out.extend(name.chars().map(|c| match c {
        'a'..='z' | 'A'..='Z' | '0'..='9' | '_' | ':' => c,
        _ => '_',
    }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_statuses_and_values_follow_the_reference() {
        let r = MetricRegistry::default();
        let c = r.define(MetricType::Counter, b"requests").unwrap();
        let g = r.define(MetricType::Gauge, b"in.flight").unwrap();
        let h = r.define(MetricType::Histogram, b"size").unwrap();
        assert_eq!((c & 3, g & 3, h & 3), (0, 1, 2));
        assert_eq!(r.define(MetricType::Counter, b"requests"), Ok(c));
        assert_eq!(r.increment(c, 0), Err(MetricError::BadArgument));
        r.increment(c, 2).unwrap();
        r.record(c, 3).unwrap(); // adds
        assert_eq!(r.get(c), Ok(5));
        r.increment(g, -4).unwrap();
        assert_eq!(r.get(g), Ok((-4i64) as u64));
        r.record(g, 9).unwrap();
        assert_eq!(r.get(g), Ok(9));
        assert_eq!(r.increment(h, 1), Err(MetricError::BadArgument));
        r.record(h, 3).unwrap();
        assert_eq!(r.get(h), Err(MetricError::BadArgument));
        assert_eq!(r.get(c | 1), Err(MetricError::NotFound)); // right index, wrong type
        assert_eq!(r.get(0), Err(MetricError::NotFound));
        assert_eq!(r.get(4000), Err(MetricError::NotFound));
        let mut text = String::new();
        r.render_prometheus(&mut text);
        assert!(text.contains("wasmcustom_requests 5\n"), "{text}");
        assert!(text.contains("wasmcustom_in_flight 9\n"), "{text}");
        assert!(
            text.contains("wasmcustom_size_bucket{le=\"5\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("wasmcustom_size_count 1\n"), "{text}");
    }

    #[test]
    fn the_registry_is_bounded() {
        let r = MetricRegistry::new(1);
        r.define(MetricType::Counter, b"a").unwrap();
        assert_eq!(r.define(MetricType::Counter, b"b"), Err(MetricError::Full));
        assert_eq!(
            r.define(MetricType::Counter, &[b'x'; MAX_NAME_BYTES + 1]),
            Err(MetricError::BadArgument)
        );
    }
}
