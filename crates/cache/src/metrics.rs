//! The cache's metrics, counted in place. Namespaces are labelled up to
//! [`MAX_LABELLED_NAMESPACES`] (then `_other`).

use std::sync::Arc;

use agentmesh_runtime::metrics::BoundedLabel;
use prometheus::{IntCounterVec, Opts, Registry};

/// Distinct namespaces given their own label.
pub const MAX_LABELLED_NAMESPACES: usize = 64;

/// The cache's metrics (cheap to clone).
#[derive(Clone)]
pub struct CacheMetrics {
    reads: IntCounterVec,
    writes: IntCounterVec,
    namespaces: Arc<BoundedLabel>,
}

impl CacheMetrics {
    /// Registers the metrics in `registry`.
    ///
    /// # Errors
    /// When they are registered twice.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let reads = IntCounterVec::new(
            Opts::new(
                "cache_reads_total",
                "Get calls by namespace and result (l1 hit, l2 hit, miss).",
            ),
            &["namespace", "result"],
        )?;
        let writes = IntCounterVec::new(
            Opts::new(
                "cache_writes_total",
                "Set calls by namespace and result (stored, refused: bad input, version \
                 mismatch or L2 down).",
            ),
            &["namespace", "result"],
        )?;
        registry.register(Box::new(reads.clone()))?;
        registry.register(Box::new(writes.clone()))?;
        Ok(Self {
            reads,
            writes,
            namespaces: Arc::new(BoundedLabel::new(MAX_LABELLED_NAMESPACES)),
        })
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
}
