//! A database outage never spends a delivery: deliveries are held (unacked, their concurrency
//! slots kept, intake paused) and processed again with backoff, not handed back to the broker in
//! a loop, which a quorum queue counts toward its delivery limit.

use billing::{create_invoice, order};
use oncely::{Consumer, Inbox, PoolOptions, QueueType, Topology};
use oncely_e2e::gate::Gate;
use oncely_e2e::{Harness, amqp_url, wait_until};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_holds_deliveries_and_spends_no_delivery_count() {
    outage_spends_no_delivery(&amqp_url()).await;
}

/// The same on RabbitMQ 4, whose quorum queues count every return toward their delivery limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_spends_no_delivery_count_on_rabbitmq4() {
    let Some(url) = oncely_e2e::broker_from_env("ONCELY_RABBITMQ4_URL") else {
        return;
    };
    outage_spends_no_delivery(&url).await;
}

async fn outage_spends_no_delivery(url: &str) {
    let h = Harness::on_broker(url, &[], |t| t).await;
    // A quorum queue that dead-letters after 2 returns: handing messages back once a
    // `requeue_delay` during the outage would dead-letter them within a second.
    let topology = Topology::new(h.topology.exchange(), format!("{}.quorum", h.name))
        .bind(billing::ORDER_CREATED_V1)
        .queue_type(QueueType::Quorum)
        .delivery_limit(2);
    topology
        .declare(&h.connection)
        .await
        .expect("declare the quorum topology");
    h.delete_topology(&topology);
    let gate = Gate::start("127.0.0.1:5432".parse().expect("address")).await;
    let pool = oncely::connect_pool(
        &gate.url(h.schema.url(), 5432),
        &PoolOptions {
            max_size: 4,
            connection_timeout: Duration::from_millis(500),
        },
    );
    let consumer = Consumer::builder(create_invoice, Inbox::new(pool))
        .amqp_url(url)
        .connection_name(h.consumer_connection_name())
        .topology(topology.clone())
        .concurrency(2)
        .prefetch(8)
        .requeue_delay(Duration::from_millis(100))
        .build()
        .expect("valid consumer settings");
    // First the database refuses writes, as a demoted primary does (SQLSTATE 25006), then it
    // cannot be reached at all. Each phase lasts long enough for ten returns at the requeue
    // delay, five times the queue's delivery limit (the ratio of a one-minute outage to the
    // broker's default limit of 20 at one return a second).
    refuse_writes(&h, true).await;
    let running = h.start(consumer);
    for n in 0..10 {
        h.publish_order(&order(&h.name, n)).await;
    }
    running
        .wait_for_stats("both slots holding a delivery", |s| s.held >= 2)
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    gate.close();
    refuse_writes(&h, false).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = running.stats();
    assert_eq!(during.requeued, 0, "nothing handed back during the outage");
    assert_eq!(
        during.received, 2,
        "intake paused: only the deliveries held in the two slots were taken"
    );
    assert_eq!(during.in_flight, 2, "the held deliveries are in hand");
    assert_eq!(h.invoices().await, 0, "nothing written while refused");
    gate.open();
    wait_until("10 invoices", Duration::from_secs(60), || async {
        h.invoices().await == 10
    })
    .await;
    // An invoice is visible at its commit; the delivery counts as processed once acked.
    wait_until("nothing in hand", Duration::from_secs(10), || async {
        running.stats().in_flight == 0
    })
    .await;
    let after = running.stats();
    assert_eq!(
        (after.processed, after.dead_lettered, after.requeued),
        (10, 0, 0)
    );
    running.stop().await.expect("stop");
    assert_eq!(h.queue_len(topology.queue()).await, 0);
    assert_eq!(
        h.queue_len(&topology.dlq()).await,
        0,
        "nothing dead-lettered"
    );
}

/// Makes the schema's `invoices` refuse inserts as a read-only database does (SQLSTATE 25006),
/// or accept them again.
async fn refuse_writes(h: &Harness, refuse: bool) {
    use diesel_async::RunQueryDsl;
    let mut conn = h.pool.get().await.expect("connection");
    let statements: &[&str] = if refuse {
        &[
            "CREATE OR REPLACE FUNCTION refuse_writes() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN RAISE EXCEPTION 'cannot execute INSERT in a read-only transaction' \
             USING ERRCODE = 'read_only_sql_transaction'; END $$",
            "CREATE TRIGGER refuse_writes BEFORE INSERT ON invoices \
             FOR EACH ROW EXECUTE FUNCTION refuse_writes()",
        ]
    } else {
        &["DROP TRIGGER refuse_writes ON invoices"]
    };
    for statement in statements {
        diesel::sql_query(*statement)
            .execute(&mut conn)
            .await
            .expect(statement);
    }
}

/// A deploy that starts before its migration: the business table is missing. Every message is
/// held (not retried, not dead-lettered) until the table is there, then processed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_that_starts_before_its_migration_holds_messages_until_the_schema_fits() {
    use diesel_async::RunQueryDsl;
    let h = Harness::new(&[Duration::from_millis(50)]).await;
    let sql = |statement: &'static str| {
        let pool = h.pool.clone();
        async move {
            let mut conn = pool.get().await.expect("connection");
            diesel::sql_query(statement)
                .execute(&mut conn)
                .await
                .expect(statement);
        }
    };
    sql("ALTER TABLE invoices RENAME TO invoices_not_yet").await;
    let running = h.start(
        h.consumer(create_invoice)
            .concurrency(2)
            .requeue_delay(Duration::from_millis(100))
            .build()
            .expect("valid consumer settings"),
    );
    for n in 0..5 {
        h.publish_order(&order(&h.name, n)).await;
    }
    running
        .wait_for_stats("messages held for the missing table", |s| s.held >= 2)
        .await;
    let during = running.stats();
    assert_eq!(
        (during.retried, during.dead_lettered, during.requeued),
        (0, 0, 0),
        "the deployment's fault spends no retry and dead-letters nothing: {during:?}"
    );
    sql("ALTER TABLE invoices_not_yet RENAME TO invoices").await;
    wait_until("5 invoices", Duration::from_secs(60), || async {
        h.invoices().await == 5
    })
    .await;
    let after = running.stats();
    assert_eq!((after.processed, after.dead_lettered), (5, 0), "{after:?}");
    running.stop().await.expect("stop");
    assert_eq!(h.queue_len(&h.topology.dlq()).await, 0);
}
