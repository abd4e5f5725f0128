//! A publisher that owns its connection, reconnects on the next publish after a loss, and can
//! publish with a delay.

use super::{ConfirmPublisher, OutgoingMessage, PublisherOptions};
use crate::connection::{Backoff, connect};
use crate::error::{AmqpError, Result, short};
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// A confirmed publisher with its own connection to `amqp_url`.
///
/// A publish that finds the connection gone opens a new one (one attempt, bounded by the
/// confirm timeout), so a broker restart costs the publishes made while it is down, each of which
/// fails with a typed error, and nothing after.
///
/// ```no_run
/// # async fn demo() -> Result<(), oncely_amqp::AmqpError> {
/// use oncely_amqp::{OutgoingMessage, Publisher, PublisherOptions};
/// let publisher = Publisher::new("amqp://guest:guest@127.0.0.1:5672/%2f", "order-service", PublisherOptions::default());
/// publisher.publish(OutgoingMessage {
///     exchange: "order.events",
///     routing_key: "order.created.v1",
///     body: br#"{"order_id":"ord-1"}"#,
///     properties: Default::default(),
/// }).await?;
/// # Ok(()) }
/// ```
pub struct Publisher {
    amqp_url: String,
    connection_name: String,
    options: PublisherOptions,
    current: Mutex<Option<ConfirmPublisher>>,
    declared_delay_queues: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("connection_name", &self.connection_name)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Where delayed messages wait: one queue per target exchange and routing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelayQueue {
    /// `oncely.delay.<exchange>.<routing key>`.
    pub name: String,
    /// Longest delay it accepts; also its `x-message-ttl`, a broker-side fail-safe.
    pub max_delay: Option<Duration>,
}

impl DelayQueue {
    /// The delay queue of `exchange` / `routing_key`.
    pub fn for_target(exchange: &str, routing_key: &str, max_delay: Option<Duration>) -> Self {
        DelayQueue {
            name: format!("oncely.delay.{exchange}.{routing_key}"),
            max_delay,
        }
    }
}

impl Publisher {
    /// A publisher; connects on first use.
    pub fn new(
        amqp_url: impl Into<String>,
        connection_name: impl Into<String>,
        options: PublisherOptions,
    ) -> Self {
        Publisher {
            amqp_url: amqp_url.into(),
            connection_name: connection_name.into(),
            options,
            current: Mutex::new(None),
            declared_delay_queues: Mutex::new(HashSet::new()),
        }
    }

    /// The options.
    pub fn options(&self) -> &PublisherOptions {
        &self.options
    }

    /// Publishes one message and waits for its confirm.
    pub async fn publish(&self, message: OutgoingMessage<'_>) -> Result<()> {
        let publisher = self.connected().await?;
        let result = publisher.publish(message).await;
        self.forget_if_broken(&result).await;
        result
    }

    /// Publishes `messages` pipelined, at most `max_outstanding` confirms awaited at once; one
    /// result per message, in order.
    pub async fn publish_batch(
        &self,
        messages: &[OutgoingMessage<'_>],
        max_outstanding: usize,
    ) -> Vec<Result<()>> {
        let publisher = match self.connected().await {
            Ok(p) => p,
            Err(e) => return super::fail_all(messages, &e),
        };
        let results = publisher.publish_batch(messages, max_outstanding).await;
        if let Some(broken) = results
            .iter()
            .find(|r| matches!(r, Err(AmqpError::Connection(_))))
        {
            self.forget_if_broken(broken).await;
        }
        results
    }

    /// Publishes `message` so that it reaches `message.exchange` with its routing key after
    /// `delay`: it waits in the [`DelayQueue`] of that target, which dead-letters into it.
    ///
    /// With `max_delay`, a longer delay fails at once with [`AmqpError::DelayTooLong`], and the
    /// delay queue's `x-message-ttl` is `max_delay`, so nothing waits longer even if a producer
    /// bypasses this check. Messages in one delay queue leave in order: one behind a longer delay
    /// waits for it (RabbitMQ expires messages at the head of a queue only).
    pub async fn publish_delayed(
        &self,
        message: OutgoingMessage<'_>,
        delay: Duration,
        max_delay: Option<Duration>,
    ) -> Result<()> {
        let queue = DelayQueue::for_target(message.exchange, message.routing_key, max_delay);
        if let Some(max) = max_delay
            && delay > max
        {
            return Err(AmqpError::DelayTooLong {
                delay,
                max_delay: max,
                queue: queue.name,
            });
        }
        let publisher = self.connected().await?;
        self.declare_delay_queue(&publisher, &queue, message.exchange, message.routing_key)
            .await?;
        let expiration = delay.as_millis().min(u128::from(u32::MAX)).to_string();
        let delayed = OutgoingMessage {
            exchange: "",
            routing_key: &queue.name,
            body: message.body,
            properties: message
                .properties
                .with_expiration(expiration.as_str().into()),
        };
        let result = publisher.publish(delayed).await;
        self.forget_if_broken(&result).await;
        result
    }

    async fn declare_delay_queue(
        &self,
        publisher: &ConfirmPublisher,
        queue: &DelayQueue,
        exchange: &str,
        routing_key: &str,
    ) -> Result<()> {
        let mut declared = self.declared_delay_queues.lock().await;
        if declared.contains(&queue.name) {
            return Ok(());
        }
        let mut args = FieldTable::default();
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from(exchange)),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(LongString::from(routing_key)),
        );
        if let Some(max) = queue.max_delay {
            let ttl = i32::try_from(max.as_millis()).unwrap_or(i32::MAX);
            args.insert("x-message-ttl".into(), AMQPValue::LongInt(ttl));
        }
        // A channel of its own: a refused declaration closes it.
        let channel = publisher.connection().create_channel().await?;
        let declared_ok = channel
            .queue_declare(
                short("queue", &queue.name)?,
                QueueDeclareOptions::durable(),
                args,
            )
            .await;
        crate::close_channel(&channel, 200, "declared").await;
        declared_ok.map_err(|e| crate::topology::declare_error(&queue.name, e))?;
        declared.insert(queue.name.clone());
        Ok(())
    }

    async fn connected(&self) -> Result<ConfirmPublisher> {
        let mut current = self.current.lock().await;
        if let Some(publisher) = current.as_ref().filter(|p| p.is_connected()) {
            return Ok(publisher.clone());
        }
        let single = Backoff {
            max_attempts: Some(1),
            ..Backoff::default()
        };
        let connection = tokio::time::timeout(
            self.options.confirm_timeout,
            connect(&self.amqp_url, &self.connection_name, single),
        )
        .await
        .map_err(|_| AmqpError::Timeout {
            what: "connecting".to_owned(),
            timeout: self.options.confirm_timeout,
        })??;
        let publisher = ConfirmPublisher::with_options(Arc::new(connection), self.options);
        *current = Some(publisher.clone());
        self.declared_delay_queues.lock().await.clear();
        Ok(publisher)
    }

    async fn forget_if_broken(&self, result: &Result<()>) {
        if matches!(result, Err(AmqpError::Connection(_))) {
            *self.current.lock().await = None;
        }
    }

    /// Closes the connection, if open.
    pub async fn close(&self) {
        if let Some(publisher) = self.current.lock().await.take() {
            crate::close_connection(publisher.connection(), 200, "publisher closed").await;
        }
    }
}
