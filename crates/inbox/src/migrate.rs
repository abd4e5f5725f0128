//! Embedded migrations, run through a blocking connection on a blocking thread.

use diesel::migration::MigrationSource;
use diesel::pg::Pg;
use diesel::sql_types::{BigInt, Bool};
use diesel::{Connection, RunQueryDsl};
use diesel_async::AsyncPgConnection;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

/// The name (`<version>_<what>`) of the inbox's one migration, embedded in
/// [`INBOX_MIGRATIONS`] and written by `oncely migrations generate`: the same version either way,
/// so a service that applies both (generated files with diesel_cli, then `run_migrations` at
/// start-up) applies it once.
pub const INBOX_MIGRATION: &str = "2026-11-23-000001_create_message_inbox";

/// The inbox table and its index.
pub const INBOX_MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/inbox");

/// Migrations could not be applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrationError {
    /// No connection to the database.
    #[error("cannot connect to {url} to run migrations: {source}")]
    Connect {
        /// The database URL, without credentials.
        url: String,
        /// The driver's error.
        source: diesel::ConnectionError,
    },
    /// A migration failed.
    #[error("migration failed: {0}")]
    Apply(String),
    /// The blocking task did not finish.
    #[error("migration task failed: {0}")]
    Task(String),
}

/// Applies every pending migration of `migrations` to `database_url`; already applied ones
/// are skipped, so calling it at every start-up is safe, from several replicas at once too (see
/// [`apply_migrations`]). Works on any tokio runtime.
pub async fn run_migrations(
    database_url: &str,
    migrations: EmbeddedMigrations,
) -> Result<usize, MigrationError> {
    apply_migrations(database_url, migrations)
        .await
        .map(|applied| applied.len())
}

/// The key of the PostgreSQL advisory lock migrations are applied under (the bytes of
/// `oncelymg` as a number): one database, one migrating process at a time.
pub const MIGRATION_LOCK_KEY: i64 = 0x6f6e_6365_6c79_6d67;

/// Applies the pending migrations of `source` (embedded, or a Diesel migrations directory) to
/// `database_url` and returns the names of those it applied.
///
/// The migrations run under a session advisory lock ([`MIGRATION_LOCK_KEY`]): replicas that
/// start together wait for each other instead of racing on the same `CREATE TABLE`, and each
/// finds what the first applied. The lock ends with the connection, even if a migration fails.
///
/// A waiting process polls `pg_try_advisory_lock` between short sleeps rather than blocking in
/// `pg_advisory_lock`: a statement left waiting would hold a snapshot, and a migration that
/// runs `CREATE INDEX CONCURRENTLY` waits for every older snapshot, so the two would deadlock.
/// It logs every 10 s while it waits, and waits as long as the other process migrates.
pub async fn apply_migrations<S>(
    database_url: &str,
    source: S,
) -> Result<Vec<String>, MigrationError>
where
    S: MigrationSource<Pg> + Send + 'static,
{
    let url = database_url.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut conn =
            AsyncConnectionWrapper::<AsyncPgConnection>::establish(&url).map_err(|source| {
                MigrationError::Connect {
                    url: oncely_core::redact_url(&url),
                    source,
                }
            })?;
        take_migration_lock(&mut conn)?;
        let applied = conn
            .run_pending_migrations(source)
            .map(|applied| applied.iter().map(ToString::to_string).collect())
            .map_err(|e| MigrationError::Apply(e.to_string()));
        // The result is what the migrations did: an unlock that fails (a lost connection) changes
        // nothing, since the lock ends with the session anyway.
        let _ = diesel::sql_query("SELECT pg_advisory_unlock($1)")
            .bind::<BigInt, _>(MIGRATION_LOCK_KEY)
            .execute(&mut conn);
        applied
    })
    .await
    .map_err(|e| MigrationError::Task(e.to_string()))?
}

#[derive(diesel::QueryableByName)]
struct Locked {
    #[diesel(sql_type = Bool)]
    locked: bool,
}

/// Takes [`MIGRATION_LOCK_KEY`] for this session, polling (see [`apply_migrations`]).
fn take_migration_lock(
    conn: &mut AsyncConnectionWrapper<AsyncPgConnection>,
) -> Result<(), MigrationError> {
    let started = std::time::Instant::now();
    let mut logged = started;
    loop {
        let Locked { locked } = diesel::sql_query("SELECT pg_try_advisory_lock($1) AS locked")
            .bind::<BigInt, _>(MIGRATION_LOCK_KEY)
            .get_result(conn)
            .map_err(|e| MigrationError::Apply(format!("migration lock: {e}")))?;
        if locked {
            return Ok(());
        }
        if logged.elapsed() >= std::time::Duration::from_secs(10) {
            logged = std::time::Instant::now();
            tracing::info!(
                waited_secs = started.elapsed().as_secs(),
                "waiting for another process to finish its migrations"
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The SQL of [`INBOX_MIGRATIONS`], for tools that write it into a service's own migrations.
pub const INBOX_SQL: (&str, &str) = (
    include_str!("../../../migrations/inbox/2026-11-23-000001_create_message_inbox/up.sql"),
    include_str!("../../../migrations/inbox/2026-11-23-000001_create_message_inbox/down.sql"),
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_migration_carries_the_published_name() {
        let names: Vec<String> = MigrationSource::<Pg>::migrations(&INBOX_MIGRATIONS)
            .expect("embedded")
            .iter()
            .map(|m| m.name().to_string())
            .collect();
        assert_eq!(names, [INBOX_MIGRATION]);
    }
}
