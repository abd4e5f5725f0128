//! Where the pieces meet: a [`Handler`] run through the [`Inbox`] by the AMQP runtime.

use crate::handler::Handler;
#[cfg(feature = "failpoints")]
use oncely_amqp::FaultInjection;
use oncely_amqp::{
    BatchOptions, ConsumerOptions, ConsumerRuntime, DeliveryProcessor, InvalidOption,
    LOCAL_AMQP_URL, StatsSnapshot, Topology,
};
use oncely_core::health::{Component, Kind, Registry};
use oncely_core::metric_names as names;
use oncely_core::{
    Classifier, ContractLimits, Decision, DefaultClassifier, Envelope, Metadata, Reason,
    RetryPolicy,
};
use oncely_inbox::{BoxFuture, Inbox, InboxError, Outcome};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A consumer whose handler's change commits together with the inbox row, before the ack.
///
/// ```no_run
/// # use oncely::{Consumer, Handler, Inbox, Topology, RetryPolicy};
/// # async fn demo(handler: impl Handler, inbox: Inbox) -> Result<(), Box<dyn std::error::Error>> {
/// let consumer = Consumer::builder(handler, inbox)
///     .amqp_url("amqp://guest:guest@127.0.0.1:5672/%2f")
///     .topology(Topology::new("order.events", "billing.order-events.q").bind("order.created.v1"))
///     .concurrency(8)
///     .build()?;
/// consumer.run(oncely::shutdown_signal()).await?;
/// # Ok(()) }
/// ```
pub struct Consumer {
    runtime: ConsumerRuntime,
    topology: Topology,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("runtime", &self.runtime)
            .finish()
    }
}

impl Consumer {
    /// Starts building a consumer of `handler` over `inbox`.
    pub fn builder<H: Handler>(handler: H, inbox: Inbox) -> ConsumerBuilder<H> {
        ConsumerBuilder {
            handler,
            inbox,
            amqp_url: None,
            connection_name: None,
            topology: None,
            policy: RetryPolicy::default(),
            classifier: Arc::new(DefaultClassifier),
            prefetch: None,
            concurrency: None,
            limits: ContractLimits::default(),
            confirm_timeout: None,
            requeue_delay: None,
            max_hold: None,
            shutdown_timeout: None,
            #[cfg(feature = "failpoints")]
            fault_injection: None,
            retry_in_place: false,
            batch: None,
        }
    }

    /// Consumes until `shutdown` completes (see [`crate::shutdown_signal`]), then finishes the
    /// in-flight deliveries, acks them and closes. Reconnects by itself after connection loss.
    ///
    /// Deliveries still running after the shutdown timeout are abandoned (rolled back, left
    /// unacked for the broker to redeliver) and `run` returns
    /// [`AmqpError::DrainTimedOut`](oncely_amqp::AmqpError::DrainTimedOut): return it from
    /// `main` so the process exits non-zero.
    pub async fn run(
        &self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), oncely_amqp::AmqpError> {
        self.runtime.run(shutdown).await
    }

    /// Runs the consumer on the tokio runtime until [`ConsumerHandle::shutdown`] (or the
    /// handle is dropped).
    pub fn spawn(self) -> ConsumerHandle {
        let consumer = Arc::new(self);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = {
            let consumer = consumer.clone();
            tokio::spawn(async move {
                consumer
                    .run(async {
                        // A dropped handle stops the consumer too.
                        let _ = stopped.await;
                    })
                    .await
            })
        };
        ConsumerHandle {
            consumer,
            stop: Some(stop),
            task,
        }
    }

    /// Live counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.runtime.stats().snapshot()
    }

    /// The counters themselves, shared: another task reads them (`.snapshot()`) while `run`
    /// goes on. [`stats`](Self::stats) is the one-off copy.
    pub fn live_stats(&self) -> Arc<oncely_amqp::ConsumerStats> {
        self.runtime.stats()
    }

    /// The topology consumed.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }
}

/// A consumer running in the background; see [`Consumer::spawn`].
pub struct ConsumerHandle {
    consumer: Arc<Consumer>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), oncely_amqp::AmqpError>>,
}

impl std::fmt::Debug for ConsumerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerHandle")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl ConsumerHandle {
    /// Live counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.consumer.stats()
    }

    /// True once the consumer stopped (after a shutdown, or on a topology conflict).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops the consumer gracefully (in-flight deliveries finish and are acked) and returns
    /// what `run` returned: `Err(AmqpError::DrainTimedOut { abandoned })` when some did not
    /// finish within the shutdown timeout.
    pub async fn shutdown(mut self) -> Result<(), oncely_amqp::AmqpError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match (&mut self.task).await {
            Ok(result) => result,
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    }
}

/// Why a [`ConsumerBuilder`] cannot build its consumer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// No broker was named: a consumer never connects to a default broker silently.
    #[error(
        "no AMQP URL: call .amqp_url(..) with your broker's URL, or .local_broker() for {LOCAL_AMQP_URL}"
    )]
    MissingAmqpUrl,
    /// A setting the runtime cannot run with (the same rules as the configuration file's).
    #[error("invalid consumer setting {0}")]
    Invalid(#[from] InvalidOption),
    /// Every delivery in hand (every batch, in batched mode) holds a database connection while
    /// it runs: a pool smaller than the concurrency would leave deliveries waiting for a
    /// connection until they time out as infrastructure failures.
    #[error(
        "the database pool holds at most {pool} connections, fewer than the consumer's concurrency {concurrency}: \
         raise the pool's max_size (shared by every consumer and relay of the service) or lower the concurrency"
    )]
    PoolTooSmall {
        /// The pool's `max_size`.
        pool: u32,
        /// The consumer's concurrency.
        concurrency: usize,
    },
}

/// Builder of a [`Consumer`].
pub struct ConsumerBuilder<H> {
    handler: H,
    inbox: Inbox,
    amqp_url: Option<String>,
    connection_name: Option<String>,
    topology: Option<Topology>,
    policy: RetryPolicy,
    classifier: Arc<dyn Classifier>,
    prefetch: Option<u16>,
    concurrency: Option<usize>,
    limits: ContractLimits,
    confirm_timeout: Option<Duration>,
    requeue_delay: Option<Duration>,
    max_hold: Option<Duration>,
    shutdown_timeout: Option<Duration>,
    #[cfg(feature = "failpoints")]
    fault_injection: Option<FaultInjection>,
    retry_in_place: bool,
    batch: Option<BatchOptions>,
}

impl<H> std::fmt::Debug for ConsumerBuilder<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerBuilder")
            .field("topology", &self.topology)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl<H: Handler> ConsumerBuilder<H> {
    /// RabbitMQ URL. Required: [`build`](Self::build) refuses a consumer without one, unless
    /// [`local_broker`](Self::local_broker) asked for the local default.
    pub fn amqp_url(mut self, url: impl Into<String>) -> Self {
        self.amqp_url = Some(url.into());
        self
    }

    /// The broker of a development machine, `amqp://guest:guest@127.0.0.1:5672/%2f`, chosen
    /// explicitly.
    pub fn local_broker(mut self) -> Self {
        self.amqp_url = Some(LOCAL_AMQP_URL.to_owned());
        self
    }

    /// Connection name shown by the broker (`rabbitmqctl list_connections`). Default: the
    /// consumer name.
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = Some(name.into());
        self
    }

    /// Queue, exchange and bindings. Default: queue `<consumer>.q` on exchange `<consumer>`
    /// with no binding. The delay tiers are taken from the retry policy.
    pub fn topology(mut self, topology: Topology) -> Self {
        self.topology = Some(topology);
        self
    }

    /// Retry policy. Default [`RetryPolicy::default`].
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Classifier of handler failures. Default [`DefaultClassifier`].
    pub fn classifier(mut self, classifier: impl Classifier + 'static) -> Self {
        self.classifier = Arc::new(classifier);
        self
    }

    /// Broker prefetch (unacked deliveries in flight). Default 32; in batched mode
    /// `max_messages × concurrency`. At least the concurrency.
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = Some(prefetch);
        self
    }

    /// Deliveries processed at once (batches, in batched mode). Default 8, at least 1. Keep the
    /// database pool at least this large.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = Some(concurrency);
        self
    }

    /// Contract bounds (message id length, body size).
    pub fn limits(mut self, limits: ContractLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Longest wait for the confirm of a retry, dead-letter or parking copy. Default 5 s.
    pub fn confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = Some(timeout);
        self
    }

    /// First wait before a delivery held through a database outage (or a copy that cannot be
    /// confirmed) is tried again; the waits double, jittered, up to 30 s. Default 1 s.
    pub fn requeue_delay(mut self, delay: Duration) -> Self {
        self.requeue_delay = Some(delay);
        self
    }

    /// Longest a delivery is held through an infrastructure failure before it is given back
    /// (republished to the queue's tail, so no delivery count grows). Keep it below the broker's
    /// consumer acknowledgement timeout (30 min by default). Default 15 min.
    pub fn max_hold(mut self, max_hold: Duration) -> Self {
        self.max_hold = Some(max_hold);
        self
    }

    /// Longest wait for in-flight deliveries at shutdown. Default 30 s.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = Some(timeout);
        self
    }

    /// Longest a handler may run (claim and commit included). A handler still running is
    /// cancelled, its transaction rolled back, and the delivery retried per the retry policy
    /// (error code `handler_timeout`). Default: none.
    pub fn handler_timeout(mut self, timeout: Duration) -> Self {
        self.inbox = self.inbox.with_handler_timeout(timeout);
        self
    }

    /// Strict per-queue order: concurrency 1, prefetch 1 (other values are refused by
    /// [`build`](Self::build), as is batched mode), and retries on the same delivery
    /// (wait the tier's delay, run again) instead of through the delay queues, so no later
    /// message overtakes an earlier one.
    ///
    /// The cost: one message at a time (a transaction's round trips per message), and a message
    /// that is being retried holds up the whole queue for its delays. Once its attempts are used
    /// up it is dead-lettered and the queue moves on: order holds among processed messages, and
    /// the dead-lettered one is out of it until replayed. Infrastructure failures give the message
    /// back to the head of the queue, which keeps the order.
    ///
    /// Across replicas: `Q` is declared with `x-single-active-consumer`, so of several processes
    /// running this consumer the broker feeds one at a time, and the next takes over when it
    /// goes (its unacked deliveries first).
    pub fn strict_order(mut self) -> Self {
        self.concurrency = Some(1);
        self.prefetch = Some(1);
        self.retry_in_place = true;
        self
    }

    /// Batched mode: up to `max_messages` deliveries, or what arrived within `max_wait` of the
    /// first, are processed in ONE transaction: one statement claims all their ids, each
    /// handler runs in a savepoint of its own (a failing message rolls back only itself and gets
    /// its own decision: retry, DLQ or park), one COMMIT, then each delivery is acked.
    /// `concurrency` batches run at once. Unless set, the prefetch becomes
    /// `max_messages × concurrency` (at most 65,535) so batches can fill.
    ///
    /// The guarantees are those of the single mode; the gain is one commit (one WAL flush) per
    /// batch instead of one per message. The cost: a message waits up to `max_wait` for its
    /// batch, and a handler error that is not a database error still costs only its savepoint,
    /// but a batch whose commit fails is delivered again whole. Ignored with
    /// [`strict_order`](Self::strict_order): [`build`](Self::build) refuses both at once, and a
    /// `max_messages` of 0.
    pub fn batch(mut self, max_messages: usize, max_wait: Duration) -> Self {
        self.batch = Some(BatchOptions {
            max_messages,
            max_wait,
        });
        self
    }

    /// Applies a consumer's settings from the configuration file: topology, retry policy,
    /// prefetch, concurrency, handler timeout, batched mode and strict order (checked when the
    /// file was loaded, by the same rules as [`build`](Self::build)).
    pub fn configure(mut self, settings: &crate::config::ConsumerSettings) -> Self {
        if settings.strict_order {
            self = self.strict_order();
        }
        self = self
            .topology(settings.topology.clone())
            .retry_policy(settings.retry_policy.clone())
            .prefetch(settings.prefetch)
            .concurrency(settings.concurrency);
        if let Some(timeout) = settings.handler_timeout {
            self = self.handler_timeout(timeout);
        }
        if let Some((max_messages, max_wait)) = settings.batch {
            self = self.batch(max_messages, max_wait);
        }
        self
    }

    /// Test hook that simulates a crash between commit and ack (`failpoints` feature only).
    #[cfg(feature = "failpoints")]
    pub fn fault_injection(mut self, fault: FaultInjection) -> Self {
        self.fault_injection = Some(fault);
        self
    }

    /// The consumer, or why it cannot run: no AMQP URL, or settings the runtime refuses
    /// ([`ConsumerOptions::validate`]: the same rules as the configuration file's). Nothing is
    /// clamped or dropped silently.
    pub fn build(self) -> Result<Consumer, BuildError> {
        let amqp_url = self.amqp_url.ok_or(BuildError::MissingAmqpUrl)?;
        let name = self.handler.consumer_name().to_owned();
        let mut topology = self
            .topology
            .unwrap_or_else(|| Topology::new(name.clone(), format!("{name}.q")))
            .retry_tiers(self.policy.tiers());
        if self.retry_in_place {
            // Strict order across replicas: one consumer of the queue at a time.
            topology = topology.single_active_consumer(true);
        }
        let mut options = ConsumerOptions::new(name, amqp_url, topology.clone());
        options.limits = self.limits;
        if options.limits.max_deliveries.is_none() {
            options.limits.max_deliveries = topology.oncely_delivery_limit();
        }
        if let Some(v) = self.connection_name {
            options.connection_name = v;
        }
        #[cfg(feature = "failpoints")]
        {
            options.fault_injection = self.fault_injection;
        }
        options.set_flow(
            self.concurrency,
            self.prefetch,
            self.batch,
            self.retry_in_place,
        );
        if let Some(v) = self.confirm_timeout {
            options.confirm_timeout = v;
        }
        if let Some(v) = self.requeue_delay {
            options.requeue_delay = v;
        }
        if let Some(v) = self.max_hold {
            options.max_hold = v;
        }
        if let Some(v) = self.shutdown_timeout {
            options.shutdown_timeout = v;
        }
        options.validate()?;
        let pool = self.inbox.pool().config().max_size;
        if (pool as usize) < options.concurrency {
            return Err(BuildError::PoolTooSmall {
                pool,
                concurrency: options.concurrency,
            });
        }
        let processor = InboxProcessor::new(
            self.handler,
            self.inbox,
            self.policy,
            self.classifier,
            topology.queue(),
        );
        Ok(Consumer {
            runtime: ConsumerRuntime::new(options, Arc::new(processor)),
            topology,
        })
    }
}

/// The metric labels of one consumer.
pub(crate) struct Labels {
    pub(crate) queue: String,
    pub(crate) consumer: String,
}

/// Runs a handler through the inbox and turns the outcome into what the runtime does.
pub(crate) struct InboxProcessor<H> {
    pub(crate) labels: Labels,
    /// The database as this consumer last found it (up until an infrastructure failure).
    pub(crate) database: Component,
    /// Message ids being processed now, with how many deliveries of each.
    pub(crate) in_flight: Mutex<HashMap<String, usize>>,
    pub(crate) handler: Arc<H>,
    pub(crate) inbox: Inbox,
    pub(crate) policy: RetryPolicy,
    pub(crate) classifier: Arc<dyn Classifier>,
}

/// Counts a message id as in flight until dropped.
struct InFlightId<'a> {
    ids: &'a Mutex<HashMap<String, usize>>,
    id: String,
}

impl Drop for InFlightId<'_> {
    fn drop(&mut self) {
        if let Ok(mut ids) = self.ids.lock()
            && let Some(n) = ids.get_mut(&self.id)
        {
            *n -= 1;
            if *n == 0 {
                ids.remove(&self.id);
            }
        }
    }
}

impl<H: Handler> InboxProcessor<H> {
    /// A processor of `handler` consuming `queue` (the queue is a metric label).
    pub(crate) fn new(
        handler: H,
        inbox: Inbox,
        policy: RetryPolicy,
        classifier: Arc<dyn Classifier>,
        queue: &str,
    ) -> Self {
        let consumer = handler.consumer_name().to_owned();
        InboxProcessor {
            database: Registry::global().register(
                format!("consumer {consumer} ({queue})"),
                Kind::Database,
                true,
            ),
            labels: Labels {
                queue: queue.to_owned(),
                consumer,
            },
            in_flight: Mutex::new(HashMap::new()),
            handler: Arc::new(handler),
            inbox,
            policy,
            classifier,
        }
    }

    /// Marks `id` in flight; true when another delivery of it already was (a concurrent
    /// duplicate, which will wait on the first one's inbox row lock).
    fn enter(&self, id: &str) -> (InFlightId<'_>, bool) {
        let conflict = match self.in_flight.lock() {
            Ok(mut ids) => {
                let n = ids.entry(id.to_owned()).or_insert(0);
                *n += 1;
                *n > 1
            }
            Err(_) => false,
        };
        let guard = InFlightId {
            ids: &self.in_flight,
            id: id.to_owned(),
        };
        (guard, conflict)
    }

    /// Runs `envelope` through the inbox and the handler.
    pub(crate) async fn run(&self, envelope: Envelope<H::Message>) -> Decision {
        let attempt = envelope.metadata.attempt;
        let labels = [
            ("queue", self.labels.queue.clone()),
            ("consumer", self.labels.consumer.clone()),
        ];
        let (_in_flight, conflict) = self.enter(&envelope.metadata.message_id);
        if conflict {
            metrics::counter!(names::INBOX_CLAIM_CONFLICTS, &labels).increment(1);
        }
        let handler = self.handler.clone();
        let result = self
            .inbox
            .run(self.handler.consumer_name(), envelope, move |conn, msg| {
                Box::pin(async move { handler.handle(conn, msg).await })
            })
            .await;
        match result {
            Ok(outcome) => self.decide(Ok(outcome), attempt),
            Err(InboxError::Handler(error)) => self.decide(Err(error), attempt),
            Err(infrastructure) => {
                self.database.down();
                Decision::requeue("infrastructure", infrastructure.to_string())
            }
        }
    }

    /// Runs a batch through the inbox in one transaction; one result per item, in order.
    pub(crate) async fn run_batch(&self, items: Vec<(Metadata, &[u8])>) -> Vec<Decision> {
        let labels = [
            ("queue", self.labels.queue.clone()),
            ("consumer", self.labels.consumer.clone()),
        ];
        let mut out: Vec<Option<Decision>> = (0..items.len()).map(|_| None).collect();
        let mut envelopes = Vec::with_capacity(items.len());
        let mut placed = Vec::with_capacity(items.len());
        let mut guards = Vec::with_capacity(items.len());
        for (i, (metadata, body)) in items.into_iter().enumerate() {
            match Envelope::<H::Message>::decode(metadata, body) {
                Ok(envelope) => {
                    let (guard, conflict) = self.enter(&envelope.metadata.message_id);
                    if conflict {
                        metrics::counter!(names::INBOX_CLAIM_CONFLICTS, &labels).increment(1);
                    }
                    guards.push(guard);
                    placed.push((i, envelope.metadata.attempt));
                    envelopes.push(envelope);
                }
                Err(violation) => {
                    out[i] = Some(Decision::DeadLetter {
                        reason: Reason::from(&violation),
                    })
                }
            }
        }
        let handler = self.handler.clone();
        let result = self
            .inbox
            .run_batch(self.handler.consumer_name(), envelopes, move |conn, msg| {
                let handler = handler.clone();
                // Whatever the handler publishes is caused by its own message.
                Box::pin(oncely_amqp::with_cause(msg.metadata.clone(), async move {
                    handler.handle(conn, msg).await
                }))
            })
            .await;
        match result {
            Ok(results) => {
                for ((i, attempt), r) in placed.into_iter().zip(results) {
                    out[i] = Some(self.decide(r, attempt));
                }
            }
            Err(infrastructure) => {
                self.database.down();
                for (i, _) in placed {
                    out[i] = Some(Decision::requeue(
                        "infrastructure",
                        infrastructure.to_string(),
                    ));
                }
            }
        }
        drop(guards);
        out.into_iter()
            .map(|p| {
                p.unwrap_or_else(|| Decision::requeue("no_outcome", "no outcome for this message"))
            })
            .collect()
    }

    /// What the runtime does with one message's outcome.
    fn decide(&self, result: Result<Outcome, oncely_core::HandlerError>, attempt: u32) -> Decision {
        match result {
            Ok(Outcome::Processed { .. }) => {
                self.database.up();
                Decision::Ack
            }
            Ok(Outcome::Duplicate) => {
                self.database.up();
                Decision::AckDuplicate
            }
            // The schema or the database's role does not fit the code yet (a deploy that started
            // before its migration, a demoted primary): not the message's fault. Readiness says
            // so, and the runtime holds the message until the database is fit.
            Err(error) if error.is_deployment() => {
                self.database.down();
                tracing::warn!(
                    code = error.code(),
                    error = error.message(),
                    "the database does not fit this service (a missing table, column or function, a missing privilege, or read-only): holding the message"
                );
                Decision::requeue(error.code().to_owned(), error.message().to_owned())
            }
            Err(error) => {
                self.database.up();
                tracing::info!(
                    kind = error.kind().as_str(),
                    code = error.code(),
                    error = error.message(),
                    "handler failed"
                );
                metrics::counter!(
                    names::HANDLER_ERRORS,
                    &[
                        ("queue", self.labels.queue.clone()),
                        ("consumer", self.labels.consumer.clone()),
                        ("kind", error.kind().as_str().to_owned()),
                        ("code", error.code().to_owned()),
                    ]
                )
                .increment(1);
                self.classifier.classify(&error, attempt, &self.policy)
            }
        }
    }
}

impl<H: Handler> DeliveryProcessor for InboxProcessor<H> {
    fn process<'a>(&'a self, metadata: Metadata, body: &'a [u8]) -> BoxFuture<'a, Decision> {
        Box::pin(async move {
            match Envelope::<H::Message>::decode(metadata, body) {
                Ok(envelope) => self.run(envelope).await,
                Err(violation) => Decision::DeadLetter {
                    reason: Reason::from(&violation),
                },
            }
        })
    }

    fn process_batch<'a>(
        &'a self,
        items: Vec<(Metadata, &'a [u8])>,
    ) -> BoxFuture<'a, Vec<Decision>> {
        Box::pin(self.run_batch(items))
    }
}
