//! Outbox relay throughput: rows/s from committed outbox rows to confirmed publishes, against a
//! raw pipelined confirmed publish of the same messages, in one run.
//!
//! Run with: ./scripts/bench-relay   (or: cargo run --release -p oncely-bench --bin relay-bench)

use anyhow::Context;
use billing::ORDER_CREATED_V1;
use clap::Parser;
use lapin::BasicProperties;
use lapin::options::{QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use oncely::outbox::{NewOutboxMessage, Relay, RelayOptions, enqueue_many};
use oncely::testing::{TestSchema, unique_name};
use oncely::{OutgoingMessage, PoolOptions, Publisher, PublisherOptions};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "oncely outbox relay benchmark")]
struct Args {
    /// Rows to relay.
    #[arg(long, default_value_t = 20_000)]
    count: usize,
    /// Rows claimed per relay cycle, and confirms outstanding at once (both sides).
    #[arg(long, default_value_t = 500)]
    batch: usize,
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
    let args = Args::parse();
    let name = unique_name("relaybench");
    let exchange = format!("oncely.{name}");
    let queue = format!("{name}.q");

    let connection = lapin::Connection::connect(&args.amqp_url, Default::default())
        .await
        .context("connect to RabbitMQ")?;
    let topology = oncely::Topology::new(&exchange, &queue).bind(ORDER_CREATED_V1);
    topology.declare(&connection).await?;
    let channel = connection.create_channel().await?;

    let schema = TestSchema::create().await?;
    order_service::migrate(schema.url()).await?;
    let pool = oncely::connect_pool(schema.url(), &PoolOptions::default());

    let events: Vec<NewOutboxMessage> = (0..args.count)
        .map(|n| {
            let order = order_service::order(&name, n);
            order_service::order_created(&order, &exchange)
        })
        .collect::<Result<_, _>>()?;

    // (a) raw: the same messages, pipelined confirmed publishes from memory.
    let publisher = Arc::new(Publisher::new(
        &args.amqp_url,
        "relay-bench",
        PublisherOptions::default(),
    ));
    let bodies: Vec<Vec<u8>> = events
        .iter()
        .map(|e| serde_json::to_vec(&e.payload))
        .collect::<Result<_, _>>()?;
    let messages: Vec<OutgoingMessage<'_>> = events
        .iter()
        .zip(&bodies)
        .map(|(e, body)| OutgoingMessage {
            exchange: &e.exchange,
            routing_key: &e.routing_key,
            body,
            properties: BasicProperties::default()
                .with_message_id(e.id.as_str().into())
                .with_type(e.event_type.as_str().into())
                .with_content_type("application/json".into()),
        })
        .collect();
    let t = Instant::now();
    for chunk in messages.chunks(args.batch) {
        let results = publisher.publish_batch(chunk, args.batch).await;
        anyhow::ensure!(results.iter().all(Result::is_ok), "raw publish failed");
    }
    let raw = t.elapsed();
    channel
        .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await?;

    // (b) the relay: rows committed first, then relayed until every row is marked published.
    let mut conn = pool.get().await?;
    for chunk in events.chunks(1000) {
        enqueue_many(&mut conn, chunk).await?;
    }
    drop(conn);
    let relay = Relay::new(
        pool.clone(),
        schema.url(),
        publisher.clone(),
        RelayOptions {
            batch_size: args.batch as i64,
            max_outstanding: args.batch,
            ..RelayOptions::default()
        },
    );
    let t = Instant::now();
    let mut published = 0;
    while published < args.count {
        let outcome = relay.cycle().await?;
        anyhow::ensure!(outcome.failed == 0, "relay publishes failed");
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(600),
            "relay did not finish in 10 min"
        );
        published += outcome.published;
    }
    let relayed = t.elapsed();
    let queued = channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?
        .message_count();
    anyhow::ensure!(
        queued as usize == args.count,
        "expected {} messages on the broker, found {queued}",
        args.count
    );

    let rate = |d: Duration| args.count as f64 / d.as_secs_f64();
    println!(
        "{:<40} {} msgs in {:>6.2}s = {:>8.0} msgs/s",
        "(a) raw pipelined confirmed publish",
        args.count,
        raw.as_secs_f64(),
        rate(raw)
    );
    println!(
        "{:<40} {} rows in {:>6.2}s = {:>8.0} rows/s",
        "(b) outbox relay, commit -> confirmed",
        args.count,
        relayed.as_secs_f64(),
        rate(relayed)
    );
    println!(
        "ratio relay / raw: {:.2}   (batch {}, {} confirms outstanding)",
        rate(relayed) / rate(raw),
        args.batch,
        args.batch
    );

    let _ = channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
    let _ = channel
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
    publisher.close().await;
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}
