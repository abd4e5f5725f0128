//! The broker ceiling: a plain lapin consumer that does nothing but ack, one delivery at a time.

use crate::Args;
use crate::cpu;
use crate::report::{Report, Row};
use crate::support::{Route, on_scratch, rate};
use anyhow::Context;
use futures_lite::StreamExt;
use lapin::Connection;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use std::time::{Duration, Instant};

/// How the plain consumer acks.
#[derive(Debug, Clone, Copy)]
pub enum Acks {
    /// Every delivery acked on its own, the ack awaited before the next delivery.
    EachAwaited,
    /// One ack with `multiple: true` every `n` deliveries (and for the last one).
    Multiple(usize),
}

/// The broker ceiling's rows: a plain lapin consumer that only acks, awaited per message and
/// `multiple`, each draining `args.count` orders from a queue with no binding.
pub async fn section(
    args: &Args,
    connection: &Connection,
    report: &mut Report,
) -> anyhow::Result<()> {
    let runs = [
        (
            "broker_ack_each",
            "plain lapin consumer, awaited ack per message".to_owned(),
            Acks::EachAwaited,
        ),
        (
            "broker_ack_multiple",
            format!(
                "plain lapin consumer, multiple ack every {}",
                args.ack_every
            ),
            Acks::Multiple(args.ack_every),
        ),
    ];
    on_scratch(
        connection,
        args,
        "bench_plain",
        Route::Direct,
        |scratch| async move {
            let queue = scratch.topology.queue();
            for (key, label, acks) in runs {
                scratch.publish(queue, 0..args.count).await?;
                let (elapsed, cpu) =
                    drain(connection, queue, args.count, args.prefetch, acks).await?;
                report.push(
                    Row::new(
                        key,
                        "broker ceiling",
                        label,
                        rate(args.count, elapsed),
                        "msgs/s",
                    )
                    .note(format!(
                        "prefetch {}; {}",
                        args.prefetch,
                        cpu.describe()
                    )),
                );
            }
            Ok(())
        },
    )
    .await
}

/// Drains `count` deliveries from `queue`; time from the first delivery to the last ack.
pub async fn drain(
    connection: &Connection,
    queue: &str,
    count: usize,
    prefetch: u16,
    acks: Acks,
) -> anyhow::Result<(Duration, cpu::PerMessage)> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut started = None;
    let mut cpu_before = None;
    for n in 1..=count {
        let delivery = consumer.next().await.context("consumer stream ended")??;
        if started.is_none() {
            cpu_before = Some(cpu::snapshot("").await);
            started = Some(Instant::now());
        }
        let ack = match acks {
            Acks::EachAwaited => Some(BasicAckOptions::default()),
            Acks::Multiple(every) if n % every.max(1) == 0 || n == count => {
                Some(BasicAckOptions { multiple: true })
            }
            Acks::Multiple(_) => None,
        };
        if let Some(options) = ack {
            anyhow::ensure!(delivery.acker.ack(options).await?, "ack not sent");
        }
    }
    let elapsed = started.map(|s| s.elapsed()).unwrap_or_default();
    let cpu_after = cpu::snapshot("").await;
    let _ = channel.close(200, "drained".into()).await;
    let cpu = cpu::per_message(&cpu_before.unwrap_or_default(), &cpu_after, count);
    Ok((elapsed, cpu))
}
