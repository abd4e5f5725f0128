//! Embedded migrations, run through a blocking connection on a blocking thread.

use diesel::Connection;
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
/// are skipped, so calling it at every start-up is safe. Works on any tokio runtime.
pub async fn run_migrations(
    database_url: &str,
    migrations: EmbeddedMigrations,
) -> Result<usize, MigrationError> {
    let url = database_url.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut conn =
            AsyncConnectionWrapper::<AsyncPgConnection>::establish(&url).map_err(|source| {
                MigrationError::Connect {
                    url: oncely_core::redact_url(&url),
                    source,
                }
            })?;
        conn.run_pending_migrations(migrations)
            .map(|applied| applied.len())
            .map_err(|e| MigrationError::Apply(e.to_string()))
    })
    .await
    .map_err(|e| MigrationError::Task(e.to_string()))?
}

/// The SQL of [`INBOX_MIGRATIONS`], for tools that write it into a service's own migrations.
pub const INBOX_SQL: (&str, &str) = (
    include_str!("../../../migrations/inbox/2026-11-23-000001_create_message_inbox/up.sql"),
    include_str!("../../../migrations/inbox/2026-11-23-000001_create_message_inbox/down.sql"),
);

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::migration::MigrationSource;
    use diesel::pg::Pg;

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
