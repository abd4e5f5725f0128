//! `oncely dlq list` and `oncely dlq replay`.

use anyhow::Context;
use oncely::amqp::ConfirmPublisher;
use oncely::lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use oncely::lapin::types::{AMQPValue, LongString};
use oncely::lapin::{BasicProperties, Connection};
use oncely::{OutgoingMessage, headers};
use std::sync::Arc;
use std::time::Duration;

/// Header a replayed message carries: when it was replayed.
pub(crate) const REPLAYED_AT: &str = "x-oncely-replayed-at";
/// Header a replayed message carries: how many times it was replayed.
pub(crate) const REPLAY_COUNT: &str = "x-oncely-replay-count";

/// Where set-aside messages are taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Source {
    /// `Q.dlq`.
    Dlq,
    /// `Q.parking`.
    Parking,
}

impl Source {
    fn queue_of(self, queue: &str) -> String {
        match self {
            Source::Dlq => format!("{queue}.dlq"),
            Source::Parking => format!("{queue}.parking"),
        }
    }
}

async fn open(amqp_url: &str) -> anyhow::Result<Connection> {
    let single = oncely::amqp::Backoff {
        max_attempts: Some(3),
        ..oncely::amqp::Backoff::default()
    };
    Ok(oncely::amqp::connect(amqp_url, "oncely-cli", single).await?)
}

async fn count(connection: &Connection, queue: &str) -> anyhow::Result<u32> {
    let depth = oncely::amqp::queue_depth(connection, queue)
        .await
        .with_context(|| format!("queue {queue} does not exist"))?;
    Ok(depth.messages)
}

fn header(properties: &BasicProperties, name: &str) -> String {
    let value = properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name).cloned());
    match value {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(s)) => s.as_str().to_owned(),
        Some(AMQPValue::LongLongInt(n)) => n.to_string(),
        Some(AMQPValue::LongInt(n)) => n.to_string(),
        Some(other) => format!("{other:?}"),
        None => "-".to_owned(),
    }
}

fn describe(properties: &BasicProperties) -> String {
    let id = properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str().chars().take(80).collect::<String>())
        .unwrap_or_else(|| "(no message id)".to_owned());
    format!(
        "{id}  code={}  attempts={}  failed_at={}  reason={}",
        header(properties, headers::ERROR_CODE),
        header(properties, headers::ATTEMPT),
        header(properties, headers::FAILED_AT),
        header(properties, headers::REASON)
            .chars()
            .take(200)
            .collect::<String>(),
    )
}

pub(crate) async fn list(
    amqp_url: &str,
    queue: &str,
    from: Source,
    last: usize,
) -> anyhow::Result<()> {
    let source = from.queue_of(queue);
    let connection = open(amqp_url).await?;
    let total = count(&connection, &source).await?;
    let channel = connection.create_channel().await?;
    println!("{source}: {total} messages");
    for _ in 0..last.min(total as usize) {
        // Taken without ack: they go back, in place, when the channel closes.
        let Some(message) = channel
            .basic_get(source.as_str().into(), BasicGetOptions::default())
            .await?
        else {
            break;
        };
        println!("  {}", describe(&message.delivery.properties));
    }
    oncely::amqp::close_channel(&channel, 200, "listed").await;
    crate::close(&connection).await;
    Ok(())
}

/// The original's properties, marked as replayed, with a fresh attempt count. The broker's
/// `x-delivery-count` stays behind: a replayed message starts a new life in its queue, not at
/// the delivery limit it was dead-lettered for.
fn replayed(properties: &BasicProperties) -> BasicProperties {
    let mut table = oncely::amqp::headers_without_delivery_count(properties);
    let count = match table.inner().get(REPLAY_COUNT) {
        Some(AMQPValue::LongLongInt(n)) => n + 1,
        _ => 1,
    };
    table.insert(REPLAY_COUNT.into(), AMQPValue::LongLongInt(count));
    table.insert(
        REPLAYED_AT.into(),
        AMQPValue::LongString(LongString::from(chrono::Utc::now().to_rfc3339().as_str())),
    );
    table.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(1));
    properties.clone().with_headers(table)
}

pub(crate) async fn replay(
    amqp_url: &str,
    queue: &str,
    from: Source,
    limit: Option<usize>,
    rate: Option<f64>,
    dry_run: bool,
) -> anyhow::Result<()> {
    let source = from.queue_of(queue);
    let connection = Arc::new(open(amqp_url).await?);
    let total = count(&connection, &source).await? as usize;
    let channel = connection.create_channel().await?;
    let wanted = limit.unwrap_or(total).min(total);
    let pause = rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(1.0 / r));
    let publisher = ConfirmPublisher::new(connection.clone(), Duration::from_secs(5));
    let mut replayed_count = 0usize;
    for _ in 0..wanted {
        let Some(message) = channel
            .basic_get(source.as_str().into(), BasicGetOptions::default())
            .await?
        else {
            break;
        };
        let delivery = message.delivery;
        if dry_run {
            println!("would replay {}", describe(&delivery.properties));
            continue;
        }
        let published = publisher
            .publish(OutgoingMessage {
                exchange: "",
                routing_key: queue,
                body: &delivery.data,
                properties: replayed(&delivery.properties),
            })
            .await;
        if let Err(e) = published {
            // Back where it was; nothing lost.
            let _ = delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    multiple: false,
                })
                .await;
            anyhow::bail!("replay stopped after {replayed_count} messages: {e}");
        }
        // Acked from the dead-letter queue only now that the broker confirmed the copy. A kill
        // between the two leaves the message in both places: the inbox makes the second a duplicate.
        delivery.acker.ack(BasicAckOptions::default()).await?;
        replayed_count += 1;
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
    }
    oncely::amqp::close_channel(&channel, 200, "replayed").await;
    crate::close(&connection).await;
    if dry_run {
        println!("dry run: {wanted} of {total} messages in {source} would go back to {queue}");
    } else {
        println!("replayed {replayed_count} of {total} messages from {source} to {queue}");
    }
    Ok(())
}
