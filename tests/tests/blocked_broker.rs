//! RabbitMQ blocking publishers (memory alarm) must give a confirm timeout, never a hang.
//!
//! Its own test binary: the alarm blocks every publisher on the broker, and cargo runs test
//! binaries one after the other, so no other test of the suite is publishing meanwhile.

use oncely::lapin::BasicProperties;
use oncely::{AmqpError, OutgoingMessage, Publisher, PublisherOptions};
use oncely_e2e::{Harness, amqp_url, wait_until};
use std::process::Command;
use std::time::{Duration, Instant};

fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Restores the broker's memory watermark however the test ends.
struct Watermark(String);

impl Drop for Watermark {
    fn drop(&mut self) {
        rabbitmqctl(&["set_vm_memory_high_watermark", &self.0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_broker_gives_a_confirm_timeout_within_the_bound_and_no_hang() {
    let h = Harness::with_outbox().await;
    let p = Publisher::new(
        amqp_url(),
        format!("{}-publisher", h.name),
        PublisherOptions {
            confirm_timeout: Duration::from_secs(2),
            ..PublisherOptions::default()
        },
    );
    let message = || OutgoingMessage {
        exchange: h.topology.exchange(),
        routing_key: billing::ORDER_CREATED_V1,
        body: b"{}",
        properties: BasicProperties::default().with_message_id("blocked-1".into()),
    };
    p.publish(message())
        .await
        .expect("publish before the alarm");

    let current = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]);
    let restore = Watermark(if current.parse::<f64>().is_ok() {
        current
    } else {
        "0.4".to_owned()
    });
    rabbitmqctl(&["set_vm_memory_high_watermark", "0"]);

    let started = Instant::now();
    let result = p.publish(message()).await;
    let waited = started.elapsed();
    assert!(
        matches!(result, Err(AmqpError::ConfirmTimeout { .. })),
        "{result:?}"
    );
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(4),
        "waited {waited:?}"
    );

    // The outbox relay meets the same wall: its rows stay unpublished, with the timeout recorded.
    let mut conn = h.pool.get().await.expect("connection");
    for n in 0..5 {
        order_service::create_order(
            &mut conn,
            &order_service::order(&h.name, n),
            h.topology.exchange(),
        )
        .await
        .expect("create order");
    }
    drop(conn);
    let relay = h.relay(
        &amqp_url(),
        oncely::outbox::RelayOptions {
            poll_interval: Duration::from_millis(100),
            retry_backoff: oncely::amqp::Backoff {
                initial: Duration::from_millis(50),
                max: Duration::from_millis(200),
                max_attempts: None,
            },
            ..Default::default()
        },
    );
    let started = Instant::now();
    let outcome = relay.cycle().await.expect("cycle");
    assert_eq!((outcome.published, outcome.failed), (0, 5));
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "bounded by the confirm timeout"
    );
    assert_eq!(h.outbox_counts().await, (0, 5));

    drop(restore);
    let relaying =
        tokio::spawn(async move { relay.run(tokio::time::sleep(Duration::from_secs(60))).await });
    wait_until(
        "outbox published after the alarm clears",
        Duration::from_secs(30),
        || async { h.outbox_counts().await == (5, 0) },
    )
    .await;
    relaying.abort();
    // After the alarm clears, publishing works again (on a fresh channel).
    wait_until(
        "publishing works again",
        Duration::from_secs(20),
        || async { p.publish(message()).await.is_ok() },
    )
    .await;
    p.close().await;
}
