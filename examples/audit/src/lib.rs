//! Audit, the consumer of the oncely drill that must never miss an event: every
//! `order.created.v1` is kept once in `audit_events`, from a quorum queue that holds them while
//! audit is down.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use oncely::prelude::*;
pub use oncely_example_messages::{ORDER_CREATED_V1, ORDER_EVENTS_EXCHANGE};

/// Consumer name.
pub const CONSUMER: &str = "audit";

/// The queue audit consumes (quorum).
pub const QUEUE: &str = "audit.order-events.q";

/// The `audit_events` table.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

diesel::table! {
    /// Every event seen, once.
    audit_events (message_id) {
        /// Message id of the event.
        message_id -> Text,
        /// Its type property.
        event_type -> Nullable<Text>,
        /// `order_id` of the payload, when there is one.
        order_id -> Nullable<Text>,
        /// The payload as received.
        payload -> Jsonb,
        /// When audit stored it.
        received_at -> Timestamptz,
    }
}

/// The drill's audit topology: a quorum queue (replicated, it keeps events while audit is down)
/// bound to `order.events` for `order.created.v1`.
pub fn topology(exchange: &str, queue: &str) -> Topology {
    Topology::new(exchange, queue)
        .bind(ORDER_CREATED_V1)
        .queue_type(oncely::QueueType::Quorum)
}

/// Applies the inbox migrations and audit's own.
pub async fn migrate(database_url: &str) -> Result<(), oncely::MigrationError> {
    oncely::run_migrations(database_url, oncely::INBOX_MIGRATIONS).await?;
    oncely::run_migrations(database_url, MIGRATIONS).await?;
    Ok(())
}

/// Keeps the event. The payload is kept as any JSON: audit never refuses an event for its shape.
#[oncely::handler(consumer = "audit")]
pub async fn record_event(
    conn: &mut AsyncPgConnection,
    msg: Envelope<serde_json::Value>,
) -> Result<(), HandlerError> {
    let order_id = msg
        .payload
        .get("order_id")
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    diesel::insert_into(audit_events::table)
        .values((
            audit_events::message_id.eq(msg.message_id()),
            audit_events::event_type.eq(msg.metadata.message_type.as_deref()),
            audit_events::order_id.eq(order_id),
            audit_events::payload.eq(&msg.payload),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// Events kept.
pub async fn count_events(conn: &mut AsyncPgConnection) -> Result<i64, diesel::result::Error> {
    audit_events::table.count().get_result(conn).await
}
