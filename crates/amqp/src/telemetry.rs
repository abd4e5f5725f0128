//! Metrics of the consumer runtime and the confirmed publisher, through the `metrics` facade.
//!
//! Nothing is recorded unless the application installs a recorder (the `oncely` facade's
//! `observability` module does); handles are taken when a runtime starts, so install it first.

use crate::error::AmqpError;
use crate::stats::ConsumerStats;
use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use oncely_core::metric_names as m;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// The `exchange` label of an exchange name (`amq.default` for the default exchange).
pub(crate) fn exchange_label(exchange: &str) -> String {
    if exchange.is_empty() {
        "amq.default".to_owned()
    } else {
        exchange.to_owned()
    }
}

/// Handles of one consumer runtime's metrics, labelled by queue and consumer.
pub(crate) struct ConsumerMetrics {
    queue: String,
    consumer: String,
    pub received: Counter,
    pub redelivered: Counter,
    pub processed: Counter,
    pub duplicates: Counter,
    pub requeued: Counter,
    pub ack_failures: Counter,
    pub reconnects: Counter,
    pub connected: Gauge,
    pub in_flight: Gauge,
    pub handler_duration: Histogram,
    pub end_to_end: Histogram,
}

impl ConsumerMetrics {
    pub fn new(queue: &str, consumer: &str) -> Self {
        let labels = [
            ("queue", queue.to_owned()),
            ("consumer", consumer.to_owned()),
        ];
        ConsumerMetrics {
            queue: queue.to_owned(),
            consumer: consumer.to_owned(),
            received: counter!(m::DELIVERIES_RECEIVED, &labels),
            redelivered: counter!(m::REDELIVERIES, &labels),
            processed: counter!(m::PROCESSED, &labels),
            duplicates: counter!(m::DUPLICATES, &labels),
            requeued: counter!(m::REQUEUED, &labels),
            ack_failures: counter!(m::ACK_FAILURES, &labels),
            reconnects: counter!(m::CONSUMER_RECONNECTS, &labels),
            connected: gauge!(m::CONSUMER_CONNECTED, &labels),
            in_flight: gauge!(m::IN_FLIGHT, &labels),
            handler_duration: histogram!(m::HANDLER_DURATION, &labels),
            end_to_end: histogram!(m::END_TO_END_LATENCY, &labels),
        }
    }

    /// Counts one retry, dead letter or park (`name`) with its error code and retry tier.
    pub fn count_by_code(&self, name: &'static str, code: &str, tier: Option<String>) {
        let mut labels = vec![
            ("queue", self.queue.clone()),
            ("consumer", self.consumer.clone()),
            ("code", code.to_owned()),
        ];
        if let Some(tier) = tier {
            labels.push(("tier", tier));
        }
        counter!(name, &labels).increment(1);
    }
}

/// Raises the in-flight gauge, and the consumer's `in_flight` count, for as long as it lives.
pub(crate) struct InFlight(Gauge, Arc<ConsumerStats>);

impl InFlight {
    pub fn new(gauge: &Gauge, stats: &Arc<ConsumerStats>) -> Self {
        gauge.increment(1.0);
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(gauge.clone(), stats.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.decrement(1.0);
        self.1.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One confirm awaited: raises the outstanding gauge until dropped, and times the confirm.
pub(crate) struct AwaitedConfirm {
    outstanding: Gauge,
    exchange: String,
    sent: Instant,
}

impl AwaitedConfirm {
    pub fn new(exchange: &str) -> Self {
        let exchange = exchange_label(exchange);
        let outstanding = gauge!(m::PUBLISHER_OUTSTANDING, "exchange" => exchange.clone());
        outstanding.increment(1.0);
        AwaitedConfirm {
            outstanding,
            exchange,
            sent: Instant::now(),
        }
    }

    /// The broker answered (ack or nack).
    pub fn answered(&self) {
        histogram!(m::PUBLISHER_CONFIRM_LATENCY, "exchange" => self.exchange.clone())
            .record(self.sent.elapsed().as_secs_f64());
    }
}

impl Drop for AwaitedConfirm {
    fn drop(&mut self) {
        self.outstanding.decrement(1.0);
    }
}

/// Counts the final result of one publish to `exchange`.
pub(crate) fn record_publish(exchange: &str, result: &Result<(), AmqpError>) {
    let name = match result {
        Ok(()) => m::PUBLISHER_CONFIRMED,
        Err(AmqpError::Unroutable { .. }) => m::PUBLISHER_RETURNED,
        Err(AmqpError::Nacked { .. }) => m::PUBLISHER_NACKS,
        Err(AmqpError::ConfirmTimeout { .. }) => m::PUBLISHER_CONFIRM_TIMEOUTS,
        Err(_) => return,
    };
    counter!(name, "exchange" => exchange_label(exchange)).increment(1);
}
