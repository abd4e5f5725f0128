//! Throughput of one run, three consumers draining the same 20,000 orders:
//! (a) a plain lapin consumer that only acks, (b) a naive consumer that runs the inbox
//! transaction by hand (BEGIN; claim; insert invoice; COMMIT; ack) at the same concurrency, and
//! (c) oncely with the billing handler. Prints msgs/s and the ratios.
//!
//! Run with: ./scripts/bench   (or: cargo run --release -p oncely-bench -- --count 20000)

use anyhow::Context;
use billing::{ORDER_CREATED_V1, order, order_properties};
use clap::Parser;
use diesel::sql_types::{BigInt, Text};
use diesel_async::{AsyncConnection, RunQueryDsl};
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use oncely::testing::{TestSchema, unique_name};
use oncely::{Consumer, Inbox, PoolOptions, Topology};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

#[derive(Parser, Debug)]
#[command(about = "oncely throughput benchmark")]
struct Args {
    /// Orders to publish and drain.
    #[arg(long, default_value_t = 20_000)]
    count: usize,
    /// Deliveries processed at once by (b) and (c).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Broker prefetch of every consumer.
    #[arg(long, default_value_t = 32)]
    prefetch: u16,
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .init();
    let args = Args::parse();
    let name = unique_name("bench");
    let exchange = format!("oncely.{name}");
    let queues = ["plain", "naive", "oncely"].map(|kind| format!("{name}.{kind}.q"));

    let connection = Connection::connect(&args.amqp_url, Default::default())
        .await
        .context("connect to RabbitMQ")?;
    // oncely declares its own topology; the two baselines get plain durable queues.
    let oncely_topology = Topology::new(&exchange, &queues[2]).bind(ORDER_CREATED_V1);
    oncely_topology.declare(&connection).await?;
    let setup = connection.create_channel().await?;
    for q in &queues[..2] {
        setup
            .queue_declare(
                q.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await?;
        setup
            .queue_bind(
                q.as_str().into(),
                exchange.as_str().into(),
                ORDER_CREATED_V1.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }

    let schema = TestSchema::create().await?;
    billing::migrate(schema.url()).await?;
    let pool = oncely::connect_pool(
        schema.url(),
        &PoolOptions {
            max_size: (args.concurrency as u32).max(1) * 2,
            ..PoolOptions::default()
        },
    );

    let started = Instant::now();
    publish(&connection, &exchange, &name, args.count).await?;
    println!(
        "published {} orders (fanned out to 3 queues) in {:.2}s",
        args.count,
        started.elapsed().as_secs_f64()
    );

    let plain = drain_plain(&connection, &queues[0], args.count, args.prefetch).await?;
    report("(a) plain lapin, ack only", args.count, plain);

    let naive = drain_naive(&connection, &queues[1], args.count, &args, schema.url()).await?;
    report("(b) naive transaction + ack", args.count, naive);

    let consumer = Consumer::builder(billing::create_invoice, Inbox::new(pool.clone()))
        .amqp_url(&args.amqp_url)
        .topology(oncely_topology.clone())
        .concurrency(args.concurrency)
        .prefetch(args.prefetch)
        .build()
        .spawn();
    let t = Instant::now();
    while (consumer.stats().settled() as usize) < args.count {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(600),
            "oncely did not drain in 10 min"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let oncely_elapsed = t.elapsed();
    consumer.shutdown().await?;
    report("(c) oncely, billing handler", args.count, oncely_elapsed);

    let mut conn = pool.get().await?;
    let invoices = billing::count_invoices(&mut conn, "").await?;
    anyhow::ensure!(
        invoices as usize == args.count,
        "expected {} invoices from oncely, found {invoices}",
        args.count
    );
    drop(conn);

    let rate = |d: Duration| args.count as f64 / d.as_secs_f64();
    println!(
        "ratio oncely / plain ack-only: {:.2}   oncely / naive transaction: {:.2}   naive / plain: {:.2}",
        rate(oncely_elapsed) / rate(plain),
        rate(oncely_elapsed) / rate(naive),
        rate(naive) / rate(plain),
    );
    println!(
        "(concurrency {}, prefetch {}; each queue drained alone, one after the other)",
        args.concurrency, args.prefetch
    );

    let mut queues_to_delete = queues.to_vec();
    queues_to_delete.extend([oncely_topology.dlq(), oncely_topology.parking()]);
    for q in queues_to_delete {
        let _ = setup
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = setup
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
    let _ = connection.close(200, "bench done".into()).await;
    Ok(())
}

fn report(what: &str, count: usize, elapsed: Duration) {
    println!(
        "{what:<32} {count} msgs in {:>6.2}s = {:>8.0} msgs/s",
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64()
    );
}

/// Publishes with confirms, 500 outstanding at a time.
async fn publish(
    connection: &Connection,
    exchange: &str,
    prefix: &str,
    count: usize,
) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut pending = Vec::with_capacity(500);
    for n in 0..count {
        let o = order(prefix, n);
        let body = serde_json::to_vec(&o)?;
        let confirm = channel
            .basic_publish(
                exchange.into(),
                ORDER_CREATED_V1.into(),
                BasicPublishOptions::default(),
                &body,
                order_properties(&o).with_delivery_mode(2),
            )
            .await?;
        pending.push(confirm);
        if pending.len() == 500 || n + 1 == count {
            for confirm in pending.drain(..) {
                anyhow::ensure!(confirm.await?.is_ack(), "broker refused a bench message");
            }
        }
    }
    Ok(())
}

async fn consume(
    connection: &Connection,
    queue: &str,
    prefetch: u16,
) -> anyhow::Result<(Channel, lapin::Consumer)> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((channel, consumer))
}

async fn drain_plain(
    connection: &Connection,
    queue: &str,
    count: usize,
    prefetch: u16,
) -> anyhow::Result<Duration> {
    let (channel, mut consumer) = consume(connection, queue, prefetch).await?;
    let t = Instant::now();
    for _ in 0..count {
        let delivery = consumer.next().await.context("stream ended")??;
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
    let elapsed = t.elapsed();
    let _ = channel.close(200, "done".into()).await;
    Ok(elapsed)
}

/// What a careful user would write by hand: one connection per worker, BEGIN, claim, insert,
/// COMMIT, then ack.
async fn drain_naive(
    connection: &Connection,
    queue: &str,
    count: usize,
    args: &Args,
    database_url: &str,
) -> anyhow::Result<Duration> {
    let mut connections = Vec::new();
    for _ in 0..args.concurrency {
        connections.push(diesel_async::AsyncPgConnection::establish(database_url).await?);
    }
    let connections = Arc::new(tokio::sync::Mutex::new(connections));
    let (channel, mut consumer) = consume(connection, queue, args.prefetch).await?;
    let permits = Arc::new(Semaphore::new(args.concurrency));
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..count {
        let delivery = consumer.next().await.context("stream ended")??;
        let permit = permits.clone().acquire_owned().await?;
        let connections = connections.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let mut conn = connections
                .lock()
                .await
                .pop()
                .context("no free connection")?;
            let o: billing::OrderCreated = serde_json::from_slice(&delivery.data)?;
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default();
            conn.transaction::<_, diesel::result::Error, _>(async |conn| {
                let claimed = diesel::sql_query(
                    "INSERT INTO message_inbox (consumer_name, message_id, status, processed_at) \
                     VALUES ('naive', $1, 'processed', now()) ON CONFLICT DO NOTHING",
                )
                .bind::<Text, _>(&id)
                .execute(conn)
                .await?;
                if claimed == 1 {
                    diesel::sql_query(
                        "INSERT INTO invoices (order_id, customer_id, amount_cents, currency) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT (order_id) DO NOTHING",
                    )
                    .bind::<Text, _>(format!("naive-{}", o.order_id))
                    .bind::<Text, _>(&o.customer_id)
                    .bind::<BigInt, _>(o.amount_cents)
                    .bind::<Text, _>(&o.currency)
                    .execute(conn)
                    .await?;
                }
                Ok(())
            })
            .await?;
            connections.lock().await.push(conn);
            delivery.acker.ack(BasicAckOptions::default()).await?;
            anyhow::Ok(())
        });
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let elapsed = t.elapsed();
    let _ = channel.close(200, "done".into()).await;
    // Leave the invoice table to oncely's run.
    let mut conn = diesel_async::AsyncPgConnection::establish(database_url).await?;
    diesel::sql_query("DELETE FROM invoices WHERE order_id LIKE 'naive-%'")
        .execute(&mut conn)
        .await?;
    Ok(elapsed)
}
