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

/// The broker URLs of an `AMQP_URL`-style setting: one URL, or several separated by commas
/// (the nodes of a cluster), blanks ignored.
///
/// ```
/// let urls = oncely_amqp::broker_urls("amqp://a:5672/%2f, amqp://b:5672/%2f,");
/// assert_eq!(urls, ["amqp://a:5672/%2f", "amqp://b:5672/%2f"]);
/// ```
pub fn broker_urls(spec: &str) -> Vec<&str> {
    spec.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .collect()
}

/// The order in which one attempt tries `count` hosts: all of them, starting at `first` (drawn
/// at random, so that the clients of a cluster spread over its nodes) and going round.
fn host_order(count: usize, first: usize) -> impl Iterator<Item = usize> {
    (0..count).map(move |i| (first + i) % count.max(1))
}

/// `host:port` of an AMQP URL, for connection names and logs; the URL redacted when it cannot
/// be parsed.
pub fn node_of(url: &str) -> String {
    match url.parse::<lapin::uri::AMQPUri>() {
        Ok(uri) => format!("{}:{}", uri.authority.host, uri.authority.port),
        Err(_) => redact_url(url),
    }
}

/// How long one node may take to accept a connection and finish the AMQP handshake. A node that
/// black-holes packets, or accepts and never answers (an overloaded or half-dead node), would
/// otherwise hold the attempt for minutes and keep a consumer from the cluster's other nodes.
pub const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `url`, retrying with `backoff`. The connection is named `name@host:port` in the
/// broker's management views, after the node it reached.
///
/// `url` may list several nodes separated by commas ([`broker_urls`]): each attempt tries all
/// of them, starting at one picked at random, and the next attempt, after the jittered
/// backoff, goes round again. A consumer, publisher or relay that loses its connection calls
/// this again, and so fails over to another node. Each node has [`NODE_CONNECT_TIMEOUT`] to
/// answer.
pub async fn connect(url: &str, name: &str, backoff: Backoff) -> Result<Connection> {
    connect_within(url, name, backoff, NODE_CONNECT_TIMEOUT).await
}

/// [`connect`], each node given `node_timeout` to answer.
async fn connect_within(
    url: &str,
    name: &str,
    backoff: Backoff,
    node_timeout: Duration,
) -> Result<Connection> {
    let urls = broker_urls(url);
    if urls.is_empty() {
        return Err(AmqpError::Connect {
            url: String::new(),
            attempts: 0,
            source: lapin::Error::from(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no RabbitMQ URL given",
            )),
        });
    }
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let mut last_error = None;
        for index in host_order(urls.len(), fastrand::usize(..urls.len())) {
            let url = urls[index];
            let node = node_of(url);
            let properties = ConnectionProperties::default()
                .with_connection_name(format!("{name}@{node}").into());
            let opened = tokio::time::timeout(
                node_timeout,
                crate::transport::open_connection(url, properties),
            )
            .await
            .unwrap_or_else(|_| {
                Err(lapin::Error::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{node} did not complete the AMQP handshake within {node_timeout:?}"),
                )))
            });
            match opened {
                Ok(connection) => {
                    if urls.len() > 1 {
                        tracing::info!(url = %redact_url(url), connection = %format!("{name}@{node}"), "connected to RabbitMQ");
                    }
                    return Ok(connection);
                }
                Err(source) => {
                    if urls.len() > 1 {
                        tracing::warn!(url = %redact_url(url), error = %source, "RabbitMQ node unreachable, trying the next one");
                    }
                    last_error = Some(source);
                }
            }
        }
        let Some(source) = last_error else { continue };
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

    /// A node that accepts TCP connections and never says a word.
    async fn silent_node() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn a_node_that_never_answers_fails_the_attempt_after_the_node_timeout() {
        let (addr, task) = silent_node().await;
        let url = format!("amqp://guest:guest@{addr}/%2f");
        let once = Backoff {
            max_attempts: Some(1),
            ..Backoff::default()
        };
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(
            Duration::from_secs(20),
            connect_within(&url, "silent", once, Duration::from_millis(300)),
        )
        .await
        .expect("the attempt ends instead of hanging");
        match result {
            Err(AmqpError::Connect { source, .. }) => {
                assert!(
                    source
                        .to_string()
                        .contains("did not complete the AMQP handshake"),
                    "{source}"
                )
            }
            other => panic!("expected a connect error, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(10));
        task.abort();
    }

    #[test]
    fn a_list_of_urls_is_split_on_commas_and_blanks_are_ignored() {
        assert_eq!(broker_urls("amqp://h/%2f"), ["amqp://h/%2f"]);
        assert_eq!(
            broker_urls(" amqp://a/%2f ,,amqp://b/%2f , amqp://c/%2f"),
            ["amqp://a/%2f", "amqp://b/%2f", "amqp://c/%2f"]
        );
        assert!(broker_urls(" , ").is_empty());
    }

    #[test]
    fn every_attempt_tries_every_host_once_from_the_first_picked() {
        assert_eq!(host_order(3, 0).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(host_order(3, 2).collect::<Vec<_>>(), [2, 0, 1]);
        assert_eq!(host_order(1, 0).collect::<Vec<_>>(), [0]);
        // Random starts spread the clients over every node.
        let mut seen = [0; 3];
        for _ in 0..300 {
            seen[host_order(3, fastrand::usize(..3)).next().unwrap_or(0)] += 1;
        }
        assert!(seen.iter().all(|n| *n > 50), "{seen:?}");
    }

    #[test]
    fn nodes_are_named_by_host_and_port_without_credentials() {
        assert_eq!(
            node_of("amqp://u:secret@10.0.0.2:5674/%2f"),
            "10.0.0.2:5674"
        );
        assert_eq!(node_of("amqp://rabbit-1/%2f"), "rabbit-1:5672");
        assert!(!node_of("amqp://u:secret@[bad").contains("secret"));
    }

    #[tokio::test]
    async fn an_empty_list_is_an_error_not_a_hang() {
        let err = connect(" , ", "t", Backoff::default())
            .await
            .expect_err("no url");
        assert!(err.to_string().contains("no RabbitMQ URL"), "{err}");
    }

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
