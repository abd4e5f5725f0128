//! The service runner names the component that failed, even when it panicked, and stops the
//! others.

use std::time::Duration;

#[tokio::test]
async fn a_component_that_panics_is_named_and_the_others_stop() {
    let error = oncely::Service::new("panicky")
        .without_logging()
        .task("steady", |stop| async move {
            stop.cancelled().await;
            Ok::<(), std::io::Error>(())
        })
        .task("reconciler", |_stop| async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            panic!("reconciler bug");
            #[allow(unreachable_code)]
            Ok::<(), std::io::Error>(())
        })
        .run_until(std::future::pending())
        .await
        .expect_err("the panic fails the service");
    assert_eq!(error.failures.len(), 1, "{error}");
    assert_eq!(error.failures[0].0, "reconciler", "{error}");
    assert!(error.failures[0].1.contains("reconciler bug"), "{error}");
}
