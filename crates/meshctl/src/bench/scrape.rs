//! Reads a server's Prometheus histogram over the run: `/metrics` is scraped before the load
//! and after it, and the bucket counts' difference gives the quantiles of what happened in
//! between (the event bus's queue wait per priority, measured inside the server, which the
//! client-side publish → deliver latency cannot separate from transport and credit).

use std::collections::BTreeMap;
use std::time::Duration;

use agentmesh_runtime::scrape::Value;
use anyhow::Context;

/// Cumulative bucket counts by label value of one histogram, keyed by upper bound.
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct Buckets(BTreeMap<String, Vec<(f64, u64)>>);

impl Buckets {
    /// What was observed after `before` (counts subtracted bucket by bucket).
    pub(super) fn since(&self, before: &Self) -> Self {
        let mut out = BTreeMap::new();
        for (label, buckets) in &self.0 {
            let old = before.0.get(label);
            let diff = buckets
                .iter()
                .map(|&(le, n)| {
                    let was = old
                        .and_then(|o| o.iter().find(|(l, _)| *l == le))
                        .map_or(0, |&(_, n)| n);
                    (le, n.saturating_sub(was))
                })
                .collect();
            out.insert(label.clone(), diff);
        }
        Self(out)
    }

    /// Both sets of observations, bucket by bucket (several servers' histograms of one
    /// metric, which share their buckets).
    pub(super) fn plus(mut self, other: &Self) -> Self {
        for (label, buckets) in &other.0 {
            let mine = self.0.entry(label.clone()).or_default();
            for &(le, n) in buckets {
                match mine.iter_mut().find(|(l, _)| *l == le) {
                    Some((_, m)) => *m += n,
                    None => mine.push((le, n)),
                }
            }
            mine.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        self
    }

    /// Prints one line per label with observations, in the order given: its count (followed by
    /// `unit`) and p50/p99/p99.9 interpolated in the buckets, under `heading`. With `json`, one
    /// object instead, `{ name: [{ key: label, "count", "p50_us", "p99_us", "p999_us" }, …] }`.
    pub(super) fn print_quantiles(&self, labels: &[&str], json: bool, report: &Report<'_>) {
        let us = |s: Option<f64>| s.map(|s| (s * 1e6).round());
        let shown = || labels.iter().filter(|l| self.count(l) > 0);
        if json {
            let rows: Vec<_> = shown()
                .map(|l| {
                    serde_json::json!({
                        report.key: l,
                        "count": self.count(l),
                        "p50_us": us(self.quantile(l, 0.5)),
                        "p99_us": us(self.quantile(l, 0.99)),
                        "p999_us": us(self.quantile(l, 0.999)),
                    })
                })
                .collect();
            println!("{}", serde_json::json!({ report.name: rows }));
            return;
        }
        let text = |s: Option<f64>| us(s).map_or_else(|| "-".to_owned(), |us| format!("{us:.0}µs"));
        println!(
            "  {} (server histograms over the measured window; interpolated in buckets)",
            report.heading
        );
        for l in shown() {
            println!(
                "  {l:<9} {:>10}{}  p50 {}  p99 {}  p99.9 {}",
                self.count(l),
                report.unit,
                text(self.quantile(l, 0.5)),
                text(self.quantile(l, 0.99)),
                text(self.quantile(l, 0.999)),
            );
        }
    }

    /// Observations under `label`.
    pub(super) fn count(&self, label: &str) -> u64 {
        self.0
            .get(label)
            .and_then(|b| b.last())
            .map_or(0, |&(_, n)| n)
    }

    /// The `q` quantile under `label`, interpolated linearly inside its bucket (Prometheus's
    /// `histogram_quantile`); `None` without observations, infinity in the last bucket.
    #[allow(clippy::cast_precision_loss)]
    pub(super) fn quantile(&self, label: &str, q: f64) -> Option<f64> {
        let buckets = self.0.get(label)?;
        let total = buckets.last()?.1;
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let (mut lower, mut below) = (0.0, 0_u64);
        for &(le, n) in buckets {
            if n as f64 >= rank {
                if le.is_infinite() {
                    return Some(lower);
                }
                let inside = (n - below) as f64;
                let at = if inside == 0.0 {
                    le
                } else {
                    lower + (le - lower) * (rank - below as f64) / inside
                };
                return Some(at);
            }
            (lower, below) = (le, n);
        }
        Some(lower)
    }
}

/// How [`Buckets::print_quantiles`] names what it prints.
pub(super) struct Report<'a> {
    /// The JSON object's one field.
    pub(super) name: &'a str,
    /// The field naming each row's label in JSON.
    pub(super) key: &'a str,
    /// The table's heading.
    pub(super) heading: &'a str,
    /// After each row's count in the table.
    pub(super) unit: &'a str,
}

/// The buckets of histogram `name` in a Prometheus text exposition, keyed by the value of
/// `label` (an empty `label`: one key, `all`, for a histogram without labels). Parsed by
/// `prometheus-parse` through the runtime; a family without `# TYPE histogram` has no buckets.
pub(super) fn parse(text: &str, name: &str, label: &str) -> Buckets {
    let mut out: BTreeMap<String, Vec<(f64, u64)>> = BTreeMap::new();
    let Ok(scrape) = agentmesh_runtime::scrape::parse(text) else {
        return Buckets(out);
    };
    for sample in scrape.samples.iter().filter(|s| s.metric == name) {
        let key = if label.is_empty() {
            Some("all")
        } else {
            sample.labels.get(label)
        };
        let (Some(key), Value::Histogram(counts)) = (key, &sample.value) else {
            continue;
        };
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        out.entry(key.to_owned())
            .or_default()
            .extend(counts.iter().map(|c| (c.less_than, c.count as u64)));
    }
    for buckets in out.values_mut() {
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    Buckets(out)
}

/// The body of `GET url` (`http://host:port/path`); an error unless the status is 200.
pub(super) async fn fetch(url: &str) -> anyhow::Result<String> {
    let (code, body) = crate::admin_get(url, Duration::from_secs(5))
        .await
        .with_context(|| format!("scraping {url}"))?;
    anyhow::ensure!(code == 200, "{url}: HTTP {code}");
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_histograms_of_several_servers_add_up_bucket_by_bucket() {
        let a = parse(
            "# TYPE x histogram\nx_bucket{path=\"f\",le=\"0.001\"} 3\nx_bucket{path=\"f\",le=\"+Inf\"} 4\n",
            "x",
            "path",
        );
        let b = parse(
            "# TYPE x histogram\nx_bucket{path=\"f\",le=\"0.001\"} 1\nx_bucket{path=\"f\",le=\"+Inf\"} 6\nx_bucket{path=\"l\",le=\"+Inf\"} 2\n",
            "x",
            "path",
        );
        let sum = a.plus(&b);
        assert_eq!((sum.count("f"), sum.count("l")), (10, 2));
        assert_eq!(sum.quantile("f", 0.4), Some(0.001));
    }

    const BEFORE: &str = r#"# HELP eventbus_queue_wait_seconds x
# TYPE eventbus_queue_wait_seconds histogram
eventbus_queue_wait_seconds_bucket{priority="critical",le="0.0005"} 10
eventbus_queue_wait_seconds_bucket{priority="critical",le="0.001"} 10
eventbus_queue_wait_seconds_bucket{priority="critical",le="+Inf"} 10
eventbus_queue_wait_seconds_count{priority="critical"} 10
"#;
    const AFTER: &str = r#"# TYPE eventbus_queue_wait_seconds histogram
eventbus_queue_wait_seconds_bucket{priority="critical",le="0.0005"} 60
eventbus_queue_wait_seconds_bucket{priority="critical",le="0.001"} 109
eventbus_queue_wait_seconds_bucket{priority="critical",le="+Inf"} 110
eventbus_queue_wait_seconds_bucket{priority="low",le="0.0005"} 0
eventbus_queue_wait_seconds_bucket{priority="low",le="0.001"} 0
eventbus_queue_wait_seconds_bucket{priority="low",le="+Inf"} 4
"#;

    #[test]
    fn test_quantiles_of_the_difference_interpolate_inside_buckets() {
        let name = "eventbus_queue_wait_seconds";
        let diff = parse(AFTER, name, "priority").since(&parse(BEFORE, name, "priority"));
        assert_eq!(diff.count("critical"), 100);
        let p50 = diff.quantile("critical", 0.5).unwrap();
        assert!((p50 - 0.0005).abs() < 1e-9, "{p50}");
        let p90 = diff.quantile("critical", 0.9).unwrap();
        assert!(
            (p90 - (0.0005 + 0.0005 * 40.0 / 49.0)).abs() < 1e-9,
            "{p90}"
        );
        assert_eq!(
            diff.quantile("low", 0.5),
            Some(0.001),
            "beyond the last bound"
        );
        assert_eq!(diff.quantile("high", 0.5), None);
    }
}
