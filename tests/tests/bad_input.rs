//! Anything a producer can send ends in `Q.dlq` with a reason, once, and never stops the consumer.

use billing::{ORDER_CREATED_V1, PoisonKind, create_invoice, order, publish_poison};
use oncely::lapin::BasicProperties;
use oncely::lapin::types::AMQPValue;
use oncely_e2e::raw_amqp::{RawProperties, RawTable, RawValue};
use oncely_e2e::{Harness, Received};
use std::collections::BTreeMap;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_json_goes_to_dlq_with_reason_and_is_never_looped() {
    let h = Harness::new(&[std::time::Duration::from_millis(100)]).await;
    let running = h.run(create_invoice);
    let dead = h.dead_letter_poison(PoisonKind::InvalidJson).await;
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
    let running = h.run(create_invoice);
    let dead = h.dead_letter_poison(PoisonKind::MissingMessageId).await;
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
    let running = h.run(create_invoice);
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
async fn dead_letter_publish_failure_holds_the_message_and_nothing_is_lost() {
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
            .build()
            .expect("valid consumer settings"),
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
        .wait_for_stats("dead-letter publish failed and the message is held", |s| {
            s.held >= 1
        })
        .await;
    let held = running.stats();
    assert_eq!((held.dead_lettered, held.requeued), (0, 0), "{held:?}");

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

/// The original bytes the transport kept for `field` of a dead letter.
fn kept_original(dead: &Received, field: &str) -> Option<Vec<u8>> {
    let headers = dead.properties.headers().as_ref()?;
    match headers.inner().get(oncely::headers::INVALID_UTF8)? {
        AMQPValue::FieldTable(marks) => match marks.inner().get(field)? {
            AMQPValue::ByteArray(bytes) => Some(bytes.as_slice().to_vec()),
            _ => None,
        },
        _ => None,
    }
}

/// The body of a good order, so that the only thing wrong with a hostile message is what the
/// test puts in its properties.
fn order_body(h: &Harness, n: usize) -> Vec<u8> {
    serde_json::to_vec(&order(&h.name, n)).expect("order json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_strings_that_are_not_utf8_go_to_dlq_and_the_queue_flows_on() {
    let h = Harness::new(&[]).await;
    let running = h.run(create_invoice);
    h.wait_for_consumer().await;

    let bad_id = b"ord-\xff\xfe-1".to_vec();
    let bad_type = b"order.created.\xc3(".to_vec();
    let bad_header = b"tenant\xff".to_vec();
    let hostile = [
        ("message_id", RawProperties::json(bad_id.clone())),
        (
            "type",
            RawProperties {
                kind: Some(bad_type.clone()),
                ..RawProperties::json(format!("{}-type", h.name))
            },
        ),
        (
            "headers.tenant?",
            RawProperties {
                headers: Some(
                    RawTable::default()
                        .with(bad_header.clone(), RawValue::LongString(b"t-1".to_vec())),
                ),
                ..RawProperties::json(format!("{}-header", h.name))
            },
        ),
    ];
    for (i, (_, properties)) in hostile.iter().enumerate() {
        h.publish_hostile(
            ORDER_CREATED_V1.as_bytes(),
            properties,
            &order_body(&h, 100 + i),
        )
        .await;
        // A good order behind each hostile one: it must not be stuck behind it.
        h.publish_order(&order(&h.name, i)).await;
    }

    let dead = h.expect_in_queue(&h.topology.dlq(), 3).await;
    for d in &dead {
        assert_eq!(
            d.header("x-oncely-error-code").as_deref(),
            Some("contract.invalid_utf8")
        );
    }
    let reasons: Vec<String> = dead
        .iter()
        .map(|d| d.header("x-oncely-reason").unwrap_or_default())
        .collect();
    for (field, _) in &hostile {
        assert!(
            reasons.iter().any(|r| r.contains(field)),
            "a reason names {field}: {reasons:?}"
        );
    }
    // The DLQ copy keeps the bytes the producer sent.
    let by_field = |field: &str| {
        dead.iter()
            .find_map(|d| kept_original(d, field))
            .unwrap_or_else(|| panic!("original of {field} kept"))
    };
    assert_eq!(by_field("message_id"), bad_id);
    assert_eq!(by_field("type"), bad_type);
    assert_eq!(by_field("headers.tenant?"), bad_header);

    wait_for_invoices(&h, 3).await;
    let stats = running.stats();
    assert_eq!(stats.reconnects, 0, "the connection never failed");
    assert_eq!((stats.dead_lettered, stats.processed), (3, 3));
    running.stop().await.expect("stop");
    assert_eq!(h.queue_len(h.topology.queue()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_key_that_is_not_utf8_goes_to_dlq_without_breaking_the_connection() {
    let h = Harness::new(&[]).await;
    let bad_key = b"order.\xff".to_vec();
    // RabbitMQ checks UTF-8 in queue.bind but not in basic.publish: a fanout exchange routes
    // the message whatever its key.
    let fanout = format!("{}.fanout", h.topology.exchange());
    let channel = h.connection.create_channel().await.expect("channel");
    channel
        .exchange_declare(
            fanout.as_str().into(),
            oncely::lapin::ExchangeKind::Fanout,
            Default::default(),
            Default::default(),
        )
        .await
        .expect("declare fanout");
    channel
        .queue_bind(
            h.topology.queue().into(),
            fanout.as_str().into(),
            "".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .expect("bind");
    let running = h.run(create_invoice);
    h.wait_for_consumer().await;
    let mut raw = oncely_e2e::raw_amqp::RawPublisher::connect(&oncely_e2e::amqp_url())
        .await
        .expect("raw connection");
    raw.publish(
        fanout.as_bytes(),
        &bad_key,
        &RawProperties::json(format!("{}-rk", h.name)),
        &order_body(&h, 100),
    )
    .await
    .expect("publish with a non-UTF-8 routing key");
    raw.close().await.expect("close");
    h.publish_order(&order(&h.name, 1)).await;

    let dead = h.expect_in_queue(&h.topology.dlq(), 1).await;
    assert_eq!(
        dead[0].header("x-oncely-error-code").as_deref(),
        Some("contract.invalid_utf8")
    );
    assert_eq!(kept_original(&dead[0], "routing_key"), Some(bad_key));
    wait_for_invoices(&h, 1).await;
    assert_eq!(running.stats().reconnects, 0);
    running.stop().await.expect("stop");
    let _ = channel
        .exchange_delete(fanout.as_str().into(), Default::default())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_header_types_are_ignored_or_dead_lettered_never_a_connection_failure() {
    let h = Harness::new(&[]).await;
    let running = h.run(create_invoice);
    h.wait_for_consumer().await;

    let nested = RawTable::default()
        .with(
            "inner",
            RawValue::Table(RawTable::default().with("deep", RawValue::Void)),
        )
        .with("bytes", RawValue::Bytes(vec![0, 0xff, 0xfe]));
    let odd = RawTable::default()
        .with("decimal", RawValue::Decimal(2, 12_345))
        .with("timestamp", RawValue::Timestamp(1_700_000_000))
        .with("table", RawValue::Table(nested.clone()))
        .with("bytes", RawValue::Bytes(vec![0xff; 16]))
        .with("void", RawValue::Void)
        .with(
            "array",
            RawValue::Array(vec![
                RawValue::I64(1),
                RawValue::Table(nested),
                RawValue::Array(vec![RawValue::Void, RawValue::Bool(true)]),
                RawValue::Decimal(0, 1),
            ]),
        )
        .with("float", RawValue::F64(1.5))
        .with("short", RawValue::I16(-7))
        .with("text", RawValue::LongString(vec![0xff, 0x00, 0xfe]))
        .with(
            "idempotency_key",
            RawValue::LongString(b"order-odd".to_vec()),
        );
    // Odd types in headers the contract does not read: the message is handled.
    h.publish_hostile(
        ORDER_CREATED_V1.as_bytes(),
        &RawProperties {
            headers: Some(odd.clone()),
            ..RawProperties::json(format!("{}-odd", h.name))
        },
        &order_body(&h, 0),
    )
    .await;
    // Odd types in the contract's own headers: dead-lettered with a reason.
    for (i, value) in [
        RawValue::Decimal(2, 1),
        RawValue::Timestamp(1),
        RawValue::Table(RawTable::default()),
        RawValue::Bytes(b"t-1".to_vec()),
        RawValue::Void,
        RawValue::Array(vec![]),
    ]
    .into_iter()
    .enumerate()
    {
        h.publish_hostile(
            ORDER_CREATED_V1.as_bytes(),
            &RawProperties {
                headers: Some(odd.clone().with("tenant_id", value)),
                ..RawProperties::json(format!("{}-tenant-{i}", h.name))
            },
            &order_body(&h, 10 + i),
        )
        .await;
    }
    h.publish_order(&order(&h.name, 1)).await;

    let dead = h.expect_in_queue(&h.topology.dlq(), 6).await;
    for d in &dead {
        assert_eq!(
            d.header("x-oncely-error-code").as_deref(),
            Some("contract.invalid_header")
        );
        assert!(
            d.header("x-oncely-reason")
                .is_some_and(|r| r.contains("tenant_id")),
            "the reason names the header"
        );
    }
    wait_for_invoices(&h, 2).await;
    let stats = running.stats();
    assert_eq!(stats.reconnects, 0, "the connection never failed");
    assert_eq!((stats.processed, stats.dead_lettered), (2, 6));
    running.stop().await.expect("stop");
}

async fn wait_for_invoices(h: &Harness, count: i64) {
    oncely_e2e::wait_until(
        &format!("{count} invoices"),
        std::time::Duration::from_secs(20),
        || async { h.invoices().await >= count },
    )
    .await;
    assert_eq!(h.invoices().await, count, "each good order invoiced once");
}

/// A NUL byte in a message id (valid UTF-8, accepted by RabbitMQ, refused by PostgreSQL text)
/// and a NUL inside a JSON string of the body: each fails its own message, once, and the orders
/// around them flow on, in single and in batched mode.
async fn nul_bytes_fail_their_own_message_only(batched: bool) {
    let h = Harness::new(&[std::time::Duration::from_millis(100)]).await;
    let mut consumer = h.consumer(create_invoice);
    if batched {
        consumer = consumer.batch(10, std::time::Duration::from_millis(20));
    }
    let running = h.start(consumer.build().expect("valid consumer settings"));
    h.wait_for_consumer().await;
    let json = |n: usize| {
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(format!("{}-{n}\0-nul", h.name).into())
    };
    h.publish_raw(&order_body(&h, 100), json(100)).await;
    let mut order_with_nul = order(&h.name, 101);
    order_with_nul.customer_id = "cus-\0-1".to_owned();
    h.publish_order(&order_with_nul).await;
    for n in 0..5 {
        h.publish_order(&order(&h.name, n)).await;
    }
    let dead = h.expect_in_queue(&h.topology.dlq(), 2).await;
    let mut codes: Vec<String> = dead
        .iter()
        .map(|d| d.header("x-oncely-error-code").unwrap_or_default())
        .collect();
    codes.sort();
    assert_eq!(
        codes,
        ["contract.invalid_message_id", "db.error"],
        "the id is refused by the contract, the body's NUL by PostgreSQL in the handler"
    );
    oncely_e2e::wait_until(
        "five invoices",
        std::time::Duration::from_secs(20),
        || async { h.invoices().await == 5 },
    )
    .await;
    let stats = running.stats();
    assert_eq!(stats.dead_lettered, 2, "each settled once, never looped");
    running.stop().await.expect("stop");
    assert_eq!(h.queue_len(h.topology.queue()).await, 0);
    assert_eq!(h.invoices().await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_bytes_in_a_message_id_or_body_fail_their_own_message_only() {
    nul_bytes_fail_their_own_message_only(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_bytes_in_a_message_id_or_body_fail_their_own_message_only_in_batched_mode() {
    nul_bytes_fail_their_own_message_only(true).await;
}
