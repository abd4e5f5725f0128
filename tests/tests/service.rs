//! The service runner: consumers, a relay and background tasks run together, stop together on one
//! shutdown, and a component that fails stops the service and is named in its error.

use billing::{create_invoice, order};
use oncely::Service;
use oncely::outbox::RelayOptions;
use oncely_e2e::{Harness, wait_until};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_runs_its_consumer_relay_and_tasks_and_drains_them_on_one_shutdown() {
    let h = Harness::with_outbox().await;
    let consumer = h
        .consumer(create_invoice)
        .build()
        .expect("valid consumer settings");
    let relay = h.relay(&oncely_e2e::amqp_url(), RelayOptions::default());
    let task_stopped = Arc::new(AtomicBool::new(false));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = {
        let task_stopped = task_stopped.clone();
        Service::new("billing-test")
            .without_logging()
            .database(h.pool.clone())
            .consumer(consumer)
            .relay(relay)
            .task("reconciler", move |token| async move {
                token.cancelled().await;
                task_stopped.store(true, Ordering::SeqCst);
                Ok::<(), std::io::Error>(())
            })
    };
    let running = tokio::spawn(service.run_until(async {
        let _ = stopped.await;
    }));
    for n in 0..20 {
        h.publish_order(&order(&h.name, n)).await;
    }
    wait_until("20 invoices", Duration::from_secs(30), || async {
        h.invoices().await == 20
    })
    .await;
    let _ = stop.send(());
    let result = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the service stops within its drain time")
        .expect("the service task does not panic");
    assert!(result.is_ok(), "{result:?}");
    assert!(
        task_stopped.load(Ordering::SeqCst),
        "the background task saw the shutdown"
    );
    assert_eq!(h.queue_len(h.topology.queue()).await, 0);
    assert_eq!(h.invoices().await, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_component_stops_the_service_and_is_named_in_its_error() {
    let h = Harness::new(&[]).await;
    let consumer = h
        .consumer(create_invoice)
        .build()
        .expect("valid consumer settings");
    let service = Service::new("billing-test")
        .without_logging()
        .consumer(consumer)
        .task("reconciler", |_token| async {
            Err::<(), _>(std::io::Error::other("inventory API unreachable"))
        });
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        service.run_until(std::future::pending()),
    )
    .await
    .expect("the service stops when a component fails");
    let error = result.expect_err("the failure is reported");
    assert_eq!(error.failures.len(), 1, "{error}");
    assert_eq!(error.failures[0].0, "reconciler");
    assert!(error.to_string().contains("inventory API unreachable"));
}
