//! `meshctl agents …`: the agent pool — list, show, drain, pool stats, and acquire/release an
//! agent by hand.

use std::process::ExitCode;
use std::time::Duration;

use crate::Chan;
use agentmesh_proto::scheduler::v1 as pb;
use agentmesh_runtime::config::parse_duration;
use pb::scheduler_client::SchedulerClient;

use crate::Output;
use crate::events::{print_table, status_error};
use crate::ratelimit::proto_duration;

/// Where `meshctl` finds the scheduler unless told otherwise.
const DEFAULT_ADDR: &str = "http://127.0.0.1:7102";
/// Timeout of every call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(clap::Subcommand)]
pub(crate) enum AgentsCommand {
    /// List agents (filtered by type, tag and state), a page at a time.
    List(ListArgs),
    /// Show one agent.
    Show(ShowArgs),
    /// Drain an agent: no new work; it is removed at the deadline.
    Drain(DrainArgs),
    /// Counts by state and type, slots in use, reservations.
    Stats(Common),
    /// Acquire an agent (reserve a slot) as a caller would; prints the reservation.
    Acquire(AcquireArgs),
    /// Release a reservation, reporting how the call went.
    Release(ReleaseArgs),
}

#[derive(clap::Args)]
pub(crate) struct Common {
    /// Scheduler address.
    #[arg(long, env = "AGENTMESH_SCHEDULER_ADDR", default_value = DEFAULT_ADDR, global = true)]
    addr: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
    pub(crate) output: Output,
}

impl Common {
    pub(crate) async fn client(&self) -> anyhow::Result<SchedulerClient<Chan>> {
        let channel = crate::connect(&self.addr, CALL_TIMEOUT, "the scheduler").await?;
        Ok(SchedulerClient::new(channel))
    }
}

#[derive(clap::Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    common: Common,
    /// Only agents of this type.
    #[arg(long = "type")]
    agent_type: Option<String>,
    /// Only agents with this tag; repeat for more (all must match).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Only agents in this state.
    #[arg(long, value_enum)]
    state: Option<StateArg>,
    /// Page size (at most 1000).
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// Start after this agent id (the previous page's last).
    #[arg(long)]
    after: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum StateArg {
    Pending,
    Ready,
    Suspect,
    Draining,
    Dead,
}

impl From<StateArg> for pb::AgentState {
    fn from(s: StateArg) -> Self {
        match s {
            StateArg::Pending => Self::Pending,
            StateArg::Ready => Self::Ready,
            StateArg::Suspect => Self::Suspect,
            StateArg::Draining => Self::Draining,
            StateArg::Dead => Self::Dead,
        }
    }
}

#[derive(clap::Args)]
pub(crate) struct ShowArgs {
    #[command(flatten)]
    common: Common,
    /// The agent id.
    agent_id: String,
}

#[derive(clap::Args)]
pub(crate) struct DrainArgs {
    #[command(flatten)]
    common: Common,
    /// The agent id.
    agent_id: String,
    /// Time it gets to finish its work.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    deadline: Duration,
    /// Shown to the agent.
    #[arg(long, default_value = "operator")]
    reason: String,
    /// What happens to its unfinished tasks when it leaves.
    #[arg(long, value_enum, default_value_t = OnExpiryArg::Requeue)]
    on_expiry: OnExpiryArg,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum OnExpiryArg {
    /// Back to their queues, run by other agents (the lost attempt not counted).
    Requeue,
    /// Cancelled.
    Cancel,
}

#[derive(clap::Args)]
pub(crate) struct AcquireArgs {
    #[command(flatten)]
    common: Common,
    /// Only agents of this type.
    #[arg(long = "type")]
    agent_type: Option<String>,
    /// Only agents with this tag; repeat for more.
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// How to pick.
    #[arg(long, value_enum, default_value_t = StrategyArg::Adaptive)]
    strategy: StrategyArg,
    /// For consistent-hash: the key.
    #[arg(long)]
    affinity_key: Option<String>,
    /// How long the slot is held unless released.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    ttl: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum StrategyArg {
    RoundRobin,
    WeightedRoundRobin,
    LeastLoaded,
    PowerOfTwo,
    ConsistentHash,
    Adaptive,
}

impl From<StrategyArg> for pb::Strategy {
    fn from(s: StrategyArg) -> Self {
        match s {
            StrategyArg::RoundRobin => Self::RoundRobin,
            StrategyArg::WeightedRoundRobin => Self::WeightedRoundRobin,
            StrategyArg::LeastLoaded => Self::LeastLoaded,
            StrategyArg::PowerOfTwo => Self::PowerOfTwo,
            StrategyArg::ConsistentHash => Self::ConsistentHash,
            StrategyArg::Adaptive => Self::Adaptive,
        }
    }
}

#[derive(clap::Args)]
pub(crate) struct ReleaseArgs {
    #[command(flatten)]
    common: Common,
    /// The reservation id AcquireAgent returned.
    reservation_id: String,
    /// The call failed because of the agent.
    #[arg(long, conflicts_with = "cancelled")]
    failed: bool,
    /// The call was not made (counts for nothing).
    #[arg(long)]
    cancelled: bool,
    /// How long the call took.
    #[arg(long, value_parser = parse_duration)]
    latency: Option<Duration>,
}

pub(crate) async fn run(cmd: AgentsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AgentsCommand::List(args) => list(args).await,
        AgentsCommand::Show(args) => show(args).await,
        AgentsCommand::Drain(args) => drain(args).await,
        AgentsCommand::Stats(common) => stats(common).await,
        AgentsCommand::Acquire(args) => acquire(args).await,
        AgentsCommand::Release(args) => release(args).await,
    }
}

fn state_name(state: i32) -> String {
    pb::AgentState::try_from(state).map_or_else(
        |_| "?".to_owned(),
        |s| {
            s.as_str_name()
                .trim_start_matches("AGENT_STATE_")
                .to_lowercase()
        },
    )
}

pub(crate) fn millis(d: Option<&prost_types::Duration>) -> f64 {
    d.map_or(0.0, |d| {
        i32::try_from(d.seconds).map_or(0.0, f64::from) * 1000.0 + f64::from(d.nanos) / 1e6
    })
}

fn agent_json(a: &pb::Agent) -> serde_json::Value {
    serde_json::json!({
        "agent_id": a.agent_id, "epoch": a.epoch, "type": a.r#type,
        "capabilities": a.capabilities, "tags": a.tags, "capacity": a.capacity,
        "weight": a.weight, "zone": a.zone, "endpoint": a.endpoint, "version": a.version,
        "labels": a.labels, "state": state_name(a.state), "in_flight": a.in_flight,
        "free_slots": a.free_slots, "latency_ewma_ms": millis(a.latency_ewma.as_ref()),
        "phi": a.phi, "breaker": a.breaker,
    })
}

fn agent_row(a: &pb::Agent) -> Vec<String> {
    vec![
        a.agent_id.clone(),
        a.r#type.clone(),
        state_name(a.state),
        format!("{}/{}", a.in_flight, a.capacity),
        format!("{:.1}", millis(a.latency_ewma.as_ref())),
        format!("{:.2}", a.phi),
        a.breaker.clone(),
        a.endpoint.clone(),
    ]
}

const HEADER: [&str; 8] = [
    "AGENT",
    "TYPE",
    "STATE",
    "IN_FLIGHT",
    "LATENCY_MS",
    "PHI",
    "BREAKER",
    "ENDPOINT",
];

fn selector(agent_type: Option<&String>, tags: &[String]) -> pb::Selector {
    pb::Selector {
        r#type: agent_type.cloned().unwrap_or_default(),
        tags: tags.to_vec(),
        ..pb::Selector::default()
    }
}

async fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let response = args
        .common
        .client()
        .await?
        .list_agents(pb::ListAgentsRequest {
            selector: Some(selector(args.agent_type.as_ref(), &args.tags)),
            state: args.state.map_or(0, |s| pb::AgentState::from(s) as i32),
            limit: args.limit,
            page_token: args.after.unwrap_or_default(),
        })
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    match args.common.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "agents": response.agents.iter().map(agent_json).collect::<Vec<_>>(),
                "next_page_token": response.next_page_token,
            })
        ),
        Output::Table => {
            let rows: Vec<Vec<String>> = response.agents.iter().map(agent_row).collect();
            print_table(&HEADER, &rows);
            if !response.next_page_token.is_empty() {
                eprintln!("more: --after {}", response.next_page_token);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn show(args: ShowArgs) -> anyhow::Result<ExitCode> {
    let agent = args
        .common
        .client()
        .await?
        .get_agent(pb::GetAgentRequest {
            agent_id: args.agent_id,
        })
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    print_agent(&agent, args.common.output);
    Ok(ExitCode::SUCCESS)
}

fn print_agent(agent: &pb::Agent, output: Output) {
    match output {
        Output::Json => println!("{}", agent_json(agent)),
        Output::Table => print_table(&HEADER, &[agent_row(agent)]),
    }
}

async fn drain(args: DrainArgs) -> anyhow::Result<ExitCode> {
    let response = args
        .common
        .client()
        .await?
        .drain_agent(pb::DrainAgentRequest {
            agent_id: args.agent_id,
            deadline: Some(proto_duration(args.deadline)),
            reason: args.reason,
            on_expiry: match args.on_expiry {
                OnExpiryArg::Requeue => pb::DrainExpiry::Requeue,
                OnExpiryArg::Cancel => pb::DrainExpiry::Cancel,
            } as i32,
        })
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    if let Some(agent) = response.agent {
        print_agent(&agent, args.common.output);
    }
    Ok(ExitCode::SUCCESS)
}

async fn stats(common: Common) -> anyhow::Result<ExitCode> {
    let s = common
        .client()
        .await?
        .get_pool_stats(pb::GetPoolStatsRequest {})
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    match common.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "agents_by_state": s.agents_by_state, "agents_by_type": s.agents_by_type,
                "capacity": s.capacity, "in_flight": s.in_flight,
                "reservations": s.reservations, "instance": s.instance,
            })
        ),
        Output::Table => {
            let mut states: Vec<(&String, &u32)> = s.agents_by_state.iter().collect();
            states.sort();
            let rows: Vec<Vec<String>> = states
                .iter()
                .map(|(k, v)| vec![(*k).clone(), v.to_string()])
                .collect();
            print_table(&["STATE", "AGENTS"], &rows);
            println!(
                "slots in use {}/{}, reservations {}, instance {}",
                s.in_flight, s.capacity, s.reservations, s.instance
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn acquire(args: AcquireArgs) -> anyhow::Result<ExitCode> {
    let r = args
        .common
        .client()
        .await?
        .acquire_agent(pb::AcquireAgentRequest {
            selector: Some(selector(args.agent_type.as_ref(), &args.tags)),
            strategy: pb::Strategy::from(args.strategy) as i32,
            affinity_key: args.affinity_key.unwrap_or_default(),
            exclude: Vec::new(),
            ttl: Some(proto_duration(args.ttl)),
        })
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    let agent = r.agent.unwrap_or_default();
    match args.common.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({"reservation_id": r.reservation_id, "agent": agent_json(&agent)})
        ),
        Output::Table => println!(
            "reserved {} on {} (endpoint {:?}, {}/{} in flight)",
            r.reservation_id, agent.agent_id, agent.endpoint, agent.in_flight, agent.capacity
        ),
    }
    Ok(ExitCode::SUCCESS)
}

async fn release(args: ReleaseArgs) -> anyhow::Result<ExitCode> {
    let outcome = if args.failed {
        pb::Outcome::Failure
    } else if args.cancelled {
        pb::Outcome::Cancelled
    } else {
        pb::Outcome::Success
    };
    args.common
        .client()
        .await?
        .release_agent(pb::ReleaseAgentRequest {
            reservation_id: args.reservation_id.clone(),
            outcome: outcome as i32,
            latency: args.latency.map(proto_duration),
        })
        .await
        .map_err(|s| status_error(&s))?;
    if args.common.output == Output::Table {
        println!("released {}", args.reservation_id);
    }
    Ok(ExitCode::SUCCESS)
}
