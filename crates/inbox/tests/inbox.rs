//! The inbox against a real PostgreSQL: one transaction, exactly one effect.

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use oncely_core::{Envelope, ErrorKind, HandlerError, Metadata};
use oncely_inbox::testing::TestSchema;
use oncely_inbox::{
    INBOX_MIGRATIONS, Inbox, InboxError, Outcome, PoolOptions, connect_pool, run_migrations,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

mod common;
use common::{effects, fixture, inbox_row, insert_effect};

async fn effect_count(inbox: &Inbox) -> i64 {
    let mut conn = inbox.pool().get().await.expect("connection");
    effects::table
        .count()
        .get_result(&mut conn)
        .await
        .expect("count")
}

fn envelope(id: &str) -> Envelope<i64> {
    Envelope::new(Metadata::with_message_id(id), 125_000)
}

#[tokio::test]
async fn second_run_of_a_message_is_a_duplicate_and_skips_the_handler() {
    let (inbox, _schema) = fixture().await;
    let calls = Arc::new(AtomicUsize::new(0));
    for expected in [Outcome::Processed { attempts: 1 }, Outcome::Duplicate] {
        let calls = calls.clone();
        let outcome = inbox
            .run("billing", envelope("m-1"), move |conn, msg| {
                calls.fetch_add(1, Ordering::SeqCst);
                insert_effect(conn, msg)
            })
            .await
            .expect("run");
        assert_eq!(outcome, expected);
    }
    assert_eq!(AtomicUsize::load(&calls, Ordering::SeqCst), 1);
    assert_eq!(effect_count(&inbox).await, 1);
    let row = inbox_row(&inbox, "m-1").await;
    assert_eq!(row.status, "processed");
    assert!(row.processed_at.is_some());
}

#[tokio::test]
async fn claim_and_handler_change_stay_invisible_to_others_until_commit() {
    let (inbox, _schema) = fixture().await;
    let pool = inbox.pool().clone();
    inbox
        .run("billing", envelope("m-1"), move |conn, msg| {
            Box::pin(async move {
                insert_effect(conn, msg).await?;
                // Another connection sees neither the inbox row nor the business row yet: the
                // claim (sent together with BEGIN) is inside the handler's transaction.
                let mut other = pool
                    .get()
                    .await
                    .map_err(|e| HandlerError::retryable("pool", e.to_string()))?;
                let seen: i64 = diesel::sql_query(
                    "SELECT (SELECT count(*) FROM message_inbox) + (SELECT count(*) FROM effects) AS n",
                )
                .get_result::<Seen>(&mut other)
                .await?
                .n;
                assert_eq!(seen, 0, "uncommitted claim or change visible to another connection");
                Ok(())
            })
        })
        .await
        .expect("run");
    assert_eq!(effect_count(&inbox).await, 1);
}

#[derive(diesel::QueryableByName)]
struct Seen {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

#[tokio::test]
async fn handler_may_nest_a_transaction_and_roll_back_only_its_part() {
    let (inbox, _schema) = fixture().await;
    let outcome = inbox
        .run("billing", envelope("m-1"), |conn, msg| {
            Box::pin(async move {
                use diesel_async::AsyncConnection;
                // A savepoint inside the inbox transaction: its failure is the handler's to
                // handle, and only its own change goes.
                let nested = conn
                    .transaction::<(), diesel::result::Error, _>(async |conn| {
                        insert_effect_row(conn, "nested", 1).await?;
                        Err(diesel::result::Error::RollbackTransaction)
                    })
                    .await;
                assert!(nested.is_err());
                insert_effect(conn, msg).await
            })
        })
        .await
        .expect("run");
    assert_eq!(outcome, Outcome::Processed { attempts: 1 });
    assert_eq!(
        effect_count(&inbox).await,
        1,
        "only the outer change committed"
    );
    // The connection went back to the pool clean: the next run works on it.
    inbox
        .run("billing", envelope("m-2"), insert_effect)
        .await
        .expect("next run");
    assert_eq!(effect_count(&inbox).await, 2);
}

async fn insert_effect_row(
    conn: &mut AsyncPgConnection,
    id: &str,
    amount: i64,
) -> Result<(), diesel::result::Error> {
    diesel::insert_into(effects::table)
        .values((effects::message_id.eq(id), effects::amount.eq(amount)))
        .execute(conn)
        .await
        .map(|_| ())
}

#[tokio::test]
async fn claim_is_prepared_once_per_connection_and_reused() {
    let schema = TestSchema::create().await.expect("create test schema");
    run_migrations(schema.url(), INBOX_MIGRATIONS)
        .await
        .expect("migrations");
    let pool = connect_pool(
        schema.url(),
        &PoolOptions {
            max_size: 1,
            ..PoolOptions::default()
        },
    );
    let inbox = Inbox::new(pool.clone());
    for id in ["m-1", "m-2", "m-1"] {
        inbox
            .run("billing", envelope(id), |_, _| Box::pin(async { Ok(()) }))
            .await
            .expect("run");
    }
    // The one connection holds the claim as a named prepared statement: later messages skip
    // the parse, the plan and the round trip of preparing it.
    let mut conn = pool.get().await.expect("connection");
    let claims: i64 = diesel::sql_query(
        "SELECT count(*) AS n FROM pg_prepared_statements \
         WHERE statement LIKE 'INSERT INTO message_inbox%ON CONFLICT%'",
    )
    .get_result::<Seen>(&mut conn)
    .await
    .expect("prepared statements")
    .n;
    assert_eq!(claims, 1);
}

#[tokio::test]
async fn same_message_id_for_two_consumers_is_processed_by_each() {
    let (inbox, _schema) = fixture().await;
    let a = inbox
        .run("billing", envelope("m-1"), |_, _| {
            Box::pin(async { Ok(()) })
        })
        .await;
    let b = inbox
        .run("audit", envelope("m-1"), |_, _| Box::pin(async { Ok(()) }))
        .await;
    assert_eq!(a.expect("billing"), Outcome::Processed { attempts: 1 });
    assert_eq!(b.expect("audit"), Outcome::Processed { attempts: 1 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_runs_of_one_message_have_exactly_one_effect() {
    let (inbox, _schema) = fixture().await;
    for round in 0..20 {
        let id = format!("m-{round}");
        let runs = (0..4).map(|_| {
            let inbox = inbox.clone();
            let id = id.clone();
            tokio::spawn(async move {
                inbox
                    .run("billing", envelope(&id), |conn, msg| {
                        Box::pin(async move {
                            // Hold the claim a moment so the other runs pile up on its row lock.
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            insert_effect(conn, msg).await
                        })
                    })
                    .await
            })
        });
        let mut processed = 0;
        let mut duplicates = 0;
        for run in runs.collect::<Vec<_>>() {
            match run.await.expect("task").expect("run") {
                Outcome::Processed { .. } => processed += 1,
                Outcome::Duplicate => duplicates += 1,
            }
        }
        assert_eq!((processed, duplicates), (1, 3), "round {round}");
    }
    assert_eq!(effect_count(&inbox).await, 20);
}

#[tokio::test]
async fn handler_error_rolls_back_the_business_row_and_records_the_failure() {
    let (inbox, _schema) = fixture().await;
    let result = inbox
        .run("billing", envelope("m-1"), |conn, msg| {
            Box::pin(async move {
                insert_effect(conn, msg).await?;
                Err(HandlerError::retryable(
                    "gateway_down",
                    "payment gateway answered 503",
                ))
            })
        })
        .await;
    match result {
        Err(InboxError::Handler(e)) => assert_eq!(e.kind(), ErrorKind::Retryable),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(effect_count(&inbox).await, 0, "business row rolled back");
    let row = inbox
        .find("billing", "m-1")
        .await
        .expect("find")
        .expect("failure row");
    assert_eq!(row.status, "failed");
    assert_eq!(row.attempts, 1);
    assert_eq!(row.error_code.as_deref(), Some("gateway_down"));
    assert_eq!(
        row.error_message.as_deref(),
        Some("payment gateway answered 503")
    );
    assert!(row.processed_at.is_none());

    // The retry succeeds: the row turns processed and counts both attempts.
    let outcome = inbox
        .run("billing", envelope("m-1"), insert_effect)
        .await
        .expect("retry");
    assert_eq!(outcome, Outcome::Processed { attempts: 2 });
    let row = inbox_row(&inbox, "m-1").await;
    assert_eq!(row.status, "processed");
    assert_eq!(row.error_code, None);
    assert_eq!(effect_count(&inbox).await, 1);
}

#[tokio::test]
async fn constraint_violation_in_the_handler_is_permanent_and_leaves_nothing() {
    let (inbox, _schema) = fixture().await;
    inbox
        .run("billing", envelope("m-1"), insert_effect)
        .await
        .expect("first");
    // A different message whose business row collides with the first one's.
    let result = inbox
        .run("billing", envelope("m-2"), |conn, _msg| {
            insert_effect(conn, envelope("m-1"))
        })
        .await;
    match result {
        Err(InboxError::Handler(e)) => {
            assert_eq!(e.kind(), ErrorKind::Permanent);
            assert_eq!(e.code(), "db.unique_violation");
        }
        other => panic!("unexpected {other:?}"),
    }
    let row = inbox_row(&inbox, "m-2").await;
    assert_eq!(row.status, "failed");
    assert_eq!(effect_count(&inbox).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_panic_rolls_back_and_is_a_permanent_error() {
    let (inbox, _schema) = fixture().await;
    let result = inbox
        .run("billing", envelope("m-1"), |conn, msg| {
            Box::pin(async move {
                insert_effect(conn, msg).await?;
                panic!("invoice template missing");
            })
        })
        .await;
    match result {
        Err(InboxError::Handler(e)) => {
            assert_eq!(e.code(), "handler_panicked");
            assert!(e.message().contains("invoice template missing"));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(effect_count(&inbox).await, 0);
    // The pool still works after the panic.
    inbox
        .run("billing", envelope("m-2"), insert_effect)
        .await
        .expect("next message");
    assert_eq!(effect_count(&inbox).await, 1);
}

#[tokio::test]
async fn failure_record_never_overwrites_a_processed_row() {
    let (inbox, _schema) = fixture().await;
    inbox
        .run("billing", envelope("m-1"), insert_effect)
        .await
        .expect("run");
    inbox
        .record_failure(
            "billing",
            "m-1",
            &HandlerError::retryable("late", "stale failure"),
        )
        .await
        .expect("record");
    let row = inbox_row(&inbox, "m-1").await;
    assert_eq!(row.status, "processed");
    assert_eq!(row.error_code, None);
}

#[tokio::test]
async fn purge_removes_only_processed_rows_past_retention() {
    let (inbox, _schema) = fixture().await;
    for i in 0..5 {
        inbox
            .run("billing", envelope(&format!("m-{i}")), insert_effect)
            .await
            .expect("run");
    }
    inbox
        .record_failure("billing", "m-failed", &HandlerError::retryable("x", "y"))
        .await
        .expect("record");
    assert_eq!(
        inbox
            .purge_processed(Duration::from_secs(3600), 2)
            .await
            .expect("purge"),
        0,
        "nothing is old enough"
    );
    let mut conn = inbox.pool().get().await.expect("connection");
    diesel::sql_query("UPDATE message_inbox SET processed_at = now() - interval '2 hours' WHERE message_id IN ('m-0','m-1','m-2')")
        .execute(&mut conn)
        .await
        .expect("age rows");
    drop(conn);
    assert_eq!(
        inbox
            .purge_processed(Duration::from_secs(3600), 2)
            .await
            .expect("purge"),
        3
    );
    assert_eq!(inbox.count_processed("billing").await.expect("count"), 2);
    assert!(
        inbox
            .find("billing", "m-failed")
            .await
            .expect("find")
            .is_some()
    );
}

#[tokio::test]
async fn migrations_are_idempotent() {
    let schema = TestSchema::create().await.expect("schema");
    assert_eq!(
        run_migrations(schema.url(), INBOX_MIGRATIONS)
            .await
            .expect("first"),
        1
    );
    assert_eq!(
        run_migrations(schema.url(), INBOX_MIGRATIONS)
            .await
            .expect("second"),
        0
    );
}
