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

/// A schema created for one test and dropped after it.
#[derive(Debug)]
pub struct TestSchema {
    name: String,
    url: String,
    base_url: String,
}

impl TestSchema {
    /// Creates a fresh schema in the database at [`database_url`].
    pub async fn create() -> Result<TestSchema, diesel::result::Error> {
        let base_url = database_url();
        let name = unique_name("oncely_test");
        let mut conn = AsyncPgConnection::establish(&base_url)
            .await
            .map_err(|e| diesel::result::Error::QueryBuilderError(Box::new(e)))?;
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
