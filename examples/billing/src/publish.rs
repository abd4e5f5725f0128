//! Publishing a batch of orders with duplicates and poison messages, for the demo, the tests
//! and the benchmark.

use crate::{OrderCreated, order_properties, publish_order};
use oncely::amqp::ConfirmPublisher;
use oncely::lapin::BasicProperties;
use oncely::lapin::types::{AMQPValue, FieldTable};
use rand::{Rng, SeedableRng};

/// The kinds of bad input a producer can send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoisonKind {
    /// Body that is not JSON.
    InvalidJson,
    /// No `message_id` property.
    MissingMessageId,
    /// JSON with wrong field types.
    WrongFieldTypes,
    /// Content type `text/plain`.
    UnknownContentType,
    /// A `tenant_id` header that is a table.
    HeaderOfUnexpectedType,
    /// A 10 KB idempotency key.
    HugeHeader,
    /// A negative amount: valid contract, refused by the handler (permanent error).
    NegativeAmount,
}

impl PoisonKind {
    /// Every kind, in a fixed order.
    pub const ALL: [PoisonKind; 7] = [
        PoisonKind::InvalidJson,
        PoisonKind::MissingMessageId,
        PoisonKind::WrongFieldTypes,
        PoisonKind::UnknownContentType,
        PoisonKind::HeaderOfUnexpectedType,
        PoisonKind::HugeHeader,
        PoisonKind::NegativeAmount,
    ];
}

/// What to publish.
#[derive(Debug, Clone)]
pub struct PublishPlan {
    /// Prefix of the order ids, so runs do not collide (`<prefix>-<n>`).
    pub prefix: String,
    /// Distinct orders.
    pub orders: usize,
    /// Share of extra publishes that repeat an earlier order with the same message id.
    pub duplicate_rate: f64,
    /// Bad messages, cycling through [`PoisonKind::ALL`].
    pub poison: usize,
    /// Seed for the choice of duplicates.
    pub seed: u64,
}

/// What was published.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublishSummary {
    /// Distinct orders.
    pub orders: usize,
    /// Duplicate publishes.
    pub duplicates: usize,
    /// Bad messages.
    pub poison: usize,
}

impl PublishSummary {
    /// Every message published.
    pub fn total(&self) -> usize {
        self.orders + self.duplicates + self.poison
    }
}

/// The `n`th order of a run.
pub use oncely_example_messages::sample_order as order;

/// Publishes the plan to `exchange`, duplicates interleaved with the originals, each with a
/// publisher confirm.
pub async fn publish_orders(
    publisher: &ConfirmPublisher,
    exchange: &str,
    plan: &PublishPlan,
) -> Result<PublishSummary, oncely::AmqpError> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(plan.seed);
    let duplicates = (plan.orders as f64 * plan.duplicate_rate).round() as usize;
    let mut summary = PublishSummary::default();
    for n in 0..plan.orders {
        publish_order(publisher, exchange, &order(&plan.prefix, n)).await?;
        summary.orders += 1;
        // Spread the duplicates over the run, each repeating an order already sent.
        let due = (n + 1) * duplicates / plan.orders.max(1);
        while summary.duplicates < due {
            let earlier = rng.random_range(0..=n);
            publish_order(publisher, exchange, &order(&plan.prefix, earlier)).await?;
            summary.duplicates += 1;
        }
    }
    for i in 0..plan.poison {
        let kind = PoisonKind::ALL[i % PoisonKind::ALL.len()];
        publish_poison(publisher, exchange, &plan.prefix, i, kind).await?;
        summary.poison += 1;
    }
    Ok(summary)
}

/// Publishes one bad message of `kind`.
pub async fn publish_poison(
    publisher: &ConfirmPublisher,
    exchange: &str,
    prefix: &str,
    i: usize,
    kind: PoisonKind,
) -> Result<(), oncely::AmqpError> {
    let (body, properties) = poison_message(prefix, i, kind);
    crate::publish_as_order_event(publisher, exchange, &body, properties).await
}

/// Body and properties of the `i`th bad message of `kind` of a run (message id
/// `<prefix>-poison-<i>` when it has one).
pub fn poison_message(prefix: &str, i: usize, kind: PoisonKind) -> (Vec<u8>, BasicProperties) {
    let id = format!("{prefix}-poison-{i}");
    let good = order(prefix, 1_000_000 + i);
    let json = |o: &OrderCreated| serde_json::to_vec(o).unwrap_or_default();
    let base = BasicProperties::default()
        .with_message_id(id.as_str().into())
        .with_content_type("application/json".into());
    match kind {
        PoisonKind::InvalidJson => (b"{not json".to_vec(), base),
        PoisonKind::MissingMessageId => (
            json(&good),
            BasicProperties::default().with_content_type("application/json".into()),
        ),
        PoisonKind::WrongFieldTypes => (
            br#"{"order_id": 7, "customer_id": "c", "amount_cents": "lots", "currency": "IDR"}"#
                .to_vec(),
            base,
        ),
        PoisonKind::UnknownContentType => {
            (json(&good), base.with_content_type("text/plain".into()))
        }
        PoisonKind::HeaderOfUnexpectedType => {
            let mut headers = FieldTable::default();
            headers.insert(
                "tenant_id".into(),
                AMQPValue::FieldTable(FieldTable::default()),
            );
            (json(&good), base.with_headers(headers))
        }
        PoisonKind::HugeHeader => {
            let mut headers = FieldTable::default();
            headers.insert(
                "idempotency_key".into(),
                AMQPValue::LongString("k".repeat(10 * 1024).into()),
            );
            (json(&good), base.with_headers(headers))
        }
        PoisonKind::NegativeAmount => {
            let mut bad = good.clone();
            bad.amount_cents = -5;
            (
                json(&bad),
                order_properties(&bad).with_message_id(id.as_str().into()),
            )
        }
    }
}
