//! The queues and exchange of one consumer, named as in the design:
//! `Q` bound to `E`, `Q.retry.<tier>` delay queues dead-lettering back to `Q`, `Q.dlq`, `Q.parking`.

use crate::error::{AmqpError, Result, short};
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ExchangeKind};
use oncely_core::tier_label;
use std::time::Duration;

/// Longest wait for the broker while checking one queue.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Classic or quorum queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// A classic durable queue.
    #[default]
    Classic,
    /// A replicated quorum queue.
    Quorum,
}

/// The topology of one consumer queue.
///
/// ```
/// use oncely_amqp::Topology;
/// use std::time::Duration;
///
/// let t = Topology::new("order.events", "billing.order-events.q")
///     .bind("order.created.v1")
///     .retry_tiers(&[Duration::from_secs(1), Duration::from_secs(30)]);
/// assert_eq!(t.retry_queue(1), Some("billing.order-events.q.retry.30s".to_owned()));
/// assert_eq!(t.dlq(), "billing.order-events.q.dlq");
/// assert_eq!(t.parking(), "billing.order-events.q.parking");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    exchange: String,
    queue: String,
    routing_keys: Vec<String>,
    queue_type: QueueType,
    retry_tiers: Vec<Duration>,
    delivery_limit: Option<u32>,
}

impl Topology {
    /// Queue `queue` on topic exchange `exchange`, with no binding yet.
    pub fn new(exchange: impl Into<String>, queue: impl Into<String>) -> Self {
        Topology {
            exchange: exchange.into(),
            queue: queue.into(),
            routing_keys: Vec::new(),
            queue_type: QueueType::Classic,
            retry_tiers: Vec::new(),
            delivery_limit: None,
        }
    }

    /// Quorum queues only: the broker dead-letters a message to `Q.dlq` after this many
    /// deliveries, whatever the consumer does; the guard against a message that crashes the
    /// consumer process before oncely can dead-letter it.
    pub fn delivery_limit(mut self, limit: u32) -> Self {
        self.delivery_limit = Some(limit);
        self
    }

    /// Binds the queue with `routing_key` (topic patterns allowed).
    pub fn bind(mut self, routing_key: impl Into<String>) -> Self {
        self.routing_keys.push(routing_key.into());
        self
    }

    /// Makes `Q`, `Q.dlq` and `Q.parking` quorum queues.
    pub fn queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }

    /// One delay queue per tier (usually `RetryPolicy::tiers`).
    pub fn retry_tiers(mut self, tiers: &[Duration]) -> Self {
        self.retry_tiers = tiers.to_vec();
        self
    }

    /// The exchange.
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// The consumer queue `Q`.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Routing keys `Q` is bound with.
    pub fn routing_keys(&self) -> &[String] {
        &self.routing_keys
    }

    /// Every queue of the topology: `Q`, its delay queues, `Q.dlq`, `Q.parking`.
    pub fn queues(&self) -> Vec<String> {
        let mut all = vec![self.queue.clone()];
        all.extend((0..self.retry_tiers.len()).filter_map(|i| self.retry_queue(i)));
        all.push(self.dlq());
        all.push(self.parking());
        all
    }

    /// Reports, changing nothing, which queues are missing and which exist with other arguments
    /// than this topology declares. Bindings cannot be listed over AMQP: `declare` ensures them.
    pub async fn check(&self, connection: &Connection) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        for name in self.queues() {
            // Every exchange with the broker is bounded: a check must never hang.
            let checked =
                tokio::time::timeout(CHECK_TIMEOUT, self.check_queue(connection, &name)).await;
            match checked {
                Ok(Ok(None)) => {}
                Ok(Ok(Some(problem))) => problems.push(problem),
                Ok(Err(e)) => return Err(e),
                Err(_) => problems.push(format!(
                    "queue {name}: no answer from the broker within {CHECK_TIMEOUT:?}"
                )),
            }
        }
        Ok(problems)
    }

    /// Deletes every queue of the topology (its messages with it) and the exchange; missing
    /// ones are fine. For tests, benchmarks and scratch runs: a service never deletes its own.
    /// Goes on after a failed deletion and returns the first error.
    pub async fn delete(&self, connection: &Connection) -> Result<()> {
        let mut first_error = None;
        let mut channel = connection.create_channel().await?;
        for name in self.queues() {
            // A refused deletion closes the channel: the next one needs another.
            if !channel.status().connected() {
                channel = connection.create_channel().await?;
            }
            let deleted = channel
                .queue_delete(short("queue", &name)?, QueueDeleteOptions::default())
                .await;
            if let Err(e) = deleted {
                first_error.get_or_insert(AmqpError::Connection(e));
            }
        }
        if !channel.status().connected() {
            channel = connection.create_channel().await?;
        }
        let deleted = channel
            .exchange_delete(
                short("exchange", &self.exchange)?,
                ExchangeDeleteOptions::default(),
            )
            .await;
        if let Err(e) = deleted {
            first_error.get_or_insert(AmqpError::Connection(e));
        }
        if channel.status().connected() {
            crate::close_channel(&channel, 200, "topology deleted").await;
        }
        first_error.map_or(Ok(()), Err)
    }

    /// `None` when `name` exists with the configured arguments, else what is wrong.
    async fn check_queue(&self, connection: &Connection, name: &str) -> Result<Option<String>> {
        if queue_depth(connection, name).await.is_err() {
            return Ok(Some(format!("queue {name} is missing")));
        }
        let channel = connection.create_channel().await?;
        // It exists: declaring it with our arguments changes nothing when they match and is
        // refused (406, naming the argument, closing the channel) when they do not.
        match self.declare_queue(&channel, name, self.args_of(name)).await {
            Err(e) => Ok(Some(e.to_string())),
            Ok(()) => {
                crate::close_channel(&channel, 200, "checked").await;
                Ok(None)
            }
        }
    }

    /// The delay tiers.
    pub fn tiers(&self) -> &[Duration] {
        &self.retry_tiers
    }

    /// `Q.retry.<label>` of tier `index`.
    pub fn retry_queue(&self, index: usize) -> Option<String> {
        self.retry_tiers
            .get(index)
            .map(|tier| format!("{}.retry.{}", self.queue, tier_label(*tier)))
    }

    /// `Q.dlq`.
    pub fn dlq(&self) -> String {
        format!("{}.dlq", self.queue)
    }

    /// `Q.parking`.
    pub fn parking(&self) -> String {
        format!("{}.parking", self.queue)
    }

    /// Declares everything on a channel of its own. Declaring the same topology twice is a
    /// no-op; a queue that exists with other arguments gives [`AmqpError::TopologyConflict`]
    /// naming the queue and, in the broker's words, the differing argument.
    pub async fn declare(&self, connection: &Connection) -> Result<()> {
        // A failed declaration closes its channel (406): never share this one.
        let channel = connection.create_channel().await?;
        let result = self.declare_on(&channel).await;
        if channel.status().connected() {
            crate::close_channel(&channel, 200, "topology declared").await;
        }
        result
    }

    async fn declare_on(&self, channel: &Channel) -> Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                short("exchange", &self.exchange)?,
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(|e| declare_error(&self.exchange, e))?;

        self.declare_queue(channel, &self.queue, self.queue_args())
            .await?;
        for key in &self.routing_keys {
            channel
                .queue_bind(
                    short("queue", &self.queue)?,
                    short("exchange", &self.exchange)?,
                    short("routing key", key)?,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| declare_error(&format!("{} -> {key}", self.queue), e))?;
        }
        for index in 0..self.retry_tiers.len() {
            let name = self.retry_queue(index).unwrap_or_default();
            self.declare_queue(channel, &name, self.retry_args(index))
                .await?;
        }
        self.declare_queue(channel, &self.dlq(), self.type_args())
            .await?;
        self.declare_queue(channel, &self.parking(), self.type_args())
            .await?;
        Ok(())
    }

    fn queue_args(&self) -> FieldTable {
        let mut args = self.type_args();
        if let Some(limit) = self
            .delivery_limit
            .filter(|_| self.queue_type == QueueType::Quorum)
        {
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongInt(i32::try_from(limit).unwrap_or(i32::MAX)),
            );
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(LongString::from("")),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(LongString::from(self.dlq().as_str())),
            );
        }
        args
    }

    fn retry_args(&self, index: usize) -> FieldTable {
        let mut args = FieldTable::default();
        let tier = self.retry_tiers.get(index).copied().unwrap_or_default();
        let ttl = i32::try_from(tier.as_millis()).unwrap_or(i32::MAX);
        args.insert("x-message-ttl".into(), AMQPValue::LongInt(ttl));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from("")),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(LongString::from(self.queue.as_str())),
        );
        args
    }

    fn args_of(&self, name: &str) -> FieldTable {
        if name == self.queue {
            return self.queue_args();
        }
        match (0..self.retry_tiers.len()).find(|i| self.retry_queue(*i).as_deref() == Some(name)) {
            Some(index) => self.retry_args(index),
            None => self.type_args(),
        }
    }

    fn type_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        if self.queue_type == QueueType::Quorum {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(LongString::from("quorum")),
            );
        }
        args
    }

    async fn declare_queue(&self, channel: &Channel, name: &str, args: FieldTable) -> Result<()> {
        channel
            .queue_declare(short("queue", name)?, QueueDeclareOptions::durable(), args)
            .await
            .map(|_| ())
            .map_err(|e| declare_error(name, e))
    }
}

pub(crate) fn declare_error(name: &str, error: lapin::Error) -> AmqpError {
    let text = error.to_string();
    if text.contains("PRECONDITION_FAILED") || text.contains("inequivalent arg") {
        AmqpError::TopologyConflict {
            name: name.to_owned(),
            detail: text,
        }
    } else {
        AmqpError::Declare {
            name: name.to_owned(),
            source: error,
        }
    }
}

/// What a queue holds right now, as a passive declaration reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueDepth {
    /// Messages ready for delivery (not those delivered and unacked).
    pub messages: u32,
    /// Consumers subscribed.
    pub consumers: u32,
}

/// The depth of `queue`, on a channel of its own, changing nothing: an error when the queue
/// does not exist (the broker's 404), or [`AmqpError::Timeout`] when the broker does not
/// answer within 10 s.
pub async fn queue_depth(connection: &Connection, queue: &str) -> Result<QueueDepth> {
    let name = short("queue", queue)?;
    // Every exchange with the broker is bounded: a depth is read by monitors and tests that
    // must not hang on a blocked or vanished broker.
    tokio::time::timeout(CHECK_TIMEOUT, async {
        let channel = connection.create_channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let declared = channel
            .queue_declare(name, passive, FieldTable::default())
            .await;
        // A missing queue has closed the channel already (404).
        if channel.status().connected() {
            crate::close_channel(&channel, 200, "depth read").await;
        }
        let declared = declared?;
        Ok(QueueDepth {
            messages: declared.message_count(),
            consumers: declared.consumer_count(),
        })
    })
    .await
    .map_err(|_| AmqpError::Timeout {
        what: format!("reading the depth of queue {queue}"),
        timeout: CHECK_TIMEOUT,
    })?
}
