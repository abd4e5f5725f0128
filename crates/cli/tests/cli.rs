//! The `oncely` binary against the real PostgreSQL and RabbitMQ.

use billing::{OrderCreated, create_invoice, order};
use diesel::Connection;
use diesel_async::AsyncPgConnection;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_migrations::{FileBasedMigrations, MigrationHarness};
use oncely::{AsyncPgConnection as Conn, Envelope, HandlerError};
use oncely_e2e::{Harness, amqp_url, wait_until};
use std::time::Duration;

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn oncely(h: &Harness, args: &[&str]) -> Run {
    oncely_with_database(h.schema.url(), args).await
}

/// `oncely ARGS` against the database at `database_url`.
async fn oncely_with_database(database_url: &str, args: &[&str]) -> Run {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_oncely"))
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("AMQP_URL", amqp_url())
        .kill_on_drop(true)
        .output();
    // A hang is a failure of the command under test, never of the suite.
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .unwrap_or_else(|_| panic!("oncely {args:?} did not finish within 60 s"))
        .expect("run oncely");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_migrations_are_the_embedded_sql_written_once_and_apply_to_an_empty_database() {
    let h = Harness::new(&[]).await;
    let dir = std::env::temp_dir().join(format!("{}-migrations", h.name));
    let dir_arg = dir.to_string_lossy().into_owned();
    let first = oncely(&h, &["migrations", "generate", "--dir", &dir_arg]).await;
    assert_eq!(first.code, Some(0), "{}", first.stderr);
    let mut folders: Vec<_> = std::fs::read_dir(&dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .collect();
    folders.sort();
    assert_eq!(folders.len(), 2);
    assert!(folders[0].ends_with(oncely::inbox::INBOX_MIGRATION));
    assert!(folders[1].ends_with(oncely::outbox::OUTBOX_MIGRATION));
    let up = std::fs::read_to_string(folders[0].join("up.sql")).expect("up.sql");
    assert_eq!(
        up,
        oncely::inbox::INBOX_SQL.0,
        "one source: the SQL the crate embeds"
    );
    assert_eq!(
        std::fs::read_to_string(folders[1].join("down.sql")).expect("down.sql"),
        oncely::outbox::OUTBOX_SQL.1
    );

    let again = oncely(
        &h,
        &["migrations", "generate", "--dir", &dir_arg, "--inbox"],
    )
    .await;
    assert_eq!(
        again.code,
        Some(3),
        "refuses a second copy: {}",
        again.stderr
    );
    assert!(
        again
            .stderr
            .contains("already holds the oncely_inbox migration"),
        "{}",
        again.stderr
    );

    // What `diesel migration run` does, with the same library: apply the folder to an empty schema.
    let empty = oncely::testing::TestSchema::create().await.expect("schema");
    let url = empty.url().to_owned();
    let migrations_dir = dir.clone();
    let applied = tokio::task::spawn_blocking(move || {
        let mut conn =
            AsyncConnectionWrapper::<AsyncPgConnection>::establish(&url).expect("connect");
        let source = FileBasedMigrations::from_path(&migrations_dir).expect("migrations folder");
        conn.run_pending_migrations(source)
            .map(|v| v.len())
            .expect("apply")
    })
    .await
    .expect("task");
    assert_eq!(applied, 2);
    let pool = oncely::connect_pool(empty.url(), &Default::default());
    let inbox = oncely::Inbox::new(pool);
    assert_eq!(
        inbox
            .count_processed("any")
            .await
            .expect("message_inbox exists"),
        0
    );
    // The service's own start-up then applies the embedded migrations: the same versions, so
    // nothing is applied twice ("relation already exists" was the error when they differed).
    for migrations in [oncely::INBOX_MIGRATIONS, oncely::outbox::OUTBOX_MIGRATIONS] {
        let applied = oncely::run_migrations(empty.url(), migrations)
            .await
            .expect("embedded migrations after the generated ones");
        assert_eq!(applied, 0, "already applied from the generated files");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[oncely::handler(consumer = "billing")]
async fn invoice_any_currency(
    conn: &mut Conn,
    mut msg: Envelope<OrderCreated>,
) -> Result<(), HandlerError> {
    // The fix: currencies are normalised instead of refused.
    msg.payload.currency = "IDR".to_owned();
    create_invoice::call(conn, msg).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_to_dlq_then_handler_fixed_then_replay_is_processed_once() {
    let h = Harness::new(&[]).await;
    let mut bad = order(&h.name, 1);
    bad.currency = "rupiah".to_owned();
    let strict = h.start(
        h.consumer(create_invoice)
            .build()
            .expect("valid consumer settings"),
    );
    h.publish_order(&bad).await;
    strict
        .wait_for_stats("dead-lettered", |s| s.dead_lettered == 1)
        .await;
    strict.stop().await.expect("stop");

    let listed = oncely(&h, &["dlq", "list", h.topology.queue()]).await;
    assert_eq!(listed.code, Some(0), "{}", listed.stderr);
    assert!(listed.stdout.contains(": 1 messages"), "{}", listed.stdout);
    assert!(
        listed.stdout.contains(&bad.message_id()),
        "{}",
        listed.stdout
    );
    assert!(
        listed.stdout.contains("code=invalid_currency"),
        "{}",
        listed.stdout
    );
    assert_eq!(
        h.queue_len(&h.topology.dlq()).await,
        1,
        "list leaves messages in place"
    );

    let dry = oncely(&h, &["dlq", "replay", h.topology.queue(), "--dry-run"]).await;
    assert_eq!(dry.code, Some(0), "{}", dry.stderr);
    assert!(dry.stdout.contains("would replay"), "{}", dry.stdout);
    assert_eq!(
        h.queue_len(&h.topology.dlq()).await,
        1,
        "dry run moves nothing"
    );

    let fixed = h.start(
        h.consumer(invoice_any_currency)
            .build()
            .expect("valid consumer settings"),
    );
    let replay = oncely(&h, &["dlq", "replay", h.topology.queue(), "--rate", "50"]).await;
    assert_eq!(replay.code, Some(0), "{}", replay.stderr);
    assert!(
        replay.stdout.contains("replayed 1 of 1"),
        "{}",
        replay.stdout
    );
    fixed
        .wait_for_stats("processed", |s| s.processed == 1)
        .await;
    assert_eq!(h.invoices().await, 1);
    assert_eq!(h.queue_len(&h.topology.dlq()).await, 0);
    let row = h
        .inbox
        .find("billing", &bad.message_id())
        .await
        .expect("find")
        .expect("row");
    assert_eq!(
        (row.status.as_str(), row.attempts),
        ("processed", 2),
        "same message id, one effect"
    );

    // A second replay finds nothing; the message is never processed twice.
    let again = oncely(&h, &["dlq", "replay", h.topology.queue()]).await;
    assert!(again.stdout.contains("replayed 0 of 0"), "{}", again.stdout);
    assert_eq!(fixed.stats().processed, 1);
    fixed.stop().await.expect("stop");
}

#[oncely::handler(consumer = "billing")]
async fn steady_invoice(conn: &mut Conn, msg: Envelope<OrderCreated>) -> Result<(), HandlerError> {
    // Slow enough that the purge runs while deliveries are still being processed.
    tokio::time::sleep(Duration::from_millis(10)).await;
    create_invoice::call(conn, msg).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_purge_while_a_consumer_runs_is_safe_and_stats_report_it() {
    let h = Harness::new(&[]).await;
    let running = h.start(
        h.consumer(steady_invoice)
            .concurrency(2)
            .build()
            .expect("valid consumer settings"),
    );
    for n in 0..100 {
        h.publish_order(&order(&h.name, n)).await;
    }
    running
        .wait_for_stats("first half", |s| s.processed >= 50)
        .await;
    // Purge everything processed so far while the consumer keeps going.
    let purge = oncely(
        &h,
        &[
            "inbox",
            "purge",
            "--older-than",
            "0s",
            "--force",
            "--consumer",
            "billing",
            "--batch",
            "7",
        ],
    )
    .await;
    assert_eq!(purge.code, Some(0), "{}", purge.stderr);
    assert!(purge.stdout.contains("deleted"), "{}", purge.stdout);
    assert!(
        running.stats().processed < 100,
        "the purge overlapped the consumer"
    );
    running.wait_for_stats("all", |s| s.processed == 100).await;
    assert_eq!(h.invoices().await, 100);
    assert_eq!(
        running.stats().requeued,
        0,
        "the consumer never waited on the purge"
    );

    let stats = oncely(&h, &["inbox", "stats"]).await;
    assert_eq!(stats.code, Some(0), "{}", stats.stderr);
    assert!(stats.stdout.contains("billing"), "{}", stats.stdout);
    let bad = oncely(&h, &["inbox", "purge", "--older-than", "soon"]).await;
    assert_eq!(bad.code, Some(2), "bad usage: {}", bad.stderr);
    running.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_purge_refuses_an_age_below_the_safe_floor_unless_forced() {
    let h = Harness::new(&[]).await;
    let running = h.start(
        h.consumer(steady_invoice)
            .build()
            .expect("valid consumer settings"),
    );
    for n in 0..3 {
        h.publish_order(&order(&h.name, n)).await;
    }
    running.wait_for_stats("three", |s| s.processed == 3).await;
    running.stop().await.expect("stop");

    // No configuration file: the floor is one day.
    let zero = oncely(&h, &["inbox", "purge", "--older-than", "0s"]).await;
    assert_eq!(zero.code, Some(3), "refused: {}", zero.stderr);
    assert!(
        zero.stderr.contains("1day") && zero.stderr.contains("--force"),
        "names the floor and the way past it: {}",
        zero.stderr
    );
    assert_eq!(h.processed().await, 3, "a refused purge deletes nothing");

    // A retry tier longer than a day raises the floor to that tier.
    let config = std::env::temp_dir().join(format!("{}-purge.toml", h.name));
    std::fs::write(
        &config,
        "[consumers.billing]\nqueue = \"q\"\nexchange = \"e\"\nretry_tiers = [\"1m\", \"36h\"]\n",
    )
    .expect("write config");
    let config = config.to_string_lossy().into_owned();
    let day = oncely(
        &h,
        &["inbox", "purge", "--older-than", "30h", "--config", &config],
    )
    .await;
    assert_eq!(day.code, Some(3), "refused: {}", day.stderr);
    assert!(
        day.stderr.contains("1day 12h") && day.stderr.contains("billing"),
        "names the tier's floor and its consumer: {}",
        day.stderr
    );
    let above = oncely(
        &h,
        &["inbox", "purge", "--older-than", "2d", "--config", &config],
    )
    .await;
    assert_eq!(above.code, Some(0), "{}", above.stderr);
    assert_eq!(h.processed().await, 3, "nothing that old yet");

    let forced = oncely(&h, &["inbox", "purge", "--older-than", "0s", "--force"]).await;
    assert_eq!(forced.code, Some(0), "{}", forced.stderr);
    assert_eq!(h.processed().await, 0, "forced: every processed row purged");
}

#[test]
fn help_never_prints_the_passwords_of_the_environment_urls() {
    for args in [
        &["--help"][..],
        &["inbox", "purge", "--help"],
        &["dlq", "list", "--help"],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_oncely"))
            .args(args)
            .env(
                "DATABASE_URL",
                "postgres://app:pg-pw-91c2@db.internal:5432/orders",
            )
            .env(
                "AMQP_URL",
                "amqps://app:amqp-pw-7f3a@rabbit.internal:5671/prod",
            )
            .output()
            .expect("run oncely");
        assert_eq!(out.status.code(), Some(0), "oncely {args:?}");
        let shown = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(shown.contains("DATABASE_URL"), "{shown}");
        assert!(!shown.contains("pg-pw-91c2"), "oncely {args:?}: {shown}");
        assert!(!shown.contains("amqp-pw-7f3a"), "oncely {args:?}: {shown}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_stats_counts_unpublished_rows_and_their_age() {
    let h = Harness::with_outbox().await;
    let mut conn = h.pool.get().await.expect("connection");
    for n in 0..3 {
        order_service_create(&mut conn, &h, n).await;
    }
    drop(conn);
    let stats = oncely(&h, &["outbox", "stats"]).await;
    assert_eq!(stats.code, Some(0), "{}", stats.stderr);
    assert!(stats.stdout.contains("unpublished: 3"), "{}", stats.stdout);
    let relay = h.relay(&amqp_url(), Default::default());
    relay.cycle().await.expect("cycle");
    wait_until("published", Duration::from_secs(5), || async {
        h.outbox_counts().await == (3, 0)
    })
    .await;
    let stats = oncely(&h, &["outbox", "stats"]).await;
    assert!(stats.stdout.contains("unpublished: 0"), "{}", stats.stdout);
    assert!(
        stats.stdout.contains("published (kept for retention): 3"),
        "{}",
        stats.stdout
    );
}

async fn order_service_create(conn: &mut Conn, h: &Harness, n: usize) {
    let event = oncely::outbox::NewOutboxMessage::builder()
        .id(format!("{}-{n}", h.name))
        .aggregate("order", format!("o{n}"))
        .event_type("order.created.v1")
        .exchange(h.topology.exchange())
        .routing_key(billing::ORDER_CREATED_V1)
        .payload(&order(&h.name, n))
        .build()
        .expect("event");
    oncely::outbox::enqueue(conn, &event)
        .await
        .expect("enqueue");
}

#[oncely::handler(consumer = "billing")]
async fn flaky_then_fine(conn: &mut Conn, msg: Envelope<OrderCreated>) -> Result<(), HandlerError> {
    if msg.metadata.attempt < 2 {
        return Err(HandlerError::retryable(
            "gateway_down",
            "first attempt fails",
        ));
    }
    create_invoice::call(conn, msg).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_declare_consume_retry_dead_letter_and_replay() {
    let base = Harness::new(&[]).await;
    // The same names as a quorum topology: its own exchange and queues.
    let tiers = vec![Duration::from_millis(100)];
    let topology = oncely::Topology::new(
        format!("{}.quorum", base.topology.exchange()),
        format!("{}.quorum", base.topology.queue()),
    )
    .bind(billing::ORDER_CREATED_V1)
    .queue_type(oncely::QueueType::Quorum)
    .retry_tiers(&tiers);
    topology
        .declare(&base.connection)
        .await
        .expect("declare quorum topology");
    topology
        .declare(&base.connection)
        .await
        .expect("declaring twice is a no-op");
    let listed = tokio::process::Command::new("rabbitmqctl")
        .args(["list_queues", "name", "type", "-q", "--no-table-headers"])
        .output()
        .await
        .expect("rabbitmqctl");
    let listed = String::from_utf8_lossy(&listed.stdout);
    for q in [topology.queue().to_owned(), topology.dlq()] {
        assert!(
            listed
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == [q.as_str(), "quorum"]),
            "{q} is a quorum queue:\n{listed}"
        );
    }

    let publish = |o: OrderCreated| {
        let exchange = topology.exchange().to_owned();
        let publisher = base.publisher.clone();
        async move {
            billing::publish_order(&publisher, &exchange, &o)
                .await
                .expect("publish");
        }
    };
    // Retry through the delay queue, then success.
    let running = base.start(quorum_consumer(&base, &topology, &tiers, flaky_then_fine));
    publish(order(&base.name, 1)).await;
    running
        .wait_for_stats("processed after one retry", |s| {
            s.processed == 1 && s.retried == 1
        })
        .await;
    running.stop().await.expect("stop");

    // Dead-letter, then replay after the fix.
    let mut bad = order(&base.name, 2);
    bad.currency = "rupiah".to_owned();
    let strict = base.start(quorum_consumer(&base, &topology, &tiers, create_invoice));
    publish(bad.clone()).await;
    strict
        .wait_for_stats("dead-lettered", |s| s.dead_lettered == 1)
        .await;
    strict.stop().await.expect("stop");
    assert_eq!(base.queue_len(&topology.dlq()).await, 1);
    let fixed = base.start(quorum_consumer(
        &base,
        &topology,
        &tiers,
        invoice_any_currency,
    ));
    let replay = oncely(&base, &["dlq", "replay", topology.queue()]).await;
    assert_eq!(replay.code, Some(0), "{}", replay.stderr);
    fixed
        .wait_for_stats("replayed and processed", |s| s.processed == 1)
        .await;
    fixed.stop().await.expect("stop");
    assert_eq!(base.invoices().await, 2);

    let _ = topology.delete(&base.connection).await;
}

fn quorum_consumer<H: oncely::Handler>(
    base: &Harness,
    topology: &oncely::Topology,
    tiers: &[Duration],
    handler: H,
) -> oncely::Consumer {
    base.consumer(handler)
        .topology(topology.clone())
        .retry_policy(oncely::RetryPolicy::new(3, tiers.to_vec()))
        .build()
        .expect("valid consumer settings")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_check_and_declare_follow_the_configuration_file() {
    let h = Harness::new(&[]).await;
    let queue = format!("{}.cfg.q", h.name);
    let exchange = format!("{}.cfg", h.topology.exchange());
    let config = |extra: &str| {
        format!(
            "[consumers.billing]\nqueue = \"{queue}\"\nexchange = \"{exchange}\"\nbindings = [\"order.created.v1\"]\nretry_tiers = [\"1s\", \"5s\"]\nmax_attempts = 3\n{extra}"
        )
    };
    let dir = std::env::temp_dir().join(format!("{}-config", h.name));
    std::fs::create_dir_all(&dir).expect("dir");
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write config");
        path.to_string_lossy().into_owned()
    };
    let good = write("good.toml", config(""));

    let before = oncely(&h, &["topology", "check", "--config", &good]).await;
    assert_eq!(
        before.code,
        Some(4),
        "missing queues are reported: {}",
        before.stdout
    );
    assert!(
        before.stdout.contains(&format!("queue {queue} is missing")),
        "{}",
        before.stdout
    );
    assert!(
        before
            .stdout
            .contains(&format!("queue {queue}.retry.5s is missing")),
        "{}",
        before.stdout
    );

    let declared = oncely(&h, &["topology", "declare", "--config", &good]).await;
    assert_eq!(declared.code, Some(0), "{}", declared.stderr);
    let after = oncely(&h, &["topology", "check", "--config", &good]).await;
    assert_eq!(after.code, Some(0), "{}{}", after.stdout, after.stderr);
    assert!(
        after.stdout.contains("all 5 queues as configured"),
        "{}",
        after.stdout
    );

    let quorum = write("quorum.toml", config("queue_type = \"quorum\""));
    let mismatch = oncely(&h, &["topology", "check", "--config", &quorum]).await;
    assert_eq!(mismatch.code, Some(4));
    assert!(
        mismatch.stdout.contains("x-queue-type"),
        "names the differing argument: {}",
        mismatch.stdout
    );
    let again = oncely(&h, &["topology", "check", "--config", &good]).await;
    assert_eq!(
        again.code,
        Some(0),
        "check changed nothing: {}",
        again.stdout
    );

    let bad = write("bad.toml", config("prefetch = 0"));
    let refused = oncely(&h, &["topology", "declare", "--config", &bad]).await;
    assert_eq!(refused.code, Some(1));
    assert!(
        refused.stderr.contains("consumers.billing.prefetch"),
        "names the key: {}",
        refused.stderr
    );

    let _ = oncely::Topology::new(&exchange, &queue)
        .retry_tiers(&[Duration::from_secs(1), Duration::from_secs(5)])
        .delete(&h.connection)
        .await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_check_reports_a_quorum_queue_declared_without_a_dead_letter_exchange() {
    use oncely::lapin::options::QueueDeclareOptions;
    use oncely::lapin::types::{AMQPValue, FieldTable};
    let h = Harness::new(&[]).await;
    let queue = format!("{}.legacy.q", h.name);
    let exchange = format!("{}.legacy", h.topology.exchange());
    // As oncely declared quorum queues before, and as RabbitMQ 4 then drops past its default
    // delivery limit of 20: no dead-letter exchange, no x-delivery-limit.
    let channel = h.connection.create_channel().await.expect("channel");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), args)
        .await
        .expect("declare the legacy queue");
    let dir = std::env::temp_dir().join(format!("{}-legacy", h.name));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("legacy.toml");
    std::fs::write(
        &path,
        format!(
            "[consumers.billing]\nqueue = \"{queue}\"\nexchange = \"{exchange}\"\nqueue_type = \"quorum\"\nretry_tiers = [\"1s\"]\nmax_attempts = 2\n"
        ),
    )
    .expect("write config");
    let path = path.to_string_lossy().into_owned();
    let check = oncely(&h, &["topology", "check", "--config", &path]).await;
    assert_eq!(check.code, Some(4), "{}{}", check.stdout, check.stderr);
    assert!(
        check.stdout.contains(&format!(
            "queue {queue} is a quorum queue declared without a dead-letter exchange"
        )) && check.stdout.contains("set_policy"),
        "says what is wrong and how to migrate: {}",
        check.stdout
    );
    let declare = oncely(&h, &["topology", "declare", "--config", &path]).await;
    assert_ne!(
        declare.code,
        Some(0),
        "a conflicting declaration is refused"
    );
    assert!(
        declare.stderr.contains(&queue),
        "names the queue: {}",
        declare.stderr
    );
    let channel = h.connection.create_channel().await.expect("channel");
    for q in [
        queue.clone(),
        format!("{queue}.retry.1s"),
        format!("{queue}.dlq"),
        format!("{queue}.parking"),
    ] {
        let _ = channel
            .queue_delete(q.as_str().into(), Default::default())
            .await;
    }
    let _ = channel
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_delivery_limit_dead_letters_a_message_that_keeps_coming_back() {
    use oncely::lapin::options::{BasicGetOptions, BasicNackOptions};
    let h = Harness::new(&[]).await;
    let topology = oncely::Topology::new(
        format!("{}.limit", h.topology.exchange()),
        format!("{}.limit", h.topology.queue()),
    )
    .bind(billing::ORDER_CREATED_V1)
    .queue_type(oncely::QueueType::Quorum)
    .delivery_limit(2);
    topology.declare(&h.connection).await.expect("declare");
    billing::publish_order(&h.publisher, topology.exchange(), &order(&h.name, 1))
        .await
        .expect("publish");
    // A consumer that dies before settling: the message goes back again and again.
    let channel = h.connection.create_channel().await.expect("channel");
    let mut deliveries = 0;
    while let Some(m) = channel
        .basic_get(topology.queue().into(), BasicGetOptions::default())
        .await
        .expect("get")
    {
        deliveries += 1;
        m.delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await
            .expect("nack");
        // The broker's backstop sits BROKER_DELIVERY_LIMIT_MARGIN above oncely's limit.
        assert!(
            deliveries <= topology.broker_delivery_limit().unwrap_or(0) + 1,
            "the broker should have stopped redelivering"
        );
    }
    wait_until(
        "dead-lettered by the broker",
        Duration::from_secs(10),
        || async { h.queue_len(&topology.dlq()).await == 1 },
    )
    .await;
    assert_eq!(
        Some(deliveries - 1),
        topology.broker_delivery_limit(),
        "delivered up to the broker's limit first"
    );
    let _ = topology.delete(&h.connection).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_run_applies_a_directory_once_without_diesel_cli() {
    let h = Harness::new(&[]).await;
    let dir = std::env::temp_dir().join(format!("{}-run-migrations", h.name));
    let dir_arg = dir.to_string_lossy().into_owned();
    let generated = oncely(&h, &["migrations", "generate", "--dir", &dir_arg]).await;
    assert_eq!(generated.code, Some(0), "{}", generated.stderr);
    // A service's own migration beside oncely's.
    let own = dir.join("2026-12-01-000001_create_payments");
    std::fs::create_dir_all(&own).expect("own migration");
    std::fs::write(
        own.join("up.sql"),
        "CREATE TABLE payments (id BIGSERIAL PRIMARY KEY);",
    )
    .expect("up.sql");
    std::fs::write(own.join("down.sql"), "DROP TABLE payments;").expect("down.sql");

    let empty = oncely::testing::TestSchema::create().await.expect("schema");
    let args = ["migrations", "run", "--dir", &dir_arg];
    let first = oncely_with_database(empty.url(), &args).await;
    assert_eq!(first.code, Some(0), "{}", first.stderr);
    assert_eq!(
        first.stdout.matches("applied ").count(),
        3,
        "{}",
        first.stdout
    );
    let second = oncely_with_database(empty.url(), &args).await;
    assert_eq!(second.code, Some(0), "{}", second.stderr);
    assert!(
        second.stdout.contains("nothing to apply"),
        "{}",
        second.stdout
    );
    // The tables are there: the inbox answers, and the service's table takes a row.
    let pool = oncely::connect_pool(empty.url(), &Default::default());
    let inbox = oncely::Inbox::new(pool);
    assert_eq!(
        inbox.count_processed("any").await.expect("message_inbox"),
        0
    );
    let _ = std::fs::remove_dir_all(&dir);
}
