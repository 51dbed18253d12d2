//! `meshctl bench eventbus`: publishers on PublishStream (pipelined), subscribers on Subscribe,
//! measured by the shared publish → deliver loop.

use std::collections::VecDeque;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentmesh_proto::eventbus::v1 as pb;
use anyhow::Context;
use pb::event_bus_client::EventBusClient;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::pubsub::{self, NORMAL, Plan, PubSubArgs, Recorder, Shared, Sink};
use crate::events::{DEFAULT_ADDR, client_for, status_error};

/// Queue group the subscribers share when there are several.
const GROUP: &str = "meshctl-bench";

#[derive(clap::Args)]
pub(crate) struct EventbusBench {
    #[command(flatten)]
    load: PubSubArgs,
    /// Event bus address.
    #[arg(long, env = "AGENTMESH_EVENTBUS_ADDR", default_value = DEFAULT_ADDR)]
    addr: String,
    /// Subscribe through this instance instead (another instance sharing the same Redis):
    /// measures delivery across instances over the backplane.
    #[arg(long)]
    subscribe_addr: Option<String>,
    /// Subject published to; with `--subjects N` above 1, SUBJECT.0 … SUBJECT.N-1 (the
    /// subscribers then use SUBJECT.>).
    #[arg(long, default_value = "bench.events")]
    subject: String,
    /// Distinct subjects the events cycle through.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    subjects: u64,
    /// Require the subject to be durable on the server (started with `--eventbus-durable`
    /// matching it, e.g. `'bench.>'`): every event is stored before Publish answers.
    #[arg(long)]
    durable: bool,
    /// Subscribers ack every delivery (one Ack per received batch); default ack policy NONE.
    #[arg(long)]
    ack: bool,
    /// With `--ack`: each subscriber acks at most this many deliveries per second, as if it
    /// took 1/N s to handle each (0 = ack on receipt). A consumer slower than the publishers
    /// keeps a backlog in the bus, where priorities decide what is delivered first.
    #[arg(long, default_value_t = 0.0, requires = "ack")]
    consume_rate: f64,
    /// Subscriber credit: most deliveries unacknowledged at once (1–10000).
    #[arg(long, default_value_t = 1000)]
    max_in_flight: u32,
    /// Subscribers; more than one share the events in one queue group.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    subscribers: u64,
    /// Publish a mix of priorities and report latency and delivery share per priority. Weights
    /// as `low=1,normal=1,high=1,critical=1` (the flag alone: equal shares).
    #[arg(
        long,
        num_args = 0..=1,
        default_missing_value = "low=1,normal=1,high=1,critical=1",
        value_parser = pubsub::parse_mix
    )]
    priority_mix: Option<[u32; 4]>,
}

pub(super) async fn run(args: EventbusBench) -> anyhow::Result<ExitCode> {
    let subjects: Vec<String> = if args.subjects > 1 {
        (0..args.subjects)
            .map(|i| format!("{}.{i}", args.subject))
            .collect()
    } else {
        vec![args.subject.clone()]
    };
    let filter = if args.subjects > 1 {
        format!("{}.>", args.subject)
    } else {
        args.subject.clone()
    };
    let stream = probe(&args.addr, &subjects[0]).await?;
    if args.durable && stream.is_empty() {
        anyhow::bail!(
            "{} is ephemeral on this server; for --durable start it with --eventbus-durable \
             matching it (e.g. 'bench.>')",
            subjects[0]
        );
    }
    let shared = Shared::new();
    let cancel = CancellationToken::new();
    let mut subscribers = Vec::new();
    for _ in 0..args.subscribers {
        subscribers.push(subscriber(&args, &filter, shared.recorder(), cancel.clone()).await?);
    }
    let mut sinks = Vec::new();
    let plan = Plan::new(&args.load, subjects, args.priority_mix);
    for _ in 0..args.load.publishers() {
        sinks.push(BusSink::open(&args.addr, &args.load, &plan, shared.clone()).await?);
    }
    let report = pubsub::drive(&args.load, plan, shared, sinks, subscribers, cancel).await;
    let durability = if stream.is_empty() {
        "ephemeral".to_owned()
    } else {
        format!("durable, stream {stream}")
    };
    report.print(
        &format!("eventbus {filter} ({durability})"),
        &format!(
            "{} subscriber(s), ack {}, max in flight {}",
            args.subscribers,
            match (args.ack, args.consume_rate > 0.0) {
                (false, _) => "none".to_owned(),
                (true, false) => "explicit".to_owned(),
                (true, true) => format!("explicit at {:.0}/s", args.consume_rate),
            },
            args.max_in_flight
        ),
        &args.load,
        args.priority_mix.is_some(),
    );
    Ok(ExitCode::SUCCESS)
}

/// Publishes one event that carries no stamp (so no subscriber counts it) to learn whether
/// `subject` is durable: the stream it was stored in, or empty.
async fn probe(addr: &str, subject: &str) -> anyhow::Result<String> {
    let response = client_for(addr, Duration::from_secs(5))
        .await?
        .publish(pb::PublishRequest {
            event: Some(pb::Event {
                subject: subject.to_owned(),
                data: b"probe".to_vec(),
                ..pb::Event::default()
            }),
        })
        .await
        .map_err(|s| status_error(&s))
        .context("probe publish")?
        .into_inner();
    Ok(response.stream)
}

/// Opens one subscription, waits for `subscribed`, and spawns its receive loop.
async fn subscriber(
    args: &EventbusBench,
    filter: &str,
    mut recorder: Recorder,
    cancel: CancellationToken,
) -> anyhow::Result<JoinHandle<Recorder>> {
    use pb::subscribe_request::Kind as Out;
    use pb::subscribe_response::Kind as In;
    let open = pb::SubscribeOpen {
        subject: filter.to_owned(),
        queue_group: if args.subscribers > 1 {
            GROUP.to_owned()
        } else {
            String::new()
        },
        max_in_flight: args.max_in_flight,
        ack_policy: if args.ack {
            pb::AckPolicy::Explicit
        } else {
            pb::AckPolicy::None
        } as i32,
        start: Some(pb::StartPosition {
            position: Some(pb::start_position::Position::NewOnly(true)),
        }),
        ..pb::SubscribeOpen::default()
    };
    // Acks: one per received batch, and the bus sends at most max_in_flight deliveries.
    let (requests_tx, requests_rx) = mpsc::channel(1024);
    requests_tx
        .send(pb::SubscribeRequest {
            kind: Some(Out::Open(open)),
        })
        .await
        .context("subscription request stream closed")?;
    let addr = args.subscribe_addr.as_deref().unwrap_or(&args.addr);
    let mut client = client_for(addr, Duration::from_secs(5)).await?;
    let mut responses = client
        .subscribe(ReceiverStream::new(requests_rx))
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    match responses.next().await {
        Some(Ok(pb::SubscribeResponse {
            kind: Some(In::Subscribed(_)),
        })) => {}
        Some(Err(s)) => return Err(status_error(&s)),
        _ => anyhow::bail!("the event bus did not confirm the subscription"),
    }
    let ack = args.ack;
    let mut acks = AckPacer::new(args.consume_rate);
    Ok(tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                () = cancel.cancelled() => break,
                () = acks.due() => {
                    let request = pb::SubscribeRequest {
                        kind: Some(Out::Ack(pb::Ack { delivery_ids: acks.take() })),
                    };
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        sent = requests_tx.send(request) => if sent.is_err() { break },
                    }
                    continue;
                }
                message = responses.next() => message,
            };
            let kind = match message {
                Some(Ok(m)) => m.kind,
                Some(Err(s)) => {
                    recorder
                        .shared()
                        .error(format!("subscription: {}", s.message()));
                    break;
                }
                None => break,
            };
            match kind {
                Some(In::Deliveries(batch)) => {
                    let now = recorder.now_ns();
                    for d in &batch.deliveries {
                        if let Some(event) = &d.event {
                            recorder.record(&event.data, now);
                        }
                    }
                    if ack && acks.paced() {
                        acks.owe(batch.deliveries.iter().map(|d| d.delivery_id));
                    } else if ack {
                        let ids = batch.deliveries.iter().map(|d| d.delivery_id).collect();
                        let request = pb::SubscribeRequest {
                            kind: Some(Out::Ack(pb::Ack { delivery_ids: ids })),
                        };
                        tokio::select! {
                            () = cancel.cancelled() => break,
                            sent = requests_tx.send(request) => if sent.is_err() { break },
                        }
                    }
                }
                Some(In::Advisory(a)) if a.kind == pb::advisory::Kind::Shed as i32 => {
                    let priority = usize::try_from(a.priority - 1).unwrap_or(NORMAL);
                    recorder.shared().shed(priority, a.count);
                }
                _ => {}
            }
        }
        recorder
    }))
}

/// Acks paced at a consume rate: delivery ids wait in `owed` until their turn.
struct AckPacer {
    /// Time to handle one delivery; `None` = ack on receipt.
    per: Option<Duration>,
    owed: VecDeque<u64>,
    next: Instant,
}

impl AckPacer {
    /// Most ids in one Ack.
    const MAX_IDS: usize = 1000;

    fn new(rate: f64) -> Self {
        Self {
            per: (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate)),
            owed: VecDeque::new(),
            next: Instant::now(),
        }
    }

    fn paced(&self) -> bool {
        self.per.is_some()
    }

    /// Queues received deliveries; an idle consumer does not bank time for a burst.
    fn owe(&mut self, ids: impl Iterator<Item = u64>) {
        if self.owed.is_empty() {
            self.next = self.next.max(Instant::now());
        }
        self.owed.extend(ids);
    }

    /// Resolves when an owed delivery's turn has come; never when nothing is owed.
    async fn due(&self) {
        match (self.per, self.owed.is_empty()) {
            (Some(per), false) => tokio::time::sleep_until((self.next + per).into()).await,
            _ => std::future::pending().await,
        }
    }

    /// The ids whose turn has come (at least one).
    fn take(&mut self) -> Vec<u64> {
        let Some(per) = self.per else {
            return Vec::new();
        };
        let now = Instant::now();
        let mut ids = Vec::new();
        while ids.len() < Self::MAX_IDS
            && let Some(&id) = self.owed.front()
            && (ids.is_empty() || self.next + per <= now)
        {
            ids.push(id);
            self.owed.pop_front();
            self.next += per;
        }
        ids
    }
}

/// One PublishStream with at most `window` publishes unanswered.
struct BusSink {
    requests_tx: mpsc::Sender<pb::PublishRequest>,
    window: Arc<Semaphore>,
    subjects: Arc<[String]>,
    answers: JoinHandle<()>,
}

impl BusSink {
    async fn open(
        addr: &str,
        load: &PubSubArgs,
        plan: &Plan,
        shared: Arc<Shared>,
    ) -> anyhow::Result<Self> {
        let window = usize::try_from(load.window()).unwrap_or(1);
        let mut client: EventBusClient<Channel> = client_for(addr, Duration::from_secs(5)).await?;
        let (requests_tx, requests_rx) = mpsc::channel(window);
        let mut responses = client
            .publish_stream(ReceiverStream::new(requests_rx))
            .await
            .map_err(|s| status_error(&s))?
            .into_inner();
        let window = Arc::new(Semaphore::new(window));
        let permits = window.clone();
        let answers = tokio::spawn(async move {
            while let Some(answer) = responses.next().await {
                permits.add_permits(1);
                match answer {
                    Ok(pb::PublishResponse { error: None, .. }) => {}
                    Ok(pb::PublishResponse { error: Some(e), .. }) => {
                        shared.error(format!("{}: {}", e.code, e.message));
                    }
                    Err(s) => {
                        shared.error(format!("publish stream: {}", s.message()));
                        break;
                    }
                }
            }
            // A publisher waiting for room sees the stream is gone.
            permits.close();
        });
        Ok(Self {
            requests_tx,
            window,
            subjects: plan.subjects.clone(),
            answers,
        })
    }
}

impl Sink for BusSink {
    async fn ready(&mut self) -> bool {
        match self.window.acquire().await {
            Ok(permit) => {
                permit.forget();
                true
            }
            Err(_) => false,
        }
    }

    async fn send(&mut self, subject: usize, priority: usize, data: Vec<u8>) {
        let event = pb::Event {
            subject: self.subjects[subject].clone(),
            priority: i32::try_from(priority + 1).unwrap_or(0),
            data,
            ..pb::Event::default()
        };
        // Room was reserved: the channel holds `window` requests.
        let _ = self
            .requests_tx
            .send(pb::PublishRequest { event: Some(event) })
            .await;
    }

    async fn close(self) {
        drop(self.requests_tx);
        let _ = self.answers.await;
    }
}
