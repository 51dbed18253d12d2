//! The cache coordinator as a real process: Get/Set/Delete with tiers, versions and
//! compare-and-set, two instances over one Redis (a write on one dropping the other's L1 copy),
//! leases, tags, batches, the invalidation stream, stats, warm, and bad input on every RPC
//! naming the field.

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
        tags: vec![],
        stale_for: None,
    }
}

fn get(key: &str, consistency: pb::Consistency) -> pb::GetRequest {
    pb::GetRequest {
        namespace: "agents".into(),
        key: key.into(),
        consistency: consistency as i32,
        allow_stale: false,
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
            tags: vec![],
            stale_for: None,
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
            tags: vec!["a tag".into()],
            stale_for: None,
        })
        .await
        .unwrap_err();
    let fields: Vec<String> = e
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default();
    assert_eq!(fields, ["namespace", "key", "value", "tags[0]"]);
    let e = c
        .get(pb::GetRequest {
            namespace: "ns".into(),
            key: "k".into(),
            consistency: 9,
            allow_stale: false,
        })
        .await
        .unwrap_err();
    assert_eq!(fields_of(&e), ["consistency"]);
    let e = c.delete(pb::DeleteRequest::default()).await.unwrap_err();
    assert_eq!(fields_of(&e), ["namespace", "key"]);
    let e = c
        .get_many(pb::GetManyRequest {
            items: vec![
                get("ok", pb::Consistency::Default),
                get("", pb::Consistency::Default),
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(fields_of(&e), ["items[1].key"]);
    let e = c.set_many(pb::SetManyRequest::default()).await.unwrap_err();
    assert_eq!(fields_of(&e), ["items"]);
    let e = c
        .delete_many(pb::DeleteManyRequest {
            items: vec![pb::DeleteRequest::default()],
        })
        .await
        .unwrap_err();
    assert_eq!(fields_of(&e), ["items[0].namespace", "items[0].key"]);
    let e = c
        .get_or_lease(pb::GetOrLeaseRequest {
            namespace: "ns".into(),
            key: "k".into(),
            lease_ttl: None,
            wait: None,
        })
        .await
        .unwrap_err();
    assert_eq!(fields_of(&e), ["lease_ttl"]);
    let e = c
        .get_or_lease(pb::GetOrLeaseRequest {
            namespace: "ns".into(),
            key: "k".into(),
            lease_ttl: Some(secs(3600)),
            wait: Some(secs(3600)),
        })
        .await
        .unwrap_err();
    assert_eq!(fields_of(&e), ["lease_ttl", "wait"]);
    let e = c
        .fill_lease(pb::FillLeaseRequest {
            namespace: "ns".into(),
            key: String::new(),
            token: 1,
            ..pb::FillLeaseRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(fields_of(&e), ["key"]);
    let e = c
        .abandon_lease(pb::AbandonLeaseRequest {
            namespace: "ns".into(),
            key: "k".into(),
            token: 1,
            negative_ttl: Some(prost_types::Duration::default()),
        })
        .await
        .unwrap_err();
    assert_eq!(fields_of(&e), ["negative_ttl"]);
    let e = c
        .invalidate_tags(pb::InvalidateTagsRequest {
            namespace: "ns".into(),
            tags: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(fields_of(&e), ["tags"]);
    let e = c
        .invalidate_namespace(pb::InvalidateNamespaceRequest::default())
        .await
        .unwrap_err();
    assert_eq!(fields_of(&e), ["namespace"]);
    let e = c
        .watch_invalidations(pb::WatchInvalidationsRequest {
            namespace: "bad ns".into(),
            after_seq: None,
        })
        .await
        .unwrap_err();
    assert_eq!(fields_of(&e), ["namespace"]);
    let warm = c
        .warm(futures::stream::iter(vec![
            set("ok", b"v", None),
            set("", b"v", None),
        ]))
        .await?
        .into_inner();
    assert_eq!((warm.stored, warm.refused), (1, 1), "{:?}", warm.errors);
    Ok(())
}

fn fields_of(e: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    e.get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

fn secs(s: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: s,
        nanos: 0,
    }
}

#[tokio::test]
async fn test_leases_tags_batches_the_invalidation_stream_and_stats_over_the_wire()
-> anyhow::Result<()> {
    use futures::StreamExt;
    use pb::get_or_lease_response::Outcome;
    let redis = RedisServer::start().await?;
    let a = AgentmeshProcess::serve("cache", Some(&redis.url()), None, &[]).await?;
    let b = AgentmeshProcess::serve("cache", Some(&redis.url()), None, &[]).await?;
    let (mut ca, mut cb) = (client(&a).await?, client(&b).await?);
    let mut watch = cb
        .watch_invalidations(pb::WatchInvalidationsRequest {
            namespace: "agents".into(),
            after_seq: None,
        })
        .await?
        .into_inner();
    // A lease on a's side; b's caller waits and gets the fill.
    let lease = |wait| pb::GetOrLeaseRequest {
        namespace: "agents".into(),
        key: "answer".into(),
        lease_ttl: Some(secs(10)),
        wait: Some(secs(wait)),
    };
    let first = ca.get_or_lease(lease(0)).await?.into_inner();
    assert_eq!(first.outcome, Outcome::Lease as i32);
    let token = first.lease.expect("a lease").token;
    let waiter = tokio::spawn(async move { cb.get_or_lease(lease(10)).await });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    ca.fill_lease(pb::FillLeaseRequest {
        namespace: "agents".into(),
        key: "answer".into(),
        token,
        value: b"42".to_vec(),
        tags: vec!["model:small".into()],
        ..pb::FillLeaseRequest::default()
    })
    .await?;
    let waited = waiter.await??.into_inner();
    assert_eq!(waited.outcome, Outcome::Hit as i32);
    assert_eq!(waited.value.expect("the value").value, b"42");
    let e = ca
        .fill_lease(pb::FillLeaseRequest {
            namespace: "agents".into(),
            key: "answer".into(),
            token,
            value: b"again".to_vec(),
            ..pb::FillLeaseRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    // The watcher saw the fill.
    let change = watch.next().await.expect("a change")?;
    assert_eq!(
        (change.kind, change.key.as_str()),
        (pb::invalidation::Kind::Written as i32, "answer")
    );
    // Batches.
    let stored = ca
        .set_many(pb::SetManyRequest {
            items: vec![set("m1", b"1", None), set("m2", b"2", Some(5))],
        })
        .await?
        .into_inner();
    assert_eq!(stored.items[0].version, 1);
    assert_eq!(stored.items[1].code, Code::FailedPrecondition as i32);
    let got = ca
        .get_many(pb::GetManyRequest {
            items: vec![
                get("m1", pb::Consistency::Default),
                get("m2", pb::Consistency::Default),
                get("answer", pb::Consistency::Default),
            ],
        })
        .await?
        .into_inner();
    let found: Vec<bool> = got.items.iter().map(|g| g.found).collect();
    assert_eq!(found, [true, false, true]);
    // Tags.
    let inv = ca
        .invalidate_tags(pb::InvalidateTagsRequest {
            namespace: "agents".into(),
            tags: vec!["model:small".into()],
        })
        .await?
        .into_inner();
    loop {
        let change = watch.next().await.expect("a change")?;
        if change.seq >= inv.seq {
            assert_eq!(change.kind, pb::invalidation::Kind::Tags as i32);
            break;
        }
    }
    let mut cb = client(&b).await?;
    assert!(
        !cb.get(get("answer", pb::Consistency::Default))
            .await?
            .into_inner()
            .found
    );
    let stats = ca
        .stats(pb::StatsRequest {
            namespace: "agents".into(),
        })
        .await?
        .into_inner();
    assert!(stats.feed_synced && stats.l2_shared);
    assert_eq!(stats.namespaces.len(), 1);
    assert_eq!(stats.namespaces[0].leases_granted, 1);
    Ok(())
}

/// The semantic cache across two instances over one Redis, with the real model when
/// `scripts/install-deps.sh` fetched it (else the lexical fallback, said in Stats).
#[tokio::test]
async fn test_semantic_answers_cross_instances_never_partitions_and_bad_input_is_named()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let model = agentmesh_cache::semantic::model_dir_for_tests();
    let dir = model.as_ref().map(|d| d.display().to_string());
    let extra: Vec<&str> = match &dir {
        Some(d) => vec!["--cache-embedder-model", d.as_str()],
        None => vec![],
    };
    let a = AgentmeshProcess::serve("cache", Some(&redis.url()), None, &extra).await?;
    let b = AgentmeshProcess::serve("cache", Some(&redis.url()), None, &extra).await?;
    let (mut ca, mut cb) = (client(&a).await?, client(&b).await?);
    let partition = |model: &str| pb::Partition {
        model: model.into(),
        parameters: "temperature=0".into(),
        system_prompt_hash: "sys1".into(),
    };
    let put = ca
        .semantic_put(pb::SemanticPutRequest {
            namespace: "llm".into(),
            prompt: "What is the capital of France?".into(),
            partition: Some(partition("m1")),
            answer: b"Paris".to_vec(),
            ..pb::SemanticPutRequest::default()
        })
        .await?
        .into_inner();
    assert_eq!(put.version, 1);
    let ask = |prompt: &str, model: &str| pb::SemanticGetRequest {
        namespace: "llm".into(),
        prompt: prompt.into(),
        partition: Some(partition(model)),
        ..pb::SemanticGetRequest::default()
    };
    // NORMALIZED on the other instance at once (one key read in L2).
    let r = cb
        .semantic_get(ask("what is the capital of france", "m1"))
        .await?
        .into_inner();
    assert_eq!(
        (r.found, r.tier),
        (true, pb::SemanticTier::Normalized as i32)
    );
    // Never across partitions.
    let r = cb
        .semantic_get(ask("What is the capital of France?", "m2"))
        .await?
        .into_inner();
    assert!(!r.found);
    let stats = cb.stats(pb::StatsRequest::default()).await?.into_inner();
    if model.is_some() {
        assert_eq!(stats.embedder, "all-MiniLM-L6-v2");
        // A paraphrase, on the other instance once its index has the entry.
        let mut found = None;
        for _ in 0..100 {
            let r = cb
                .semantic_get(ask("Which city is the capital of France?", "m1"))
                .await?
                .into_inner();
            if r.found {
                found = Some(r);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let r = found.expect("a semantic hit on b");
        assert_eq!(r.tier, pb::SemanticTier::Semantic as i32);
        assert!(r.similarity >= 0.85, "{}", r.similarity);
        assert_eq!(r.answer, b"Paris");
    } else {
        eprintln!("no model installed: the paraphrase part is skipped");
        assert_eq!(stats.embedder, "lexical-v1");
        assert!(!stats.embedder_fallback_reason.is_empty());
    }
    let e = ca
        .semantic_get(pb::SemanticGetRequest {
            namespace: "llm".into(),
            prompt: String::new(),
            embedding: vec![0.0, 0.0],
            threshold: Some(1.5),
            partition: None,
        })
        .await
        .unwrap_err();
    assert_eq!(fields_of(&e), ["prompt", "embedding"]);
    let e = ca
        .semantic_put(pb::SemanticPutRequest {
            namespace: "bad ns".into(),
            prompt: "p".into(),
            partition: Some(pb::Partition {
                model: "m".repeat(300),
                ..pb::Partition::default()
            }),
            ..pb::SemanticPutRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(fields_of(&e), ["namespace", "partition.model"]);
    Ok(())
}
