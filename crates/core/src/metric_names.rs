//! Names of the metrics oncely records through the `metrics` facade, so that dashboards, alerts
//! and tests name the same series. See `docs/observability.md` for labels and meaning.
//!
//! Labels never hold an unbounded value such as a message id: `queue`, `consumer`, `exchange` and
//! `relay` are configured names, `tier` comes from the retry policy, `kind` is one of
//! `retryable` / `permanent` / `park`, `code` is an error code (oncely's own are a fixed set;
//! handler-defined codes must be a small fixed set too, see the docs).

// Consumer runtime; labels `queue`, `consumer` (and more where noted).

/// Counter: deliveries taken from the queue.
pub const DELIVERIES_RECEIVED: &str = "oncely_deliveries_received_total";
/// Counter: deliveries the broker flagged as redelivered.
pub const REDELIVERIES: &str = "oncely_deliveries_redelivered_total";
/// Counter: deliveries handled, committed and acked.
pub const PROCESSED: &str = "oncely_messages_processed_total";
/// Counter: deliveries found already processed and acked without running the handler.
pub const DUPLICATES: &str = "oncely_duplicates_total";
/// Counter: deliveries whose message id was already being handled by the same consumer in this
/// process when they arrived (concurrent duplicates, which wait on the inbox row lock).
pub const INBOX_CLAIM_CONFLICTS: &str = "oncely_inbox_claim_conflicts_total";
/// Counter: handler failures; extra labels `kind`, `code`.
pub const HANDLER_ERRORS: &str = "oncely_handler_errors_total";
/// Counter: copies sent to a delay queue; extra labels `tier`, `code`.
pub const RETRIES: &str = "oncely_retries_total";
/// Counter: copies sent to `Q.dlq`; extra label `code`.
pub const DEAD_LETTERED: &str = "oncely_dead_lettered_total";
/// Counter: copies sent to `Q.parking`; extra label `code`.
pub const PARKED: &str = "oncely_parked_total";
/// Counter: deliveries given back (nack with requeue) after an infrastructure failure.
pub const REQUEUED: &str = "oncely_requeued_total";
/// Counter: acks not sent after the commit (channel gone); the broker redelivers those.
pub const ACK_FAILURES: &str = "oncely_ack_failures_total";
/// Counter: reconnections after a lost connection.
pub const CONSUMER_RECONNECTS: &str = "oncely_consumer_reconnects_total";
/// Gauge: 1 while the consumer holds a broker connection, else 0.
pub const CONSUMER_CONNECTED: &str = "oncely_consumer_connected";
/// Gauge: deliveries being processed now.
pub const IN_FLIGHT: &str = "oncely_deliveries_in_flight";
/// Histogram, seconds: claim, handler and commit of one delivery.
pub const HANDLER_DURATION: &str = "oncely_handler_duration_seconds";
/// Histogram, seconds: from the message's `timestamp` property to its ack, for processed
/// messages that carry one (whole-second resolution, as the AMQP timestamp).
pub const END_TO_END_LATENCY: &str = "oncely_end_to_end_latency_seconds";

// Confirmed publisher; label `exchange` (`amq.default` for the default exchange).

/// Counter: publishes the broker confirmed and routed.
pub const PUBLISHER_CONFIRMED: &str = "oncely_publisher_confirmed_total";
/// Histogram, seconds: from publish to the broker's confirm.
pub const PUBLISHER_CONFIRM_LATENCY: &str = "oncely_publisher_confirm_latency_seconds";
/// Counter: publishes the broker refused (basic.nack).
pub const PUBLISHER_NACKS: &str = "oncely_publisher_nacks_total";
/// Counter: mandatory publishes returned unroutable.
pub const PUBLISHER_RETURNED: &str = "oncely_publisher_returned_total";
/// Counter: publishes whose confirm did not arrive in time.
pub const PUBLISHER_CONFIRM_TIMEOUTS: &str = "oncely_publisher_confirm_timeouts_total";
/// Gauge: confirms awaited now.
pub const PUBLISHER_OUTSTANDING: &str = "oncely_publisher_outstanding_confirms";

// Outbox relay; label `relay`.

/// Gauge: outbox rows not yet published.
pub const OUTBOX_UNPUBLISHED: &str = "oncely_outbox_unpublished_rows";
/// Gauge, seconds: age of the oldest unpublished outbox row (0 when none).
pub const OUTBOX_OLDEST_AGE: &str = "oncely_outbox_oldest_unpublished_age_seconds";
/// Counter: publish attempts of outbox rows; extra label `result` (`published` / `failed`).
pub const OUTBOX_PUBLISH_ATTEMPTS: &str = "oncely_outbox_publish_attempts_total";

/// Every name above.
pub const ALL: &[&str] = &[
    DELIVERIES_RECEIVED,
    REDELIVERIES,
    PROCESSED,
    DUPLICATES,
    INBOX_CLAIM_CONFLICTS,
    HANDLER_ERRORS,
    RETRIES,
    DEAD_LETTERED,
    PARKED,
    REQUEUED,
    ACK_FAILURES,
    CONSUMER_RECONNECTS,
    CONSUMER_CONNECTED,
    IN_FLIGHT,
    HANDLER_DURATION,
    END_TO_END_LATENCY,
    PUBLISHER_CONFIRMED,
    PUBLISHER_CONFIRM_LATENCY,
    PUBLISHER_NACKS,
    PUBLISHER_RETURNED,
    PUBLISHER_CONFIRM_TIMEOUTS,
    PUBLISHER_OUTSTANDING,
    OUTBOX_UNPUBLISHED,
    OUTBOX_OLDEST_AGE,
    OUTBOX_PUBLISH_ATTEMPTS,
];

#[cfg(test)]
mod tests {
    use super::ALL;

    /// The `oncely_*` names a text mentions, histogram suffixes removed.
    fn mentioned(text: &str) -> std::collections::BTreeSet<String> {
        text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("oncely_") && w.len() > "oncely_".len())
            .map(|w| {
                ["_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|s| w.strip_suffix(s))
                    .unwrap_or(w)
                    .to_owned()
            })
            .collect()
    }

    #[test]
    fn dashboard_uses_only_recorded_metric_names() {
        let dashboard = include_str!("../../../docs/grafana-dashboard.json");
        for name in mentioned(dashboard) {
            assert!(
                ALL.contains(&name.as_str()),
                "dashboard uses unknown {name}"
            );
        }
    }

    #[test]
    fn observability_doc_describes_every_metric() {
        let doc = mentioned(include_str!("../../../docs/observability.md"));
        for name in ALL {
            assert!(
                doc.contains(*name),
                "docs/observability.md does not describe {name}"
            );
        }
    }
}
