//! Connecting with retry and exponential backoff.

use crate::error::{AmqpError, Result};
use lapin::{Connection, ConnectionProperties};
use oncely_core::redact_url;
use std::time::Duration;

/// Exponential backoff between connection attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// First delay. Default 100 ms.
    pub initial: Duration,
    /// Longest delay. Default 5 s.
    pub max: Duration,
    /// Give up after this many attempts; `None` retries for ever. Default 10 for
    /// [`connect`]; the consumer runtime retries for ever while it runs.
    pub max_attempts: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
            max_attempts: Some(10),
        }
    }
}

impl Backoff {
    /// The delay before retry number `retry` (0-based), doubling up to `max`.
    pub fn delay(&self, retry: u32) -> Duration {
        let factor = 2u32.saturating_pow(retry.min(20));
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// [`Backoff::delay`] with equal jitter: between half of it and all of it, placed by `unit`
    /// (in `[0, 1]`, drawn at random by the callers). Clients that lost the same broker at the
    /// same moment spread out instead of reconnecting in lockstep, and the half kept is a floor
    /// that still grows with every failure.
    ///
    /// ```
    /// # use oncely_amqp::Backoff;
    /// # use std::time::Duration;
    /// let b = Backoff::default();
    /// assert_eq!(b.jittered(2, 0.0), Duration::from_millis(200));
    /// assert_eq!(b.jittered(2, 1.0), Duration::from_millis(400));
    /// ```
    pub fn jittered(&self, retry: u32, unit: f64) -> Duration {
        let full = self.delay(retry);
        let half = full / 2;
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            1.0
        };
        half + (full - half).mul_f64(unit)
    }
}

/// Connects to `url`, retrying with `backoff`. The connection is named `name` in the broker's
/// management views.
pub async fn connect(url: &str, name: &str, backoff: Backoff) -> Result<Connection> {
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        match crate::transport::open_connection(url, properties).await {
            Ok(connection) => return Ok(connection),
            Err(source) => {
                if backoff.max_attempts.is_some_and(|max| attempt >= max) {
                    return Err(AmqpError::Connect {
                        url: redact_url(url),
                        attempts: attempt,
                        source,
                    });
                }
                let delay = backoff.jittered(attempt - 1, fastrand::f64());
                tracing::warn!(url = %redact_url(url), attempt, ?delay, error = %source, "RabbitMQ connection failed, retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// How long a close waits for the broker's answer.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Closes `connection`, waiting at most 5 s for the broker: a close happens when the work is
/// done or the connection is already in trouble, and must never turn into a hang.
pub async fn close_connection(connection: &Connection, code: u16, reason: &str) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, connection.close(code, reason.into())).await;
}

/// Closes `channel`, waiting at most 5 s for the broker.
pub async fn close_channel(channel: &lapin::Channel, code: u16, reason: &str) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, channel.close(code, reason.into())).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let b = Backoff::default();
        assert_eq!(b.delay(0), Duration::from_millis(100));
        assert_eq!(b.delay(1), Duration::from_millis(200));
        assert_eq!(b.delay(3), Duration::from_millis(800));
        assert_eq!(b.delay(10), Duration::from_secs(5));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(5));
    }
}
