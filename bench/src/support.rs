//! What every measurement needs: connections, fresh schemas, queues, publishing the orders.

use anyhow::Context;
use billing::{ORDER_CREATED_V1, order, order_properties};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use oncely::Topology;
use oncely::testing::{TestSchema, unique_name};
use std::collections::VecDeque;
use std::future::Future;
use std::ops::Range;
use std::time::Duration;

/// Confirms awaited at once when filling a queue before a measurement.
const FILL_WINDOW: usize = 1000;

/// Messages per second.
pub fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// A named AMQP connection, so the broker's connection list shows what it is.
pub async fn amqp(url: &str, name: &str) -> anyhow::Result<Connection> {
    Connection::connect(
        url,
        ConnectionProperties::default().with_connection_name(name.into()),
    )
    .await
    .with_context(|| format!("connect to RabbitMQ ({name})"))
}

/// A fresh schema with the inbox and billing's `invoices` table, dropped with the value.
pub async fn billing_schema() -> anyhow::Result<TestSchema> {
    let schema = TestSchema::create()
        .await
        .context("create a bench schema")?;
    billing::migrate(schema.url()).await?;
    Ok(schema)
}

/// A durable queue with no binding, for the plain lapin baselines (published to through the
/// default exchange).
pub async fn declare_plain_queue(connection: &Connection, queue: &str) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await?;
    let _ = channel.close(200, "declared".into()).await;
    Ok(())
}

/// Deletes a queue (a missing one is fine).
pub async fn delete_queue(connection: &Connection, queue: &str) {
    let Ok(channel) = connection.create_channel().await else {
        return;
    };
    let _ = channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    let _ = channel.close(200, "cleaned up".into()).await;
}

/// Runs `measure` on a fresh topology bound to `order.created.v1` and named after `prefix`
/// (it gets the topology and the unique name), then deletes the topology, with the delay
/// queues the consumer builder adds for the default retry policy, whatever `measure` returned.
pub async fn on_scratch_topology<T, F, Fut>(
    connection: &Connection,
    prefix: &str,
    measure: F,
) -> anyhow::Result<T>
where
    F: FnOnce(Topology, String) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let name = unique_name(prefix);
    let topology =
        Topology::new(format!("oncely.{name}"), format!("{name}.q")).bind(ORDER_CREATED_V1);
    topology.declare(connection).await?;
    let result = measure(topology.clone(), name).await;
    let _ = topology
        .retry_tiers(oncely::RetryPolicy::default().tiers())
        .delete(connection)
        .await;
    result
}

/// Publishes orders `<prefix>-<n>` for `range` as the order service does (same body and
/// properties), persistent, with confirms, `FILL_WINDOW` outstanding at a time.
pub async fn publish_orders(
    connection: &Connection,
    exchange: &str,
    routing_key: &str,
    prefix: &str,
    range: Range<usize>,
) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut pending = VecDeque::with_capacity(FILL_WINDOW);
    for n in range {
        if pending.len() >= FILL_WINDOW
            && let Some(confirm) = pending.pop_front()
        {
            settle(confirm).await?;
        }
        let o = order(prefix, n);
        let body = serde_json::to_vec(&o)?;
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                &body,
                order_properties(&o).with_delivery_mode(2),
            )
            .await?;
        pending.push_back(confirm);
    }
    for confirm in pending {
        settle(confirm).await?;
    }
    let _ = channel.close(200, "published".into()).await;
    Ok(())
}

async fn settle(confirm: lapin::PublisherConfirm) -> anyhow::Result<()> {
    let confirmation = tokio::time::timeout(Duration::from_secs(30), confirm)
        .await
        .context("no confirm in 30 s")??;
    anyhow::ensure!(confirmation.is_ack(), "broker refused a bench message");
    Ok(())
}

/// Publishes billing orders to an oncely topology's exchange.
pub async fn publish_to_topology(
    connection: &Connection,
    topology: &Topology,
    prefix: &str,
    range: Range<usize>,
) -> anyhow::Result<()> {
    publish_orders(
        connection,
        topology.exchange(),
        ORDER_CREATED_V1,
        prefix,
        range,
    )
    .await
}

/// Messages ready in `queue`.
pub async fn queue_depth(connection: &Connection, queue: &str) -> anyhow::Result<u32> {
    Ok(oncely::amqp::queue_depth(connection, queue).await?.messages)
}

/// Polls `done` every 2 ms until it holds; fails after `limit`.
pub async fn wait_until(
    what: &str,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    while !done() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{what}: not done after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}
