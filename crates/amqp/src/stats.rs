//! Counters of what a consumer did, readable while it runs.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters of one consumer runtime. Shared; cheap to read.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    pub(crate) received: AtomicU64,
    pub(crate) processed: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) parked: AtomicU64,
    pub(crate) requeued: AtomicU64,
    pub(crate) held: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    pub(crate) ack_failures: AtomicU64,
    pub(crate) reconnects: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Deliveries taken from the queue.
    pub received: u64,
    /// Handled, committed and acked.
    pub processed: u64,
    /// Found already processed and acked without running the handler.
    pub duplicates: u64,
    /// Sent to a delay queue for a later attempt.
    pub retried: u64,
    /// Sent to `Q.dlq`.
    pub dead_lettered: u64,
    /// Sent to `Q.parking`.
    pub parked: u64,
    /// Given back to the queue after an infrastructure failure outlasted the hold (or at
    /// shutdown): republished to the queue's tail, or nacked with requeue under strict order.
    pub requeued: u64,
    /// Deliveries held through an infrastructure failure: kept unacked with their concurrency
    /// slot and processed again with backoff, without spending a delivery.
    pub held: u64,
    /// Deliveries taken and not settled yet, held ones included (a gauge, not a counter):
    /// zero when the consumer has nothing in hand.
    pub in_flight: u64,
    /// Acks that could not be sent (channel gone); the broker redelivers those.
    pub ack_failures: u64,
    /// Times the runtime reconnected after losing its connection.
    pub reconnects: u64,
}

impl StatsSnapshot {
    /// Deliveries that reached a final outcome (processed, duplicate, dead-lettered or parked).
    pub fn settled(&self) -> u64 {
        self.processed + self.duplicates + self.dead_lettered + self.parked
    }
}

impl ConsumerStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            received: r(&self.received),
            processed: r(&self.processed),
            duplicates: r(&self.duplicates),
            retried: r(&self.retried),
            dead_lettered: r(&self.dead_lettered),
            parked: r(&self.parked),
            requeued: r(&self.requeued),
            held: r(&self.held),
            in_flight: r(&self.in_flight),
            ack_failures: r(&self.ack_failures),
            reconnects: r(&self.reconnects),
        }
    }

    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
