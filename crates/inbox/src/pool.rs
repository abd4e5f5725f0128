//! A bb8 pool of `AsyncPgConnection`s with settings that suit the inbox.

use diesel_async::AsyncPgConnection;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use std::time::Duration;

/// The connection pool oncely runs transactions on.
pub type Pool = diesel_async::pooled_connection::bb8::Pool<AsyncPgConnection>;

/// Why a pool could not be built or a connection could not be had.
pub type PoolError = bb8::RunError<diesel_async::pooled_connection::PoolError>;

/// Pool settings.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Most connections open at once. Default 16: twice the default consumer concurrency, so
    /// failure records and clean-up never wait behind handlers.
    pub max_size: u32,
    /// How long a checkout waits for a connection before it fails. Default 10 s.
    pub connection_timeout: Duration,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            max_size: 16,
            connection_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct LogSink;

impl bb8::ErrorSink<diesel_async::pooled_connection::PoolError> for LogSink {
    fn sink(&self, error: diesel_async::pooled_connection::PoolError) {
        // bb8 only reports "timed out" to the caller; the real cause is only visible here.
        tracing::warn!(%error, "PostgreSQL connection failed");
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<diesel_async::pooled_connection::PoolError>> {
        Box::new(*self)
    }
}

/// Builds a pool for `database_url` without waiting for a first connection.
///
/// Connections are checked for a broken transaction state on return, not with an extra
/// `SELECT 1` per checkout: a dead connection fails its first statement, which the runtime
/// treats as a retryable infrastructure failure.
pub fn connect_pool(database_url: &str, options: &PoolOptions) -> Pool {
    let mut config = ManagerConfig::default();
    config.recycling_method = RecyclingMethod::Fast;
    let manager =
        AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(database_url, config);
    bb8::Pool::builder()
        .max_size(options.max_size)
        .connection_timeout(options.connection_timeout)
        .error_sink(Box::new(LogSink))
        .build_unchecked(manager)
}
