//! The PostgreSQL inbox of oncely.
//!
//! [`Inbox::run`] runs a handler inside ONE transaction that also claims the inbox row
//! `(consumer_name, message_id)` and marks it processed:
//!
//! ```text
//! BEGIN; INSERT .. ON CONFLICT DO UPDATE .. WHERE status <> 'processed' RETURNING attempts;
//!        <handler's statements>; COMMIT
//! ```
//!
//! `BEGIN` and the claim go out together and cost one round trip; the claim is prepared once per
//! pooled connection.
//!
//! The claim writes `processed` straight away: the transaction either commits the business
//! change together with that row, or rolls both back. No row back from the claim means another
//! transaction already committed this message: the outcome is [`Outcome::Duplicate`] and the
//! handler does not run. Two concurrent runs of one message id serialise on the row lock; the
//! second sees the first's commit and reports a duplicate.
//!
//! This crate knows nothing of RabbitMQ.

mod migrate;
mod pool;
pub mod schema;
mod store;

pub use migrate::{
    INBOX_MIGRATION, INBOX_MIGRATIONS, INBOX_SQL, MIGRATION_LOCK_KEY, MigrationError,
    apply_migrations, run_migrations,
};
pub use pool::{Pool, PoolError, PoolOptions, connect_pool};
pub use store::{BoxFuture, Inbox, InboxError, InboxRow, Outcome, Status};

#[cfg(feature = "testing")]
pub mod testing;
