//! Encryption in transit on a real `agentmesh dev` process: TLS on every gRPC port with mutual
//! TLS required and `--auth required` with certificates as the only credential. A client
//! without a certificate, or with one from an unknown CA, cannot call; a certificate's SPIFFE
//! URI SAN names the caller's roles (an operator may drain, a service may not); the process's
//! own calls between its services go over TLS with its certificate (the scheduler's events
//! reach the bus); plaintext is refused; `meshctl` takes the same TLS options.

use std::time::Duration;

use agentmesh_proto::eventbus::v1 as bus;
use agentmesh_proto::scheduler::v1 as sched;
use agentmesh_tests::agentmesh::{AgentmeshProcess, binary};
use rcgen::{BasicConstraints, CertificateParams, DnType, Ia5String, IsCa, KeyPair, SanType};
use tokio_stream::StreamExt as _;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A CA and the certificates it signs (PEM).
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// A leaf for 127.0.0.1/localhost with `uri` as its URI SAN: (certificate, key) PEM.
    fn leaf(&self, uri: &str) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        params
            .subject_alt_names
            .push(SanType::URI(Ia5String::try_from(uri)?));
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

async fn tls_channel(
    addr: std::net::SocketAddr,
    ca: &str,
    client: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
}

#[tokio::test]
async fn test_mutual_tls_encrypts_every_port_and_certificates_name_the_caller() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let ca = Ca::new("agentmesh test CA")?;
    let rogue = Ca::new("someone else's CA")?;
    let write = |name: &str, text: &str| -> anyhow::Result<String> {
        let path = dir.path().join(name);
        std::fs::write(&path, text)?;
        Ok(path.to_string_lossy().into_owned())
    };
    let ca_file = write("ca.pem", &ca.cert.pem())?;
    // The process's own certificate: it serves with it and presents it to its peers.
    let (server_cert, server_key) = ca.leaf("spiffe://agentmesh/service+operator/mesh")?;
    let (cert_file, key_file) = (
        write("mesh.pem", &server_cert)?,
        write("mesh.key", &server_key)?,
    );
    let dev = AgentmeshProcess::dev_with_env(&[
        ("AGENTMESH_AUTH", "required"),
        ("AGENTMESH_TLS_CERT_FILE", &cert_file),
        ("AGENTMESH_TLS_KEY_FILE", &key_file),
        ("AGENTMESH_TLS_CA_FILE", &ca_file),
        ("AGENTMESH_TLS_CLIENT_AUTH", "required"),
        // Certificates are the only credential: Prometheus scrapes without a token.
        ("AGENTMESH_AUTH_METRICS", "open"),
    ])
    .await?;
    let ca_pem = ca.cert.pem();
    let scheduler_addr = dev.addrs["scheduler"].0;

    // Plaintext is refused.
    let plain =
        sched::scheduler_client::SchedulerClient::connect(format!("http://{scheduler_addr}")).await;
    if let Ok(mut plain) = plain {
        assert!(
            plain
                .get_pool_stats(sched::GetPoolStatsRequest::default())
                .await
                .is_err()
        );
    }
    // Without a client certificate, or with one of an unknown CA, no call gets through.
    for client in [
        None,
        Some(rogue.leaf("spiffe://agentmesh/operator/mallory")?),
    ] {
        let unknown = client.is_some();
        let result = match tls_channel(scheduler_addr, &ca_pem, client.as_ref()).await {
            Err(_) => None,
            Ok(channel) => Some(
                sched::scheduler_client::SchedulerClient::new(channel)
                    .get_pool_stats(sched::GetPoolStatsRequest::default())
                    .await,
            ),
        };
        assert!(
            !matches!(result, Some(Ok(_))),
            "a call got through (unknown CA: {unknown})"
        );
    }

    // The certificate's URI SAN is the caller: an operator may drain, a service may not.
    let operator = ca.leaf("spiffe://agentmesh/operator/alice")?;
    let service = ca.leaf("spiffe://agentmesh/service/orders")?;
    let mut as_operator = sched::scheduler_client::SchedulerClient::new(
        tls_channel(scheduler_addr, &ca_pem, Some(&operator)).await?,
    );
    let mut as_service = sched::scheduler_client::SchedulerClient::new(
        tls_channel(scheduler_addr, &ca_pem, Some(&service)).await?,
    );
    let drain = || sched::DrainAgentRequest {
        agent_id: "nobody".into(),
        ..sched::DrainAgentRequest::default()
    };
    let e = as_service.drain_agent(drain()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = as_operator.drain_agent(drain()).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::NotFound,
        "the operator got past auth: {e:?}"
    );

    // The process's own calls go over TLS with its certificate: a submitted task's event is
    // published by the scheduler to the bus and reaches an operator's subscription.
    let mut events = bus::event_bus_client::EventBusClient::new(
        tls_channel(dev.addrs["eventbus"].0, &ca_pem, Some(&operator)).await?,
    );
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(bus::SubscribeRequest {
        kind: Some(bus::subscribe_request::Kind::Open(bus::SubscribeOpen {
            subject: "sys.scheduler.task.>".into(),
            ack_policy: bus::AckPolicy::None as i32,
            max_in_flight: 100,
            ..bus::SubscribeOpen::default()
        })),
    })
    .await?;
    let mut stream = events
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let _subscribed = stream.next().await;
    as_service
        .submit_task(sched::SubmitTaskRequest {
            r#type: "tls-test".into(),
            ..sched::SubmitTaskRequest::default()
        })
        .await?;
    let event = agentmesh_tests::bus::first_event(&mut stream, Duration::from_secs(10))
        .await?
        .expect("the scheduler's event over TLS");
    assert!(event.subject.starts_with("sys.scheduler.task."));
    drop(tx);

    // The admin ports speak TLS too, and the health aggregator scrapes every one over it.
    let curl = |url: String| {
        std::process::Command::new("curl")
            .args(["-s", "--max-time", "5", "--cacert", &ca_file, &url])
            .output()
    };
    let admin = dev.addrs["ratelimit"].1;
    let out = curl(format!("https://localhost:{}/livez", admin.port()))?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
    let out = curl(format!("http://{admin}/livez"))?;
    assert_ne!(
        String::from_utf8_lossy(&out.stdout),
        "ok\n",
        "plaintext admin"
    );
    let health_admin = dev.addrs["health"].1;
    // Every instance scraped (its version counted), none unreachable.
    let scraped_all = |body: &serde_json::Value| {
        let versions: u64 = body["versions"]
            .as_object()
            .map(|v| v.values().filter_map(serde_json::Value::as_u64).sum())
            .unwrap_or(0);
        versions == 5
            && body["unreachable"]
                .as_object()
                .is_some_and(|u| u.is_empty())
    };
    let mut scraped = serde_json::Value::Null;
    for _ in 0..50 {
        let out = curl(format!(
            "https://localhost:{}/optimizations",
            health_admin.port()
        ))?;
        scraped = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if scraped_all(&scraped) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        scraped_all(&scraped),
        "the aggregator cannot scrape over TLS: {scraped}"
    );

    // meshctl takes the same options (and the probe, for container health checks).
    let (op_cert, op_key) = (
        write("alice.pem", &operator.0)?,
        write("alice.key", &operator.1)?,
    );
    let out = std::process::Command::new(binary("meshctl")?)
        .args(["agents", "stats", "--addr", &scheduler_addr.to_string()])
        .args(["--tls-ca-file", &ca_file, "--tls-cert-file", &op_cert])
        .args(["--tls-key-file", &op_key])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(binary("agentmesh")?)
        .args(["probe", &scheduler_addr.to_string()])
        .args(["--tls-ca-file", &ca_file, "--tls-cert-file", &op_cert])
        .args(["--tls-key-file", &op_key])
        .output()?;
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A child process killed (and reaped) on drop.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_port(port: u16) -> anyhow::Result<()> {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("nothing listens on 127.0.0.1:{port}")
}

#[tokio::test]
async fn test_redis_and_etcd_are_reached_over_tls() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new("agentmesh test CA")?;
    let write = |name: &str, text: &str| -> anyhow::Result<String> {
        let path = dir.path().join(name);
        std::fs::write(&path, text)?;
        Ok(path.to_string_lossy().into_owned())
    };
    let ca_file = write("ca.pem", &ca.cert.pem())?;
    let (server_cert, server_key) = ca.leaf("spiffe://agentmesh/service/datastore")?;
    let (cert_file, key_file) = (
        write("server.pem", &server_cert)?,
        write("server.key", &server_key)?,
    );
    let (client_cert, client_key) = ca.leaf("spiffe://agentmesh/service+operator/mesh")?;
    let (client_cert_file, client_key_file) = (
        write("client.pem", &client_cert)?,
        write("client.key", &client_key)?,
    );

    // Redis with TLS only (no plaintext port).
    let [redis_port, etcd_port, etcd_peer] = agentmesh_tests::free_ports();
    let _redis = Killed(
        std::process::Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &redis_port.to_string()])
            .args(["--tls-cert-file", &cert_file, "--tls-key-file", &key_file])
            .args(["--tls-ca-cert-file", &ca_file, "--tls-auth-clients", "no"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()?,
    );
    // etcd with TLS and client-certificate authentication.
    let etcd_url = format!("https://127.0.0.1:{etcd_port}");
    let _etcd = Killed(
        std::process::Command::new("etcd")
            .arg("--data-dir")
            .arg(dir.path().join("etcd"))
            .args([
                "--listen-client-urls",
                &etcd_url,
                "--advertise-client-urls",
                &etcd_url,
            ])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{etcd_peer}"),
            ])
            .args(["--cert-file", &cert_file, "--key-file", &key_file])
            .args(["--client-cert-auth", "--trusted-ca-file", &ca_file])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?,
    );
    wait_port(redis_port).await?;
    wait_port(etcd_port).await?;

    let redis_url = format!("rediss://127.0.0.1:{redis_port}");
    let dev = AgentmeshProcess::dev_with_env(&[
        ("AGENTMESH_REDIS_URL", &redis_url),
        ("SSL_CERT_FILE", &ca_file),
        ("AGENTMESH_ETCD_ENDPOINTS", &etcd_url),
        ("AGENTMESH_ETCD_CA_FILE", &ca_file),
        ("AGENTMESH_ETCD_CERT_FILE", &client_cert_file),
        ("AGENTMESH_ETCD_KEY_FILE", &client_key_file),
    ])
    .await?;

    // The cache's shared tier is Redis over TLS: a value set lands there.
    use agentmesh_proto::cache::v1 as cache;
    let mut client = cache::cache_coordinator_client::CacheCoordinatorClient::connect(format!(
        "http://{}",
        dev.addrs["cache"].0
    ))
    .await?;
    client
        .set(cache::SetRequest {
            namespace: "tls".into(),
            key: "k".into(),
            value: b"over tls".to_vec(),
            ..cache::SetRequest::default()
        })
        .await?;
    let keys = std::process::Command::new("redis-cli")
        .args(["--tls", "--cacert", &ca_file, "-p", &redis_port.to_string()])
        .args(["--scan", "--pattern", "*tls*"])
        .output()?;
    assert!(
        !String::from_utf8_lossy(&keys.stdout).trim().is_empty(),
        "no cache key in Redis: {}",
        String::from_utf8_lossy(&keys.stderr)
    );

    // Membership is in etcd over TLS with a client certificate: meshctl reads it the same way.
    let out = std::process::Command::new(binary("meshctl")?)
        .args(["members", "--etcd", &etcd_url, "--etcd-ca-file", &ca_file])
        .args(["--etcd-cert-file", &client_cert_file])
        .args(["--etcd-key-file", &client_key_file])
        .output()?;
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for service in ["ratelimit", "eventbus", "scheduler", "cache", "health"] {
        assert!(listed.contains(service), "{service} not in {listed}");
    }
    // Without the client certificate etcd refuses the connection.
    let out = std::process::Command::new(binary("meshctl")?)
        .args(["members", "--etcd", &etcd_url, "--etcd-ca-file", &ca_file])
        .output()?;
    assert!(
        !out.status.success(),
        "etcd took a client without a certificate"
    );
    Ok(())
}
