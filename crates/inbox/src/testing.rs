//! Isolation for tests against a real PostgreSQL: one fresh schema per test.
//!
//! Connections of a [`TestSchema`] pool have `search_path` set to the schema, so migrations
//! and unqualified table names land there, and tests run in parallel without seeing each
//! other's rows. The schema is dropped when the value is dropped.

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// `DATABASE_URL`, or the local default `postgres://postgres@127.0.0.1:5432/oncely`.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/oncely".to_owned())
}

/// A name no other test of this or a parallel run uses: `prefix_<pid>_<time>_<counter>`.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() % 1_000_000_000_000)
        .unwrap_or_default();
    format!(
        "{prefix}_{}_{nanos}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Why a [`TestSchema`] could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestSchemaError {
    /// The database could not be reached (is PostgreSQL running, does the database exist?).
    #[error(
        "cannot connect to {url} for a test schema ({source}); set DATABASE_URL to a database \
         the tests may create schemas in, or create the local default (createdb oncely)"
    )]
    Connect {
        /// The database URL, without its password.
        url: String,
        /// The driver's error.
        source: diesel::ConnectionError,
    },
    /// The schema could not be created.
    #[error("cannot create the test schema: {0}")]
    Create(#[from] diesel::result::Error),
    /// A migration failed in the new schema.
    #[error("cannot apply the migrations to the test schema: {0}")]
    Migrate(#[from] crate::MigrationError),
}

/// A schema created for one test and dropped after it.
#[derive(Debug)]
pub struct TestSchema {
    name: String,
    url: String,
    base_url: String,
}

impl TestSchema {
    /// Creates a fresh schema in the database at [`database_url`]: `DATABASE_URL`, or the
    /// local `postgres://postgres@127.0.0.1:5432/oncely`.
    pub async fn create() -> Result<TestSchema, TestSchemaError> {
        Self::create_in(&database_url()).await
    }

    /// Creates a fresh schema in the database at `base_url`.
    pub async fn create_in(base_url: &str) -> Result<TestSchema, TestSchemaError> {
        let base_url = base_url.to_owned();
        let name = unique_name("oncely_test");
        let mut conn = AsyncPgConnection::establish(&base_url)
            .await
            .map_err(|source| TestSchemaError::Connect {
                url: oncely_core::redact_url(&base_url),
                source,
            })?;
        diesel::sql_query(format!("CREATE SCHEMA {name}"))
            .execute(&mut conn)
            .await?;
        let separator = if base_url.contains('?') { '&' } else { '?' };
        // The application name lets a test find (and terminate) its own backends.
        let url = format!(
            "{base_url}{separator}options=-c%20search_path%3D{name}&application_name={name}"
        );
        Ok(TestSchema {
            name,
            url,
            base_url,
        })
    }

    /// [`create`](Self::create), then applies `migrations` in order in the new schema: the same
    /// ones the service applies (say `[oncely::INBOX_MIGRATIONS,
    /// oncely::outbox::OUTBOX_MIGRATIONS, MY_MIGRATIONS]`), in one call.
    pub async fn with_migrations(
        migrations: impl IntoIterator<Item = diesel_migrations::EmbeddedMigrations>,
    ) -> Result<TestSchema, TestSchemaError> {
        let schema = Self::create().await?;
        for m in migrations {
            crate::run_migrations(schema.url(), m).await?;
        }
        Ok(schema)
    }

    /// Schema name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A database URL whose connections use this schema.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let base_url = self.base_url.clone();
        let statement = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name);
        block_on_thread(async move {
            if let Ok(mut conn) = AsyncPgConnection::establish(&base_url).await {
                let _ = diesel::sql_query(statement).execute(&mut conn).await;
            }
        });
    }
}

/// Runs `cleanup` to completion on a new thread with a runtime of its own: `Drop` cannot await,
/// and may run inside or outside a tokio runtime.
pub fn block_on_thread<F>(cleanup: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let worker = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(cleanup);
        }
    });
    let _ = worker.join();
}
