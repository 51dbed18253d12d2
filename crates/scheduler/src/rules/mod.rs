//! Reactive rules: stimulus → response, evaluated by the scheduler leader.
//!
//! A rule ([`model::RuleDef`]) names a stimulus (a subject filter on the event bus, optional
//! types and headers), an optional CEL condition and up to 16 responses (publish an event,
//! submit a task, call a webhook), each with an optional CEL guard and templated fields. Rules are stored in
//! etcd ([`store`]) and compiled when stored ([`model::compile`]: a bad expression is refused
//! naming its position). Only the scheduler leader evaluates them ([`engine`]), consuming
//! stimuli through one queue-group subscription per maximal subject filter, routing each
//! event through a subject index ([`index`]) and acknowledging an
//! event only after its responses ran, each under an idempotency key, so a failover neither
//! loses (on durable subjects) nor repeats a response. [`grpc`] serves
//! `agentmesh.rules.v1.Rules`.
//!
//! Durable state — delayed responses, cascades waiting for their task, `not_followed_by`
//! timeouts, what a cancelling event cancels, correlation windows — lives in [`delayed`]
//! (Redis, or memory without it).

pub mod delayed;
pub mod engine;
pub mod eval;
pub mod grpc;
pub mod index;
pub mod model;
pub mod store;

pub use engine::{Engine, RetryConfig, RuleMetrics};
pub use model::{RuleDef, RuleError};
pub use store::{EtcdRuleStore, MemoryRuleStore, RuleStore};
