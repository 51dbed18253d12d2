//! Assembles the event bus for the host: its settings (flags with environment fallbacks), the
//! durable log (Redis Streams when Redis is configured, in memory otherwise), metrics and the
//! gRPC routes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agentmesh_proto::eventbus::v1::event_bus_server::SERVICE_NAME;
use agentmesh_runtime::config::{parse_duration, parse_socket_addr};
use agentmesh_runtime::server::{ServiceSpec, new_instance_id};
use agentmesh_runtime::service::{BuildError, HostDeps, Service};
use futures::future::BoxFuture;
use tonic::service::Routes;

use crate::bus::{Bus, BusConfig};
use crate::error::EventBusError;
use crate::grpc::EventBusGrpc;
use crate::log::{EventLog, InMemoryLog, TrimPolicy};
use crate::peers::Peers;
use crate::priority::FairnessConfig;
use crate::redis_backplane::RedisBackplane;
use crate::redis_log::RedisLog;
use crate::subject::SubjectFilter;

/// Short service name in membership.
pub const NAME: &str = "eventbus";
/// Prefix of the event bus's Redis keys and channels.
pub const REDIS_PREFIX: &str = "agentmesh:eventbus";

/// Event bus settings.
#[derive(Clone, Debug, clap::Args)]
pub struct EventBusArgs {
    /// gRPC listen address of the event bus.
    #[arg(id = "eventbus_listen", long = "eventbus-listen", env = "AGENTMESH_EVENTBUS_LISTEN", default_value = "0.0.0.0:7101", value_parser = parse_socket_addr)]
    pub listen: SocketAddr,
    /// Admin HTTP listen address of the event bus (`/metrics`, `/livez`, `/readyz`).
    #[arg(id = "eventbus_admin_listen", long = "eventbus-admin-listen", env = "AGENTMESH_EVENTBUS_ADMIN_LISTEN", default_value = "0.0.0.0:9101", value_parser = parse_socket_addr)]
    pub admin_listen: SocketAddr,
    /// Durable subject patterns, comma-separated (e.g. `orders.>,audit.*`): one stream each,
    /// stored in Redis (or in memory in standalone mode) before Publish answers.
    #[arg(
        long = "eventbus-durable",
        env = "AGENTMESH_EVENTBUS_DURABLE",
        value_delimiter = ','
    )]
    pub durable: Vec<String>,
    /// Most bytes of an event's data.
    #[arg(
        long = "eventbus-max-data",
        env = "AGENTMESH_EVENTBUS_MAX_DATA",
        default_value_t = crate::event::DEFAULT_MAX_DATA
    )]
    pub max_data: usize,
    /// An id published again within this window is a duplicate.
    #[arg(long = "eventbus-dedup-window", env = "AGENTMESH_EVENTBUS_DEDUP_WINDOW", default_value = "2m", value_parser = parse_duration)]
    pub dedup_window: Duration,
    /// Most pending events per subscription group (ephemeral events beyond are shed, lowest
    /// priority first; durable ones wait in the stream).
    #[arg(
        long = "eventbus-max-pending",
        env = "AGENTMESH_EVENTBUS_MAX_PENDING",
        default_value_t = 10_000
    )]
    pub max_pending: usize,
    /// Most open subscriptions on this instance.
    #[arg(
        long = "eventbus-max-subscriptions",
        env = "AGENTMESH_EVENTBUS_MAX_SUBSCRIPTIONS",
        default_value_t = 10_000
    )]
    pub max_subscriptions: usize,
    /// Dead-letter events that expire while waiting (reason EXPIRED), not only count them.
    #[arg(
        long = "eventbus-dead-letter-expired",
        env = "AGENTMESH_EVENTBUS_DEAD_LETTER_EXPIRED"
    )]
    pub dead_letter_expired: bool,
    /// Keep at most this many events per durable stream.
    #[arg(
        long = "eventbus-retention-max-len",
        env = "AGENTMESH_EVENTBUS_RETENTION_MAX_LEN",
        default_value_t = 1_000_000
    )]
    pub retention_max_len: u64,
    /// Drop durable events older than this.
    #[arg(long = "eventbus-retention-max-age", env = "AGENTMESH_EVENTBUS_RETENTION_MAX_AGE", default_value = "7d", value_parser = parse_duration)]
    pub retention_max_age: Duration,
    /// Priority weights, CRITICAL,HIGH,NORMAL,LOW: each class's share of a backlogged
    /// subscription's deliveries and of its pending bound (LOW gets 1/sum of them).
    #[arg(long = "eventbus-priority-weights", env = "AGENTMESH_EVENTBUS_PRIORITY_WEIGHTS", default_value = "8,4,2,1", value_parser = parse_weights)]
    pub priority_weights: Weights,
    /// A class whose oldest pending event has waited this long is scheduled one class higher
    /// per period, never above HIGH; 0 turns aging off.
    #[arg(long = "eventbus-priority-aging", env = "AGENTMESH_EVENTBUS_PRIORITY_AGING", default_value = "500ms", value_parser = parse_duration)]
    pub priority_aging: Duration,
}

/// Priority weights indexed by [`crate::event::Priority::index`] (LOW first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Weights(pub [u32; 4]);

/// Parses `CRITICAL,HIGH,NORMAL,LOW` weights, each 1–1000.
///
/// # Errors
/// Anything but four whole numbers from 1 to 1000.
pub fn parse_weights(text: &str) -> Result<Weights, String> {
    let parsed: Vec<u32> = text
        .split(',')
        .map(|w| w.trim().parse::<u32>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{text:?}: {e} (write CRITICAL,HIGH,NORMAL,LOW, e.g. 8,4,2,1)"))?;
    let [critical, high, normal, low] = parsed.as_slice() else {
        return Err(format!(
            "{text:?}: four weights expected, CRITICAL,HIGH,NORMAL,LOW (e.g. 8,4,2,1)"
        ));
    };
    let weights = [*low, *normal, *high, *critical];
    if weights.iter().any(|w| !(1..=1000).contains(w)) {
        return Err(format!("{text:?}: each weight must be 1 to 1000"));
    }
    Ok(Weights(weights))
}

/// The audit trail's subjects ([`agentmesh_runtime::audit`]): always a durable stream.
pub const AUDIT_STREAM: &str = "sys.audit.>";

impl EventBusArgs {
    /// Builds the bus, its log, metrics and gRPC routes.
    ///
    /// # Errors
    /// `InvalidArgument` for bad settings (naming the flag); `Unavailable` when Redis cannot be
    /// reached.
    pub async fn build(&self, deps: &HostDeps) -> Result<ServiceSpec, EventBusError> {
        let mut durable = Vec::new();
        for pattern in self.durable.iter().filter(|p| !p.trim().is_empty()) {
            durable.push(
                SubjectFilter::parse("--eventbus-durable", pattern.trim())
                    .map_err(|v| EventBusError::InvalidArgument(vec![v]))?,
            );
        }
        // The audit trail is always durable, unless a configured pattern already holds it.
        let audit = SubjectFilter::parse("audit", AUDIT_STREAM)
            .map_err(|v| EventBusError::InvalidArgument(vec![v]))?;
        if !durable.iter().any(|p| p.overlaps(&audit)) {
            durable.push(audit);
        }
        if self.max_pending == 0 || self.max_subscriptions == 0 {
            return Err(EventBusError::invalid(
                "--eventbus-max-pending/--eventbus-max-subscriptions",
                "must be at least 1",
            ));
        }
        let instance_id = new_instance_id(NAME);
        let mut backplane = None;
        let log: Arc<dyn EventLog> = match &deps.redis_url {
            Some(url) => {
                let client = redis::Client::open(url.as_str()).map_err(|e| {
                    EventBusError::invalid("--redis", format!("invalid Redis URL: {e}"))
                })?;
                let manager = tokio::time::timeout(
                    Duration::from_secs(3),
                    redis::aio::ConnectionManager::new(client.clone()),
                )
                .await
                .map_err(|_| {
                    EventBusError::Unavailable(format!("cannot reach Redis at {url}: timed out"))
                })?
                .map_err(|e| {
                    EventBusError::Unavailable(format!("cannot reach Redis at {url}: {e}"))
                })?;
                backplane = Some(RedisBackplane::start(
                    client.clone(),
                    manager.clone(),
                    REDIS_PREFIX,
                    &instance_id,
                ));
                Arc::new(RedisLog::new(manager, client, REDIS_PREFIX).with_blocking_connections(64))
            }
            None => Arc::new(InMemoryLog::new(self.retention_max_len)),
        };
        let config = BusConfig {
            durable,
            dedup_window: self.dedup_window,
            max_data: self.max_data,
            max_pending: self.max_pending,
            max_subscriptions: self.max_subscriptions,
            dead_letter_expired: self.dead_letter_expired,
            retention: TrimPolicy {
                max_len: Some(self.retention_max_len),
                max_age: Some(self.retention_max_age),
            },
            fairness: FairnessConfig {
                weights: self.priority_weights.0,
                aging_ms: u64::try_from(self.priority_aging.as_millis()).unwrap_or(u64::MAX),
            },
            ..BusConfig::new(instance_id.clone())
        };
        let registry = deps.metrics.registry();
        let registered = match backplane {
            Some((plane, inbound)) => plane
                .register_metrics(registry)
                .map(|()| Bus::with_cluster(config, log, plane, inbound)),
            None => {
                // No backplane, nothing received: the receiving side is exported as zeros,
                // as with one.
                let receiving = crate::metrics::forward_shed_family("receiving");
                let _ = crate::metrics::forward_shed_counters(&receiving);
                registry
                    .register(Box::new(receiving))
                    .map(|()| Bus::new(config, log))
            }
        };
        let bus = registered
            .and_then(|bus| bus.register_metrics(registry).map(|()| bus))
            .map_err(|e| {
                EventBusError::Unavailable(format!("registering event bus metrics: {e}"))
            })?;
        let peers = Peers::watch(
            &instance_id,
            NAME,
            deps.membership.clone(),
            deps.metrics.clone(),
            deps.client_token.clone(),
        )
        .await
        .map_err(|e| EventBusError::Unavailable(format!("watching event bus members: {e}")))?;
        let server = EventBusGrpc::new(bus)
            .with_peers(Arc::new(peers))
            .into_server();
        Ok(ServiceSpec {
            name: NAME,
            instance_id,
            grpc_services: vec![SERVICE_NAME.to_owned()],
            routes: Routes::new(server),
            grpc_listen: self.listen,
            admin_listen: self.admin_listen,
            admin_routes: None,
            access: vec![(SERVICE_NAME.to_owned(), crate::grpc::ACCESS)],
            audited: vec![(SERVICE_NAME.to_owned(), crate::grpc::AUDITED)],
        })
    }
}

impl Service for EventBusArgs {
    fn name(&self) -> &'static str {
        NAME
    }

    fn default_ports(&self) -> (u16, u16) {
        (7101, 9101)
    }

    fn listen(&self) -> (SocketAddr, SocketAddr) {
        (self.listen, self.admin_listen)
    }

    fn build<'a>(&'a self, deps: &'a HostDeps) -> BoxFuture<'a, Result<ServiceSpec, BuildError>> {
        Box::pin(async move {
            EventBusArgs::build(self, deps)
                .await
                .map_err(|e| BuildError::from_service_error(&e))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_priority_weights_read_critical_first_and_are_bounded() {
        assert_eq!(parse_weights("8,4,2,1"), Ok(Weights([1, 2, 4, 8])));
        assert_eq!(parse_weights(" 12, 4 ,2,1"), Ok(Weights([1, 2, 4, 12])));
        assert!(parse_weights("8,4,2").unwrap_err().contains("four weights"));
        assert!(parse_weights("8,4,2,0").unwrap_err().contains("1 to 1000"));
        assert!(parse_weights("8,4,x,1").is_err());
    }
}
