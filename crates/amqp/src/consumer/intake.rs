//! Intake: the connection loop that opens a session, takes deliveries under the concurrency
//! limit (one at a time, or gathered by the [`Batcher`]), hands them to tasks, reconnects, and
//! drains at shutdown.

use super::handle::{handle_batch, handle_delivery};
use super::{BatchOptions, ConsumerRuntime, Session, Shared};
use crate::connection::{Backoff, close_channel, close_connection, connect};
use crate::error::{AmqpError, Result, short};
use crate::publisher::ConfirmPublisher;
use crate::reconnect::ReconnectBackoff;
use crate::stats::ConsumerStats;
use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use oncely_core::health::{Kind, Registry};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

enum LoopEnd {
    Shutdown,
    ConnectionLost,
}

/// Batched mode: deliveries wait here until the batch is full or its time is up. Not started
/// when the channel closes, they go back to the queue.
struct Batcher {
    options: BatchOptions,
    pending: Vec<Delivery>,
    flush_at: tokio::time::Instant,
}

impl Batcher {
    fn new(options: BatchOptions) -> Self {
        Batcher {
            options,
            pending: Vec::new(),
            flush_at: tokio::time::Instant::now(),
        }
    }

    /// Adds `delivery`; true when the batch is full.
    fn push(&mut self, delivery: Delivery) -> bool {
        if self.pending.is_empty() {
            self.flush_at = tokio::time::Instant::now() + self.options.max_wait;
        }
        self.pending.push(delivery);
        self.pending.len() >= self.options.max_messages.max(1)
    }

    /// When the waiting batch is due, if one waits.
    fn due(&self) -> Option<tokio::time::Instant> {
        (!self.pending.is_empty()).then_some(self.flush_at)
    }

    fn take(&mut self) -> Vec<Delivery> {
        std::mem::take(&mut self.pending)
    }
}

/// A concurrency slot, or `None` when shutdown came first (or the semaphore closed).
async fn permit_or_stop(
    semaphore: &Arc<Semaphore>,
    shutdown: &mut Pin<&mut (impl Future<Output = ()> + Send)>,
) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        permit = semaphore.clone().acquire_owned() => permit.ok(),
        // Not started: it goes back to the queue when the channel closes.
        _ = shutdown.as_mut() => None,
    }
}

impl ConsumerRuntime {
    pub(super) async fn consume(&self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let shared = &self.shared;
        let options = &shared.options;
        let metrics = shared.metrics();
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
        // Held deliveries learn of the shutdown at once, not after the drain timeout.
        let stopping = shared.stopping.clone();
        let shutdown = async move {
            shutdown.await;
            stopping.cancel();
        };
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
                _ = &mut shutdown => return drain(shared, &mut tasks).await,
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
                        _ = &mut shutdown => return drain(shared, &mut tasks).await,
                    }
                }
            };
            reconnect.on_connected(Instant::now());
            broker.up();
            metrics.connected.set(1.0);
            if connected_before {
                ConsumerStats::bump(&shared.stats.reconnects);
                metrics.reconnects.increment(1);
            }
            connected_before = true;
            tracing::info!(consumer = %options.consumer_name, queue = %options.topology.queue(), "consuming");
            let session = Arc::new(session);
            let mut batcher = options
                .batch
                .filter(|_| !options.retry_in_place)
                .map(Batcher::new);
            let end = loop {
                while let Some(joined) = tasks.try_join_next() {
                    report_task_end(joined);
                }
                let due = batcher.as_ref().and_then(Batcher::due);
                tokio::select! {
                    biased;
                    _ = &mut shutdown => break LoopEnd::Shutdown,
                    _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                        let Some(batcher) = batcher.as_mut() else { continue };
                        let Some(permit) = permit_or_stop(&semaphore, &mut shutdown).await else {
                            break LoopEnd::Shutdown;
                        };
                        let batch = batcher.take();
                        let tracked = batch.iter().map(|d| shared.track(d)).collect();
                        tasks.spawn(handle_batch(shared.clone(), session.clone(), batch, permit, tracked));
                    }
                    next = consumer.next() => match next {
                        Some(Ok(delivery)) => match batcher.as_mut() {
                            Some(batcher) => {
                                if !batcher.push(delivery) {
                                    continue;
                                }
                                let Some(permit) = permit_or_stop(&semaphore, &mut shutdown).await else {
                                    break LoopEnd::Shutdown;
                                };
                                let batch = batcher.take();
                                let tracked = batch.iter().map(|d| shared.track(d)).collect();
                                tasks.spawn(handle_batch(shared.clone(), session.clone(), batch, permit, tracked));
                            }
                            None => {
                                let Some(permit) = permit_or_stop(&semaphore, &mut shutdown).await else {
                                    break LoopEnd::Shutdown;
                                };
                                let tracked = shared.track(&delivery);
                                tasks.spawn(handle_delivery(shared.clone(), session.clone(), delivery, permit, tracked));
                            }
                        },
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
                    let drained = drain(shared, &mut tasks).await;
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
                        _ = &mut shutdown => return drain(shared, &mut tasks).await,
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
