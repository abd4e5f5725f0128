//! The consumer runtime: take deliveries, hand them to a [`DeliveryProcessor`], apply the
//! [`Decision`], and keep going through connection loss until asked to stop.

use crate::connection::{Backoff, close_channel, close_connection, connect};
use crate::error::{AmqpError, Result, short};
use crate::properties::{CopyHeaders, copy_properties, raw_metadata};
use crate::publisher::{ConfirmPublisher, OutgoingMessage};
use crate::reconnect::ReconnectBackoff;
use crate::stats::ConsumerStats;
use crate::telemetry::{ConsumerMetrics, InFlight};
use crate::topology::Topology;
use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use oncely_core::health::{Kind, Registry};
use oncely_core::metric_names as names;
use oncely_core::{ContractLimits, Decision, Metadata, Reason, RedactedUrl, tier_label};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{Instrument, field};

/// A boxed, `Send` future.
type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What processing a delivery came to.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Processed {
    /// Apply this decision.
    Decision(Decision),
    /// The message is not at fault (the database is unreachable, say): give it back to the queue
    /// after [`ConsumerOptions::requeue_delay`] without spending one of its retries.
    Requeue {
        /// What failed.
        reason: String,
    },
}

/// What a delivery means; the `oncely` facade implements it over the inbox.
pub trait DeliveryProcessor: Send + Sync + 'static {
    /// Processes a delivery whose metadata passed the contract.
    fn process<'a>(&'a self, metadata: Metadata, body: &'a [u8]) -> BoxFuture<'a, Processed>;

    /// Processes a batch of deliveries whose metadata passed the contract (batched mode, see
    /// [`ConsumerOptions::batch`]); one result per item, in order. The default processes them
    /// one after the other; the `oncely` facade commits them in one transaction.
    fn process_batch<'a>(
        &'a self,
        items: Vec<(Metadata, &'a [u8])>,
    ) -> BoxFuture<'a, Vec<Processed>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(items.len());
            for (metadata, body) in items {
                out.push(self.process(metadata, body).await);
            }
            out
        })
    }
}

/// Batched mode: deliveries are handed to [`DeliveryProcessor::process_batch`] in groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOptions {
    /// A batch is processed once it has this many deliveries ...
    pub max_messages: usize,
    /// ... or when its first delivery has waited this long.
    pub max_wait: Duration,
}

/// A test hook that simulates a crash between the commit and the ack.
#[derive(Clone)]
pub struct FaultInjection {
    /// Called after a delivery was processed (committed) and before it is acked; `true` closes
    /// the connection instead of acking, as a crash there would.
    pub crash_after_commit: Arc<dyn Fn(&Metadata) -> bool + Send + Sync>,
}

impl std::fmt::Debug for FaultInjection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FaultInjection { .. }")
    }
}

/// Settings of a consumer runtime. `Debug` shows the URL without its password.
#[derive(Clone)]
pub struct ConsumerOptions {
    /// Consumer name, for logs.
    pub consumer_name: String,
    /// Connection name shown by the broker. Default: the consumer name.
    pub connection_name: String,
    /// `amqp://` URL.
    pub amqp_url: String,
    /// The queue to consume and its retry, dead-letter and parking queues.
    pub topology: Topology,
    /// Declare the topology at every (re)connect. Default true.
    pub declare_topology: bool,
    /// Unacked deliveries the broker may send ahead. Default 32.
    pub prefetch: u16,
    /// Deliveries processed at once. Default 8.
    pub concurrency: usize,
    /// Contract bounds.
    pub limits: ContractLimits,
    /// Longest wait for the confirm of a retry, dead-letter or parking copy. Default 5 s.
    pub confirm_timeout: Duration,
    /// Backoff between reconnection attempts (retried for ever while running).
    pub reconnect: Backoff,
    /// Pause before a message is given back after an infrastructure failure. Default 1 s.
    pub requeue_delay: Duration,
    /// Longest wait for in-flight deliveries at shutdown. Default 30 s.
    pub shutdown_timeout: Duration,
    /// Retry on the same delivery (wait, then run again) instead of through the delay queues,
    /// so that with concurrency 1 and prefetch 1 no later message overtakes a retrying one.
    /// Default false.
    pub retry_in_place: bool,
    /// Batched mode: up to `max_messages` deliveries (or what arrived within `max_wait`) are
    /// processed together, `concurrency` batches at once. `None` (the default): one delivery at
    /// a time. Ignored with `retry_in_place`.
    pub batch: Option<BatchOptions>,
    /// Test hook; `None` in production.
    pub fault_injection: Option<FaultInjection>,
}

impl std::fmt::Debug for ConsumerOptions {
    // By hand: options end up in logs and panics, and the URL may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ConsumerOptions {
            consumer_name,
            connection_name,
            amqp_url,
            topology,
            declare_topology,
            prefetch,
            concurrency,
            limits,
            confirm_timeout,
            reconnect,
            requeue_delay,
            shutdown_timeout,
            retry_in_place,
            batch,
            fault_injection,
        } = self;
        f.debug_struct("ConsumerOptions")
            .field("consumer_name", consumer_name)
            .field("connection_name", connection_name)
            .field("amqp_url", &RedactedUrl(amqp_url))
            .field("topology", topology)
            .field("declare_topology", declare_topology)
            .field("prefetch", prefetch)
            .field("concurrency", concurrency)
            .field("limits", limits)
            .field("confirm_timeout", confirm_timeout)
            .field("reconnect", reconnect)
            .field("requeue_delay", requeue_delay)
            .field("shutdown_timeout", shutdown_timeout)
            .field("retry_in_place", retry_in_place)
            .field("batch", batch)
            .field("fault_injection", fault_injection)
            .finish()
    }
}

impl ConsumerOptions {
    /// Defaults for consuming `topology` as `consumer_name` from `amqp_url`.
    pub fn new(
        consumer_name: impl Into<String>,
        amqp_url: impl Into<String>,
        topology: Topology,
    ) -> Self {
        let consumer_name = consumer_name.into();
        ConsumerOptions {
            connection_name: consumer_name.clone(),
            consumer_name,
            amqp_url: amqp_url.into(),
            topology,
            declare_topology: true,
            prefetch: 32,
            concurrency: 8,
            limits: ContractLimits::default(),
            confirm_timeout: Duration::from_secs(5),
            reconnect: Backoff {
                max_attempts: None,
                ..Backoff::default()
            },
            requeue_delay: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(30),
            retry_in_place: false,
            batch: None,
            fault_injection: None,
        }
    }
}

/// Runs one consumer until its shutdown future completes.
pub struct ConsumerRuntime {
    shared: Arc<Shared>,
}

struct Shared {
    options: ConsumerOptions,
    processor: Arc<dyn DeliveryProcessor>,
    stats: Arc<ConsumerStats>,
    metrics: OnceLock<ConsumerMetrics>,
    in_flight: InFlightDeliveries,
}

/// The deliveries handed to a task and not yet settled, so that a shutdown that has to abandon
/// them can say which ones.
#[derive(Default)]
struct InFlightDeliveries {
    next: std::sync::atomic::AtomicU64,
    live: std::sync::Mutex<std::collections::BTreeMap<u64, (u64, Option<String>)>>,
}

/// Removes its delivery from [`InFlightDeliveries`] when the task ends, aborted or not.
struct Tracked {
    shared: Arc<Shared>,
    key: u64,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let mut live = self
            .shared
            .in_flight
            .live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        live.remove(&self.key);
    }
}

impl Shared {
    fn track(self: &Arc<Self>, delivery: &Delivery) -> Tracked {
        let key = self
            .in_flight
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().chars().take(200).collect());
        self.in_flight
            .live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(key, (delivery.delivery_tag, message_id));
        Tracked {
            shared: self.clone(),
            key,
        }
    }

    /// Delivery tag and message id of every delivery still in flight.
    fn in_flight(&self) -> Vec<(u64, Option<String>)> {
        self.in_flight
            .live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

impl Shared {
    /// The metric handles, taken at first use (after the application installed its recorder).
    fn metrics(&self) -> &ConsumerMetrics {
        self.metrics.get_or_init(|| {
            ConsumerMetrics::new(self.options.topology.queue(), &self.options.consumer_name)
        })
    }
}

impl std::fmt::Debug for ConsumerRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerRuntime")
            .field("options", &self.shared.options)
            .finish_non_exhaustive()
    }
}

/// One connection's worth of state.
struct Session {
    connection: Arc<Connection>,
    channel: Channel,
    publisher: ConfirmPublisher,
}

enum LoopEnd {
    Shutdown,
    ConnectionLost,
}

impl ConsumerRuntime {
    /// A runtime for `processor` with `options`.
    pub fn new(options: ConsumerOptions, processor: Arc<dyn DeliveryProcessor>) -> Self {
        ConsumerRuntime {
            shared: Arc::new(Shared {
                options,
                processor,
                stats: Arc::new(ConsumerStats::default()),
                metrics: OnceLock::new(),
                in_flight: InFlightDeliveries::default(),
            }),
        }
    }

    /// Live counters.
    pub fn stats(&self) -> Arc<ConsumerStats> {
        self.shared.stats.clone()
    }

    /// Consumes until `shutdown` completes, then stops taking deliveries, lets the in-flight
    /// ones finish and ack, and closes the connection.
    ///
    /// A lost connection or channel is re-opened with backoff and consumption resumes; deliveries
    /// that were in flight are redelivered by the broker and the inbox recognises them.
    /// Returns an error only for what retrying cannot fix, a topology conflict, and for a stop
    /// that was not clean: [`AmqpError::DrainTimedOut`] when in-flight deliveries had to be
    /// abandoned after [`ConsumerOptions::shutdown_timeout`].
    pub async fn run(&self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let options = &self.shared.options;
        let metrics = self.shared.metrics();
        metrics.connected.set(0.0);
        // Down until the first connection: readiness waits for it (within its grace period).
        let broker = Registry::global().register(
            format!(
                "consumer {} ({})",
                options.consumer_name,
                options.topology.queue()
            ),
            Kind::Broker,
            false,
        );
        tokio::pin!(shutdown);
        let semaphore = Arc::new(Semaphore::new(options.concurrency.max(1)));
        let mut tasks = JoinSet::new();
        // Reset only after a connection stayed up: one that drops right after opening must not
        // be reopened (and its topology redeclared) every `initial`.
        let mut reconnect =
            ReconnectBackoff::new(options.reconnect, ReconnectBackoff::STABLE_AFTER);
        let mut connected_before = false;
        loop {
            let opened = tokio::select! {
                opened = self.open() => opened,
                _ = &mut shutdown => return drain(&self.shared, &mut tasks).await,
            };
            let (session, mut consumer) = match opened {
                Ok(opened) => opened,
                Err(e @ AmqpError::TopologyConflict { .. }) => return Err(e),
                Err(e) => {
                    broker.down();
                    let delay = reconnect.on_failure(Instant::now());
                    tracing::warn!(consumer = %options.consumer_name, error = %e, ?delay, "cannot consume, retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => continue,
                        _ = &mut shutdown => return drain(&self.shared, &mut tasks).await,
                    }
                }
            };
            reconnect.on_connected(Instant::now());
            broker.up();
            metrics.connected.set(1.0);
            if connected_before {
                ConsumerStats::bump(&self.shared.stats.reconnects);
                metrics.reconnects.increment(1);
            }
            connected_before = true;
            tracing::info!(consumer = %options.consumer_name, queue = %options.topology.queue(), "consuming");
            let session = Arc::new(session);

            let batching = options.batch.filter(|_| !options.retry_in_place);
            // Batched mode: deliveries wait here until the batch is full or its time is up. Not
            // started when the channel closes, they go back to the queue.
            let mut pending: Vec<Delivery> = Vec::new();
            let mut flush_at = tokio::time::Instant::now();
            let end = loop {
                while let Some(joined) = tasks.try_join_next() {
                    report_task_end(joined);
                }
                tokio::select! {
                    biased;
                    _ = &mut shutdown => break LoopEnd::Shutdown,
                    _ = tokio::time::sleep_until(flush_at), if !pending.is_empty() => {
                        let permit = tokio::select! {
                            permit = semaphore.clone().acquire_owned() => permit,
                            _ = &mut shutdown => break LoopEnd::Shutdown,
                        };
                        let Ok(permit) = permit else { break LoopEnd::Shutdown };
                        let batch = std::mem::take(&mut pending);
                        let tracked = batch.iter().map(|d| self.shared.track(d)).collect();
                        tasks.spawn(handle_batch(self.shared.clone(), session.clone(), batch, permit, tracked));
                    }
                    next = consumer.next() => match next {
                        Some(Ok(delivery)) if batching.is_some() => {
                            let Some(batch) = batching else { continue };
                            if pending.is_empty() {
                                flush_at = tokio::time::Instant::now() + batch.max_wait;
                            }
                            pending.push(delivery);
                            if pending.len() >= batch.max_messages.max(1) {
                                let permit = tokio::select! {
                                    permit = semaphore.clone().acquire_owned() => permit,
                                    _ = &mut shutdown => break LoopEnd::Shutdown,
                                };
                                let Ok(permit) = permit else { break LoopEnd::Shutdown };
                                let batch = std::mem::take(&mut pending);
                        let tracked = batch.iter().map(|d| self.shared.track(d)).collect();
                        tasks.spawn(handle_batch(self.shared.clone(), session.clone(), batch, permit, tracked));
                            }
                        }
                        Some(Ok(delivery)) => {
                            let permit = tokio::select! {
                                permit = semaphore.clone().acquire_owned() => permit,
                                // Not started: it goes back to the queue when the channel closes.
                                _ = &mut shutdown => break LoopEnd::Shutdown,
                            };
                            let Ok(permit) = permit else { break LoopEnd::Shutdown };
                            let tracked = self.shared.track(&delivery);
                            tasks.spawn(handle_delivery(self.shared.clone(), session.clone(), delivery, permit, tracked));
                        }
                        Some(Err(e)) => {
                            tracing::warn!(consumer = %options.consumer_name, error = %e, "consumer stream failed");
                            break LoopEnd::ConnectionLost;
                        }
                        None => {
                            tracing::warn!(consumer = %options.consumer_name, "consumer stream ended");
                            break LoopEnd::ConnectionLost;
                        }
                    }
                }
            };
            match end {
                LoopEnd::Shutdown => {
                    let tag = consumer.tag();
                    if let Err(e) = session
                        .channel
                        .basic_cancel(tag, BasicCancelOptions::default())
                        .await
                    {
                        tracing::warn!(error = %e, "basic.cancel failed");
                    }
                    let drained = drain(&self.shared, &mut tasks).await;
                    // Closing hands every unacked delivery, abandoned ones included, back to
                    // the queue.
                    close_channel(&session.channel, 200, "shutdown").await;
                    close_connection(&session.connection, 200, "shutdown").await;
                    metrics.connected.set(0.0);
                    if drained.is_ok() {
                        tracing::info!(consumer = %options.consumer_name, "stopped");
                    }
                    return drained;
                }
                LoopEnd::ConnectionLost => {
                    broker.down();
                    metrics.connected.set(0.0);
                    close_connection(&session.connection, 320, "reconnecting").await;
                    let delay = reconnect.on_failure(Instant::now());
                    tracing::info!(consumer = %options.consumer_name, ?delay, "reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = &mut shutdown => return drain(&self.shared, &mut tasks).await,
                    }
                }
            }
        }
    }

    async fn open(&self) -> Result<(Session, lapin::Consumer)> {
        let options = &self.shared.options;
        let single_try = Backoff {
            max_attempts: Some(1),
            ..options.reconnect
        };
        let connection =
            Arc::new(connect(&options.amqp_url, &options.connection_name, single_try).await?);
        if options.declare_topology {
            options.topology.declare(&connection).await?;
        }
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(options.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                short("queue", options.topology.queue())?,
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let publisher = ConfirmPublisher::new(connection.clone(), options.confirm_timeout);
        Ok((
            Session {
                connection,
                channel,
                publisher,
            },
            consumer,
        ))
    }
}

/// Waits up to the shutdown timeout for the in-flight deliveries. Those still running then are
/// aborted (their transactions roll back) and named in the log; the stop is reported as
/// [`AmqpError::DrainTimedOut`], so the process can exit non-zero.
async fn drain(shared: &Shared, tasks: &mut JoinSet<()>) -> Result<()> {
    let options = &shared.options;
    let all = async {
        while let Some(joined) = tasks.join_next().await {
            report_task_end(joined);
        }
    };
    if tokio::time::timeout(options.shutdown_timeout, all)
        .await
        .is_ok()
    {
        return Ok(());
    }
    let abandoned = shared.in_flight();
    for (delivery_tag, message_id) in &abandoned {
        tracing::warn!(
            consumer = %options.consumer_name,
            queue = %options.topology.queue(),
            delivery_tag,
            message_id = message_id.as_deref().unwrap_or("<none>"),
            "delivery abandoned at shutdown: its work is cancelled and it stays unacked, so the broker redelivers it"
        );
    }
    tasks.abort_all();
    while let Some(joined) = tasks.join_next().await {
        report_task_end(joined);
    }
    tracing::error!(
        consumer = %options.consumer_name,
        queue = %options.topology.queue(),
        abandoned = abandoned.len(),
        timeout = ?options.shutdown_timeout,
        "in-flight deliveries did not finish within the shutdown timeout; abandoned unacked, the broker redelivers them"
    );
    Err(AmqpError::DrainTimedOut {
        abandoned: abandoned.len(),
    })
}

fn report_task_end(joined: std::result::Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined
        && e.is_panic()
    {
        tracing::error!(error = %e, "delivery task panicked; the broker will redeliver the message");
    }
}

async fn handle_delivery(
    shared: Arc<Shared>,
    session: Arc<Session>,
    delivery: Delivery,
    permit: OwnedSemaphorePermit,
    _tracked: Tracked,
) {
    let raw = raw_metadata(
        &delivery.properties,
        delivery.redelivered,
        delivery.data.len(),
    );
    let span = delivery_span(&shared, &delivery, &raw);
    async move {
        let options = &shared.options;
        let metrics = shared.metrics();
        let _in_flight = InFlight::new(&metrics.in_flight);
        count_received(&shared, &delivery);
        let (processed, attempt, metadata) = match Metadata::from_raw(raw, &options.limits) {
            Err(violation) => (
                Processed::Decision(Decision::DeadLetter {
                    reason: Reason::from(&violation),
                }),
                crate::properties::read_attempt(&delivery.properties),
                None,
            ),
            Ok(mut metadata) => {
                record_metadata(&tracing::Span::current(), &metadata);
                let mut processed = process(&shared, &metadata, &delivery.data).await;
                // Strict order: retry on this very delivery, so no later message overtakes it.
                while options.retry_in_place
                    && let Processed::Decision(Decision::Retry {
                        delay,
                        next_attempt,
                        reason,
                        ..
                    }) = &processed
                {
                    let (delay, next_attempt) = (*delay, *next_attempt);
                    tracing::info!(code = %reason.code, reason = %reason.message, ?delay, next_attempt, "retrying in place");
                    ConsumerStats::bump(&shared.stats.retried);
                    metrics.count_by_code(names::RETRIES, &reason.code, Some(tier_label(delay)));
                    tokio::time::sleep(delay).await;
                    metadata.attempt = next_attempt;
                    tracing::Span::current().record("attempt", metadata.attempt);
                    processed = process(&shared, &metadata, &delivery.data).await;
                }
                (processed, metadata.attempt, Some(metadata))
            }
        };
        if let (Some(fault), Some(metadata)) = (&options.fault_injection, &metadata)
            && matches!(processed, Processed::Decision(Decision::Ack))
            && (fault.crash_after_commit)(metadata)
        {
            tracing::warn!("fault injection: closing the connection after commit, before the ack");
            close_connection(&session.connection, 320, "fault injection: crash after commit").await;
            return;
        }
        if matches!(processed, Processed::Decision(Decision::Ack)) {
            // Fault suite: the process dies after the commit, before the ack.
            fail::fail_point!("oncely::after_commit", |_| std::process::abort());
        }
        let occurred_at = metadata.and_then(|m| m.occurred_at);
        settle(&shared, &session, &delivery, processed, attempt, occurred_at, Some(permit)).await;
    }
    .instrument(span)
    .await
}

/// Processes a batch of deliveries together (batched mode), then settles each one in its own
/// span, exactly as a single delivery would be settled.
async fn handle_batch(
    shared: Arc<Shared>,
    session: Arc<Session>,
    deliveries: Vec<Delivery>,
    permit: OwnedSemaphorePermit,
    _tracked: Vec<Tracked>,
) {
    let options = &shared.options;
    let metrics = shared.metrics();
    let _in_flight: Vec<InFlight> = deliveries
        .iter()
        .map(|_| InFlight::new(&metrics.in_flight))
        .collect();
    let mut spans = Vec::with_capacity(deliveries.len());
    let mut results: Vec<Option<(Processed, u32)>> = Vec::with_capacity(deliveries.len());
    let mut metadata: Vec<Option<Metadata>> = Vec::with_capacity(deliveries.len());
    for delivery in &deliveries {
        count_received(&shared, delivery);
        let raw = raw_metadata(
            &delivery.properties,
            delivery.redelivered,
            delivery.data.len(),
        );
        let span = delivery_span(&shared, delivery, &raw);
        match Metadata::from_raw(raw, &options.limits) {
            Err(violation) => {
                results.push(Some((
                    Processed::Decision(Decision::DeadLetter {
                        reason: Reason::from(&violation),
                    }),
                    crate::properties::read_attempt(&delivery.properties),
                )));
                metadata.push(None);
            }
            Ok(m) => {
                record_metadata(&span, &m);
                results.push(None);
                metadata.push(Some(m));
            }
        }
        spans.push(span);
    }
    let items: Vec<(Metadata, &[u8])> = metadata
        .iter()
        .zip(&deliveries)
        .filter_map(|(m, d)| m.clone().map(|m| (m, &d.data[..])))
        .collect();
    if !items.is_empty() {
        let count = items.len();
        let started = Instant::now();
        let batch_span = tracing::info_span!("batch", consumer = %options.consumer_name, queue = %options.topology.queue(), size = count);
        let processed = shared
            .processor
            .process_batch(items)
            .instrument(batch_span)
            .await;
        let share = started.elapsed().as_secs_f64() / count as f64;
        for _ in 0..count {
            metrics.handler_duration.record(share);
        }
        let mut processed = processed.into_iter();
        for (slot, m) in results.iter_mut().zip(&metadata) {
            if let Some(m) = m {
                let p = processed.next().unwrap_or(Processed::Requeue {
                    reason: "the processor gave no result for this delivery".to_owned(),
                });
                *slot = Some((p, m.attempt));
            }
        }
    }
    if let Some(fault) = &options.fault_injection
        && results.iter().zip(&metadata).any(|(r, m)| {
            matches!(r, Some((Processed::Decision(Decision::Ack), _)))
                && m.as_ref().is_some_and(|m| (fault.crash_after_commit)(m))
        })
    {
        tracing::warn!(
            "fault injection: closing the connection after the batch commit, before its acks"
        );
        close_connection(
            &session.connection,
            320,
            "fault injection: crash after commit",
        )
        .await;
        return;
    }
    if results
        .iter()
        .any(|r| matches!(r, Some((Processed::Decision(Decision::Ack), _))))
    {
        // Fault suite: the process dies after the batch's commit, before its acks.
        fail::fail_point!("oncely::after_commit", |_| std::process::abort());
    }
    let settles = deliveries.iter().zip(results).zip(metadata).zip(spans).map(
        |(((delivery, result), m), span)| {
            let (processed, attempt) = result.unwrap_or((
                Processed::Requeue {
                    reason: "not processed".to_owned(),
                },
                0,
            ));
            let occurred_at = m.and_then(|m| m.occurred_at);
            settle(
                &shared,
                &session,
                delivery,
                processed,
                attempt,
                occurred_at,
                None,
            )
            .instrument(span)
        },
    );
    futures_util::future::join_all(settles).await;
    drop(permit);
}

fn count_received(shared: &Shared, delivery: &Delivery) {
    let metrics = shared.metrics();
    ConsumerStats::bump(&shared.stats.received);
    metrics.received.increment(1);
    if delivery.redelivered {
        metrics.redelivered.increment(1);
    }
}

fn record_metadata(span: &tracing::Span, metadata: &Metadata) {
    span.record("attempt", metadata.attempt);
    if let Some(id) = &metadata.causation_id {
        span.record("causation_id", id.as_str());
    }
    if let Some(id) = metadata.trace_id() {
        span.record("trace_id", id);
    }
}

/// The span of one delivery, with the fields known before its metadata is checked.
fn delivery_span(
    shared: &Shared,
    delivery: &Delivery,
    raw: &oncely_core::RawMetadata,
) -> tracing::Span {
    let span = tracing::info_span!(
        "delivery",
        consumer = %shared.options.consumer_name,
        queue = %shared.options.topology.queue(),
        delivery_tag = delivery.delivery_tag,
        redelivered = delivery.redelivered,
        message_id = field::Empty,
        correlation_id = field::Empty,
        causation_id = field::Empty,
        trace_id = field::Empty,
        attempt = field::Empty,
        dedup = field::Empty,
        decision = field::Empty,
    );
    if let Some(id) = &raw.message_id {
        let shown: String = id.chars().take(200).collect();
        span.record("message_id", shown.as_str());
    }
    if let Some(id) = &raw.correlation_id {
        span.record("correlation_id", id.as_str());
    }
    span
}

/// Runs the processor with `metadata` as the cause of whatever it publishes, timed.
async fn process(shared: &Shared, metadata: &Metadata, body: &[u8]) -> Processed {
    let started = Instant::now();
    let processed = crate::cause::with_cause(
        metadata.clone(),
        shared.processor.process(metadata.clone(), body),
    )
    .await;
    shared
        .metrics()
        .handler_duration
        .record(started.elapsed().as_secs_f64());
    processed
}

#[allow(clippy::too_many_arguments)]
async fn settle(
    shared: &Shared,
    session: &Session,
    delivery: &Delivery,
    processed: Processed,
    attempt: u32,
    occurred_at: Option<u64>,
    permit: Option<OwnedSemaphorePermit>,
) {
    let span = tracing::Span::current();
    let stats = &shared.stats;
    let metrics = shared.metrics();
    let topology = &shared.options.topology;
    let decision = match processed {
        Processed::Decision(decision) => decision,
        Processed::Requeue { reason } => {
            span.record("decision", "requeue");
            tracing::warn!(%reason, "infrastructure failure, giving the message back");
            requeue_later(shared, delivery, permit).await;
            return;
        }
    };
    span.record("decision", decision.as_str());
    let copy_to = match &decision {
        Decision::Ack => {
            span.record("dedup", "new");
            ConsumerStats::bump(&stats.processed);
            metrics.processed.increment(1);
            if let Some(at) = occurred_at {
                let now = u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0);
                metrics.end_to_end.record(now.saturating_sub(at) as f64);
            }
            None
        }
        Decision::AckDuplicate => {
            span.record("dedup", "duplicate");
            ConsumerStats::bump(&stats.duplicates);
            metrics.duplicates.increment(1);
            None
        }
        Decision::Retry {
            tier,
            next_attempt,
            reason,
            delay,
        } => match topology.retry_queue(*tier) {
            Some(queue) => {
                tracing::info!(code = %reason.code, reason = %reason.message, ?delay, next_attempt, "retrying later");
                let tier = topology.tiers().get(*tier).map(|d| tier_label(*d));
                Some((
                    queue,
                    reason.clone(),
                    *next_attempt,
                    false,
                    &stats.retried,
                    names::RETRIES,
                    tier,
                ))
            }
            None => {
                let reason = Reason::new(
                    "retry_tier_missing",
                    format!(
                        "no delay queue for tier {tier}; last error {}: {}",
                        reason.code, reason.message
                    ),
                );
                Some((
                    topology.dlq(),
                    reason,
                    attempt,
                    true,
                    &stats.dead_lettered,
                    names::DEAD_LETTERED,
                    None,
                ))
            }
        },
        Decision::DeadLetter { reason } => Some((
            topology.dlq(),
            reason.clone(),
            attempt,
            true,
            &stats.dead_lettered,
            names::DEAD_LETTERED,
            None,
        )),
        Decision::Park { reason } => Some((
            topology.parking(),
            reason.clone(),
            attempt,
            true,
            &stats.parked,
            names::PARKED,
            None,
        )),
        _ => None,
    };
    if let Some((queue, reason, attempt, final_copy, counter, metric, tier)) = copy_to {
        if final_copy {
            tracing::warn!(code = %reason.code, reason = %reason.message, to = %queue, "message set aside");
        }
        let properties = copy_properties(
            &delivery.properties,
            CopyHeaders {
                attempt,
                reason: &reason,
                queue: topology.queue(),
                exchange: delivery.exchange.as_str(),
                routing_key: delivery.routing_key.as_str(),
                final_copy,
            },
        );
        let published = session
            .publisher
            .publish(OutgoingMessage {
                exchange: "",
                routing_key: &queue,
                body: &delivery.data,
                properties,
            })
            .await;
        if let Err(e) = published {
            tracing::error!(error = %e, to = %queue, "could not publish the copy; giving the message back");
            requeue_later(shared, delivery, permit).await;
            return;
        }
        ConsumerStats::bump(counter);
        metrics.count_by_code(metric, &reason.code, tier);
        if final_copy {
            // Fault suite: the process dies with the DLQ / parking copy confirmed, unacked.
            fail::fail_point!(
                "oncely::after_dead_letter_publish",
                |_| std::process::abort()
            );
        }
    }
    match delivery.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => tracing::info!("settled"),
        Ok(false) | Err(_) => {
            ConsumerStats::bump(&stats.ack_failures);
            metrics.ack_failures.increment(1);
            tracing::warn!(
                "ack not sent (channel gone); the broker will redeliver and the inbox will recognise it"
            );
        }
    }
}

/// Gives the message back after `requeue_delay`. The concurrency slot is freed first: a message
/// waiting to go back must not keep the others from being processed.
async fn requeue_later(shared: &Shared, delivery: &Delivery, permit: Option<OwnedSemaphorePermit>) {
    drop(permit);
    tokio::time::sleep(shared.options.requeue_delay).await;
    requeue(shared, delivery).await;
}

async fn requeue(shared: &Shared, delivery: &Delivery) {
    ConsumerStats::bump(&shared.stats.requeued);
    shared.metrics().requeued.increment(1);
    let options = BasicNackOptions {
        requeue: true,
        multiple: false,
    };
    if !matches!(delivery.acker.nack(options).await, Ok(true)) {
        tracing::warn!("nack not sent (channel gone); the broker requeues the message itself");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_of_consumer_options_shows_the_url_without_the_password() {
        let options = ConsumerOptions::new(
            "billing",
            "amqps://billing:amqp-pw-7f3a@rabbit.example:5671/prod",
            Topology::new("order.events", "billing.q"),
        );
        let shown = format!("{options:?}");
        assert!(!shown.contains("amqp-pw-7f3a"), "{shown}");
        assert!(
            shown.contains("amqps://***@rabbit.example:5671/prod"),
            "{shown}"
        );
        assert!(
            shown.contains("prefetch: 32"),
            "other settings stay visible: {shown}"
        );
    }
}
