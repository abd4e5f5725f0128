//! Operators' side of the inbox: look-ups and retention.

use super::{Inbox, InboxError, InboxRow, Status};
use crate::schema::message_inbox::dsl as inbox;
use chrono::Utc;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use std::time::Duration;

impl Inbox {
    /// The inbox row of `(consumer, message_id)`, if any.
    pub async fn find(
        &self,
        consumer: &str,
        message_id: &str,
    ) -> Result<Option<InboxRow>, InboxError> {
        let mut conn = self.pool.get().await?;
        Ok(inbox::message_inbox
            .find((consumer, message_id))
            .select(InboxRow::as_select())
            .first(&mut conn)
            .await
            .optional()?)
    }

    /// Number of processed messages of `consumer`.
    pub async fn count_processed(&self, consumer: &str) -> Result<i64, InboxError> {
        let mut conn = self.pool.get().await?;
        Ok(inbox::message_inbox
            .filter(inbox::consumer_name.eq(consumer))
            .filter(inbox::status.eq(Status::Processed.as_str()))
            .count()
            .get_result(&mut conn)
            .await?)
    }

    /// Deletes processed rows older than `retention`, `batch` rows per statement, and returns
    /// how many went.
    ///
    /// A message redelivered after its row is gone is processed again: keep `retention` well
    /// above the longest time a message can stay in a queue, a retry tier or the DLQ before
    /// being replayed.
    pub async fn purge_processed(
        &self,
        retention: Duration,
        batch: i64,
    ) -> Result<u64, InboxError> {
        self.purge_processed_of(None, retention, batch).await
    }

    /// [`Inbox::purge_processed`] for one consumer only, or all when `consumer` is `None`.
    /// Each batch is its own short statement, so running consumers are never blocked for long.
    pub async fn purge_processed_of(
        &self,
        consumer: Option<&str>,
        retention: Duration,
        batch: i64,
    ) -> Result<u64, InboxError> {
        let cutoff =
            Utc::now() - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
        let mut total = 0u64;
        loop {
            let mut conn = self.pool.get().await?;
            let mut query = inbox::message_inbox
                .select((inbox::consumer_name, inbox::message_id))
                .filter(inbox::status.eq(Status::Processed.as_str()))
                .filter(inbox::processed_at.lt(cutoff))
                .limit(batch.max(1))
                .into_boxed();
            if let Some(consumer) = consumer {
                query = query.filter(inbox::consumer_name.eq(consumer.to_owned()));
            }
            let doomed = query.load::<(String, String)>(&mut conn).await?;
            if doomed.is_empty() {
                return Ok(total);
            }
            let mut deleted = 0;
            for chunk in doomed.chunks(500) {
                let (consumers, ids): (Vec<_>, Vec<_>) = chunk.iter().cloned().unzip();
                deleted += diesel::sql_query(
                    "DELETE FROM message_inbox m USING unnest($1::text[], $2::text[]) AS d(c, i) \
                     WHERE m.consumer_name = d.c AND m.message_id = d.i AND m.status = 'processed'",
                )
                .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(consumers)
                .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(ids)
                .execute(&mut conn)
                .await?;
            }
            total += deleted as u64;
            if deleted == 0 {
                return Ok(total);
            }
        }
    }
}
