//! Measures a rule's query over the last two scrapes of every instance: counter increases,
//! histogram quantiles and gauges, summed across instances. No data (a first scrape, no
//! traffic) measures nothing, and a condition on nothing does not hold.

use std::collections::BTreeMap;
use std::sync::Arc;

use agentmesh_runtime::scrape::{Sample, Scrape, Value};

use super::rule::Query;

/// Status codes counted as server errors by `error_rate`.
pub const SERVER_ERRORS: &[&str] = &[
    "UNKNOWN",
    "DEADLINE_EXCEEDED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
];

/// The last two scrapes of one instance.
#[derive(Clone)]
pub struct InstanceScrapes {
    /// Its service.
    pub service: String,
    /// The scrape before, with its time (ms).
    pub prev: Option<(u64, Arc<Scrape>)>,
    /// The latest scrape, with its time (ms).
    pub cur: (u64, Arc<Scrape>),
}

fn key(sample: &Sample) -> String {
    format!("{}{{{}}}", sample.metric, sample.labels)
}

fn scalar(value: &Value) -> Option<f64> {
    match value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(*v),
        _ => None,
    }
}

fn buckets(value: &Value) -> Option<&[agentmesh_runtime::scrape::HistogramCount]> {
    match value {
        Value::Histogram(b) => Some(b),
        _ => None,
    }
}

/// Increase of every matching counter sample over the instances' last interval, and the
/// interval's length in seconds (the longest seen).
fn increase(
    instances: &[&InstanceScrapes],
    name: &str,
    keep: &dyn Fn(&Sample) -> bool,
) -> Option<(f64, f64)> {
    let mut total = 0.0;
    let mut seconds: f64 = 0.0;
    let mut any = false;
    for instance in instances {
        let Some((prev_at, prev)) = &instance.prev else {
            continue;
        };
        let before: BTreeMap<String, f64> = prev
            .samples
            .iter()
            .filter(|s| s.metric == name && keep(s))
            .filter_map(|s| Some((key(s), scalar(&s.value)?)))
            .collect();
        for sample in instance
            .cur
            .1
            .samples
            .iter()
            .filter(|s| s.metric == name && keep(s))
        {
            let Some(now) = scalar(&sample.value) else {
                continue;
            };
            let then = before.get(&key(sample)).copied().unwrap_or(0.0);
            // A restarted process counts from zero again.
            total += if now >= then { now - then } else { now };
            any = true;
        }
        #[allow(clippy::cast_precision_loss, reason = "milliseconds")]
        let span = instance.cur.0.saturating_sub(*prev_at) as f64 / 1000.0;
        seconds = seconds.max(span);
    }
    any.then_some((total, seconds))
}

/// Increase of the matching histograms' buckets (upper bound → count), summed.
fn histogram_increase(
    instances: &[&InstanceScrapes],
    name: &str,
    keep: &dyn Fn(&Sample) -> bool,
) -> BTreeMap<u64, f64> {
    let mut sum: BTreeMap<u64, f64> = BTreeMap::new();
    for instance in instances {
        let Some((_, prev)) = &instance.prev else {
            continue;
        };
        let before: BTreeMap<String, &Sample> = prev
            .samples
            .iter()
            .filter(|s| s.metric == name && keep(s))
            .map(|s| (key(s), s))
            .collect();
        for sample in instance
            .cur
            .1
            .samples
            .iter()
            .filter(|s| s.metric == name && keep(s))
        {
            let Some(now) = buckets(&sample.value) else {
                continue;
            };
            let then = before.get(&key(sample)).and_then(|s| buckets(&s.value));
            for bucket in now {
                let old = then
                    .and_then(|b| {
                        b.iter()
                            .find(|x| x.less_than.to_bits() == bucket.less_than.to_bits())
                    })
                    .map_or(0.0, |x| x.count);
                let delta = if bucket.count >= old {
                    bucket.count - old
                } else {
                    bucket.count
                };
                *sum.entry(bucket.less_than.to_bits()).or_default() += delta;
            }
        }
    }
    sum
}

/// The quantile of cumulative buckets, interpolated within the bucket it falls in.
fn quantile(buckets: &BTreeMap<u64, f64>, q: f64) -> Option<f64> {
    let mut sorted: Vec<(f64, f64)> = buckets
        .iter()
        .map(|(b, c)| (f64::from_bits(*b), *c))
        .collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = sorted.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for (bound, count) in sorted {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower.0);
            }
            let width = count - lower.1;
            let within = if width > 0.0 {
                (rank - lower.1) / width
            } else {
                1.0
            };
            return Some(lower.0 + (bound - lower.0) * within);
        }
        lower = (bound, count);
    }
    Some(lower.0)
}

fn has_labels(sample: &Sample, filter: &[(String, String)]) -> bool {
    filter
        .iter()
        .all(|(k, v)| sample.labels.get(k) == Some(v.as_str()))
}

/// The query's value now, if there is data for it.
#[must_use]
pub fn measure(query: &Query, all: &[InstanceScrapes]) -> Option<f64> {
    let of = |service: &str| -> Vec<&InstanceScrapes> {
        all.iter().filter(|i| i.service == service).collect()
    };
    let everyone: Vec<&InstanceScrapes> = all.iter().collect();
    let ratio = |part: Option<(f64, f64)>, whole: Option<(f64, f64)>| -> Option<f64> {
        let whole = whole?.0;
        (whole > 0.0).then(|| part.map_or(0.0, |p| p.0) / whole)
    };
    match query {
        Query::State(_) => None,
        Query::ErrorRate(service) => {
            let instances = of(service);
            let name = "rpc_server_call_duration_seconds";
            let count = |filter: &dyn Fn(&Sample) -> bool| {
                let h = histogram_increase(&instances, name, filter);
                h.iter()
                    .max_by(|a, b| f64::from_bits(*a.0).total_cmp(&f64::from_bits(*b.0)))
                    .map(|(_, c)| (*c, 0.0))
            };
            let errors = count(&|s| {
                s.labels
                    .get("rpc_response_status_code")
                    .is_some_and(|c| SERVER_ERRORS.contains(&c))
            });
            ratio(errors, count(&|_| true))
        }
        Query::Latency {
            quantile: q,
            service,
            method,
        } => {
            let h = histogram_increase(&of(service), "rpc_server_call_duration_seconds", &|s| {
                method
                    .as_deref()
                    .is_none_or(|m| s.labels.get("rpc_method") == Some(m))
            });
            quantile(&h, *q)
        }
        Query::CacheHitRate => {
            let hits = increase(&everyone, "cache_reads_total", &|s| {
                matches!(s.labels.get("result"), Some("l1" | "l2" | "stale"))
            });
            ratio(hits, increase(&everyone, "cache_reads_total", &|_| true))
        }
        Query::DenyRate(namespace) => {
            let ns = |s: &Sample| {
                namespace
                    .as_deref()
                    .is_none_or(|n| s.labels.get("namespace") == Some(n))
            };
            let denied = increase(&everyone, "ratelimit_decisions_total", &|s| {
                ns(s) && s.labels.get("result") == Some("deny")
            });
            ratio(
                denied,
                increase(&everyone, "ratelimit_decisions_total", &ns),
            )
        }
        Query::QueueWait(task_type) => all
            .iter()
            .flat_map(|i| i.cur.1.samples.iter())
            .filter(|s| s.metric == "scheduler_task_queue_oldest_wait_seconds")
            .filter(|s| {
                task_type
                    .as_deref()
                    .is_none_or(|t| s.labels.get("type") == Some(t))
            })
            .filter_map(|s| scalar(&s.value))
            .reduce(f64::max),
        Query::BudgetBurn(namespace) => {
            let (spent, seconds) = increase(&everyone, "ratelimit_budget_spent_total", &|s| {
                namespace
                    .as_deref()
                    .is_none_or(|n| s.labels.get("namespace") == Some(n))
            })?;
            (seconds > 0.0).then(|| spent / seconds)
        }
        Query::Rate(name, filter) => {
            let (total, seconds) = increase(&everyone, name, &|s| has_labels(s, filter))?;
            (seconds > 0.0).then(|| total / seconds)
        }
        Query::Metric(name, filter) => all
            .iter()
            .flat_map(|i| i.cur.1.samples.iter())
            .filter(|s| s.metric == *name && has_labels(s, filter))
            .filter_map(|s| scalar(&s.value))
            .reduce(|a, b| a + b),
    }
}

#[cfg(test)]
mod tests {
    use agentmesh_runtime::scrape;

    use super::*;
    use crate::alerts::rule::parse;

    fn at(ms: u64, text: &str) -> (u64, Arc<Scrape>) {
        (ms, Arc::new(scrape::parse(text).unwrap()))
    }

    fn rpc(ok: u32, unavailable: u32, fast: u32) -> String {
        format!(
            "# TYPE rpc_server_call_duration_seconds histogram
rpc_server_call_duration_seconds_bucket{{rpc_service=\"s\",rpc_method=\"Check\",rpc_response_status_code=\"OK\",le=\"0.001\"}} {fast}
rpc_server_call_duration_seconds_bucket{{rpc_service=\"s\",rpc_method=\"Check\",rpc_response_status_code=\"OK\",le=\"0.1\"}} {ok}
rpc_server_call_duration_seconds_bucket{{rpc_service=\"s\",rpc_method=\"Check\",rpc_response_status_code=\"OK\",le=\"+Inf\"}} {ok}
rpc_server_call_duration_seconds_sum{{rpc_service=\"s\",rpc_method=\"Check\",rpc_response_status_code=\"OK\"}} 1
rpc_server_call_duration_seconds_count{{rpc_service=\"s\",rpc_method=\"Check\",rpc_response_status_code=\"OK\"}} {ok}
rpc_server_call_duration_seconds_bucket{{rpc_service=\"s\",rpc_method=\"Check\",rpc_response_status_code=\"UNAVAILABLE\",le=\"0.001\"}} {unavailable}
rpc_server_call_duration_seconds_bucket{{rpc_service=\"s\",rpc_method=\"Check\",rpc_response_status_code=\"UNAVAILABLE\",le=\"0.1\"}} {unavailable}
rpc_server_call_duration_seconds_bucket{{rpc_service=\"s\",rpc_method=\"Check\",rpc_response_status_code=\"UNAVAILABLE\",le=\"+Inf\"}} {unavailable}
rpc_server_call_duration_seconds_sum{{rpc_service=\"s\",rpc_method=\"Check\",rpc_response_status_code=\"UNAVAILABLE\"}} 1
rpc_server_call_duration_seconds_count{{rpc_service=\"s\",rpc_method=\"Check\",rpc_response_status_code=\"UNAVAILABLE\"}} {unavailable}
# TYPE cache_reads_total counter
cache_reads_total{{namespace=\"a\",result=\"l1\"}} {ok}
cache_reads_total{{namespace=\"a\",result=\"miss\"}} {unavailable}
"
        )
    }

    fn instance(prev: &str, cur: &str) -> InstanceScrapes {
        InstanceScrapes {
            service: "ratelimit".into(),
            prev: Some(at(0, prev)),
            cur: at(10_000, cur),
        }
    }

    #[test]
    fn test_error_rate_and_latency_come_from_the_increase_of_the_histograms() {
        let all = [instance(&rpc(100, 0, 100), &rpc(190, 10, 100))];
        let error = measure(
            &parse(r#"error_rate("ratelimit") > 0"#).unwrap().query,
            &all,
        )
        .unwrap();
        assert!((error - 0.1).abs() < 1e-9, "{error}");
        // Of the 100 new calls, 10 took ≤ 1 ms (errors), 90 between 1 and 100 ms.
        let p50 = measure(
            &parse(r#"latency_p50("ratelimit", "Check") > 0"#)
                .unwrap()
                .query,
            &all,
        )
        .unwrap();
        assert!(p50 > 0.001 && p50 < 0.1, "{p50}");
        let hit = measure(&parse("cache_hit_rate() > 0").unwrap().query, &all).unwrap();
        assert!((hit - 0.9).abs() < 1e-9, "{hit}");
        let rate = measure(
            &parse(r#"rate("cache_reads_total") > 0"#).unwrap().query,
            &all,
        )
        .unwrap();
        assert!((rate - 10.0).abs() < 1e-9, "{rate}");
    }

    #[test]
    fn test_no_traffic_or_a_first_scrape_measures_nothing() {
        let idle = [instance(&rpc(5, 0, 5), &rpc(5, 0, 5))];
        assert_eq!(
            measure(
                &parse(r#"error_rate("ratelimit") > 0"#).unwrap().query,
                &idle
            ),
            None
        );
        let first = [InstanceScrapes {
            service: "ratelimit".into(),
            prev: None,
            cur: at(0, &rpc(5, 0, 5)),
        }];
        assert_eq!(
            measure(
                &parse(r#"error_rate("ratelimit") > 0"#).unwrap().query,
                &first
            ),
            None
        );
        let gauge = measure(
            &parse(r#"metric("cache_reads_total", "result=l1") > 0"#)
                .unwrap()
                .query,
            &first,
        );
        assert_eq!(gauge, Some(5.0));
    }
}
