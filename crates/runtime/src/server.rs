//! Runs one agentmesh service: its gRPC server (with health, reflection and the telemetry
//! layer), its admin HTTP server (`/metrics`, `/livez`, `/readyz`) and its membership entry,
//! and shuts them down in order.
//!
//! Shutdown order (DESIGN.md): readiness NOT_SERVING → membership lease revoked → stop
//! accepting → drain in-flight RPCs within the grace period (then cut them) → stop the admin
//! server. The binary flushes telemetry last.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentmesh_membership::{Member, Membership, Registration};
use agentmesh_proto::grpc::health::v1::health_check_response::ServingStatus;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::health::HealthRegistry;

use crate::metrics::{METRICS_CONTENT_TYPE, Metrics};
use crate::observe::ServerTelemetryLayer;

/// How often readiness is re-derived from the membership registration.
const MEMBERSHIP_REPORT_INTERVAL: Duration = Duration::from_millis(500);

/// gRPC health name that reports the membership registration (SERVING while registered).
/// Readiness does not follow it: see [`report_membership`].
pub const MEMBERSHIP_HEALTH: &str = "membership";
/// Longest wait for the membership lease to be revoked at shutdown.
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(3);

/// Errors starting or running a service.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} for {service} {what}: {source}")]
    Bind {
        service: String,
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The instance could not register in membership.
    #[error("cannot register {service} in membership: {reason}")]
    Register { service: String, reason: String },
    /// The gRPC server failed.
    #[error("{service} gRPC server failed: {reason}")]
    Serve { service: String, reason: String },
}

/// What a service contributes to the host: its name, its gRPC routes and where to listen.
pub struct ServiceSpec {
    /// Short name used in membership and logs: "ratelimit", "eventbus", …
    pub name: &'static str,
    /// Membership instance id (see [`new_instance_id`]).
    pub instance_id: String,
    /// Fully-qualified gRPC service names, for health statuses and metric labels.
    pub grpc_services: Vec<String>,
    /// The service's gRPC routes.
    pub routes: Routes,
    /// gRPC listen address (port 0 picks a free port).
    pub grpc_listen: SocketAddr,
    /// Admin HTTP listen address (port 0 picks a free port).
    pub admin_listen: SocketAddr,
    /// Extra routes on the admin HTTP port, beside `/metrics`, `/livez` and `/readyz` (the
    /// health aggregator's status page and JSON endpoints).
    pub admin_routes: Option<axum::Router>,
    /// Who may call each RPC, per fully-qualified gRPC service (each service's `ACCESS`).
    pub access: Vec<(String, &'static [crate::auth::AccessRule])>,
    /// The state-changing methods recorded in the audit trail, per fully-qualified gRPC
    /// service (each service's `AUDITED`).
    pub audited: Vec<(String, &'static [&'static str])>,
}

/// What every service on a host shares.
#[derive(Clone)]
pub struct HostContext {
    /// The process's metrics.
    pub metrics: Metrics,
    /// Cluster membership (etcd or in-memory).
    pub membership: Arc<dyn Membership>,
    /// Host peers dial; see `ClusterArgs::advertise_host`.
    pub advertise_host: Option<String>,
    /// Failure-domain label.
    pub zone: String,
    /// Time in-flight RPCs get to finish at shutdown.
    pub shutdown_grace: Duration,
    /// Token verification (`--auth required`); `None`: every caller is the anonymous admin.
    pub auth: Option<Arc<crate::auth::Verifier>>,
    /// Where audited calls are recorded; `None`: not recorded (in-process tests).
    pub audit: Option<Arc<crate::audit::Auditor>>,
    /// Who may call which RPC instead of the services' own rules (`--auth-roles-file`), by
    /// `svc/Method`.
    pub role_overrides: Arc<Vec<(String, Vec<crate::auth::Role>)>>,
    /// How the admin port's `/metrics` is guarded.
    pub admin_access: AdminAccess,
    /// TLS on the gRPC ports (`--tls-cert-file`); `None`: plaintext.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// Identities of client certificates (`--tls-client-auth`), standing in for tokens.
    pub certificates: Option<Arc<crate::tls::CertificateIdentities>>,
    /// TLS on the admin port (`--tls-cert-file`); `None`: plaintext.
    pub admin_tls: Option<Arc<rustls::ServerConfig>>,
}

/// How the admin port's `/metrics` is guarded (`--auth-metrics`); the default (auth off)
/// serves everything to anyone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdminAccess {
    /// A scrape without a valid bearer token is refused (401).
    pub require_token: bool,
    /// A scrape without a valid token gets tenant-identifying label values redacted.
    pub redact_anonymous: bool,
}

/// A started service.
pub struct RunningService {
    /// The service's short name.
    pub name: &'static str,
    /// Bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// Bound admin HTTP address.
    pub admin_addr: SocketAddr,
    /// Membership instance id.
    pub instance_id: String,
    stop: CancellationToken,
    task: JoinHandle<Result<(), ServerError>>,
}

impl RunningService {
    /// Starts the graceful shutdown without waiting for it.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Waits until the service has stopped.
    ///
    /// # Errors
    /// Returns the server's failure, if it failed.
    pub async fn wait(self) -> Result<(), ServerError> {
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(ServerError::Serve {
                service: self.name.to_owned(),
                reason: e.to_string(),
            }),
        }
    }

    /// Stops the service gracefully and waits for it.
    ///
    /// # Errors
    /// Returns the server's failure, if it failed.
    pub async fn shutdown(self) -> Result<(), ServerError> {
        self.stop();
        self.wait().await
    }
}

/// A fresh instance id: `<service>-<random hex>`.
#[must_use]
pub fn new_instance_id(service: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    hasher.write_u32(std::process::id());
    format!("{service}-{:016x}", hasher.finish())
}

fn advertised(addr: SocketAddr, host: Option<&str>) -> String {
    match host {
        Some(host) => format!("{host}:{}", addr.port()),
        None if addr.ip().is_unspecified() => format!("127.0.0.1:{}", addr.port()),
        None => addr.to_string(),
    }
}

/// Binds `addr`, returning the listener and the address it actually got (port 0 → a free port).
async fn bind(
    service: &str,
    what: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), ServerError> {
    let error = |source| ServerError::Bind {
        service: service.to_owned(),
        what,
        addr,
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(error)?;
    let bound = listener.local_addr().map_err(error)?;
    Ok((listener, bound))
}

#[derive(Clone)]
struct AdminState {
    metrics: Metrics,
    ready: Arc<AtomicBool>,
    access: AdminAccess,
    verifier: Option<Arc<crate::auth::Verifier>>,
}

async fn metrics_handler(
    State(state): State<AdminState>,
    headers: http::HeaderMap,
) -> axum::response::Response {
    let token_ok = || {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            });
        match (&state.verifier, token) {
            (Some(verifier), Some(token)) => verifier.verify(token.trim()).is_ok(),
            _ => false,
        }
    };
    let authenticated = (state.access.require_token || state.access.redact_anonymous) && token_ok();
    if state.access.require_token && !authenticated {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a bearer token is needed to scrape /metrics (--auth-metrics token)\n",
        )
            .into_response();
    }
    let body = if state.access.redact_anonymous && !authenticated {
        state.metrics.encode_redacted()
    } else {
        state.metrics.encode()
    };
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], body).into_response()
}

async fn readyz_handler(State(state): State<AdminState>) -> impl IntoResponse {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

fn admin_router(state: AdminState, extra: Option<axum::Router>) -> axum::Router {
    let router = axum::Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz_handler))
        .with_state(state);
    match extra {
        Some(extra) => router.merge(extra),
        None => router,
    }
}

/// Serves the admin routes over TLS (HTTP/1.1) until `stop`; a connection whose handshake
/// fails is dropped.
async fn serve_admin_tls(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    tls: Arc<rustls::ServerConfig>,
    stop: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, _) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "admin accept failed");
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

fn set_all(health: &HealthRegistry, names: &[String], status: ServingStatus) {
    for name in names {
        health.set(name, status);
    }
}

/// Binds the listeners, registers in membership and starts serving. Cancelling `shutdown`
/// (or calling [`RunningService::stop`]) shuts the service down in order.
///
/// # Errors
/// Fails when a listener cannot be bound or membership registration fails.
pub async fn start(
    spec: ServiceSpec,
    ctx: &HostContext,
    shutdown: &CancellationToken,
) -> Result<RunningService, ServerError> {
    let name = spec.name;
    let (grpc_listener, grpc_addr) = bind(name, "gRPC", spec.grpc_listen).await?;
    let (admin_listener, admin_addr) = bind(name, "admin HTTP", spec.admin_listen).await?;

    let health = HealthRegistry::new();
    let mut serving_names: Vec<String> = vec![String::new(), "readiness".to_owned()];
    serving_names.extend(spec.grpc_services.iter().cloned());
    set_all(&health, &serving_names, ServingStatus::Serving);
    health.set("liveness", ServingStatus::Serving);

    let mut known: Vec<String> = spec.grpc_services.clone();
    known.extend(
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]
        .map(String::from),
    );
    // Reflection lists what this port serves, not every service in the descriptor set (the
    // benchmark Echo service and the other agentmesh services are not served here).
    let reflection = || {
        known.iter().fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(agentmesh_proto::FILE_DESCRIPTOR_SET),
            |builder, service| builder.with_service_name(service.clone()),
        )
    };
    let reflection_error = |e: tonic_reflection::server::Error| ServerError::Serve {
        service: name.to_owned(),
        reason: e.to_string(),
    };
    let reflection_v1 = reflection().build_v1().map_err(reflection_error)?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(reflection_error)?;

    let instance_id = spec.instance_id.clone();
    let member = Member {
        service: name.to_owned(),
        instance_id: instance_id.clone(),
        grpc_addr: advertised(grpc_addr, ctx.advertise_host.as_deref()),
        admin_addr: advertised(admin_addr, ctx.advertise_host.as_deref()),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        zone: ctx.zone.clone(),
        started_at_ms: u64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
        )
        .unwrap_or(u64::MAX),
    };
    let registration =
        ctx.membership
            .register(member)
            .await
            .map_err(|e| ServerError::Register {
                service: name.to_owned(),
                reason: e.to_string(),
            })?;

    let grpc_stop = CancellationToken::new();
    let mut builder = Server::builder();
    if let Some(tls) = &ctx.tls {
        builder = builder
            .tls_config(tls.clone())
            .map_err(|e| ServerError::Serve {
                service: name.to_owned(),
                reason: format!("TLS: {e}"),
            })?;
    }
    let router = builder
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .layer(ServerTelemetryLayer::new(&ctx.metrics, known))
        .layer(
            crate::auth::AuthLayer::new(ctx.auth.clone(), spec.access)
                .with_overrides(&ctx.role_overrides)
                .with_certificates(ctx.certificates.clone())
                .with_audit(ctx.audit.clone(), spec.audited),
        )
        .add_routes(spec.routes)
        .add_service(health.service())
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let incoming = TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
    let grpc_signal = grpc_stop.clone();
    let mut grpc_task = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, grpc_signal.cancelled_owned())
            .await
    });

    let ready = Arc::new(AtomicBool::new(true));
    let admin_stop = CancellationToken::new();
    let admin_app = admin_router(
        AdminState {
            metrics: ctx.metrics.clone(),
            ready: ready.clone(),
            access: ctx.admin_access,
            verifier: ctx.auth.clone(),
        },
        spec.admin_routes,
    );
    let admin_signal = admin_stop.clone();
    let admin_tls = ctx.admin_tls.clone();
    let admin_task = tokio::spawn(async move {
        match admin_tls {
            Some(tls) => {
                serve_admin_tls(admin_listener, admin_app, tls, admin_signal).await;
                Ok(())
            }
            None => {
                axum::serve(admin_listener, admin_app)
                    .with_graceful_shutdown(admin_signal.cancelled_owned())
                    .await
            }
        }
    });

    tracing::info!(service = name, instance = %instance_id, grpc = %grpc_addr, admin = %admin_addr, "service started");

    let stop = shutdown.child_token();
    let stop_signal = stop.clone();
    let grace = ctx.shutdown_grace;
    let ctx_metrics = ctx.metrics.clone();
    let task = tokio::spawn(async move {
        let grpc_failed = tokio::select! {
            () = stop_signal.cancelled() => None,
            result = &mut grpc_task => Some(result),
            () = report_membership(&registration, &health, &ctx_metrics) => None,
        };
        if let Some(result) = grpc_failed {
            admin_stop.cancel();
            let reason = match result {
                Ok(Ok(())) => "stopped unexpectedly".to_owned(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            return Err(ServerError::Serve {
                service: name.to_owned(),
                reason,
            });
        }
        tracing::info!(service = name, "shutting down: readiness off");
        ready.store(false, Ordering::Relaxed);
        set_all(&health, &serving_names, ServingStatus::NotServing);
        health.set(MEMBERSHIP_HEALTH, ServingStatus::NotServing);
        health.set("liveness", ServingStatus::NotServing);
        health.close();
        match tokio::time::timeout(DEREGISTER_TIMEOUT, registration.deregister()).await {
            Ok(Ok(())) => tracing::info!(service = name, "membership lease revoked"),
            Ok(Err(e)) => {
                tracing::warn!(service = name, error = %e, "membership deregistration failed; the lease will expire");
            }
            Err(_) => tracing::warn!(
                service = name,
                "membership deregistration timed out; the lease will expire"
            ),
        }
        grpc_stop.cancel();
        let outcome = match tokio::time::timeout(grace, &mut grpc_task).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(ServerError::Serve {
                service: name.to_owned(),
                reason: e.to_string(),
            }),
            Ok(Err(e)) => Err(ServerError::Serve {
                service: name.to_owned(),
                reason: e.to_string(),
            }),
            Err(_) => {
                tracing::warn!(service = name, grace = ?grace, "in-flight RPCs outlived the grace period; cutting them");
                grpc_task.abort();
                Ok(())
            }
        };
        admin_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), admin_task).await;
        tracing::info!(service = name, "stopped");
        outcome
    });

    Ok(RunningService {
        name,
        grpc_addr,
        admin_addr,
        instance_id,
        stop,
        task,
    })
}

/// Reports the membership registration — the `membership` health name, the
/// `membership_registered` gauge and a log line on each change — without touching readiness.
///
/// An instance whose lease is lost (etcd down or partitioned away) keeps serving on its last
/// known membership, as do its peers, who cannot see etcd either; turning it not-ready would
/// have a probe pull every instance of the fleet at once during an etcd outage. It registers
/// again (new lease) as soon as etcd answers. Never returns.
async fn report_membership(
    registration: &Registration,
    health: &HealthRegistry,
    metrics: &Metrics,
) {
    let service = registration.member().service.clone();
    let gauge = metrics
        .membership_registered
        .with_label_values(&[service.as_str()]);
    let mut last = None;
    loop {
        let now = registration.is_registered();
        if last != Some(now) {
            gauge.set(i64::from(now));
            let status = if now {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set(MEMBERSHIP_HEALTH, status);
            let instance = &registration.member().instance_id;
            if !now {
                tracing::warn!(%instance, "membership lease lost: serving on the last known membership, re-registering");
            } else if last == Some(false) {
                tracing::info!(%instance, "registered again in membership");
            }
            last = Some(now);
        }
        tokio::time::sleep(MEMBERSHIP_REPORT_INTERVAL).await;
    }
}
