//! The peer batcher: forwards to one peer over one long-lived `StreamCheck` stream, coalescing
//! the forwards that queued meanwhile; see the router's module docs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentmesh_membership::Member;
use agentmesh_proto::ratelimit::v1 as pb;
use agentmesh_runtime::ClientChannel;
use tokio::sync::{mpsc, oneshot};

use crate::error::RateLimitError;
use crate::limiter::{CheckItem, CheckOutcome};
use crate::suspects::Suspects;
use crate::wire::{decode_result, encode_item};

/// Forward messages buffered on one peer stream before new forwards fail over.
const PEER_STREAM_BUFFER: usize = 1024;
/// Time a peer has to open the forward stream.
const PEER_OPEN_TIMEOUT: Duration = Duration::from_millis(250);
/// How often batches whose callers gave up are dropped.
const PEER_SWEEP: Duration = Duration::from_millis(100);
/// An unanswered forward this old means the stream is stuck: it is dropped and reopened.
const PEER_STALL: Duration = Duration::from_secs(1);
/// How often a suspected peer is probed (a forward stream opened to it).
const SUSPECT_PROBE: Duration = Duration::from_millis(500);
/// Forwards queued for one peer before new ones fail over to the failure policy.
const PEER_QUEUE: usize = 4096;
/// Items in one forwarded request.
const MAX_FORWARD_ITEMS: usize = 1000;

/// One forward waiting to be sent.
pub(super) struct Job {
    pub(super) items: Vec<CheckItem>,
    pub(super) all_or_nothing: bool,
    pub(super) deadline: Instant,
    pub(super) reply_tx: oneshot::Sender<Result<Vec<CheckOutcome>, RateLimitError>>,
}

/// Sends forwards to one peer; see the module docs for the batching.
#[derive(Clone)]
pub(super) struct PeerBatcher {
    pub(super) addr: String,
    pub(super) queue_tx: mpsc::Sender<Job>,
}

impl PeerBatcher {
    /// Starts the batcher of `member` on `channel` (the peer set's channel to it).
    pub(super) fn start(member: &Member, channel: ClientChannel, suspects: &Arc<Suspects>) -> Self {
        let (queue_tx, queue_rx) = mpsc::channel(PEER_QUEUE);
        tokio::spawn(run_batcher(
            channel,
            queue_rx,
            member.instance_id.clone(),
            suspects.clone(),
        ));
        Self {
            addr: member.grpc_addr.clone(),
            queue_tx,
        }
    }
}

/// A batch sent on the peer stream and not answered yet.
struct Sent {
    at: Instant,
    jobs: Vec<Job>,
}

/// The open `StreamCheck` stream to one peer.
struct PeerLink {
    outbound: mpsc::Sender<pb::StreamCheckRequest>,
    inbound: tonic::Streaming<pb::StreamCheckResponse>,
}

impl PeerLink {
    /// Opens the stream, marked as forwards (the owner does not count their decisions).
    async fn open(channel: ClientChannel) -> Result<Self, RateLimitError> {
        let (outbound, rx) = mpsc::channel(PEER_STREAM_BUFFER);
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        request.metadata_mut().insert(
            crate::wire::FORWARDED_HEADER,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        let mut client = pb::rate_limiter_client::RateLimiterClient::new(channel);
        let opened = tokio::time::timeout(PEER_OPEN_TIMEOUT, client.stream_check(request)).await;
        match opened {
            Ok(Ok(response)) => Ok(Self {
                outbound,
                inbound: response.into_inner(),
            }),
            Ok(Err(status)) => Err(RateLimitError::Unavailable(format!(
                "owner refused the forward stream: {:?}: {}",
                status.code(),
                status.message()
            ))),
            Err(_) => Err(RateLimitError::Unavailable(
                "owner did not open the forward stream in time".to_owned(),
            )),
        }
    }
}

/// The next answer on the link, or never when there is no link.
async fn next_answer(
    link: &mut Option<PeerLink>,
) -> Result<Option<pb::StreamCheckResponse>, tonic::Status> {
    match link {
        Some(link) => link.inbound.message().await,
        None => std::future::pending().await,
    }
}

/// Forwards to one peer over one long-lived `StreamCheck` stream: a batch is written as soon
/// as it is taken from the queue, and jobs that queued meanwhile travel together (at most
/// [`MAX_FORWARD_ITEMS`] items; an all-or-nothing job alone). Answers come back by id, in any
/// order. The stream is reopened on the next forward after it fails or stalls.
///
/// When the stream fails, closes, stalls or cannot be opened, the peer is suspected (its keys
/// go to the next owner) and probed every [`SUSPECT_PROBE`] until a stream opens again.
async fn run_batcher(
    channel: ClientChannel,
    mut queue_rx: mpsc::Receiver<Job>,
    peer: String,
    suspects: Arc<Suspects>,
) {
    let mut link: Option<PeerLink> = None;
    let mut pending: HashMap<u64, Sent> = HashMap::new();
    let mut next_id: u64 = 0;
    let mut carried: Option<Job> = None;
    let mut sweep = tokio::time::interval(PEER_SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probe = tokio::time::interval(SUSPECT_PROBE);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let lost = |link: &mut Option<PeerLink>, pending: &mut HashMap<u64, Sent>, reason: &str| {
        fail_all(link, pending, reason);
        suspects.mark(&peer, reason);
    };
    loop {
        let first = if let Some(job) = carried.take() {
            job
        } else {
            tokio::select! {
                biased;
                answer = next_answer(&mut link) => {
                    match answer {
                        Ok(Some(answer)) => settle(&mut pending, answer),
                        Ok(None) => lost(&mut link, &mut pending, "owner closed the forward stream"),
                        Err(status) => lost(
                            &mut link,
                            &mut pending,
                            &format!("forward stream failed: {:?}: {}", status.code(), status.message()),
                        ),
                    }
                    continue;
                }
                job = queue_rx.recv() => match job {
                    Some(job) => job,
                    None => return,
                },
                _ = sweep.tick(), if !pending.is_empty() => {
                    pending.retain(|_, sent| sent.jobs.iter().any(|job| !job.reply_tx.is_closed()));
                    if pending.values().any(|sent| sent.at.elapsed() > PEER_STALL) {
                        lost(&mut link, &mut pending, "owner stopped answering forwards");
                    }
                    continue;
                }
                _ = probe.tick(), if link.is_none() && suspects.contains(&peer) => {
                    if let Ok(opened) = PeerLink::open(channel.clone()).await {
                        link = Some(opened);
                        suspects.clear(&peer);
                    }
                    continue;
                }
            }
        };
        let mut batch = vec![first];
        if !batch[0].all_or_nothing {
            let mut total = batch[0].items.len();
            while let Ok(job) = queue_rx.try_recv() {
                if job.all_or_nothing || total + job.items.len() > MAX_FORWARD_ITEMS {
                    carried = Some(job);
                    break;
                }
                total += job.items.len();
                batch.push(job);
            }
        }
        let now = Instant::now();
        batch.retain(|job| job.deadline > now && !job.reply_tx.is_closed());
        if batch.is_empty() {
            continue;
        }
        if link.is_none() {
            match PeerLink::open(channel.clone()).await {
                Ok(opened) => {
                    link = Some(opened);
                    suspects.clear(&peer);
                }
                Err(e) => {
                    let reason = e.to_string();
                    reply_all(batch, &reason);
                    suspects.mark(&peer, &reason);
                    continue;
                }
            }
        }
        let Some(open) = link.as_ref() else { continue };
        next_id = next_id.wrapping_add(1);
        let all_or_nothing = batch.len() == 1 && batch[0].all_or_nothing;
        let items: Vec<pb::CheckItem> = batch
            .iter()
            .flat_map(|job| job.items.iter())
            .map(|item| pb::CheckItem {
                consistency: pb::Consistency::Local as i32,
                ..encode_item(item)
            })
            .collect();
        let message = pb::StreamCheckRequest {
            id: next_id,
            request: Some(pb::CheckRequest {
                items,
                all_or_nothing,
            }),
        };
        match open.outbound.try_send(message) {
            Ok(()) => {
                pending.insert(
                    next_id,
                    Sent {
                        at: now,
                        jobs: batch,
                    },
                );
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                reply_all(batch, "forward stream to the owner is full");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                reply_all(batch, "forward stream to the owner closed");
                lost(
                    &mut link,
                    &mut pending,
                    "forward stream to the owner closed",
                );
            }
        }
    }
}

/// Hands one answer to the jobs of its batch.
fn settle(pending: &mut HashMap<u64, Sent>, answer: pb::StreamCheckResponse) {
    let Some(sent) = pending.remove(&answer.id) else {
        return; // given up on already
    };
    match answer.response {
        Some(response) => {
            let mut results = response.results.into_iter();
            for job in sent.jobs {
                let outcomes: Vec<CheckOutcome> = results
                    .by_ref()
                    .take(job.items.len())
                    .map(|r| decode_result(&r))
                    .collect();
                let _ = job.reply_tx.send(Ok(outcomes));
            }
        }
        None => {
            let message = answer.error.map_or_else(
                || "owner answered without a result".to_owned(),
                |e| format!("owner answered code {}: {}", e.code, e.message),
            );
            reply_all(sent.jobs, &message);
        }
    }
}

/// Drops the link and fails every batch waiting on it.
fn fail_all(link: &mut Option<PeerLink>, pending: &mut HashMap<u64, Sent>, reason: &str) {
    *link = None;
    for (_, sent) in pending.drain() {
        reply_all(sent.jobs, reason);
    }
}

fn reply_all(jobs: Vec<Job>, reason: &str) {
    for job in jobs {
        let _ = job
            .reply_tx
            .send(Err(RateLimitError::Unavailable(reason.to_owned())));
    }
}
