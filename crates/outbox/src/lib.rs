//! The transactional outbox of oncely.
//!
//! Write the event in the same transaction as the business change with [`enqueue`]; a [`Relay`]
//! publishes it to RabbitMQ with publisher confirms and marks it published only after the broker
//! confirmed it. An event is never lost between commit and publish; an ambiguous publish (the
//! relay dies after the confirm, before the mark) is published again, and consumers deduplicate it
//! by its message id, which is the row's `id`.
//!
//! ```no_run
//! # use oncely_outbox::{NewOutboxMessage, enqueue};
//! # use diesel_async::{AsyncConnection, AsyncPgConnection};
//! # async fn demo(conn: &mut AsyncPgConnection) -> Result<(), Box<dyn std::error::Error>> {
//! let event = NewOutboxMessage::builder()
//!     .id("order.created.v1:ord-1")
//!     .aggregate("order", "ord-1")
//!     .event_type("order.created.v1")
//!     .exchange("order.events")
//!     .payload(&serde_json::json!({"order_id": "ord-1"}))
//!     .build()?;
//! conn.transaction::<_, diesel::result::Error, _>(async |conn| {
//!     // ... insert the order row ...
//!     enqueue(conn, &event).await
//! })
//! .await?;
//! # Ok(()) }
//! ```

mod message;
mod relay;
mod schema;

pub use message::{MessageError, NewOutboxMessage, NewOutboxMessageBuilder, enqueue, enqueue_many};
#[cfg(feature = "failpoints")]
pub use relay::RelayFault;
pub use relay::{
    Backlog, CycleOutcome, Relay, RelayError, RelayOptions, RelayStats, RelayStatsSnapshot,
};

use diesel_migrations::{EmbeddedMigrations, embed_migrations};

/// The name (`<version>_<what>`) of the outbox's one migration, embedded in
/// [`OUTBOX_MIGRATIONS`] and written by `oncely migrations generate`: the same version either
/// way, so applying both applies it once.
pub const OUTBOX_MIGRATION: &str = "2026-11-23-000003_create_outbox_message";

/// The `outbox_message` table, its indexes and its NOTIFY trigger.
pub const OUTBOX_MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/outbox");

/// The channel the trigger notifies and relays listen on.
pub const NOTIFY_CHANNEL: &str = "oncely_outbox";

/// The SQL of [`OUTBOX_MIGRATIONS`] (up, down), for tools that write it into a service's own
/// migrations.
pub const OUTBOX_SQL: (&str, &str) = (
    include_str!("../../../migrations/outbox/2026-11-23-000003_create_outbox_message/up.sql"),
    include_str!("../../../migrations/outbox/2026-11-23-000003_create_outbox_message/down.sql"),
);

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::migration::MigrationSource;
    use diesel::pg::Pg;

    #[test]
    fn the_embedded_migration_carries_the_published_name() {
        let names: Vec<String> = MigrationSource::<Pg>::migrations(&OUTBOX_MIGRATIONS)
            .expect("embedded")
            .iter()
            .map(|m| m.name().to_string())
            .collect();
        assert_eq!(names, [OUTBOX_MIGRATION]);
    }
}
