//! `meshctl bench eventbus`: publishers on PublishStream (pipelined), subscribers on Subscribe,
//! measured by the shared publish → deliver loop.

use std::collections::VecDeque;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::Chan as Channel;
use agentmesh_proto::eventbus::v1 as pb;
use anyhow::Context;
use pb::event_bus_client::EventBusClient;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::pubsub::{self, NORMAL, PRIORITIES, Plan, PubSubArgs, Recorder, Shared, Sink};
use super::scrape;
use crate::Output;
use crate::events::{DEFAULT_ADDR, client_for, status_error};

/// The server's histogram of time spent in pending queues.
const QUEUE_WAIT: &str = "eventbus_queue_wait_seconds";

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
    /// The server's metrics URL (its admin listener, e.g. `http://127.0.0.1:9101/metrics`):
    /// scraped when the measured window opens and after the run to report how long events
    /// waited in the bus's pending queues, by priority (`eventbus_queue_wait_seconds`).
    #[arg(long)]
    metrics_url: Option<String>,
    /// Subscribe to this filter instead of the published subjects' (`bench rules`: the
    /// responses' subjects).
    #[arg(skip)]
    subscribe_filter: Option<String>,
}

pub(super) async fn run(args: EventbusBench) -> anyhow::Result<ExitCode> {
    let subjects: Vec<String> = if args.subjects > 1 {
        (0..args.subjects)
            .map(|i| format!("{}.{i}", args.subject))
            .collect()
    } else {
        vec![args.subject.clone()]
    };
    let filter = if let Some(filter) = &args.subscribe_filter {
        filter.clone()
    } else if args.subjects > 1 {
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
    // Scraped as the measured window opens (`drive` warms up for as long first), so the
    // warm-up's waits are left out.
    let before = args.metrics_url.clone().map(|url| {
        let warmup = args.load.warmup;
        tokio::spawn(async move {
            tokio::time::sleep(warmup).await;
            scrape::fetch(&url).await
        })
    });
    let report = pubsub::drive(&args.load, plan, shared, sinks, subscribers, cancel).await;
    let queue_wait = match (&args.metrics_url, before) {
        (Some(url), Some(before)) => {
            let before = before.await.context("metrics scrape task failed")??;
            let after = scrape::fetch(url).await?;
            let parse = |text: &str| scrape::parse(text, QUEUE_WAIT, "priority");
            Some(parse(&after).since(&parse(&before)))
        }
        _ => None,
    };
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
    if let Some(waits) = queue_wait {
        print_queue_wait(&waits, &args.load);
    }
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
    let pacer = (ack && args.consume_rate > 0.0).then(|| {
        AckPacer::spawn(
            Duration::from_secs_f64(1.0 / args.consume_rate),
            requests_tx.clone(),
            cancel.clone(),
        )
    });
    Ok(tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                () = cancel.cancelled() => break,
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
                    if let Some(pacer) = &pacer {
                        let _ =
                            pacer.send(batch.deliveries.iter().map(|d| d.delivery_id).collect());
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

/// Acks at a steady rate, as if each delivery took `per` to handle, on a thread of its own:
/// tokio's timer ticks in milliseconds, which made the consumer return credit in 1 ms bursts
/// (and any event, CRITICAL included, wait for the next burst); a thread's sleep lets it ack
/// every [`AckPacer::TICK`].
struct AckPacer;

impl AckPacer {
    /// Most ids in one Ack.
    const MAX_IDS: usize = 1000;
    /// Shortest sleep between acks.
    const TICK: Duration = Duration::from_micros(100);

    /// Starts the pacer; deliveries received are sent to it, and it sends the acks. It stops
    /// when the sender is dropped, the request stream closes, or `cancel` fires.
    fn spawn(
        per: Duration,
        requests: mpsc::Sender<pb::SubscribeRequest>,
        cancel: CancellationToken,
    ) -> std::sync::mpsc::Sender<Vec<u64>> {
        use std::sync::mpsc::RecvTimeoutError;
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u64>>();
        let pace = move || {
            let mut owed: VecDeque<u64> = VecDeque::new();
            let mut next = Instant::now();
            while !cancel.is_cancelled() {
                if owed.is_empty() {
                    // An idle consumer does not bank time for a burst.
                    match rx.recv_timeout(Duration::from_millis(100)) {
                        Ok(ids) => {
                            next = next.max(Instant::now());
                            owed.extend(ids);
                        }
                        Err(RecvTimeoutError::Timeout) => continue,
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
                while let Ok(ids) = rx.try_recv() {
                    owed.extend(ids);
                }
                let now = Instant::now();
                if next + per > now {
                    std::thread::sleep((next + per - now).max(Self::TICK));
                    continue;
                }
                let mut ids = Vec::new();
                while ids.len() < Self::MAX_IDS
                    && let Some(&id) = owed.front()
                    && next + per <= now
                {
                    ids.push(id);
                    owed.pop_front();
                    next += per;
                }
                let request = pb::SubscribeRequest {
                    kind: Some(pb::subscribe_request::Kind::Ack(pb::Ack {
                        delivery_ids: ids,
                    })),
                };
                if requests.blocking_send(request).is_err() {
                    return;
                }
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("ack-pacer".to_owned())
            .spawn(pace)
        {
            tracing::warn!(error = %e, "could not start the ack pacer; deliveries are not acked");
        }
        tx
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

/// Prints (or, with `-o json`, emits) the bus-side queue wait per priority, highest first.
fn print_queue_wait(waits: &scrape::Buckets, load: &PubSubArgs) {
    let highest_first: Vec<&str> = PRIORITIES.iter().rev().copied().collect();
    waits.print_quantiles(
        &highest_first,
        load.output == Output::Json,
        &scrape::Report {
            name: "queue_wait",
            key: "priority",
            heading: "queue wait in the bus",
            unit: "",
        },
    );
}

/// `meshctl bench rules`: stimulus → response latency of the scheduler's rule engine, beside the
/// event bus's own publish → deliver latency in the same run and with the same load.
#[derive(clap::Args)]
pub(crate) struct RulesBench {
    #[command(flatten)]
    load: PubSubArgs,
    /// Event bus address.
    #[arg(long, env = "AGENTMESH_EVENTBUS_ADDR", default_value = DEFAULT_ADDR)]
    addr: String,
    /// Scheduler address (where the rules are stored).
    #[arg(
        long,
        env = "AGENTMESH_SCHEDULER_ADDR",
        default_value = "http://127.0.0.1:7102"
    )]
    scheduler: String,
    /// Rules: rule i listens on `bench.rules.i` and publishes the stimulus's data unchanged on
    /// `bench.fired.i`; stimuli cycle through them.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    rules: u64,
    /// Skip the event bus's own publish → deliver run.
    #[arg(long)]
    no_baseline: bool,
}

pub(super) async fn rules(args: RulesBench) -> anyhow::Result<ExitCode> {
    use agentmesh_proto::rules::v1 as rules_pb;
    let channel = crate::connect(&args.scheduler, Duration::from_secs(10), "the scheduler").await?;
    let mut client = rules_pb::rules_client::RulesClient::new(channel);
    let bar = indicatif::ProgressBar::new(args.rules);
    bar.set_message("storing rules");
    for i in 0..args.rules {
        client
            .put_rule(rules_pb::PutRuleRequest {
                rule: Some(rules_pb::Rule {
                    name: format!("bench-rule-{i}"),
                    stimulus: Some(rules_pb::Stimulus {
                        subject: format!("bench.rules.{i}"),
                        ..rules_pb::Stimulus::default()
                    }),
                    responses: vec![rules_pb::Response {
                        name: "forward".into(),
                        action: Some(rules_pb::response::Action::Publish(
                            rules_pb::PublishAction {
                                subject: format!("bench.fired.{i}"),
                                ..rules_pb::PublishAction::default()
                            },
                        )),
                        ..rules_pb::Response::default()
                    }],
                    ..rules_pb::Rule::default()
                }),
                ..rules_pb::PutRuleRequest::default()
            })
            .await
            .map_err(|s| status_error(&s))?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    // The leader subscribes to the stimuli a moment after the rules are stored: wait until a
    // probe on the last rule's subject comes back as a response.
    let last = args.rules - 1;
    wait_for_response(&args.addr, last).await?;
    let phase = |subject: &str, filter: &str| EventbusBench {
        load: args.load.clone(),
        addr: args.addr.clone(),
        subscribe_addr: None,
        subject: subject.to_owned(),
        subjects: args.rules,
        durable: false,
        ack: false,
        consume_rate: 0.0,
        max_in_flight: 10_000,
        subscribers: 1,
        priority_mix: None,
        metrics_url: None,
        subscribe_filter: Some(filter.to_owned()),
    };
    if !args.no_baseline {
        println!("# the event bus alone: publish bench.plain.<i> → deliver");
        Box::pin(run(phase("bench.plain", "bench.plain.>"))).await?;
    }
    println!(
        "# reactive rules: stimulus bench.rules.<i> → rule → response bench.fired.<i> delivered ({} rules)",
        args.rules
    );
    let code = Box::pin(run(phase("bench.rules", "bench.fired.>"))).await?;
    for i in 0..args.rules {
        let _ = client
            .delete_rule(rules_pb::DeleteRuleRequest {
                name: format!("bench-rule-{i}"),
            })
            .await;
    }
    Ok(code)
}

/// Publishes probes on `bench.rules.<rule>` until a response arrives on `bench.fired.<rule>`.
async fn wait_for_response(addr: &str, rule: u64) -> anyhow::Result<()> {
    use pb::subscribe_response::Kind as In;
    let mut client = client_for(addr, Duration::from_secs(5)).await?;
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::SubscribeRequest {
        kind: Some(pb::subscribe_request::Kind::Open(pb::SubscribeOpen {
            subject: format!("bench.fired.{rule}"),
            max_in_flight: 100,
            ack_policy: pb::AckPolicy::None as i32,
            ..pb::SubscribeOpen::default()
        })),
    })
    .await
    .context("subscription request stream closed")?;
    let mut responses = client
        .subscribe(ReceiverStream::new(rx))
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        client
            .publish(pb::PublishRequest {
                event: Some(pb::Event {
                    subject: format!("bench.rules.{rule}"),
                    data: b"probe".to_vec(),
                    ..pb::Event::default()
                }),
            })
            .await
            .map_err(|s| status_error(&s))?;
        if let Ok(Some(Ok(pb::SubscribeResponse {
            kind: Some(In::Deliveries(_)),
        }))) = tokio::time::timeout(Duration::from_millis(300), async {
            loop {
                match responses.next().await {
                    Some(Ok(pb::SubscribeResponse {
                        kind: Some(In::Subscribed(_)),
                    })) => {}
                    other => return other,
                }
            }
        })
        .await
        {
            return Ok(());
        }
    }
    drop(tx);
    anyhow::bail!("no rule answered a probe within 30 s: is the scheduler's rule engine leading?")
}
