//! agentmesh health aggregator: `agentmesh.health.v1.HealthAggregator`.
//!
//! [`aggregator::Aggregator`] holds every component's state (instances, services,
//! dependencies, the cluster) with hysteresis, the roll-up with root causes, revisions for
//! watchers, the history of transitions, uptime and check latency. [`checks`] feeds it: one
//! task per instance discovered in membership (a `grpc.health.v1` Watch stream plus a Check
//! every second) and one per dependency (etcd, Redis). [`http`] serves `/health`,
//! `/health/components`, `/optimizations` and the status page; [`grpc`] is the thin adapter;
//! [`service`] assembles it for the host.

pub mod aggregator;
pub mod alerts;
pub mod checks;
pub mod config;
pub mod error;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod model;
pub mod service;
pub mod wire;

pub use aggregator::{Aggregator, ClusterView, ComponentView, Observation};
pub use error::HealthError;
pub use model::State;
