//! `meshctl cache get|set|delete|invalidate|stats|warm`: the cache coordinator by hand.

use std::process::ExitCode;
use std::time::Duration;

use crate::Chan;
use agentmesh_proto::cache::v1 as pb;
use agentmesh_runtime::config::parse_duration;
use anyhow::Context;
use clap::Subcommand;
use pb::cache_coordinator_client::CacheCoordinatorClient;

use crate::Output;
use crate::events::status_error;

const DEFAULT_ADDR: &str = "http://127.0.0.1:7103";

#[derive(Subcommand)]
pub(crate) enum CacheCommand {
    /// Read a key: prints the value (text, or its size when binary), its version and tier.
    Get(GetArgs),
    /// Write a key; prints the version written.
    Set(SetArgs),
    /// Remove a key.
    Delete(KeyArgs),
    /// Invalidate every entry of a namespace carrying any of the tags, or the whole namespace.
    Invalidate(InvalidateArgs),
    /// Counters per namespace and the state of the instance's L1 and change feed.
    Stats(StatsArgs),
    /// Semantic lookup of a prompt: the answer (EXACT, NORMALIZED or SEMANTIC with its
    /// similarity), and the similar prompts the guard refused.
    SemanticGet(SemanticGetArgs),
    /// Store an answer for a prompt in the semantic cache.
    SemanticPut(SemanticPutArgs),
    /// Bulk load from a file of JSON lines: {"namespace","key","value", optional "ttl" ("10m"),
    /// "tags" [..], "stale_for"}; `-` reads standard input.
    Warm(WarmArgs),
}

#[derive(clap::Args)]
pub(crate) struct PartitionArgs {
    /// The model the answer came from (part of the key).
    #[arg(long, default_value = "")]
    model: String,
    /// The model's parameters (part of the key).
    #[arg(long, default_value = "")]
    parameters: String,
    /// A hash of the system prompt (part of the key).
    #[arg(long, default_value = "")]
    system_prompt_hash: String,
}

impl PartitionArgs {
    fn proto(&self) -> pb::Partition {
        pb::Partition {
            model: self.model.clone(),
            parameters: self.parameters.clone(),
            system_prompt_hash: self.system_prompt_hash.clone(),
        }
    }
}

#[derive(clap::Args)]
pub(crate) struct SemanticGetArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    partition: PartitionArgs,
    /// Namespace.
    namespace: String,
    /// The prompt.
    prompt: String,
    /// A higher similarity threshold for this lookup.
    #[arg(long)]
    threshold: Option<f32>,
}

#[derive(clap::Args)]
pub(crate) struct SemanticPutArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    partition: PartitionArgs,
    /// Namespace.
    namespace: String,
    /// The prompt.
    prompt: String,
    /// The answer (UTF-8 text).
    answer: String,
    /// How long it lives (default: the service's).
    #[arg(long, value_parser = parse_duration)]
    ttl: Option<Duration>,
}

#[derive(clap::Args)]
pub(crate) struct InvalidateArgs {
    #[command(flatten)]
    common: Common,
    /// Namespace.
    namespace: String,
    /// Tags to invalidate (repeat or comma-separate); without tags, the whole namespace.
    #[arg(long, value_delimiter = ',')]
    tags: Vec<String>,
}

#[derive(clap::Args)]
pub(crate) struct StatsArgs {
    #[command(flatten)]
    common: Common,
    /// Only this namespace.
    namespace: Option<String>,
}

#[derive(clap::Args)]
pub(crate) struct WarmArgs {
    #[command(flatten)]
    common: Common,
    /// The file of JSON lines (`-`: standard input).
    file: String,
}

#[derive(clap::Args)]
pub(crate) struct Common {
    /// Cache coordinator address.
    #[arg(long, env = "AGENTMESH_CACHE_ADDR", default_value = DEFAULT_ADDR, global = true)]
    addr: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
}

impl Common {
    async fn client(&self) -> anyhow::Result<CacheCoordinatorClient<Chan>> {
        let channel = crate::connect(&self.addr, Duration::from_secs(10), "the cache").await?;
        Ok(CacheCoordinatorClient::new(channel).max_decoding_message_size(8 << 20))
    }
}

#[derive(clap::Args)]
pub(crate) struct KeyArgs {
    #[command(flatten)]
    common: Common,
    /// Namespace (e.g. a tenant or an agent type).
    namespace: String,
    /// Key.
    key: String,
}

#[derive(clap::Args)]
pub(crate) struct GetArgs {
    #[command(flatten)]
    key: KeyArgs,
    /// Skip L1: read from L2.
    #[arg(long)]
    fresh: bool,
    /// Also answer a value past its TTL inside its stale window.
    #[arg(long)]
    stale: bool,
}

#[derive(clap::Args)]
pub(crate) struct SetArgs {
    #[command(flatten)]
    key: KeyArgs,
    /// The value (as UTF-8 text).
    value: String,
    /// How long it lives (default: the service's, 1 h).
    #[arg(long, value_parser = parse_duration)]
    ttl: Option<Duration>,
    /// Only if the key is at this version (0: only if absent).
    #[arg(long)]
    if_version: Option<u64>,
    /// Tags (repeat or comma-separate), for `invalidate --tags`.
    #[arg(long, value_delimiter = ',')]
    tags: Vec<String>,
    /// Serve it stale this long after its TTL while one caller refreshes it.
    #[arg(long, value_parser = parse_duration)]
    stale_for: Option<Duration>,
}

pub(crate) async fn run(cmd: CacheCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CacheCommand::Get(args) => get(args).await,
        CacheCommand::Set(args) => set(args).await,
        CacheCommand::Delete(args) => delete(args).await,
        CacheCommand::Invalidate(args) => invalidate(args).await,
        CacheCommand::Stats(args) => stats(args).await,
        CacheCommand::Warm(args) => warm(args).await,
        CacheCommand::SemanticGet(args) => semantic_get(args).await,
        CacheCommand::SemanticPut(args) => semantic_put(args).await,
    }
}

fn tier(t: i32) -> &'static str {
    match pb::Tier::try_from(t) {
        Ok(pb::Tier::L1) => "l1",
        Ok(pb::Tier::L2) => "l2",
        _ => "-",
    }
}

async fn get(args: GetArgs) -> anyhow::Result<ExitCode> {
    let k = &args.key;
    let r = k
        .common
        .client()
        .await?
        .get(pb::GetRequest {
            namespace: k.namespace.clone(),
            key: k.key.clone(),
            consistency: if args.fresh {
                pb::Consistency::Fresh
            } else {
                pb::Consistency::Default
            } as i32,
            allow_stale: args.stale,
        })
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    let text = String::from_utf8(r.value.clone()).ok();
    let ms = |d: Option<prost_types::Duration>| {
        d.and_then(|d| agentmesh_runtime::wire::duration_from_proto(&d))
            .map_or(0, |d| d.as_millis())
    };
    if k.common.output == Output::Json {
        println!(
            "{}",
            serde_json::json!({
                "found": r.found, "value": text, "bytes": r.value.len(), "version": r.version,
                "tier": tier(r.tier), "age_ms": ms(r.age), "ttl_left_ms": ms(r.ttl_left),
                "stale": r.stale, "negative": r.negative, "tags": r.tags,
            })
        );
    } else if r.found {
        match text {
            Some(t) => println!("{t}"),
            None => println!("({} bytes, not UTF-8)", r.value.len()),
        }
        eprintln!(
            "version {}  from {}  age {} ms  expires in {} ms{}",
            r.version,
            tier(r.tier),
            ms(r.age),
            ms(r.ttl_left),
            if r.stale { "  (stale)" } else { "" }
        );
    } else if r.negative {
        eprintln!(
            "not found (a remembered miss, for {} ms more)",
            ms(r.ttl_left)
        );
    } else {
        eprintln!("not found");
    }
    Ok(if r.found {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn set(args: SetArgs) -> anyhow::Result<ExitCode> {
    let k = &args.key;
    let r = k
        .common
        .client()
        .await?
        .set(pb::SetRequest {
            namespace: k.namespace.clone(),
            key: k.key.clone(),
            value: args.value.clone().into_bytes(),
            ttl: args.ttl.map(agentmesh_runtime::wire::duration_to_proto),
            if_version: args.if_version,
            tags: args.tags.clone(),
            stale_for: args
                .stale_for
                .map(agentmesh_runtime::wire::duration_to_proto),
        })
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    if k.common.output == Output::Json {
        println!("{}", serde_json::json!({ "version": r.version }));
    } else {
        println!("version {}", r.version);
    }
    Ok(ExitCode::SUCCESS)
}

async fn delete(args: KeyArgs) -> anyhow::Result<ExitCode> {
    let r = args
        .common
        .client()
        .await?
        .delete(pb::DeleteRequest {
            namespace: args.namespace.clone(),
            key: args.key.clone(),
        })
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    if args.common.output == Output::Json {
        println!("{}", serde_json::json!({ "existed": r.existed }));
    } else {
        println!("{}", if r.existed { "deleted" } else { "not found" });
    }
    Ok(ExitCode::SUCCESS)
}

async fn invalidate(args: InvalidateArgs) -> anyhow::Result<ExitCode> {
    let mut client = args.common.client().await?;
    let r = if args.tags.is_empty() {
        client
            .invalidate_namespace(pb::InvalidateNamespaceRequest {
                namespace: args.namespace.clone(),
            })
            .await
    } else {
        client
            .invalidate_tags(pb::InvalidateTagsRequest {
                namespace: args.namespace.clone(),
                tags: args.tags.clone(),
            })
            .await
    }
    .map_err(|s| status_error(&s))?
    .into_inner();
    if args.common.output == Output::Json {
        println!("{}", serde_json::json!({ "seq": r.seq }));
    } else if args.tags.is_empty() {
        println!(
            "namespace {} invalidated (change {})",
            args.namespace, r.seq
        );
    } else {
        println!(
            "tags {} of {} invalidated (change {})",
            args.tags.join(","),
            args.namespace,
            r.seq
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn stats(args: StatsArgs) -> anyhow::Result<ExitCode> {
    let r = args
        .common
        .client()
        .await?
        .stats(pb::StatsRequest {
            namespace: args.namespace.clone().unwrap_or_default(),
        })
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    if args.common.output == Output::Json {
        let namespaces: Vec<_> = r
            .namespaces
            .iter()
            .map(|n| {
                serde_json::json!({
                    "namespace": n.namespace, "l1_hits": n.l1_hits, "l2_hits": n.l2_hits,
                    "misses": n.misses, "stale_hits": n.stale_hits,
                    "negative_hits": n.negative_hits, "hit_rate": n.hit_rate,
                    "writes": n.writes, "writes_refused": n.writes_refused,
                    "leases_granted": n.leases_granted, "leases_coalesced": n.leases_coalesced,
                    "guard_refusals": n.guard_refusals,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "namespaces": namespaces, "l1_entries": r.l1_entries, "l1_bytes": r.l1_bytes,
                "l1_evictions": r.l1_evictions, "l1_max_bytes": r.l1_max_bytes,
                "l1_max_entries": r.l1_max_entries, "feed_synced": r.feed_synced,
                "feed_synced_count": r.feed_synced_count, "feed_lost_count": r.feed_lost_count,
                "feed_gap_count": r.feed_gap_count, "last_seq": r.last_seq,
                "l2_shared": r.l2_shared,
            })
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:>8} {:>8} {:>8} {:>7} {:>8} {:>8} {:>8} {:>9} {:>7}",
        "NAMESPACE",
        "L1 HITS",
        "L2 HITS",
        "MISSES",
        "STALE",
        "HIT RATE",
        "WRITES",
        "LEASES",
        "COALESCED",
        "GUARD"
    );
    for n in &r.namespaces {
        println!(
            "{:<24} {:>8} {:>8} {:>8} {:>7} {:>7.1}% {:>8} {:>8} {:>9} {:>7}",
            n.namespace,
            n.l1_hits,
            n.l2_hits,
            n.misses,
            n.stale_hits,
            n.hit_rate * 100.0,
            n.writes,
            n.leases_granted,
            n.leases_coalesced,
            n.guard_refusals
        );
    }
    println!(
        "L1: {} entries, {} of {} bytes, {} evicted; feed {} (synced {}×, lost {}×, gaps {}), \
         last change {}; L2 {}",
        r.l1_entries,
        r.l1_bytes,
        r.l1_max_bytes,
        r.l1_evictions,
        if r.feed_synced { "in sync" } else { "LOST" },
        r.feed_synced_count,
        r.feed_lost_count,
        r.feed_gap_count,
        r.last_seq,
        if r.l2_shared {
            "Redis (shared)"
        } else {
            "in memory (this instance only)"
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// One line of a warm file.
#[derive(serde::Deserialize)]
struct WarmLine {
    namespace: String,
    key: String,
    value: String,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    stale_for: Option<String>,
}

fn warm_request(n: usize, line: &str) -> anyhow::Result<pb::SetRequest> {
    let l: WarmLine =
        serde_json::from_str(line).with_context(|| format!("line {n}: not a warm entry"))?;
    let duration = |d: Option<String>| -> anyhow::Result<Option<prost_types::Duration>> {
        d.map(|d| {
            parse_duration(&d)
                .map(agentmesh_runtime::wire::duration_to_proto)
                .map_err(|e| anyhow::anyhow!("line {n}: {e}"))
        })
        .transpose()
    };
    Ok(pb::SetRequest {
        namespace: l.namespace,
        key: l.key,
        value: l.value.into_bytes(),
        ttl: duration(l.ttl)?,
        if_version: None,
        tags: l.tags,
        stale_for: duration(l.stale_for)?,
    })
}

async fn warm(args: WarmArgs) -> anyhow::Result<ExitCode> {
    let text = if args.file == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(&args.file).with_context(|| format!("reading {}", args.file))?
    };
    let requests = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| warm_request(i + 1, l))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let r = args
        .common
        .client()
        .await?
        .warm(futures::stream::iter(requests))
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    if args.common.output == Output::Json {
        println!(
            "{}",
            serde_json::json!({ "stored": r.stored, "refused": r.refused, "errors": r.errors })
        );
    } else {
        println!("{} stored, {} refused", r.stored, r.refused);
        for e in &r.errors {
            println!("  {e}");
        }
    }
    Ok(if r.refused == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn semantic_tier(t: i32) -> &'static str {
    match pb::SemanticTier::try_from(t) {
        Ok(pb::SemanticTier::Exact) => "EXACT",
        Ok(pb::SemanticTier::Normalized) => "NORMALIZED",
        Ok(pb::SemanticTier::Semantic) => "SEMANTIC",
        _ => "-",
    }
}

async fn semantic_get(args: SemanticGetArgs) -> anyhow::Result<ExitCode> {
    let r = args
        .common
        .client()
        .await?
        .semantic_get(pb::SemanticGetRequest {
            namespace: args.namespace.clone(),
            prompt: args.prompt.clone(),
            embedding: vec![],
            threshold: args.threshold,
            partition: Some(args.partition.proto()),
        })
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    if args.common.output == Output::Json {
        let refused: Vec<_> = r
            .refused
            .iter()
            .map(|g| serde_json::json!({"prompt": g.prompt, "similarity": g.similarity, "reason": g.reason}))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "found": r.found, "answer": String::from_utf8_lossy(&r.answer),
                "tier": semantic_tier(r.tier), "similarity": r.similarity,
                "matched_prompt": r.matched_prompt, "best_similarity": r.best_similarity,
                "refused": refused, "embedder": r.embedder,
            })
        );
    } else if r.found {
        println!("{}", String::from_utf8_lossy(&r.answer));
        eprintln!(
            "{} hit (similarity {:.3}) for {:?}  [embedder {}]",
            semantic_tier(r.tier),
            r.similarity,
            r.matched_prompt,
            r.embedder
        );
    } else {
        eprintln!(
            "miss (best similarity {:.3})  [embedder {}]",
            r.best_similarity, r.embedder
        );
    }
    if args.common.output != Output::Json {
        for g in &r.refused {
            eprintln!(
                "  refused {:?} (similarity {:.3}): {}",
                g.prompt, g.similarity, g.reason
            );
        }
    }
    Ok(if r.found {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn semantic_put(args: SemanticPutArgs) -> anyhow::Result<ExitCode> {
    let r = args
        .common
        .client()
        .await?
        .semantic_put(pb::SemanticPutRequest {
            namespace: args.namespace.clone(),
            prompt: args.prompt.clone(),
            embedding: vec![],
            partition: Some(args.partition.proto()),
            answer: args.answer.clone().into_bytes(),
            ttl: args.ttl.map(agentmesh_runtime::wire::duration_to_proto),
            tags: vec![],
        })
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    if args.common.output == Output::Json {
        println!(
            "{}",
            serde_json::json!({ "version": r.version, "embedder": r.embedder })
        );
    } else {
        println!("version {}  [embedder {}]", r.version, r.embedder);
    }
    Ok(ExitCode::SUCCESS)
}
