//! Fulfillment against the real RabbitMQ and PostgreSQL and the simulated inventory API over
//! HTTP: however calls fail, time out or are repeated, one reservation per order.

use fulfillment::inventory_api::{ApiStats, Faults, InventoryApi};
use fulfillment::{FulfillmentCounts, InventoryClient, ReserveStock};
use oncely::{AsyncPgConnection, Envelope, HandlerError, PoolOptions, RetryPolicy};
use oncely_e2e::Harness;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

struct Api {
    client: InventoryClient,
    stats: Arc<ApiStats>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start_api(h: &Harness, faults: Faults, client_timeout: Duration) -> Api {
    fulfillment::migrate(h.schema.url()).await.expect("migrate");
    fulfillment::migrate_inventory_api(h.schema.url())
        .await
        .expect("migrate API");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let api = InventoryApi::new(
        oncely::connect_pool(h.schema.url(), &PoolOptions::default()),
        faults,
    );
    let stats = api.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(api.serve(listener, async {
        let _ = stopped.await;
    }));
    Api {
        client: InventoryClient::new(&format!("http://{addr}"), client_timeout).expect("client"),
        stats,
        _stop: stop,
    }
}

fn handler(h: &Harness, api: &Api) -> ReserveStock {
    ReserveStock::new(
        oncely::connect_pool(h.schema.url(), &PoolOptions::default()),
        api.client.clone(),
    )
}

async fn counts(h: &Harness) -> FulfillmentCounts {
    let mut conn = h.pool.get().await.expect("connection");
    fulfillment::counts(&mut conn, &h.name)
        .await
        .expect("counts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_and_lost_api_calls_never_reserve_an_order_twice() {
    let tiers = [Duration::from_millis(200), Duration::from_millis(500)];
    let h = Harness::new(&tiers).await;
    let api = start_api(
        &h,
        Faults {
            fail_rate: 0.2,
            lose_rate: 0.3,
            lose_delay: Duration::from_millis(800),
        },
        Duration::from_millis(300),
    )
    .await;
    let consumer = h
        .consumer(handler(&h, &api))
        .retry_policy(RetryPolicy::new(30, tiers.to_vec()))
        .concurrency(8)
        .build()
        .expect("valid consumer settings");
    let running = h.start(consumer);
    let sent = h.publish_orders(100, 0.2, 11).await;
    running
        .wait_for_stats("every delivery settled", |s| {
            s.processed + s.duplicates == sent.total() as u64
        })
        .await;
    let c = counts(&h).await;
    assert_eq!(c.reservations, 100, "{c:?}");
    assert_eq!(c.api_reservations, 100, "{c:?}");
    assert_eq!(c.api_orders_reserved_twice, 0, "{c:?}");
    assert_eq!(c.mismatched, 0, "{c:?}");
    assert_eq!(c.pending_operations, 0, "{c:?}");
    let api_stats = api.stats.snapshot();
    assert_eq!(api_stats.created, 100, "{api_stats:?}");
    assert!(api_stats.responses_lost > 0, "{api_stats:?}");
    assert!(
        api_stats.replayed >= api_stats.responses_lost,
        "every lost response is asked again and answered from the first call: {api_stats:?}"
    );
    assert!(c.api_calls > 100, "failures were retried: {c:?}");
    assert_eq!(h.queue_len(&h.topology.dlq()).await, 0);
    running.stop().await.expect("stop");
}

/// Reserves, then fails the first attempt of each message *after* the API said yes: the inbox
/// transaction rolls back as if the consumer had died before its commit.
struct FailAfterTheCall {
    inner: ReserveStock,
    failed: AtomicU64,
}

#[oncely::handler(consumer = fulfillment::CONSUMER)]
impl FailAfterTheCall {
    async fn handle(
        &self,
        conn: &mut AsyncPgConnection,
        msg: Envelope<oncely_example_messages::OrderCreated>,
    ) -> Result<(), HandlerError> {
        let first = msg.metadata.attempt <= 1;
        self.inner.reserve(conn, msg).await?;
        if first {
            self.failed.fetch_add(1, Ordering::Relaxed);
            return Err(HandlerError::retryable("lost_before_commit", "simulated"));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_api_success_rolled_back_before_the_commit_is_not_reserved_again() {
    let tiers = [Duration::from_millis(200)];
    let h = Harness::new(&tiers).await;
    let api = start_api(&h, Faults::default(), Duration::from_secs(2)).await;
    let consumer = h
        .consumer(FailAfterTheCall {
            inner: handler(&h, &api),
            failed: AtomicU64::new(0),
        })
        .retry_policy(RetryPolicy::new(3, tiers.to_vec()))
        .build()
        .expect("valid consumer settings");
    let running = h.start(consumer);
    let sent = h.publish_orders(40, 0.0, 3).await;
    running
        .wait_for_stats("every order processed", |s| {
            s.processed == sent.orders as u64
        })
        .await;
    let c = counts(&h).await;
    assert_eq!(c.reservations, 40, "{c:?}");
    assert_eq!(c.api_reservations, 40, "{c:?}");
    let api_stats = api.stats.snapshot();
    assert_eq!(api_stats.created, 40, "{api_stats:?}");
    assert_eq!(
        api_stats.replayed, 40,
        "the second attempt of each order got the first reservation back: {api_stats:?}"
    );
    assert_eq!(running.stats().retried, 40);
    running.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_reconciler_settles_a_lost_response_and_a_replay_does_not_call_again() {
    let h = Harness::new(&[]).await;
    // Every response is lost: the API reserves, the handler times out.
    let api = start_api(
        &h,
        Faults {
            fail_rate: 0.0,
            lose_rate: 1.0,
            lose_delay: Duration::from_millis(1500),
        },
        Duration::from_millis(200),
    )
    .await;
    let consumer = h
        .consumer(handler(&h, &api))
        .retry_policy(RetryPolicy::no_retries())
        .build()
        .expect("valid consumer settings");
    let running = h.start(consumer);
    let order = oncely_example_messages::sample_order(&h.name, 1);
    h.publish_order(&order).await;
    let dead = h.expect_in_queue(&h.topology.dlq(), 1).await;
    assert_eq!(
        dead[0].header("x-oncely-error-code").as_deref(),
        Some("retries_exhausted")
    );
    let reason = dead[0].header("x-oncely-reason").unwrap_or_default();
    assert!(reason.contains("inventory API did not answer"), "{reason}");
    let c = counts(&h).await;
    assert_eq!(
        (c.reservations, c.api_reservations, c.pending_operations),
        (0, 1, 1),
        "{c:?}"
    );

    let ops = oncely::connect_pool(h.schema.url(), &PoolOptions::default());
    let s = fulfillment::reconcile_once(&ops, &api.client, Duration::ZERO)
        .await
        .expect("reconcile");
    assert_eq!((s.examined, s.settled), (1, 1));
    let c = counts(&h).await;
    assert_eq!(c.reservations, 1, "{c:?}");
    assert_eq!(c.pending_operations, 0, "{c:?}");
    assert_eq!(c.settled_by_reconciler, 1, "{c:?}");
    assert_eq!(c.mismatched, 0, "{c:?}");

    // The DLQ copy replayed: processed without a second call to the API.
    let requests = api.stats.snapshot().requests;
    h.publish_order(&order).await;
    running
        .wait_for_stats("the replay processed", |s| s.processed == 1)
        .await;
    assert_eq!(api.stats.snapshot().requests, requests);
    assert_eq!(counts(&h).await.api_reservations, 1);
    assert_eq!(counts(&h).await.reservations, 1);
    running.stop().await.expect("stop");
}
