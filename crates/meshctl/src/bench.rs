//! `meshctl bench …`: closed-loop load with a progress bar, then throughput and
//! p50/p90/p99/max. `bench echo-server` + `bench echo` are the anchor: a bare tonic server with
//! no agentmesh layers, driven by the same loop, so both figures come from one run.
//! `bench eventbus` measures publish → deliver instead (see [`pubsub`]), with core NATS and
//! Redis Streams as its anchors.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::Chan as Channel;
use agentmesh_proto::bench::v1 as echo_pb;
use agentmesh_proto::ratelimit::v1 as pb;
use agentmesh_runtime::config::parse_duration;
use anyhow::Context;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::Output;
use crate::ratelimit::proto_duration;

mod anchors;
mod cache;
mod eventbus;
mod health;
mod pubsub;
mod scheduler;
mod scrape;
mod tasks;

#[derive(clap::Subcommand)]
pub(crate) enum BenchCommand {
    /// Load the rate limiter with Check (or StreamCheck) calls.
    Ratelimit(RatelimitBench),
    /// Load a bare echo server (the anchor) with the same loop.
    Echo(EchoBench),
    /// The earlier platform's design, as the baseline: every decision is one token-bucket Lua
    /// script in Redis (TIME, HMGET, refill, HSET, PEXPIRE) called by the client itself over one
    /// multiplexed connection. Redis: `--redis` (default redis://127.0.0.1:6379).
    RedisScript(RedisScriptBench),
    /// End-to-end event bus load: publishers on PublishStream, subscribers on Subscribe;
    /// throughput and publish → deliver latency (optionally per priority).
    Eventbus(eventbus::EventbusBench),
    /// Reactive rules: stimulus → rule → response delivered, beside the event bus's own
    /// publish → deliver in the same run (the rules are stored, then deleted).
    Rules(eventbus::RulesBench),
    /// Anchor for `bench eventbus`: core NATS pub/sub through async-nats, same loop and clock.
    Nats(anchors::NatsBench),
    /// Anchor for `bench eventbus`: Redis Streams, XADD by the publisher, XREADGROUP + XACK by
    /// one consumer, same loop and clock. Redis: `--redis` (default redis://127.0.0.1:6379).
    RedisStreams(anchors::RedisStreamsBench),
    /// Scheduler load: AcquireAgent + ReleaseAgent pairs over `--agents` heartbeating agents
    /// this process registers (compare with `bench echo` at the same concurrency).
    Scheduler(scheduler::SchedulerBench),
    /// Tasks submitted, assigned and completed end to end through SDK agents this process runs
    /// (each in-flight slot submits a task and watches it to the end).
    Tasks(tasks::TasksBench),
    /// Cache coordinator load: L1 or L2 Gets, Sets, SemanticGets (caller vectors or embedded
    /// by the service), or a stampede of GetOrLease misses.
    Cache(cache::CacheBench),
    /// Anchor for `bench cache --mode l2`: raw Redis GETs from this process. Redis: `--redis`
    /// (default redis://127.0.0.1:6379).
    RedisGet(cache::RedisGetBench),
    /// Serve grpc.health.v1 on many ports, registered in etcd, for the health aggregator to
    /// watch; optionally report the aggregator's CPU once it sees them all.
    HealthTargets(health::TargetsBench),
    /// WatchClusterHealth to many clients: change → every stream latency.
    HealthWatch(health::WatchBench),
    /// kill -9 of an instance → the aggregator's DOWN, repeated.
    HealthDetect(health::DetectBench),
    /// Serve the bare tonic echo anchor (no agentmesh layers) until interrupted.
    EchoServer {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:7199")]
        listen: SocketAddr,
    },
}

#[derive(clap::Args, Clone)]
pub(crate) struct LoadArgs {
    /// Server address; several comma-separated addresses spread the load over them.
    #[arg(long)]
    addr: Option<String>,
    /// Calls in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections the calls are spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Measured time.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Unmeasured time before it.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// Calls per second in total, released every 100 µs by a pacer thread to whichever
    /// in-flight slot is free; 0 = as fast as possible (closed loop). Latency is measured from
    /// the actual send; calls due while every slot is busy are sent late (the achieved rate in
    /// the summary shows it).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Output format of the summary.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(clap::Args)]
pub(crate) struct RatelimitBench {
    #[command(flatten)]
    load: LoadArgs,
    /// Items per Check call.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Distinct keys the items cycle through.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Use StreamCheck: one stream per in-flight slot instead of unary calls.
    #[arg(long)]
    stream: bool,
    /// Where the checks are decided.
    #[arg(long, value_enum, default_value_t = ConsistencyArg::Local)]
    consistency: ConsistencyArg,
    /// The instances' metrics URLs (their admin listeners, comma-separated, e.g.
    /// `http://127.0.0.1:9104/metrics`): scraped when the measured window opens and after the
    /// run to report, beside the client's figures, how long the checks took inside the
    /// instances called, by path (`ratelimit_check_duration_seconds`).
    #[arg(long, value_delimiter = ',')]
    metrics_url: Vec<String>,
}

/// `ratelimit_check_duration_seconds` of `urls`, added up.
async fn scrape_check_paths(urls: &[String]) -> anyhow::Result<scrape::Buckets> {
    let mut sum = scrape::Buckets::default();
    for url in urls {
        let text = scrape::fetch(url).await?;
        sum = sum.plus(&scrape::parse(
            &text,
            "ratelimit_check_duration_seconds",
            "path",
        ));
    }
    Ok(sum)
}

/// Prints (or, with `-o json`, emits as a second object) the check latency per path as the
/// instances measured it over the run.
fn print_check_paths(paths: &scrape::Buckets, output: Output) {
    paths.print_quantiles(
        &["local", "forwarded", "strict", "degraded"],
        output == Output::Json,
        &scrape::Report {
            name: "at_the_instances",
            key: "path",
            heading: "checks at the instances called",
            unit: " checks",
        },
    );
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum ConsistencyArg {
    Local,
    Owner,
    Strict,
}

impl From<ConsistencyArg> for pb::Consistency {
    fn from(c: ConsistencyArg) -> Self {
        match c {
            ConsistencyArg::Local => pb::Consistency::Local,
            ConsistencyArg::Owner => pb::Consistency::Owner,
            ConsistencyArg::Strict => pb::Consistency::Strict,
        }
    }
}

#[derive(clap::Args)]
pub(crate) struct RedisScriptBench {
    #[command(flatten)]
    load: LoadArgs,
    /// Distinct keys the decisions cycle through.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
}

#[derive(clap::Args)]
pub(crate) struct EchoBench {
    #[command(flatten)]
    load: LoadArgs,
    /// Payload bytes per call.
    #[arg(long, default_value_t = 100)]
    payload: usize,
}

/// Redis when the global `--redis` is not given.
const DEFAULT_REDIS: &str = "redis://127.0.0.1:6379";

/// Runs a bench; `redis` is the global `--redis` (the Redis benches' server).
pub(crate) async fn run(cmd: BenchCommand, redis: Option<&str>) -> anyhow::Result<ExitCode> {
    let redis = redis.unwrap_or(DEFAULT_REDIS).to_owned();
    match cmd {
        BenchCommand::EchoServer { listen } => echo_server(listen).await,
        BenchCommand::HealthTargets(args) => health::targets(args).await,
        BenchCommand::HealthWatch(args) => health::watch(args).await,
        BenchCommand::HealthDetect(args) => health::detect(args).await,
        BenchCommand::Echo(args) => {
            let addr = args
                .load
                .addr
                .clone()
                .unwrap_or_else(|| "127.0.0.1:7199".to_owned());
            let channels = connect(&addr, args.load.connections).await?;
            let payload = vec![7u8; args.payload];
            let summary = run_load(&args.load, 1, move |worker, _seq| {
                let mut client = echo_pb::echo_client::EchoClient::new(
                    channels[worker % channels.len()].clone(),
                );
                let payload = payload.clone();
                async move {
                    client
                        .echo(echo_pb::EchoRequest { payload })
                        .await
                        .map(|_| false)
                        .map_err(|s| s.code())
                }
            })
            .await;
            summary.print("echo (anchor)", &args.load, 1);
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Ratelimit(args) => {
            let addr = args
                .load
                .addr
                .clone()
                .unwrap_or_else(|| "127.0.0.1:7104".to_owned());
            let channels = connect(&addr, args.load.connections).await?;
            let consistency = pb::Consistency::from(args.consistency) as i32;
            let batch = args.batch.clamp(1, 1000);
            let keys = args.keys.max(1);
            // Which instance each channel reaches, so checks decided elsewhere (forwarded to
            // their owner) are told apart: a LOCAL check is decided by the instance called.
            let mut called = Vec::with_capacity(channels.len());
            for channel in &channels {
                called.push(instance_of(channel.clone()).await?);
            }
            let called: Arc<[String]> = called.into();
            let label = if args.stream {
                "ratelimit StreamCheck"
            } else {
                "ratelimit Check"
            };
            // Scraped as the measured window opens (the load warms up for as long first).
            let before = (!args.metrics_url.is_empty()).then(|| {
                let (urls, warmup) = (args.metrics_url.clone(), args.load.warmup);
                tokio::spawn(async move {
                    tokio::time::sleep(warmup).await;
                    scrape_check_paths(&urls).await
                })
            });
            let summary = if args.stream {
                let streams = open_streams(&channels, args.load.concurrency).await?;
                run_load(&args.load, batch as u64, move |worker, seq| {
                    let stream = streams[worker].clone();
                    let called = called.clone();
                    async move {
                        let response = stream
                            .call(seq, check_request(worker, seq, batch, keys, consistency))
                            .await?;
                        Ok(forwarded(&response, &called[worker % called.len()]))
                    }
                })
                .await
            } else {
                run_load(&args.load, batch as u64, move |worker, seq| {
                    let mut client = pb::rate_limiter_client::RateLimiterClient::new(
                        channels[worker % channels.len()].clone(),
                    );
                    let request = check_request(worker, seq, batch, keys, consistency);
                    let called = called.clone();
                    async move {
                        client
                            .check(request)
                            .await
                            .map(|r| forwarded(r.get_ref(), &called[worker % called.len()]))
                            .map_err(|s| s.code())
                    }
                })
                .await
            };
            summary.print(label, &args.load, batch);
            if let Some(before) = before {
                let before = before.await.context("metrics scrape task failed")??;
                let after = scrape_check_paths(&args.metrics_url).await?;
                print_check_paths(&after.since(&before), args.load.output);
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::RedisScript(args) => redis_script(args, &redis).await,
        BenchCommand::Eventbus(args) => eventbus::run(args).await,
        BenchCommand::Rules(args) => eventbus::rules(args).await,
        BenchCommand::Scheduler(args) => scheduler::run(args).await,
        BenchCommand::Tasks(args) => tasks::run(args).await,
        BenchCommand::Cache(args) => cache::run(args).await,
        BenchCommand::RedisGet(args) => cache::redis_get(args, &redis).await,
        BenchCommand::Nats(args) => anchors::nats(args).await,
        BenchCommand::RedisStreams(args) => anchors::redis_streams(args, &redis).await,
    }
}

/// The earlier platform's token bucket: one script per decision, on Redis's clock.
const TOKEN_BUCKET_LUA: &str = r"
local capacity = tonumber(ARGV[1])
local refill_per_ms = tonumber(ARGV[2]) / 1000
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or capacity
local ts = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + (now - ts) * refill_per_ms)
local allowed = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / refill_per_ms))
return {allowed, math.floor(tokens)}
";

async fn redis_script(args: RedisScriptBench, redis: &str) -> anyhow::Result<ExitCode> {
    let client =
        redis::Client::open(redis).with_context(|| format!("invalid Redis URL {redis}"))?;
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("cannot connect to {redis}"))?;
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(TOKEN_BUCKET_LUA)
        .query_async(&mut connection)
        .await?;
    let keys = args.keys.max(1);
    let summary = run_load(&args.load, 1, move |worker, seq| {
        let mut connection = connection.clone();
        let key = format!("bench:tb:k{}", (seq + worker as u64 * 7919) % keys);
        let sha = sha.clone();
        async move {
            redis::cmd("EVALSHA")
                .arg(&sha)
                .arg(1)
                .arg(key)
                .arg(1_000_000_000u64)
                .arg(1_000_000_000u64)
                .arg(1)
                .query_async::<Vec<i64>>(&mut connection)
                .await
                .map(|_| false)
                .map_err(|_| tonic::Code::Unavailable)
        }
    })
    .await;
    summary.print(
        "redis token-bucket script per decision (baseline)",
        &args.load,
        1,
    );
    Ok(ExitCode::SUCCESS)
}

/// A Check of `batch` items over `keys` keys under a limit high enough to always allow, so
/// the figure measures the decision path, not denials.
fn check_request(
    worker: usize,
    seq: u64,
    batch: usize,
    keys: u64,
    consistency: i32,
) -> pb::CheckRequest {
    let items = (0..batch as u64)
        .map(|i| pb::CheckItem {
            namespace: "bench".to_owned(),
            key: format!(
                "k{}",
                (seq.wrapping_mul(batch as u64) + i + worker as u64 * 7919) % keys
            ),
            cost: 1,
            limit_ref: Some(pb::check_item::LimitRef::Limit(pb::LimitSpec {
                limit: 1_000_000_000,
                period: Some(proto_duration(Duration::from_secs(1))),
                burst: 0,
                algorithm: pb::Algorithm::Gcra as i32,
            })),
            mode: 0,
            consistency,
            on_failure: pb::FailurePolicy::FailClosed as i32,
        })
        .collect();
    pb::CheckRequest {
        items,
        all_or_nothing: false,
    }
}

/// The instance id behind `channel`: the decider of a LOCAL check.
async fn instance_of(channel: Channel) -> anyhow::Result<String> {
    let mut request = check_request(0, 0, 1, 1, pb::Consistency::Local as i32);
    request.items[0].key = "bench:whoami".to_owned();
    let response = pb::rate_limiter_client::RateLimiterClient::new(channel)
        .check(request)
        .await
        .context("probe Check failed")?
        .into_inner();
    response
        .results
        .first()
        .map(|r| r.decided_by.clone())
        .context("probe Check answered no result")
}

/// True when any item of `response` was decided by another instance than `called`.
fn forwarded(response: &pb::CheckResponse, called: &str) -> bool {
    response.results.iter().any(|r| r.decided_by != called)
}

/// `connections` channels to each of the comma-separated addresses in `addr`.
async fn connect(addr: &str, connections: usize) -> anyhow::Result<Vec<Channel>> {
    let config = agentmesh_runtime::ClientConfig::default();
    let mut channels = Vec::new();
    for addr in addr.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        channels.extend(connect_one(addr, connections, &config).await?);
    }
    Ok(channels)
}

async fn connect_one(
    addr: &str,
    connections: usize,
    config: &agentmesh_runtime::ClientConfig,
) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::new();
    for _ in 0..connections.max(1) {
        let endpoint = agentmesh_runtime::client::endpoint(addr, config)?;
        channels.push(crate::with_token(
            endpoint
                .connect()
                .await
                .with_context(|| format!("cannot connect to {addr}"))?,
        ));
    }
    Ok(channels)
}

/// One StreamCheck stream used ping-pong: send a request, wait for its answer.
#[derive(Clone)]
struct CheckStream {
    inner: Arc<
        tokio::sync::Mutex<(
            mpsc::Sender<pb::StreamCheckRequest>,
            tonic::Streaming<pb::StreamCheckResponse>,
        )>,
    >,
}

impl CheckStream {
    async fn call(
        &self,
        id: u64,
        request: pb::CheckRequest,
    ) -> Result<pb::CheckResponse, tonic::Code> {
        let mut guard = self.inner.lock().await;
        let (tx, rx) = &mut *guard;
        tx.send(pb::StreamCheckRequest {
            id,
            request: Some(request),
        })
        .await
        .map_err(|_| tonic::Code::Unavailable)?;
        match rx.next().await {
            Some(Ok(pb::StreamCheckResponse {
                response: Some(response),
                error: None,
                ..
            })) => Ok(response),
            Some(Ok(_)) => Err(tonic::Code::InvalidArgument),
            Some(Err(status)) => Err(status.code()),
            None => Err(tonic::Code::Unavailable),
        }
    }
}

async fn open_streams(channels: &[Channel], count: usize) -> anyhow::Result<Vec<CheckStream>> {
    let mut streams = Vec::new();
    for i in 0..count.max(1) {
        let (tx, rx) = mpsc::channel(16);
        let mut client =
            pb::rate_limiter_client::RateLimiterClient::new(channels[i % channels.len()].clone());
        let responses = client
            .stream_check(ReceiverStream::new(rx))
            .await
            .context("cannot open StreamCheck")?
            .into_inner();
        streams.push(CheckStream {
            inner: Arc::new(tokio::sync::Mutex::new((tx, responses))),
        });
    }
    Ok(streams)
}

/// What a load run measured.
struct Summary {
    calls: u64,
    errors: u64,
    first_error: Option<tonic::Code>,
    elapsed: Duration,
    latency: Histogram<u64>,
    /// The calls decided by another instance than the one called (rate limiter benches).
    forwarded: Histogram<u64>,
}

impl Summary {
    fn print(&self, label: &str, load: &LoadArgs, items_per_call: usize) {
        let secs = self.elapsed.as_secs_f64().max(f64::EPSILON);
        #[allow(clippy::cast_precision_loss)]
        let calls_per_sec = self.calls as f64 / secs;
        #[allow(clippy::cast_precision_loss)]
        let items_per_sec = calls_per_sec * items_per_call as f64;
        let q = |p: f64| self.latency.value_at_quantile(p);
        let fq = |p: f64| self.forwarded.value_at_quantile(p);
        match load.output {
            Output::Json => println!(
                "{}",
                serde_json::json!({
                    "forwarded_calls": self.forwarded.len(),
                    "forwarded_p50_us": fq(0.5),
                    "forwarded_p99_us": fq(0.99),
                    "forwarded_p999_us": fq(0.999),
                    "bench": label,
                    "concurrency": load.concurrency,
                    "connections": load.connections,
                    "duration_s": secs,
                    "items_per_call": items_per_call,
                    "calls": self.calls,
                    "errors": self.errors,
                    "calls_per_sec": calls_per_sec.round(),
                    "items_per_sec": items_per_sec.round(),
                    "p50_us": q(0.5),
                    "p90_us": q(0.9),
                    "p99_us": q(0.99),
                    "p999_us": q(0.999),
                    "max_us": self.latency.max(),
                })
            ),
            Output::Table => {
                println!(
                    "{label}: {} in flight over {} connection(s), {:.1}s measured",
                    load.concurrency, load.connections, secs
                );
                println!(
                    "  calls       {:>12}  {:>12.0}/s",
                    self.calls, calls_per_sec
                );
                if items_per_call > 1 {
                    println!(
                        "  items       {:>12}  {:>12.0}/s",
                        self.calls * items_per_call as u64,
                        items_per_sec
                    );
                }
                println!(
                    "  errors      {:>12}{}",
                    self.errors,
                    self.first_error
                        .map(|c| format!("  (first: {c:?})"))
                        .unwrap_or_default()
                );
                println!(
                    "  latency     p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
                    micros(q(0.5)),
                    micros(q(0.9)),
                    micros(q(0.99)),
                    micros(q(0.999)),
                    micros(self.latency.max())
                );
                if !self.forwarded.is_empty() {
                    println!(
                        "  forwarded   {} calls  p50 {}  p99 {}  p99.9 {}  max {}",
                        self.forwarded.len(),
                        micros(fq(0.5)),
                        micros(fq(0.99)),
                        micros(fq(0.999)),
                        micros(self.forwarded.max())
                    );
                }
            }
        }
    }
}

fn micros(us: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    if us >= 10_000 {
        format!("{:.1}ms", us as f64 / 1000.0)
    } else {
        format!("{us}µs")
    }
}

/// Runs `concurrency` closed loops of `call(worker, seq)` for warm-up + duration, recording
/// latencies (µs) of calls that start in the measured window. A call answering `Ok(true)` was
/// forwarded (decided by another instance): its latency is also recorded on its own.
async fn run_load<F, Fut>(load: &LoadArgs, items_per_call: u64, call: F) -> Summary
where
    F: Fn(usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<bool, tonic::Code>> + Send + 'static,
{
    let measuring = Arc::new(AtomicBool::new(false));
    let stopping = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    let slots = load.concurrency.max(1);
    let pacer = (load.rate > 0.0).then(|| {
        let stopping = stopping.clone();
        Pacer::spawn(load.rate, move || stopping.load(Ordering::Relaxed))
    });
    for worker in 0..slots {
        let call = call.clone();
        let (measuring, stopping, done) = (measuring.clone(), stopping.clone(), done.clone());
        let pacer = pacer.clone();
        workers.push(tokio::spawn(async move {
            let mut hist =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            let mut forwarded = hist.clone();
            let (mut errors, mut first_error) = (0u64, None);
            let mut seq = 0u64;
            while !stopping.load(Ordering::Relaxed) {
                // Open loop: wait for the pacer's next call, if paced.
                if let Some(pacer) = &pacer {
                    match pacer.acquire().await {
                        Ok(permit) => permit.forget(),
                        Err(_) => break,
                    }
                }
                let start = Instant::now();
                let measured = measuring.load(Ordering::Relaxed);
                let result = call(worker, seq).await;
                seq += 1;
                if measured && !stopping.load(Ordering::Relaxed) {
                    let us = u64::try_from(start.elapsed().as_micros())
                        .unwrap_or(u64::MAX)
                        .max(1);
                    hist.saturating_record(us);
                    done.fetch_add(1, Ordering::Relaxed);
                    match result {
                        Ok(true) => forwarded.saturating_record(us),
                        Ok(false) => {}
                        Err(code) => {
                            errors += 1;
                            first_error.get_or_insert(code);
                        }
                    }
                }
            }
            (hist, forwarded, errors, first_error)
        }));
    }
    tokio::time::sleep(load.warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    let bar = ProgressBar::new(u64::try_from(load.duration.as_millis()).unwrap_or(u64::MAX));
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:40}] {elapsed}/{duration} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut last = (Instant::now(), 0u64);
    while start.elapsed() < load.duration {
        tokio::time::sleep(
            Duration::from_millis(200).min(load.duration.saturating_sub(start.elapsed())),
        )
        .await;
        let now = (Instant::now(), done.load(Ordering::Relaxed));
        #[allow(clippy::cast_precision_loss)]
        let rate = (now.1 - last.1) as f64 / now.0.duration_since(last.0).as_secs_f64().max(1e-9);
        #[allow(clippy::cast_precision_loss)]
        bar.set_message(format!(
            "{:.0} calls/s  {:.0} items/s",
            rate,
            rate * items_per_call as f64
        ));
        bar.set_position(u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX));
        last = now;
    }
    stopping.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    let mut forwarded = latency.clone();
    let (mut errors, mut first_error) = (0, None);
    for w in workers {
        if let Ok((hist, fwd, e, first)) = w.await {
            latency.add(&hist).expect("same bounds");
            forwarded.add(&fwd).expect("same bounds");
            errors += e;
            first_error = first_error.or(first);
        }
    }
    Summary {
        calls: latency.len(),
        errors,
        first_error,
        elapsed,
        latency,
        forwarded,
    }
}

/// Releases calls at `rate` per second from a thread of its own, every [`Pacer::TICK`], to
/// whichever slot is free: tokio's timer ticks in milliseconds, so slots sleeping until their
/// own send times woke together once per millisecond and sent their calls as one burst (at
/// 25k/s, 25 calls at once, the last of them queueing behind the others on every hop).
/// The event bench's publishers are paced the same way.
pub(crate) struct Pacer;

impl Pacer {
    const TICK: Duration = Duration::from_micros(100);

    /// Starts releasing permits at `rate` per second until `stopped` says so (the semaphore
    /// is then closed).
    pub(crate) fn spawn(rate: f64, stopped: impl Fn() -> bool + Send + 'static) -> Arc<Semaphore> {
        let permits = Arc::new(Semaphore::new(0));
        let released = permits.clone();
        let pace = move || {
            let start = Instant::now();
            let mut sent = 0u64;
            while !stopped() {
                std::thread::sleep(Self::TICK);
                #[allow(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "a count of calls due, non-negative and far below u64::MAX"
                )]
                let due = (start.elapsed().as_secs_f64() * rate) as u64;
                // Calls due while every slot is busy wait for a free slot (sent late).
                if due > sent {
                    released.add_permits(usize::try_from(due - sent).unwrap_or(usize::MAX));
                    sent = due;
                }
            }
            released.close();
        };
        if let Err(e) = std::thread::Builder::new()
            .name("pacer".to_owned())
            .spawn(pace)
        {
            tracing::warn!(error = %e, "could not start the pacer; no calls are sent");
            permits.close();
        }
        permits
    }
}

/// The bare echo anchor.
#[derive(Default)]
struct EchoService;

#[tonic::async_trait]
impl echo_pb::echo_server::Echo for EchoService {
    async fn echo(
        &self,
        request: tonic::Request<echo_pb::EchoRequest>,
    ) -> Result<tonic::Response<echo_pb::EchoResponse>, tonic::Status> {
        Ok(tonic::Response::new(echo_pb::EchoResponse {
            payload: request.into_inner().payload,
        }))
    }
}

async fn echo_server(listen: SocketAddr) -> anyhow::Result<ExitCode> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!("echo anchor listening on {}", listener.local_addr()?);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(echo_pb::echo_server::EchoServer::new(EchoService))
        .serve_with_incoming_shutdown(
            incoming,
            agentmesh_runtime::shutdown::on_signal().cancelled_owned(),
        )
        .await?;
    Ok(ExitCode::SUCCESS)
}
