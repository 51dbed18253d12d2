//! `meshctl cache get|set|delete`: the cache coordinator by hand.

use std::process::ExitCode;
use std::time::Duration;

use agentmesh_proto::cache::v1 as pb;
use agentmesh_runtime::config::parse_duration;
use anyhow::Context;
use clap::Subcommand;
use pb::cache_coordinator_client::CacheCoordinatorClient;
use tonic::transport::Channel;

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
    async fn client(&self) -> anyhow::Result<CacheCoordinatorClient<Channel>> {
        let config = agentmesh_runtime::ClientConfig {
            timeout: Duration::from_secs(10),
            ..agentmesh_runtime::ClientConfig::default()
        };
        let channel = agentmesh_runtime::client::endpoint(&self.addr, &config)?
            .connect()
            .await
            .with_context(|| format!("cannot connect to the cache at {}", self.addr))?;
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
}

pub(crate) async fn run(cmd: CacheCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CacheCommand::Get(args) => get(args).await,
        CacheCommand::Set(args) => set(args).await,
        CacheCommand::Delete(args) => delete(args).await,
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
            })
        );
    } else if r.found {
        match text {
            Some(t) => println!("{t}"),
            None => println!("({} bytes, not UTF-8)", r.value.len()),
        }
        eprintln!(
            "version {}  from {}  age {} ms  expires in {} ms",
            r.version,
            tier(r.tier),
            ms(r.age),
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
