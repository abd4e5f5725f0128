//! Migrations at start-up, as replicas run them: several processes at once on one database.

use oncely_inbox::testing::TestSchema;
use oncely_inbox::{INBOX_MIGRATIONS, run_migrations};

/// Replicas of a service start together and each applies its migrations at start-up. Without
/// serialising them, two `CREATE TABLE`s of the same migration race and one replica fails
/// (`duplicate key value violates unique constraint "pg_type_typname_nsp_index"`).
#[tokio::test]
async fn replicas_applying_the_same_migrations_at_once_all_start() {
    for round in 0..5 {
        let schema = TestSchema::create().await.expect("schema");
        let runs: Vec<_> = (0..6)
            .map(|_| {
                let url = schema.url().to_owned();
                tokio::spawn(async move { run_migrations(&url, INBOX_MIGRATIONS).await })
            })
            .collect();
        let mut applied = 0;
        for run in runs {
            match run.await.expect("task") {
                Ok(n) => applied += n,
                Err(e) => panic!("round {round}: a replica failed to migrate: {e}"),
            }
        }
        assert_eq!(
            applied, 1,
            "round {round}: the one migration is applied once in all"
        );
    }
}

/// A process waiting for the migration lock must not hold a snapshot: the process that holds
/// the lock may be running `CREATE INDEX CONCURRENTLY`, which waits for every older snapshot.
/// Blocked in `pg_advisory_lock`, the waiter would deadlock with it.
#[tokio::test]
async fn a_waiting_replica_does_not_block_create_index_concurrently() {
    use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
    use oncely_inbox::MIGRATION_LOCK_KEY;
    use std::time::Duration;

    let schema = TestSchema::create().await.expect("schema");
    let mut holder = AsyncPgConnection::establish(schema.url())
        .await
        .expect("connection");
    holder
        .batch_execute(&format!(
            "CREATE TABLE t (id INT); SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"
        ))
        .await
        .expect("lock");
    let url = schema.url().to_owned();
    let waiter = tokio::spawn(async move { run_migrations(&url, INBOX_MIGRATIONS).await });
    // Let the waiter reach the lock (its own connection and first try take a few ms).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiter.is_finished(),
        "the waiter waits while the lock is held"
    );
    tokio::time::timeout(
        Duration::from_secs(20),
        holder.batch_execute("CREATE INDEX CONCURRENTLY t_id ON t (id)"),
    )
    .await
    .expect("CREATE INDEX CONCURRENTLY finished while a replica waited")
    .expect("CREATE INDEX CONCURRENTLY");
    holder
        .batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"))
        .await
        .expect("unlock");
    let applied = tokio::time::timeout(Duration::from_secs(20), waiter)
        .await
        .expect("the waiter went on once the lock was free")
        .expect("task")
        .expect("migrations");
    assert_eq!(applied, 1);
}
