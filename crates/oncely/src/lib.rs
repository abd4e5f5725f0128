#![doc = include_str!("../README.md")]

pub mod config;
mod consumer;
mod handler;
#[cfg(feature = "observability")]
pub mod observability;
mod service;
mod shutdown;
#[cfg(feature = "testing")]
pub mod testing;

pub use consumer::{BuildError, Consumer, ConsumerBuilder, ConsumerHandle};
pub use handler::{BoxFuture, Handler};
pub use service::{DEFAULT_LOG_FILTER, Service, ServiceError};
pub use shutdown::shutdown_signal;

pub use diesel_async::AsyncPgConnection;
#[cfg(feature = "failpoints")]
pub use oncely_amqp::FaultInjection;
pub use oncely_amqp::{
    AmqpError, OutgoingMessage, Publisher, PublisherOptions, QueueType, StatsSnapshot, Topology,
};
pub use oncely_core::{
    Classifier, ContractLimits, ContractViolation, Decision, DefaultClassifier, Envelope,
    ErrorKind, HandlerError, Metadata, Reason, RetryPolicy, headers, health, metric_names,
};
pub use oncely_inbox::{
    INBOX_MIGRATIONS, Inbox, InboxError, MigrationError, Outcome, Pool, PoolOptions, connect_pool,
    run_migrations,
};
pub use oncely_macros::handler;

/// The transactional outbox: [`outbox::enqueue`] in your transaction, [`outbox::Relay`] to publish.
pub use oncely_outbox as outbox;

/// The lapin version oncely is built on.
pub use oncely_amqp::lapin;

/// The RabbitMQ side beyond what a service author writes: connecting (`connect`, several hosts,
/// `Backoff`), the confirmed publisher under `Publisher`, queue depths and topology deletion,
/// delivery limits, the consumer runtime's parts and causation.
pub mod amqp {
    pub use oncely_amqp::*;
}

/// The inbox beyond [`Inbox`]: its rows and statuses as operators see them, its SQL for a
/// service's own migrations.
pub mod inbox {
    pub use oncely_inbox::*;
}

/// What most users import.
pub mod prelude {
    pub use crate::{
        AsyncPgConnection, Consumer, Envelope, Handler, HandlerError, Inbox, RetryPolicy, Topology,
        handler,
    };
}

#[doc(hidden)]
pub mod __private {
    pub use crate::handler::BoxFuture;
    pub use diesel_async::AsyncPgConnection;
    pub use oncely_core::{Envelope, HandlerError};
    pub use std::boxed::Box;
    pub use std::result::Result;
}

/// Reads `FAILPOINTS` (e.g. `oncely::after_commit=1%return;oncely::before_commit=1%return`) and
/// arms oncely's fail points: each `return` action aborts the process there, as a crash would.
/// Only with the `failpoints` feature, for the fault-injection suite; keep the returned guard
/// for the life of the process. Points: `oncely::before_commit`, `oncely::after_commit`,
/// `oncely::after_dead_letter_publish`, `oncely::publish_before_confirm`,
/// `oncely::relay_after_confirm`.
#[cfg(feature = "failpoints")]
pub fn failpoints_from_env() -> fail::FailScenario<'static> {
    fail::FailScenario::setup()
}
