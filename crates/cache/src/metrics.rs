//! The cache's metrics, counted in place; `Stats` reads them back. Namespaces are labelled up
//! to [`MAX_LABELLED_NAMESPACES`] (then `_other`).

use std::sync::Arc;

use agentmesh_runtime::metrics::BoundedLabel;
use prometheus::core::Collector;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Distinct namespaces given their own label.
pub const MAX_LABELLED_NAMESPACES: usize = 64;

/// The cache's metrics (cheap to clone).
#[derive(Clone)]
pub struct CacheMetrics {
    reads: IntCounterVec,
    writes: IntCounterVec,
    leases: IntCounterVec,
    semantic: IntCounterVec,
    resyncs: IntCounterVec,
    lag: Histogram,
    semantic_seconds: prometheus::HistogramVec,
    raw_bytes: IntCounter,
    stored_bytes: IntCounter,
    compression_ratio: prometheus::Gauge,
    pub(crate) l1_entries: IntGauge,
    pub(crate) l1_bytes: IntGauge,
    pub(crate) l1_evictions: IntGauge,
    embedder_info: prometheus::IntGaugeVec,
    namespaces: Arc<BoundedLabel>,
}

impl CacheMetrics {
    /// Registers the metrics in `registry`.
    ///
    /// # Errors
    /// When they are registered twice.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let reads = counter(
            "cache_reads_total",
            "Reads (Get, GetMany items, GetOrLease lookups) by namespace and result: l1 or l2 \
             hit, stale (served past its TTL or from L1 while L2 is down), negative (a \
             remembered miss), miss.",
            &["namespace", "result"],
        )?;
        let writes = counter(
            "cache_writes_total",
            "Writes by namespace and result (stored; refused: bad input, version mismatch or \
             L2 down).",
            &["namespace", "result"],
        )?;
        let leases = counter(
            "cache_leases_total",
            "GetOrLease answers by namespace and outcome: hit, hit_refresh (a hit with a lease \
             to refresh it), negative, granted, pending (wait ran out), error; coalesced counts \
             callers that waited and got the holder's value.",
            &["namespace", "outcome"],
        )?;
        let semantic = counter(
            "cache_semantic_total",
            "SemanticGet answers by namespace and result: exact, normalized, semantic, miss, \
             guard_refused (a similar prompt refused by the content guard).",
            &["namespace", "result"],
        )?;
        let resyncs = counter(
            "cache_feed_events_total",
            "Change-feed events: synced ((re)established, L1 flushed), lost (L1 answers only \
             when L2 cannot), gap (sequence numbers skipped, L1 flushed).",
            &["event"],
        )?;
        let lag = Histogram::with_opts(
            HistogramOpts::new(
                "cache_invalidation_lag_seconds",
                "Time from a change in L2 to its arrival at this instance (wall clocks).",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0,
            ]),
        )?;
        registry.register(Box::new(lag.clone()))?;
        let semantic_seconds = prometheus::HistogramVec::new(
            HistogramOpts::new(
                "cache_semantic_get_seconds",
                "SemanticGet inside the instance, by who embedded the prompt (caller: a vector \
                 sent; service: embedded here).",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0,
            ]),
            &["embedder"],
        )?;
        registry.register(Box::new(semantic_seconds.clone()))?;
        let raw_bytes = IntCounter::new(
            "cache_value_bytes_total",
            "Bytes of values written, before compression.",
        )?;
        let stored_bytes = IntCounter::new(
            "cache_stored_bytes_total",
            "Bytes of values written, as stored (zstd from 1 KiB).",
        )?;
        let compression_ratio = prometheus::Gauge::new(
            "cache_compression_ratio",
            "Bytes written before compression over bytes stored, since start (1 = nothing \
             compressed).",
        )?;
        registry.register(Box::new(raw_bytes.clone()))?;
        registry.register(Box::new(stored_bytes.clone()))?;
        registry.register(Box::new(compression_ratio.clone()))?;
        Ok(Self {
            reads,
            writes,
            leases,
            semantic,
            resyncs,
            lag,
            semantic_seconds,
            raw_bytes,
            stored_bytes,
            compression_ratio,
            l1_entries: gauge("cache_l1_entries", "Entries in this instance's L1.")?,
            l1_bytes: gauge(
                "cache_l1_bytes",
                "Bytes in this instance's L1 (as weighed).",
            )?,
            l1_evictions: gauge(
                "cache_l1_evictions",
                "Entries evicted from L1 for room since start.",
            )?,
            embedder_info: {
                let g = prometheus::IntGaugeVec::new(
                    Opts::new(
                        "cache_embedder_info",
                        "The semantic cache's embedder (1 for the one in use); fallback=true \
                         when no model is loaded (lexical fallback).",
                    ),
                    &["embedder", "fallback"],
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            namespaces: Arc::new(BoundedLabel::new(MAX_LABELLED_NAMESPACES)),
        })
    }

    /// Says which embedder the semantic cache uses (`cache_embedder_info`, value 1).
    pub fn embedder(&self, id: &str, fallback: bool) {
        self.embedder_info
            .with_label_values(&[id, if fallback { "true" } else { "false" }])
            .set(1);
    }

    /// Metrics in a registry of their own (tests, benches).
    #[must_use]
    pub fn unregistered() -> Self {
        Self::register(&Registry::new()).expect("a fresh registry")
    }

    /// A valid namespace's label (bounded); `_invalid` for one the cache refuses.
    fn label<'a>(&self, namespace: &'a str) -> &'a str {
        let valid = !namespace.is_empty()
            && namespace.len() <= crate::config::MAX_NAMESPACE_LEN
            && namespace.bytes().all(|b| b.is_ascii_graphic());
        if valid {
            self.namespaces.label(namespace)
        } else {
            "_invalid"
        }
    }

    pub(crate) fn read(&self, namespace: &str, result: &str) {
        self.reads
            .with_label_values(&[self.label(namespace), result])
            .inc();
    }

    pub(crate) fn write(&self, namespace: &str, result: &str) {
        self.writes
            .with_label_values(&[self.label(namespace), result])
            .inc();
    }

    pub(crate) fn lease(&self, namespace: &str, outcome: &str) {
        self.leases
            .with_label_values(&[self.label(namespace), outcome])
            .inc();
    }

    pub(crate) fn semantic(&self, namespace: &str, result: &str) {
        self.semantic
            .with_label_values(&[self.label(namespace), result])
            .inc();
    }

    pub(crate) fn semantic_took(&self, caller_vector: bool, started: std::time::Instant) {
        self.semantic_seconds
            .with_label_values(&[if caller_vector { "caller" } else { "service" }])
            .observe(started.elapsed().as_secs_f64());
    }

    pub(crate) fn resync(&self, event: &str) {
        self.resyncs.with_label_values(&[event]).inc();
    }

    #[allow(clippy::cast_precision_loss, reason = "a lag in ms is far below 2^52")]
    pub(crate) fn lag(&self, ms: u64) {
        self.lag.observe(ms as f64 / 1000.0);
    }

    #[allow(
        clippy::cast_precision_loss,
        reason = "byte totals stay far below 2^52 between restarts"
    )]
    pub(crate) fn stored(&self, raw: usize, stored: usize) {
        self.raw_bytes.inc_by(raw as u64);
        self.stored_bytes.inc_by(stored as u64);
        let s = self.stored_bytes.get().max(1);
        self.compression_ratio
            .set(self.raw_bytes.get() as f64 / s as f64);
    }

    /// Every namespace's counts so far: (namespace label, family, result, count), families
    /// `reads`, `writes`, `leases`, `semantic`.
    #[must_use]
    pub fn counts(&self) -> Vec<(String, &'static str, String, u64)> {
        let mut out = Vec::new();
        for (family, vec) in [
            ("reads", &self.reads),
            ("writes", &self.writes),
            ("leases", &self.leases),
            ("semantic", &self.semantic),
        ] {
            for mf in vec.collect() {
                for m in mf.get_metric() {
                    let label = |name: &str| {
                        m.get_label()
                            .iter()
                            .find(|l| l.name() == name)
                            .map(|l| l.value().to_owned())
                            .unwrap_or_default()
                    };
                    let result = if family == "leases" {
                        label("outcome")
                    } else {
                        label("result")
                    };
                    #[allow(
                        clippy::cast_possible_truncation,
                        clippy::cast_sign_loss,
                        reason = "counters hold whole numbers"
                    )]
                    let count = m.get_counter().value() as u64;
                    out.push((label("namespace"), family, result, count));
                }
            }
        }
        out
    }

    /// Feed events so far: (event, count).
    #[must_use]
    pub fn feed_events(&self) -> Vec<(String, u64)> {
        ["synced", "lost", "gap"]
            .into_iter()
            .map(|e| (e.to_owned(), self.resyncs.with_label_values(&[e]).get()))
            .collect()
    }
}
