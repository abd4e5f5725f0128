//! What a careless handler does to the promise, against a real PostgreSQL: a swallowed database
//! error, a nested transaction left open, a run dropped mid-way. Nothing is reported processed
//! unless its effect and its inbox row committed, and no pooled connection keeps an open
//! transaction.

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use oncely_core::{Envelope, ErrorKind, HandlerError};
use oncely_inbox::{BoxFuture, Inbox, InboxError, Outcome};
use std::time::Duration;

mod common;
use common::{effects, envelope, fixture_with_connections, insert, insert_effect};

/// Inserts its effect, then runs a statement that fails (a unique violation it "expects") and
/// ignores the error: PostgreSQL has aborted the transaction.
fn swallows_a_database_error<'c>(
    conn: &'c mut AsyncPgConnection,
    msg: Envelope<i64>,
) -> BoxFuture<'c, Result<(), HandlerError>> {
    Box::pin(async move {
        insert(conn, msg.message_id(), msg.payload).await?;
        let _ = insert(conn, msg.message_id(), msg.payload).await;
        Ok(())
    })
}

/// Inserts its effect, then lets a nested transaction be dropped before it finishes (a timeout
/// around it), and returns `Ok`.
fn drops_a_nested_transaction<'c>(
    conn: &'c mut AsyncPgConnection,
    msg: Envelope<i64>,
) -> BoxFuture<'c, Result<(), HandlerError>> {
    Box::pin(async move {
        insert(conn, msg.message_id(), msg.payload).await?;
        let id = format!("{}-nested", msg.message_id());
        let nested = conn.transaction::<_, diesel::result::Error, _>(async |conn| {
            insert(conn, &id, 1).await?;
            diesel::sql_query("SELECT pg_sleep(0.5)")
                .execute(conn)
                .await?;
            Ok(())
        });
        let _ = tokio::time::timeout(Duration::from_millis(50), nested).await;
        Ok(())
    })
}

/// Inserts its effect; on 13 it then waits in the database for 30 s.
fn stuck_in_the_database_on_13<'c>(
    conn: &'c mut AsyncPgConnection,
    msg: Envelope<i64>,
) -> BoxFuture<'c, Result<(), HandlerError>> {
    Box::pin(async move {
        insert(conn, msg.message_id(), msg.payload).await?;
        if msg.payload == 13 {
            diesel::sql_query("SELECT pg_sleep(30)")
                .execute(conn)
                .await?;
        }
        Ok(())
    })
}

/// `swallows_a_database_error` on 13, `insert_effect` otherwise.
fn swallows_on_13<'c>(
    conn: &'c mut AsyncPgConnection,
    msg: Envelope<i64>,
) -> BoxFuture<'c, Result<(), HandlerError>> {
    if msg.payload == 13 {
        swallows_a_database_error(conn, msg)
    } else {
        insert_effect(conn, msg)
    }
}

/// `drops_a_nested_transaction` on 13, `insert_effect` otherwise.
fn drops_nested_on_13<'c>(
    conn: &'c mut AsyncPgConnection,
    msg: Envelope<i64>,
) -> BoxFuture<'c, Result<(), HandlerError>> {
    if msg.payload == 13 {
        drops_a_nested_transaction(conn, msg)
    } else {
        insert_effect(conn, msg)
    }
}

fn handler_error(result: Result<Outcome, InboxError>) -> HandlerError {
    match result {
        Err(InboxError::Handler(e)) => e,
        other => panic!("expected a handler failure, got {other:?}"),
    }
}

#[tokio::test]
async fn handler_that_swallows_a_database_error_is_never_reported_processed() {
    let (inbox, _schema) = fixture_with_connections(1).await;
    let result = inbox
        .run("billing", envelope("m1", 10), swallows_a_database_error)
        .await;
    let error = handler_error(result);
    assert_eq!(error.code(), "transaction_aborted");
    assert_eq!(error.kind(), ErrorKind::Retryable);
    assert!(
        error.message().contains("aborted"),
        "the text says what happened: {}",
        error.message()
    );
    assert!(effects(&inbox).await.is_empty(), "nothing committed");
    let row = inbox.find("billing", "m1").await.expect("find");
    assert_eq!(
        row.map(|r| (r.status, r.error_code)),
        Some(("failed".to_owned(), Some("transaction_aborted".to_owned()))),
        "the failure is recorded, never a processed row without its effect"
    );
    // The message is not lost: a redelivery to a fixed handler processes it once.
    let outcome = inbox
        .run("billing", envelope("m1", 10), insert_effect)
        .await
        .expect("second run");
    assert_eq!(outcome, Outcome::Processed { attempts: 2 });
    assert_eq!(effects(&inbox).await, ["m1"]);
}

#[tokio::test]
async fn handler_that_leaves_a_nested_transaction_open_is_rolled_back_not_committed() {
    let (inbox, _schema) = fixture_with_connections(1).await;
    let result = inbox
        .run("billing", envelope("m1", 10), drops_a_nested_transaction)
        .await;
    let error = handler_error(result);
    assert_eq!(error.code(), "transaction_depth_mismatch");
    assert!(effects(&inbox).await.is_empty(), "nothing committed");
    assert_ne!(
        inbox
            .find("billing", "m1")
            .await
            .expect("find")
            .map(|r| r.status),
        Some("processed".to_owned())
    );
    // The one pooled connection was replaced, not reused mid-transaction.
    let outcome = inbox
        .run("billing", envelope("m2", 20), insert_effect)
        .await
        .expect("next message");
    assert_eq!(outcome, Outcome::Processed { attempts: 1 });
    assert_eq!(effects(&inbox).await, ["m2"]);
}

#[tokio::test]
async fn run_dropped_while_its_claim_waits_leaves_no_open_transaction_in_the_pool() {
    let (inbox, schema) = fixture_with_connections(1).await;
    // Another transaction holds the claim's row lock, as a concurrent delivery of m1 would.
    let mut blocker = AsyncPgConnection::establish(schema.url())
        .await
        .expect("blocker connection");
    diesel::sql_query("BEGIN")
        .execute(&mut blocker)
        .await
        .expect("begin");
    diesel::sql_query(
        "INSERT INTO message_inbox (consumer_name, message_id, status, attempts) \
         VALUES ('billing', 'm1', 'failed', 1)",
    )
    .execute(&mut blocker)
    .await
    .expect("hold the row");
    let dropped = tokio::time::timeout(
        Duration::from_millis(300),
        inbox.run("billing", envelope("m1", 10), insert_effect),
    )
    .await;
    assert!(dropped.is_err(), "the run waited on the lock: {dropped:?}");
    diesel::sql_query("ROLLBACK")
        .execute(&mut blocker)
        .await
        .expect("release the lock");
    // The pool's only connection serves the next message; its commit must not commit the
    // dropped run's claim.
    let next = inbox
        .run("billing", envelope("m2", 20), insert_effect)
        .await
        .expect("next message");
    assert_eq!(next, Outcome::Processed { attempts: 1 });
    let redelivered = inbox
        .run("billing", envelope("m1", 10), insert_effect)
        .await
        .expect("redelivery of the dropped message");
    assert_eq!(
        redelivered,
        Outcome::Processed { attempts: 1 },
        "the dropped run left nothing behind"
    );
    assert_eq!(effects(&inbox).await, ["m1", "m2"]);
}

/// Runs m1, m2 (amount 13) and m3 in one batch through `handler`: m2 fails with `code`, and
/// m1 and m3 commit their effects all the same.
async fn only_m2_fails<F>(inbox: &Inbox, handler: F, code: &str)
where
    F: for<'c> Fn(
            &'c mut AsyncPgConnection,
            Envelope<i64>,
        ) -> BoxFuture<'c, Result<(), HandlerError>>
        + Send
        + Sync,
{
    let results = inbox
        .run_batch(
            "billing",
            vec![envelope("m1", 1), envelope("m2", 13), envelope("m3", 3)],
            handler,
        )
        .await
        .expect("the batch commits");
    assert_eq!(
        results[0].as_ref().ok(),
        Some(&Outcome::Processed { attempts: 1 })
    );
    assert_eq!(results[1].as_ref().map_err(|e| e.code()), Err(code));
    assert_eq!(
        results[2].as_ref().ok(),
        Some(&Outcome::Processed { attempts: 1 })
    );
    assert_eq!(effects(inbox).await, ["m1", "m3"]);
}

#[tokio::test]
async fn handler_that_swallows_a_database_error_fails_alone_in_a_batch() {
    let (inbox, _schema) = fixture_with_connections(2).await;
    only_m2_fails(&inbox, swallows_on_13, "transaction_aborted").await;
    let failed = inbox.find("billing", "m2").await.expect("find");
    assert_eq!(
        failed.map(|r| r.status),
        Some("failed".to_owned()),
        "the failure is recorded"
    );
}

#[tokio::test]
async fn handler_that_leaves_a_nested_transaction_open_fails_alone_in_a_batch() {
    let (inbox, _schema) = fixture_with_connections(2).await;
    only_m2_fails(&inbox, drops_nested_on_13, "transaction_depth_mismatch").await;
}

#[tokio::test]
async fn batch_handler_timeout_cancels_a_statement_stuck_in_the_database_and_records_attempts() {
    let (inbox, _schema) = fixture_with_connections(2).await;
    let inbox = inbox.with_handler_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let results = inbox
        .run_batch(
            "billing",
            vec![envelope("m1", 1), envelope("m2", 13)],
            stuck_in_the_database_on_13,
        )
        .await
        .expect("the batch settles");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the stuck statement was cancelled, not waited for ({:?})",
        started.elapsed()
    );
    for result in &results {
        assert_eq!(
            result.as_ref().map_err(|e| (e.code(), e.kind())),
            Err(("handler_timeout", ErrorKind::Retryable))
        );
    }
    assert!(effects(&inbox).await.is_empty());
    for id in ["m1", "m2"] {
        let row = inbox.find("billing", id).await.expect("find");
        assert_eq!(
            row.map(|r| (r.status, r.attempts)),
            Some(("failed".to_owned(), 1)),
            "the timed-out batch records an attempt for {id}"
        );
    }
}

#[tokio::test]
async fn message_id_with_a_nul_byte_fails_permanently_and_never_as_an_outage() {
    let (inbox, _schema) = fixture_with_connections(1).await;
    let error = handler_error(
        inbox
            .run("billing", envelope("m\0-1", 10), insert_effect)
            .await,
    );
    assert_eq!(
        (error.code(), error.kind()),
        ("invalid_message_id", ErrorKind::Permanent)
    );
    let results = inbox
        .run_batch(
            "billing",
            vec![envelope("m\0-2", 1), envelope("m3", 3)],
            insert_effect,
        )
        .await
        .expect("the batch commits its other messages");
    assert_eq!(
        results[0].as_ref().map_err(|e| e.code()),
        Err("invalid_message_id")
    );
    assert_eq!(
        results[1].as_ref().ok(),
        Some(&Outcome::Processed { attempts: 1 })
    );
    assert_eq!(effects(&inbox).await, ["m3"]);
}
