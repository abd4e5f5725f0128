//! Billing, the consumer of the oncely drill: exactly one invoice per `order.created.v1`.
//!
//! The handler lives here so tests and the benchmark use the very code `main.rs` runs.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use oncely::OutgoingMessage;
use oncely::amqp::ConfirmPublisher;
use oncely::lapin::BasicProperties;
use oncely::lapin::types::{AMQPValue, FieldTable};
use oncely::prelude::*;
pub use oncely_example_messages::{ORDER_CREATED_V1, ORDER_EVENTS_EXCHANGE, OrderCreated};

mod publish;
pub use publish::{
    PoisonKind, PublishPlan, PublishSummary, order, poison_message, publish_orders, publish_poison,
};

/// Consumer name: the first half of the inbox key.
pub const CONSUMER: &str = "billing";

/// The queue billing consumes.
pub const QUEUE: &str = "billing.order-events.q";

/// Billing's own table.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

diesel::table! {
    /// One invoice per order.
    invoices (invoice_id) {
        /// Surrogate key.
        invoice_id -> Int8,
        /// The order invoiced (unique).
        order_id -> Text,
        /// Customer billed.
        customer_id -> Text,
        /// Amount in minor units.
        amount_cents -> Int8,
        /// ISO 4217 code.
        currency -> Text,
        /// When the invoice was created.
        created_at -> Timestamptz,
    }
}

/// The drill's topology: `billing.order-events.q` bound to `order.events` for `order.created.v1`.
pub fn topology() -> Topology {
    Topology::new(ORDER_EVENTS_EXCHANGE, QUEUE).bind(ORDER_CREATED_V1)
}

/// Applies the inbox migrations and billing's own.
pub async fn migrate(database_url: &str) -> Result<(), oncely::MigrationError> {
    oncely::run_migrations(database_url, oncely::INBOX_MIGRATIONS).await?;
    oncely::run_migrations(database_url, MIGRATIONS).await?;
    Ok(())
}

/// Creates the invoice of an order, inside the inbox transaction.
///
/// An amount that is not positive or a currency that is not three capital letters can never be
/// invoiced: permanent errors, so the message goes to the DLQ with the reason.
#[oncely::handler(consumer = "billing")]
pub async fn create_invoice(
    conn: &mut AsyncPgConnection,
    msg: Envelope<OrderCreated>,
) -> Result<(), HandlerError> {
    let order = &msg.payload;
    if order.amount_cents <= 0 {
        return Err(HandlerError::permanent(
            "invalid_amount",
            format!("order {} has amount {}", order.order_id, order.amount_cents),
        ));
    }
    if order.currency.len() != 3 || !order.currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(HandlerError::permanent(
            "invalid_currency",
            format!("order {} has currency {:?}", order.order_id, order.currency),
        ));
    }
    diesel::insert_into(invoices::table)
        .values((
            invoices::order_id.eq(&order.order_id),
            invoices::customer_id.eq(&order.customer_id),
            invoices::amount_cents.eq(order.amount_cents),
            invoices::currency.eq(&order.currency),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// Number of invoices whose order id starts with `prefix`.
pub async fn count_invoices(
    conn: &mut AsyncPgConnection,
    prefix: &str,
) -> Result<i64, diesel::result::Error> {
    invoices::table
        .filter(invoices::order_id.like(format!("{prefix}%")))
        .count()
        .get_result(conn)
        .await
}

/// Properties of an `order.created.v1` message as the order service sends them.
pub fn order_properties(order: &OrderCreated) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "idempotency_key".into(),
        AMQPValue::LongString(order.order_id.as_str().into()),
    );
    BasicProperties::default()
        .with_message_id(order.message_id().into())
        .with_content_type("application/json".into())
        .with_type(ORDER_CREATED_V1.into())
        .with_app_id("order-service".into())
        .with_timestamp(chrono::Utc::now().timestamp().max(0) as u64)
        .with_headers(headers)
}

/// Publishes one order to `exchange` with confirm.
pub async fn publish_order(
    publisher: &ConfirmPublisher,
    exchange: &str,
    order: &OrderCreated,
) -> Result<(), oncely::AmqpError> {
    let (body, properties) = order_message(order);
    publish_as_order_event(publisher, exchange, &body, properties).await
}

/// Publishes `body` with `properties` to `exchange` under the `order.created.v1` routing key,
/// with confirm.
pub async fn publish_as_order_event(
    publisher: &ConfirmPublisher,
    exchange: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), oncely::AmqpError> {
    publisher
        .publish(OutgoingMessage {
            exchange,
            routing_key: ORDER_CREATED_V1,
            body,
            properties,
        })
        .await
}

/// Body and properties of an `order.created.v1` message, as the order service sends it.
pub fn order_message(order: &OrderCreated) -> (Vec<u8>, BasicProperties) {
    (
        serde_json::to_vec(order).unwrap_or_default(),
        order_properties(order),
    )
}
