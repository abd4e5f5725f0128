//! The relay: claim due events, publish them with confirms, mark them published.

use crate::NOTIFY_CHANNEL;
use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Double, Int4, Jsonb, Text, Timestamptz};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use futures_util::StreamExt;
use oncely_amqp::lapin::BasicProperties;
use oncely_amqp::lapin::types::{AMQPValue, FieldTable, LongString};
use oncely_amqp::{Backoff, OutgoingMessage, Publisher, ReconnectBackoff};
use oncely_core::health::{Component, Kind, Registry};
use oncely_core::metric_names as names;
use oncely_inbox::{Pool, PoolOptions, connect_pool};
use serde_json::Value;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

/// Relay settings.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Rows claimed per cycle. Default 200.
    pub batch_size: i64,
    /// Confirms awaited at once. Default 200.
    pub max_outstanding: usize,
    /// Longest wait between cycles when no notification arrives. Default 1 s.
    pub poll_interval: Duration,
    /// Backoff of a row whose publish failed, by its attempt count. Default 1 s doubling to 60 s.
    pub retry_backoff: Backoff,
    /// Published rows older than this are deleted; `None` keeps them. Default 7 days.
    pub retention: Option<Duration>,
    /// How often the clean-up runs. Default 60 s.
    pub cleanup_interval: Duration,
    /// `app_id` of published messages.
    pub app_id: Option<String>,
    /// Name of this relay in metrics (label `relay`) and health reports. Default `outbox`.
    pub name: String,
    /// How often the backlog gauges (unpublished rows, oldest unpublished age) are refreshed
    /// with a count over the unpublished rows. Default 5 s.
    pub backlog_interval: Duration,
    /// The relay's own connections, opened when first needed. Default at most 2: its loop
    /// holds one at a time (a cycle, the backlog count, the clean-up, one after another); the
    /// second serves a caller's own `cycle` or `refresh_backlog` meanwhile.
    pub pool: PoolOptions,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            batch_size: 200,
            max_outstanding: 200,
            poll_interval: Duration::from_secs(1),
            retry_backoff: Backoff {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(60),
                max_attempts: None,
            },
            retention: Some(Duration::from_secs(7 * 24 * 3600)),
            cleanup_interval: Duration::from_secs(60),
            app_id: None,
            name: "outbox".to_owned(),
            backlog_interval: Duration::from_secs(5),
            pool: PoolOptions {
                max_size: 2,
                ..PoolOptions::default()
            },
        }
    }
}

/// A test hook: publish, then die before marking (as a relay killed between confirm and commit).
/// Only with the `failpoints` feature, as the other fault hooks.
#[cfg(feature = "failpoints")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayFault {
    /// Roll the claim back after the confirms arrived, without marking anything published.
    CrashAfterConfirm,
}

/// What went wrong in a relay cycle. Publish failures are not errors: they are recorded on the
/// rows and retried.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The database failed.
    #[error("outbox database error: {0}")]
    Database(#[from] diesel::result::Error),
    /// No database connection.
    #[error("no database connection: {0}")]
    Pool(#[from] oncely_inbox::PoolError),
    /// The fault hook fired (`failpoints` feature only).
    #[cfg(feature = "failpoints")]
    #[error("fault injection: crashed after confirm, before marking")]
    InjectedCrash,
}

/// What one cycle did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CycleOutcome {
    /// Rows claimed.
    pub claimed: usize,
    /// Rows published and marked.
    pub published: usize,
    /// Rows whose publish failed (recorded, retried later).
    pub failed: usize,
}

/// The unpublished part of the outbox at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Backlog {
    /// Rows not yet published.
    pub unpublished: i64,
    /// Age of the oldest of them; zero when there is none.
    pub oldest_age: Duration,
}

#[derive(diesel::QueryableByName)]
struct BacklogRow {
    #[diesel(sql_type = BigInt)]
    unpublished: i64,
    #[diesel(sql_type = Double)]
    oldest_age_secs: f64,
}

const BACKLOG: &str = "\
SELECT count(*) AS unpublished,
       COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8 AS oldest_age_secs
FROM outbox_message WHERE published_at IS NULL";

/// Live counters of a relay.
#[derive(Debug, Default)]
pub struct RelayStats {
    published: AtomicU64,
    failed: AtomicU64,
    cycles: AtomicU64,
    purged: AtomicU64,
}

/// A copy of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStatsSnapshot {
    /// Rows published and marked.
    pub published: u64,
    /// Failed publish attempts.
    pub failed: u64,
    /// Claim-publish-mark cycles.
    pub cycles: u64,
    /// Published rows removed by the retention clean-up.
    pub purged: u64,
}

impl RelayStats {
    /// Reads the counters.
    pub fn snapshot(&self) -> RelayStatsSnapshot {
        // `load` through the trait: diesel's RunQueryDsl also has a `load`.
        let read = |c: &AtomicU64| AtomicU64::load(c, Ordering::Relaxed);
        RelayStatsSnapshot {
            published: read(&self.published),
            failed: read(&self.failed),
            cycles: read(&self.cycles),
            purged: read(&self.purged),
        }
    }
}

#[derive(diesel::QueryableByName)]
struct ClaimedRow {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Text)]
    event_type: String,
    #[diesel(sql_type = Text)]
    exchange: String,
    #[diesel(sql_type = Text)]
    routing_key: String,
    #[diesel(sql_type = Jsonb)]
    payload: Value,
    #[diesel(sql_type = Jsonb)]
    headers: Value,
    #[diesel(sql_type = Timestamptz)]
    created_at: DateTime<Utc>,
    #[diesel(sql_type = Int4)]
    publish_attempts: i32,
}

/// The claim. Only the oldest unpublished event of each aggregate is eligible, so a later event
/// can never overtake an earlier one, whichever relay holds which row; `SKIP LOCKED` lets several
/// relays share the table.
const CLAIM: &str = "\
SELECT o.id, o.event_type, o.exchange, o.routing_key, o.payload, o.headers, o.created_at, o.publish_attempts
FROM outbox_message o
WHERE o.published_at IS NULL
  AND o.next_attempt_at <= now()
  AND NOT EXISTS (
      SELECT 1 FROM outbox_message p
      WHERE p.published_at IS NULL
        AND p.aggregate_type = o.aggregate_type
        AND p.aggregate_id = o.aggregate_id
        AND p.seq < o.seq)
ORDER BY o.seq
LIMIT $1
FOR UPDATE OF o SKIP LOCKED";

const MARK_PUBLISHED: &str = "\
UPDATE outbox_message
SET published_at = now(), publish_attempts = publish_attempts + 1, last_error = NULL
WHERE id = ANY($1)";

const MARK_FAILED: &str = "\
UPDATE outbox_message o
SET publish_attempts = o.publish_attempts + 1,
    last_error = f.error,
    next_attempt_at = now() + make_interval(secs => f.delay)
FROM unnest($1::text[], $2::text[], $3::float8[]) AS f(id, error, delay)
WHERE o.id = f.id";

const PURGE: &str = "\
DELETE FROM outbox_message WHERE id IN (
    SELECT id FROM outbox_message
    WHERE published_at IS NOT NULL AND published_at < now() - make_interval(secs => $1)
    LIMIT $2)";

/// Publishes outbox rows. Several relays (threads or processes) can run over one table.
pub struct Relay {
    pool: Pool,
    database_url: String,
    publisher: Arc<Publisher>,
    options: RelayOptions,
    stats: Arc<RelayStats>,
    #[cfg(feature = "failpoints")]
    fault: Option<RelayFault>,
    health: RelayHealth,
}

/// The relay's database and broker, as readiness sees them.
struct RelayHealth {
    database: Component,
    broker: Component,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("options", &self.options)
            .field("stats", &self.stats.snapshot())
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// A relay over the database at `database_url` (a pool of its own, sized by
    /// [`RelayOptions::pool`], and a LISTEN connection) publishing with `publisher`. Nothing
    /// connects before [`run`](Self::run).
    pub fn new(
        database_url: impl Into<String>,
        publisher: Arc<Publisher>,
        options: RelayOptions,
    ) -> Self {
        let database_url = database_url.into();
        Relay {
            pool: connect_pool(&database_url, &options.pool),
            database_url,
            publisher,
            stats: Arc::new(RelayStats::default()),
            #[cfg(feature = "failpoints")]
            fault: None,
            health: RelayHealth {
                database: Registry::global().register(
                    format!("relay {}", options.name),
                    Kind::Database,
                    true,
                ),
                broker: Registry::global().register(
                    format!("relay {}", options.name),
                    Kind::Broker,
                    true,
                ),
            },
            options,
        }
    }

    /// Installs a test fault (`failpoints` feature only).
    #[cfg(feature = "failpoints")]
    pub fn with_fault(mut self, fault: RelayFault) -> Self {
        self.fault = Some(fault);
        self
    }

    /// Live counters.
    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// Runs cycles until `shutdown` completes: straight on while there is work, otherwise on a
    /// notification from the outbox trigger or after `poll_interval`, whichever comes first.
    pub async fn run(&self, shutdown: impl Future<Output = ()> + Send) -> Result<(), RelayError> {
        tokio::pin!(shutdown);
        let wake = Arc::new(Notify::new());
        let listener = tokio::spawn(listen(self.database_url.clone(), wake.clone()));
        let mut last_cleanup = tokio::time::Instant::now();
        let mut last_backlog: Option<tokio::time::Instant> = None;
        let mut failures = 0u32;
        let result = loop {
            let busy = tokio::select! {
                biased;
                _ = &mut shutdown => break Ok(()),
                cycle = self.cycle() => match cycle {
                    Ok(outcome) => {
                        failures = 0;
                        outcome.published > 0 || outcome.claimed as i64 >= self.options.batch_size
                    }
                    #[cfg(feature = "failpoints")]
                    Err(RelayError::InjectedCrash) => break Err(RelayError::InjectedCrash),
                    Err(e) => {
                        tracing::warn!(error = %e, "outbox relay cycle failed");
                        failures = failures.saturating_add(1);
                        false
                    }
                },
            };
            if last_backlog.is_none_or(|at| at.elapsed() >= self.options.backlog_interval) {
                last_backlog = Some(tokio::time::Instant::now());
                if let Err(e) = self.refresh_backlog().await {
                    tracing::warn!(error = %e, "outbox backlog count failed");
                }
            }
            if let Some(retention) = self.options.retention
                && last_cleanup.elapsed() >= self.options.cleanup_interval
            {
                last_cleanup = tokio::time::Instant::now();
                if let Err(e) = self.purge_published(retention).await {
                    tracing::warn!(error = %e, "outbox clean-up failed");
                }
            }
            if busy {
                continue;
            }
            let pause = if failures > 0 {
                // Jittered: relays sharing a database that failed together do not come back
                // in lockstep.
                self.options
                    .retry_backoff
                    .jittered(failures - 1, fastrand::f64())
                    .min(self.options.poll_interval * 5)
            } else {
                self.options.poll_interval
            };
            tokio::select! {
                _ = &mut shutdown => break Ok(()),
                _ = wake.notified() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        };
        listener.abort();
        result
    }

    /// Counts the unpublished rows and the age of the oldest, and sets the gauges
    /// `oncely_outbox_unpublished_rows` and `oncely_outbox_oldest_unpublished_age_seconds`.
    /// [`Relay::run`] calls it every [`RelayOptions::backlog_interval`].
    pub async fn refresh_backlog(&self) -> Result<Backlog, RelayError> {
        let mut conn = self.pool.get().await?;
        let row: BacklogRow = diesel::sql_query(BACKLOG).get_result(&mut conn).await?;
        let backlog = Backlog {
            unpublished: row.unpublished,
            oldest_age: Duration::try_from_secs_f64(row.oldest_age_secs.max(0.0))
                .unwrap_or_default(),
        };
        let relay = self.options.name.clone();
        metrics::gauge!(names::OUTBOX_UNPUBLISHED, "relay" => relay.clone())
            .set(backlog.unpublished as f64);
        metrics::gauge!(names::OUTBOX_OLDEST_AGE, "relay" => relay)
            .set(backlog.oldest_age.as_secs_f64());
        Ok(backlog)
    }

    /// One claim-publish-mark cycle, in one transaction that holds the claimed rows.
    pub async fn cycle(&self) -> Result<CycleOutcome, RelayError> {
        let result = self.cycle_once().await;
        match &result {
            Ok(outcome) => {
                self.health.database.up();
                if outcome.published > 0 {
                    self.health.broker.up();
                } else if outcome.failed > 0 {
                    self.health.broker.down();
                }
                let relay = self.options.name.clone();
                for (result, n) in [("published", outcome.published), ("failed", outcome.failed)] {
                    if n > 0 {
                        metrics::counter!(names::OUTBOX_PUBLISH_ATTEMPTS, "relay" => relay.clone(), "result" => result)
                            .increment(n as u64);
                    }
                }
            }
            Err(RelayError::Database(_) | RelayError::Pool(_)) => self.health.database.down(),
            #[cfg(feature = "failpoints")]
            Err(RelayError::InjectedCrash) => {}
        }
        result
    }

    async fn cycle_once(&self) -> Result<CycleOutcome, RelayError> {
        let mut conn = self.pool.get().await?;
        let outcome = conn
            .transaction::<CycleOutcome, RelayError, _>(async |conn| {
                let rows: Vec<ClaimedRow> = diesel::sql_query(CLAIM)
                    .bind::<BigInt, _>(self.options.batch_size)
                    .load(conn)
                    .await?;
                if rows.is_empty() {
                    return Ok(CycleOutcome::default());
                }
                let bodies: Vec<Vec<u8>> = rows
                    .iter()
                    .map(|r| serde_json::to_vec(&r.payload).unwrap_or_default())
                    .collect();
                let messages: Vec<OutgoingMessage<'_>> = rows
                    .iter()
                    .zip(&bodies)
                    .map(|(row, body)| OutgoingMessage {
                        exchange: &row.exchange,
                        routing_key: &row.routing_key,
                        body,
                        properties: properties(row, self.options.app_id.as_deref()),
                    })
                    .collect();
                let results = self
                    .publisher
                    .publish_batch(&messages, self.options.max_outstanding)
                    .await;
                #[cfg(feature = "failpoints")]
                if self.fault == Some(RelayFault::CrashAfterConfirm) {
                    return Err(RelayError::InjectedCrash);
                }
                // Fault suite: the relay dies with the events confirmed, not yet marked.
                fail::fail_point!("oncely::relay_after_confirm", |_| std::process::abort());
                let mut published = Vec::new();
                let (mut failed_ids, mut errors, mut delays) = (Vec::new(), Vec::new(), Vec::new());
                for (row, result) in rows.iter().zip(results) {
                    match result {
                        Ok(()) => published.push(row.id.clone()),
                        Err(e) => {
                            let attempt = u32::try_from(row.publish_attempts).unwrap_or(0);
                            failed_ids.push(row.id.clone());
                            errors.push(e.to_string());
                            delays.push(self.options.retry_backoff.delay(attempt).as_secs_f64());
                        }
                    }
                }
                if !published.is_empty() {
                    diesel::sql_query(MARK_PUBLISHED)
                        .bind::<Array<Text>, _>(&published)
                        .execute(conn)
                        .await?;
                }
                if !failed_ids.is_empty() {
                    tracing::warn!(failed = failed_ids.len(), first_error = %errors[0], "outbox publishes failed; retried later");
                    diesel::sql_query(MARK_FAILED)
                        .bind::<Array<Text>, _>(&failed_ids)
                        .bind::<Array<Text>, _>(&errors)
                        .bind::<Array<Double>, _>(&delays)
                        .execute(conn)
                        .await?;
                }
                Ok(CycleOutcome {
                    claimed: rows.len(),
                    published: published.len(),
                    failed: failed_ids.len(),
                })
            })
            .await?;
        self.stats.cycles.fetch_add(1, Ordering::Relaxed);
        self.stats
            .published
            .fetch_add(outcome.published as u64, Ordering::Relaxed);
        self.stats
            .failed
            .fetch_add(outcome.failed as u64, Ordering::Relaxed);
        Ok(outcome)
    }

    /// Deletes published rows older than `retention`, 1,000 per statement; returns how many.
    pub async fn purge_published(&self, retention: Duration) -> Result<u64, RelayError> {
        let mut total = 0u64;
        loop {
            let mut conn = self.pool.get().await?;
            let deleted = diesel::sql_query(PURGE)
                .bind::<Double, _>(retention.as_secs_f64())
                .bind::<BigInt, _>(1000i64)
                .execute(&mut conn)
                .await? as u64;
            total += deleted;
            if deleted < 1000 {
                self.stats.purged.fetch_add(total, Ordering::Relaxed);
                return Ok(total);
            }
        }
    }
}

/// The AMQP properties of a row: message id, type, JSON, persistent, timestamp, headers.
fn properties(row: &ClaimedRow, app_id: Option<&str>) -> BasicProperties {
    let mut headers = FieldTable::default();
    let mut correlation_id = None;
    if let Value::Object(map) = &row.headers {
        for (name, value) in map {
            let value = match value {
                Value::String(s) if name == "correlation_id" => {
                    correlation_id = Some(s.clone());
                    continue;
                }
                Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
                Value::Bool(b) => AMQPValue::Boolean(*b),
                Value::Number(n) => match n.as_i64() {
                    Some(i) => AMQPValue::LongLongInt(i),
                    None => AMQPValue::Double(n.as_f64().unwrap_or_default()),
                },
                other => AMQPValue::LongString(LongString::from(other.to_string().as_str())),
            };
            headers.insert(name.as_str().into(), value);
        }
    }
    let mut p = BasicProperties::default()
        .with_message_id(row.id.as_str().into())
        .with_type(row.event_type.as_str().into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_timestamp(row.created_at.timestamp().max(0) as u64)
        .with_headers(headers);
    if let Some(app_id) = app_id {
        p = p.with_app_id(app_id.into());
    }
    if let Some(id) = correlation_id {
        p = p.with_correlation_id(id.as_str().into());
    }
    p
}

/// Forwards outbox notifications to `wake`, reconnecting with backoff; polling covers the gaps.
async fn listen(database_url: String, wake: Arc<Notify>) {
    let backoff = Backoff {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(10),
        max_attempts: None,
    };
    // A LISTEN that dies right after it started does not reset the backoff.
    let mut schedule = ReconnectBackoff::new(backoff, ReconnectBackoff::STABLE_AFTER);
    loop {
        match AsyncPgConnection::establish(&database_url).await {
            Ok(mut conn) => {
                let listening = diesel::sql_query(format!("LISTEN {NOTIFY_CHANNEL}"))
                    .execute(&mut conn)
                    .await;
                if listening.is_ok() {
                    schedule.on_connected(std::time::Instant::now());
                    // Whatever was committed before LISTEN took effect gets a cycle too.
                    wake.notify_one();
                    let mut notifications = std::pin::pin!(conn.notifications_stream());
                    while let Some(Ok(_)) = notifications.next().await {
                        wake.notify_one();
                    }
                }
                tracing::warn!("outbox LISTEN connection lost; polling until it is back");
            }
            Err(e) => tracing::warn!(error = %e, "outbox LISTEN connection failed"),
        }
        tokio::time::sleep(schedule.on_failure(std::time::Instant::now())).await;
    }
}
