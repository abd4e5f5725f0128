//! `oncely inbox stats|purge` and `oncely outbox stats`.

use anyhow::Context;
use diesel::sql_types::{BigInt, Double, Integer, Nullable, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use std::time::Duration;

async fn connect(database_url: &str) -> anyhow::Result<AsyncPgConnection> {
    AsyncPgConnection::establish(database_url)
        .await
        .context("connecting to PostgreSQL")
}

#[derive(diesel::QueryableByName)]
struct InboxLine {
    #[diesel(sql_type = Text)]
    consumer_name: String,
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = BigInt)]
    rows: i64,
    #[diesel(sql_type = Nullable<Double>)]
    oldest_age_s: Option<f64>,
    #[diesel(sql_type = Nullable<Integer>)]
    max_attempts: Option<i32>,
}

pub(crate) async fn inbox(database_url: &str, consumer: Option<&str>) -> anyhow::Result<()> {
    let mut conn = connect(database_url).await?;
    let lines: Vec<InboxLine> = diesel::sql_query(
        "SELECT consumer_name, status, count(*) AS rows, \
                extract(epoch FROM now() - min(received_at))::float8 AS oldest_age_s, \
                max(attempts) AS max_attempts \
         FROM message_inbox WHERE ($1::text IS NULL OR consumer_name = $1) \
         GROUP BY consumer_name, status ORDER BY consumer_name, status",
    )
    .bind::<Nullable<Text>, _>(consumer)
    .load(&mut conn)
    .await?;
    println!(
        "{:<24} {:<10} {:>10} {:>14} {:>12}",
        "consumer", "status", "rows", "oldest", "max attempts"
    );
    for l in lines {
        let age = l.oldest_age_s.map(|s| {
            humantime::format_duration(Duration::from_secs(s.max(0.0) as u64)).to_string()
        });
        println!(
            "{:<24} {:<10} {:>10} {:>14} {:>12}",
            l.consumer_name,
            l.status,
            l.rows,
            age.unwrap_or_else(|| "-".into()),
            l.max_attempts.unwrap_or_default()
        );
    }
    Ok(())
}

pub(crate) async fn purge(
    database_url: &str,
    older_than: Duration,
    consumer: Option<&str>,
    batch: i64,
) -> anyhow::Result<()> {
    let pool = oncely::connect_pool(
        database_url,
        &oncely::PoolOptions {
            max_size: 2,
            ..Default::default()
        },
    );
    let inbox = oncely::Inbox::new(pool);
    let deleted = inbox
        .purge_processed_of(consumer, older_than, batch)
        .await?;
    println!(
        "deleted {deleted} processed inbox rows older than {}{}",
        humantime::format_duration(older_than),
        consumer
            .map(|c| format!(" of consumer {c}"))
            .unwrap_or_default()
    );
    Ok(())
}

#[derive(diesel::QueryableByName)]
struct OutboxLine {
    #[diesel(sql_type = BigInt)]
    unpublished: i64,
    #[diesel(sql_type = BigInt)]
    published: i64,
    #[diesel(sql_type = Nullable<Double>)]
    oldest_unpublished_age_s: Option<f64>,
    #[diesel(sql_type = Nullable<Integer>)]
    max_attempts: Option<i32>,
    #[diesel(sql_type = BigInt)]
    failing: i64,
}

pub(crate) async fn outbox(database_url: &str) -> anyhow::Result<()> {
    let mut conn = connect(database_url).await?;
    let l: OutboxLine = diesel::sql_query(
        "SELECT count(*) FILTER (WHERE published_at IS NULL) AS unpublished, \
                count(*) FILTER (WHERE published_at IS NOT NULL) AS published, \
                extract(epoch FROM now() - min(created_at) FILTER (WHERE published_at IS NULL))::float8 AS oldest_unpublished_age_s, \
                max(publish_attempts) FILTER (WHERE published_at IS NULL) AS max_attempts, \
                count(*) FILTER (WHERE published_at IS NULL AND last_error IS NOT NULL) AS failing \
         FROM outbox_message",
    )
    .get_result(&mut conn)
    .await?;
    let age = l
        .oldest_unpublished_age_s
        .map(|s| humantime::format_duration(Duration::from_secs(s.max(0.0) as u64)).to_string())
        .unwrap_or_else(|| "-".into());
    println!("unpublished: {}", l.unpublished);
    println!("oldest unpublished: {age}");
    println!(
        "max attempts of an unpublished row: {}",
        l.max_attempts.unwrap_or_default()
    );
    println!("unpublished with a last error: {}", l.failing);
    println!("published (kept for retention): {}", l.published);
    Ok(())
}
