//! Retryable failures go through the delay queues with an attempt header; permanent ones and
//! exhausted retries go to the DLQ; parked ones to the parking lot.

use billing::{OrderCreated, create_invoice, order};
use oncely::{AsyncPgConnection, Envelope, HandlerError, RetryPolicy, Topology};
use oncely_e2e::Harness;
use std::time::Duration;

fn tiers() -> Vec<Duration> {
    vec![Duration::from_millis(100), Duration::from_millis(200)]
}

#[oncely::handler(consumer = "billing")]
async fn flaky_until_third_attempt(
    conn: &mut AsyncPgConnection,
    msg: Envelope<OrderCreated>,
) -> Result<(), HandlerError> {
    if msg.metadata.attempt < 3 {
        return Err(HandlerError::retryable(
            "gateway_down",
            format!(
                "payment gateway unavailable on attempt {}",
                msg.metadata.attempt
            ),
        ));
    }
    create_invoice::call(conn, msg).await
}

#[oncely::handler(consumer = "billing")]
async fn always_down(
    _conn: &mut AsyncPgConnection,
    _msg: Envelope<OrderCreated>,
) -> Result<(), HandlerError> {
    Err(HandlerError::retryable(
        "gateway_down",
        "payment gateway unavailable",
    ))
}

#[oncely::handler(consumer = "billing")]
async fn needs_review(
    _conn: &mut AsyncPgConnection,
    msg: Envelope<OrderCreated>,
) -> Result<(), HandlerError> {
    Err(HandlerError::park(
        "manual_review",
        format!("order {} needs a person", msg.payload.order_id),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_error_is_retried_through_the_delay_queue_with_attempt_header_then_succeeds() {
    let h = Harness::new(&tiers()).await;
    let consumer = h
        .consumer(flaky_until_third_attempt)
        .retry_policy(RetryPolicy::new(5, tiers()))
        .build()
        .expect("valid consumer settings");
    let running = h.start(consumer);
    let o = order(&h.name, 1);
    h.publish_order(&o).await;
    running
        .wait_for_stats("processed on the third attempt", |s| s.processed == 1)
        .await;

    let stats = running.stats();
    assert_eq!(
        (stats.retried, stats.received, stats.dead_lettered),
        (2, 3, 0)
    );
    assert_eq!(h.invoices().await, 1);
    let row = h.inbox_row("billing", &o.message_id()).await;
    assert_eq!(row.status, "processed");
    assert_eq!(row.attempts, 3, "two recorded failures, then the success");
    running.stop().await.expect("stop");
    for i in 0..2 {
        let q = h.topology.retry_queue(i).expect("tier");
        assert_eq!(h.queue_len(&q).await, 0, "{q} drained");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_go_to_dlq_with_the_last_error_and_attempt() {
    let h = Harness::new(&tiers()).await;
    let running = h.start(
        h.consumer(always_down)
            .retry_policy(RetryPolicy::new(3, tiers()))
            .build()
            .expect("valid consumer settings"),
    );
    let o = order(&h.name, 1);
    h.publish_order(&o).await;
    let dead = h.expect_in_queue(&h.topology.dlq(), 1).await;
    assert_eq!(dead[0].message_id(), Some(o.message_id()));
    assert_eq!(
        dead[0].header("x-oncely-error-code").as_deref(),
        Some("retries_exhausted")
    );
    assert_eq!(dead[0].header("x-oncely-attempt").as_deref(), Some("3"));
    let reason = dead[0].header("x-oncely-reason").unwrap_or_default();
    assert!(reason.contains("gateway_down"), "{reason}");
    let stats = running.stats();
    assert_eq!(
        (stats.retried, stats.dead_lettered, stats.processed),
        (2, 1, 0)
    );
    let row = h.inbox_row("billing", &o.message_id()).await;
    assert_eq!((row.status.as_str(), row.attempts), ("failed", 3));
    assert_eq!(h.invoices().await, 0);
    running.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_error_goes_to_dlq_at_once() {
    let h = Harness::new(&tiers()).await;
    let running = h.start(
        h.consumer(create_invoice)
            .retry_policy(RetryPolicy::new(5, tiers()))
            .build()
            .expect("valid consumer settings"),
    );
    let mut bad = order(&h.name, 1);
    bad.currency = "rupiah".into();
    h.publish_order(&bad).await;
    let dead = h.expect_in_queue(&h.topology.dlq(), 1).await;
    assert_eq!(
        dead[0].header("x-oncely-error-code").as_deref(),
        Some("invalid_currency")
    );
    assert_eq!(dead[0].header("x-oncely-attempt").as_deref(), Some("1"));
    assert_eq!(running.stats().retried, 0);
    running.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn park_error_goes_to_the_parking_lot() {
    let h = Harness::new(&tiers()).await;
    let running = h.run(needs_review);
    h.publish_order(&order(&h.name, 1)).await;
    let parked = h.expect_in_queue(&h.topology.parking(), 1).await;
    assert_eq!(
        parked[0].header("x-oncely-error-code").as_deref(),
        Some("manual_review")
    );
    assert_eq!(h.queue_len(&h.topology.dlq()).await, 0);
    assert_eq!(running.stats().parked, 1);
    running.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declaring_the_same_topology_twice_is_a_no_op_and_a_conflict_names_queue_and_argument() {
    let h = Harness::new(&tiers()).await;
    h.topology
        .declare(&h.connection)
        .await
        .expect("same topology again");
    let conflicting = Topology::new(h.topology.exchange(), h.topology.queue())
        .retry_tiers(&tiers())
        .queue_type(oncely::QueueType::Quorum);
    match conflicting.declare(&h.connection).await {
        Err(oncely::AmqpError::TopologyConflict { name, detail }) => {
            assert_eq!(name, h.topology.queue());
            assert!(detail.contains("x-queue-type"), "{detail}");
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    // The harness connection is still usable after the refused declaration.
    h.topology
        .declare(&h.connection)
        .await
        .expect("still declarable");
}

#[oncely::handler(consumer = "billing")]
async fn stuck_on_first_attempt(
    conn: &mut AsyncPgConnection,
    msg: Envelope<OrderCreated>,
) -> Result<(), HandlerError> {
    use diesel_async::RunQueryDsl;
    let attempt = msg.metadata.attempt;
    create_invoice::call(conn, msg).await?;
    if attempt == 1 {
        // Holds the transaction (and the invoice row it wrote) far past the timeout.
        diesel::sql_query("SELECT pg_sleep(10)")
            .execute(conn)
            .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_past_its_timeout_is_cancelled_rolled_back_and_retried() {
    let h = Harness::new(&tiers()).await;
    let running = h.start(
        h.consumer(stuck_on_first_attempt)
            .retry_policy(RetryPolicy::new(5, tiers()))
            .handler_timeout(Duration::from_millis(300))
            .build()
            .expect("valid consumer settings"),
    );
    let o = order(&h.name, 1);
    h.publish_order(&o).await;
    running
        .wait_for_stats("processed on the second attempt", |s| s.processed == 1)
        .await;

    let stats = running.stats();
    assert_eq!((stats.retried, stats.dead_lettered), (1, 0));
    assert_eq!(
        h.invoices().await,
        1,
        "the timed-out attempt's invoice was rolled back"
    );
    let row = h.inbox_row("billing", &o.message_id()).await;
    assert_eq!((row.status.as_str(), row.attempts), ("processed", 2));
    // The stuck statement was cancelled on the server, not left holding its locks.
    oncely_e2e::wait_until(
        "no pg_sleep left on the server",
        Duration::from_secs(5),
        || async { h.sleeping_backends().await == 0 },
    )
    .await;
    running.stop().await.expect("stop");
}

#[oncely::handler(consumer = "billing")]
async fn first_order_flaky(
    conn: &mut AsyncPgConnection,
    msg: Envelope<OrderCreated>,
) -> Result<(), HandlerError> {
    if msg.payload.order_id.ends_with("-0") && msg.metadata.attempt < 3 {
        return Err(HandlerError::retryable("gateway_down", "try again"));
    }
    create_invoice::call(conn, msg).await
}

async fn invoice_order_after_a_retry(strict: bool) -> Vec<String> {
    // A strict-order queue is declared with x-single-active-consumer.
    let h = Harness::on_broker(&oncely_e2e::amqp_url(), &tiers(), |t| {
        t.single_active_consumer(strict)
    })
    .await;
    for n in 0..3 {
        h.publish_order(&order(&h.name, n)).await;
    }
    let builder = h
        .consumer(first_order_flaky)
        .retry_policy(RetryPolicy::new(5, tiers()));
    let running = h.start(
        if strict {
            builder.strict_order()
        } else {
            builder
        }
        .build()
        .expect("valid consumer settings"),
    );
    running
        .wait_for_stats("all processed", |s| s.processed == 3)
        .await;
    assert_eq!(running.stats().retried, 2);
    running.stop().await.expect("stop");
    let name = h.name.clone();
    h.invoice_order()
        .await
        .into_iter()
        .map(|id| id.trim_start_matches(&format!("{name}-")).to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_order_keeps_queue_order_through_retries_and_the_default_does_not() {
    assert_eq!(
        invoice_order_after_a_retry(true).await,
        ["0", "1", "2"],
        "strict: nothing overtakes the retrying order"
    );
    // Default (concurrency 8, delay-queue retries): 1 and 2 run side by side, in either order,
    // and both go ahead of 0 while it waits in the delay queue.
    let default = invoice_order_after_a_retry(false).await;
    assert_eq!(default.len(), 3);
    assert_eq!(default[2], "0", "later orders went ahead: {default:?}");
}
