//! agentmesh event bus.
//!
//! The domain core is plain Rust with no gRPC: [`subject`] validates subjects and matches
//! wildcard filters, [`index`] finds the subscriptions interested in a subject, [`priority`]
//! queues pending events by priority with weighted fairness, aging and TTL, [`dedup`] remembers
//! recent event ids, and [`log`] is the durable event log (in memory, or Redis Streams in
//! [`redis_log`]), and [`cluster`] routes ephemeral events between instances (over Redis in
//! [`redis_backplane`]).

pub mod bus;
pub mod cluster;
pub mod consumer;
pub mod dedup;
pub mod error;
pub mod event;
pub mod grpc;
pub mod index;
pub mod log;
pub mod metrics;
pub mod peers;
pub mod priority;
pub mod redis_backplane;
pub mod redis_log;
mod resp;
pub mod service;
pub mod subject;
mod wire;

pub use bus::{Bus, BusConfig, PublishOutcome, Subscription, SubscriptionHandle};
pub use consumer::{AckPolicy, ConsumerOptions, Outbound};
pub use error::{EventBusError, FieldViolation};
pub use event::{Event, Priority};
