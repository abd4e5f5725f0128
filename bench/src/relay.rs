//! Outbox relay against a raw pipelined confirmed publish of the same messages.

use crate::report::{Report, Row};
use crate::support::{Route, Scratch, counted, on_scratch, queue_depth, rate};
use crate::{Args, cpu};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueuePurgeOptions};
use lapin::{BasicProperties, Connection};
use oncely::outbox::{NewOutboxMessage, Relay, RelayOptions, enqueue_many};
use oncely::testing::TestSchema;
use oncely::{OutgoingMessage, PoolOptions, Publisher, PublisherOptions};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The relay section's rows: the raw publish, oncely's publisher and the relay with each
/// number of instances, on the same `args.count` events.
pub async fn section(
    args: &Args,
    connection: &Connection,
    report: &mut Report,
) -> anyhow::Result<()> {
    let figures = on_scratch(connection, args, "bench_relay", Route::OrderCreated, run).await?;
    let (raw, raw_cpu) = figures.raw;
    report.push(
        Row::new(
            "raw_confirmed_publish",
            "broker ceiling",
            "raw pipelined confirmed publish",
            rate(args.count, raw),
            "msgs/s",
        )
        .note(format!(
            "lapin, {} confirms outstanding, persistent, mandatory; {}",
            args.relay_batch,
            raw_cpu.describe()
        )),
    );
    let (publisher, publisher_cpu) = figures.publisher;
    report.push(
        Row::new(
            "publisher_batch",
            "oncely",
            "Publisher::publish_batch from memory (the relay's publish step)",
            rate(args.count, publisher),
            "msgs/s",
        )
        .against("raw_confirmed_publish")
        .note(format!(
            "batches of {}; {}",
            args.relay_batch,
            publisher_cpu.describe()
        )),
    );
    let mut cpu = serde_json::Map::new();
    cpu.insert("raw".into(), raw_cpu.json());
    cpu.insert("publisher_batch".into(), publisher_cpu.json());
    for (instances, elapsed, relay_cpu) in figures.relays {
        report.push(
            Row::new(
                format!("relay_x{instances}"),
                "oncely",
                format!(
                    "outbox relay, {}",
                    counted(instances, "instance", "instances")
                ),
                rate(args.count, elapsed),
                "rows/s",
            )
            .against("raw_confirmed_publish")
            .note(format!(
                "committed rows to confirmed and marked, batch {}; {}",
                args.relay_batch,
                relay_cpu.describe()
            )),
        );
        cpu.insert(format!("relay_x{instances}"), relay_cpu.json());
    }
    report.set("cpu_per_message_relay", serde_json::Value::Object(cpu));
    Ok(())
}

/// Relay and raw publish figures of one run.
#[derive(Debug, Clone)]
pub struct RelayFigures {
    /// Raw pipelined confirmed publish.
    pub raw: (Duration, cpu::PerMessage),
    /// oncely's `Publisher::publish_batch` of the same messages from memory: the relay's publish
    /// step alone.
    pub publisher: (Duration, cpu::PerMessage),
    /// `(relays, elapsed, cpu)`: the relay with that many instances sharing the table.
    pub relays: Vec<(usize, Duration, cpu::PerMessage)>,
}

/// Measures, on one topology and one batch of `args.count` `order.created.v1` events: a raw
/// lapin publish with `args.relay_batch` confirms outstanding, then the relay (rows committed
/// before the clock starts; timed until every row is marked published) with each of
/// `args.relays` relays.
async fn run(scratch: Scratch<'_>) -> anyhow::Result<RelayFigures> {
    let args = scratch.args;
    let (count, window, instances) = (args.count, args.relay_batch, &args.relays);
    let (connection, amqp_url, topology, name) = (
        scratch.connection,
        args.amqp_url.as_str(),
        &scratch.topology,
        &scratch.name,
    );
    let events: Vec<NewOutboxMessage> = (0..count)
        .map(|n| order_service::order_created(&order_service::order(name, n), topology.exchange()))
        .collect::<Result<_, _>>()?;
    let raw = raw_publish(connection, &events, window).await?;
    expect_queued(connection, topology.queue(), count).await?;
    let publisher = publisher_batch(amqp_url, name, &events, window).await?;
    expect_queued(connection, topology.queue(), count).await?;

    let mut relays = Vec::new();
    for &n in instances {
        let schema = TestSchema::create().await?;
        order_service::migrate(schema.url()).await?;
        let (elapsed, cpu) = relay(amqp_url, &schema, &events, window, n).await?;
        expect_queued(connection, topology.queue(), count).await?;
        relays.push((n, elapsed, cpu));
    }
    Ok(RelayFigures {
        raw,
        publisher,
        relays,
    })
}

/// Checks that `count` messages arrived, then empties the queue for the next measurement.
async fn expect_queued(connection: &Connection, queue: &str, count: usize) -> anyhow::Result<()> {
    let queued = queue_depth(connection, queue).await?;
    anyhow::ensure!(
        queued as usize == count,
        "expected {count} messages on the broker, found {queued}"
    );
    let channel = connection.create_channel().await?;
    channel
        .queue_purge(queue.into(), QueuePurgeOptions::default())
        .await?;
    let _ = channel.close(200, "purged".into()).await;
    Ok(())
}

/// The same messages as the relay sends (body, message id, type, persistent, mandatory), from
/// memory, `window` confirms outstanding.
async fn raw_publish(
    connection: &Connection,
    events: &[NewOutboxMessage],
    window: usize,
) -> anyhow::Result<(Duration, cpu::PerMessage)> {
    let bodies: Vec<Vec<u8>> = events
        .iter()
        .map(|e| serde_json::to_vec(&e.payload))
        .collect::<Result<_, _>>()?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let cpu_before = cpu::snapshot("").await;
    let started = Instant::now();
    let mut pending = VecDeque::with_capacity(window);
    for (e, body) in events.iter().zip(&bodies) {
        if pending.len() >= window.max(1)
            && let Some(confirm) = pending.pop_front()
        {
            settle(confirm).await?;
        }
        let properties = BasicProperties::default()
            .with_message_id(e.id.as_str().into())
            .with_type(e.event_type.as_str().into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        let confirm = channel
            .basic_publish(
                e.exchange.as_str().into(),
                e.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties,
            )
            .await?;
        pending.push_back(confirm);
    }
    for confirm in pending {
        settle(confirm).await?;
    }
    let elapsed = started.elapsed();
    let cpu_after = cpu::snapshot("").await;
    let _ = channel.close(200, "published".into()).await;
    Ok((
        elapsed,
        cpu::per_message(&cpu_before, &cpu_after, events.len()),
    ))
}

/// The relay's publisher (`Publisher::publish_batch`, as `Relay::cycle` calls it) on the same
/// messages from memory, in batches of `window`.
async fn publisher_batch(
    amqp_url: &str,
    name: &str,
    events: &[NewOutboxMessage],
    window: usize,
) -> anyhow::Result<(Duration, cpu::PerMessage)> {
    let publisher = Publisher::new(
        amqp_url,
        format!("{name}-publisher"),
        PublisherOptions::default(),
    );
    let _ = publisher.publish_batch(&[], 1).await;
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
    let cpu_before = cpu::snapshot("").await;
    let started = Instant::now();
    for chunk in messages.chunks(window.max(1)) {
        let results = publisher.publish_batch(chunk, window).await;
        anyhow::ensure!(results.iter().all(Result::is_ok), "publish_batch failed");
    }
    let elapsed = started.elapsed();
    let cpu_after = cpu::snapshot("").await;
    publisher.close().await;
    Ok((
        elapsed,
        cpu::per_message(&cpu_before, &cpu_after, events.len()),
    ))
}

async fn settle(confirm: lapin::PublisherConfirm) -> anyhow::Result<()> {
    let confirmation = tokio::time::timeout(Duration::from_secs(30), confirm).await??;
    anyhow::ensure!(
        matches!(confirmation, lapin::Confirmation::Ack(None)),
        "raw publish not confirmed as routed"
    );
    Ok(())
}

/// Enqueues the events (committed), then runs `instances` relays over the table, each with its
/// own publisher connection, until every row is published.
async fn relay(
    amqp_url: &str,
    schema: &TestSchema,
    events: &[NewOutboxMessage],
    batch: usize,
    instances: usize,
) -> anyhow::Result<(Duration, cpu::PerMessage)> {
    let pool = oncely::connect_pool(schema.url(), &PoolOptions::default());
    let mut conn = pool.get().await?;
    for chunk in events.chunks(1000) {
        enqueue_many(&mut conn, chunk).await?;
    }
    drop(conn);
    let (mut relays, mut publishers) = (Vec::new(), Vec::new());
    for i in 0..instances.max(1) {
        let publisher = Arc::new(Publisher::new(
            amqp_url,
            format!("{}-relay-{i}", schema.name()),
            PublisherOptions::default(),
        ));
        // Opens the publisher's connection and channel before the clock starts.
        let _ = publisher.publish_batch(&[], 1).await;
        publishers.push(publisher.clone());
        relays.push(Relay::new(
            schema.url(),
            publisher,
            RelayOptions {
                batch_size: batch as i64,
                max_outstanding: batch,
                ..RelayOptions::default()
            },
        ));
    }
    let total = events.len();
    let published = Arc::new(AtomicUsize::new(0));
    let cpu_before = cpu::snapshot(schema.name()).await;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for relay in relays {
        let published = published.clone();
        tasks.spawn(async move {
            while published.load(Ordering::Relaxed) < total {
                let outcome = relay.cycle().await?;
                anyhow::ensure!(outcome.failed == 0, "relay publishes failed");
                anyhow::ensure!(
                    started.elapsed() < Duration::from_secs(600),
                    "relay did not finish in 10 min"
                );
                published.fetch_add(outcome.published, Ordering::Relaxed);
                if outcome.claimed == 0 {
                    // The other relays hold the remaining rows.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            anyhow::Ok(())
        });
    }
    let mut result = Ok(());
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done.map_err(anyhow::Error::from).and_then(|r| r) {
            result = Err(e);
        }
    }
    let elapsed = started.elapsed();
    let cpu_after = cpu::snapshot(schema.name()).await;
    for publisher in publishers {
        publisher.close().await;
    }
    result.map(|()| (elapsed, cpu::per_message(&cpu_before, &cpu_after, total)))
}
