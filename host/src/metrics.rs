//! Metrics about the host itself, per plugin: VMs, failures, traps, callback latency, memory.

use crate::PrometheusText;
use filterbox_abi::Callback;
use filterbox_engines::TrapKind;
use parking_lot::Mutex;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Upper bounds of the callback latency buckets, in microseconds (then `+Inf`).
const BUCKETS_US: [u64; 13] = [
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 5_000, 10_000, 100_000,
];

/// A latency histogram with fixed buckets.
#[derive(Default)]
struct Histogram {
    /// Per bucket of [`BUCKETS_US`], then one for larger values (not cumulative).
    counts: [AtomicU64; BUCKETS_US.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn record(&self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = BUCKETS_US
            .iter()
            .position(|bound| micros <= *bound)
            .unwrap_or(BUCKETS_US.len());
        if let Some(count) = self.counts.get(bucket) {
            add_as_only_writer(count, 1);
        }
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        add_as_only_writer(&self.sum_nanos, nanos);
    }

    /// Adds this histogram's counts and sum to `into`.
    fn add_to(&self, into: &mut HistogramSnapshot) {
        for (total, count) in into.counts.iter_mut().zip(&self.counts) {
            *total += count.load(Relaxed);
        }
        into.sum_nanos += self.sum_nanos.load(Relaxed);
    }

    /// Adds `from` into this histogram.
    fn absorb(&self, from: &Histogram) {
        for (count, more) in self.counts.iter().zip(&from.counts) {
            add_counter(count, more);
        }
        add_counter(&self.sum_nanos, &from.sum_nanos);
    }
}

/// A callback's histogram and untimed calls at one moment.
#[derive(Default)]
struct HistogramSnapshot {
    counts: [u64; BUCKETS_US.len() + 1],
    sum_nanos: u64,
    untimed: u64,
}

impl HistogramSnapshot {
    /// Timed calls.
    fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Every call, timed or not.
    fn calls(&self) -> u64 {
        self.count() + self.untimed
    }
}

/// Callback latency of one VM, one histogram per callback, and the calls not timed. Only the
/// VM's thread writes it, so VMs on different threads never write the same cache lines;
/// readers merge every VM's.
pub(crate) struct CallbackStats {
    histograms: Vec<Histogram>,
    untimed: Vec<AtomicU64>,
}

impl Default for CallbackStats {
    fn default() -> Self {
        CallbackStats {
            histograms: (0..Callback::COUNT).map(|_| Histogram::default()).collect(),
            untimed: (0..Callback::COUNT).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl CallbackStats {
    /// One call of `callback`, and what it took if it was timed.
    pub(crate) fn record(&self, callback: Callback, elapsed: Option<Duration>) {
        match elapsed {
            Some(elapsed) => {
                if let Some(h) = self.histograms.get(callback as usize) {
                    h.record(elapsed);
                }
            }
            None => {
                if let Some(n) = self.untimed.get(callback as usize) {
                    add_as_only_writer(n, 1);
                }
            }
        }
    }
}

/// Adds `from` into `total`. Most buckets of most callbacks are empty: no write for them.
fn add_counter(total: &AtomicU64, from: &AtomicU64) {
    let more = from.load(Relaxed);
    if more != 0 {
        total.fetch_add(more, Relaxed);
    }
}

/// Adds to a counter that only the calling thread writes (a VM's own statistics, written
/// through `&mut Vm`): a plain load and store, without the locked read-modify-write that a
/// `fetch_add` costs on every callback. Readers on other threads see a recent value.
fn add_as_only_writer(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Relaxed).wrapping_add(n), Relaxed);
}

/// The callback statistics of a plugin's VMs: the live VMs' own, and what dropped VMs left.
#[derive(Default)]
struct CallbackSets {
    live: Vec<Weak<CallbackStats>>,
    retired: CallbackStats,
}

/// Counters and gauges about one plugin's VMs, shared by every VM and worker of the plugin.
/// Read them with the accessors or render them all with [`HostMetrics::render_prometheus`].
pub struct HostMetrics {
    vms_created: AtomicU64,
    vms_active: AtomicI64,
    vms_failed: AtomicU64,
    vms_restarted: AtomicU64,
    crash_looped: AtomicI64,
    streams_failed_closed: AtomicU64,
    streams_failed_open: AtomicU64,
    ticks_postponed: AtomicU64,
    traps: [AtomicU64; TrapKind::ALL.len()],
    callbacks: Mutex<CallbackSets>,
    memory_live_bytes: AtomicI64,
    memory_high_water_bytes: AtomicU64,
}

impl Default for HostMetrics {
    fn default() -> Self {
        HostMetrics {
            vms_created: AtomicU64::new(0),
            vms_active: AtomicI64::new(0),
            vms_failed: AtomicU64::new(0),
            vms_restarted: AtomicU64::new(0),
            crash_looped: AtomicI64::new(0),
            streams_failed_closed: AtomicU64::new(0),
            streams_failed_open: AtomicU64::new(0),
            ticks_postponed: AtomicU64::new(0),
            traps: Default::default(),
            callbacks: Mutex::default(),
            memory_live_bytes: AtomicI64::new(0),
            memory_high_water_bytes: AtomicU64::new(0),
        }
    }
}

impl HostMetrics {
    /// VMs made (including rebuilt ones).
    pub fn vms_created(&self) -> u64 {
        self.vms_created.load(Relaxed)
    }

    /// VMs alive now.
    pub fn vms_active(&self) -> i64 {
        self.vms_active.load(Relaxed)
    }

    /// VMs that failed (trapped, or could not start).
    pub fn vms_failed(&self) -> u64 {
        self.vms_failed.load(Relaxed)
    }

    /// VMs rebuilt after a failure.
    pub fn vms_restarted(&self) -> u64 {
        self.vms_restarted.load(Relaxed)
    }

    /// Workers that gave up rebuilding after the crash-loop limit.
    pub fn crash_looped(&self) -> i64 {
        self.crash_looped.load(Relaxed)
    }

    /// Streams answered by the fail-closed policy.
    pub fn streams_failed_closed(&self) -> u64 {
        self.streams_failed_closed.load(Relaxed)
    }

    /// Streams let through by the fail-open policy.
    pub fn streams_failed_open(&self) -> u64 {
        self.streams_failed_open.load(Relaxed)
    }

    /// Ticks that came later than their period because the plugin's ticks used more than
    /// their share of a core ([`Limits::max_tick_cpu_percent`](crate::Limits)).
    pub fn ticks_postponed(&self) -> u64 {
        self.ticks_postponed.load(Relaxed)
    }

    pub(crate) fn tick_postponed(&self) {
        self.ticks_postponed.fetch_add(1, Relaxed);
    }

    /// Traps of one class.
    pub fn traps(&self, kind: TrapKind) -> u64 {
        self.traps.get(kind as usize).map_or(0, |t| t.load(Relaxed))
    }

    /// How many times `callback` was called.
    pub fn callback_calls(&self, callback: Callback) -> u64 {
        self.callback_histograms()
            .get(callback as usize)
            .map_or(0, HistogramSnapshot::calls)
    }

    /// How many calls of `callback` were timed for `filterbox_callback_duration_seconds`
    /// (one in the sampling interval, see
    /// [`PluginBuilder::callback_latency_sampling`](crate::PluginBuilder::callback_latency_sampling)).
    pub fn callback_timed_calls(&self, callback: Callback) -> u64 {
        self.callback_histograms()
            .get(callback as usize)
            .map_or(0, HistogramSnapshot::count)
    }

    /// Statistics for a new VM's callbacks, counted here until the VM drops them
    /// ([`HostMetrics::retire_callback_stats`]).
    pub(crate) fn callback_stats(&self) -> Arc<CallbackStats> {
        let stats = Arc::new(CallbackStats::default());
        let mut sets = self.callbacks.lock();
        sets.live.retain(|live| live.strong_count() > 0);
        sets.live.push(Arc::downgrade(&stats));
        stats
    }

    /// A VM is dropped: what it counted joins the retired totals.
    pub(crate) fn retire_callback_stats(&self, stats: Arc<CallbackStats>) {
        let mut sets = self.callbacks.lock();
        for (total, more) in sets.retired.histograms.iter().zip(&stats.histograms) {
            total.absorb(more);
        }
        for (total, more) in sets.retired.untimed.iter().zip(&stats.untimed) {
            add_counter(total, more);
        }
        let gone = Arc::downgrade(&stats);
        drop(stats);
        sets.live
            .retain(|live| !live.ptr_eq(&gone) && live.strong_count() > 0);
    }

    /// Every callback's histogram, summed over live and dropped VMs.
    fn callback_histograms(&self) -> Vec<HistogramSnapshot> {
        let mut out: Vec<HistogramSnapshot> = (0..Callback::COUNT)
            .map(|_| HistogramSnapshot::default())
            .collect();
        let sets = self.callbacks.lock();
        let live: Vec<Arc<CallbackStats>> = sets.live.iter().filter_map(Weak::upgrade).collect();
        for stats in live.iter().map(AsRef::as_ref).chain([&sets.retired]) {
            for ((into, h), untimed) in out.iter_mut().zip(&stats.histograms).zip(&stats.untimed) {
                h.add_to(into);
                into.untimed += untimed.load(Relaxed);
            }
        }
        out
    }

    /// Bytes of linear memory held by live VMs.
    pub fn memory_live_bytes(&self) -> i64 {
        self.memory_live_bytes.load(Relaxed)
    }

    /// The largest linear memory any VM of the plugin reached.
    pub fn memory_high_water_bytes(&self) -> u64 {
        self.memory_high_water_bytes.load(Relaxed)
    }

    pub(crate) fn vm_created(&self) {
        self.vms_created.fetch_add(1, Relaxed);
        self.vms_active.fetch_add(1, Relaxed);
    }

    pub(crate) fn vm_dropped(&self, memory: usize) {
        self.vms_active.fetch_sub(1, Relaxed);
        self.memory_live_bytes
            .fetch_sub(i64::try_from(memory).unwrap_or(i64::MAX), Relaxed);
    }

    pub(crate) fn vm_failed(&self) {
        self.vms_failed.fetch_add(1, Relaxed);
    }

    pub(crate) fn vm_restarted(&self) {
        self.vms_restarted.fetch_add(1, Relaxed);
    }

    pub(crate) fn crash_loop(&self, entered: bool) {
        self.crash_looped
            .fetch_add(if entered { 1 } else { -1 }, Relaxed);
    }

    pub(crate) fn stream_failed(&self, closed: bool) {
        match closed {
            true => &self.streams_failed_closed,
            false => &self.streams_failed_open,
        }
        .fetch_add(1, Relaxed);
    }

    pub(crate) fn trap(&self, kind: TrapKind) {
        if let Some(t) = self.traps.get(kind as usize) {
            t.fetch_add(1, Relaxed);
        }
    }

    /// A VM's memory went from `old` to `new` bytes.
    pub(crate) fn memory_changed(&self, old: usize, new: usize) {
        let delta = i64::try_from(new).unwrap_or(i64::MAX) - i64::try_from(old).unwrap_or(0);
        self.memory_live_bytes.fetch_add(delta, Relaxed);
        self.memory_high_water_bytes
            .fetch_max(u64::try_from(new).unwrap_or(u64::MAX), Relaxed);
    }

    /// Appends every metric in the Prometheus text format, labelled with `plugin`.
    pub fn render_prometheus(&self, plugin: &str, out: &mut String) {
        let mut text = PrometheusText::new();
        self.write_prometheus(plugin, &mut text);
        let _ = write!(out, "{text}");
    }

    /// Adds every metric to `text`, labelled with `plugin`; families several sources report
    /// are merged there.
    pub fn write_prometheus(&self, plugin: &str, text: &mut PrometheusText) {
        let labels = [("plugin", plugin)];
        let mut line = |name: &str, kind: &'static str, help: &str, value: String| {
            text.sample(name, kind, Some(help), name, &labels, value);
        };
        line(
            "filterbox_vms_created_total",
            "counter",
            "VMs made, rebuilt ones included.",
            self.vms_created().to_string(),
        );
        line(
            "filterbox_vms_active",
            "gauge",
            "VMs alive now.",
            self.vms_active().to_string(),
        );
        line(
            "filterbox_vms_failed_total",
            "counter",
            "VMs that trapped or could not start.",
            self.vms_failed().to_string(),
        );
        line(
            "filterbox_vms_restarted_total",
            "counter",
            "VMs rebuilt after a failure.",
            self.vms_restarted().to_string(),
        );
        line(
            "filterbox_crash_looped_workers",
            "gauge",
            "Workers that stopped rebuilding after the crash-loop limit.",
            self.crash_looped().to_string(),
        );
        line(
            "filterbox_streams_failed_closed_total",
            "counter",
            "Streams answered by the fail-closed policy.",
            self.streams_failed_closed().to_string(),
        );
        line(
            "filterbox_streams_failed_open_total",
            "counter",
            "Streams let through by the fail-open policy.",
            self.streams_failed_open().to_string(),
        );
        line(
            "filterbox_ticks_postponed_total",
            "counter",
            "Ticks held back because the plugin's ticks used more than their share of a core.",
            self.ticks_postponed().to_string(),
        );
        line(
            "filterbox_memory_live_bytes",
            "gauge",
            "Linear memory held by live VMs.",
            self.memory_live_bytes().to_string(),
        );
        line(
            "filterbox_memory_high_water_bytes",
            "gauge",
            "Largest linear memory a VM reached.",
            self.memory_high_water_bytes().to_string(),
        );
        let name = "filterbox_traps_total";
        for kind in TrapKind::ALL {
            let labels = [("plugin", plugin), ("cause", kind.name())];
            text.sample(
                name,
                "counter",
                Some("Traps by cause."),
                name,
                &labels,
                self.traps(kind),
            );
        }
        let histograms = self.callback_histograms();
        let name = "filterbox_callback_calls_total";
        let help = "Guest callbacks called, timed or not.";
        for (callback, h) in Callback::ALL.iter().zip(&histograms) {
            if h.calls() > 0 {
                let labels = [("plugin", plugin), ("callback", callback.name())];
                text.sample(name, "counter", Some(help), name, &labels, h.calls());
            }
        }
        let name = "filterbox_callback_duration_seconds";
        let help = "Time in guest callbacks, from the calls timed (one in 16 of each callback \
                    per VM unless the plugin was built otherwise).";
        let (bucket, sum, count) = (
            format!("{name}_bucket"),
            format!("{name}_sum"),
            format!("{name}_count"),
        );
        for (callback, h) in Callback::ALL.iter().zip(&histograms) {
            let total = h.count();
            if total == 0 {
                continue;
            }
            let labels = [("plugin", plugin), ("callback", callback.name())];
            let mut cumulative = 0;
            for (bound, n) in BUCKETS_US.iter().zip(&h.counts) {
                cumulative += n;
                let le = (*bound as f64 / 1e6).to_string();
                let with_le = [labels.as_slice(), &[("le", le.as_str())]].concat();
                text.sample(name, "histogram", Some(help), &bucket, &with_le, cumulative);
            }
            let with_le = [labels.as_slice(), &[("le", "+Inf")]].concat();
            text.sample(name, "histogram", Some(help), &bucket, &with_le, total);
            let seconds = h.sum_nanos as f64 / 1e9;
            text.sample(name, "histogram", Some(help), &sum, &labels, seconds);
            text.sample(name, "histogram", Some(help), &count, &labels, total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = HostMetrics::default();
        m.vm_created();
        m.trap(TrapKind::Interrupted);
        // Two VMs' own statistics, one of them dropped: both are counted.
        let (first, second) = (m.callback_stats(), m.callback_stats());
        first.record(Callback::ProxyOnLog, Some(Duration::from_micros(3)));
        second.record(Callback::ProxyOnLog, Some(Duration::from_millis(500)));
        second.record(Callback::ProxyOnLog, None);
        m.retire_callback_stats(first);
        m.memory_changed(0, 65536);
        let mut out = String::new();
        m.render_prometheus("p\"q", &mut out);
        assert!(
            out.contains("filterbox_vms_active{plugin=\"p\\\"q\"} 1"),
            "{out}"
        );
        assert!(out.contains("cause=\"interrupted\"} 1"), "{out}");
        assert!(
            out.contains("callback=\"proxy_on_log\",le=\"0.000005\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("callback=\"proxy_on_log\",le=\"+Inf\"} 2"),
            "{out}"
        );
        assert!(out.contains("filterbox_memory_high_water_bytes{plugin=\"p\\\"q\"} 65536"));
        // The untimed call is counted, not timed.
        assert!(
            out.contains(
                "filterbox_callback_calls_total{plugin=\"p\\\"q\",callback=\"proxy_on_log\"} 3"
            ),
            "{out}"
        );
        assert_eq!(m.callback_calls(Callback::ProxyOnLog), 3);
        m.retire_callback_stats(second);
        assert_eq!(m.callback_calls(Callback::ProxyOnLog), 3);
        assert!(
            m.callbacks.lock().live.is_empty(),
            "dropped VMs stay listed"
        );
    }
}
