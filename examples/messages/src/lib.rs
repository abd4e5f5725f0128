//! Message types of the oncely practice drill, shared by its services and tests, and the
//! command-line plumbing its binaries share.

use serde::{Deserialize, Serialize};

/// Topic exchange the order service publishes to.
pub const ORDER_EVENTS_EXCHANGE: &str = "order.events";

/// Routing key and message type of [`OrderCreated`].
pub const ORDER_CREATED_V1: &str = "order.created.v1";

/// `order.created.v1`: an order was placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderCreated {
    /// Order id, e.g. `ord-1`.
    pub order_id: String,
    /// Customer id, e.g. `cus-1`.
    pub customer_id: String,
    /// Amount in the currency's minor unit.
    pub amount_cents: i64,
    /// ISO 4217 code, e.g. `IDR`.
    pub currency: String,
}

impl OrderCreated {
    /// The producer's stable message id for this event: the same order always gets the same id,
    /// so a re-publish is recognised as a duplicate.
    pub fn message_id(&self) -> String {
        format!("{ORDER_CREATED_V1}:{}", self.order_id)
    }
}

/// The `n`th sample order of a run whose order ids start with `prefix` (`<prefix>-<n>`), as
/// the demo, the tests and the benchmarks create them.
pub fn sample_order(prefix: &str, n: usize) -> OrderCreated {
    OrderCreated {
        order_id: format!("{prefix}-{n}"),
        customer_id: format!("cus-{}", n % 97),
        amount_cents: 125_000 + n as i64,
        currency: "IDR".to_owned(),
    }
}

/// The connections every example binary takes: `--amqp-url` / `AMQP_URL` and
/// `--database-url` / `DATABASE_URL`, with the local defaults.
#[derive(clap::Args, Debug, Clone)]
pub struct Services {
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// PostgreSQL URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/oncely"
    )]
    pub database_url: String,
}

/// Logs to stderr, filtered by `RUST_LOG`, or by `default_filter` when it is not set.
pub fn init_tracing(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_of_the_design_decodes() {
        let o: OrderCreated = serde_json::from_str(
            r#"{"order_id": "ord-1", "customer_id": "cus-1", "amount_cents": 125000, "currency": "IDR"}"#,
        )
        .expect("decodes");
        assert_eq!(o.amount_cents, 125_000);
        assert_eq!(o.message_id(), "order.created.v1:ord-1");
    }
}
