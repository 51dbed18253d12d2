//! Prometheus metrics: one registry per process, passed down (no global registry), served as
//! text on the admin port's `/metrics`.

use std::collections::HashSet;

use parking_lot::Mutex;
use prometheus::{Encoder, HistogramOpts, HistogramVec, IntGaugeVec, Opts, Registry, TextEncoder};

/// Latency buckets in seconds, from 50 µs to 10 s. The 2 ms bucket is there so that a 2 ms
/// objective (the rate limiter's forwarded check) can be read off the histogram.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The label value shared by the values of a [`BoundedLabel`] beyond its bound.
pub const OTHER_LABEL: &str = "_other";

/// A label whose distinct values are capped: the first `max` values seen keep their name, later
/// ones share [`OTHER_LABEL`]. For labels taken from requests (namespaces, policy names, agent
/// types), so a client cannot grow the registry without bound.
#[derive(Debug)]
pub struct BoundedLabel {
    max: usize,
    seen: Mutex<HashSet<String>>,
}

impl BoundedLabel {
    /// A label of at most `max` distinct values besides [`OTHER_LABEL`].
    #[must_use]
    pub fn new(max: usize) -> Self {
        Self {
            max,
            seen: Mutex::new(HashSet::new()),
        }
    }

    /// `value` when it is (or can become) one of the labelled values, `_other` otherwise.
    pub fn label<'a>(&self, value: &'a str) -> &'a str {
        let mut seen = self.seen.lock();
        if seen.contains(value) {
            return value;
        }
        if seen.len() < self.max {
            seen.insert(value.to_owned());
            return value;
        }
        OTHER_LABEL
    }
}

/// The process's metric registry and the metrics every service shares.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// RED histogram of server calls: `rpc_server_call_duration_seconds`.
    pub rpc_server_duration: HistogramVec,
    /// RED histogram of client calls: `rpc_client_call_duration_seconds`.
    pub rpc_client_duration: HistogramVec,
    /// Circuit-breaker state per client target (0 closed, 1 open, 2 half-open).
    pub breaker_state: IntGaugeVec,
    /// 1 while a service's membership entry is registered, 0 while its lease is lost.
    pub membership_registered: IntGaugeVec,
    /// Optional features this process runs with (`agentmesh_feature_enabled{feature}`): the
    /// health aggregator's `/optimizations` reads them from every instance.
    pub features: IntGaugeVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates the registry with RPC, build and process metrics.
    #[must_use]
    pub fn new() -> Self {
        let registry = Registry::new();
        let labels = &["rpc_service", "rpc_method", "rpc_response_status_code"];
        let rpc_server_duration = HistogramVec::new(
            HistogramOpts::new(
                "rpc_server_call_duration_seconds",
                "Duration of gRPC server calls, from request headers to the end of the response stream.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            labels,
        )
        .expect("valid metric");
        let rpc_client_duration = HistogramVec::new(
            HistogramOpts::new(
                "rpc_client_call_duration_seconds",
                "Duration of gRPC client calls, from sending the request to the response headers.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            labels,
        )
        .expect("valid metric");
        let breaker_state = IntGaugeVec::new(
            Opts::new(
                "rpc_client_circuit_breaker_state",
                "Circuit breaker state per client target: 0 closed, 1 open, 2 half-open.",
            ),
            &["target"],
        )
        .expect("valid metric");
        let membership_registered = IntGaugeVec::new(
            Opts::new(
                "membership_registered",
                "1 while the service's membership entry is registered (its lease is alive), 0 while \
                 the lease is lost and the instance serves on its last known membership.",
            ),
            &["service"],
        )
        .expect("valid metric");
        let features = IntGaugeVec::new(
            Opts::new(
                "agentmesh_feature_enabled",
                "1 for each optional feature this process runs with (etcd, redis, otlp_export, \
                 and those a service declares), 0 for one it runs without.",
            ),
            &["feature"],
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "agentmesh_build_info",
                "Always 1; labelled with the agentmesh version.",
            ),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for collector in [
            Box::new(rpc_server_duration.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(rpc_client_duration.clone()),
            Box::new(features.clone()),
            Box::new(breaker_state.clone()),
            Box::new(membership_registered.clone()),
            Box::new(build_info),
        ] {
            registry
                .register(collector)
                .expect("metric registered once");
        }
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process collector registered once");
        Self {
            registry,
            rpc_server_duration,
            rpc_client_duration,
            breaker_state,
            membership_registered,
            features,
        }
    }

    /// Says whether an optional feature is on in this process.
    pub fn set_feature(&self, feature: &str, enabled: bool) {
        self.features
            .with_label_values(&[feature])
            .set(i64::from(enabled));
    }

    /// The registry, for domain metrics to register into.
    #[must_use]
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Encodes every metric in the Prometheus text format (version 0.0.4).
    #[must_use]
    pub fn encode(&self) -> String {
        let mut buf = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is utf-8")
    }
}

/// Label names whose values can name a tenant's resources (rate-limit and cache namespaces,
/// policies, subjects, tenants): redacted in a scrape that carries no token (README
/// "Security", `--auth-metrics`).
pub const TENANT_LABELS: &[&str] = &["namespace", "policy", "subject", "tenant"];

/// What a redacted label value reads.
pub const REDACTED: &str = "_redacted";

impl Metrics {
    /// [`Self::encode`] with the values of [`TENANT_LABELS`] replaced by [`REDACTED`]; series
    /// that become equal are summed (counters, gauges, histogram buckets), so totals stay
    /// right and no series repeats.
    #[must_use]
    pub fn encode_redacted(&self) -> String {
        let families = redact(self.registry.gather());
        let mut buf = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&families, &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is utf-8")
    }
}

fn redact(
    mut families: Vec<prometheus::proto::MetricFamily>,
) -> Vec<prometheus::proto::MetricFamily> {
    use std::collections::HashMap;
    for family in &mut families {
        let metrics = family.take_metric();
        let mut merged: Vec<prometheus::proto::Metric> = Vec::with_capacity(metrics.len());
        let mut index: HashMap<Vec<(String, String)>, usize> = HashMap::new();
        for mut metric in metrics {
            for pair in &mut metric.label {
                if TENANT_LABELS.contains(&pair.name()) {
                    pair.set_value(REDACTED.to_owned());
                }
            }
            let key: Vec<(String, String)> = metric
                .label
                .iter()
                .map(|p| (p.name().to_owned(), p.value().to_owned()))
                .collect();
            match index.get(&key) {
                Some(&i) => add_into(&mut merged[i], &metric),
                None => {
                    index.insert(key, merged.len());
                    merged.push(metric);
                }
            }
        }
        family.set_metric(merged);
    }
    families
}

/// Adds `from`'s values to `into` (same family, same labels after redaction).
fn add_into(into: &mut prometheus::proto::Metric, from: &prometheus::proto::Metric) {
    if let Some(c) = from.counter.as_ref() {
        let total = into.counter.as_ref().map_or(0.0, |c| c.value()) + c.value();
        into.counter.mut_or_insert_default().set_value(total);
    }
    if let Some(g) = from.gauge.as_ref() {
        let total = into.gauge.as_ref().map_or(0.0, |g| g.value()) + g.value();
        into.gauge.mut_or_insert_default().set_value(total);
    }
    if let Some(u) = from.untyped.as_ref() {
        let total = into.untyped.as_ref().map_or(0.0, |u| u.value()) + u.value();
        into.untyped.mut_or_insert_default().set_value(total);
    }
    if let Some(h) = from.histogram.as_ref() {
        let target = into.histogram.mut_or_insert_default();
        target.set_sample_count(target.sample_count() + h.sample_count());
        target.set_sample_sum(target.sample_sum() + h.sample_sum());
        for (mine, theirs) in target.bucket.iter_mut().zip(&h.bucket) {
            mine.set_cumulative_count(mine.cumulative_count() + theirs.cumulative_count());
        }
    }
    // Summaries' quantiles cannot be added; agentmesh exports none.
}

/// The `Content-Type` of [`Metrics::encode`]'s output.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_bounded_label_shares_other_beyond_the_bound() {
        let label = BoundedLabel::new(2);
        assert_eq!(label.label("a"), "a");
        assert_eq!(label.label("b"), "b");
        assert_eq!(label.label("c"), OTHER_LABEL);
        assert_eq!(label.label("a"), "a");
    }

    #[test]
    fn test_redacted_scrapes_hide_tenant_labels_and_keep_the_totals() {
        let metrics = Metrics::new();
        let counter = prometheus::IntCounterVec::new(
            prometheus::Opts::new("decisions_total", "d"),
            &["namespace", "result"],
        )
        .unwrap();
        metrics
            .registry()
            .register(Box::new(counter.clone()))
            .unwrap();
        counter.with_label_values(&["acme", "allow"]).inc_by(3);
        counter.with_label_values(&["beta", "allow"]).inc_by(4);
        counter.with_label_values(&["beta", "deny"]).inc();
        let histogram = prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new("took_seconds", "t").buckets(vec![0.1, 1.0]),
            &["namespace"],
        )
        .unwrap();
        metrics
            .registry()
            .register(Box::new(histogram.clone()))
            .unwrap();
        histogram.with_label_values(&["acme"]).observe(0.05);
        histogram.with_label_values(&["beta"]).observe(0.5);
        let full = metrics.encode();
        assert!(full.contains("namespace=\"acme\""));
        let text = metrics.encode_redacted();
        assert!(!text.contains("acme") && !text.contains("beta"), "{text}");
        assert!(
            text.contains("decisions_total{namespace=\"_redacted\",result=\"allow\"} 7"),
            "{text}"
        );
        assert!(
            text.contains("decisions_total{namespace=\"_redacted\",result=\"deny\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("took_seconds_bucket{namespace=\"_redacted\",le=\"0.1\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("took_seconds_count{namespace=\"_redacted\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn test_encode_contains_rpc_histogram_and_process_metrics() {
        let metrics = Metrics::new();
        metrics
            .rpc_server_duration
            .with_label_values(&["svc", "M", "OK"])
            .observe(0.001);
        let text = metrics.encode();
        assert!(text.contains("# TYPE rpc_server_call_duration_seconds histogram"));
        assert!(text.contains("agentmesh_build_info"));
        #[cfg(target_os = "linux")]
        assert!(text.contains("process_resident_memory_bytes"));
    }
}
