//! Publishing with confirms: [`ConfirmPublisher`] on a connection the caller owns (consumers
//! use it for their retry and dead-letter copies), [`Publisher`] with a connection of its own
//! that it reopens after a loss, and the message and options both take.

mod confirm;
mod reconnecting;

pub use confirm::ConfirmPublisher;
pub use reconnecting::{DelayQueue, Publisher};

use crate::error::{AmqpError, Result};
use lapin::BasicProperties;
use std::time::Duration;

/// One message to publish.
#[derive(Debug, Clone)]
pub struct OutgoingMessage<'a> {
    /// Exchange (`""` is the default exchange, which routes by queue name).
    pub exchange: &'a str,
    /// Routing key.
    pub routing_key: &'a str,
    /// Body.
    pub body: &'a [u8],
    /// Properties; delivery mode 2 (persistent) is always set.
    pub properties: BasicProperties,
}

/// How a publisher publishes; the defaults are what users of confirmed brokers expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublisherOptions {
    /// Put the channel in confirm mode and wait for each confirm. Default true.
    pub confirm_delivery: bool,
    /// Longest wait for a confirm (and for the publish itself, which a blocked connection holds
    /// back). Default 5 s.
    pub confirm_timeout: Duration,
    /// Ask the broker to return messages no queue takes. Default true.
    pub mandatory: bool,
}

impl Default for PublisherOptions {
    fn default() -> Self {
        PublisherOptions {
            confirm_delivery: true,
            confirm_timeout: Duration::from_secs(5),
            mandatory: true,
        }
    }
}

/// One `Publish` error per message: none of them could be sent because of `error`.
pub(crate) fn fail_all(messages: &[OutgoingMessage<'_>], error: &AmqpError) -> Vec<Result<()>> {
    let text = error.to_string();
    messages
        .iter()
        .map(|_| Err(AmqpError::Publish(text.clone())))
        .collect()
}
