//! The PostgreSQL ceiling: the inbox transaction of `billing::create_invoice`, driven straight
//! with tokio-postgres (no broker, no framework), N clients each on its own connection.
//!
//! Per message, the statements oncely sends: `BEGIN`, the claim upsert, the invoice insert,
//! `COMMIT`, prepared. [`Shape::Pipelined`] sends `BEGIN` together with the claim (three round
//! trips, the fewest for a handler that must see the claim's answer before it runs);
//! [`Shape::Sequential`] waits for each (four). The batched ceiling puts 100 messages in one
//! transaction with multi-row statements (`unnest` of arrays).

use crate::cpu;
use anyhow::Context;
use billing::order;
use oncely::testing::TestSchema;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls, Statement};

/// The claim oncely's inbox makes (crates/inbox `claim`), as plain SQL.
const CLAIM: &str = "\
INSERT INTO message_inbox (consumer_name, message_id, status, attempts, processed_at)
VALUES ($1, $2, 'processed', 1, now())
ON CONFLICT (consumer_name, message_id) DO UPDATE
SET status = 'processed', attempts = message_inbox.attempts + 1, processed_at = now(),
    error_code = NULL, error_message = NULL
WHERE message_inbox.status <> 'processed'
RETURNING attempts";

/// The billing handler's insert.
const INVOICE: &str = "\
INSERT INTO invoices (order_id, customer_id, amount_cents, currency) VALUES ($1, $2, $3, $4)";

/// The claim of many messages in one statement; returns the ids claimed.
const CLAIM_MANY: &str = "\
INSERT INTO message_inbox (consumer_name, message_id, status, attempts, processed_at)
SELECT $1, m.id, 'processed', 1, now() FROM unnest($2::text[]) AS m(id)
ON CONFLICT (consumer_name, message_id) DO UPDATE
SET status = 'processed', attempts = message_inbox.attempts + 1, processed_at = now(),
    error_code = NULL, error_message = NULL
WHERE message_inbox.status <> 'processed'
RETURNING message_id";

/// The invoices of the claimed messages in one statement.
const INVOICE_MANY: &str = "\
INSERT INTO invoices (order_id, customer_id, amount_cents, currency)
SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[])";

const CONSUMER: &str = "pg-ceiling";

struct Driver {
    client: Client,
    claim: Statement,
    invoice: Statement,
}

async fn connect(database_url: &str, claim: &str, invoice: &str) -> anyhow::Result<Driver> {
    let (client, connection) = tokio_postgres::connect(database_url, NoTls)
        .await
        .context("connect to PostgreSQL")?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("ceiling connection ended: {e}");
        }
    });
    let claim = client.prepare(claim).await?;
    let invoice = client.prepare(invoice).await?;
    Ok(Driver {
        client,
        claim,
        invoice,
    })
}

/// How the per-message transaction goes over the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `BEGIN` + claim in one round trip, then the insert, then `COMMIT`.
    Pipelined,
    /// Each statement its own round trip.
    Sequential,
}

/// `count` messages, one transaction each, over `clients` connections; the elapsed time.
/// Connections are opened and statements prepared before the clock starts.
pub async fn per_message(
    schema: &TestSchema,
    shape: Shape,
    clients: usize,
    count: usize,
    prefix: &str,
) -> anyhow::Result<(Duration, cpu::PerMessage)> {
    let database_url = schema.url();
    let mut drivers = Vec::new();
    for _ in 0..clients.max(1) {
        drivers.push(connect(database_url, CLAIM, INVOICE).await?);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let cpu_before = cpu::snapshot(schema.name()).await;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for driver in drivers {
        let next = next.clone();
        let prefix = prefix.to_owned();
        tasks.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= count {
                    // Kept open until the CPU of its backend is read.
                    return anyhow::Ok(driver);
                }
                let o = order(&prefix, n);
                let c = &driver.client;
                let message_id = o.message_id();
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] =
                    [&CONSUMER, &message_id];
                let claim = c.query_opt(&driver.claim, &params);
                let claimed = match shape {
                    Shape::Sequential => {
                        c.batch_execute("BEGIN").await?;
                        claim.await?
                    }
                    // Polled in order: BEGIN is on the wire before the claim.
                    Shape::Pipelined => {
                        let (begun, claimed) = tokio::join!(c.batch_execute("BEGIN"), claim);
                        begun?;
                        claimed?
                    }
                };
                if claimed.is_some() {
                    c.execute(
                        &driver.invoice,
                        &[&o.order_id, &o.customer_id, &o.amount_cents, &o.currency],
                    )
                    .await?;
                }
                c.batch_execute("COMMIT").await?;
            }
        });
    }
    let mut drivers = Vec::new();
    while let Some(done) = tasks.join_next().await {
        drivers.push(done??);
    }
    let elapsed = started.elapsed();
    let cpu_after = cpu::snapshot(schema.name()).await;
    drop(drivers);
    Ok((elapsed, cpu::per_message(&cpu_before, &cpu_after, count)))
}

/// `count` messages, `per_transaction` per transaction with one multi-row claim and one
/// multi-row insert, over `clients` connections; the elapsed time.
pub async fn batched(
    database_url: &str,
    clients: usize,
    count: usize,
    per_transaction: usize,
    prefix: &str,
) -> anyhow::Result<Duration> {
    let per_transaction = per_transaction.max(1);
    let mut drivers = Vec::new();
    for _ in 0..clients.max(1) {
        drivers.push(connect(database_url, CLAIM_MANY, INVOICE_MANY).await?);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for driver in drivers {
        let next = next.clone();
        let prefix = prefix.to_owned();
        tasks.spawn(async move {
            loop {
                let first = next.fetch_add(per_transaction, Ordering::Relaxed);
                if first >= count {
                    return anyhow::Ok(());
                }
                let orders: Vec<_> = (first..(first + per_transaction).min(count))
                    .map(|n| order(&prefix, n))
                    .collect();
                let ids: Vec<String> = orders.iter().map(|o| o.message_id()).collect();
                let c = &driver.client;
                c.batch_execute("BEGIN").await?;
                let claimed: std::collections::HashSet<String> = c
                    .query(&driver.claim, &[&CONSUMER, &ids])
                    .await?
                    .iter()
                    .map(|row| row.get::<_, String>(0))
                    .collect();
                let fresh: Vec<_> = orders
                    .iter()
                    .filter(|o| claimed.contains(&o.message_id()))
                    .collect();
                let order_ids: Vec<&str> = fresh.iter().map(|o| o.order_id.as_str()).collect();
                let customers: Vec<&str> = fresh.iter().map(|o| o.customer_id.as_str()).collect();
                let amounts: Vec<i64> = fresh.iter().map(|o| o.amount_cents).collect();
                let currencies: Vec<&str> = fresh.iter().map(|o| o.currency.as_str()).collect();
                c.execute(
                    &driver.invoice,
                    &[&order_ids, &customers, &amounts, &currencies],
                )
                .await?;
                c.batch_execute("COMMIT").await?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(started.elapsed())
}

/// Invoices in the schema of `database_url` whose order id starts with `prefix`.
pub async fn count_invoices(database_url: &str, prefix: &str) -> anyhow::Result<i64> {
    let driver = connect(database_url, "SELECT 1", "SELECT 1").await?;
    let row = driver
        .client
        .query_one(
            "SELECT count(*) FROM invoices WHERE order_id LIKE $1",
            &[&format!("{prefix}-%")],
        )
        .await?;
    Ok(row.get(0))
}
