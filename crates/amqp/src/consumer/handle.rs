//! Handling deliveries: check the contract, run the processor (one delivery, or a batch), and
//! settle each delivery in its own span.

use super::settle::{Outcome, settle};
use super::{Session, Shared, Tracked};
use crate::properties::{raw_metadata, read_attempt};
use crate::stats::ConsumerStats;
use crate::telemetry::InFlight;
use lapin::message::Delivery;
use oncely_core::metric_names as names;
use oncely_core::{Decision, Metadata, RawMetadata, Reason, tier_label};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{Instrument, field};

/// One delivery, from the contract check to its settlement.
pub(super) async fn handle_delivery(
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
        let _in_flight = InFlight::new(&metrics.in_flight, &shared.stats);
        count_received(&shared, &delivery);
        let outcome = match Metadata::from_raw(raw, &options.limits) {
            Err(violation) => Outcome {
                decision: Decision::DeadLetter {
                    reason: Reason::from(&violation),
                },
                attempt: read_attempt(&delivery.properties),
                occurred_at: None,
            },
            Ok(mut metadata) => {
                record_metadata(&tracing::Span::current(), &metadata);
                let decision = process(&shared, &metadata, &delivery.data).await;
                let mut decision =
                    hold(&shared, &session, &metadata, &delivery.data, decision).await;
                // Strict order: retry on this very delivery, so no later message overtakes it.
                while options.retry_in_place
                    && let Decision::Retry {
                        delay,
                        next_attempt,
                        reason,
                        ..
                    } = &decision
                {
                    let (delay, next_attempt) = (*delay, *next_attempt);
                    tracing::info!(code = %reason.code, reason = %reason.message, ?delay, next_attempt, "retrying in place");
                    ConsumerStats::bump(&shared.stats.retried);
                    metrics.count_by_code(names::RETRIES, &reason.code, Some(tier_label(delay)));
                    tokio::time::sleep(delay).await;
                    metadata.attempt = next_attempt;
                    tracing::Span::current().record("attempt", metadata.attempt);
                    let retried = process(&shared, &metadata, &delivery.data).await;
                    decision = hold(&shared, &session, &metadata, &delivery.data, retried).await;
                }
                if crashes_after_commit(&shared, &session, &decision, &metadata).await {
                    return;
                }
                Outcome {
                    decision,
                    attempt: metadata.attempt,
                    occurred_at: metadata.occurred_at,
                }
            }
        };
        if matches!(outcome.decision, Decision::Ack) {
            // Fault suite: the process dies after the commit, before the ack.
            fail::fail_point!("oncely::after_commit", |_| std::process::abort());
        }
        settle(&shared, &session, &delivery, outcome, Some(permit)).await;
    }
    .instrument(span)
    .await
}

/// One delivery of a batch: its span, its checked metadata and what it came to.
struct Slot {
    delivery: Delivery,
    span: tracing::Span,
    metadata: Option<Metadata>,
    outcome: Option<Outcome>,
}

/// Processes a batch of deliveries together (batched mode), then settles each one in its own
/// span, exactly as a single delivery would be settled.
pub(super) async fn handle_batch(
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
        .map(|_| InFlight::new(&metrics.in_flight, &shared.stats))
        .collect();
    let mut slots: Vec<Slot> = deliveries
        .into_iter()
        .map(|delivery| {
            count_received(&shared, &delivery);
            let raw = raw_metadata(
                &delivery.properties,
                delivery.redelivered,
                delivery.data.len(),
            );
            let span = delivery_span(&shared, &delivery, &raw);
            match Metadata::from_raw(raw, &options.limits) {
                Err(violation) => {
                    let attempt = read_attempt(&delivery.properties);
                    Slot {
                        delivery,
                        span,
                        metadata: None,
                        outcome: Some(Outcome {
                            decision: Decision::DeadLetter {
                                reason: Reason::from(&violation),
                            },
                            attempt,
                            occurred_at: None,
                        }),
                    }
                }
                Ok(metadata) => {
                    record_metadata(&span, &metadata);
                    Slot {
                        delivery,
                        span,
                        metadata: Some(metadata),
                        outcome: None,
                    }
                }
            }
        })
        .collect();
    let items: Vec<(Metadata, &[u8])> = slots
        .iter()
        .filter_map(|s| s.metadata.clone().map(|m| (m, &s.delivery.data[..])))
        .collect();
    if !items.is_empty() {
        let count = items.len();
        let started = Instant::now();
        let batch_span = tracing::info_span!("batch", consumer = %options.consumer_name, queue = %options.topology.queue(), size = count);
        let decisions = shared
            .processor
            .process_batch(items)
            .instrument(batch_span)
            .await;
        let share = started.elapsed().as_secs_f64() / count as f64;
        for _ in 0..count {
            metrics.handler_duration.record(share);
        }
        let mut decisions = decisions.into_iter();
        for slot in slots.iter_mut() {
            if slot.outcome.is_some() {
                continue;
            }
            if let Some(metadata) = &slot.metadata {
                // Fail safe: a processor that gave fewer results than items acks nothing.
                let decision = decisions.next().unwrap_or_else(|| {
                    Decision::requeue(
                        "no_outcome",
                        "the processor gave no result for this delivery",
                    )
                });
                slot.outcome = Some(Outcome {
                    decision,
                    attempt: metadata.attempt,
                    occurred_at: metadata.occurred_at,
                });
            }
        }
    }
    hold_batch(&shared, &session, &mut slots).await;
    for slot in &slots {
        if let (Some(metadata), Some(outcome)) = (&slot.metadata, &slot.outcome)
            && crashes_after_commit(&shared, &session, &outcome.decision, metadata).await
        {
            return;
        }
    }
    if slots.iter().any(|s| {
        matches!(
            s.outcome,
            Some(Outcome {
                decision: Decision::Ack,
                ..
            })
        )
    }) {
        // Fault suite: the process dies after the batch's commit, before its acks.
        fail::fail_point!("oncely::after_commit", |_| std::process::abort());
    }
    let settles = slots.into_iter().map(|slot| {
        let outcome = slot.outcome.unwrap_or(Outcome {
            decision: Decision::requeue("not_processed", "not processed"),
            attempt: 0,
            occurred_at: None,
        });
        let (shared, session) = (&shared, &session);
        async move { settle(shared, session, &slot.delivery, outcome, None).await }
            .instrument(slot.span)
    });
    futures_util::future::join_all(settles).await;
    drop(permit);
}

/// Holds a delivery whose processing failed outside it (the database down): it stays unacked
/// and keeps its concurrency slot, so once every slot holds one, intake takes no more and the
/// prefetch stays full; it is processed again with backoff (each try is the probe) until it
/// succeeds, shutdown begins, or [`max_hold`](super::ConsumerOptions::max_hold) passes. Nothing
/// is handed back to the broker in a loop: a quorum queue counts every return toward its
/// delivery limit.
async fn hold(
    shared: &Shared,
    session: &Session,
    metadata: &Metadata,
    body: &[u8],
    decision: Decision,
) -> Decision {
    if !matches!(decision, Decision::Requeue { .. }) {
        return decision;
    }
    ConsumerStats::bump(&shared.stats.held);
    let since = Instant::now();
    let mut decision = decision;
    let mut retry = 0;
    while let Decision::Requeue { reason } = &decision {
        if !shared.may_hold(since) || !session.is_open() {
            break;
        }
        let delay = shared.hold_delay(retry);
        tracing::warn!(code = %reason.code, reason = %reason.message, ?delay, "not the message's fault: holding it unacked and trying again");
        shared.hold_for(delay).await;
        if shared.stopping.is_cancelled() {
            break;
        }
        retry = retry.saturating_add(1);
        decision = process(shared, metadata, body).await;
    }
    decision
}

/// [`hold`] for the deliveries of a batch that came to a requeue: they are processed again
/// together, with backoff, the rest of the batch waiting with them.
async fn hold_batch(shared: &Shared, session: &Session, slots: &mut [Slot]) {
    let held = |slots: &[Slot]| -> Vec<usize> {
        slots
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                s.metadata.is_some()
                    && matches!(
                        s.outcome,
                        Some(Outcome {
                            decision: Decision::Requeue { .. },
                            ..
                        })
                    )
            })
            .map(|(i, _)| i)
            .collect()
    };
    let mut waiting = held(slots);
    if waiting.is_empty() {
        return;
    }
    for _ in &waiting {
        ConsumerStats::bump(&shared.stats.held);
    }
    let since = Instant::now();
    let mut retry = 0;
    while !waiting.is_empty() && shared.may_hold(since) && session.is_open() {
        let delay = shared.hold_delay(retry);
        tracing::warn!(
            held = waiting.len(),
            ?delay,
            "batch not processed for a reason outside its messages: holding them unacked and trying again"
        );
        shared.hold_for(delay).await;
        if shared.stopping.is_cancelled() {
            break;
        }
        retry = retry.saturating_add(1);
        let items: Vec<(Metadata, &[u8])> = waiting
            .iter()
            .filter_map(|&i| {
                let slot = &slots[i];
                slot.metadata.clone().map(|m| (m, &slot.delivery.data[..]))
            })
            .collect();
        let decisions = shared.processor.process_batch(items).await;
        let mut decisions = decisions.into_iter();
        for &i in &waiting {
            if let Some(outcome) = slots[i].outcome.as_mut() {
                outcome.decision = decisions.next().unwrap_or_else(|| {
                    Decision::requeue("no_outcome", "the processor gave no result")
                });
            }
        }
        waiting = held(slots);
    }
}

/// Without the `failpoints` feature there is no fault hook.
#[cfg(not(feature = "failpoints"))]
async fn crashes_after_commit(_: &Shared, _: &Session, _: &Decision, _: &Metadata) -> bool {
    false
}

/// The test hook of [`super::FaultInjection`]: true when it closed the connection instead of
/// letting the committed delivery be acked, as a crash there would.
#[cfg(feature = "failpoints")]
async fn crashes_after_commit(
    shared: &Shared,
    session: &Session,
    decision: &Decision,
    metadata: &Metadata,
) -> bool {
    let Some(fault) = &shared.options.fault_injection else {
        return false;
    };
    if !matches!(decision, Decision::Ack) || !(fault.crash_after_commit)(metadata) {
        return false;
    }
    tracing::warn!("fault injection: closing the connection after commit, before the ack");
    crate::connection::close_connection(
        &session.connection,
        320,
        "fault injection: crash after commit",
    )
    .await;
    true
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
fn delivery_span(shared: &Shared, delivery: &Delivery, raw: &RawMetadata) -> tracing::Span {
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
async fn process(shared: &Shared, metadata: &Metadata, body: &[u8]) -> Decision {
    let started = Instant::now();
    let decision = crate::cause::with_cause(
        metadata.clone(),
        shared.processor.process(metadata.clone(), body),
    )
    .await;
    shared
        .metrics()
        .handler_duration
        .record(started.elapsed().as_secs_f64());
    decision
}
