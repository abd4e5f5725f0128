//! The inbox store: the transactional `run`, failure records, look-ups and retention.

use crate::pool::{Pool, PoolError};
use crate::schema::message_inbox::dsl as inbox;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures_util::FutureExt;
use oncely_core::{Envelope, HandlerError};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::time::Duration;

mod admin;
mod batch;
mod claim;
mod tx;

use claim::Claim;
pub use claim::Status;

use tx::Transaction;

/// A boxed, `Send` future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Longest error text kept in the inbox.
const MAX_ERROR_MESSAGE_CHARS: usize = 2000;

/// What [`Inbox::run`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The handler ran and its change committed with the inbox row.
    Processed {
        /// How many times the handler has run for this message, this time included.
        attempts: i32,
    },
    /// The message was processed before; the handler did not run.
    Duplicate,
}

/// [`Inbox::run`] failed; nothing of the handler's work was committed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InboxError {
    /// The handler returned an error (or panicked); the transaction was rolled back.
    #[error("handler failed: {0}")]
    Handler(HandlerError),
    /// The claim, the commit or the connection failed. Whether the commit happened may be
    /// unknown: redeliver the message and let the claim tell.
    #[error("inbox database error: {0}")]
    Database(#[from] diesel::result::Error),
    /// No connection could be had from the pool.
    #[error("no database connection: {0}")]
    Pool(#[from] PoolError),
}

impl InboxError {
    /// True for database and pool failures: the message itself is not at fault.
    pub fn is_infrastructure(&self) -> bool {
        !matches!(self, InboxError::Handler(_))
    }
}

/// One inbox row, as operators see it.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = crate::schema::message_inbox)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct InboxRow {
    /// Consumer name.
    pub consumer_name: String,
    /// Message id.
    pub message_id: String,
    /// `processed` or `failed`.
    pub status: String,
    /// How many times the handler ran.
    pub attempts: i32,
    /// First seen.
    pub received_at: DateTime<Utc>,
    /// Commit time of the processing transaction.
    pub processed_at: Option<DateTime<Utc>>,
    /// Code of the last failure.
    pub error_code: Option<String>,
    /// Text of the last failure.
    pub error_message: Option<String>,
}

enum TxError {
    Db(diesel::result::Error),
    Handler(HandlerError),
}

impl From<diesel::result::Error> for TxError {
    fn from(e: diesel::result::Error) -> Self {
        TxError::Db(e)
    }
}

/// The inbox over a connection pool. Cheap to clone.
#[derive(Clone)]
pub struct Inbox {
    pool: Pool,
    handler_timeout: Option<Duration>,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("pool", &self.pool.state())
            .finish()
    }
}

impl Inbox {
    /// An inbox on `pool`; run [`crate::run_migrations`] with [`crate::INBOX_MIGRATIONS`] first.
    pub fn new(pool: Pool) -> Self {
        Inbox {
            pool,
            handler_timeout: None,
        }
    }

    /// Bounds each run: a handler (with its claim and commit) still running after `timeout` is
    /// cancelled, its statement cancelled on the server, its transaction rolled back (the
    /// connection is discarded, never reused mid-transaction), and the run fails with the
    /// retryable error `handler_timeout`.
    pub fn with_handler_timeout(mut self, timeout: Duration) -> Self {
        self.handler_timeout = Some(timeout);
        self
    }

    /// The pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Claims `(consumer, envelope.message_id)`, runs `handler` and marks the message processed,
    /// all in one transaction.
    ///
    /// A handler error or panic rolls everything back; the failure is then recorded in a separate
    /// short transaction (status `failed`, attempts, error code and text) and returned.
    pub async fn run<T, F>(
        &self,
        consumer: &str,
        envelope: Envelope<T>,
        handler: F,
    ) -> Result<Outcome, InboxError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(
                &'c mut AsyncPgConnection,
                Envelope<T>,
            ) -> BoxFuture<'c, Result<(), HandlerError>>
            + Send,
    {
        let message_id = envelope.metadata.message_id.clone();
        if let Some(unstorable) = unstorable_id(&message_id) {
            // The message's own bytes, not the database, are at fault: never an outage.
            return Err(InboxError::Handler(unstorable));
        }
        let mut tx = Transaction::connect(&self.pool).await?;
        let transaction = async {
            let claim = Claim {
                consumer,
                message_id: &message_id,
            };
            let claimed = tx
                .begin_with(|conn| Box::pin(claim.get_result::<(String, i32, String)>(conn)))
                .await
                .optional()?;
            let Some((_, attempts, _)) = claimed else {
                // Nothing was written: the message was processed before.
                tx.rollback().await?;
                return Ok(Outcome::Duplicate);
            };
            let handled = AssertUnwindSafe(handler(tx.conn(), envelope))
                .catch_unwind()
                .await
                .unwrap_or_else(|panic| Err(panic_error(panic)));
            match handled {
                Ok(()) => {
                    // Fault suite: the process dies with the handler's work done, uncommitted.
                    fail::fail_point!("oncely::before_commit", |_| std::process::abort());
                    match tx.commit_verified().await {
                        Ok(()) => Ok(Outcome::Processed { attempts }),
                        Err(refused) => Err(match refused.into_handler_error() {
                            Ok(careless) => TxError::Handler(careless),
                            Err(lost) => TxError::Db(lost),
                        }),
                    }
                }
                Err(e) => match tx.rollback().await {
                    // A broken connection is discarded anyway: the handler's error is the one
                    // worth reporting (as `AsyncConnection::transaction` does).
                    Ok(()) | Err(diesel::result::Error::BrokenTransactionManager) => {
                        Err(TxError::Handler(e))
                    }
                    Err(rollback_error) => Err(TxError::Db(rollback_error)),
                },
            }
        };
        let result = match self.handler_timeout {
            None => transaction.await,
            Some(limit) => match tokio::time::timeout(limit, transaction).await {
                Ok(result) => result,
                Err(_) => {
                    tx.abandon().await;
                    Err(TxError::Handler(HandlerError::retryable(
                        "handler_timeout",
                        format!("handler still running after {limit:?}; cancelled and rolled back"),
                    )))
                }
            },
        };
        drop(tx);
        match result {
            Ok(outcome) => Ok(outcome),
            Err(TxError::Db(e)) => Err(InboxError::Database(e)),
            Err(TxError::Handler(e)) => {
                if let Err(record) = self.record_failure(consumer, &message_id, &e).await {
                    tracing::warn!(%record, consumer, message_id, "could not record handler failure in the inbox");
                }
                Err(InboxError::Handler(e))
            }
        }
    }

    /// Records a failed attempt: status `failed`, attempts + 1, the error code and text.
    /// A row already `processed` is left alone.
    pub async fn record_failure(
        &self,
        consumer: &str,
        message_id: &str,
        error: &HandlerError,
    ) -> Result<(), InboxError> {
        let mut conn = self.pool.get().await?;
        let text = truncate(error.message(), MAX_ERROR_MESSAGE_CHARS);
        let text: &str = &text;
        let upsert = diesel::insert_into(inbox::message_inbox)
            .values((
                inbox::consumer_name.eq(consumer),
                inbox::message_id.eq(message_id),
                inbox::status.eq(Status::Failed.as_str()),
                inbox::attempts.eq(1),
                inbox::error_code.eq(error.code()),
                inbox::error_message.eq(text),
            ))
            .on_conflict((inbox::consumer_name, inbox::message_id))
            .do_update()
            .set((
                inbox::status.eq(Status::Failed.as_str()),
                inbox::attempts.eq(inbox::attempts + 1),
                inbox::error_code.eq(error.code()),
                inbox::error_message.eq(text),
            ));
        // ON CONFLICT .. DO UPDATE .. WHERE: `filter` here is the upsert's, not QueryDsl's.
        diesel::query_dsl::methods::FilterDsl::filter(
            upsert,
            inbox::status.ne(Status::Processed.as_str()),
        )
        .execute(&mut conn)
        .await?;
        Ok(())
    }
}

fn panic_error(panic: Box<dyn std::any::Any + Send>) -> HandlerError {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned());
    HandlerError::permanent("handler_panicked", format!("handler panicked: {text}"))
}

/// A message id PostgreSQL text cannot hold (a NUL byte) fails its message permanently,
/// before any statement: otherwise the claim would fail in the database for ever, looking like
/// an outage. The contract refuses such ids already; this guards direct callers of the inbox.
fn unstorable_id(message_id: &str) -> Option<HandlerError> {
    message_id.contains('\0').then(|| {
        HandlerError::permanent(
            "invalid_message_id",
            "the message id contains a NUL byte, which the inbox cannot store",
        )
    })
}

/// At most `max_chars` characters of `text`, without NUL bytes (PostgreSQL text cannot hold
/// them, and error texts may quote a message's own data).
fn truncate(text: &str, max_chars: usize) -> std::borrow::Cow<'_, str> {
    let cut = match text.char_indices().nth(max_chars) {
        Some((end, _)) => &text[..end],
        None => text,
    };
    if cut.contains('\0') {
        std::borrow::Cow::Owned(cut.replace('\0', "\\0"))
    } else {
        std::borrow::Cow::Borrowed(cut)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "hé");
        assert_eq!(truncate("abc", 10), "abc");
        assert_eq!(truncate("a\0b", 10), "a\\0b", "NUL bytes are spelled out");
    }

    #[test]
    fn panic_payloads_become_permanent_errors() {
        let e = panic_error(Box::new("boom"));
        assert_eq!(e.code(), "handler_panicked");
        assert_eq!(e.message(), "handler panicked: boom");
        let e = panic_error(Box::new(String::from("bang")));
        assert_eq!(e.message(), "handler panicked: bang");
        assert_eq!(e.kind(), oncely_core::ErrorKind::Permanent);
    }
}
