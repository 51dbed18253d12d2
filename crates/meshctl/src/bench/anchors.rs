//! Anchors for `bench eventbus`, driven by the same publish → deliver loop and clock: core NATS
//! pub/sub (at most once, no acks) and Redis Streams (XADD; XREADGROUP + XACK).

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use super::pubsub::{self, Plan, PubSubArgs, Recorder, Shared, Sink};

#[derive(clap::Args)]
pub(crate) struct NatsBench {
    #[command(flatten)]
    load: PubSubArgs,
    /// NATS server URL.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    addr: String,
    /// Subject published to and subscribed.
    #[arg(long, default_value = "bench.events")]
    subject: String,
}

pub(super) async fn nats(args: NatsBench) -> anyhow::Result<ExitCode> {
    let connect = || async {
        async_nats::connect(args.addr.as_str())
            .await
            .with_context(|| format!("cannot connect to NATS at {}", args.addr))
    };
    let shared = Shared::new();
    let cancel = CancellationToken::new();
    let subscriber_client = connect().await?;
    let mut subscription = subscriber_client
        .subscribe(args.subject.clone())
        .await
        .context("NATS subscribe")?;
    // The server knows the subscription before the first publish.
    subscriber_client.flush().await.context("NATS flush")?;
    let mut recorder = shared.recorder();
    let stop = cancel.clone();
    let subscriber: JoinHandle<Recorder> = tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                message = subscription.next() => match message {
                    Some(m) => {
                        let now = recorder.now_ns();
                        recorder.record(&m.payload, now);
                    }
                    None => break,
                },
            }
        }
        // Keep the connection until the subscription is done with it.
        drop(subscriber_client);
        recorder
    });
    let plan = Plan::new(&args.load, vec![args.subject.clone()], None);
    let mut sinks = Vec::new();
    for _ in 0..args.load.publishers() {
        sinks.push(NatsSink {
            client: connect().await?,
            subjects: plan.subjects.clone(),
            shared: shared.clone(),
        });
    }
    let report = pubsub::drive(&args.load, plan, shared, sinks, vec![subscriber], cancel).await;
    report.print(
        &format!("nats core {} (anchor)", args.subject),
        "1 subscriber, no acks",
        &args.load,
        false,
    );
    Ok(ExitCode::SUCCESS)
}

/// A core NATS publisher: publishes are buffered by the client and never answered.
struct NatsSink {
    client: async_nats::Client,
    subjects: Arc<[String]>,
    shared: Arc<Shared>,
}

impl Sink for NatsSink {
    async fn ready(&mut self) -> bool {
        true
    }

    async fn send(&mut self, subject: usize, _priority: usize, data: Vec<u8>) {
        if let Err(e) = self
            .client
            .publish(self.subjects[subject].clone(), data.into())
            .await
        {
            self.shared.error(e);
        }
    }

    async fn close(self) {
        if let Err(e) = self.client.flush().await {
            self.shared.error(e);
        }
    }
}

#[derive(clap::Args)]
pub(crate) struct RedisStreamsBench {
    #[command(flatten)]
    load: PubSubArgs,
    /// Stream key (deleted before and after the run).
    #[arg(long, default_value = "meshctl:bench:events")]
    key: String,
    /// XADD trims the stream to about this many entries.
    #[arg(long, default_value_t = 100_000)]
    max_len: u64,
}

/// Consumer group the subscriber reads through.
const REDIS_GROUP: &str = "bench";
/// Entries per XREADGROUP.
const READ_COUNT: usize = 100;
/// XREADGROUP BLOCK, ms (below the client's 500 ms response timeout).
const READ_BLOCK_MS: usize = 100;

/// `redis` is the global `--redis`.
pub(super) async fn redis_streams(
    args: RedisStreamsBench,
    redis: &str,
) -> anyhow::Result<ExitCode> {
    let client =
        redis::Client::open(redis).with_context(|| format!("invalid Redis URL {redis}"))?;
    let connect = || async {
        client
            .get_multiplexed_async_connection()
            .await
            .with_context(|| format!("cannot connect to {redis}"))
    };
    let mut admin = connect().await?;
    redis::cmd("DEL")
        .arg(&args.key)
        .query_async::<()>(&mut admin)
        .await?;
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&args.key)
        .arg(REDIS_GROUP)
        .arg("$")
        .arg("MKSTREAM")
        .query_async::<()>(&mut admin)
        .await
        .context("XGROUP CREATE")?;
    let shared = Shared::new();
    let cancel = CancellationToken::new();
    // Its own connection: a blocked XREADGROUP holds up everything queued behind it.
    let subscriber = tokio::spawn(redis_subscriber(
        connect().await?,
        args.key.clone(),
        shared.recorder(),
        cancel.clone(),
    ));
    let plan = Plan::new(&args.load, vec![args.key.clone()], None);
    let mut sinks = Vec::new();
    for _ in 0..args.load.publishers() {
        let window = usize::try_from(args.load.window()).unwrap_or(1);
        sinks.push(RedisSink {
            connection: connect().await?,
            key: Arc::from(args.key.as_str()),
            max_len: args.max_len,
            window: Arc::new(Semaphore::new(window)),
            size: args.load.window(),
            permit: None,
            shared: shared.clone(),
        });
    }
    let report = pubsub::drive(&args.load, plan, shared, sinks, vec![subscriber], cancel).await;
    redis::cmd("DEL")
        .arg(&args.key)
        .query_async::<()>(&mut admin)
        .await?;
    report.print(
        &format!("redis streams {} (anchor)", args.key),
        &format!("1 consumer, XREADGROUP COUNT {READ_COUNT} BLOCK {READ_BLOCK_MS} + XACK"),
        &args.load,
        false,
    );
    Ok(ExitCode::SUCCESS)
}

async fn redis_subscriber(
    mut connection: redis::aio::MultiplexedConnection,
    key: String,
    mut recorder: Recorder,
    cancel: CancellationToken,
) -> Recorder {
    while !cancel.is_cancelled() {
        let read = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(REDIS_GROUP)
            .arg("c1")
            .arg("COUNT")
            .arg(READ_COUNT)
            .arg("BLOCK")
            .arg(READ_BLOCK_MS)
            .arg("STREAMS")
            .arg(&key)
            .arg(">")
            .query_async::<Option<redis::streams::StreamReadReply>>(&mut connection)
            .await;
        let reply = match read {
            Ok(Some(reply)) => reply,
            Ok(None) => continue,
            Err(e) => {
                recorder.shared().error(format!("XREADGROUP: {e}"));
                continue;
            }
        };
        let now = recorder.now_ns();
        let mut ids = Vec::new();
        for entry in reply.keys.into_iter().flat_map(|k| k.ids) {
            if let Some(redis::Value::BulkString(data)) = entry.map.get("d") {
                recorder.record(data, now);
            }
            ids.push(entry.id);
        }
        if ids.is_empty() {
            continue;
        }
        if let Err(e) = redis::cmd("XACK")
            .arg(&key)
            .arg(REDIS_GROUP)
            .arg(&ids)
            .query_async::<u64>(&mut connection)
            .await
        {
            recorder.shared().error(format!("XACK: {e}"));
        }
    }
    recorder
}

/// XADDs pipelined over one multiplexed connection, at most `window` unanswered.
struct RedisSink {
    connection: redis::aio::MultiplexedConnection,
    key: Arc<str>,
    max_len: u64,
    window: Arc<Semaphore>,
    size: u32,
    permit: Option<OwnedSemaphorePermit>,
    shared: Arc<Shared>,
}

impl Sink for RedisSink {
    async fn ready(&mut self) -> bool {
        self.permit = self.window.clone().acquire_owned().await.ok();
        self.permit.is_some()
    }

    async fn send(&mut self, _subject: usize, _priority: usize, data: Vec<u8>) {
        let permit = self.permit.take();
        let mut connection = self.connection.clone();
        let (key, max_len, shared) = (self.key.clone(), self.max_len, self.shared.clone());
        // A task per XADD so it is written at once; the permit bounds how many there are.
        tokio::spawn(async move {
            let added = redis::cmd("XADD")
                .arg(&*key)
                .arg("MAXLEN")
                .arg("~")
                .arg(max_len)
                .arg("*")
                .arg("d")
                .arg(data)
                .query_async::<String>(&mut connection)
                .await;
            if let Err(e) = added {
                shared.error(format!("XADD: {e}"));
            }
            drop(permit);
        });
    }

    async fn close(self) {
        let _ = self.window.acquire_many(self.size).await;
    }
}
