//! What the inbox tests share: an inbox over a fresh schema that also holds a business table,
//! `effects`, and the handler that writes one effect per message.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use oncely_core::{Envelope, HandlerError, Metadata};
use oncely_inbox::testing::TestSchema;
use oncely_inbox::{
    BoxFuture, INBOX_MIGRATIONS, Inbox, InboxRow, PoolOptions, connect_pool, run_migrations,
};

diesel::table! {
    /// The handlers' business change: one row per message, committed with its inbox row.
    effects (message_id) {
        /// The message that caused the effect.
        message_id -> Text,
        /// The message's payload.
        amount -> Int8,
    }
}

/// An inbox with the default pool, and its test schema (dropped with it).
pub async fn fixture() -> (Inbox, TestSchema) {
    fixture_with(PoolOptions::default()).await
}

/// An inbox whose pool has `connections` connections, and its test schema.
pub async fn fixture_with_connections(connections: u32) -> (Inbox, TestSchema) {
    fixture_with(PoolOptions {
        max_size: connections,
        ..PoolOptions::default()
    })
    .await
}

async fn fixture_with(options: PoolOptions) -> (Inbox, TestSchema) {
    let schema = TestSchema::create().await.expect("create test schema");
    run_migrations(schema.url(), INBOX_MIGRATIONS)
        .await
        .expect("migrations");
    let pool = connect_pool(schema.url(), &options);
    let mut conn = pool.get().await.expect("connection");
    diesel::sql_query("CREATE TABLE effects (message_id TEXT PRIMARY KEY, amount BIGINT NOT NULL)")
        .execute(&mut conn)
        .await
        .expect("business table");
    drop(conn);
    (Inbox::new(pool), schema)
}

/// A message `id` carrying `amount`.
pub fn envelope(id: &str, amount: i64) -> Envelope<i64> {
    Envelope::new(Metadata::with_message_id(id), amount)
}

/// Writes the effect of message `id`.
pub async fn insert(conn: &mut AsyncPgConnection, id: &str, amount: i64) -> QueryResult<usize> {
    diesel::insert_into(effects::table)
        .values((effects::message_id.eq(id), effects::amount.eq(amount)))
        .execute(conn)
        .await
}

/// The well-behaved handler: writes the message's effect.
pub fn insert_effect<'c>(
    conn: &'c mut AsyncPgConnection,
    msg: Envelope<i64>,
) -> BoxFuture<'c, Result<(), HandlerError>> {
    Box::pin(async move {
        insert(conn, msg.message_id(), msg.payload).await?;
        Ok(())
    })
}

/// The message ids with a committed effect, in order.
pub async fn effects(inbox: &Inbox) -> Vec<String> {
    let mut conn = inbox.pool().get().await.expect("connection");
    effects::table
        .select(effects::message_id)
        .order(effects::message_id)
        .load(&mut conn)
        .await
        .expect("effects")
}

/// The inbox row of consumer `billing` for message `id`, which must exist.
pub async fn inbox_row(inbox: &Inbox, id: &str) -> InboxRow {
    inbox.find("billing", id).await.expect("find").expect("row")
}
