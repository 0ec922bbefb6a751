//! Prometheus text from several sources at once: a family that several plugins report (a
//! metric two plugins define under one name, every host metric) gets one `# HELP` / `# TYPE`
//! pair with all their samples under it, as the text format requires.

use core::fmt;
use std::collections::HashMap;
use std::fmt::Write as _;

/// Prometheus text exposition gathered from plugin metrics
/// ([`MetricRegistry::write_prometheus`](crate::MetricRegistry::write_prometheus)), host
/// metrics ([`HostMetrics::write_prometheus`](crate::HostMetrics::write_prometheus)) and an
/// embedder's own counters; [`Display`](fmt::Display) renders it.
///
/// ```
/// use filterbox::{HostMetrics, MetricRegistry, PrometheusText};
///
/// let mut text = PrometheusText::new();
/// HostMetrics::default().write_prometheus("auth", &mut text);
/// HostMetrics::default().write_prometheus("ratelimit", &mut text);
/// MetricRegistry::default().write_prometheus(Some("auth"), &mut text);
/// text.add_counter("proxy_requests_total", "Requests received.", 7);
/// text.add_gauge("proxy_open", "Open connections.", &[("worker", "1")], 3);
/// let rendered = text.to_string();
/// // One family, both plugins' samples.
/// assert_eq!(rendered.matches("# TYPE filterbox_vms_active gauge").count(), 1);
/// assert!(rendered.contains("filterbox_vms_active{plugin=\"ratelimit\"} 0"));
/// assert!(rendered.contains("proxy_open{worker=\"1\"} 3"));
/// ```
#[derive(Debug, Default)]
pub struct PrometheusText {
    families: Vec<Family>,
    by_name: HashMap<String, usize>,
}

#[derive(Debug)]
struct Family {
    name: String,
    kind: &'static str,
    help: Option<String>,
    samples: String,
}

impl PrometheusText {
    /// Nothing gathered yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A counter of the embedder's own, without labels.
    pub fn add_counter(&mut self, name: &str, help: &str, value: u64) {
        self.sample(name, "counter", Some(help), name, &[], value);
    }

    /// A gauge of the embedder's own: one sample of family `name` with `labels`; call it
    /// once per label set.
    pub fn add_gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: u64) {
        self.sample(name, "gauge", Some(help), name, labels, value);
    }

    /// Adds one sample line `<sample><labels> <value>` to the family `family` (made with
    /// `kind` and `help` the first time it is seen; a later `help` fills a missing one).
    pub(crate) fn sample(
        &mut self,
        family: &str,
        kind: &'static str,
        help: Option<&str>,
        sample: &str,
        labels: &[(&str, &str)],
        value: impl fmt::Display,
    ) {
        let index = match self.by_name.get(family) {
            Some(&index) => index,
            None => {
                self.families.push(Family {
                    name: family.to_owned(),
                    kind,
                    help: None,
                    samples: String::new(),
                });
                let index = self.families.len() - 1;
                self.by_name.insert(family.to_owned(), index);
                index
            }
        };
        let Some(family) = self.families.get_mut(index) else {
            return;
        };
        if family.help.is_none() {
            family.help = help.map(str::to_owned);
        }
        let out = &mut family.samples;
        out.push_str(sample);
        if !labels.is_empty() {
            out.push('{');
            for (i, (name, value)) in labels.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{name}=\"{}\"", escape_label(value));
            }
            out.push('}');
        }
        let _ = writeln!(out, " {value}");
    }
}

impl fmt::Display for PrometheusText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for family in &self.families {
            if let Some(help) = &family.help {
                writeln!(f, "# HELP {} {help}", family.name)?;
            }
            writeln!(f, "# TYPE {} {}", family.name, family.kind)?;
            f.write_str(&family.samples)?;
        }
        Ok(())
    }
}

/// Escapes a Prometheus label value.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MetricRegistry;
    use filterbox_abi::MetricType;

    #[test]
    fn a_family_two_plugins_define_is_written_once_with_both_samples() {
        let (a, b) = (MetricRegistry::default(), MetricRegistry::default());
        for registry in [&a, &b] {
            let id = registry
                .define(MetricType::Counter, b"hits")
                .expect("define");
            registry.increment(id, 2).expect("increment");
        }
        let mut text = PrometheusText::new();
        a.write_prometheus(Some("a"), &mut text);
        b.write_prometheus(Some("p\"q"), &mut text);
        let rendered = text.to_string();
        assert_eq!(
            rendered,
            "# TYPE wasmcustom_hits counter\nwasmcustom_hits{plugin=\"a\"} 2\n\
             wasmcustom_hits{plugin=\"p\\\"q\"} 2\n"
        );
    }
}
