//! The cache coordinator as a real process: Get/Set/Delete with tiers, versions and
//! compare-and-set, two instances over one Redis, and bad input naming the field.

use agentmesh_proto::cache::v1 as pb;
use agentmesh_tests::RedisServer;
use agentmesh_tests::agentmesh::AgentmeshProcess;
use tonic::Code;

type Client = pb::cache_coordinator_client::CacheCoordinatorClient<tonic::transport::Channel>;

async fn client(p: &AgentmeshProcess) -> anyhow::Result<Client> {
    Ok(Client::connect(format!("http://{}", p.grpc_addr)).await?)
}

fn set(key: &str, value: &[u8], if_version: Option<u64>) -> pb::SetRequest {
    pb::SetRequest {
        namespace: "agents".into(),
        key: key.into(),
        value: value.to_vec(),
        ttl: None,
        if_version,
    }
}

fn get(key: &str, consistency: pb::Consistency) -> pb::GetRequest {
    pb::GetRequest {
        namespace: "agents".into(),
        key: key.into(),
        consistency: consistency as i32,
    }
}

#[tokio::test]
async fn test_set_get_delete_with_versions_and_compare_and_set() -> anyhow::Result<()> {
    let cache = AgentmeshProcess::serve("cache", None, None, &[]).await?;
    let mut c = client(&cache).await?;
    let missing = c
        .get(get("k", pb::Consistency::Default))
        .await?
        .into_inner();
    assert!(!missing.found);
    assert_eq!(
        c.set(set("k", b"v1", Some(0))).await?.into_inner().version,
        1
    );
    let e = c.set(set("k", b"v2", Some(0))).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(
        c.set(set("k", b"v2", Some(1))).await?.into_inner().version,
        2
    );
    let hit = c
        .get(get("k", pb::Consistency::Default))
        .await?
        .into_inner();
    assert_eq!(
        (hit.found, hit.value.as_slice(), hit.version),
        (true, &b"v2"[..], 2)
    );
    assert_eq!(hit.tier, pb::Tier::L1 as i32);
    let big = vec![b'x'; 100_000];
    c.set(set("big", &big, None)).await?;
    let back = c
        .get(get("big", pb::Consistency::Fresh))
        .await?
        .into_inner();
    assert_eq!(
        (back.value.len(), back.tier),
        (big.len(), pb::Tier::L2 as i32)
    );
    assert!(
        c.delete(pb::DeleteRequest {
            namespace: "agents".into(),
            key: "k".into()
        })
        .await?
        .into_inner()
        .existed
    );
    assert!(
        !c.get(get("k", pb::Consistency::Default))
            .await?
            .into_inner()
            .found
    );
    Ok(())
}

#[tokio::test]
async fn test_two_instances_over_one_redis_see_each_others_writes() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let a = AgentmeshProcess::serve("cache", Some(&redis.url()), None, &[]).await?;
    let b = AgentmeshProcess::serve("cache", Some(&redis.url()), None, &[]).await?;
    let (mut ca, mut cb) = (client(&a).await?, client(&b).await?);
    ca.set(set("shared", b"from a", None)).await?;
    let seen = cb
        .get(get("shared", pb::Consistency::Default))
        .await?
        .into_inner();
    assert_eq!(
        (seen.value.as_slice(), seen.tier),
        (&b"from a"[..], pb::Tier::L2 as i32)
    );
    ca.set(set("shared", b"again", None)).await?;
    let fresh = cb
        .get(get("shared", pb::Consistency::Fresh))
        .await?
        .into_inner();
    assert_eq!((fresh.value.as_slice(), fresh.version), (&b"again"[..], 2));
    Ok(())
}

#[tokio::test]
async fn test_bad_input_names_every_field() -> anyhow::Result<()> {
    use tonic_types::StatusExt;
    let cache = AgentmeshProcess::serve("cache", None, None, &[]).await?;
    let mut c = client(&cache).await?;
    let e = c
        .set(pb::SetRequest {
            namespace: "has space".into(),
            key: String::new(),
            value: vec![0; (4 << 20) + 1],
            ttl: Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
            if_version: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let fields: Vec<String> = e
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default();
    assert_eq!(fields, ["ttl"], "the TTL is checked first, on the wire");
    let e = c
        .set(pb::SetRequest {
            namespace: "has space".into(),
            key: String::new(),
            value: vec![0; (4 << 20) + 1],
            ttl: None,
            if_version: None,
        })
        .await
        .unwrap_err();
    let fields: Vec<String> = e
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default();
    assert_eq!(fields, ["namespace", "key", "value"]);
    let e = c
        .get(pb::GetRequest {
            namespace: "ns".into(),
            key: "k".into(),
            consistency: 9,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    Ok(())
}
