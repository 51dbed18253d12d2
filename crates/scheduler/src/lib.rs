//! agentmesh agent pool and scheduler.
//!
//! The domain core is plain Rust: [`pool::Pool`] keeps registrations (with epochs that fence
//! a restarted agent's old stream), heartbeat streams, a φ-accrual failure detector per agent
//! ([`detector`]), drains and reservations of slots, and picks agents by strategy
//! ([`select`]). [`wire`] converts to and from the protos, [`grpc`] is the thin adapter that
//! serves `agentmesh.scheduler.v1.Scheduler`, and [`service`] assembles it for the host.
//! [`tasks::Tasks`] is the task manager over the pool: submit, late-binding assignment over
//! the agents' heartbeat streams, attempts, retries, deadlines, cancellation and watching,
//! with tasks kept in a [`tasks::TaskStore`] (Redis, or in memory without `--redis`).

pub mod config;
pub mod detector;
pub mod error;
pub mod events;
pub mod grpc;
pub mod leader;
pub mod metrics;
pub mod pool;
pub mod rules;
pub mod select;
pub mod service;
pub mod tasks;
pub mod wire;

pub use error::SchedulerError;
pub use pool::{AgentSpec, AgentState, Pool};
pub use select::Strategy;
