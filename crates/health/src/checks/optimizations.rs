//! `/optimizations`: which optional features are active across the cluster (what the earlier
//! platform's status endpoint showed), read from every instance's `/metrics` every scrape
//! interval: `agentmesh_feature_enabled` (etcd, Redis, OTLP export), the cache's embedder,
//! and what follows from them (durable event streams, rate-limit policies in etcd, scheduler
//! failover). Versions are collected on the way: instances that disagree are worth knowing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use agentmesh_membership::Member;
use agentmesh_runtime::scrape::{self, Scrape, Value};
use futures::StreamExt;
use parking_lot::Mutex;
use serde_json::{Value as Json, json};
use tokio_util::sync::CancellationToken;

use super::now_ms;
use crate::aggregator::Aggregator;
use crate::alerts::eval::InstanceScrapes;

/// Scrapes in flight at once.
const CONCURRENT_SCRAPES: usize = 16;
/// Longest one scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// What one instance runs with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceFeatures {
    /// Its service.
    pub service: String,
    /// `agentmesh_build_info`'s version.
    pub version: String,
    /// Feature → on.
    pub features: BTreeMap<String, bool>,
    /// The cache's embedder, with "(fallback)" when it is the lexical fallback.
    pub embedder: Option<String>,
}

/// Reads an instance's features from its metrics.
#[must_use]
pub fn read_features(service: &str, scrape: &Scrape) -> InstanceFeatures {
    let mut out = InstanceFeatures {
        service: service.to_owned(),
        ..InstanceFeatures::default()
    };
    for sample in &scrape.samples {
        let (Value::Gauge(value) | Value::Untyped(value) | Value::Counter(value)) = sample.value
        else {
            continue;
        };
        match sample.metric.as_str() {
            "agentmesh_build_info" => {
                out.version = sample.labels.get("version").unwrap_or_default().to_owned();
            }
            "agentmesh_feature_enabled" => {
                if let Some(feature) = sample.labels.get("feature") {
                    out.features.insert(feature.to_owned(), value > 0.0);
                }
            }
            "cache_embedder_info" if value > 0.0 => {
                let name = sample.labels.get("embedder").unwrap_or("?");
                let fallback = sample.labels.get("fallback") == Some("true");
                out.embedder = Some(if fallback {
                    format!("{name} (fallback)")
                } else {
                    name.to_owned()
                });
            }
            _ => {}
        }
    }
    out
}

/// The latest features of every instance.
#[derive(Default)]
pub struct Optimizations {
    by_instance: Mutex<BTreeMap<String, InstanceFeatures>>,
    unreachable: Mutex<BTreeMap<String, String>>,
    scraped_at_ms: Mutex<u64>,
    /// The last two scrapes of each instance, for alert rules over metrics.
    windows: Mutex<BTreeMap<String, InstanceScrapes>>,
    /// The process's token, sent with each scrape (`--auth-metrics token`).
    bearer: Option<Arc<str>>,
}

impl Optimizations {
    /// A scraper presenting `bearer` (the process's `--auth-token-file`) to each `/metrics`.
    #[must_use]
    pub fn with_bearer(bearer: Option<Arc<str>>) -> Self {
        Self {
            bearer,
            ..Self::default()
        }
    }

    /// Scrapes every known instance, every `interval`, until `stop`.
    pub async fn run(
        self: Arc<Self>,
        aggregator: Arc<Aggregator>,
        interval: Duration,
        stop: CancellationToken,
    ) {
        // The first scrape soon after start, once discovery has found the instances.
        let mut ticks = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(1),
            interval,
        );
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            self.scrape_all(aggregator.instances()).await;
        }
    }

    /// Scrapes these instances now.
    pub async fn scrape_all(&self, members: Vec<Member>) {
        let results: Vec<(Member, Result<Scrape, String>)> = futures::stream::iter(members)
            .map(|member| async move {
                let url = format!("http://{}/metrics", member.admin_addr);
                let result =
                    match scrape::get_with(&url, SCRAPE_TIMEOUT, self.bearer.as_deref()).await {
                        Ok((200, body)) => scrape::parse(&body).map_err(|e| e.to_string()),
                        Ok((code, _)) => Err(format!("{url} answered {code}")),
                        Err(e) => Err(e.to_string()),
                    };
                (member, result)
            })
            .buffer_unordered(CONCURRENT_SCRAPES)
            .collect()
            .await;
        let mut by_instance = BTreeMap::new();
        let mut unreachable = BTreeMap::new();
        let now = now_ms();
        let mut windows = self.windows.lock();
        let previous = std::mem::take(&mut *windows);
        for (member, result) in results {
            let id = crate::model::instance_id(&member.service, &member.instance_id);
            match result {
                Ok(scrape) => {
                    by_instance.insert(id.clone(), read_features(&member.service, &scrape));
                    let prev = previous.get(&id).map(|w| w.cur.clone());
                    windows.insert(
                        id,
                        InstanceScrapes {
                            service: member.service.clone(),
                            prev,
                            cur: (now, Arc::new(scrape)),
                        },
                    );
                }
                Err(e) => {
                    unreachable.insert(id, e);
                }
            }
        }
        drop(windows);
        *self.by_instance.lock() = by_instance;
        *self.unreachable.lock() = unreachable;
        *self.scraped_at_ms.lock() = now;
    }

    /// The last two scrapes of every instance that answered the last scrape.
    #[must_use]
    pub fn scrapes(&self) -> Vec<InstanceScrapes> {
        self.windows.lock().values().cloned().collect()
    }

    /// Versions reported, with how many instances run each.
    #[must_use]
    pub fn versions(&self) -> BTreeMap<String, usize> {
        let mut versions = BTreeMap::new();
        for features in self.by_instance.lock().values() {
            *versions.entry(features.version.clone()).or_default() += 1;
        }
        versions
    }

    /// The `/optimizations` body.
    #[must_use]
    pub fn json(&self) -> Json {
        let by_instance = self.by_instance.lock().clone();
        let on = |filter: &dyn Fn(&InstanceFeatures) -> bool, feature: &str| {
            let of: Vec<&InstanceFeatures> = by_instance.values().filter(|f| filter(f)).collect();
            let enabled = of
                .iter()
                .filter(|f| f.features.get(feature).copied().unwrap_or(false))
                .count();
            (enabled, of.len())
        };
        let any = |_: &InstanceFeatures| true;
        let of_service = |name: &'static str| move |f: &InstanceFeatures| f.service == name;
        let entry = |name: &str, what: &str, (enabled, of): (usize, usize)| {
            json!({
                "name": name,
                "description": what,
                "active": enabled > 0,
                "instances_enabled": enabled,
                "instances": of,
            })
        };
        let embedders: BTreeMap<String, usize> = by_instance
            .values()
            .filter_map(|f| f.embedder.clone())
            .fold(BTreeMap::new(), |mut acc, e| {
                *acc.entry(e).or_default() += 1;
                acc
            });
        let model_loaded = embedders.keys().any(|e| !e.ends_with("(fallback)"));
        json!({
            "scraped_at_ms": *self.scraped_at_ms.lock(),
            "features": [
                entry("etcd", "membership, policies and elections in etcd", on(&any, "etcd")),
                entry("redis", "shared state in Redis", on(&any, "redis")),
                entry("otlp_export", "traces exported over OTLP", on(&any, "otlp_export")),
                entry("durable_streams", "event bus streams kept in Redis (survive restarts)", on(&of_service("eventbus"), "redis")),
                entry("ratelimit_strict", "cluster-wide rate-limit counters in Redis", on(&of_service("ratelimit"), "redis")),
                entry("ratelimit_policies_in_etcd", "rate-limit policies stored in etcd, shared and versioned", on(&of_service("ratelimit"), "etcd")),
                entry("scheduler_failover", "scheduler leader election in etcd and tasks in Redis", on(&of_service("scheduler"), "etcd")),
                entry("cache_l2_redis", "cache L2 shared in Redis", on(&of_service("cache"), "redis")),
                json!({
                    "name": "cache_embedder",
                    "description": "the semantic cache's embedding model (all-MiniLM-L6-v2) loaded",
                    "active": model_loaded,
                    "embedders": embedders,
                }),
            ],
            "versions": self.versions(),
            "unreachable": self.unreachable.lock().clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_features_are_read_from_an_instances_metrics() {
        let text = "\
# TYPE agentmesh_build_info gauge
agentmesh_build_info{version=\"0.1.0\"} 1
# TYPE agentmesh_feature_enabled gauge
agentmesh_feature_enabled{feature=\"redis\"} 1
agentmesh_feature_enabled{feature=\"etcd\"} 0
# TYPE cache_embedder_info gauge
cache_embedder_info{embedder=\"lexical\",fallback=\"true\"} 1
";
        let scrape = scrape::parse(text).unwrap();
        let features = read_features("cache", &scrape);
        assert_eq!(features.version, "0.1.0");
        assert_eq!(features.features.get("redis"), Some(&true));
        assert_eq!(features.features.get("etcd"), Some(&false));
        assert_eq!(features.embedder.as_deref(), Some("lexical (fallback)"));
    }
}
