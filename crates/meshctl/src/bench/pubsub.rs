//! End-to-end publish → deliver load, shared by `bench eventbus` and its anchors (`bench nats`,
//! `bench redis-streams`) so every figure comes from the same loop and the same clock.
//!
//! Each event's data starts with the time it was handed to the transport (nanoseconds since one
//! `Instant` taken at start, 8 bytes little-endian) and its priority (one byte); the subscriber,
//! in the same process, records receive time minus that stamp. Only events stamped inside the
//! measured window count, wherever they are received, so a slow subscriber shows up as latency
//! and as events not delivered, never as a shorter run.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use agentmesh_runtime::config::parse_duration;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Pacer, micros};
use crate::Output;

/// Bytes of the stamp at the head of every event: send time (8) and priority (1).
pub(super) const STAMP_LEN: usize = 9;
/// Priorities, lowest first; the index is the wire value minus one.
pub(super) const PRIORITIES: [&str; 4] = ["low", "normal", "high", "critical"];
/// Index of NORMAL in [`PRIORITIES`].
pub(super) const NORMAL: usize = 1;
/// Longest wait for the events still on their way once the measured window ends.
const MAX_DRAIN: Duration = Duration::from_secs(30);
/// The drain also ends when nothing arrived for this long (the rest was shed or dropped).
const DRAIN_IDLE: Duration = Duration::from_secs(1);

/// Load settings common to every publish → deliver bench.
#[derive(clap::Args, Clone)]
pub(crate) struct PubSubArgs {
    /// Bytes of each event's data (the first 9 carry the send time and the priority).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(9..=1_048_576))]
    size: u64,
    /// Measured time.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Unmeasured time before it.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub(super) warmup: Duration,
    /// Events per second in total, paced evenly over the publishers; 0 = as fast as the
    /// publish window allows (saturation). Latency counts from the actual hand-over to the
    /// transport, so a stalled publisher shows as a lower achieved rate, not as latency.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Publishers, each with its own connection.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=256))]
    publishers: u64,
    /// Publishes in flight per publisher (pipelined; not used by core NATS, which never
    /// answers a publish).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    window: u32,
    /// Output format of the summary.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub(super) output: Output,
}

impl PubSubArgs {
    pub(super) fn window(&self) -> u32 {
        self.window
    }

    pub(super) fn publishers(&self) -> usize {
        usize::try_from(self.publishers).unwrap_or(1)
    }
}

/// What publishers send: sizes, subjects and the priority of each event.
pub(super) struct Plan {
    size: usize,
    /// Subject index → subject.
    pub(super) subjects: Arc<[String]>,
    /// Priority of the n-th event is `wheel[n % wheel.len()]` (indices into [`PRIORITIES`]).
    wheel: Vec<usize>,
}

impl Plan {
    /// Every event NORMAL, or `mix` weights (low, normal, high, critical) spread evenly.
    pub(super) fn new(args: &PubSubArgs, subjects: Vec<String>, mix: Option<[u32; 4]>) -> Self {
        Self {
            size: usize::try_from(args.size).unwrap_or(STAMP_LEN),
            subjects: subjects.into(),
            wheel: mix.map_or_else(|| vec![NORMAL], wheel),
        }
    }
}

/// A smooth weighted round robin over the priorities: each appears `weight` times per turn,
/// interleaved rather than in runs.
fn wheel(weights: [u32; 4]) -> Vec<usize> {
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = [0i64; 4];
    let mut out = Vec::new();
    for _ in 0..total {
        for (c, &w) in current.iter_mut().zip(&weights) {
            *c += i64::from(w);
        }
        let (best, _) = current
            .iter()
            .enumerate()
            .max_by_key(|&(i, &c)| (c, i))
            .unwrap_or((NORMAL, &0));
        current[best] -= total;
        out.push(best);
    }
    if out.is_empty() { vec![NORMAL] } else { out }
}

/// Parses `low=1,normal=1,high=1,critical=1` (missing priorities weigh 0).
pub(super) fn parse_mix(text: &str) -> Result<[u32; 4], String> {
    let mut weights = [0u32; 4];
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, weight) = part
            .split_once('=')
            .ok_or_else(|| format!("expected priority=weight, got {part:?}"))?;
        let i = PRIORITIES
            .iter()
            .position(|p| p.eq_ignore_ascii_case(name.trim()))
            .ok_or_else(|| format!("unknown priority {name:?}: low, normal, high or critical"))?;
        weights[i] = weight
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|w| *w <= 1000)
            .ok_or_else(|| format!("weight of {name} must be 0–1000, got {weight:?}"))?;
    }
    if weights.iter().all(|&w| w == 0) {
        return Err("give at least one priority a weight above 0".to_owned());
    }
    Ok(weights)
}

/// State shared by publishers, subscribers and the driver.
pub(super) struct Shared {
    base: Instant,
    /// The measured window, in ns since `base`; `u64::MAX` until set.
    start_ns: AtomicU64,
    end_ns: AtomicU64,
    stopping: AtomicBool,
    published: [AtomicU64; 4],
    sent_total: AtomicU64,
    delivered_total: AtomicU64,
    delivered_in_window: AtomicU64,
    shed: [AtomicU64; 4],
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Shared {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            start_ns: AtomicU64::new(u64::MAX),
            end_ns: AtomicU64::new(u64::MAX),
            stopping: AtomicBool::new(false),
            published: Default::default(),
            sent_total: AtomicU64::new(0),
            delivered_total: AtomicU64::new(0),
            delivered_in_window: AtomicU64::new(0),
            shed: Default::default(),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
        })
    }

    /// Nanoseconds since the run's base instant (monotonic).
    pub(super) fn now_ns(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn in_window(&self, stamp_ns: u64) -> bool {
        stamp_ns >= self.start_ns.load(Ordering::Relaxed)
            && stamp_ns < self.end_ns.load(Ordering::Relaxed)
    }

    /// Counts a failed publish (or a broken subscription); the first message is kept.
    pub(super) fn error(&self, message: impl std::fmt::Display) {
        if self.errors.fetch_add(1, Ordering::Relaxed) == 0 {
            self.first_error
                .lock()
                .get_or_insert_with(|| message.to_string());
        }
    }

    /// Counts events the transport reports dropped (eventbus shed advisories) while the
    /// measured window is open (advisories carry no stamp, so this goes by receive time).
    pub(super) fn shed(&self, priority: usize, count: u64) {
        let now = self.now_ns();
        if self.in_window(now) {
            self.shed[priority.min(3)].fetch_add(count, Ordering::Relaxed);
        }
    }

    /// A recorder for one subscriber.
    pub(super) fn recorder(self: &Arc<Self>) -> Recorder {
        let hist = || Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
        Recorder {
            shared: self.clone(),
            latency: [hist(), hist(), hist(), hist()],
        }
    }

    /// An event's data: the stamp (send time now), then filler up to `size`.
    fn stamp(&self, size: usize, priority: usize) -> (u64, Vec<u8>) {
        let mut data = vec![0x2a; size.max(STAMP_LEN)];
        let now = self.now_ns();
        data[..8].copy_from_slice(&now.to_le_bytes());
        data[8] = u8::try_from(priority).unwrap_or(1);
        (now, data)
    }
}

/// One subscriber's latencies (µs) by priority.
pub(super) struct Recorder {
    shared: Arc<Shared>,
    latency: [Histogram<u64>; 4],
}

impl Recorder {
    /// Receive time, to pass to [`Recorder::record`] for everything that arrived together.
    pub(super) fn now_ns(&self) -> u64 {
        self.shared.now_ns()
    }

    /// Records one received event's data (anything not carrying a stamp is ignored).
    pub(super) fn record(&mut self, data: &[u8], received_ns: u64) {
        let Some(stamp) = data.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
            return;
        };
        let stamp = u64::from_le_bytes(stamp);
        let priority = usize::from(data.get(8).copied().unwrap_or(1)).min(3);
        self.shared.delivered_total.fetch_add(1, Ordering::Relaxed);
        if !self.shared.in_window(stamp) {
            return;
        }
        self.shared
            .delivered_in_window
            .fetch_add(1, Ordering::Relaxed);
        let us = received_ns.saturating_sub(stamp) / 1000;
        self.latency[priority].saturating_record(us.max(1));
    }

    pub(super) fn shared(&self) -> &Shared {
        &self.shared
    }
}

/// Where a publisher sends.
pub(super) trait Sink: Send + 'static {
    /// Waits for room in the publish window; `false` when the sink is broken.
    fn ready(&mut self) -> impl Future<Output = bool> + Send;
    /// Hands one event over (room was reserved by `ready`).
    fn send(
        &mut self,
        subject: usize,
        priority: usize,
        data: Vec<u8>,
    ) -> impl Future<Output = ()> + Send;
    /// Waits until every event handed over is answered.
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// Publishes until stopped: as fast as the window allows, or one event per permit of `pacer`
/// (released evenly by [`Pacer`], so a paced load does not come in millisecond bursts).
async fn publish_loop<S: Sink>(
    shared: Arc<Shared>,
    plan: Arc<Plan>,
    mut sink: S,
    (index, publishers): (usize, usize),
    pacer: Option<Arc<Semaphore>>,
) {
    let mut n = 0u64;
    while !shared.stopping.load(Ordering::Relaxed) {
        if let Some(pacer) = &pacer {
            match pacer.acquire().await {
                Ok(permit) => permit.forget(),
                Err(_) => break,
            }
        }
        if !sink.ready().await {
            break;
        }
        let global = usize::try_from(n)
            .unwrap_or(usize::MAX)
            .wrapping_mul(publishers)
            .wrapping_add(index);
        let priority = plan.wheel[global % plan.wheel.len()];
        let (stamp, data) = shared.stamp(plan.size, priority);
        if shared.in_window(stamp) {
            shared.published[priority].fetch_add(1, Ordering::Relaxed);
        }
        shared.sent_total.fetch_add(1, Ordering::Relaxed);
        sink.send(global % plan.subjects.len(), priority, data)
            .await;
        n += 1;
    }
    sink.close().await;
}

/// Runs the publishers over `sinks` against subscribers already receiving: warm-up, the
/// measured window with a progress bar, then a drain; `cancel` then stops the subscribers.
pub(super) async fn drive<S: Sink>(
    args: &PubSubArgs,
    plan: Plan,
    shared: Arc<Shared>,
    sinks: Vec<S>,
    subscribers: Vec<JoinHandle<Recorder>>,
    cancel: CancellationToken,
) -> Report {
    let plan = Arc::new(plan);
    let publishers = sinks.len();
    let pacer = (args.rate > 0.0).then(|| {
        let shared = shared.clone();
        Pacer::spawn(args.rate, move || shared.stopping.load(Ordering::Relaxed))
    });
    let workers: Vec<_> = sinks
        .into_iter()
        .enumerate()
        .map(|(i, sink)| {
            tokio::spawn(publish_loop(
                shared.clone(),
                plan.clone(),
                sink,
                (i, publishers),
                pacer.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(args.warmup).await;
    let start = Instant::now();
    shared.start_ns.store(shared.now_ns(), Ordering::Relaxed);
    progress(&shared, args.duration, start).await;
    shared.end_ns.store(shared.now_ns(), Ordering::Relaxed);
    let elapsed = start.elapsed();
    shared.stopping.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    drain(&shared).await;
    cancel.cancel();
    let hist = || Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    let mut latency = [hist(), hist(), hist(), hist()];
    for s in subscribers {
        if let Ok(recorder) = s.await {
            for (all, one) in latency.iter_mut().zip(&recorder.latency) {
                all.add(one).expect("same bounds");
            }
        }
    }
    let load = |a: &[AtomicU64; 4]| a.each_ref().map(|c| c.load(Ordering::Relaxed));
    Report {
        elapsed,
        published: load(&shared.published),
        shed: load(&shared.shed),
        errors: shared.errors.load(Ordering::Relaxed),
        first_error: shared.first_error.lock().clone(),
        latency,
    }
}

async fn progress(shared: &Shared, duration: Duration, start: Instant) {
    let bar = ProgressBar::new(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX));
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:40}] {elapsed}/{duration} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let counts = || {
        (
            Instant::now(),
            shared.sent_total.load(Ordering::Relaxed),
            shared.delivered_total.load(Ordering::Relaxed),
        )
    };
    let mut last = counts();
    while start.elapsed() < duration {
        tokio::time::sleep(
            Duration::from_millis(200).min(duration.saturating_sub(start.elapsed())),
        )
        .await;
        let now = counts();
        let secs = now.0.duration_since(last.0).as_secs_f64().max(1e-9);
        #[allow(clippy::cast_precision_loss)]
        bar.set_message(format!(
            "{:.0} sent/s  {:.0} delivered/s",
            (now.1 - last.1) as f64 / secs,
            (now.2 - last.2) as f64 / secs
        ));
        bar.set_position(u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX));
        last = now;
    }
    bar.finish_and_clear();
}

/// Waits for the events published in the window to arrive, until none is missing, nothing
/// arrives for [`DRAIN_IDLE`], or [`MAX_DRAIN`].
async fn drain(shared: &Shared) {
    let expected: u64 = shared
        .published
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum();
    let begin = Instant::now();
    let (mut seen, mut since) = (0, Instant::now());
    while begin.elapsed() < MAX_DRAIN && since.elapsed() < DRAIN_IDLE {
        let got = shared.delivered_in_window.load(Ordering::Relaxed);
        if got >= expected {
            return;
        }
        if got != seen {
            (seen, since) = (got, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What a publish → deliver run measured.
pub(super) struct Report {
    elapsed: Duration,
    published: [u64; 4],
    shed: [u64; 4],
    errors: u64,
    first_error: Option<String>,
    /// Publish → deliver latency (µs) by priority.
    latency: [Histogram<u64>; 4],
}

impl Report {
    fn all(&self) -> Histogram<u64> {
        let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
        for h in &self.latency {
            all.add(h).expect("same bounds");
        }
        all
    }

    /// Prints the summary; `setup` describes the transport side (subscribers, ack policy…),
    /// `by_priority` adds a line per priority.
    #[allow(clippy::cast_precision_loss)]
    pub(super) fn print(&self, label: &str, setup: &str, args: &PubSubArgs, by_priority: bool) {
        let secs = self.elapsed.as_secs_f64().max(f64::EPSILON);
        let all = self.all();
        let published: u64 = self.published.iter().sum();
        let delivered = all.len();
        let shed: u64 = self.shed.iter().sum();
        let rate = if args.rate > 0.0 {
            format!("{:.0}/s", args.rate)
        } else {
            "max".to_owned()
        };
        let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p);
        if args.output == Output::Json {
            let priorities: Vec<_> = (0..4)
                .rev()
                .filter(|&p| by_priority && self.published[p] + self.latency[p].len() > 0)
                .map(|p| {
                    let h = &self.latency[p];
                    serde_json::json!({
                        "priority": PRIORITIES[p],
                        "published": self.published[p],
                        "delivered": h.len(),
                        "delivered_share": if delivered == 0 { 0.0 } else { h.len() as f64 / delivered as f64 },
                        "shed": self.shed[p],
                        "p50_us": q(h, 0.5), "p90_us": q(h, 0.9), "p99_us": q(h, 0.99),
                        "p999_us": q(h, 0.999), "max_us": h.max(),
                    })
                })
                .collect();
            println!(
                "{}",
                serde_json::json!({
                    "bench": label,
                    "setup": setup,
                    "publishers": args.publishers,
                    "window": args.window,
                    "size": args.size,
                    "rate": args.rate,
                    "duration_s": secs,
                    "published": published,
                    "published_per_sec": (published as f64 / secs).round(),
                    "delivered": delivered,
                    "delivered_per_sec": (delivered as f64 / secs).round(),
                    "not_delivered": published.saturating_sub(delivered),
                    "shed": shed,
                    "errors": self.errors,
                    "first_error": self.first_error,
                    "p50_us": q(&all, 0.5),
                    "p90_us": q(&all, 0.9),
                    "p99_us": q(&all, 0.99),
                    "p999_us": q(&all, 0.999),
                    "max_us": all.max(),
                    "priorities": priorities,
                })
            );
            return;
        }
        println!(
            "{label}: {} publisher(s) × window {}, {setup}, {} B events, rate {rate}, {secs:.1}s measured",
            args.publishers, args.window, args.size
        );
        println!(
            "  published   {published:>12}  {:>12.0}/s",
            published as f64 / secs
        );
        let mut line = format!(
            "  delivered   {delivered:>12}  {:>12.0}/s",
            delivered as f64 / secs
        );
        if published > delivered {
            let _ = write!(line, "  not delivered {}", published - delivered);
        }
        if shed > 0 {
            let _ = write!(line, "  (shed {shed})");
        }
        println!("{line}");
        println!(
            "  errors      {:>12}{}",
            self.errors,
            self.first_error
                .as_ref()
                .map(|e| format!("  (first: {e})"))
                .unwrap_or_default()
        );
        println!("  latency     {}", percentiles(&all));
        if !by_priority {
            return;
        }
        for p in (0..4).rev() {
            let h = &self.latency[p];
            if self.published[p] + h.len() == 0 {
                continue;
            }
            let share = if delivered == 0 {
                0.0
            } else {
                100.0 * h.len() as f64 / delivered as f64
            };
            println!(
                "  {:<10}  published {:>9}  delivered {:>9} ({share:>5.1}%)  shed {:>7}  {}",
                PRIORITIES[p],
                self.published[p],
                h.len(),
                self.shed[p],
                percentiles(h)
            );
        }
    }
}

fn percentiles(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "no deliveries".to_owned();
    }
    format!(
        "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        micros(h.value_at_quantile(0.5)),
        micros(h.value_at_quantile(0.9)),
        micros(h.value_at_quantile(0.99)),
        micros(h.value_at_quantile(0.999)),
        micros(h.max())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_priority_wheel_interleaves_by_weight() {
        let w = wheel([1, 1, 1, 1]);
        assert_eq!(w.len(), 4);
        let mut sorted = w;
        sorted.sort_unstable();
        assert_eq!(sorted, [0, 1, 2, 3]);
        let w = wheel([1, 0, 0, 3]);
        assert_eq!(w.iter().filter(|&&p| p == 3).count(), 3);
        assert_eq!(w.iter().filter(|&&p| p == 0).count(), 1);
        assert_eq!(wheel([0, 0, 0, 0]), [NORMAL]);
    }

    #[test]
    fn test_mix_parses_weights_and_rejects_unknown_priorities() {
        assert_eq!(parse_mix("low=1,critical=3"), Ok([1, 0, 0, 3]));
        assert_eq!(parse_mix("LOW=2, normal=1"), Ok([2, 1, 0, 0]));
        assert!(parse_mix("urgent=1").is_err());
        assert!(parse_mix("low=0").is_err());
        assert!(parse_mix("low").is_err());
    }

    #[test]
    fn test_recorder_counts_only_events_stamped_in_the_window() {
        let shared = Shared::new();
        let mut recorder = shared.recorder();
        let (_, early) = shared.stamp(16, 3);
        shared.start_ns.store(shared.now_ns(), Ordering::Relaxed);
        let (_, inside) = shared.stamp(16, 3);
        recorder.record(&early, shared.now_ns());
        recorder.record(&inside, shared.now_ns());
        recorder.record(b"short", shared.now_ns());
        assert_eq!(recorder.latency[3].len(), 1);
        assert_eq!(shared.delivered_total.load(Ordering::Relaxed), 2);
    }
}
