//! The builder refuses what the runtime cannot run with, by the configuration file's rules,
//! instead of clamping or dropping a setting; and it never picks a broker by itself.
//!
//! No services: the pool connects lazily and nothing is consumed.

use oncely::{
    AsyncPgConnection, BuildError, Consumer, ConsumerBuilder, Envelope, HandlerError, Inbox,
    PoolOptions,
};
use std::time::Duration;

#[derive(Debug, serde::Deserialize)]
struct Ping {}

#[oncely::handler(consumer = "builder")]
async fn ping(_conn: &mut AsyncPgConnection, _msg: Envelope<Ping>) -> Result<(), HandlerError> {
    Ok(())
}

fn builder() -> ConsumerBuilder<ping> {
    let pool = oncely::connect_pool(
        "postgres://postgres@127.0.0.1:5432/oncely",
        &PoolOptions::default(),
    );
    Consumer::builder(ping, Inbox::new(pool))
}

fn refused(result: Result<Consumer, BuildError>) -> &'static str {
    match result {
        Err(BuildError::Invalid(invalid)) => invalid.setting,
        other => panic!("expected a refused setting, got {other:?}"),
    }
}

#[tokio::test]
async fn a_consumer_without_a_broker_url_is_refused_unless_the_local_one_is_asked_for() {
    assert!(matches!(builder().build(), Err(BuildError::MissingAmqpUrl)));
    let local = builder()
        .local_broker()
        .build()
        .expect("explicit local broker");
    assert!(format!("{local:?}").contains("127.0.0.1:5672"));
}

#[tokio::test]
async fn settings_the_runtime_cannot_use_are_refused_not_clamped() {
    let b = || builder().local_broker();
    assert_eq!(refused(b().concurrency(0).build()), "concurrency");
    assert_eq!(refused(b().prefetch(0).build()), "prefetch");
    assert_eq!(refused(b().concurrency(8).prefetch(4).build()), "prefetch");
    assert_eq!(
        refused(b().batch(0, Duration::from_millis(20)).build()),
        "batch_size"
    );
    assert_eq!(
        refused(
            b().strict_order()
                .batch(10, Duration::from_millis(20))
                .build()
        ),
        "strict_order"
    );
    assert_eq!(
        refused(b().strict_order().concurrency(4).build()),
        "strict_order"
    );
    b().strict_order().build().expect("strict order alone");
    b().batch(50, Duration::from_millis(20))
        .concurrency(2)
        .build()
        .expect("batched mode with its own prefetch");
}

#[tokio::test]
async fn a_pool_smaller_than_the_concurrency_is_refused() {
    let small = oncely::connect_pool(
        "postgres://postgres@127.0.0.1:5432/oncely",
        &PoolOptions {
            max_size: 4,
            ..PoolOptions::default()
        },
    );
    let b = || Consumer::builder(ping, Inbox::new(small.clone())).local_broker();
    assert_eq!(
        b().concurrency(8).build().err(),
        Some(BuildError::PoolTooSmall {
            pool: 4,
            concurrency: 8
        })
    );
    b().concurrency(4)
        .build()
        .expect("a pool as large as the concurrency");
}
