//! Reading an event bus subscription in tests.

use std::time::Duration;

use agentmesh_proto::eventbus::v1 as pb;
use tokio_stream::StreamExt as _;

/// The first event delivered on `stream` within `within`; `None` when the stream ends first.
///
/// # Errors
/// Nothing is delivered within `within`.
pub async fn first_event(
    stream: &mut tonic::Streaming<pb::SubscribeResponse>,
    within: Duration,
) -> anyhow::Result<Option<pb::Event>> {
    Ok(tokio::time::timeout(within, async {
        while let Some(Ok(m)) = stream.next().await {
            if let Some(pb::subscribe_response::Kind::Deliveries(d)) = m.kind
                && let Some(e) = d.deliveries.into_iter().find_map(|d| d.event)
            {
                return Some(e);
            }
        }
        None
    })
    .await?)
}

/// Every event of the next batch delivered on `stream` within `within` (empty when the stream
/// ends first): unlike [`first_event`], nothing of the batch is dropped.
///
/// # Errors
/// Nothing is delivered within `within`.
pub async fn next_events(
    stream: &mut tonic::Streaming<pb::SubscribeResponse>,
    within: Duration,
) -> anyhow::Result<Vec<pb::Event>> {
    Ok(tokio::time::timeout(within, async {
        while let Some(Ok(m)) = stream.next().await {
            if let Some(pb::subscribe_response::Kind::Deliveries(d)) = m.kind {
                return d.deliveries.into_iter().filter_map(|d| d.event).collect();
            }
        }
        Vec::new()
    })
    .await?)
}
