//! The agentmesh runtime: what every service stands on.
//!
//! - [`config`]: flags with environment fallbacks, duration parsing, exit code 64.
//! - [`telemetry`]: logs (text/JSON) and OpenTelemetry traces with OTLP export.
//! - [`metrics`]: the process's Prometheus registry and RED histograms.
//! - [`message_trace`]: producer/consumer spans and trace context carried in message headers.
//! - [`propagation`]: W3C trace context in gRPC metadata and in event headers.
//! - [`observe`]: tower layers for server and client spans, trace propagation and metrics.
//! - [`auth`]: bearer-token (JWT) verification, identities and roles.
//! - [`breaker`]: a circuit breaker layer for client channels.
//! - [`client`]: client channels through that stack.
//! - [`peers`]: the other members of a service: a channel per member, the ring, gather within
//!   a budget.
//! - [`health`]: `grpc.health.v1` with `List` (gRFC A90), served on every gRPC port.
//! - [`server`]: runs a service with health, reflection, admin HTTP, membership and ordered
//!   graceful shutdown.
//! - [`scrape`]: `GET` of a service's admin endpoints and Prometheus text parsing, for tools
//!   and tests.
//! - [`service`]: the `Service` trait the binary's list of services is made of, and the
//!   `HostDeps` every service is built from.
//! - [`executor`]: the tokio runtime a binary runs on (`TOKIO_WORKER_THREADS=1`: current-thread).
//! - [`status`]: `tonic::Status` helpers with rich error details.
//! - [`error`]: `FieldViolation`, the `ErrorCode` set and the one `ServiceError` → `Status`
//!   mapping every service uses.

pub mod audit;
pub mod auth;
pub mod breaker;
pub mod bus_out;
pub mod client;
pub mod config;
pub mod deadline;
pub mod error;
pub mod executor;
pub mod health;
pub mod message_trace;
pub mod metrics;
pub mod observe;
pub mod peers;
pub mod propagation;
pub mod scrape;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod status;
pub mod telemetry;
pub mod tls;
pub mod wire;

pub use client::{ClientChannel, ClientConfig, connect_lazy};
pub use metrics::Metrics;
pub use server::{HostContext, RunningService, ServiceSpec};
pub use service::{BuildError, EtcdHandle, HostDeps, Service};
