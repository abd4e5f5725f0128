//! The order service of the oncely drill: each order row and its `order.created.v1` event are
//! written in ONE transaction; the outbox relay publishes the event with confirms.

use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use oncely::outbox::{NewOutboxMessage, enqueue};
pub use oncely_example_messages::{ORDER_CREATED_V1, ORDER_EVENTS_EXCHANGE, OrderCreated};

/// The orders table.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

diesel::table! {
    /// Orders placed.
    orders (order_id) {
        /// Order id.
        order_id -> Text,
        /// Customer.
        customer_id -> Text,
        /// Amount in minor units.
        amount_cents -> Int8,
        /// ISO 4217 code.
        currency -> Text,
        /// When it was placed.
        created_at -> Timestamptz,
    }
}

/// Applies the outbox migrations and the orders table.
pub async fn migrate(database_url: &str) -> Result<(), oncely::MigrationError> {
    oncely::run_migrations(database_url, oncely::outbox::OUTBOX_MIGRATIONS).await?;
    oncely::run_migrations(database_url, MIGRATIONS).await?;
    Ok(())
}

/// The `order.created.v1` event of `order`, to `exchange`, with the order's stable message id.
pub fn order_created(
    order: &OrderCreated,
    exchange: &str,
) -> Result<NewOutboxMessage, oncely::outbox::MessageError> {
    Ok(NewOutboxMessage::builder()
        .id(order.message_id())
        .aggregate("order", order.order_id.as_str())
        .event_type(ORDER_CREATED_V1)
        .exchange(exchange)
        .payload(order)
        .build()?
        .header("idempotency_key", order.order_id.as_str()))
}

/// Places `order`: the order row and its event commit together, or neither does.
pub async fn create_order(
    conn: &mut AsyncPgConnection,
    order: &OrderCreated,
    exchange: &str,
) -> Result<(), diesel::result::Error> {
    let event = order_created(order, exchange)
        .map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))?;
    conn.transaction::<_, diesel::result::Error, _>(async |conn| {
        diesel::insert_into(orders::table)
            .values((
                orders::order_id.eq(&order.order_id),
                orders::customer_id.eq(&order.customer_id),
                orders::amount_cents.eq(order.amount_cents),
                orders::currency.eq(&order.currency),
            ))
            .execute(conn)
            .await?;
        enqueue(conn, &event).await
    })
    .await
}

/// The `n`th order of a run whose ids start with `prefix`.
pub use oncely_example_messages::sample_order as order;
