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

/// oncely's delivery limit on a quorum queue unless one is configured: a delivery whose
/// `x-delivery-count` reached it is dead-lettered by oncely, with its reason headers (code
/// `delivery_limit`), before any handler runs.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 20;

/// How far above oncely's delivery limit the queue's own `x-delivery-limit` sits. The broker's
/// limit is the backstop for a consumer that is not oncely or dies before it can dead-letter;
/// the margin covers the returns of a delivery whose dead-letter copy could not be confirmed.
pub const BROKER_DELIVERY_LIMIT_MARGIN: u32 = 10;

/// The `x-delivery-limit` of the quorum queues that must never drop (`Q.dlq`, `Q.parking`):
/// effectively unlimited on every version. (RabbitMQ 4 reads `-1` as unlimited, but 3.x
/// dead-letters at the first return with it, and without any value 4.x applies 20.)
pub const NO_DELIVERY_LIMIT: i32 = i32::MAX;

/// Classic or quorum queue; `"classic"` or `"quorum"` in a configuration file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
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
    single_active_consumer: bool,
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
            single_active_consumer: false,
        }
    }

    /// Quorum queues only: oncely dead-letters a delivery the broker has handed out this many
    /// times before (`x-delivery-count`) to `Q.dlq` with code `delivery_limit`, before running
    /// any handler; the guard against a message that crashes the consumer process. Default
    /// [`DEFAULT_DELIVERY_LIMIT`]. `Q` is declared with `x-delivery-limit` this plus
    /// [`BROKER_DELIVERY_LIMIT_MARGIN`], so the broker's own limit (which dead-letters without
    /// oncely's reason headers) is only a backstop.
    ///
    /// ```
    /// use oncely_amqp::{QueueType, Topology};
    ///
    /// let t = Topology::new("e", "q").queue_type(QueueType::Quorum).delivery_limit(5);
    /// assert_eq!((t.oncely_delivery_limit(), t.broker_delivery_limit()), (Some(5), Some(15)));
    /// let classic = Topology::new("e", "q");
    /// assert_eq!(classic.oncely_delivery_limit(), None);
    /// ```
    pub fn delivery_limit(mut self, limit: u32) -> Self {
        self.delivery_limit = Some(limit);
        self
    }

    /// `x-single-active-consumer` on `Q`: of all the consumers of the queue, in any number of
    /// processes, the broker delivers to one at a time and fails over to the next when it goes.
    /// Set for strict-order consumers, whose order would otherwise hold only inside one process.
    pub fn single_active_consumer(mut self, on: bool) -> Self {
        self.single_active_consumer = on;
        self
    }

    /// Whether `Q` is declared with `x-single-active-consumer`.
    pub fn is_single_active_consumer(&self) -> bool {
        self.single_active_consumer
    }

    /// The queue type.
    pub fn kind(&self) -> QueueType {
        self.queue_type
    }

    /// oncely's own delivery limit ([`Topology::delivery_limit`]); `None` for classic queues,
    /// which count no deliveries.
    pub fn oncely_delivery_limit(&self) -> Option<u32> {
        (self.queue_type == QueueType::Quorum)
            .then(|| self.delivery_limit.unwrap_or(DEFAULT_DELIVERY_LIMIT))
    }

    /// The `x-delivery-limit` declared on `Q`: oncely's limit plus
    /// [`BROKER_DELIVERY_LIMIT_MARGIN`]; `None` for classic queues.
    pub fn broker_delivery_limit(&self) -> Option<u32> {
        self.oncely_delivery_limit()
            .map(|limit| limit.saturating_add(BROKER_DELIVERY_LIMIT_MARGIN))
    }

    /// Binds the queue with `routing_key` (topic patterns allowed).
    pub fn bind(mut self, routing_key: impl Into<String>) -> Self {
        self.routing_keys.push(routing_key.into());
        self
    }

    /// Makes every queue of the topology (`Q`, its delay queues, `Q.dlq`, `Q.parking`) a quorum
    /// queue.
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
            Err(e @ AmqpError::TopologyConflict { .. }) => {
                Ok(Some(match self.type_conflict(connection, name).await {
                    Some(detail) => format!(
                        "queue or exchange {name:?} already exists with different arguments: {detail}"
                    ),
                    None => self.explain_conflict(name, e.to_string()),
                }))
            }
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
        match result {
            Err(AmqpError::TopologyConflict { name, detail }) => {
                let detail = self
                    .type_conflict(connection, &name)
                    .await
                    .unwrap_or(detail);
                Err(AmqpError::TopologyConflict { name, detail })
            }
            other => other,
        }
    }

    /// The broker names the first differing argument in its own order, in which the dead-letter
    /// arguments come before `x-queue-type`: when the queue type is what differs, that is the
    /// difference worth naming. Declares `name` with its type alone (a no-op when the type
    /// matches) and returns the broker's refusal when it names `x-queue-type`.
    async fn type_conflict(&self, connection: &Connection, name: &str) -> Option<String> {
        // Only for an existing queue of this topology: the name of a refused exchange or binding
        // must never become a queue.
        if !self.queues().iter().any(|q| q == name) {
            return None;
        }
        let channel = connection.create_channel().await.ok()?;
        let probe = tokio::time::timeout(
            CHECK_TIMEOUT,
            self.declare_queue(&channel, name, self.type_args()),
        )
        .await;
        if channel.status().connected() {
            crate::close_channel(&channel, 200, "queue type checked").await;
        }
        match probe {
            Ok(Err(AmqpError::TopologyConflict { detail, .. }))
                if detail.contains("x-queue-type") =>
            {
                Some(detail)
            }
            _ => None,
        }
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
        self.declare_queue(channel, &self.dlq(), self.final_args())
            .await?;
        self.declare_queue(channel, &self.parking(), self.final_args())
            .await?;
        Ok(())
    }

    /// `Q`'s arguments. A quorum `Q` dead-letters to `Q.dlq` (through the default exchange,
    /// the same route oncely's own dead-letter copies take) at least once, which needs
    /// `reject-publish` overflow, past its explicit `x-delivery-limit`: nothing it gives up is
    /// ever dropped.
    fn queue_args(&self) -> FieldTable {
        let mut args = self.type_args();
        if let Some(limit) = self.broker_delivery_limit() {
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongInt(i32::try_from(limit).unwrap_or(NO_DELIVERY_LIMIT)),
            );
            dead_letter_to(&mut args, &self.dlq(), true);
        }
        if self.single_active_consumer {
            args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        }
        args
    }

    /// `Q.retry.<tier>`: a copy waits out the tier's TTL, then goes back to `Q` — at least once
    /// when quorum (a classic queue lives on one node and dead-letters at most once).
    fn retry_args(&self, index: usize) -> FieldTable {
        let mut args = self.type_args();
        let tier = self.retry_tiers.get(index).copied().unwrap_or_default();
        let ttl = i32::try_from(tier.as_millis()).unwrap_or(i32::MAX);
        args.insert("x-message-ttl".into(), AMQPValue::LongInt(ttl));
        dead_letter_to(&mut args, &self.queue, self.queue_type == QueueType::Quorum);
        args
    }

    /// `Q.dlq` and `Q.parking`: a quorum one is declared without a usable delivery limit, so a
    /// replay tool that gives a message back any number of times never loses it.
    fn final_args(&self) -> FieldTable {
        let mut args = self.type_args();
        if self.queue_type == QueueType::Quorum {
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongInt(NO_DELIVERY_LIMIT),
            );
        }
        args
    }

    fn args_of(&self, name: &str) -> FieldTable {
        if name == self.queue {
            return self.queue_args();
        }
        match (0..self.retry_tiers.len()).find(|i| self.retry_queue(*i).as_deref() == Some(name)) {
            Some(index) => self.retry_args(index),
            None => self.final_args(),
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

    /// The broker's refusal of `name`'s arguments, with what it means when it is one of the
    /// arguments an older declaration (or another tool) left out of a quorum queue.
    fn explain_conflict(&self, name: &str, detail: String) -> String {
        if self.queue_type != QueueType::Quorum || name != self.queue {
            return detail;
        }
        let missing = |arg: &str| {
            // "but current is none" (3.x, 4.x), worded "current value" by some versions.
            detail.contains(&format!("inequivalent arg '{arg}'"))
                && (detail.contains("current is none") || detail.contains("current value is none"))
        };
        let hint = "see docs/cluster.md, \"Migrating a queue declared without them\" (rabbitmqctl set_policy)";
        if missing("x-dead-letter-exchange") {
            format!(
                "queue {name} is a quorum queue declared without a dead-letter exchange: past the broker's delivery limit it DROPS messages; {hint} ({detail})"
            )
        } else if missing("x-delivery-limit") {
            format!(
                "queue {name} is a quorum queue declared without x-delivery-limit: the broker's default applies (20 on RabbitMQ 4.x, none on 3.x); {hint} ({detail})"
            )
        } else if missing("x-dead-letter-strategy") || missing("x-overflow") {
            format!(
                "queue {name} is a quorum queue that dead-letters at most once (no x-dead-letter-strategy = at-least-once / x-overflow = reject-publish); {hint} ({detail})"
            )
        } else {
            detail
        }
    }

    async fn declare_queue(&self, channel: &Channel, name: &str, args: FieldTable) -> Result<()> {
        channel
            .queue_declare(short("queue", name)?, QueueDeclareOptions::durable(), args)
            .await
            .map(|_| ())
            .map_err(|e| declare_error(name, e))
    }
}

/// Dead-letters expired or given-up messages to `queue` through the default exchange; at least
/// once when `at_least_once` (quorum queues only; it needs `reject-publish` overflow).
fn dead_letter_to(args: &mut FieldTable, queue: &str, at_least_once: bool) {
    let long = |s: &str| AMQPValue::LongString(LongString::from(s));
    args.insert("x-dead-letter-exchange".into(), long(""));
    args.insert("x-dead-letter-routing-key".into(), long(queue));
    if at_least_once {
        args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
        args.insert("x-overflow".into(), long("reject-publish"));
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
