//! What every measurement needs: connections, fresh schemas, queues, publishing the orders.

use crate::Args;
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

/// `1 client`, `4 clients`: `n` and the noun that goes with it.
pub fn counted(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
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

/// How the messages of a scratch queue reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Through an exchange of its own bound to `order.created.v1`, as the consumers' queues.
    OrderCreated,
    /// Straight through the default exchange: a durable queue with no binding, for the plain
    /// lapin baselines.
    Direct,
}

/// What one measurement runs on: a fresh queue (and exchange) on the bench's connection.
#[derive(Debug, Clone)]
pub struct Scratch<'a> {
    /// The bench's own connection, for publishing, depths and purges.
    pub connection: &'a Connection,
    /// The bench's arguments (the broker URL among them).
    pub args: &'a Args,
    /// Unique name of the measurement; its queue is `<name>.q`.
    pub name: String,
    /// Its exchange and queue (with [`Route::Direct`], the default exchange).
    pub topology: Topology,
}

impl Scratch<'_> {
    /// Publishes orders `<prefix>-<n>` for `range` to the scratch queue, as [`publish_orders`]
    /// does.
    pub async fn publish(&self, prefix: &str, range: Range<usize>) -> anyhow::Result<()> {
        let routing_key = if self.topology.exchange().is_empty() {
            self.topology.queue()
        } else {
            ORDER_CREATED_V1
        };
        publish_orders(
            self.connection,
            self.topology.exchange(),
            routing_key,
            prefix,
            range,
        )
        .await
    }
}

/// Runs `measure` on a fresh queue reached by `route` and named after `prefix`, then deletes
/// what was declared (with [`Route::OrderCreated`], the delay queues the consumer builder adds
/// for the default retry policy too), whatever `measure` returned.
pub async fn on_scratch<'a, T, F, Fut>(
    connection: &'a Connection,
    args: &'a Args,
    prefix: &str,
    route: Route,
    measure: F,
) -> anyhow::Result<T>
where
    F: FnOnce(Scratch<'a>) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let name = unique_name(prefix);
    let queue = format!("{name}.q");
    let topology = match route {
        Route::OrderCreated => {
            let topology = Topology::new(format!("oncely.{name}"), queue).bind(ORDER_CREATED_V1);
            topology.declare(connection).await?;
            topology
        }
        Route::Direct => {
            let channel = connection.create_channel().await?;
            channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions::durable(),
                    FieldTable::default(),
                )
                .await?;
            let _ = channel.close(200, "declared".into()).await;
            Topology::new("", queue)
        }
    };
    let result = measure(Scratch {
        connection,
        args,
        name,
        topology: topology.clone(),
    })
    .await;
    match route {
        Route::OrderCreated => {
            let _ = topology
                .retry_tiers(oncely::RetryPolicy::default().tiers())
                .delete(connection)
                .await;
        }
        Route::Direct => delete_queue(connection, topology.queue()).await,
    }
    result
}

/// Deletes a queue (a missing one is fine).
async fn delete_queue(connection: &Connection, queue: &str) {
    let Ok(channel) = connection.create_channel().await else {
        return;
    };
    let _ = channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    let _ = channel.close(200, "cleaned up".into()).await;
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
