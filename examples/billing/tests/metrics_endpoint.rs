//! `METRICS_ADDR=... billing run` serves `/metrics` and `/health/*` next to the consumer.

use billing::order;
use oncely_e2e::{Harness, http_get, metric_value, wait_until};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_serves_metrics_and_health_when_metrics_addr_is_set() {
    let h = Harness::new(&[]).await;
    let addr = {
        // A free port, released for the binary to bind.
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        probe.local_addr().expect("addr")
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_billing"))
        .env("DATABASE_URL", h.schema.url())
        .env("AMQP_URL", oncely_e2e::amqp_url())
        .env("METRICS_ADDR", addr.to_string())
        .args([
            "run",
            "--exchange",
            h.topology.exchange(),
            "--queue",
            h.topology.queue(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start billing");
    let labels = [("queue", h.topology.queue()), ("consumer", "billing")];
    wait_until("consumer connected", Duration::from_secs(30), || async {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(_) => {
                let (_, body) = http_get(addr, "/metrics").await;
                metric_value(&body, "oncely_consumer_connected", &labels) == 1.0
            }
            Err(_) => false,
        }
    })
    .await;
    for n in 0..2 {
        h.publish_order(&order(&h.name, n)).await;
    }
    h.publish_order(&order(&h.name, 0)).await;
    wait_until(
        "2 processed, 1 duplicate",
        Duration::from_secs(30),
        || async {
            let (_, body) = http_get(addr, "/metrics").await;
            metric_value(&body, "oncely_messages_processed_total", &labels) == 2.0
                && metric_value(&body, "oncely_duplicates_total", &labels) == 1.0
        },
    )
    .await;
    assert_eq!(h.invoices().await, 2);
    let (status, body) = http_get(addr, "/health/ready").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"kind\":\"database\""), "{body}");
    assert_eq!(http_get(addr, "/health/live").await.0, 200);

    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "billing did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
}
