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
