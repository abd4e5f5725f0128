//! The confirmed publisher against the real broker: typed errors, batches, delays, reconnection.

use oncely::lapin::BasicProperties;
use oncely::{AmqpError, OutgoingMessage, Publisher, PublisherOptions};
use oncely_e2e::{Harness, amqp_url, wait_until};
use std::time::{Duration, Instant};

fn message<'a>(exchange: &'a str, routing_key: &'a str, body: &'a [u8]) -> OutgoingMessage<'a> {
    OutgoingMessage {
        exchange,
        routing_key,
        body,
        properties: BasicProperties::default().with_message_id("m-1".into()),
    }
}

fn publisher(h: &Harness) -> Publisher {
    Publisher::new(
        amqp_url(),
        format!("{}-publisher", h.name),
        PublisherOptions {
            confirm_timeout: Duration::from_secs(2),
            ..PublisherOptions::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_publish_is_a_typed_error_naming_exchange_and_key_and_fast() {
    let h = Harness::new(&[]).await;
    let p = publisher(&h);
    let started = Instant::now();
    let result = p
        .publish(message(h.topology.exchange(), "no.such.key", b"{}"))
        .await;
    match result {
        Err(AmqpError::Unroutable {
            exchange,
            routing_key,
            reply_text,
        }) => {
            assert_eq!(exchange, h.topology.exchange());
            assert_eq!(routing_key, "no.such.key");
            assert!(reply_text.contains("NO_ROUTE"), "{reply_text}");
        }
        other => panic!("expected Unroutable, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "fails fast, not at the confirm timeout"
    );
    // The publisher goes on working.
    p.publish(message(
        h.topology.exchange(),
        billing::ORDER_CREATED_V1,
        b"{}",
    ))
    .await
    .expect("routable publish");
    assert_eq!(h.queue_len(h.topology.queue()).await, 1);
    p.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_to_a_missing_exchange_fails_and_the_next_publish_recovers() {
    let h = Harness::new(&[]).await;
    let p = publisher(&h);
    let missing = format!("{}.missing", h.topology.exchange());
    let err = p
        .publish(message(&missing, "k", b"{}"))
        .await
        .expect_err("no such exchange");
    assert!(
        err.to_string().contains("NOT_FOUND") || matches!(err, AmqpError::Connection(_)),
        "{err}"
    );
    p.publish(message(
        h.topology.exchange(),
        billing::ORDER_CREATED_V1,
        b"{}",
    ))
    .await
    .expect("a fresh channel is used");
    assert_eq!(h.queue_len(h.topology.queue()).await, 1);
    p.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_publish_reports_exactly_which_messages_failed() {
    let h = Harness::new(&[]).await;
    let p = publisher(&h);
    let bodies: Vec<Vec<u8>> = (0..500)
        .map(|i| format!("{{\"n\":{i}}}").into_bytes())
        .collect();
    let messages: Vec<OutgoingMessage<'_>> = bodies
        .iter()
        .enumerate()
        .map(|(i, body)| {
            // Every 50th message goes nowhere.
            let key = if i % 50 == 7 {
                "nowhere"
            } else {
                billing::ORDER_CREATED_V1
            };
            message(h.topology.exchange(), key, body)
        })
        .collect();
    let results = p.publish_batch(&messages, 64).await;
    assert_eq!(results.len(), 500);
    let failed: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| r.is_err())
        .map(|(i, _)| i)
        .collect();
    let expected: Vec<usize> = (0..500).filter(|i| i % 50 == 7).collect();
    assert_eq!(failed, expected);
    for i in &failed {
        assert!(
            matches!(results[*i], Err(AmqpError::Unroutable { .. })),
            "{:?}",
            results[*i]
        );
    }
    assert_eq!(h.queue_len(h.topology.queue()).await, 490);
    p.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_message_arrives_after_its_delay_and_a_too_long_delay_fails_fast() {
    let h = Harness::new(&[]).await;
    let p = publisher(&h);
    let max = Some(Duration::from_secs(60));
    match p
        .publish_delayed(
            message(h.topology.exchange(), billing::ORDER_CREATED_V1, b"{}"),
            Duration::from_secs(61),
            max,
        )
        .await
    {
        Err(AmqpError::DelayTooLong {
            delay,
            max_delay,
            queue,
        }) => {
            assert_eq!(
                (delay, max_delay),
                (Duration::from_secs(61), Duration::from_secs(60))
            );
            assert_eq!(
                queue,
                format!(
                    "oncely.delay.{}.{}",
                    h.topology.exchange(),
                    billing::ORDER_CREATED_V1
                )
            );
        }
        other => panic!("expected DelayTooLong, got {other:?}"),
    }

    let sent = Instant::now();
    p.publish_delayed(
        message(
            h.topology.exchange(),
            billing::ORDER_CREATED_V1,
            b"{\"late\":true}",
        ),
        Duration::from_millis(400),
        max,
    )
    .await
    .expect("delayed publish");
    assert_eq!(
        h.queue_len(h.topology.queue()).await,
        0,
        "not there before its delay"
    );
    wait_until("the delayed message", Duration::from_secs(10), || async {
        h.queue_len(h.topology.queue()).await == 1
    })
    .await;
    assert!(
        sent.elapsed() >= Duration::from_millis(400),
        "arrived after {:?}",
        sent.elapsed()
    );
    let got = h.drain(h.topology.queue()).await;
    assert_eq!(got[0].body, b"{\"late\":true}");
    assert_eq!(got[0].message_id().as_deref(), Some("m-1"));

    let delay_queue = format!(
        "oncely.delay.{}.{}",
        h.topology.exchange(),
        billing::ORDER_CREATED_V1
    );
    let listed = std::process::Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "name",
            "arguments",
            "-q",
            "--no-table-headers",
        ])
        .output()
        .expect("rabbitmqctl");
    let line = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .find(|l| l.starts_with(&format!("{delay_queue}\t")))
        .map(str::to_owned)
        .expect("delay queue exists");
    assert!(
        line.contains("x-message-ttl") && line.contains("60000"),
        "{line}"
    );
    let channel = h.connection.create_channel().await.expect("channel");
    let _ = channel
        .queue_delete(delay_queue.as_str().into(), Default::default())
        .await;
    p.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_is_a_typed_error_within_the_timeout() {
    let p = Publisher::new(
        "amqp://guest:guest@127.0.0.1:1/%2f",
        "unreachable",
        PublisherOptions {
            confirm_timeout: Duration::from_secs(2),
            ..PublisherOptions::default()
        },
    );
    let started = Instant::now();
    let err = p
        .publish(message("x", "y", b"{}"))
        .await
        .expect_err("nothing listens on port 1");
    assert!(err.is_transient(), "{err}");
    assert!(
        matches!(err, AmqpError::Connect { .. } | AmqpError::Timeout { .. }),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_each_get_their_own_result_when_some_are_unroutable() {
    // lapin hands a returned message to whichever confirm resolves next; under concurrency that
    // would tell an unroutable publish it was routed (and the consumer would ack an original
    // whose dead-letter copy went nowhere). Each publish must see its own outcome.
    let h = Harness::new(&[]).await;
    let publisher = std::sync::Arc::new(oncely::amqp::ConfirmPublisher::new(
        h.connection.clone(),
        Duration::from_secs(5),
    ));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200usize {
        let publisher = publisher.clone();
        let exchange = h.topology.exchange().to_owned();
        tasks.spawn(async move {
            let key = if i % 2 == 1 {
                "nowhere"
            } else {
                billing::ORDER_CREATED_V1
            };
            let body = format!("{{\"n\":{i}}}");
            let result = publisher
                .publish(message(&exchange, key, body.as_bytes()))
                .await;
            (i, result)
        });
    }
    let mut routed = 0;
    while let Some(joined) = tasks.join_next().await {
        let (i, result) = joined.expect("task");
        if i % 2 == 1 {
            assert!(
                matches!(result, Err(AmqpError::Unroutable { .. })),
                "#{i}: {result:?}"
            );
        } else {
            result.unwrap_or_else(|e| panic!("#{i}: {e}"));
            routed += 1;
        }
    }
    assert_eq!(routed, 100);
    assert_eq!(h.queue_len(h.topology.queue()).await, 100);
}
