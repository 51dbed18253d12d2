//! etcd membership: one lease per registered instance, kept alive by a background task, and
//! watches that take a snapshot, watch from the next revision and re-list after any failure.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, KeyValue, LeaseKeepAliveStream, LeaseKeeper,
    PutOptions, WatchOptions, WatchStream,
};
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::{broadcast, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};
use xxhash_rust::xxh3::xxh3_64;

use crate::backoff::Backoff;
use crate::member::{diff, members_prefix, service_prefix, validate_name};
use crate::registration::RegistrationHandle;
use crate::watch::{AbortOnDrop, EVENT_BUFFER, StampedEvent};
use crate::{
    Member, MemberSnapshot, MemberWatch, Membership, MembershipError, MembershipEvent,
    Registration, member_key,
};

/// HTTP/2 ping interval on the etcd connection while a stream (watch, keep-alive) is open.
/// etcd refuses pings more often than every 5 s (`--grpc-keepalive-min-time`).
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Leases that may still hold the key, kept for `deregister`; older ones simply expire.
const MAX_OWNED_LEASES: usize = 16;
/// A watch that stayed up this long counts as healthy: its failure retries without delay growth.
const HEALTHY_WATCH: Duration = Duration::from_secs(10);

/// How to reach etcd and how to register there.
#[derive(Clone, Debug)]
pub struct EtcdMembershipConfig {
    /// etcd client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix; members live under `<prefix>/members/`. Default `/agentmesh`.
    pub prefix: String,
    /// Lease TTL of a registration (etcd rounds up to whole seconds, at least about 2 s).
    /// Keep-alives are sent every TTL/3. Default 10 s.
    pub lease_ttl: Duration,
    /// Time limit for connecting and for every single etcd call. Default 3 s.
    pub connect_timeout: Duration,
    /// TLS to etcd (`https://` endpoints): the CA and, for client-certificate auth, this
    /// process's certificate. `None`: plaintext.
    pub tls: Option<etcd_client::TlsOptions>,
}

impl Default for EtcdMembershipConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".to_owned()],
            prefix: "/agentmesh".to_owned(),
            lease_ttl: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            tls: None,
        }
    }
}

impl EtcdMembershipConfig {
    fn validate(&self) -> Result<(), MembershipError> {
        let invalid = |msg: &str| Err(MembershipError::InvalidConfig(msg.to_owned()));
        if self.endpoints.is_empty() || self.endpoints.iter().any(|e| e.trim().is_empty()) {
            return invalid("etcd endpoints must be a non-empty list of URLs");
        }
        if !self.prefix.starts_with('/') {
            return invalid("etcd prefix must start with '/', e.g. /agentmesh");
        }
        if self.lease_ttl < Duration::from_secs(1) {
            return invalid("lease TTL must be at least 1s");
        }
        if self.connect_timeout.is_zero() {
            return invalid("etcd connect timeout must be positive");
        }
        Ok(())
    }
}

/// Membership stored in etcd. Clones share the connection.
#[derive(Clone)]
pub struct EtcdMembership {
    client: Client,
    prefix: String,
    lease_ttl_secs: i64,
    timeout: Duration,
}

impl fmt::Debug for EtcdMembership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdMembership")
            .field("prefix", &self.prefix)
            .field("lease_ttl_secs", &self.lease_ttl_secs)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl EtcdMembership {
    /// Connects and checks that etcd answers (within `connect_timeout`), so a missing etcd is
    /// reported at start-up as [`MembershipError::Unavailable`].
    pub async fn connect(config: EtcdMembershipConfig) -> Result<Self, MembershipError> {
        config.validate()?;
        let timeout = config.connect_timeout;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_keep_alive(HTTP2_KEEPALIVE_INTERVAL, timeout)
            // etcd answers idle pings with GOAWAY "too_many_pings".
            .with_keep_alive_while_idle(false);
        if let Some(tls) = config.tls.clone() {
            options = options.with_tls(tls);
        }
        let client = call(
            timeout,
            "connect",
            Client::connect(&config.endpoints, Some(options)),
        )
        .await?;
        let ttl_secs = config.lease_ttl.as_secs() + u64::from(config.lease_ttl.subsec_nanos() > 0);
        let membership = Self {
            client,
            prefix: config.prefix.trim_end_matches('/').to_owned(),
            lease_ttl_secs: i64::try_from(ttl_secs).unwrap_or(i64::MAX),
            timeout,
        };
        let probe = GetOptions::new().with_prefix().with_count_only();
        call(
            timeout,
            "get",
            membership
                .client
                .kv_client()
                .get(members_prefix(&membership.prefix), Some(probe)),
        )
        .await?;
        info!(endpoints = ?config.endpoints, prefix = %membership.prefix, "connected to etcd");
        Ok(membership)
    }

    /// The underlying client, to share the connection (policies, elections).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The key prefix, without a trailing `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

#[async_trait::async_trait]
impl Membership for EtcdMembership {
    async fn register(&self, member: Member) -> Result<Registration, MembershipError> {
        member.validate()?;
        let keeper = Keeper {
            client: self.client.clone(),
            key: member_key(&self.prefix, &member.service, &member.instance_id),
            value: serde_json::to_string(&member)?,
            ttl_secs: self.lease_ttl_secs,
            timeout: self.timeout,
            service: member.service.clone(),
            instance: member.instance_id.clone(),
            registered: Arc::new(AtomicBool::new(false)),
            owned_leases: Arc::new(Mutex::new(Vec::new())),
        };
        let lease = keeper.register_once().await?;
        keeper.registered.store(true, Ordering::Release);
        info!(
            service = %member.service,
            instance = %member.instance_id,
            lease_id = lease.id,
            ttl_s = lease.ttl.as_secs(),
            "registered in etcd"
        );
        let registered = Arc::clone(&keeper.registered);
        let handle = EtcdRegistration {
            client: self.client.clone(),
            timeout: self.timeout,
            service: member.service.clone(),
            instance: member.instance_id.clone(),
            owned_leases: Arc::clone(&keeper.owned_leases),
            task: AbortOnDrop(tokio::spawn(keeper.run(lease))),
        };
        Ok(Registration::new(member, registered, Box::new(handle)))
    }

    async fn list(&self, service: &str) -> Result<MemberSnapshot, MembershipError> {
        validate_name("service", service)?;
        let listing = fetch_service(&self.client, &self.prefix, service, self.timeout).await?;
        Ok(MemberSnapshot {
            service: service.to_owned(),
            members: listing.members,
            epoch: listing.revision.unsigned_abs(),
        })
    }

    async fn list_all(&self) -> Result<Vec<Member>, MembershipError> {
        let key = members_prefix(&self.prefix);
        let options = GetOptions::new().with_prefix();
        let response = call(
            self.timeout,
            "get",
            self.client.kv_client().get(key.as_str(), Some(options)),
        )
        .await?;
        let mut all: Vec<Member> = response
            .kvs()
            .iter()
            .filter_map(|kv| {
                let rest = kv.key_str().ok()?.strip_prefix(&key)?;
                let (service, _) = rest.split_once('/')?;
                decode_member(kv, &service_prefix(&self.prefix, service), service)
            })
            .map(|(_, member)| member)
            .collect();
        all.sort_by(|a, b| (&a.service, &a.instance_id).cmp(&(&b.service, &b.instance_id)));
        Ok(all)
    }

    async fn watch(&self, service: &str) -> Result<MemberWatch, MembershipError> {
        validate_name("service", service)?;
        let listing = fetch_service(&self.client, &self.prefix, service, self.timeout).await?;
        let epoch = listing.revision.unsigned_abs();
        let snapshot = MemberSnapshot {
            service: service.to_owned(),
            members: listing.members.clone(),
            epoch,
        };
        let (snapshot_tx, snapshots_rx) = watch::channel(Arc::new(snapshot));
        let (events_tx, events_rx) = broadcast::channel(EVENT_BUFFER);
        let task = WatchTask {
            client: self.client.clone(),
            prefix: self.prefix.clone(),
            service: service.to_owned(),
            key_prefix: service_prefix(&self.prefix, service),
            timeout: self.timeout,
            members: listing.members,
            revision: listing.revision,
            cluster_id: listing.cluster_id,
            epoch,
            epoch_offset: 0,
            snapshot_tx,
            events_tx,
        };
        let handle = AbortOnDrop(tokio::spawn(task.run()));
        Ok(MemberWatch::new(
            service.to_owned(),
            events_rx,
            snapshots_rx,
            Some(handle),
        ))
    }
}

/// Runs one etcd call under a time limit, so nothing hangs while etcd is down.
async fn call<T>(
    timeout: Duration,
    what: &str,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, MembershipError> {
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(match MembershipError::from(e) {
            MembershipError::Unavailable(msg) => {
                MembershipError::Unavailable(format!("{what}: {msg}"))
            }
            other => other,
        }),
        Err(_) => Err(MembershipError::Unavailable(format!(
            "etcd {what} timed out after {timeout:?}"
        ))),
    }
}

/// One service's members as read from etcd.
struct Listing {
    members: BTreeMap<String, Member>,
    revision: i64,
    cluster_id: u64,
}

async fn fetch_service(
    client: &Client,
    prefix: &str,
    service: &str,
    timeout: Duration,
) -> Result<Listing, MembershipError> {
    let key_prefix = service_prefix(prefix, service);
    let options = GetOptions::new().with_prefix();
    let response = call(
        timeout,
        "get",
        client.kv_client().get(key_prefix.as_str(), Some(options)),
    )
    .await?;
    let header = response.header();
    Ok(Listing {
        members: response
            .kvs()
            .iter()
            .filter_map(|kv| decode_member(kv, &key_prefix, service))
            .collect(),
        revision: header.map_or(0, |h| h.revision()),
        cluster_id: header.map_or(0, |h| h.cluster_id()),
    })
}

/// Decodes a member key/value under `key_prefix` (`…/members/<service>/`): the instance id and
/// the member. Foreign or malformed entries are skipped with a warning: one bad key must not
/// break every reader.
fn decode_member(kv: &KeyValue, key_prefix: &str, service: &str) -> Option<(String, Member)> {
    let key = String::from_utf8_lossy(kv.key());
    let instance_id = key.strip_prefix(key_prefix)?;
    if instance_id.is_empty() || instance_id.contains('/') {
        return None;
    }
    match serde_json::from_slice::<Member>(kv.value()) {
        Ok(member) if member.service == service && member.instance_id == instance_id => {
            Some((instance_id.to_owned(), member))
        }
        Ok(member) => {
            warn!(
                key = %key,
                service = %member.service,
                instance = %member.instance_id,
                "membership entry does not match its key; ignored"
            );
            None
        }
        Err(e) => {
            warn!(key = %key, error = %e, "membership entry is not a valid member; ignored");
            None
        }
    }
}

/// A lease as granted by etcd.
#[derive(Clone, Copy, Debug)]
struct Lease {
    id: i64,
    ttl: Duration,
    /// Taken before the grant request: a conservative start of the TTL.
    granted_at: Instant,
}

/// Why the keep-alive gave up on a lease.
enum LeaseLoss {
    /// etcd answered that the lease does not exist (expired, revoked, or etcd wiped).
    NotFound,
    /// No successful keep-alive for longer than the TTL (etcd down or partitioned): the lease
    /// must be considered expired.
    Silent(Duration),
    /// The lease is alive but the key is gone or on another lease (deleted by hand, or taken
    /// over and then released by a duplicate instance id).
    KeyGone,
}

impl fmt::Display for LeaseLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFound => f.write_str("lease not found"),
            Self::Silent(d) => write!(f, "no successful keep-alive for {}ms", d.as_millis()),
            Self::KeyGone => f.write_str("member key missing or attached to another lease"),
        }
    }
}

/// Keeps one registration alive: keep-alive every TTL/3, re-registration under a new lease when
/// the lease is lost.
struct Keeper {
    client: Client,
    key: String,
    value: String,
    ttl_secs: i64,
    timeout: Duration,
    service: String,
    instance: String,
    registered: Arc<AtomicBool>,
    /// Leases that may hold the key; `deregister` revokes them all.
    owned_leases: Arc<Mutex<Vec<i64>>>,
}

impl Keeper {
    async fn run(self, mut lease: Lease) {
        loop {
            let loss = self.keep_alive(lease).await;
            self.registered.store(false, Ordering::Release);
            warn!(
                service = %self.service,
                instance = %self.instance,
                lease_id = lease.id,
                reason = %loss,
                "membership lease lost; re-registering with a new lease"
            );
            let old = lease.id;
            lease = self.reregister().await;
            self.registered.store(true, Ordering::Release);
            info!(
                service = %self.service,
                instance = %self.instance,
                lease_id = lease.id,
                old_lease_id = old,
                "re-registered in etcd with a new lease"
            );
            // The key moved to the new lease; the old one (if etcd still has it) holds nothing.
            self.revoke_quietly(old).await;
        }
    }

    /// Grants a lease and puts the key under it.
    async fn register_once(&self) -> Result<Lease, MembershipError> {
        let granted_at = Instant::now();
        let grant = call(
            self.timeout,
            "lease grant",
            self.client.lease_client().grant(self.ttl_secs, None),
        )
        .await?;
        let id = grant.id();
        {
            let mut owned = self.owned_leases.lock();
            if owned.len() >= MAX_OWNED_LEASES {
                owned.remove(0);
            }
            owned.push(id);
        }
        let ttl = Duration::from_secs(u64::try_from(grant.ttl()).unwrap_or(0).max(1));
        let options = PutOptions::new().with_lease(id);
        let mut kv = self.client.kv_client();
        let put = kv.put(self.key.as_str(), self.value.as_str(), Some(options));
        match call(self.timeout, "put", put).await {
            Ok(_) => {
                *self.owned_leases.lock() = vec![id];
                Ok(Lease {
                    id,
                    ttl,
                    granted_at,
                })
            }
            Err(e) => {
                // The put may have landed before the timeout: revoking removes the key then.
                self.revoke_quietly(id).await;
                Err(e)
            }
        }
    }

    /// Retries `register_once` with bounded back-off until etcd accepts it.
    async fn reregister(&self) -> Lease {
        let mut backoff = Backoff::new(xxh3_64(self.key.as_bytes()));
        loop {
            match self.register_once().await {
                Ok(lease) => return lease,
                Err(e) => {
                    let delay = backoff.next_delay();
                    warn!(
                        service = %self.service,
                        instance = %self.instance,
                        error = %e,
                        retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        "re-registration failed; retrying"
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Keeps `lease` alive until it is lost. Never returns while the lease is healthy. Once per
    /// TTL it also checks that the key is still there under this lease.
    async fn keep_alive(&self, lease: Lease) -> LeaseLoss {
        let interval = (lease.ttl / 3).max(Duration::from_millis(100));
        let step_timeout = self.timeout.min(interval);
        let mut last_ok = lease.granted_at;
        let mut stream: Option<(LeaseKeeper, LeaseKeepAliveStream)> = None;
        let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut alive_ticks: u64 = 0;
        loop {
            ticker.tick().await;
            match tokio::time::timeout(step_timeout, self.ping(&mut stream, lease.id)).await {
                Ok(Ok(true)) => {
                    last_ok = Instant::now();
                    alive_ticks += 1;
                    if alive_ticks.is_multiple_of(3)
                        && !self.key_on_lease(lease.id, step_timeout).await
                    {
                        return LeaseLoss::KeyGone;
                    }
                }
                Ok(Ok(false)) => return LeaseLoss::NotFound,
                Ok(Err(e)) => {
                    stream = None;
                    warn!(
                        service = %self.service,
                        instance = %self.instance,
                        lease_id = lease.id,
                        error = %e,
                        "lease keep-alive failed"
                    );
                }
                Err(_) => {
                    stream = None;
                    warn!(
                        service = %self.service,
                        instance = %self.instance,
                        lease_id = lease.id,
                        timeout_ms = u64::try_from(step_timeout.as_millis()).unwrap_or(u64::MAX),
                        "lease keep-alive timed out"
                    );
                }
            }
            let silent = last_ok.elapsed();
            if silent > lease.ttl {
                return LeaseLoss::Silent(silent);
            }
        }
    }

    /// One keep-alive round trip: `Ok(true)` alive, `Ok(false)` the lease is gone.
    async fn ping(
        &self,
        stream: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
        lease_id: i64,
    ) -> Result<bool, etcd_client::Error> {
        if let Some((keeper, responses)) = stream.as_mut() {
            keeper.keep_alive().await?;
            return match responses.message().await? {
                Some(response) => Ok(response.ttl() > 0),
                None => Err(etcd_client::Error::LeaseKeepAliveError(
                    "keep-alive stream closed".to_owned(),
                )),
            };
        }
        // Opening the stream sends the first keep-alive and checks its answer.
        match self.client.lease_client().keep_alive(lease_id).await {
            Ok(opened) => {
                *stream = Some(opened);
                Ok(true)
            }
            Err(etcd_client::Error::LeaseKeepAliveError(msg)) if msg.contains("not found") => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// False only when etcd answers that the key is missing or on another lease.
    async fn key_on_lease(&self, lease_id: i64, timeout: Duration) -> bool {
        let mut kv = self.client.kv_client();
        match call(timeout, "get", kv.get(self.key.as_str(), None)).await {
            Ok(response) => response
                .kvs()
                .first()
                .is_some_and(|kv| kv.lease() == lease_id),
            Err(e) => {
                debug!(instance = %self.instance, error = %e, "member key check failed");
                true
            }
        }
    }

    async fn revoke_quietly(&self, lease_id: i64) {
        if revoke(&self.client, self.timeout, lease_id).await.is_ok() {
            self.owned_leases.lock().retain(|id| *id != lease_id);
        }
    }
}

/// Revokes a lease; a lease that no longer exists counts as revoked.
async fn revoke(client: &Client, timeout: Duration, lease_id: i64) -> Result<(), MembershipError> {
    match tokio::time::timeout(timeout, client.lease_client().revoke(lease_id)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(etcd_client::Error::GRpcStatus(status)))
            if status.message().contains("not found") =>
        {
            debug!(lease_id, "lease already gone");
            Ok(())
        }
        Ok(Err(e)) => Err(MembershipError::Unavailable(format!(
            "lease revoke: etcd: {e}"
        ))),
        Err(_) => Err(MembershipError::Unavailable(format!(
            "etcd lease revoke timed out after {timeout:?}"
        ))),
    }
}

/// The etcd side of a [`Registration`]: dropping it stops the keep-alive task.
struct EtcdRegistration {
    client: Client,
    timeout: Duration,
    service: String,
    instance: String,
    owned_leases: Arc<Mutex<Vec<i64>>>,
    task: AbortOnDrop,
}

impl RegistrationHandle for EtcdRegistration {
    fn deregister(self: Box<Self>) -> BoxFuture<'static, Result<(), MembershipError>> {
        Box::pin(async move {
            let Self {
                client,
                timeout,
                service,
                instance,
                owned_leases,
                mut task,
            } = *self;
            // Wait for the task to stop so it cannot grant a new lease after the revoke.
            task.0.abort();
            let _ = (&mut task.0).await;
            let leases = std::mem::take(&mut *owned_leases.lock());
            let mut result = Ok(());
            for lease_id in leases {
                if let Err(e) = revoke(&client, timeout, lease_id).await {
                    warn!(
                        service = %service,
                        instance = %instance,
                        lease_id,
                        error = %e,
                        "lease revoke failed; the key expires by TTL"
                    );
                    result = Err(e);
                }
            }
            if result.is_ok() {
                info!(service = %service, instance = %instance, "deregistered from etcd");
            }
            result
        })
    }
}

/// Maintains one service's snapshot from etcd and broadcasts the changes.
struct WatchTask {
    client: Client,
    prefix: String,
    service: String,
    key_prefix: String,
    timeout: Duration,
    members: BTreeMap<String, Member>,
    /// etcd revision the snapshot reflects; the watch resumes after it.
    revision: i64,
    cluster_id: u64,
    epoch: u64,
    /// `epoch = revision + epoch_offset`; grows when etcd's history restarts (wiped etcd).
    epoch_offset: u64,
    snapshot_tx: watch::Sender<Arc<MemberSnapshot>>,
    events_tx: broadcast::Sender<StampedEvent>,
}

impl WatchTask {
    async fn run(mut self) {
        let mut backoff = Backoff::new(xxh3_64(self.key_prefix.as_bytes()));
        let mut relist = false;
        loop {
            if relist {
                match fetch_service(&self.client, &self.prefix, &self.service, self.timeout).await {
                    Ok(listing) => self.apply_listing(listing),
                    Err(e) => {
                        let delay = backoff.next_delay();
                        warn!(
                            service = %self.service,
                            error = %e,
                            retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                            "membership re-list failed; retrying"
                        );
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                }
            }
            // Whatever ends the watch below, the next one starts from a fresh listing.
            relist = true;
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(self.revision + 1);
            let mut watch_client = self.client.watch_client();
            let opened = call(
                self.timeout,
                "watch",
                watch_client.watch(self.key_prefix.as_str(), Some(options)),
            )
            .await;
            let reason = match opened {
                Ok(stream) => {
                    let started = Instant::now();
                    let reason = self.follow(stream).await;
                    if started.elapsed() > HEALTHY_WATCH {
                        backoff.reset();
                    }
                    reason
                }
                Err(e) => e.to_string(),
            };
            let delay = backoff.next_delay();
            warn!(
                service = %self.service,
                reason = %reason,
                revision = self.revision,
                retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "membership watch interrupted; re-listing"
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// Applies watch responses until the watch ends; returns why it ended.
    async fn follow(&mut self, mut stream: WatchStream) -> String {
        loop {
            match stream.message().await {
                Ok(Some(response)) => {
                    if response.canceled() {
                        if response.compact_revision() > 0 {
                            return format!(
                                "revision {} compacted (oldest kept {})",
                                self.revision + 1,
                                response.compact_revision()
                            );
                        }
                        return format!("watch canceled by etcd: {}", response.cancel_reason());
                    }
                    if !response.events().is_empty() {
                        self.apply_events(response.events());
                    }
                }
                Ok(None) => return "watch stream closed".to_owned(),
                Err(e) => return e.to_string(),
            }
        }
    }

    fn epoch_of(&self, revision: i64) -> u64 {
        revision.unsigned_abs() + self.epoch_offset
    }

    fn apply_events(&mut self, events: &[etcd_client::Event]) {
        let mut stamped = Vec::new();
        for event in events {
            let Some(kv) = event.kv() else {
                continue;
            };
            self.revision = self.revision.max(kv.mod_revision());
            let epoch = self.epoch_of(kv.mod_revision());
            let key = String::from_utf8_lossy(kv.key());
            let Some(instance_id) = key.strip_prefix(&self.key_prefix) else {
                continue;
            };
            if instance_id.is_empty() || instance_id.contains('/') {
                continue;
            }
            let change = match event.event_type() {
                EventType::Put => match decode_member(kv, &self.key_prefix, &self.service) {
                    Some((id, member)) => match self.members.insert(id, member.clone()) {
                        None => Some(MembershipEvent::Joined(member)),
                        Some(old) if old != member => Some(MembershipEvent::Updated(member)),
                        Some(_) => None,
                    },
                    // A malformed value replaced the entry: it no longer names a member.
                    None => self.members.remove(instance_id).map(MembershipEvent::Left),
                },
                EventType::Delete => self.members.remove(instance_id).map(MembershipEvent::Left),
            };
            if let Some(event) = change {
                stamped.push(StampedEvent { epoch, event });
            }
        }
        let epoch = self.epoch_of(self.revision).max(self.epoch);
        self.publish(epoch, stamped);
    }

    fn apply_listing(&mut self, listing: Listing) {
        let history_reset = listing.cluster_id != self.cluster_id
            || listing.revision < self.revision
            || (listing.revision == self.revision && listing.members != self.members);
        if history_reset {
            warn!(
                service = %self.service,
                old_revision = self.revision,
                new_revision = listing.revision,
                "etcd history restarted (new cluster or wiped data); epochs continue from the last one"
            );
            self.epoch_offset = (self.epoch + 1).saturating_sub(listing.revision.unsigned_abs());
        }
        self.revision = listing.revision;
        self.cluster_id = listing.cluster_id;
        let epoch = self.epoch_of(listing.revision).max(self.epoch);
        let events = diff(&self.members, &listing.members);
        self.members = listing.members;
        if !events.is_empty() {
            info!(service = %self.service, changes = events.len(), "membership re-list found changes");
        }
        let stamped = events
            .into_iter()
            .map(|event| StampedEvent { epoch, event })
            .collect();
        self.publish(epoch, stamped);
    }

    /// Publishes the snapshot first, then the events, so `current()` always includes any event
    /// a consumer receives.
    fn publish(&mut self, epoch: u64, events: Vec<StampedEvent>) {
        if epoch == self.epoch && events.is_empty() {
            return;
        }
        self.epoch = epoch;
        let snapshot = MemberSnapshot {
            service: self.service.clone(),
            members: self.members.clone(),
            epoch,
        };
        self.snapshot_tx.send_replace(Arc::new(snapshot));
        for event in events {
            debug!(service = %self.service, epoch = event.epoch, event = ?event.event, "membership change");
            // No receiver is fine: the consumer only reads snapshots.
            let _ = self.events_tx.send(event);
        }
    }
}
