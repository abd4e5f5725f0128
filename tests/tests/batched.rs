//! Batched mode against the real RabbitMQ and PostgreSQL: many deliveries per transaction, the
//! same guarantees as one at a time. One invoice per order whatever is duplicated, crashes
//! after the commit or loses its database connection; a failing message fails alone.

use billing::{PoisonKind, create_invoice, order, publish_poison};
use oncely::FaultInjection;
use oncely_e2e::Harness;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_with_duplicates_and_poison_make_one_invoice_per_order() {
    let h = Harness::new(&[]).await;
    let summary = h.publish_orders(600, 0.2, 5).await;
    for (i, kind) in [
        PoisonKind::InvalidJson,
        PoisonKind::MissingMessageId,
        PoisonKind::NegativeAmount,
    ]
    .into_iter()
    .enumerate()
    {
        publish_poison(&h.publisher, h.topology.exchange(), &h.name, i, kind)
            .await
            .expect("publish poison");
    }
    let running = h.start(
        h.consumer(create_invoice)
            .batch(50, Duration::from_millis(20))
            .concurrency(4)
            .build()
            .expect("valid consumer settings"),
    );
    let total = summary.total() as u64 + 3;
    running
        .wait_for_stats("every delivery settled", |s| s.settled() == total)
        .await;
    assert_eq!(h.invoices().await, 600);
    let s = running.stats();
    assert_eq!(
        (s.processed, s.duplicates, s.dead_lettered),
        (600, summary.duplicates as u64, 3),
        "{s:?}"
    );
    let dead = h.expect_in_queue(&h.topology.dlq(), 3).await;
    let mut codes: Vec<String> = dead
        .iter()
        .filter_map(|m| m.header("x-oncely-error-code"))
        .collect();
    codes.sort();
    assert_eq!(
        codes,
        [
            "contract.missing_message_id",
            "contract.undecodable_body",
            "invalid_amount"
        ]
    );
    assert_eq!(
        h.inbox.count_processed("billing").await.expect("count"),
        600
    );
    running.stop().await.expect("clean stop");
    assert_eq!(h.queue_len(h.topology.queue()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_a_batch_commit_redelivers_the_batch_as_duplicates() {
    let h = Harness::new(&[]).await;
    let crashed = Arc::new(AtomicBool::new(false));
    let fault = FaultInjection {
        // Crash once, after the first batch committed and before any of its acks.
        crash_after_commit: Arc::new(move |_| !crashed.swap(true, Ordering::SeqCst)),
    };
    h.publish_orders(200, 0.0, 9).await;
    let running = h.start(
        h.consumer(create_invoice)
            .batch(40, Duration::from_millis(50))
            .concurrency(2)
            .fault_injection(fault)
            .build()
            .expect("valid consumer settings"),
    );
    // Every delivery acked once in the end: acks sent = processed + duplicates - failed acks
    // (the crashed batch's deliveries reached neither counter the first time).
    running
        .wait_for_stats("every order acked", |s| {
            s.processed + s.duplicates - s.ack_failures >= 200
        })
        .await;
    assert_eq!(h.invoices().await, 200);
    assert_eq!(
        h.inbox.count_processed("billing").await.expect("count"),
        200
    );
    let s = running.stats();
    assert!(s.reconnects >= 1, "{s:?}");
    assert!(
        s.duplicates >= 40,
        "the crashed batch came back as duplicates: {s:?}"
    );
    assert_eq!(s.processed + s.duplicates - s.ack_failures, 200, "{s:?}");
    running.stop().await.expect("clean stop");
    assert_eq!(h.queue_len(h.topology.queue()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_killed_under_batches_lose_and_double_nothing() {
    let h = Harness::new(&[]).await;
    h.publish_orders(600, 0.1, 4).await;
    let running = h.start(
        h.consumer(create_invoice)
            .batch(30, Duration::from_millis(20))
            .concurrency(4)
            .requeue_delay(Duration::from_millis(20))
            .build()
            .expect("valid consumer settings"),
    );
    for round in 1..=3u64 {
        running
            .wait_for_stats("some progress", |s| s.settled() >= round * 120)
            .await;
        h.terminate_database_connections().await;
    }
    running
        .wait_for_stats("every order invoiced", |s| s.processed >= 600)
        .await;
    assert_eq!(h.invoices().await, 600);
    assert_eq!(
        h.inbox.count_processed("billing").await.expect("count"),
        600
    );
    let s = running.stats();
    assert_eq!((s.processed, s.dead_lettered), (600, 0), "{s:?}");
    running.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_message_in_a_batch_fails_alone_while_the_others_commit() {
    let tiers = [Duration::from_millis(100)];
    let h = Harness::new(&tiers).await;
    // An order whose invoice already exists under another message id: the insert violates
    // the unique key, a permanent error for that message only.
    let clash = order(&h.name, 7);
    {
        use diesel::prelude::*;
        use diesel_async::RunQueryDsl;
        let mut conn = h.pool.get().await.expect("connection");
        diesel::insert_into(billing::invoices::table)
            .values((
                billing::invoices::order_id.eq(&clash.order_id),
                billing::invoices::customer_id.eq("someone"),
                billing::invoices::amount_cents.eq(1),
                billing::invoices::currency.eq("IDR"),
            ))
            .execute(&mut conn)
            .await
            .expect("pre-existing invoice");
    }
    h.publish_orders(20, 0.0, 2).await;
    let running = h.start(
        h.consumer(create_invoice)
            .batch(20, Duration::from_millis(200))
            .retry_policy(oncely::RetryPolicy::new(2, tiers.to_vec()))
            .build()
            .expect("valid consumer settings"),
    );
    running
        .wait_for_stats("19 processed and the clash dead-lettered", |s| {
            s.processed == 19 && s.dead_lettered == 1
        })
        .await;
    assert_eq!(
        h.invoices().await,
        20,
        "19 new invoices and the pre-existing one"
    );
    let dead = h.expect_in_queue(&h.topology.dlq(), 1).await;
    assert_eq!(
        dead[0].message_id().as_deref(),
        Some(clash.message_id().as_str())
    );
    let row = h.inbox_row("billing", &clash.message_id()).await;
    assert_eq!(row.status, "failed");
    running.stop().await.expect("clean stop");
}
