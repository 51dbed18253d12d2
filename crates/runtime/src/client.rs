//! Client channels: every agentmesh client goes through the same stack — trace-context
//! injection with a client span and RED metrics, a circuit breaker per target, per-call
//! timeouts, TCP_NODELAY — so no service builds its own.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tower::ServiceBuilder;

use crate::breaker::{BreakerConfig, CircuitBreakerLayer, CircuitBreakerService};
use crate::metrics::Metrics;
use crate::observe::{ClientTelemetry, ClientTelemetryLayer};

/// A client channel with agentmesh's layers; pass it to any generated client's `new`.
pub type ClientChannel = ClientTelemetry<CircuitBreakerService<Channel>>;

/// Client channel settings.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Default per-call timeout (a smaller `grpc-timeout` from the caller wins). Default 5 s.
    pub timeout: Duration,
    /// TCP connect timeout. Default 2 s.
    pub connect_timeout: Duration,
    /// Circuit breaker settings; `None` disables the breaker.
    pub breaker: Option<BreakerConfig>,
    /// Bearer token sent on every call (the process's `--auth-token-file`); `None`: none.
    pub bearer: Option<std::sync::Arc<str>>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            breaker: Some(BreakerConfig::default()),
            bearer: None,
        }
    }
}

/// Errors building a channel.
#[derive(Debug, thiserror::Error)]
#[error("invalid gRPC address {addr:?}: {reason} (write host:port or http://host:port)")]
pub struct ClientError {
    addr: String,
    reason: String,
}

/// The URI for `addr`, adding `http://` when no scheme is given.
fn uri_for(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

/// A lazily connecting channel to `addr` through agentmesh's client stack.
///
/// # Errors
/// Fails when `addr` is not a valid URI.
pub fn connect_lazy(
    addr: &str,
    config: &ClientConfig,
    metrics: &Metrics,
) -> Result<ClientChannel, ClientError> {
    let endpoint = endpoint(addr, config)?;
    let breaker = CircuitBreakerLayer::new(
        addr,
        config.breaker.clone().unwrap_or_else(disabled_breaker),
        metrics,
    );
    Ok(ServiceBuilder::new()
        .layer(ClientTelemetryLayer::new(metrics).with_bearer(config.bearer.as_deref()))
        .layer(breaker)
        .service(endpoint.connect_lazy()))
}

/// The endpoint settings for `addr` (nodelay, timeouts, keep-alive).
///
/// # Errors
/// Fails when `addr` is not a valid URI.
///
/// When the process has client TLS ([`crate::tls::set_client_tls`]), `host:port` and
/// `http://` addresses are dialed with TLS.
pub fn endpoint(addr: &str, config: &ClientConfig) -> Result<Endpoint, ClientError> {
    let tls = crate::tls::client_tls();
    let uri = match tls {
        Some(_) => {
            let bare = addr.strip_prefix("http://").unwrap_or(addr);
            if bare.contains("://") {
                bare.to_owned()
            } else {
                format!("https://{bare}")
            }
        }
        None => uri_for(addr),
    };
    let error = |e: &dyn std::fmt::Display| ClientError {
        addr: addr.to_owned(),
        reason: e.to_string(),
    };
    let mut endpoint = Endpoint::from_shared(uri)
        .map_err(|e| error(&e))?
        .tcp_nodelay(true)
        .timeout(config.timeout)
        .connect_timeout(config.connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.clone()).map_err(|e| error(&e))?;
    }
    Ok(endpoint)
}

/// A breaker that never opens, for callers that disable it.
fn disabled_breaker() -> BreakerConfig {
    BreakerConfig {
        min_calls: u32::MAX,
        ..BreakerConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_addresses_without_scheme_get_http() {
        assert_eq!(uri_for("127.0.0.1:7104"), "http://127.0.0.1:7104");
        assert_eq!(uri_for("https://x:1"), "https://x:1");
    }

    #[tokio::test]
    async fn test_bad_address_is_a_clear_error() {
        let err = connect_lazy("not a uri", &ClientConfig::default(), &Metrics::new()).unwrap_err();
        assert!(err.to_string().contains("invalid gRPC address"));
    }
}
