//! `meshctl bench cache`: the cache coordinator under load — L1-hit Gets, L2-hit (FRESH)
//! Gets, Sets, SemanticGets with caller vectors over a preloaded index, SemanticGets that the
//! service embeds — and a stampede (`--mode stampede`: many concurrent GetOrLease misses of
//! one key, spread over every address, counting computations). `bench redis-get` is the L2
//! anchor: raw GETs from this process at the same concurrency.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agentmesh_proto::cache::v1 as pb;
use anyhow::Context;
use rand::Rng;

use super::{LoadArgs, connect, run_load};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Mode {
    /// Get of keys every instance holds in L1.
    L1,
    /// Get with FRESH consistency: every read goes to L2 (Redis).
    L2,
    /// Set.
    Set,
    /// SemanticGet with a caller-supplied 384-dimension vector, near one of `--entries`
    /// stored vectors (loaded first).
    Semantic,
    /// SemanticGet of `--entries` distinct prompts the service embeds itself.
    Embed,
    /// `--callers` concurrent GetOrLease misses of one key spread over the addresses: one
    /// computation expected, every caller gets the value.
    Stampede,
}

#[derive(clap::Args)]
pub(crate) struct CacheBench {
    #[command(flatten)]
    load: LoadArgs,
    /// What to load.
    #[arg(long, value_enum, default_value_t = Mode::L1)]
    mode: Mode,
    /// Distinct keys (l1, l2, set), or semantic entries loaded before the load (semantic).
    #[arg(long, default_value_t = 1000)]
    entries: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Namespace used.
    #[arg(long, default_value = "bench")]
    namespace: String,
    /// Callers of the stampede.
    #[arg(long, default_value_t = 1000)]
    callers: usize,
    /// Do not load the keys or semantic entries first (a previous run did).
    #[arg(long)]
    no_load: bool,
}

#[derive(clap::Args)]
pub(crate) struct RedisGetBench {
    #[command(flatten)]
    load: LoadArgs,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 1000)]
    entries: usize,
}

type Client = pb::cache_coordinator_client::CacheCoordinatorClient<crate::Chan>;

const DIM: usize = 384;

/// The unit vector of entry `i`, plus `noise`: 1,000 random centres (seeded, so every run and
/// every process agrees), each entry around one (cosine about 0.5 to its centre), as embeddings
/// cluster by topic.
fn vector(i: usize, noise: f32, rng: &mut impl Rng) -> Vec<f32> {
    use rand::SeedableRng;
    let mut centre = rand::rngs::StdRng::seed_from_u64((i % 1000) as u64);
    let mut own = rand::rngs::StdRng::seed_from_u64(1_000_000 + i as u64);
    let mut v: Vec<f32> = (0..DIM)
        .map(|_| {
            centre.random::<f32>() - 0.5
                + (own.random::<f32>() - 0.5)
                + noise * (rng.random::<f32>() - 0.5)
        })
        .collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
    v
}

pub(crate) async fn run(args: CacheBench) -> anyhow::Result<ExitCode> {
    let addr = args
        .load
        .addr
        .clone()
        .unwrap_or_else(|| "127.0.0.1:7103".to_owned());
    let channels = connect(&addr, args.load.connections).await?;
    let ns = args.namespace.clone();
    let value = vec![b'v'; args.value_size];
    let mut first = Client::new(channels[0].clone()).max_decoding_message_size(8 << 20);
    match args.mode {
        Mode::Stampede => return stampede(&addr, &args).await,
        _ if args.no_load => {}
        Mode::L1 | Mode::L2 => {
            for chunk in (0..args.entries).collect::<Vec<_>>().chunks(500) {
                first
                    .set_many(pb::SetManyRequest {
                        items: chunk
                            .iter()
                            .map(|i| pb::SetRequest {
                                namespace: ns.clone(),
                                key: format!("k{i}"),
                                value: value.clone(),
                                ..pb::SetRequest::default()
                            })
                            .collect(),
                    })
                    .await
                    .context("loading the keys")?;
            }
        }
        Mode::Semantic => {
            let bar = indicatif::ProgressBar::new(args.entries as u64);
            let mut rng = rand::rng();
            let mut loaded = 0;
            while loaded < args.entries {
                let batch: Vec<_> = (loaded..(loaded + 256).min(args.entries))
                    .map(|i| (i, vector(i, 0.0, &mut rng)))
                    .collect();
                let puts = batch.into_iter().map(|(i, v)| {
                    let mut c = first.clone();
                    let ns = ns.clone();
                    async move {
                        c.semantic_put(pb::SemanticPutRequest {
                            namespace: ns,
                            prompt: format!("bench prompt number {i}"),
                            embedding: v,
                            answer: b"answer".to_vec(),
                            ..pb::SemanticPutRequest::default()
                        })
                        .await
                    }
                });
                for r in futures::future::join_all(puts).await {
                    r.context("loading semantic entries")?;
                }
                loaded = (loaded + 256).min(args.entries);
                bar.set_position(loaded as u64);
            }
            bar.finish_and_clear();
            // Let every instance's index catch up with the feed.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Mode::Set | Mode::Embed => {}
    }
    let mode = args.mode;
    let entries = args.entries.max(1);
    let summary = run_load(&args.load, 1, move |worker, seq| {
        let mut client = Client::new(channels[worker % channels.len()].clone())
            .max_decoding_message_size(8 << 20);
        let ns = ns.clone();
        let value = value.clone();
        async move {
            let i = usize::try_from(seq).unwrap_or(0) % entries;
            match mode {
                Mode::L1 | Mode::L2 => client
                    .get(pb::GetRequest {
                        namespace: ns,
                        key: format!("k{i}"),
                        consistency: if mode == Mode::L2 {
                            pb::Consistency::Fresh
                        } else {
                            pb::Consistency::Default
                        } as i32,
                        allow_stale: false,
                    })
                    .await
                    .map(|r| !r.get_ref().found),
                Mode::Set => client
                    .set(pb::SetRequest {
                        namespace: ns,
                        key: format!("k{i}"),
                        value,
                        ..pb::SetRequest::default()
                    })
                    .await
                    .map(|_| false),
                Mode::Semantic => {
                    let v = vector(i, 0.02, &mut rand::rng());
                    client
                        .semantic_get(pb::SemanticGetRequest {
                            namespace: ns,
                            prompt: format!("bench prompt number {i}, reworded"),
                            embedding: v,
                            ..pb::SemanticGetRequest::default()
                        })
                        .await
                        .map(|_| false)
                }
                Mode::Embed => client
                    .semantic_get(pb::SemanticGetRequest {
                        namespace: ns,
                        prompt: format!(
                            "What is the best way to learn topic number {seq} quickly?"
                        ),
                        ..pb::SemanticGetRequest::default()
                    })
                    .await
                    .map(|_| false),
                Mode::Stampede => unreachable!("run separately"),
            }
            .map_err(|s| s.code())
        }
    })
    .await;
    let label = match args.mode {
        Mode::L1 => "cache Get (L1 hits)",
        Mode::L2 => "cache Get FRESH (L2 hits, Redis)",
        Mode::Set => "cache Set",
        Mode::Semantic => "cache SemanticGet (caller vectors)",
        Mode::Embed => "cache SemanticGet (embedded by the service)",
        Mode::Stampede => unreachable!(),
    };
    summary.print(label, &args.load, 1);
    Ok(ExitCode::SUCCESS)
}

/// `--callers` GetOrLease misses of one fresh key at once, spread over every address; the
/// lease holder "computes" for 200 ms and fills.
async fn stampede(addr: &str, args: &CacheBench) -> anyhow::Result<ExitCode> {
    let mut clients = Vec::new();
    for a in addr.split(',') {
        for ch in connect(a, args.load.connections.max(1)).await? {
            clients.push(Client::new(ch));
        }
    }
    let key = format!("stampede-{}", rand::rng().random::<u64>());
    let computed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let calls = (0..args.callers).map(|i| {
        let mut c = clients[i % clients.len()].clone();
        let (ns, key, computed) = (args.namespace.clone(), key.clone(), computed.clone());
        async move {
            let r = c
                .get_or_lease(pb::GetOrLeaseRequest {
                    namespace: ns.clone(),
                    key: key.clone(),
                    lease_ttl: Some(prost_types::Duration {
                        seconds: 10,
                        nanos: 0,
                    }),
                    wait: Some(prost_types::Duration {
                        seconds: 10,
                        nanos: 0,
                    }),
                })
                .await?
                .into_inner();
            if r.outcome == pb::get_or_lease_response::Outcome::Lease as i32 {
                computed.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                c.fill_lease(pb::FillLeaseRequest {
                    namespace: ns,
                    key,
                    token: r.lease.map(|l| l.token).unwrap_or_default(),
                    value: b"the computed value".to_vec(),
                    ..pb::FillLeaseRequest::default()
                })
                .await?;
                return Ok::<_, tonic::Status>((true, started.elapsed()));
            }
            let got = r.value.is_some_and(|v| v.value == b"the computed value");
            Ok((got, started.elapsed()))
        }
    });
    let results = futures::future::join_all(calls).await;
    let mut served = 0;
    let mut last = Duration::ZERO;
    for r in results {
        let (ok, at) = r.context("a GetOrLease failed")?;
        served += usize::from(ok);
        last = last.max(at);
    }
    let n = computed.load(Ordering::SeqCst);
    if args.load.output == crate::Output::Json {
        println!(
            "{}",
            serde_json::json!({ "callers": args.callers, "computations": n,
                "callers_served": served, "all_served_ms": last.as_millis() })
        );
    } else {
        println!(
            "stampede: {} callers over {} instance(s) → {n} computation(s); {served} got the \
             value, the last {} ms after the start (the computation takes 200 ms)",
            args.callers,
            addr.split(',').count(),
            last.as_millis()
        );
    }
    Ok(if n == 1 && served == args.callers {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The L2 anchor: GET of `--entries` keys holding `--value-size` bytes, straight from this
/// process over one multiplexed connection (the cache's own L2 path has the same shape).
pub(crate) async fn redis_get(args: RedisGetBench, redis: &str) -> anyhow::Result<ExitCode> {
    let client = redis::Client::open(redis).context("--redis")?;
    let conn = redis::aio::ConnectionManager::new(client)
        .await
        .with_context(|| format!("cannot reach Redis at {redis}"))?;
    let value = vec![b'v'; args.value_size];
    let mut c = conn.clone();
    for i in 0..args.entries {
        let () = redis::cmd("SET")
            .arg(format!("bench:get:{i}"))
            .arg(&value)
            .query_async(&mut c)
            .await?;
    }
    let entries = args.entries.max(1);
    let summary = run_load(&args.load, 1, move |_worker, seq| {
        let mut c = conn.clone();
        async move {
            let i = usize::try_from(seq).unwrap_or(0) % entries;
            redis::cmd("GET")
                .arg(format!("bench:get:{i}"))
                .query_async::<Option<Vec<u8>>>(&mut c)
                .await
                .map(|v| v.is_none())
                .map_err(|_| tonic::Code::Unavailable)
        }
    })
    .await;
    summary.print("raw Redis GET (anchor)", &args.load, 1);
    Ok(ExitCode::SUCCESS)
}
