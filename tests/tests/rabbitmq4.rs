//! RabbitMQ 4 (Debian trixie's 4.0.x, run next to the machine's broker by scripts/rabbitmq4.sh)
//! and a three-node RabbitMQ 4 cluster: quorum topologies that never drop a message, oncely's
//! delivery limit ahead of the broker's, consumers that fail over between nodes; and, on the
//! machine's broker, strict order across replicas.
//!
//! `./scripts/test` starts the brokers and exports `ONCELY_RABBITMQ4_URL` and
//! `ONCELY_CLUSTER_URLS`; without them the RabbitMQ 4 tests skip, except under CI, where they fail.

use billing::{OrderCreated, create_invoice, order};
use futures_lite::StreamExt;
use oncely::lapin::options::{BasicConsumeOptions, BasicQosOptions};
use oncely::lapin::types::FieldTable;
use oncely::{AsyncPgConnection as Conn, Envelope, HandlerError, QueueType};
use oncely_e2e::{
    Harness, amqp_url, broker_from_env, rabbitmq4_dead_letter_counters, rabbitmq4ctl, wait_until,
    within,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const RABBITMQ4_NODE: &str = "rabbit4@localhost";
/// The cluster's nodes by AMQP port, as scripts/rabbitmq4.sh starts them.
const CLUSTER: [(u16, &str); 3] = [
    (5674, "rabbit4a@localhost"),
    (5675, "rabbit4b@localhost"),
    (5676, "rabbit4c@localhost"),
];

/// `list_queues name arguments` of `node`: queue name -> argument name -> value.
async fn queue_arguments(node: &str) -> BTreeMap<String, BTreeMap<String, serde_json::Value>> {
    let out = rabbitmq4ctl(
        node,
        &["list_queues", "name", "arguments", "--formatter", "json"],
    )
    .await;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("list_queues output is not JSON ({e}): {out}"));
    rows.iter()
        .filter_map(|row| {
            let name = row.get("name")?.as_str()?.to_owned();
            // Each argument is [name, type, value].
            let args = row
                .get("arguments")?
                .as_array()?
                .iter()
                .filter_map(|a| Some((a.get(0)?.as_str()?.to_owned(), a.get(2)?.clone())))
                .collect();
            Some((name, args))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_topology_on_rabbitmq4_dead_letters_at_least_once_and_never_drops() {
    let Some(url) = broker_from_env("ONCELY_RABBITMQ4_URL") else {
        return;
    };
    let h = Harness::on_broker(&url, &[Duration::from_secs(1)], |t| {
        t.queue_type(QueueType::Quorum)
    })
    .await;
    let t = &h.topology;
    let all = queue_arguments(RABBITMQ4_NODE).await;
    let args = |q: &str| {
        all.get(q)
            .cloned()
            .unwrap_or_else(|| panic!("queue {q} not declared"))
    };
    let text = |v: &str| serde_json::Value::from(v);

    let q = args(t.queue());
    assert_eq!(q["x-queue-type"], text("quorum"));
    assert_eq!(q["x-dead-letter-exchange"], text(""), "{q:?}");
    assert_eq!(q["x-dead-letter-routing-key"], text(&t.dlq()));
    assert_eq!(q["x-dead-letter-strategy"], text("at-least-once"));
    assert_eq!(q["x-overflow"], text("reject-publish"));
    assert_eq!(
        q["x-delivery-limit"],
        serde_json::Value::from(
            oncely::amqp::DEFAULT_DELIVERY_LIMIT + oncely::amqp::BROKER_DELIVERY_LIMIT_MARGIN
        ),
        "an explicit limit, not the broker's silent default of 20"
    );
    let retry = args(&t.retry_queue(0).expect("tier"));
    assert_eq!(
        retry["x-queue-type"],
        text("quorum"),
        "delay queues replicate too"
    );
    assert_eq!(retry["x-dead-letter-routing-key"], text(t.queue()));
    assert_eq!(retry["x-dead-letter-strategy"], text("at-least-once"));
    assert_eq!(retry["x-overflow"], text("reject-publish"));
    assert_eq!(retry["x-message-ttl"], serde_json::Value::from(1000));
    for name in [t.dlq(), t.parking()] {
        let a = args(&name);
        assert_eq!(a["x-queue-type"], text("quorum"));
        assert_eq!(
            a["x-delivery-limit"],
            serde_json::Value::from(oncely::amqp::NO_DELIVERY_LIMIT),
            "{name} never drops"
        );
    }

    // Declaring it again changes nothing; checking finds nothing to report.
    t.declare(&h.connection)
        .await
        .expect("redeclare is a no-op");
    assert_eq!(
        t.check(&h.connection).await.expect("check"),
        Vec::<String>::new()
    );

    // A retry goes through the quorum delay queue and comes back.
    let running = h.start(
        h.consumer(fail_once_then_invoice)
            .retry_policy(oncely::RetryPolicy::new(3, vec![Duration::from_secs(1)]))
            .build()
            .expect("valid consumer settings"),
    );
    let before = rabbitmq4_dead_letter_counters(RABBITMQ4_NODE).await;
    h.publish_order(&order(&h.name, 1)).await;
    running
        .wait_for_stats("processed after one retry", |s| {
            s.retried == 1 && s.processed == 1
        })
        .await;
    running.stop().await.expect("clean stop");
    assert_eq!(h.invoices().await, 1);
    assert_eq!(h.queue_len(&t.dlq()).await, 0);
    let after = rabbitmq4_dead_letter_counters(RABBITMQ4_NODE).await;
    assert_eq!(
        after, before,
        "nothing dropped: (lost, broker delivery-limit)"
    );
}

#[oncely::handler(consumer = "billing")]
async fn fail_once_then_invoice(
    conn: &mut Conn,
    msg: Envelope<OrderCreated>,
) -> Result<(), HandlerError> {
    if msg.metadata.attempt == 1 {
        return Err(HandlerError::retryable(
            "test.first_attempt",
            "the first attempt fails",
        ));
    }
    create_invoice::call(conn, msg).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_keeps_crashing_the_consumer_reaches_the_dlq_with_oncelys_reason_on_rabbitmq4()
 {
    let Some(url) = broker_from_env("ONCELY_RABBITMQ4_URL") else {
        return;
    };
    const LIMIT: u32 = 3;
    // The default policy's tiers: the consumer declares them, the harness deletes them.
    let tiers = oncely::RetryPolicy::default().tiers().to_vec();
    let h = Harness::on_broker(&url, &tiers, |t| {
        t.queue_type(QueueType::Quorum).delivery_limit(LIMIT)
    })
    .await;
    let before = rabbitmq4_dead_letter_counters(RABBITMQ4_NODE).await;
    let o = order(&h.name, 1);
    h.publish_order(&o).await;

    // A consumer process that dies while handling the message, LIMIT times: the channel closes
    // with the delivery unacked, and the broker counts a return each time.
    for crash in 0..LIMIT {
        let channel = h.connection.create_channel().await.expect("channel");
        channel
            .basic_qos(1, BasicQosOptions::default())
            .await
            .expect("qos");
        let mut consumer = channel
            .basic_consume(
                h.topology.queue().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let delivery = within("a delivery", Duration::from_secs(10), consumer.next())
            .await
            .expect("stream open")
            .expect("delivery");
        let count = oncely::amqp::read_delivery_count(&delivery.properties);
        assert_eq!(
            count,
            (crash > 0).then_some(u64::from(crash)),
            "the broker counts every crash"
        );
        oncely::amqp::close_channel(&channel, 200, "simulated crash").await;
    }

    // The next delivery carries x-delivery-count = LIMIT: oncely dead-letters it, with its
    // reason, before the handler runs, well before the broker's own limit would.
    let running = h.run(create_invoice);
    let dead = h.expect_in_queue(&h.topology.dlq(), 1).await;
    running.stop().await.expect("clean stop");
    let copy = &dead[0];
    assert_eq!(copy.message_id(), Some(o.message_id()));
    assert_eq!(
        copy.header("x-oncely-error-code").as_deref(),
        Some("delivery_limit")
    );
    assert!(
        copy.header("x-oncely-reason")
            .is_some_and(|r| r.contains("delivered 3 times before")),
        "{:?}",
        copy.header("x-oncely-reason")
    );
    let kept_count = copy
        .properties
        .headers()
        .as_ref()
        .is_some_and(|t| t.inner().contains_key("x-delivery-count"));
    assert!(!kept_count, "the copy starts a new count when replayed");
    assert_eq!(h.invoices().await, 0, "the handler never ran");
    assert_eq!(h.queue_len(h.topology.queue()).await, 0);
    let after = rabbitmq4_dead_letter_counters(RABBITMQ4_NODE).await;
    assert_eq!(
        after, before,
        "nothing dropped, nothing dead-lettered by the broker's own limit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_order_replicas_share_a_queue_with_one_active_consumer() {
    // On the machine's broker: x-single-active-consumer works the same on 3.x and 4.x.
    let tiers = oncely::RetryPolicy::default().tiers().to_vec();
    let h = Harness::on_broker(&amqp_url(), &tiers, |t| t.single_active_consumer(true)).await;
    let first = h.start(
        h.consumer(create_invoice)
            .strict_order()
            .build()
            .expect("valid consumer settings"),
    );
    wait_until(
        "the first replica consumes",
        Duration::from_secs(20),
        || async { h.queue_counts(h.topology.queue()).await.1 == 1 },
    )
    .await;
    let second = h.start(
        h.consumer(create_invoice)
            .strict_order()
            .build()
            .expect("valid consumer settings"),
    );
    wait_until(
        "the second replica is registered",
        Duration::from_secs(20),
        || async { h.queue_counts(h.topology.queue()).await.1 == 2 },
    )
    .await;
    for n in 1..=10 {
        h.publish_order(&order(&h.name, n)).await;
    }
    wait_until("10 invoices", Duration::from_secs(30), || async {
        h.invoices().await == 10
    })
    .await;
    assert_eq!(
        (first.stats().processed, second.stats().processed),
        (10, 0),
        "only the active consumer receives"
    );
    assert_eq!(h.invoice_order().await.len(), 10);

    // The active replica goes: the other takes over, still one at a time, in order.
    first.stop().await.expect("clean stop");
    for n in 11..=15 {
        h.publish_order(&order(&h.name, n)).await;
    }
    second
        .wait_for_stats("the second replica took over", |s| s.processed == 5)
        .await;
    let invoiced = h.invoice_order().await;
    let expected: Vec<String> = (1..=15).map(|n| order(&h.name, n).order_id).collect();
    assert_eq!(invoiced, expected, "invoices in publish order");
    second.stop().await.expect("clean stop");
}

/// Slow enough that a node can be stopped while the queue is being worked through.
#[oncely::handler(consumer = "billing")]
async fn unhurried_invoice(
    conn: &mut Conn,
    msg: Envelope<OrderCreated>,
) -> Result<(), HandlerError> {
    tokio::time::sleep(Duration::from_millis(20)).await;
    create_invoice::call(conn, msg).await
}

/// The cluster node a connection named `name@127.0.0.1:PORT` is on.
async fn node_of_connection(name: &str, ask: &str) -> Option<&'static str> {
    let out = rabbitmq4ctl(ask, &["list_connections", "client_properties"]).await;
    let needle = format!("{name}@127.0.0.1:");
    let port: u16 = out
        .split(needle.as_str())
        .nth(1)?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()?;
    CLUSTER.iter().find(|(p, _)| *p == port).map(|(_, n)| *n)
}

/// The leader of quorum queue `queue`, asked of node `ask`.
async fn leader_of(queue: &str, ask: &str) -> Option<&'static str> {
    let out = rabbitmq4ctl(
        ask,
        &["list_queues", "name", "leader", "--formatter", "json"],
    )
    .await;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).ok()?;
    let leader = rows
        .iter()
        .find(|r| r.get("name").and_then(|n| n.as_str()) == Some(queue))?
        .get("leader")?
        .as_str()?
        .to_owned();
    CLUSTER.iter().find(|(_, n)| *n == leader).map(|(_, n)| *n)
}

/// Starts the node's RabbitMQ application again when dropped, so that a failing test leaves the
/// cluster as it found it.
struct Restart(&'static str);

impl Drop for Restart {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/rabbitmq4ctl");
        let _ = std::process::Command::new(script)
            .args([self.0, "start_app"])
            .status();
    }
}

/// Stops `node`'s RabbitMQ application: its listeners, connections and queue replicas go (the
/// Erlang VM stays). Dropping the guard starts it again, even when the test fails.
async fn stop_app(node: &'static str) -> Restart {
    let restart = Restart(node);
    rabbitmq4ctl(node, &["stop_app"]).await;
    restart
}

/// Starts the stopped node again and waits until the three nodes run, as the cluster was.
async fn bring_back(restart: Restart) {
    let node = restart.0;
    drop(restart);
    rabbitmq4ctl(node, &["await_startup"]).await;
    let other = CLUSTER
        .iter()
        .map(|(_, n)| *n)
        .find(|n| *n != node)
        .unwrap_or(node);
    wait_until("three running nodes", Duration::from_secs(60), || async {
        let status = rabbitmq4ctl(other, &["cluster_status", "--formatter", "json"]).await;
        serde_json::from_str::<serde_json::Value>(&status)
            .ok()
            .and_then(|s| s.get("running_nodes")?.as_array().map(Vec::len))
            == Some(3)
    })
    .await;
}

/// Publishes `order` with `producer`, trying again as a service (or the outbox relay) would
/// when the connection it had was on a node that went.
async fn publish_with_retries(producer: &oncely::Publisher, exchange: &str, order: &OrderCreated) {
    let (body, properties) = billing::order_message(order);
    let mut last = None;
    for _ in 0..5 {
        let sent = producer
            .publish(oncely::OutgoingMessage {
                exchange,
                routing_key: billing::ORDER_CREATED_V1,
                body: &body,
                properties: properties.clone(),
            })
            .await;
        match sent {
            Ok(()) => return,
            Err(e) => last = Some(e),
        }
    }
    panic!("publishing {} failed: {last:?}", order.order_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_given_every_node_survive_losing_their_node_and_the_queue_leader() {
    let Some(urls) = broker_from_env("ONCELY_CLUSTER_URLS") else {
        return;
    };
    const ORDERS: usize = 200;
    let mut h = Harness::on_broker(&urls, &[Duration::from_secs(1)], |t| {
        t.queue_type(QueueType::Quorum)
    })
    .await;
    let mut before = BTreeMap::new();
    for (_, node) in CLUSTER {
        before.insert(node, rabbitmq4_dead_letter_counters(node).await);
    }
    let running = h.start(
        h.consumer(unhurried_invoice)
            .retry_policy(oncely::RetryPolicy::new(5, vec![Duration::from_secs(1)]))
            .concurrency(4)
            .build()
            .expect("valid consumer settings"),
    );
    const EXTRA: usize = 50;
    let producer = oncely::Publisher::new(
        urls.clone(),
        format!("{}-producer", h.name),
        oncely::PublisherOptions::default(),
    );
    // Connected before any node goes.
    publish_with_retries(&producer, h.topology.exchange(), &order(&h.name, 0)).await;
    let mut published = 1;
    for (round, victim) in ["the consumer's node", "the queue's leader"]
        .into_iter()
        .enumerate()
    {
        let plan = billing::PublishPlan {
            prefix: format!("{}-r{round}", h.name),
            orders: ORDERS,
            duplicate_rate: 0.0,
            poison: 0,
            seed: round as u64 + 1,
        };
        let summary = billing::publish_orders(&h.publisher, h.topology.exchange(), &plan)
            .await
            .expect("publish orders");
        published += summary.orders;
        let target = published as i64;
        let started = target - ORDERS as i64;
        wait_until("processing under way", Duration::from_secs(60), || async {
            h.invoices().await >= started + 20
        })
        .await;
        let ask = CLUSTER[0].1;
        let node = if round == 0 {
            let name = h.consumer_connection_name();
            let mut found = None;
            for (_, n) in CLUSTER {
                found = node_of_connection(&name, n).await.or(found);
                if found.is_some() {
                    break;
                }
            }
            found.expect("the consumer's connection is on a cluster node")
        } else {
            leader_of(h.topology.queue(), ask)
                .await
                .expect("the queue has a leader")
        };
        eprintln!("stopping {node} ({victim}) mid-stream");
        let restart = stop_app(node).await;
        // A publisher given every node publishes while one is down (its connection may have
        // been on it).
        for n in 1..=EXTRA {
            let o = order(&format!("{}-p{round}", h.name), n);
            publish_with_retries(&producer, h.topology.exchange(), &o).await;
        }
        published += EXTRA;
        let target = published as i64;
        wait_until(
            "every order invoiced with a node down",
            Duration::from_secs(120),
            || async { h.invoices().await >= target },
        )
        .await;
        bring_back(restart).await;
        // The harness's own connection may have been on the stopped node.
        let connection = Arc::new(
            oncely::amqp::connect(
                &h.amqp_url,
                &format!("{}-harness", h.name),
                Default::default(),
            )
            .await
            .expect("reconnect the harness"),
        );
        h.publisher =
            oncely::amqp::ConfirmPublisher::new(connection.clone(), Duration::from_secs(5));
        h.connection = connection;
    }
    producer.close().await;
    let stats = running.stats();
    running.stop().await.expect("clean stop");
    assert!(stats.reconnects >= 1, "the consumer failed over: {stats:?}");
    assert_eq!(
        h.invoices().await,
        published as i64,
        "every order invoiced once"
    );
    assert_eq!(h.processed().await, published as i64);
    assert_eq!(h.queue_len(h.topology.queue()).await, 0);
    assert_eq!(
        h.queue_len(&h.topology.dlq()).await,
        0,
        "nothing dead-lettered"
    );
    assert_eq!(h.queue_len(&h.topology.parking()).await, 0);
    for (_, node) in CLUSTER {
        let (lost, broker_limit) = rabbitmq4_dead_letter_counters(node).await;
        // A restarted node counts from zero again: nothing may have been dropped since either.
        let (lost0, limit0) = before[node];
        assert!(
            lost == lost0 || lost == 0,
            "{node}: messages dropped ({lost0} -> {lost})"
        );
        assert!(
            broker_limit == limit0 || broker_limit == 0,
            "{node}: the broker's delivery limit dead-lettered ({limit0} -> {broker_limit})"
        );
    }
}
