//! Batched runs against a real PostgreSQL: one transaction for many messages, one effect each,
//! and one failing message failing only itself.

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use oncely_core::{Envelope, ErrorKind, HandlerError};
use oncely_inbox::{BoxFuture, Outcome};
use std::sync::Arc;

mod common;
use common::{effects, envelope, fixture};

/// Inserts the effect; a negative amount fails with a permanent error AFTER a statement ran
/// (so the savepoint has something to undo), zero panics, 13 fails in the database.
fn handler<'c>(
    conn: &'c mut AsyncPgConnection,
    msg: Envelope<i64>,
) -> BoxFuture<'c, Result<(), HandlerError>> {
    Box::pin(async move {
        diesel::insert_into(effects::table)
            .values((
                effects::message_id.eq(msg.message_id()),
                effects::amount.eq(msg.payload),
            ))
            .execute(conn)
            .await?;
        if msg.payload < 0 {
            return Err(HandlerError::permanent("negative", "negative amount"));
        }
        if msg.payload == 0 {
            panic!("zero");
        }
        if msg.payload == 13 {
            diesel::sql_query("SELECT 1/0").execute(conn).await?;
        }
        Ok(())
    })
}

#[tokio::test]
async fn a_batch_commits_every_success_and_only_the_failures_roll_back() {
    let (inbox, _schema) = fixture().await;
    let batch = vec![
        envelope("m1", 10),
        envelope("m2", -1),
        envelope("m3", 30),
        envelope("m4", 0),
        envelope("m5", 13),
        envelope("m1", 10),
        envelope("m6", 60),
    ];
    let results = inbox.run_batch("c", batch, handler).await.expect("batch");
    assert_eq!(results.len(), 7);
    assert_eq!(
        results[0].as_ref().ok(),
        Some(&Outcome::Processed { attempts: 1 })
    );
    assert_eq!(
        results[1].as_ref().err().map(|e| e.code()),
        Some("negative")
    );
    assert_eq!(
        results[2].as_ref().ok(),
        Some(&Outcome::Processed { attempts: 1 })
    );
    assert_eq!(
        results[3].as_ref().err().map(|e| e.code()),
        Some("handler_panicked")
    );
    let division = results[4].as_ref().expect_err("database error");
    assert_eq!(division.kind(), ErrorKind::Permanent, "{division:?}");
    assert_eq!(
        results[5].as_ref().ok(),
        Some(&Outcome::Duplicate),
        "a repeat of an id in the same batch is its duplicate"
    );
    assert_eq!(
        results[6].as_ref().ok(),
        Some(&Outcome::Processed { attempts: 1 })
    );
    assert_eq!(effects(&inbox).await, ["m1", "m3", "m6"]);

    let failed = inbox.find("c", "m2").await.expect("find").expect("row");
    assert_eq!((failed.status.as_str(), failed.attempts), ("failed", 1));
    assert_eq!(failed.error_code.as_deref(), Some("negative"));
    assert_eq!(failed.processed_at, None);
    assert_eq!(inbox.count_processed("c").await.expect("count"), 3);

    // The same batch again: processed ones are duplicates, failed ones run again.
    let again = vec![envelope("m1", 10), envelope("m2", 20), envelope("m4", 40)];
    let results = inbox.run_batch("c", again, handler).await.expect("batch");
    assert_eq!(results[0].as_ref().ok(), Some(&Outcome::Duplicate));
    assert_eq!(
        results[1].as_ref().ok(),
        Some(&Outcome::Processed { attempts: 2 })
    );
    assert_eq!(
        results[2].as_ref().ok(),
        Some(&Outcome::Processed { attempts: 2 })
    );
    assert_eq!(effects(&inbox).await, ["m1", "m2", "m3", "m4", "m6"]);
    let row = inbox.find("c", "m2").await.expect("find").expect("row");
    assert_eq!((row.status.as_str(), row.error_code), ("processed", None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_batches_sharing_ids_give_one_effect_per_id() {
    let (inbox, _schema) = fixture().await;
    let inbox = Arc::new(inbox);
    // Four batches over the same 50 ids in different orders, at once, 10 rounds.
    for round in 0..10 {
        let ids: Vec<String> = (0..50).map(|i| format!("r{round}-{i}")).collect();
        let mut tasks = Vec::new();
        for k in 0..4usize {
            let inbox = inbox.clone();
            let mut batch: Vec<Envelope<i64>> =
                ids.iter().map(|id| envelope(id, 1 + k as i64)).collect();
            batch.rotate_left(k * 13);
            if k % 2 == 1 {
                batch.reverse();
            }
            tasks.push(tokio::spawn(async move {
                inbox.run_batch("c", batch, handler).await
            }));
        }
        let mut processed = 0;
        for t in tasks {
            let results = t
                .await
                .expect("task")
                .expect("the batch commits (claims never deadlock)");
            for r in &results {
                match r {
                    Ok(Outcome::Processed { .. }) => processed += 1,
                    Ok(Outcome::Duplicate) => {}
                    Err(e) => panic!("round {round}: a handler ran for a claimed id: {e:?}"),
                }
            }
        }
        assert_eq!(
            processed, 50,
            "round {round}: each id processed by exactly one batch"
        );
    }
    assert_eq!(effects(&inbox).await.len(), 500);
    assert_eq!(inbox.count_processed("c").await.expect("count"), 500);
}
