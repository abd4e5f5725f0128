//! `/health/ready` turns unhealthy when a broker or database connection has been down for longer
//! than the grace period, and healthy again once it is back (or its owner is gone). One test in
//! its own binary: readiness is process-wide.

use billing::create_invoice;
use oncely::PoolOptions;
use oncely::observability::Observability;
use oncely_e2e::{Harness, http_get};
use std::net::SocketAddr;
use std::time::Duration;

async fn wait_status(addr: SocketAddr, expected: u16) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = http_get(addr, "/health/ready").await;
        if status == expected {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/health/ready did not answer {expected}; last {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_after_the_grace_period_while_broker_or_database_is_down() {
    let server = Observability::new("127.0.0.1:0".parse().expect("addr"))
        .readiness_grace(Duration::from_millis(500))
        .serve()
        .await
        .expect("serve");
    let addr = server.local_addr();
    let h = Harness::new(&[]).await;
    let healthy = h.run(create_invoice);
    h.wait_for_consumer().await;
    let body = wait_status(addr, 200).await;
    assert!(body.contains("\"ready\":true"), "{body}");
    assert_eq!(http_get(addr, "/health/live").await.0, 200);

    // A consumer whose broker does not answer: down from the start, unready after the grace.
    let unreachable = h.start(
        h.consumer(create_invoice)
            .amqp_url("amqp://guest:guest@127.0.0.1:1/%2f")
            .build()
            .expect("valid consumer settings"),
    );
    let body = wait_status(addr, 503).await;
    assert!(body.contains("\"kind\":\"broker\""), "{body}");
    assert!(body.contains("\"healthy\":false"), "{body}");
    assert_eq!(
        http_get(addr, "/health/live").await.0,
        200,
        "liveness is not readiness"
    );
    unreachable.stop().await.expect("stop");
    wait_status(addr, 200).await;

    // The broker closes the healthy consumer's connection: it reconnects within the grace.
    assert_eq!(h.close_consumer_connections().await, 1);
    h.wait_for_consumer().await;
    wait_status(addr, 200).await;

    // A database that does not answer, probed by a second endpoint.
    let dead_pool = oncely::connect_pool(
        "postgres://postgres@127.0.0.1:1/oncely",
        &PoolOptions {
            connection_timeout: Duration::from_millis(200),
            ..PoolOptions::default()
        },
    );
    let probing = Observability::new("127.0.0.1:0".parse().expect("addr"))
        .readiness_grace(Duration::from_millis(500))
        .probe_database("unreachable database", dead_pool)
        .probe_interval(Duration::from_millis(200))
        .serve()
        .await
        .expect("serve");
    let body = wait_status(probing.local_addr(), 503).await;
    assert!(body.contains("\"kind\":\"database\""), "{body}");
    assert!(body.contains("unreachable database"), "{body}");
    probing.shutdown().await;
    wait_status(addr, 200).await;

    healthy.stop().await.expect("clean stop");
    server.shutdown().await;
}
