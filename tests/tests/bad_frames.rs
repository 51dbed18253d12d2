//! Frames no generated client sends — bytes that are not protobuf, invalid UTF-8 in a string,
//! protocol errors inside a stream — sent to a real `agentmesh dev` process: every one is
//! answered with INVALID_ARGUMENT naming what was wrong, and nothing read after it is acted on
//! silently (a stream never ends OK after a bad frame).

use std::time::Duration;

use agentmesh_proto::eventbus::v1 as bus;
use agentmesh_proto::ratelimit::v1 as rl;
use agentmesh_tests::agentmesh::AgentmeshProcess;
use agentmesh_tests::raw::{self, UNDECODABLE};
use prost::Message;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_types::StatusExt;

const PUBLISH_STREAM: &str = "/agentmesh.eventbus.v1.EventBus/PublishStream";
const SUBSCRIBE: &str = "/agentmesh.eventbus.v1.EventBus/Subscribe";
const STREAM_CHECK: &str = "/agentmesh.ratelimit.v1.RateLimiter/StreamCheck";
const CHECK: &str = "/agentmesh.ratelimit.v1.RateLimiter/Check";

fn publish(id: &str, subject: &str) -> Vec<u8> {
    bus::PublishRequest {
        event: Some(bus::Event {
            id: id.into(),
            subject: subject.into(),
            data: b"x".to_vec(),
            ..bus::Event::default()
        }),
    }
    .encode_to_vec()
}

/// `frame` with `from` replaced by `to` (same length, so every length prefix stays right).
fn patched(frame: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = frame
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern in frame");
    let mut out = frame.to_vec();
    out[at..at + to.len()].copy_from_slice(to);
    out
}

/// A subscription to `filter` that has been acknowledged, and its deliveries so far.
async fn subscribed(
    dev: &AgentmeshProcess,
    filter: &str,
) -> (
    tokio::sync::mpsc::Sender<bus::SubscribeRequest>,
    tonic::Streaming<bus::SubscribeResponse>,
) {
    let (bus_addr, _) = dev.eventbus.unwrap();
    let mut client = bus::event_bus_client::EventBusClient::connect(format!("http://{bus_addr}"))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(bus::SubscribeRequest {
        kind: Some(bus::subscribe_request::Kind::Open(bus::SubscribeOpen {
            subject: filter.into(),
            max_in_flight: 100,
            ..bus::SubscribeOpen::default()
        })),
    })
    .await
    .unwrap();
    let mut inbound = client
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = inbound.next().await.unwrap().unwrap();
    assert!(matches!(
        first.kind,
        Some(bus::subscribe_response::Kind::Subscribed(_))
    ));
    (tx, inbound)
}

/// Ids of the events delivered within `wait`.
async fn delivered_ids(
    inbound: &mut tonic::Streaming<bus::SubscribeResponse>,
    wait: Duration,
) -> Vec<String> {
    let mut ids = Vec::new();
    let _ = tokio::time::timeout(wait, async {
        while let Some(Ok(message)) = inbound.next().await {
            if let Some(bus::subscribe_response::Kind::Deliveries(batch)) = message.kind {
                ids.extend(
                    batch
                        .deliveries
                        .into_iter()
                        .filter_map(|d| d.event.map(|e| e.id)),
                );
            }
        }
    })
    .await;
    ids
}

#[tokio::test]
async fn test_publish_stream_ends_with_invalid_argument_after_a_bad_frame_and_publishes_nothing_after_it()
 {
    let dev = AgentmeshProcess::dev().await.unwrap();
    let (bus_addr, _) = dev.eventbus.unwrap();
    let (_keep, mut inbound) = subscribed(&dev, "loss.>").await;
    let good = publish("evB", "loss.b");
    for bad in [
        UNDECODABLE.to_vec(),
        patched(&good, b"loss.b", b"loss.\xff"),
    ] {
        let frames = vec![publish("evA", "loss.a"), bad, good.clone()];
        let (answers, end) = raw::streaming(bus_addr, PUBLISH_STREAM, frames)
            .await
            .unwrap();
        assert_eq!(end.code(), Code::InvalidArgument, "{end:?}");
        assert!(end.message().contains("undecodable"), "{end:?}");
        assert_eq!(answers.len(), 1, "only evA was read and answered");
        let answer = bus::PublishResponse::decode(answers[0].as_slice()).unwrap();
        assert_eq!(answer.id, "evA");
        assert!(answer.error.is_none());
        // evB is never published; evA is (once: the second round is a duplicate).
        let ids = delivered_ids(&mut inbound, Duration::from_millis(500)).await;
        assert!(!ids.contains(&"evB".to_owned()), "{ids:?}");
    }
}

#[tokio::test]
async fn test_subscribe_ends_with_invalid_argument_on_a_protocol_error() {
    let dev = AgentmeshProcess::dev().await.unwrap();
    let (bus_addr, _) = dev.eventbus.unwrap();
    let open = bus::SubscribeRequest {
        kind: Some(bus::subscribe_request::Kind::Open(bus::SubscribeOpen {
            subject: "proto.>".into(),
            max_in_flight: 100,
            ..bus::SubscribeOpen::default()
        })),
    }
    .encode_to_vec();
    for (second, field) in [
        (UNDECODABLE.to_vec(), None),
        (open.clone(), Some("open")),
        (Vec::new(), Some("kind")),
    ] {
        let (answers, end) = raw::streaming(bus_addr, SUBSCRIBE, vec![open.clone(), second])
            .await
            .unwrap();
        assert_eq!(end.code(), Code::InvalidArgument, "{end:?}");
        let first = bus::SubscribeResponse::decode(answers[0].as_slice()).unwrap();
        assert!(matches!(
            first.kind,
            Some(bus::subscribe_response::Kind::Subscribed(_))
        ));
        if let Some(field) = field {
            let violations = end.get_error_details().bad_request().unwrap().clone();
            assert_eq!(violations.field_violations[0].field, field, "{end:?}");
        }
    }
}

#[tokio::test]
async fn test_stream_check_answers_what_came_before_a_bad_frame_then_ends_with_invalid_argument() {
    let dev = AgentmeshProcess::dev().await.unwrap();
    let check = |id: u64| {
        rl::StreamCheckRequest {
            id,
            request: Some(rl::CheckRequest {
                items: vec![rl::CheckItem {
                    namespace: "frames".into(),
                    key: "k".into(),
                    cost: 1,
                    ..rl::CheckItem::default()
                }],
                all_or_nothing: false,
            }),
        }
        .encode_to_vec()
    };
    let frames = vec![check(1), UNDECODABLE.to_vec(), check(3)];
    let (answers, end) = raw::streaming(dev.grpc_addr, STREAM_CHECK, frames)
        .await
        .unwrap();
    assert_eq!(end.code(), Code::InvalidArgument, "{end:?}");
    assert_eq!(answers.len(), 1);
    let answer = rl::StreamCheckResponse::decode(answers[0].as_slice()).unwrap();
    assert_eq!(answer.id, 1);
    assert!(answer.response.is_some());
}

#[tokio::test]
async fn test_an_undecodable_unary_request_is_invalid_argument_not_internal() {
    let dev = AgentmeshProcess::dev().await.unwrap();
    let valid = rl::CheckRequest {
        items: vec![rl::CheckItem {
            namespace: "frames".into(),
            key: "kkkk".into(),
            cost: 1,
            ..rl::CheckItem::default()
        }],
        all_or_nothing: false,
    }
    .encode_to_vec();
    // Nested unknown groups (field 15: 0x7b starts one, 0x7c ends it) past prost's recursion
    // limit.
    let mut deep = vec![0x7b; 200];
    deep.extend([0x7c; 200]);
    for frame in [
        UNDECODABLE.to_vec(),
        patched(&valid, b"kkkk", b"k\xffkk"),
        deep,
    ] {
        let status = raw::unary(dev.grpc_addr, CHECK, frame)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with("undecodable message"));
    }
}
