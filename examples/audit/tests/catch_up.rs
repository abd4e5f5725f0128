//! Audit must never miss an event: down for a while, it catches up with nothing missing and
//! nothing twice.

use oncely_e2e::Harness;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_catches_up_after_being_down_with_nothing_missing_or_doubled() {
    let h = Harness::new(&[]).await;
    audit::migrate(h.schema.url())
        .await
        .expect("audit migrations");
    let topology = audit::topology(
        &format!("{}.audit", h.topology.exchange()),
        &format!("{}.audit", h.topology.queue()),
    );
    // The queue exists before audit first runs (declared at deploy time), so nothing published
    // while audit is down is lost.
    topology.declare(&h.connection).await.expect("declare");
    let publish = |from: usize, to: usize| {
        let exchange = topology.exchange().to_owned();
        let publisher = h.publisher.clone();
        let name = h.name.clone();
        async move {
            for n in from..to {
                billing::publish_order(&publisher, &exchange, &billing::order(&name, n))
                    .await
                    .expect("publish");
            }
        }
    };
    let consumer = || {
        h.consumer(audit::record_event)
            .topology(topology.clone())
            .build()
            .expect("valid consumer settings")
    };
    publish(0, 150).await; // audit is down
    let first = h.start(consumer());
    first
        .wait_for_stats("caught up", |s| s.processed == 150)
        .await;
    first.stop().await.expect("stop");
    publish(150, 300).await; // down again, and a duplicate publish of an early event
    publish(10, 11).await;
    let second = h.start(consumer());
    second
        .wait_for_stats("caught up again", |s| {
            s.processed == 150 && s.duplicates == 1
        })
        .await;
    second.stop().await.expect("stop");

    let mut conn = h.pool.get().await.expect("connection");
    assert_eq!(audit::count_events(&mut conn).await.expect("count"), 300);
    let _ = topology.delete(&h.connection).await;
}
