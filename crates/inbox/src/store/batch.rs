//! Batched processing: many messages, ONE transaction.

use super::{
    Inbox, InboxError, MAX_ERROR_MESSAGE_CHARS, Outcome, Transaction, panic_error, truncate,
};
use crate::store::BoxFuture;
use diesel::sql_types::{Array, Integer, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures_util::FutureExt;
use oncely_core::{Envelope, HandlerError};
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;

#[derive(diesel::QueryableByName)]
struct Claimed {
    #[diesel(sql_type = Text)]
    message_id: String,
    #[diesel(sql_type = Integer)]
    attempts: i32,
}

impl Inbox {
    /// Processes `envelopes` in ONE transaction: one statement claims every message id of the
    /// batch, each handler then runs inside a savepoint of its own, and one COMMIT makes every
    /// success durable together with its inbox row.
    ///
    /// One result per envelope, in order: `Processed`, `Duplicate` (processed before, or a
    /// repeat of an id earlier in the same batch), or the handler's error. A failing handler
    /// rolls back to its savepoint only: the others commit. Its inbox row is marked `failed`
    /// (attempts, code, text) in the same transaction.
    ///
    /// `Err` means the batch as a whole did not commit (no connection, the claim or the commit
    /// failed): nothing of it is durable, every message should be delivered again.
    ///
    /// A [handler timeout](Inbox::with_handler_timeout) bounds each handler; when one expires,
    /// the batch is abandoned and every message of it gets the retryable error
    /// `handler_timeout`.
    pub async fn run_batch<T, F>(
        &self,
        consumer: &str,
        envelopes: Vec<Envelope<T>>,
        handler: F,
    ) -> Result<Vec<Result<Outcome, HandlerError>>, InboxError>
    where
        T: Send + 'static,
        F: for<'c> Fn(
                &'c mut AsyncPgConnection,
                Envelope<T>,
            ) -> BoxFuture<'c, Result<(), HandlerError>>
            + Send
            + Sync,
    {
        let count = envelopes.len();
        if count == 0 {
            return Ok(Vec::new());
        }
        // A repeated id in one batch would make the claim touch a row twice: only its first
        // occurrence is claimed; the others are duplicates of it. The claim takes its row
        // locks in id order, so two batches sharing ids wait for each other, never deadlock.
        let mut first_of: HashMap<String, usize> = HashMap::new();
        let mut firsts: Vec<(usize, Envelope<T>)> = Vec::with_capacity(count);
        let mut unstorable: Vec<(usize, HandlerError)> = Vec::new();
        for (i, envelope) in envelopes.into_iter().enumerate() {
            if let Some(error) = super::unstorable_id(envelope.message_id()) {
                unstorable.push((i, error));
            } else if !first_of.contains_key(envelope.message_id()) {
                first_of.insert(envelope.message_id().to_owned(), i);
                firsts.push((i, envelope));
            }
        }
        let ids: Vec<String> = firsts
            .iter()
            .map(|(_, e)| e.message_id().to_owned())
            .collect();
        let limit = self.handler_timeout;
        let mut tx = Transaction::connect(&self.pool).await?;
        // Messages whose handler ran; a timed-out batch records an attempt for each.
        let mut ran: Vec<String> = Vec::new();
        let mut timed_out = false;
        let transaction = async {
            let claimed: HashMap<String, i32> = tx
                .begin_with(|conn| {
                    Box::pin(
                        diesel::sql_query(super::claim::BATCH_CLAIM)
                            .bind::<Text, _>(consumer)
                            .bind::<Array<Text>, _>(&ids)
                            .load::<Claimed>(conn),
                    )
                })
                .await?
                .into_iter()
                .map(|c| (c.message_id, c.attempts))
                .collect();
            if claimed.is_empty() {
                // Nothing was written: every message was processed before.
                tx.rollback().await?;
                return Ok(Vec::new());
            }
            let mut results = Vec::with_capacity(firsts.len());
            for (i, envelope) in firsts {
                let Some(&attempts) = claimed.get(envelope.message_id()) else {
                    results.push((i, Ok(Outcome::Duplicate)));
                    continue;
                };
                let message_id = envelope.message_id().to_owned();
                ran.push(message_id.clone());
                tx.savepoint().await?;
                let handled = AssertUnwindSafe(handler(tx.conn(), envelope)).catch_unwind();
                let handled = match limit {
                    None => handled.await,
                    Some(limit) => match tokio::time::timeout(limit, handled).await {
                        Ok(handled) => handled,
                        Err(_) => {
                            timed_out = true;
                            return Err(diesel::result::Error::RollbackTransaction);
                        }
                    },
                };
                let handled = handled.unwrap_or_else(|panic| Err(panic_error(panic)));
                let failure = match handled {
                    Ok(()) => match tx.release_savepoint().await {
                        Ok(()) => None,
                        Err(refused) => Some(refused.into_handler_error()?),
                    },
                    Err(error) => {
                        tx.undo_savepoint().await?;
                        Some(error)
                    }
                };
                match failure {
                    None => results.push((i, Ok(Outcome::Processed { attempts }))),
                    Some(error) => {
                        mark_failed(tx.conn(), consumer, &message_id, &error).await?;
                        results.push((i, Err(error)));
                    }
                }
            }
            // Fault suite: the process dies with the batch's work done, uncommitted.
            fail::fail_point!("oncely::before_commit", |_| std::process::abort());
            match tx.commit_verified().await {
                Ok(()) => Ok(results),
                // The batch's own transaction was refused or ended by a handler: nothing of it
                // is known to be durable. Every message fails with that error (retryable or
                // as classified), and on redelivery the claim tells what committed.
                Err(refused) => {
                    let error = refused.into_handler_error()?;
                    let (kind, code, text) = (
                        error.kind(),
                        error.code().to_owned(),
                        error.message().to_owned(),
                    );
                    Ok((0..count)
                        .map(|i| (i, Err(HandlerError::new(kind, code.clone(), text.clone()))))
                        .collect())
                }
            }
        };
        let result = transaction.await;
        if timed_out {
            // The handler's statement may still run on the server: cancel it now and discard
            // the connection, rather than wait for it behind a ROLLBACK.
            tx.abandon().await;
            drop(tx);
            let limit = limit.unwrap_or_default();
            let error = || {
                HandlerError::retryable(
                    "handler_timeout",
                    format!(
                        "a handler of the batch still ran after {limit:?}; the batch was \
                         cancelled and rolled back"
                    ),
                )
            };
            for message_id in &ran {
                if let Err(record) = self.record_failure(consumer, message_id, &error()).await {
                    tracing::warn!(%record, consumer, message_id, "could not record the timed-out attempt in the inbox");
                }
            }
            return Ok((0..count).map(|_| Err(error())).collect());
        }
        let settled = result?;
        drop(tx);
        let mut out: Vec<Option<Result<Outcome, HandlerError>>> =
            (0..count).map(|_| None).collect();
        for (i, r) in settled {
            out[i] = Some(r);
        }
        for (i, error) in unstorable {
            out[i] = Some(Err(error));
        }
        Ok(out
            .into_iter()
            .map(|r| r.unwrap_or(Ok(Outcome::Duplicate)))
            .collect())
    }
}

/// Turns the row the claim wrote into a failure record, inside the batch's transaction.
async fn mark_failed(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    message_id: &str,
    error: &HandlerError,
) -> Result<(), diesel::result::Error> {
    diesel::sql_query(
        "UPDATE message_inbox SET status = $5, processed_at = NULL, \
           error_code = $3, error_message = $4 \
         WHERE consumer_name = $1 AND message_id = $2",
    )
    .bind::<Text, _>(consumer)
    .bind::<Text, _>(message_id)
    .bind::<Text, _>(error.code())
    .bind::<Text, _>(&*truncate(error.message(), MAX_ERROR_MESSAGE_CHARS))
    .bind::<Text, _>(super::Status::Failed.as_str())
    .execute(conn)
    .await?;
    Ok(())
}
