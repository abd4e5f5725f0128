//! The guarantee itself, against the real RabbitMQ and PostgreSQL: whatever is redelivered or
//! published twice, and whatever crashes between commit and ack, each order gets ONE invoice.

use billing::{create_invoice, order};
use oncely::FaultInjection;
use oncely_e2e::Harness;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_delivery_after_commit_is_acked_without_running_handler() {
    let h = Harness::new(&[]).await;
    let running = h.run(create_invoice);
    let o = order(&h.name, 1);
    h.publish_order(&o).await;
    running
        .wait_for_stats("first delivery processed", |s| s.processed == 1)
        .await;
    h.publish_order(&o).await;
    running
        .wait_for_stats("second delivery seen as duplicate", |s| s.duplicates == 1)
        .await;

    assert_eq!(h.invoices().await, 1);
    let row = h.inbox_row("billing", &o.message_id()).await;
    assert_eq!(row.status, "processed");
    assert_eq!(row.attempts, 1, "the handler ran once");
    running.stop().await.expect("clean stop");
    assert_eq!(
        h.queue_len(h.topology.queue()).await,
        0,
        "both deliveries acked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_commit_before_ack_is_redelivered_and_acked_as_duplicate() {
    let h = Harness::new(&[]).await;
    let o = order(&h.name, 1);
    let crashed = Arc::new(Mutex::new(HashSet::new()));
    let fault = FaultInjection {
        crash_after_commit: Arc::new(move |m| {
            // Crash once, on the first delivery of each message.
            crashed
                .lock()
                .map(|mut seen| seen.insert(m.message_id.clone()))
                .unwrap_or(false)
        }),
    };
    let running = h.start(
        h.consumer(create_invoice)
            .fault_injection(fault)
            .build()
            .expect("valid consumer settings"),
    );
    h.publish_order(&o).await;
    running
        .wait_for_stats("redelivery acked as duplicate", |s| s.duplicates == 1)
        .await;

    let stats = running.stats();
    assert_eq!(
        stats.processed, 0,
        "the first delivery never reached its ack"
    );
    assert!(stats.reconnects >= 1, "the runtime reconnected: {stats:?}");
    assert_eq!(h.invoices().await, 1);
    let row = h.inbox_row("billing", &o.message_id()).await;
    assert_eq!((row.status.as_str(), row.attempts), ("processed", 1));
    running.stop().await.expect("clean stop");
    assert_eq!(h.queue_len(h.topology.queue()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_orders_with_20_percent_duplicates_at_concurrency_8_make_exactly_1000_invoices() {
    let h = Harness::new(&[]).await;
    let summary = h.publish_orders(1000, 0.2, 42).await;
    assert_eq!((summary.orders, summary.duplicates), (1000, 200));
    let running = h.start(
        h.consumer(create_invoice)
            .concurrency(8)
            .prefetch(32)
            .build()
            .expect("valid consumer settings"),
    );
    running
        .wait_for_stats("all 1200 deliveries settled", |s| s.settled() == 1200)
        .await;

    assert_eq!(h.invoices().await, 1000);
    let stats = running.stats();
    assert_eq!(
        (stats.processed, stats.duplicates, stats.dead_lettered),
        (1000, 200, 0)
    );
    assert_eq!(
        h.inbox.count_processed("billing").await.expect("count"),
        1000
    );
    running.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_closing_every_consumer_connection_mid_stream_loses_and_doubles_nothing() {
    let h = Harness::new(&[]).await;
    let summary = h.publish_orders(600, 0.1, 1).await;
    // Slow enough that the connection is closed while deliveries are in flight.
    let running = h.start(
        h.consumer(create_invoice)
            .concurrency(4)
            .prefetch(16)
            .build()
            .expect("valid consumer settings"),
    );
    for round in 1..=2u64 {
        running
            .wait_for_stats("some progress", |s| s.settled() >= round * 150)
            .await;
        let closed = h.close_consumer_connections().await;
        assert!(
            closed >= 1,
            "round {round}: the consumer's connection was found and closed"
        );
        running
            .wait_for_stats("reconnected", |s| s.reconnects >= round)
            .await;
    }
    oncely_e2e::wait_until("every order invoiced", Duration::from_secs(60), || async {
        h.invoices().await == 600
    })
    .await;
    oncely_e2e::wait_until("queue empty", Duration::from_secs(30), || async {
        h.queue_len(h.topology.queue()).await == 0
    })
    .await;
    let stats = running.stats();
    assert_eq!(h.invoices().await, 600, "exactly once: {stats:?}");
    assert_eq!(
        h.inbox.count_processed("billing").await.expect("count"),
        600
    );
    assert!(
        stats.settled() >= summary.total() as u64,
        "redeliveries are counted as duplicates: {stats:?}"
    );
    assert_eq!(stats.dead_lettered, 0);
    running.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_deliveries_and_leaves_the_rest_queued() {
    let h = Harness::new(&[]).await;
    #[oncely::handler(consumer = "billing")]
    async fn slow_invoice(
        conn: &mut oncely::AsyncPgConnection,
        msg: oncely::Envelope<billing::OrderCreated>,
    ) -> Result<(), oncely::HandlerError> {
        tokio::time::sleep(Duration::from_millis(300)).await;
        create_invoice::call(conn, msg).await
    }
    for n in 0..20 {
        h.publish_order(&order(&h.name, n)).await;
    }
    let running = h.start(
        h.consumer(slow_invoice)
            .concurrency(2)
            .prefetch(4)
            .build()
            .expect("valid consumer settings"),
    );
    running
        .wait_for_stats("first deliveries in flight", |s| s.received >= 2)
        .await;
    running.stop().await.expect("run returns Ok on shutdown");

    let invoices = h.invoices().await;
    let processed = h.inbox.count_processed("billing").await.expect("count");
    let queued = h.queue_len(h.topology.queue()).await;
    assert!(
        invoices >= 2,
        "in-flight deliveries were finished, not abandoned"
    );
    assert_eq!(invoices, processed);
    assert_eq!(
        invoices + i64::from(queued),
        20,
        "nothing lost: the rest is back in the queue"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_that_abandons_in_flight_deliveries_says_so_and_the_broker_redelivers_them() {
    let h = Harness::new(&[]).await;
    #[oncely::handler(consumer = "billing")]
    async fn stuck_invoice(
        conn: &mut oncely::AsyncPgConnection,
        msg: oncely::Envelope<billing::OrderCreated>,
    ) -> Result<(), oncely::HandlerError> {
        // Far longer than the drain allows: this run is abandoned at shutdown.
        tokio::time::sleep(Duration::from_secs(600)).await;
        create_invoice::call(conn, msg).await
    }
    for n in 0..2 {
        h.publish_order(&order(&h.name, n)).await;
    }
    let running = h.start(
        h.consumer(stuck_invoice)
            .concurrency(2)
            .prefetch(2)
            .shutdown_timeout(Duration::from_millis(500))
            .build()
            .expect("valid consumer settings"),
    );
    running
        .wait_for_stats("both deliveries in flight", |s| s.received == 2)
        .await;
    let stopped = oncely_e2e::within("the stop", Duration::from_secs(15), running.stop()).await;
    match stopped {
        Err(oncely::AmqpError::DrainTimedOut { abandoned }) => assert_eq!(abandoned, 2),
        other => panic!("a drain that gave up must not look like a clean stop: {other:?}"),
    }
    assert_eq!(h.invoices().await, 0, "the abandoned runs rolled back");

    // Left unacked, the two come back and are processed once each.
    let running = h.run(create_invoice);
    running
        .wait_for_stats("the abandoned deliveries processed", |s| s.processed == 2)
        .await;
    assert_eq!(h.invoices().await, 2);
    running.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_killed_mid_stream_lose_and_double_nothing() {
    let tiers = [Duration::from_millis(50)];
    let h = Harness::new(&tiers).await;
    h.publish_orders(400, 0.1, 3).await;
    let running = h.start(
        h.consumer(create_invoice)
            .concurrency(4)
            .retry_policy(oncely::RetryPolicy::new(20, tiers.to_vec()))
            .requeue_delay(Duration::from_millis(20))
            .build()
            .expect("valid consumer settings"),
    );
    for round in 1..=3u64 {
        running
            .wait_for_stats("some progress", |s| s.settled() >= round * 100)
            .await;
        let killed = h.terminate_database_connections().await;
        assert!(
            killed >= 1,
            "round {round}: the pool's backends were terminated"
        );
    }
    oncely_e2e::wait_until("every order invoiced", Duration::from_secs(60), || async {
        h.invoices().await == 400
    })
    .await;
    oncely_e2e::wait_until("queues empty", Duration::from_secs(30), || async {
        h.queue_len(h.topology.queue()).await == 0
            && h.queue_len(&h.topology.retry_queue(0).unwrap_or_default())
                .await
                == 0
    })
    .await;
    let stats = running.stats();
    assert_eq!(h.invoices().await, 400, "exactly once: {stats:?}");
    assert_eq!(h.processed().await, 400);
    eprintln!("after the database kills: {stats:?}");
    assert!(
        stats.held + stats.retried >= 1,
        "the kills hit deliveries in flight: {stats:?}"
    );
    assert_eq!(
        stats.requeued, 0,
        "held and tried again, never handed back to the broker: {stats:?}"
    );
    assert_eq!(
        stats.dead_lettered, 0,
        "a database outage is not the message's fault: {stats:?}"
    );
    running.stop().await.expect("clean stop");
}
