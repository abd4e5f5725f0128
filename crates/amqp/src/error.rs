//! Errors of the AMQP side.

use std::time::Duration;

/// Result alias of this crate.
pub type Result<T, E = AmqpError> = std::result::Result<T, E>;

/// Everything that can go wrong talking to RabbitMQ.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AmqpError {
    /// No connection could be made, after every retry.
    #[error(
        "cannot connect to RabbitMQ at {url} ({attempts} {}): {source}{}",
        if *attempts == 1 { "attempt" } else { "attempts" },
        connect_hint(source)
    )]
    Connect {
        /// The URL without credentials.
        url: String,
        /// How many attempts were made.
        attempts: u32,
        /// The last error.
        source: lapin::Error,
    },
    /// A declaration conflicts with what the broker already has.
    #[error("queue or exchange {name:?} already exists with different arguments: {detail}")]
    TopologyConflict {
        /// The queue or exchange.
        name: String,
        /// The broker's text, naming the differing argument.
        detail: String,
    },
    /// A declaration failed for another reason.
    #[error("declaring {name:?} failed: {source}")]
    Declare {
        /// The queue, exchange or binding.
        name: String,
        /// The broker's error.
        source: lapin::Error,
    },
    /// The broker refused a published message (basic.nack).
    #[error(
        "broker refused the message published to exchange {exchange:?} with routing key {routing_key:?}"
    )]
    Nacked {
        /// Exchange.
        exchange: String,
        /// Routing key.
        routing_key: String,
    },
    /// A mandatory message could not be routed to any queue and came back.
    #[error(
        "message published to exchange {exchange:?} with routing key {routing_key:?} is unroutable: {reply_text}"
    )]
    Unroutable {
        /// Exchange.
        exchange: String,
        /// Routing key.
        routing_key: String,
        /// The broker's reply text (e.g. `NO_ROUTE`).
        reply_text: String,
    },
    /// The broker's confirm did not arrive in time; the message may or may not have been taken.
    #[error(
        "no publisher confirm within {timeout:?} for exchange {exchange:?}, routing key {routing_key:?}"
    )]
    ConfirmTimeout {
        /// Exchange.
        exchange: String,
        /// Routing key.
        routing_key: String,
        /// The time waited.
        timeout: Duration,
    },
    /// The broker did not answer in time while connecting, opening a channel or reading a
    /// queue; nothing was published.
    #[error("no answer from RabbitMQ within {timeout:?} while {what}")]
    Timeout {
        /// What was being done, e.g. `connecting to RabbitMQ`.
        what: String,
        /// The time waited.
        timeout: Duration,
    },
    /// The connection or channel failed.
    #[error("AMQP connection or channel failed: {0}")]
    Connection(#[from] lapin::Error),
    /// A message of a batch was not published because the channel could not be had.
    #[error("not published: {0}")]
    Publish(String),
    /// A delayed publish asked for more than the delay queue allows.
    #[error("delay {delay:?} is longer than the {max_delay:?} that delay queue {queue:?} allows")]
    DelayTooLong {
        /// The delay asked for.
        delay: Duration,
        /// The longest delay allowed.
        max_delay: Duration,
        /// The delay queue.
        queue: String,
    },
    /// At shutdown, in-flight deliveries did not finish within the shutdown timeout and were
    /// abandoned: their work was cancelled (rolled back) and, never acked, they are redelivered
    /// by the broker. The stop was not clean.
    #[error(
        "{abandoned} in-flight deliveries did not finish within the shutdown timeout and were abandoned unacked; the broker redelivers them"
    )]
    DrainTimedOut {
        /// How many deliveries were abandoned.
        abandoned: usize,
    },
    /// A name is longer than AMQP allows (255 bytes).
    #[error("{what} {value:?} is longer than the 255 bytes AMQP allows")]
    NameTooLong {
        /// What the name is for.
        what: &'static str,
        /// The name (cut).
        value: String,
    },
}

impl AmqpError {
    /// True when retrying later may succeed (connection trouble, a missing confirm).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            AmqpError::Connect { .. }
                | AmqpError::ConfirmTimeout { .. }
                | AmqpError::Timeout { .. }
                | AmqpError::Connection(_)
                | AmqpError::Publish(_)
        )
    }
}

pub(crate) fn short(what: &'static str, value: &str) -> Result<lapin::types::ShortString> {
    lapin::types::ShortString::try_new(value.to_owned()).map_err(|_| AmqpError::NameTooLong {
        what,
        value: value.chars().take(64).collect(),
    })
}

/// What a user should check for a connection error the broker gave a reason for.
fn connect_hint(error: &lapin::Error) -> &'static str {
    let text = error.to_string();
    if text.contains("ACCESS_REFUSED") || text.contains("ACCESS-REFUSED") {
        " (check the user name and password in the AMQP URL, and the user's permissions on its virtual host)"
    } else if text.contains("NOT_ALLOWED") || text.contains("NOT-ALLOWED") {
        " (check that the AMQP URL's virtual host exists and the user may use it)"
    } else {
        ""
    }
}
