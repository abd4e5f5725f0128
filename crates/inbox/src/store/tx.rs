//! The inbox's own transaction: opened at a known depth, committed only when the commit proves
//! that it committed, and never handed back to the pool open.
//!
//! Three things a handler can do break a naive `COMMIT`, and each is caught here:
//! - It swallows a database error. PostgreSQL has aborted the transaction and answers `COMMIT`
//!   with the `ROLLBACK` tag and no error. The commit is therefore sent behind a probe, in one
//!   round trip (`SELECT <probe>; COMMIT`): in an aborted transaction the probe fails, the server
//!   skips the `COMMIT`, and the run fails with `transaction_aborted`.
//! - It ends the transaction itself (`COMMIT`, `ROLLBACK`). The claim sets the transaction-local
//!   setting `oncely.claim_open`; the probe divides by "is it still set", so it fails once the
//!   transaction that claimed the message is gone.
//! - It leaves a nested transaction open (its future dropped mid-way). diesel-async's depth is
//!   then one too deep and would send `RELEASE SAVEPOINT` instead of `COMMIT`. The depth is
//!   checked before the commit; a mismatch rolls everything back (`transaction_depth_mismatch`).
//!
//! The inbox sends its own `BEGIN`/`COMMIT`/`ROLLBACK` rather than going through diesel-async's
//! transaction manager, whose state the handler may have left wrong; it only keeps the manager's
//! depth in step, so the handler's own nested transactions become savepoints.
//!
//! A run dropped anywhere between `BEGIN` and the end of `COMMIT`/`ROLLBACK` (a caller's
//! timeout or `select!`, a drain's abort) leaves a [`Transaction`] that marks its connection
//! broken when dropped: the pool discards it, the server rolls the transaction back, and the
//! statement still running is cancelled. No later run can commit a dropped run's claim.

use crate::pool::Pool;
use diesel::connection::{TransactionDepthChange, TransactionManagerStatus};
use diesel::result::Error as DbError;
use diesel_async::{
    AsyncConnection, AsyncPgConnection, SimpleAsyncConnection, TransactionManager as _,
};
use std::future::Future;
use std::task::Poll;

type TransactionManager = <AsyncPgConnection as AsyncConnection>::TransactionManager;
type PooledConnection<'p> =
    diesel_async::pooled_connection::bb8::PooledConnection<'p, AsyncPgConnection>;

/// Sent as one simple query after the claims set `oncely.claim_open` (transaction-local): the
/// probe fails in an aborted transaction and once the claiming
/// transaction is gone, and the server then skips the `COMMIT`.
const VERIFY_AND_COMMIT: &str =
    "SELECT 1 / (coalesce(current_setting('oncely.claim_open', true), '') = '1')::int; COMMIT";

/// Each message of a batch runs inside this savepoint.
const MESSAGE_SAVEPOINT: &str = "SAVEPOINT oncely_message";
const RELEASE_MESSAGE_SAVEPOINT: &str = "RELEASE SAVEPOINT oncely_message";
const UNDO_MESSAGE_SAVEPOINT: &str =
    "ROLLBACK TO SAVEPOINT oncely_message; RELEASE SAVEPOINT oncely_message";

/// Why a commit (or a savepoint release) did not happen.
#[derive(Debug)]
pub(super) enum CommitError {
    /// The transaction was aborted by an error the handler did not return, or the claiming
    /// transaction was ended by the handler: nothing was committed, and the transaction is
    /// now rolled back.
    Aborted(DbError),
    /// The handler left a nested transaction open (diesel-async's depth is not the one the
    /// inbox opened at): everything was rolled back.
    DepthMismatch {
        /// The depth the inbox expected.
        expected: u32,
        /// The depth diesel-async reported, `None` when its state is broken.
        found: Option<u32>,
    },
    /// The server refused the `COMMIT` itself (a deferred constraint, a serialization
    /// failure): the transaction is rolled back, and the error is the handler's, classified as
    /// any database error it returns.
    Refused(DbError),
    /// The connection failed: whether the commit happened is unknown, and the redelivery tells,
    /// through the claim.
    Database(DbError),
}

impl CommitError {
    /// The retryable handler error a careless handler's run fails with.
    pub(super) fn into_handler_error(self) -> Result<oncely_core::HandlerError, DbError> {
        use oncely_core::HandlerError;
        match self {
            CommitError::Aborted(cause) => Ok(HandlerError::retryable(
                "transaction_aborted",
                format!(
                    "the handler returned Ok, but its transaction was aborted (a database error \
                     it did not return, or it ended the transaction itself); nothing was \
                     committed: {cause}"
                ),
            )),
            CommitError::DepthMismatch { expected, found } => Ok(HandlerError::retryable(
                "transaction_depth_mismatch",
                format!(
                    "the handler returned Ok with a nested transaction still open (depth {} \
                     where {expected} was expected: a `transaction` future dropped before it \
                     finished); everything was rolled back",
                    found.map_or_else(|| "unknown".to_owned(), |d| d.to_string())
                ),
            )),
            CommitError::Refused(e) => Ok(HandlerError::from(e)),
            CommitError::Database(e) => Err(e),
        }
    }
}

/// A pooled connection with the inbox's transaction on it. See the module docs.
pub(super) struct Transaction<'p> {
    conn: PooledConnection<'p>,
    /// Between the first poll of `BEGIN` and the end of `COMMIT`/`ROLLBACK`.
    open: bool,
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if self.open {
            self.mark_broken();
            // The statement still running (a claim waiting on a row lock, a handler's query)
            // would hold its locks until it ends: cancel it now. The connection is never used
            // again, so the cancel cannot hit anyone else's statement.
            let token = self.conn.cancel_token();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = token.cancel_query(tokio_postgres::NoTls).await;
                });
            }
        }
    }
}

impl<'p> Transaction<'p> {
    /// Takes a connection from `pool`; nothing is sent yet.
    pub(super) async fn connect(pool: &'p Pool) -> Result<Self, crate::pool::PoolError> {
        Ok(Transaction {
            conn: pool.get().await?,
            open: false,
        })
    }

    /// The connection, for the handler.
    pub(super) fn conn(&mut self) -> &mut AsyncPgConnection {
        &mut self.conn
    }

    /// The depth diesel-async's transaction manager reports, `None` when it is broken.
    fn depth(&mut self) -> Option<u32> {
        match TransactionManager::transaction_manager_status_mut(&mut *self.conn)
            .transaction_depth()
        {
            Ok(depth) => Some(depth.map_or(0, |d| d.get())),
            Err(_) => None,
        }
    }

    fn change_depth(&mut self, change: TransactionDepthChange) -> Result<(), DbError> {
        match TransactionManager::transaction_manager_status_mut(&mut *self.conn) {
            TransactionManagerStatus::Valid(valid) => valid.change_transaction_depth(change),
            TransactionManagerStatus::InError => Err(DbError::BrokenTransactionManager),
        }
    }

    /// The pool discards the connection when it comes back: the server rolls back whatever
    /// is open on it when it closes.
    fn mark_broken(&mut self) {
        TransactionManager::transaction_manager_status_mut(&mut *self.conn).set_in_error();
    }

    /// Opens the transaction and runs `claim` in it with ONE round trip (a failed claim is rolled
    /// back; `NotFound` is left to the caller): `BEGIN` is polled
    /// alone first (tokio-postgres sends requests in the order they are first polled), so it is
    /// on the wire before the claim, and the server runs them in order.
    pub(super) async fn begin_with<Q, T>(&mut self, claim: Q) -> Result<T, DbError>
    where
        Q: for<'c> FnOnce(&'c mut &'c AsyncPgConnection) -> BoxedQuery<'c, T>,
    {
        if self.depth() != Some(0) {
            return Err(DbError::AlreadyInTransaction);
        }
        self.open = true;
        let (begun, claimed) = {
            let shared: &AsyncPgConnection = &self.conn;
            let (mut for_begin, mut for_claim) = (shared, shared);
            let mut begin = std::pin::pin!(SimpleAsyncConnection::batch_execute(
                &mut for_begin,
                "BEGIN"
            ));
            let first = std::future::poll_fn(|cx| Poll::Ready(begin.as_mut().poll(cx))).await;
            let claim = claim(&mut for_claim);
            match first {
                Poll::Ready(begun) => (begun, claim.await),
                Poll::Pending => futures_util::future::join(begin, claim).await,
            }
        };
        if let Err(e) = begun {
            // The claim may have run outside any transaction: never reuse this connection.
            self.mark_broken();
            self.open = false;
            return Err(e);
        }
        if let Err(e) = self.change_depth(TransactionDepthChange::IncreaseDepth) {
            self.mark_broken();
            self.open = false;
            return Err(e);
        }
        match claimed {
            Ok(claimed) => Ok(claimed),
            // No row back is an answer (a duplicate), not a failure: the transaction stays
            // open for the caller to end.
            Err(DbError::NotFound) => Err(DbError::NotFound),
            Err(e) => {
                let _ = self.rollback().await;
                Err(e)
            }
        }
    }

    /// Commits, but only after proving the transaction is the one the inbox opened, at the
    /// depth it opened it, and not aborted. Any failure leaves the transaction rolled back (or
    /// the connection marked broken).
    pub(super) async fn commit_verified(&mut self) -> Result<(), CommitError> {
        if let Some(mismatch) = self.check_depth(1).await {
            return Err(mismatch);
        }
        match self.conn.batch_execute(VERIFY_AND_COMMIT).await {
            Ok(()) => {
                self.open = false;
                self.change_depth(TransactionDepthChange::DecreaseDepth)
                    .map_err(CommitError::Database)
            }
            Err(e) => {
                // The probe failed (the server skipped the COMMIT: the transaction is open and
                // aborted) or the COMMIT failed (it is over). ROLLBACK ends either cleanly.
                if let Err(rollback) = self.rollback().await {
                    tracing::warn!(error = %rollback, "rollback after a refused commit failed; the connection is discarded");
                }
                Err(classify_commit_error(e))
            }
        }
    }

    /// `None` when diesel-async's depth is `expected`; otherwise rolls the whole transaction
    /// back, marks the connection broken (its transaction state can no longer be trusted) and
    /// says what it found.
    async fn check_depth(&mut self, expected: u32) -> Option<CommitError> {
        let found = self.depth();
        if found == Some(expected) {
            return None;
        }
        let _ = self.conn.batch_execute("ROLLBACK").await;
        self.mark_broken();
        self.open = false;
        Some(CommitError::DepthMismatch { expected, found })
    }

    /// Rolls the whole transaction back. Sent as plain SQL, so it works whatever the handler
    /// left of diesel-async's state; when the depth is not the inbox's, the connection is
    /// discarded afterwards.
    pub(super) async fn rollback(&mut self) -> Result<(), DbError> {
        let depth = self.depth();
        let result = self.conn.batch_execute("ROLLBACK").await;
        self.open = false;
        match (&result, depth) {
            (Ok(()), Some(1)) => {
                if self
                    .change_depth(TransactionDepthChange::DecreaseDepth)
                    .is_err()
                {
                    self.mark_broken();
                }
            }
            _ => self.mark_broken(),
        }
        result
    }

    /// The run took too long: cancel the running statement on the server now (so it releases
    /// its locks) and discard the connection.
    pub(super) async fn abandon(&mut self) {
        if let Err(e) = self
            .conn
            .cancel_token()
            .cancel_query(tokio_postgres::NoTls)
            .await
        {
            tracing::warn!(error = %e, "could not cancel the timed-out statement");
        }
        self.mark_broken();
        self.open = false;
    }

    /// Opens the savepoint one message of a batch runs in.
    pub(super) async fn savepoint(&mut self) -> Result<(), DbError> {
        if self.depth() != Some(1) {
            return Err(DbError::BrokenTransactionManager);
        }
        self.conn.batch_execute(MESSAGE_SAVEPOINT).await?;
        self.change_depth(TransactionDepthChange::IncreaseDepth)
    }

    /// Keeps one message's work: releases its savepoint when the depth is the savepoint's and
    /// the release succeeds (it fails when the handler left the savepoint aborted). Otherwise
    /// undoes the message's work and says why; the batch goes on.
    pub(super) async fn release_savepoint(&mut self) -> Result<(), CommitError> {
        let found = self.depth();
        if found != Some(2) {
            self.undo_savepoint().await.map_err(CommitError::Database)?;
            return Err(CommitError::DepthMismatch { expected: 2, found });
        }
        match self.conn.batch_execute(RELEASE_MESSAGE_SAVEPOINT).await {
            Ok(()) => self
                .change_depth(TransactionDepthChange::DecreaseDepth)
                .map_err(CommitError::Database),
            Err(e) => {
                self.undo_savepoint().await.map_err(CommitError::Database)?;
                Err(CommitError::Aborted(e))
            }
        }
    }

    /// Undoes one message's work, whatever savepoints its handler left open inside it, and
    /// brings the depth back to the batch's.
    pub(super) async fn undo_savepoint(&mut self) -> Result<(), DbError> {
        self.conn.batch_execute(UNDO_MESSAGE_SAVEPOINT).await?;
        while self.depth().is_some_and(|d| d > 1) {
            self.change_depth(TransactionDepthChange::DecreaseDepth)?;
        }
        if self.depth() == Some(1) {
            Ok(())
        } else {
            Err(DbError::BrokenTransactionManager)
        }
    }
}

/// A boxed claim future borrowing a shared connection.
pub(super) type BoxedQuery<'c, T> =
    std::pin::Pin<Box<dyn Future<Output = Result<T, DbError>> + Send + 'c>>;

/// What a failed `SELECT <probe>; COMMIT` means.
///
/// diesel does not expose the SQLSTATE, so the probe's two failures are told by the server's
/// text: an aborted transaction (25P02) and a claim no longer open (the probe's division by
/// zero, 22012). A server speaking another language (`lc_messages`) makes them `Refused`
/// instead: still never a commit, and still the message's failure (a permanent `db.error`).
fn classify_commit_error(e: DbError) -> CommitError {
    use diesel::result::DatabaseErrorKind;
    match &e {
        DbError::DatabaseError(
            DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
            _,
        ) => CommitError::Database(e),
        DbError::DatabaseError(DatabaseErrorKind::Unknown, info)
            if info.message().contains("current transaction is aborted")
                || info.message().contains("division by zero") =>
        {
            CommitError::Aborted(e)
        }
        DbError::DatabaseError(..) => CommitError::Refused(e),
        _ => CommitError::Database(e),
    }
}
