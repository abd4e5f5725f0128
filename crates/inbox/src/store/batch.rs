//! Batched processing: many messages, ONE transaction.

use super::{Inbox, InboxError, MAX_ERROR_MESSAGE_CHARS, Outcome, abandon, panic_error, truncate};
use crate::store::BoxFuture;
use diesel::sql_types::{Array, Integer, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
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

enum BatchTxError {
    Db(diesel::result::Error),
}

impl From<diesel::result::Error> for BatchTxError {
    fn from(e: diesel::result::Error) -> Self {
        BatchTxError::Db(e)
    }
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
        for (i, envelope) in envelopes.into_iter().enumerate() {
            if !first_of.contains_key(envelope.message_id()) {
                first_of.insert(envelope.message_id().to_owned(), i);
                firsts.push((i, envelope));
            }
        }
        let ids: Vec<String> = firsts
            .iter()
            .map(|(_, e)| e.message_id().to_owned())
            .collect();
        let limit = self.handler_timeout;
        let mut conn = self.pool.get().await?;
        let mut timed_out = false;
        let transaction = conn
            .transaction::<Vec<(usize, Result<Outcome, HandlerError>)>, BatchTxError, _>(
                async |conn| {
                    let claimed: HashMap<String, i32> = diesel::sql_query(
                        "INSERT INTO message_inbox \
                       (consumer_name, message_id, status, attempts, processed_at) \
                     SELECT $1, id, 'processed', 1, now() FROM unnest($2::text[]) AS id ORDER BY id \
                     ON CONFLICT (consumer_name, message_id) DO UPDATE \
                       SET status = 'processed', attempts = message_inbox.attempts + 1, \
                           processed_at = now(), error_code = NULL, error_message = NULL \
                       WHERE message_inbox.status <> 'processed' \
                     RETURNING message_id, attempts",
                    )
                    .bind::<Text, _>(consumer)
                    .bind::<Array<Text>, _>(&ids)
                    .load::<Claimed>(conn)
                    .await?
                    .into_iter()
                    .map(|c| (c.message_id, c.attempts))
                    .collect();
                    let mut results = Vec::with_capacity(firsts.len());
                    for (i, envelope) in firsts {
                        let Some(&attempts) = claimed.get(envelope.message_id()) else {
                            results.push((i, Ok(Outcome::Duplicate)));
                            continue;
                        };
                        let message_id = envelope.message_id().to_owned();
                        let run = conn.transaction::<(), HandlerFailure, _>(async |conn| {
                            let handled = AssertUnwindSafe(handler(conn, envelope)).catch_unwind();
                            let handled = match limit {
                                None => handled.await,
                                Some(limit) => match tokio::time::timeout(limit, handled).await {
                                    Ok(handled) => handled,
                                    Err(_) => return Err(HandlerFailure::TimedOut),
                                },
                            };
                            handled
                                .unwrap_or_else(|panic| Err(panic_error(panic)))
                                .map_err(HandlerFailure::Handler)
                        });
                        match run.await {
                            Ok(()) => results.push((i, Ok(Outcome::Processed { attempts }))),
                            Err(HandlerFailure::Handler(error)) => {
                                mark_failed(conn, consumer, &message_id, &error).await?;
                                results.push((i, Err(error)));
                            }
                            Err(HandlerFailure::TimedOut) => {
                                timed_out = true;
                                return Err(BatchTxError::Db(
                                    diesel::result::Error::RollbackTransaction,
                                ));
                            }
                            Err(HandlerFailure::Db(e)) => return Err(BatchTxError::Db(e)),
                        }
                    }
                    // Fault suite: the process dies with the batch's work done, uncommitted.
                    fail::fail_point!("oncely::before_commit", |_| std::process::abort());
                    Ok(results)
                },
            );
        let result = transaction.await;
        if timed_out {
            abandon(&mut conn).await;
            drop(conn);
            let limit = limit.unwrap_or_default();
            return Ok((0..count)
                .map(|_| {
                    Err(HandlerError::retryable(
                        "handler_timeout",
                        format!(
                            "a handler of the batch still ran after {limit:?}; the batch was \
                             cancelled and rolled back"
                        ),
                    ))
                })
                .collect());
        }
        let settled = match result {
            Ok(settled) => settled,
            Err(BatchTxError::Db(e)) => return Err(InboxError::Database(e)),
        };
        let mut out: Vec<Option<Result<Outcome, HandlerError>>> =
            (0..count).map(|_| None).collect();
        for (i, r) in settled {
            out[i] = Some(r);
        }
        Ok(out
            .into_iter()
            .map(|r| r.unwrap_or(Ok(Outcome::Duplicate)))
            .collect())
    }
}

enum HandlerFailure {
    Handler(HandlerError),
    TimedOut,
    Db(diesel::result::Error),
}

impl From<diesel::result::Error> for HandlerFailure {
    fn from(e: diesel::result::Error) -> Self {
        HandlerFailure::Db(e)
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
        "UPDATE message_inbox SET status = 'failed', processed_at = NULL, \
           error_code = $3, error_message = $4 \
         WHERE consumer_name = $1 AND message_id = $2",
    )
    .bind::<Text, _>(consumer)
    .bind::<Text, _>(message_id)
    .bind::<Text, _>(error.code())
    .bind::<Text, _>(truncate(error.message(), MAX_ERROR_MESSAGE_CHARS))
    .execute(conn)
    .await?;
    Ok(())
}
