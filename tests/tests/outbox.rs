//! The transactional outbox and its relay against the real PostgreSQL and RabbitMQ.

use billing::create_invoice;
use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};
use oncely::outbox::{RelayFault, RelayOptions};
use oncely_e2e::{Harness, amqp_url, wait_until};
use order_service::{create_order, order};
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn fast() -> RelayOptions {
    RelayOptions {
        poll_interval: Duration::from_millis(100),
        retry_backoff: oncely::amqp::Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(200),
            max_attempts: None,
        },
        ..RelayOptions::default()
    }
}

async fn create_orders(h: &Harness, count: usize) {
    let mut conn = h.pool.get().await.expect("connection");
    for n in 0..count {
        create_order(&mut conn, &order(&h.name, n), h.topology.exchange())
            .await
            .expect("create order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_commits_with_the_business_change_or_not_at_all() {
    let h = Harness::with_outbox().await;
    let mut conn = h.pool.get().await.expect("connection");
    let o = order(&h.name, 1);
    let event = order_service::order_created(&o, h.topology.exchange()).expect("event");
    let rolled_back = conn
        .transaction::<(), diesel::result::Error, _>(async |conn| {
            diesel::insert_into(order_service::orders::table)
                .values((
                    order_service::orders::order_id.eq(&o.order_id),
                    order_service::orders::customer_id.eq(&o.customer_id),
                    order_service::orders::amount_cents.eq(o.amount_cents),
                    order_service::orders::currency.eq(&o.currency),
                ))
                .execute(conn)
                .await?;
            oncely::outbox::enqueue(conn, &event).await?;
            Err(diesel::result::Error::RollbackTransaction)
        })
        .await;
    assert!(rolled_back.is_err());
    assert_eq!(
        h.outbox_counts().await,
        (0, 0),
        "no event without its order"
    );
    create_order(&mut conn, &o, h.topology.exchange())
        .await
        .expect("create");
    assert_eq!(h.outbox_counts().await, (0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_publishes_committed_events_and_billing_invoices_each_order_once() {
    let h = Harness::with_outbox().await;
    create_orders(&h, 50).await;
    let relay = h.relay(&amqp_url(), fast());
    let outcome = relay.cycle().await.expect("cycle");
    assert_eq!(
        (outcome.claimed, outcome.published, outcome.failed),
        (50, 50, 0)
    );
    assert_eq!(h.outbox_counts().await, (50, 0));
    let got = h.drain(h.topology.queue()).await;
    assert_eq!(got.len(), 50);
    assert_eq!(got[0].message_id(), Some(order(&h.name, 0).message_id()));
    assert_eq!(
        got[0].properties.kind().as_ref().map(|s| s.as_str()),
        Some("order.created.v1")
    );
    assert_eq!(
        got[0].header("idempotency_key"),
        Some(order(&h.name, 0).order_id)
    );
    assert_eq!(*got[0].properties.delivery_mode(), Some(2));
    assert_eq!(
        relay.cycle().await.expect("cycle").claimed,
        0,
        "nothing published twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_unreachable_leaves_rows_unpublished_with_the_error_then_they_go_out_after_recovery()
{
    let h = Harness::with_outbox().await;
    create_orders(&h, 10).await;
    let down = h.relay("amqp://guest:guest@127.0.0.1:1/%2f", fast());
    let outcome = down.cycle().await.expect("cycle");
    assert_eq!((outcome.published, outcome.failed), (0, 10));
    assert_eq!(h.outbox_counts().await, (0, 10));
    let mut conn = h.pool.get().await.expect("connection");
    let (attempts, error): (i32, Option<String>) = diesel::sql_query(
        "SELECT publish_attempts, last_error FROM outbox_message ORDER BY seq LIMIT 1",
    )
    .get_result::<AttemptsRow>(&mut conn)
    .await
    .map(|r| (r.publish_attempts, r.last_error))
    .expect("row");
    assert_eq!(attempts, 1);
    assert!(error.is_some_and(|e| !e.is_empty()));

    let up = h.relay(&amqp_url(), fast());
    let running =
        tokio::spawn(async move { up.run(tokio::time::sleep(Duration::from_secs(30))).await });
    wait_until(
        "published after recovery",
        Duration::from_secs(20),
        || async { h.outbox_counts().await == (10, 0) },
    )
    .await;
    running.abort();
    assert_eq!(h.queue_len(h.topology.queue()).await, 10);
}

#[derive(diesel::QueryableByName)]
struct AttemptsRow {
    #[diesel(sql_type = diesel::sql_types::Int4)]
    publish_attempts: i32,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    last_error: Option<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_after_confirm_before_mark_publishes_twice_and_billing_invoices_once() {
    let h = Harness::with_outbox().await;
    create_orders(&h, 20).await;
    let crashing = h
        .relay(&amqp_url(), fast())
        .with_fault(RelayFault::CrashAfterConfirm);
    assert!(crashing.cycle().await.is_err(), "the fault fired");
    assert_eq!(
        h.outbox_counts().await,
        (0, 20),
        "confirmed but never marked"
    );
    assert_eq!(
        h.queue_len(h.topology.queue()).await,
        20,
        "yet on the broker"
    );

    let relay = h.relay(&amqp_url(), fast());
    assert_eq!(relay.cycle().await.expect("cycle").published, 20);
    assert_eq!(h.outbox_counts().await, (20, 0));
    assert_eq!(
        h.queue_len(h.topology.queue()).await,
        40,
        "every event twice"
    );

    let running = h.run(create_invoice);
    running
        .wait_for_stats("all 40 settled", |s| s.settled() == 40)
        .await;
    let stats = running.stats();
    assert_eq!((stats.processed, stats.duplicates), (20, 20));
    assert_eq!(h.invoices().await, 20);
    running.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_over_5000_rows_publish_every_row_once_in_per_aggregate_order() {
    let h = Harness::with_outbox().await;
    // 1,000 aggregates with 5 events each, enqueued round-robin.
    let mut conn = h.pool.get().await.expect("connection");
    for round in 0..5 {
        let events: Vec<oncely::outbox::NewOutboxMessage> = (0..1000)
            .map(|a| {
                oncely::outbox::NewOutboxMessage::builder()
                    .id(format!("{}-agg{a}-ev{round}", h.name))
                    .aggregate("order", format!("agg{a}"))
                    .event_type("order.created.v1")
                    .exchange(h.topology.exchange())
                    .routing_key(billing::ORDER_CREATED_V1)
                    .payload(&serde_json::json!({"aggregate": a, "n": round}))
                    .build()
                    .expect("event")
            })
            .collect();
        oncely::outbox::enqueue_many(&mut conn, &events)
            .await
            .expect("enqueue");
    }
    drop(conn);
    let options = RelayOptions {
        batch_size: 300,
        ..fast()
    };
    let relays: Vec<_> = (0..2)
        .map(|_| {
            let relay = h.relay(&amqp_url(), options.clone());
            tokio::spawn(async move {
                relay
                    .run(tokio::time::sleep(Duration::from_secs(60)))
                    .await
                    .expect("run");
            })
        })
        .collect();
    let started = Instant::now();
    wait_until("every row published", Duration::from_secs(60), || async {
        h.outbox_counts().await == (5000, 0)
    })
    .await;
    eprintln!("two relays published 5,000 rows in {:?}", started.elapsed());
    for r in relays {
        r.abort();
    }
    let got = h.drain(h.topology.queue()).await;
    assert_eq!(got.len(), 5000, "each row published exactly once");
    let mut last: HashMap<u64, i64> = HashMap::new();
    for m in &got {
        let v: serde_json::Value = serde_json::from_slice(&m.body).expect("json");
        let (a, n) = (
            v["aggregate"].as_u64().expect("a"),
            v["n"].as_i64().expect("n"),
        );
        let previous = last.insert(a, n).unwrap_or(-1);
        assert_eq!(n, previous + 1, "aggregate {a}: event {n} after {previous}");
    }
    assert_eq!(last.len(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_row_is_picked_up_by_notification_not_by_the_slow_poll() {
    let h = Harness::with_outbox().await;
    let relay = h.relay(
        &amqp_url(),
        RelayOptions {
            poll_interval: Duration::from_secs(30),
            ..fast()
        },
    );
    let stats = relay.stats();
    let running =
        tokio::spawn(async move { relay.run(tokio::time::sleep(Duration::from_secs(60))).await });
    // Cycle 1 at start, cycle 2 when LISTEN is active; then the relay waits, and only a
    // notification brings it back before the 30 s poll.
    wait_until("listening", Duration::from_secs(10), || {
        let cycles = stats.snapshot().cycles;
        async move { cycles >= 2 }
    })
    .await;
    let committed = Instant::now();
    create_orders(&h, 1).await;
    wait_until("published", Duration::from_secs(10), || async {
        h.outbox_counts().await == (1, 0)
    })
    .await;
    let latency = committed.elapsed();
    running.abort();
    assert!(
        latency < Duration::from_secs(5),
        "woken by NOTIFY, not the 30 s poll: {latency:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_rows_past_retention_are_cleaned_up_and_unpublished_ones_stay() {
    let h = Harness::with_outbox().await;
    create_orders(&h, 6).await;
    let relay = h.relay(&amqp_url(), fast());
    relay.cycle().await.expect("cycle");
    create_orders_from(&h, 100, 2).await;
    let mut conn = h.pool.get().await.expect("connection");
    diesel::sql_query("UPDATE outbox_message SET published_at = now() - interval '2 hours' WHERE published_at IS NOT NULL AND id IN (SELECT id FROM outbox_message WHERE published_at IS NOT NULL ORDER BY seq LIMIT 4)")
        .execute(&mut conn)
        .await
        .expect("age rows");
    assert_eq!(
        relay
            .purge_published(Duration::from_secs(3600))
            .await
            .expect("purge"),
        4
    );
    assert_eq!(h.outbox_counts().await, (2, 2));
}

async fn create_orders_from(h: &Harness, first: usize, count: usize) {
    let mut conn = h.pool.get().await.expect("connection");
    for n in first..first + count {
        create_order(&mut conn, &order(&h.name, n), h.topology.exchange())
            .await
            .expect("create order");
    }
}
