//! Every metric of the consumer runtime, the publisher and the outbox relay, raised by the event
//! it counts, against the real RabbitMQ and PostgreSQL. The recorder is process-wide: each test
//! reads only the series of its own queue, exchange or relay (unique names).

use billing::{OrderCreated, create_invoice, order};
use oncely::amqp::ConfirmPublisher;
use oncely::lapin::BasicProperties;
use oncely::lapin::options::QueueDeclareOptions;
use oncely::lapin::types::{AMQPValue, FieldTable, LongString};
use oncely::metric_names as m;
use oncely::observability::{Observability, install_recorder};
use oncely::outbox::{NewOutboxMessage, RelayOptions};
use oncely::{AmqpError, AsyncPgConnection, Envelope, HandlerError, OutgoingMessage, RetryPolicy};
use oncely_e2e::{Harness, http_get, metric_value as value, wait_until};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// An empty message that no queue is bound to take.
fn to_nobody(exchange: &str) -> OutgoingMessage<'_> {
    OutgoingMessage {
        exchange,
        routing_key: "nobody.listens",
        body: b"{}",
        properties: BasicProperties::default(),
    }
}

fn scrape() -> String {
    install_recorder().expect("recorder").render()
}

/// Waits until the series reaches `expected`, then checks it stays exact.
async fn expect_metric(name: &str, labels: &[(&str, &str)], expected: f64) {
    wait_until(
        &format!("{name}{labels:?} = {expected}"),
        Duration::from_secs(20),
        || async { value(&scrape(), name, labels) >= expected },
    )
    .await;
    assert_eq!(value(&scrape(), name, labels), expected, "{name}{labels:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processed_and_duplicate_are_counted_once_each_and_served_on_metrics_endpoint() {
    install_recorder().expect("recorder");
    let server = Observability::new("127.0.0.1:0".parse().expect("addr"))
        .serve()
        .await
        .expect("serve");
    let h = Harness::new(&[]).await;
    let q = h.topology.queue().to_owned();
    let labels = [("queue", q.as_str()), ("consumer", "billing")];
    let running = h.run(create_invoice);
    let o = order(&h.name, 1);
    h.publish_order(&o).await;
    running
        .wait_for_stats("processed", |s| s.processed == 1)
        .await;
    expect_metric(m::PROCESSED, &labels, 1.0).await;
    assert_eq!(value(&scrape(), m::DUPLICATES, &labels), 0.0);

    h.publish_order(&o).await;
    running
        .wait_for_stats("duplicate", |s| s.duplicates == 1)
        .await;
    expect_metric(m::DUPLICATES, &labels, 1.0).await;
    expect_metric(m::DELIVERIES_RECEIVED, &labels, 2.0).await;
    let count = format!("{}_count", m::HANDLER_DURATION);
    expect_metric(&count, &labels, 2.0).await;
    let latency = format!("{}_count", m::END_TO_END_LATENCY);
    expect_metric(&latency, &labels, 1.0).await;
    expect_metric(m::IN_FLIGHT, &labels, 0.0).await;
    expect_metric(m::CONSUMER_CONNECTED, &labels, 1.0).await;
    assert_eq!(h.invoices().await, 1);

    // The same numbers over HTTP, as Prometheus scrapes them.
    let (status, body) = http_get(server.local_addr(), "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(value(&body, m::PROCESSED, &labels), 1.0, "{body}");
    assert_eq!(value(&body, m::DUPLICATES, &labels), 1.0);
    assert!(body.contains("# TYPE oncely_handler_duration_seconds histogram"));
    let (status, _) = http_get(server.local_addr(), "/health/live").await;
    assert_eq!(status, 200);

    running.stop().await.expect("clean stop");
    expect_metric(m::CONSUMER_CONNECTED, &labels, 0.0).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_counted_dead_lettered_with_their_contract_code() {
    install_recorder().expect("recorder");
    let h = Harness::new(&[]).await;
    let q = h.topology.queue().to_owned();
    let running = h.run(create_invoice);
    h.publish_raw(
        b"not json",
        BasicProperties::default().with_message_id(format!("{}-bad", h.name).into()),
    )
    .await;
    h.publish_raw(br#"{"order_id":"x"}"#, BasicProperties::default())
        .await;
    running
        .wait_for_stats("two dead letters", |s| s.dead_lettered == 2)
        .await;
    for code in ["contract.undecodable_body", "contract.missing_message_id"] {
        expect_metric(
            m::DEAD_LETTERED,
            &[("queue", &q), ("consumer", "billing"), ("code", code)],
            1.0,
        )
        .await;
    }
    assert_eq!(
        value(&scrape(), m::PROCESSED, &[("queue", &q)]),
        0.0,
        "nothing processed"
    );
    h.expect_in_queue(&h.topology.dlq(), 2).await;
    running.stop().await.expect("clean stop");
}

#[oncely::handler(consumer = "billing")]
async fn fails_first_attempt(
    conn: &mut AsyncPgConnection,
    msg: Envelope<OrderCreated>,
) -> Result<(), HandlerError> {
    if msg.metadata.attempt < 2 {
        return Err(HandlerError::retryable(
            "gateway_down",
            "gateway unavailable",
        ));
    }
    create_invoice::call(conn, msg).await
}

#[oncely::handler(consumer = "billing")]
async fn needs_review(
    _conn: &mut AsyncPgConnection,
    _msg: Envelope<OrderCreated>,
) -> Result<(), HandlerError> {
    Err(HandlerError::park("manual_review", "needs a person"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_is_counted_by_tier_and_handler_error_by_kind_and_code() {
    install_recorder().expect("recorder");
    let tiers = vec![Duration::from_millis(200)];
    let h = Harness::new(&tiers).await;
    let q = h.topology.queue().to_owned();
    let running = h.start(
        h.consumer(fails_first_attempt)
            .retry_policy(RetryPolicy::new(3, tiers))
            .build()
            .expect("valid consumer settings"),
    );
    h.publish_order(&order(&h.name, 1)).await;
    running
        .wait_for_stats("processed after one retry", |s| s.processed == 1)
        .await;
    let base = [("queue", q.as_str()), ("consumer", "billing")];
    expect_metric(
        m::RETRIES,
        &[
            base[0],
            base[1],
            ("tier", "200ms"),
            ("code", "gateway_down"),
        ],
        1.0,
    )
    .await;
    expect_metric(
        m::HANDLER_ERRORS,
        &[
            base[0],
            base[1],
            ("kind", "retryable"),
            ("code", "gateway_down"),
        ],
        1.0,
    )
    .await;
    expect_metric(m::PROCESSED, &base, 1.0).await;
    running.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_message_is_counted_with_its_code() {
    install_recorder().expect("recorder");
    let h = Harness::new(&[]).await;
    let q = h.topology.queue().to_owned();
    let running = h.run(needs_review);
    h.publish_order(&order(&h.name, 1)).await;
    running.wait_for_stats("parked", |s| s.parked == 1).await;
    let labels = [
        ("queue", q.as_str()),
        ("consumer", "billing"),
        ("code", "manual_review"),
    ];
    expect_metric(m::PARKED, &labels, 1.0).await;
    expect_metric(
        m::HANDLER_ERRORS,
        &[labels[0], labels[1], ("kind", "park"), labels[2]],
        1.0,
    )
    .await;
    running.stop().await.expect("clean stop");
}

/// Sleeps while handling, so that a second delivery of the same id arrives meanwhile.
struct Slow {
    name: String,
}

#[oncely::handler(consumer = &self.name)]
impl Slow {
    async fn handle(
        &self,
        _conn: &mut AsyncPgConnection,
        _msg: Envelope<serde_json::Value>,
    ) -> Result<(), HandlerError> {
        tokio::time::sleep(Duration::from_millis(800)).await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicate_is_counted_as_claim_conflict_and_duplicate() {
    install_recorder().expect("recorder");
    let h = Harness::new(&[]).await;
    let consumer = format!("slow-{}", h.name);
    let running = h.start(
        h.consumer(Slow {
            name: consumer.clone(),
        })
        .concurrency(4)
        .build()
        .expect("valid consumer settings"),
    );
    h.wait_for_consumer().await;
    let o = order(&h.name, 1);
    h.publish_order(&o).await;
    h.publish_order(&o).await;
    running
        .wait_for_stats("one processed, one duplicate", |s| {
            s.processed == 1 && s.duplicates == 1
        })
        .await;
    let labels = [
        ("queue", h.topology.queue()),
        ("consumer", consumer.as_str()),
    ];
    expect_metric(m::INBOX_CLAIM_CONFLICTS, &labels, 1.0).await;
    expect_metric(m::DUPLICATES, &labels, 1.0).await;
    expect_metric(m::PROCESSED, &labels, 1.0).await;
    running.stop().await.expect("clean stop");
}

/// Closes its own consumer's connection from the broker's side while handling the first
/// delivery, so the commit succeeds and the ack cannot be sent.
struct LosesItsAck {
    harness: Arc<Harness>,
    closed: AtomicBool,
}

#[oncely::handler(consumer = "billing")]
impl LosesItsAck {
    async fn handle(
        &self,
        _conn: &mut AsyncPgConnection,
        _msg: Envelope<serde_json::Value>,
    ) -> Result<(), HandlerError> {
        if !self.closed.swap(true, Ordering::SeqCst) {
            let closed = self.harness.close_consumer_connections().await;
            assert_eq!(closed, 1, "the consumer's connection");
            // Let the client read the broker's close before the runtime tries to ack.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_ack_is_counted_then_redelivery_reconnect_and_duplicate() {
    install_recorder().expect("recorder");
    let h = Arc::new(Harness::new(&[]).await);
    let q = h.topology.queue().to_owned();
    let labels = [("queue", q.as_str()), ("consumer", "billing")];
    let running = h.start(
        h.consumer(LosesItsAck {
            harness: h.clone(),
            closed: AtomicBool::new(false),
        })
        .build()
        .expect("valid consumer settings"),
    );
    h.wait_for_consumer().await;
    h.publish_order(&order(&h.name, 1)).await;
    running
        .wait_for_stats("redelivery acked as duplicate", |s| s.duplicates == 1)
        .await;
    expect_metric(m::ACK_FAILURES, &labels, 1.0).await;
    expect_metric(m::REDELIVERIES, &labels, 1.0).await;
    expect_metric(m::CONSUMER_RECONNECTS, &labels, 1.0).await;
    expect_metric(m::DUPLICATES, &labels, 1.0).await;
    expect_metric(m::CONSUMER_CONNECTED, &labels, 1.0).await;
    running.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_counts_confirms_returns_nacks_and_timeouts() {
    install_recorder().expect("recorder");
    let h = Harness::new(&[]).await;
    let exchange = h.topology.exchange().to_owned();
    let ex = [("exchange", exchange.as_str())];

    // Routed and confirmed.
    h.publish_order(&order(&h.name, 1)).await;
    // Unroutable: no queue is bound with this routing key.
    let returned = h.publisher.publish(to_nobody(&exchange)).await;
    assert!(
        matches!(returned, Err(AmqpError::Unroutable { .. })),
        "{returned:?}"
    );
    expect_metric(m::PUBLISHER_CONFIRMED, &ex, 1.0).await;
    expect_metric(m::PUBLISHER_RETURNED, &ex, 1.0).await;
    let latency = format!("{}_count", m::PUBLISHER_CONFIRM_LATENCY);
    expect_metric(&latency, &ex, 2.0).await;
    expect_metric(m::PUBLISHER_OUTSTANDING, &ex, 0.0).await;

    // Refused: a full queue that rejects publishes makes the broker nack.
    let full = format!("{}.full", h.name);
    let channel = h.connection.create_channel().await.expect("channel");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    channel
        .queue_declare(
            full.as_str().into(),
            QueueDeclareOptions {
                auto_delete: false,
                exclusive: false,
                durable: false,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .expect("declare full queue");
    let nacked = h
        .publisher
        .publish(OutgoingMessage {
            exchange: "",
            routing_key: &full,
            body: b"{}",
            properties: BasicProperties::default(),
        })
        .await;
    assert!(
        matches!(nacked, Err(AmqpError::Nacked { .. })),
        "{nacked:?}"
    );
    expect_metric(m::PUBLISHER_NACKS, &[("exchange", "amq.default")], 1.0).await;
    channel
        .queue_delete(full.as_str().into(), Default::default())
        .await
        .expect("delete full queue");
    oncely::amqp::close_channel(&channel, 200, "done").await;

    // A microsecond is too short for a confirm, nearly always: a local broker can still answer
    // within the timer's millisecond, so try until one times out and count what did.
    let hasty = ConfirmPublisher::new(h.connection.clone(), Duration::from_micros(1));
    let mut timeouts = 0u32;
    for _ in 0..50 {
        if matches!(
            hasty.publish(to_nobody(&exchange)).await,
            Err(AmqpError::ConfirmTimeout { .. })
        ) {
            timeouts += 1;
            break;
        }
    }
    assert_eq!(timeouts, 1, "a publish timed out waiting for its confirm");
    expect_metric(m::PUBLISHER_CONFIRM_TIMEOUTS, &ex, f64::from(timeouts)).await;
    expect_metric(m::PUBLISHER_OUTSTANDING, &ex, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_reports_backlog_and_publish_attempts() {
    install_recorder().expect("recorder");
    let h = Harness::with_outbox().await;
    let relay_name = format!("relay-{}", h.name);
    let relay = h.relay(
        &oncely_e2e::amqp_url(),
        RelayOptions {
            name: relay_name.clone(),
            ..RelayOptions::default()
        },
    );
    let labels = [("relay", relay_name.as_str())];
    {
        let mut conn = h.pool.get().await.expect("connection");
        for n in 0..3 {
            order_service::create_order(&mut conn, &order(&h.name, n), h.topology.exchange())
                .await
                .expect("create order");
        }
        let lost = NewOutboxMessage::builder()
            .id(format!("{}-lost", h.name))
            .aggregate("order", format!("{}-lost", h.name))
            .event_type("order.lost.v1")
            .exchange(h.topology.exchange())
            .routing_key("nobody.listens")
            .payload(&serde_json::json!({}))
            .build()
            .expect("event");
        oncely::outbox::enqueue(&mut conn, &lost)
            .await
            .expect("enqueue");
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let backlog = relay.refresh_backlog().await.expect("backlog");
    assert_eq!(backlog.unpublished, 4);
    assert!(backlog.oldest_age >= Duration::from_secs(1), "{backlog:?}");
    let text = scrape();
    assert_eq!(value(&text, m::OUTBOX_UNPUBLISHED, &labels), 4.0);
    assert!(value(&text, m::OUTBOX_OLDEST_AGE, &labels) >= 1.0);

    let outcome = relay.cycle().await.expect("cycle");
    assert_eq!((outcome.published, outcome.failed), (3, 1));
    expect_metric(
        m::OUTBOX_PUBLISH_ATTEMPTS,
        &[labels[0], ("result", "published")],
        3.0,
    )
    .await;
    expect_metric(
        m::OUTBOX_PUBLISH_ATTEMPTS,
        &[labels[0], ("result", "failed")],
        1.0,
    )
    .await;
    relay.refresh_backlog().await.expect("backlog");
    assert_eq!(value(&scrape(), m::OUTBOX_UNPUBLISHED, &labels), 1.0);
    h.expect_in_queue(h.topology.queue(), 3).await;
}

/// Publishes directly and through the outbox while handling, without setting any id itself.
struct Forwards {
    publisher: ConfirmPublisher,
    to: String,
    exchange: String,
}

#[oncely::handler(consumer = "forwarder")]
impl Forwards {
    async fn handle(
        &self,
        conn: &mut AsyncPgConnection,
        msg: Envelope<serde_json::Value>,
    ) -> Result<(), HandlerError> {
        self.publisher
            .publish(OutgoingMessage {
                exchange: "",
                routing_key: &self.to,
                body: b"{}",
                properties: BasicProperties::default()
                    .with_message_id(format!("{}-direct", msg.message_id()).into()),
            })
            .await
            .map_err(|e| HandlerError::retryable("publish", e.to_string()))?;
        let event = NewOutboxMessage::builder()
            .id(format!("{}-outbox", msg.message_id()))
            .aggregate("order", "o")
            .event_type("order.forwarded.v1")
            .exchange(&self.exchange)
            .payload(&serde_json::json!({}))
            .build()
            .map_err(|e| HandlerError::permanent("json", e.to_string()))?;
        oncely::outbox::enqueue(conn, &event)
            .await
            .map_err(|e| HandlerError::retryable("db", e.to_string()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_published_while_handling_carry_correlation_causation_and_traceparent() {
    let h = Harness::with_outbox().await;
    let to = h.topology.parking();
    let running = h.start(
        h.consumer(Forwards {
            publisher: h.publisher.clone(),
            to: to.clone(),
            exchange: h.topology.exchange().to_owned(),
        })
        .build()
        .expect("valid consumer settings"),
    );
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let id = format!("{}-1", h.name);
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(LongString::from(traceparent)),
    );
    h.publish_raw(
        b"{}",
        BasicProperties::default()
            .with_message_id(id.as_str().into())
            .with_correlation_id("req-42".into())
            .with_headers(headers),
    )
    .await;
    running
        .wait_for_stats("processed", |s| s.processed == 1)
        .await;

    let direct = h.expect_in_queue(&to, 1).await;
    let direct = &direct[0];
    assert_eq!(
        direct
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str()),
        Some("req-42")
    );
    assert_eq!(direct.header("causation_id").as_deref(), Some(id.as_str()));
    assert_eq!(direct.header("traceparent").as_deref(), Some(traceparent));

    use diesel_async::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Headers {
        #[diesel(sql_type = diesel::sql_types::Jsonb)]
        headers: serde_json::Value,
    }
    let mut conn = h.pool.get().await.expect("connection");
    let row: Headers = diesel::sql_query("SELECT headers FROM outbox_message WHERE id = $1")
        .bind::<diesel::sql_types::Text, _>(format!("{id}-outbox"))
        .get_result(&mut conn)
        .await
        .expect("outbox row");
    assert_eq!(row.headers["correlation_id"], "req-42");
    assert_eq!(row.headers["causation_id"], id.as_str());
    assert_eq!(row.headers["traceparent"], traceparent);
    running.stop().await.expect("clean stop");
}
