//! The RabbitMQ side of oncely, on lapin 4.
//!
//! - [`connect`]: a connection with retry and exponential backoff, over a transport that turns
//!   short strings that are not UTF-8 into dead letters instead of connection failures
//!   ([`open_connection`]).
//! - [`Topology`]: a consumer queue `Q` bound to an exchange, its delay queues `Q.retry.<tier>`,
//!   `Q.dlq` and `Q.parking`, declared idempotently.
//! - [`ConfirmPublisher`]: persistent, mandatory publishes that wait for the broker's confirm.
//! - [`ConsumerRuntime`]: manual acks, prefetch, bounded concurrency, every [`Decision`] applied
//!   (retry, dead-letter and park by confirmed publish *before* the ack), reconnection after a
//!   lost connection, graceful shutdown.
//!
//! This crate knows nothing of PostgreSQL: what a delivery means is up to a
//! [`DeliveryProcessor`], which the `oncely` facade implements over the inbox.
//!
//! [`Decision`]: oncely_core::Decision

mod cause;
mod connection;
mod consumer;
mod error;
mod properties;
mod publisher;
mod reconnect;
mod stats;
mod telemetry;
mod topology;
mod transport;

pub use cause::{caused_by, current_cause, with_cause};
pub use connection::{
    Backoff, NODE_CONNECT_TIMEOUT, broker_urls, close_channel, close_connection, connect, node_of,
};
#[cfg(feature = "failpoints")]
pub use consumer::FaultInjection;
pub use consumer::{
    BatchOptions, ConsumerOptions, ConsumerRuntime, DEFAULT_CONCURRENCY, DEFAULT_PREFETCH,
    DeliveryProcessor, InvalidOption, LOCAL_AMQP_URL,
};
pub use error::{AmqpError, Result};
pub use properties::{
    headers_without_delivery_count, raw_metadata, read_attempt, read_delivery_count,
};
pub use publisher::{ConfirmPublisher, DelayQueue, OutgoingMessage, Publisher, PublisherOptions};
pub use reconnect::ReconnectBackoff;
pub use stats::{ConsumerStats, StatsSnapshot};
pub use topology::{
    BROKER_DELIVERY_LIMIT_MARGIN, DEFAULT_DELIVERY_LIMIT, NO_DELIVERY_LIMIT, QueueDepth, QueueType,
    Topology, queue_depth,
};
pub use transport::open_connection;

/// The lapin version oncely is built on, re-exported so users name the same types.
pub use lapin;
