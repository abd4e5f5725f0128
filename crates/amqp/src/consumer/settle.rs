//! Settlement: what a [`Decision`] means for the delivery, as a pure [`plan`], and carrying it
//! out ([`settle`]).
//!
//! The plan fails safe: a decision it does not know (`Decision` is `#[non_exhaustive]` and lives
//! in another crate, so the compiler cannot warn here when one is added) is planned as a requeue,
//! never an ack.

use super::{Session, Shared};
use crate::properties::{CopyHeaders, copy_properties};
use crate::publisher::OutgoingMessage;
use crate::stats::ConsumerStats;
use crate::topology::Topology;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use oncely_core::metric_names as names;
use oncely_core::{Decision, Reason, tier_label};
use tokio::sync::OwnedSemaphorePermit;

/// What to do with a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Settlement {
    /// Ack it.
    Ack(Acked),
    /// Publish a copy with a confirm, then ack the original. When the copy cannot be confirmed,
    /// nothing is acked: the delivery is given back.
    CopyThenAck(Copy),
    /// Give it back to the queue, without spending one of its retries (after it was held as
    /// long as allowed: see `handle::hold`).
    Requeue {
        /// What failed.
        reason: Reason,
    },
}

/// Why an ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Acked {
    /// Handled and committed.
    Processed,
    /// Processed before; the handler did not run.
    Duplicate,
}

/// A copy to publish before the ack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Copy {
    /// Target queue, by name, through the default exchange.
    pub queue: String,
    /// Written to the copy's headers.
    pub reason: Reason,
    /// The attempt number the copy carries.
    pub attempt: u32,
    /// Where it goes, for the counters.
    pub kind: CopyKind,
}

/// Where a copy goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CopyKind {
    /// A delay queue, for a later attempt; the tier's label (`1s`, `250ms`).
    Retry {
        /// The tier's label.
        tier: String,
    },
    /// `Q.dlq`.
    DeadLetter,
    /// `Q.parking`.
    Park,
}

impl CopyKind {
    /// Dead letters and parked messages leave the flow: the copy says so in its headers.
    fn is_final(&self) -> bool {
        !matches!(self, CopyKind::Retry { .. })
    }
}

/// What `decision` about a delivery on attempt `attempt` means on `topology`. Pure.
pub(crate) fn plan(decision: &Decision, topology: &Topology, attempt: u32) -> Settlement {
    match decision {
        Decision::Ack => Settlement::Ack(Acked::Processed),
        Decision::AckDuplicate => Settlement::Ack(Acked::Duplicate),
        Decision::Retry {
            tier,
            next_attempt,
            reason,
            ..
        } => match (topology.retry_queue(*tier), topology.tiers().get(*tier)) {
            (Some(queue), Some(delay)) => Settlement::CopyThenAck(Copy {
                queue,
                reason: reason.clone(),
                attempt: *next_attempt,
                kind: CopyKind::Retry {
                    tier: tier_label(*delay),
                },
            }),
            _ => Settlement::CopyThenAck(Copy {
                queue: topology.dlq(),
                reason: Reason::new(
                    "retry_tier_missing",
                    format!(
                        "no delay queue for tier {tier}; last error {}: {}",
                        reason.code, reason.message
                    ),
                ),
                attempt,
                kind: CopyKind::DeadLetter,
            }),
        },
        Decision::DeadLetter { reason } => Settlement::CopyThenAck(Copy {
            queue: topology.dlq(),
            reason: reason.clone(),
            attempt,
            kind: CopyKind::DeadLetter,
        }),
        Decision::Park { reason } => Settlement::CopyThenAck(Copy {
            queue: topology.parking(),
            reason: reason.clone(),
            attempt,
            kind: CopyKind::Park,
        }),
        Decision::Requeue { reason } => Settlement::Requeue {
            reason: reason.clone(),
        },
        // Fail safe: a decision this runtime does not know is never an ack.
        unknown => Settlement::Requeue {
            reason: Reason::new(
                "unknown_decision",
                format!(
                    "this runtime does not know the decision {:?}",
                    unknown.as_str()
                ),
            ),
        },
    }
}

/// What a delivery came to, with what its settlement needs to know.
pub(crate) struct Outcome {
    pub decision: Decision,
    /// The attempt number of the delivery (from its headers).
    pub attempt: u32,
    /// The producer's timestamp, for the end-to-end latency.
    pub occurred_at: Option<u64>,
}

/// Carries out the plan for `outcome`. `permit` is the delivery's concurrency slot, released
/// before a requeue's pause.
pub(crate) async fn settle(
    shared: &Shared,
    session: &Session,
    delivery: &Delivery,
    outcome: Outcome,
    permit: Option<OwnedSemaphorePermit>,
) {
    let span = tracing::Span::current();
    span.record("decision", outcome.decision.as_str());
    let topology = &shared.options.topology;
    match plan(&outcome.decision, topology, outcome.attempt) {
        Settlement::Requeue { reason } => {
            if session.is_open() {
                tracing::warn!(code = %reason.code, reason = %reason.message, "not the message's fault, and held as long as allowed: giving it back");
            }
            give_back(shared, session, delivery, permit).await;
            return;
        }
        Settlement::Ack(acked) => count_ack(shared, acked, outcome.occurred_at),
        Settlement::CopyThenAck(copy) => {
            if copy.kind.is_final() {
                tracing::warn!(code = %copy.reason.code, reason = %copy.reason.message, to = %copy.queue, "message set aside");
            } else {
                tracing::info!(code = %copy.reason.code, reason = %copy.reason.message, to = %copy.queue, next_attempt = copy.attempt, "retrying later");
            }
            let properties = copy_properties(
                &delivery.properties,
                CopyHeaders {
                    attempt: copy.attempt,
                    reason: &copy.reason,
                    queue: topology.queue(),
                    exchange: delivery.exchange.as_str(),
                    routing_key: delivery.routing_key.as_str(),
                    final_copy: copy.kind.is_final(),
                },
            );
            // The copy must be confirmed before the ack. While it cannot be (the broker path of
            // the copy is down), the delivery is held, not handed back in a loop.
            let since = std::time::Instant::now();
            let mut retry = 0;
            loop {
                let published = session
                    .publisher
                    .publish(OutgoingMessage {
                        exchange: "",
                        routing_key: &copy.queue,
                        body: &delivery.data,
                        properties: properties.clone(),
                    })
                    .await;
                let Err(e) = published else { break };
                if !session.is_open() {
                    tracing::warn!(error = %e, to = %copy.queue, "could not publish the copy and the channel is gone; the broker redelivers the message");
                    return;
                }
                if retry == 0 {
                    ConsumerStats::bump(&shared.stats.held);
                }
                if !shared.may_hold(since) {
                    tracing::error!(error = %e, to = %copy.queue, "could not publish the copy; giving the message back");
                    nack_requeue(shared, delivery).await;
                    return;
                }
                let delay = shared.hold_delay(retry);
                tracing::warn!(error = %e, to = %copy.queue, ?delay, "could not publish the copy; holding the message unacked and trying again");
                shared.hold_for(delay).await;
                retry = retry.saturating_add(1);
            }
            count_copy(shared, &copy);
            if copy.kind.is_final() {
                // Fault suite: the process dies with the DLQ / parking copy confirmed, unacked.
                fail::fail_point!(
                    "oncely::after_dead_letter_publish",
                    |_| std::process::abort()
                );
            }
        }
    }
    match delivery.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => tracing::info!("settled"),
        Ok(false) | Err(_) => {
            ConsumerStats::bump(&shared.stats.ack_failures);
            shared.metrics().ack_failures.increment(1);
            tracing::warn!(
                "ack not sent (channel gone); the broker will redeliver and the inbox will recognise it"
            );
        }
    }
}

fn count_ack(shared: &Shared, acked: Acked, occurred_at: Option<u64>) {
    let span = tracing::Span::current();
    let metrics = shared.metrics();
    match acked {
        Acked::Processed => {
            span.record("dedup", "new");
            ConsumerStats::bump(&shared.stats.processed);
            metrics.processed.increment(1);
            if let Some(at) = occurred_at {
                let now = u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0);
                metrics.end_to_end.record(now.saturating_sub(at) as f64);
            }
        }
        Acked::Duplicate => {
            span.record("dedup", "duplicate");
            ConsumerStats::bump(&shared.stats.duplicates);
            metrics.duplicates.increment(1);
        }
    }
}

fn count_copy(shared: &Shared, copy: &Copy) {
    let stats = &shared.stats;
    let (counter, metric, tier) = match &copy.kind {
        CopyKind::Retry { tier } => (&stats.retried, names::RETRIES, Some(tier.clone())),
        CopyKind::DeadLetter => (&stats.dead_lettered, names::DEAD_LETTERED, None),
        CopyKind::Park => (&stats.parked, names::PARKED, None),
    };
    ConsumerStats::bump(counter);
    shared
        .metrics()
        .count_by_code(metric, &copy.reason.code, tier);
}

/// Gives back a delivery held as long as allowed. Republished to the queue's tail (a new message:
/// no delivery count grows, the inbox recognises the id) and then acked; under strict order, or
/// at shutdown, or when the republish fails, nacked with requeue, which keeps its place.
async fn give_back(
    shared: &Shared,
    session: &Session,
    delivery: &Delivery,
    permit: Option<OwnedSemaphorePermit>,
) {
    drop(permit);
    if !session.is_open() {
        tracing::warn!("the channel is gone; the broker redelivers the message");
        return;
    }
    if !shared.options.retry_in_place && !shared.stopping.is_cancelled() {
        let republished = session
            .publisher
            .publish(OutgoingMessage {
                exchange: "",
                routing_key: shared.options.topology.queue(),
                body: &delivery.data,
                properties: crate::properties::republish_properties(&delivery.properties),
            })
            .await;
        match republished {
            Ok(()) => {
                ConsumerStats::bump(&shared.stats.requeued);
                shared.metrics().requeued.increment(1);
                if !matches!(
                    delivery.acker.ack(BasicAckOptions::default()).await,
                    Ok(true)
                ) {
                    tracing::warn!(
                        "ack not sent (channel gone); the broker redelivers it and the inbox recognises the copy"
                    );
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not republish the held message; nacking it");
            }
        }
    }
    nack_requeue(shared, delivery).await;
}

/// Hands the delivery back to the broker, which requeues it in place.
async fn nack_requeue(shared: &Shared, delivery: &Delivery) {
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
    use std::time::Duration;

    fn topology() -> Topology {
        Topology::new("order.events", "billing.q")
            .retry_tiers(&[Duration::from_secs(1), Duration::from_secs(10)])
    }

    fn reason() -> Reason {
        Reason::new("down", "503")
    }

    #[test]
    fn ack_and_duplicate_are_plain_acks() {
        assert_eq!(
            plan(&Decision::Ack, &topology(), 1),
            Settlement::Ack(Acked::Processed)
        );
        assert_eq!(
            plan(&Decision::AckDuplicate, &topology(), 1),
            Settlement::Ack(Acked::Duplicate)
        );
    }

    #[test]
    fn retry_copies_to_its_tier_with_the_next_attempt() {
        let decision = Decision::Retry {
            tier: 1,
            delay: Duration::from_secs(10),
            next_attempt: 3,
            reason: reason(),
        };
        assert_eq!(
            plan(&decision, &topology(), 2),
            Settlement::CopyThenAck(Copy {
                queue: "billing.q.retry.10s".to_owned(),
                reason: reason(),
                attempt: 3,
                kind: CopyKind::Retry {
                    tier: "10s".to_owned()
                },
            })
        );
    }

    #[test]
    fn retry_to_a_missing_tier_dead_letters_with_the_last_error() {
        let decision = Decision::Retry {
            tier: 7,
            delay: Duration::from_secs(10),
            next_attempt: 3,
            reason: reason(),
        };
        let Settlement::CopyThenAck(copy) = plan(&decision, &topology(), 2) else {
            panic!("a copy");
        };
        assert_eq!(copy.queue, "billing.q.dlq");
        assert_eq!(copy.kind, CopyKind::DeadLetter);
        assert_eq!(copy.attempt, 2);
        assert_eq!(copy.reason.code, "retry_tier_missing");
        assert!(copy.reason.message.contains("down: 503"));
    }

    #[test]
    fn dead_letter_and_park_copy_to_their_queues_with_the_current_attempt() {
        let dead = plan(&Decision::DeadLetter { reason: reason() }, &topology(), 4);
        assert_eq!(
            dead,
            Settlement::CopyThenAck(Copy {
                queue: "billing.q.dlq".to_owned(),
                reason: reason(),
                attempt: 4,
                kind: CopyKind::DeadLetter,
            })
        );
        let parked = plan(&Decision::Park { reason: reason() }, &topology(), 1);
        assert_eq!(
            parked,
            Settlement::CopyThenAck(Copy {
                queue: "billing.q.parking".to_owned(),
                reason: reason(),
                attempt: 1,
                kind: CopyKind::Park,
            })
        );
    }

    #[test]
    fn requeue_is_a_requeue_never_an_ack() {
        assert_eq!(
            plan(&Decision::Requeue { reason: reason() }, &topology(), 1),
            Settlement::Requeue { reason: reason() }
        );
    }

    #[test]
    fn only_dead_letters_and_parked_copies_are_final() {
        assert!(CopyKind::DeadLetter.is_final());
        assert!(CopyKind::Park.is_final());
        assert!(!CopyKind::Retry { tier: "1s".into() }.is_final());
    }
}
