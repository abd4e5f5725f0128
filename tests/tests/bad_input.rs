//! Anything a producer can send ends in `Q.dlq` with a reason, once, and never stops the consumer.

use billing::{PoisonKind, create_invoice, order, publish_poison};
use oncely::lapin::BasicProperties;
use oncely_e2e::Harness;
use std::collections::BTreeMap;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_json_goes_to_dlq_with_reason_and_is_never_looped() {
    let h = Harness::new(&[std::time::Duration::from_millis(100)]).await;
    let running = h.start(h.consumer(create_invoice).build());
    publish_poison(
        &h.publisher,
        h.topology.exchange(),
        &h.name,
        0,
        PoisonKind::InvalidJson,
    )
    .await
    .expect("publish");
    let dead = h.expect_in_queue(&h.topology.dlq(), 1).await;
    assert_eq!(
        dead[0].header("x-oncely-error-code").as_deref(),
        Some("contract.undecodable_body")
    );
    let reason = dead[0].header("x-oncely-reason").unwrap_or_default();
    assert!(
        reason.contains("line 1 column"),
        "serde's text is kept: {reason}"
    );
    assert_eq!(dead[0].body, b"{not json", "the body is kept as sent");
    let stats = running.stats();
    assert_eq!(
        (stats.received, stats.dead_lettered, stats.retried),
        (1, 1, 0),
        "not looped"
    );
    running.stop().await.expect("stop");
    assert_eq!(h.queue_len(h.topology.queue()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_message_id_goes_to_dlq() {
    let h = Harness::new(&[]).await;
    let running = h.start(h.consumer(create_invoice).build());
    publish_poison(
        &h.publisher,
        h.topology.exchange(),
        &h.name,
        0,
        PoisonKind::MissingMessageId,
    )
    .await
    .expect("publish");
    let dead = h.expect_in_queue(&h.topology.dlq(), 1).await;
    assert_eq!(
        dead[0].header("x-oncely-error-code").as_deref(),
        Some("contract.missing_message_id")
    );
    assert_eq!(dead[0].message_id(), None);
    assert_eq!(h.invoices().await, 0);
    running.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_bad_input_is_dead_lettered_with_its_reason_and_good_messages_flow_on() {
    let h = Harness::new(&[]).await;
    let running = h.start(h.consumer(create_invoice).build());
    for (i, kind) in PoisonKind::ALL.iter().enumerate() {
        publish_poison(&h.publisher, h.topology.exchange(), &h.name, i, *kind)
            .await
            .expect("publish poison");
        // A good order after each bad one: the consumer keeps going.
        h.publish_order(&order(&h.name, i)).await;
    }
    let extra = [
        ("blank id", "   ".to_owned(), "application/json", 10),
        ("id over 200 bytes", "x".repeat(255), "application/json", 10),
        (
            "huge body",
            "huge".to_owned(),
            "application/json",
            2 * 1024 * 1024,
        ),
    ];
    for (_, id, content_type, size) in &extra {
        let body = vec![b' '; *size];
        h.publish_raw(
            &body,
            BasicProperties::default()
                .with_message_id(id.as_str().into())
                .with_content_type((*content_type).into()),
        )
        .await;
    }
    let expected = PoisonKind::ALL.len() + extra.len();
    let dead = h.expect_in_queue(&h.topology.dlq(), expected as u32).await;

    let mut codes = BTreeMap::new();
    for d in &dead {
        let code = d.header("x-oncely-error-code").expect("error code header");
        assert!(d.header("x-oncely-reason").is_some_and(|r| !r.is_empty()));
        assert_eq!(
            d.header("x-oncely-original-queue").as_deref(),
            Some(h.topology.queue())
        );
        assert!(d.header("x-oncely-failed-at").is_some());
        *codes.entry(code).or_insert(0) += 1;
    }
    let expect: BTreeMap<String, i32> = [
        ("contract.undecodable_body", 2),
        ("contract.missing_message_id", 1),
        ("contract.unsupported_content_type", 1),
        ("contract.invalid_header", 2),
        ("invalid_amount", 1),
        ("contract.blank_message_id", 1),
        ("contract.message_id_too_long", 1),
        ("contract.body_too_large", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(codes, expect);
    assert_eq!(
        h.invoices().await,
        PoisonKind::ALL.len() as i64,
        "every good order invoiced"
    );
    let stats = running.stats();
    assert_eq!(stats.dead_lettered, expected as u64);
    assert_eq!(stats.requeued, 0);
    running.stop().await.expect("stop");
    assert_eq!(h.queue_len(h.topology.queue()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_publish_failure_requeues_and_nothing_is_lost() {
    let h = Harness::new(&[]).await;
    // Without Q.dlq the mandatory dead-letter publish comes back unroutable.
    let channel = h.connection.create_channel().await.expect("channel");
    channel
        .queue_delete(h.topology.dlq().as_str().into(), Default::default())
        .await
        .expect("delete dlq");
    let running = h.start(
        h.consumer(create_invoice)
            .requeue_delay(std::time::Duration::from_millis(50))
            .build(),
    );
    // The runtime declares the topology when it connects: delete Q.dlq again afterwards.
    h.wait_for_consumer().await;
    channel
        .queue_delete(h.topology.dlq().as_str().into(), Default::default())
        .await
        .expect("delete dlq again");
    publish_poison(
        &h.publisher,
        h.topology.exchange(),
        &h.name,
        0,
        PoisonKind::InvalidJson,
    )
    .await
    .expect("publish");
    running
        .wait_for_stats("dead-letter publish failed and was requeued", |s| {
            s.requeued >= 2
        })
        .await;
    assert_eq!(running.stats().dead_lettered, 0);

    // The DLQ comes back: the message lands there, once.
    h.topology.declare(&h.connection).await.expect("redeclare");
    let dead = h.expect_in_queue(&h.topology.dlq(), 1).await;
    assert_eq!(
        dead[0].header("x-oncely-error-code").as_deref(),
        Some("contract.undecodable_body")
    );
    running
        .wait_for_stats("dead-lettered", |s| s.dead_lettered == 1)
        .await;
    running.stop().await.expect("stop");
    assert_eq!(h.queue_len(h.topology.queue()).await, 0);
}
