#![allow(missing_debug_implementations)]
//! Test kit for the end-to-end tests: every test gets its own PostgreSQL schema, exchange and
//! queues (unique names), talks to the real services, and cleans up after itself.

use billing::{ORDER_CREATED_V1, OrderCreated, PublishPlan, PublishSummary};
use futures_lite::future;
use oncely::amqp::ConfirmPublisher;
use oncely::lapin::options::{BasicAckOptions, BasicGetOptions};
use oncely::lapin::types::AMQPValue;
use oncely::lapin::{BasicProperties, Connection};
use oncely::testing::{TestSchema, unique_name};
use oncely::{
    AmqpError, Consumer, ConsumerBuilder, ConsumerHandle, Handler, Inbox, OutgoingMessage, Pool,
    PoolOptions, StatsSnapshot, Topology,
};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The hand-written AMQP publisher, for properties and headers lapin cannot send.
pub use oncely_raw_amqp as raw_amqp;
pub mod gate;

/// `AMQP_URL`, or the local default.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The broker URL(s) in `var` (exported by `./scripts/test`: `ONCELY_RABBITMQ4_URL`,
/// `ONCELY_CLUSTER_URLS`), for tests that need a broker the machine may not have. `None` means
/// "skip": only when the variable is absent outside CI. Under CI (`CI` set, as `.ci/run` does)
/// a missing broker fails the test instead of skipping it silently.
pub fn broker_from_env(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => {
            panic!("{var} is not set under CI: ./scripts/test starts that broker and exports it")
        }
        _ => {
            eprintln!("skipped: {var} is not set (./scripts/test starts that broker and sets it)");
            None
        }
    }
}

/// `rabbitmqctl ARGS` on `node`, one of the RabbitMQ 4 nodes `scripts/rabbitmq4.sh` runs in its
/// chroot (through `scripts/rabbitmq4ctl`); its standard output. Fails the test when the command
/// fails.
pub async fn rabbitmq4ctl(node: &str, args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/rabbitmq4ctl");
    let mut command = std::process::Command::new(script);
    command.arg(node).args(args);
    let shown = format!("rabbitmq4ctl {node} {}", args.join(" "));
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("rabbitmq4ctl task")
        .unwrap_or_else(|e| panic!("{shown}: {e}"));
    assert!(
        output.status.success(),
        "{shown}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Messages a RabbitMQ node dead-lettered to nowhere or at most once (dropped, or possibly
/// dropped), and quorum messages the broker itself dead-lettered for their delivery limit, from
/// `rabbit_global_counters`: (dropped or at most once, broker delivery-limit dead letters).
pub async fn rabbitmq4_dead_letter_counters(node: &str) -> (u64, u64) {
    const EXPR: &str = "maps:fold(fun(K, V, {Lost, Limit}) -> \
        Strategy = proplists:get_value(dead_letter_strategy, K), \
        Sum = lists:sum(maps:values(V)) - maps:get(messages_dead_lettered_confirmed_total, V, 0), \
        L = case Strategy of disabled -> Sum; at_most_once -> Sum; _ -> 0 end, \
        D = case Strategy of undefined -> 0; _ -> maps:get(messages_dead_lettered_delivery_limit_total, V, 0) end, \
        {Lost + L, Limit + D} end, {0, 0}, rabbit_global_counters:overview()).";
    let out = rabbitmq4ctl(node, &["eval", EXPR]).await;
    let numbers: Vec<u64> = out
        .trim()
        .trim_matches(|c| c == '{' || c == '}')
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    match numbers[..] {
        [lost, limit] => (lost, limit),
        _ => panic!("unexpected counters from {node}: {out}"),
    }
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A message read back from a queue.
#[derive(Debug, Clone)]
pub struct Received {
    /// Properties, headers included.
    pub properties: BasicProperties,
    /// Body.
    pub body: Vec<u8>,
}

impl Received {
    /// A header as text (long or short string), if present.
    pub fn header(&self, name: &str) -> Option<String> {
        match self.properties.headers().as_ref()?.inner().get(name)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
            AMQPValue::LongLongInt(n) => Some(n.to_string()),
            AMQPValue::LongInt(n) => Some(n.to_string()),
            other => Some(format!("{other:?}")),
        }
    }

    /// The `message_id` property.
    pub fn message_id(&self) -> Option<String> {
        self.properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
    }
}

/// One test's world: a schema with the inbox and invoices tables, an exchange and a consumer
/// queue with its retry, dead-letter and parking queues.
pub struct Harness {
    /// Unique name of this test's resources.
    pub name: String,
    /// The schema (dropped with the harness).
    pub schema: TestSchema,
    /// Pool on the schema.
    pub pool: Pool,
    /// Inbox on the pool.
    pub inbox: Inbox,
    /// Exchange and queues of this test.
    pub topology: Topology,
    /// The broker URL (or comma-separated URLs) of this test.
    pub amqp_url: String,
    /// Connection for publishing and inspecting queues.
    pub connection: Arc<Connection>,
    /// Confirmed publisher on that connection.
    pub publisher: ConfirmPublisher,
    /// More topologies of this test, deleted with it.
    more_topologies: std::sync::Mutex<Vec<Topology>>,
}

impl Harness {
    /// A harness whose queue has delay queues for `tiers`.
    pub async fn new(tiers: &[Duration]) -> Harness {
        Harness::on_broker(&amqp_url(), tiers, |t| t).await
    }

    /// A harness on the broker at `url` (one URL or a comma-separated list of cluster nodes),
    /// its topology adjusted by `topology` (queue type, delivery limit) before it is declared.
    pub async fn on_broker(
        url: &str,
        tiers: &[Duration],
        topology: impl FnOnce(Topology) -> Topology,
    ) -> Harness {
        init_tracing();
        let schema = TestSchema::create().await.expect("create test schema");
        billing::migrate(schema.url()).await.expect("migrations");
        let pool = oncely::connect_pool(schema.url(), &PoolOptions::default());
        let name = unique_name("t");
        let topology = topology(
            Topology::new(format!("oncely.test.{name}"), format!("billing.{name}.q"))
                .bind(ORDER_CREATED_V1)
                .retry_tiers(tiers),
        );
        let connection = Arc::new(
            oncely::amqp::connect(url, &format!("{name}-harness"), Default::default())
                .await
                .expect("connect to RabbitMQ"),
        );
        topology
            .declare(&connection)
            .await
            .expect("declare topology");
        let publisher = ConfirmPublisher::new(connection.clone(), Duration::from_secs(5));
        Harness {
            name,
            schema,
            inbox: Inbox::new(pool.clone()),
            pool,
            topology,
            amqp_url: url.to_owned(),
            connection,
            publisher,
            more_topologies: Default::default(),
        }
    }

    /// Deletes `topology`'s queues when the harness is dropped, as its own.
    pub fn delete_topology(&self, topology: &Topology) {
        if let Ok(mut more) = self.more_topologies.lock() {
            more.push(topology.clone());
        }
    }

    /// A harness whose schema also has the outbox and the orders table.
    pub async fn with_outbox() -> Harness {
        let h = Harness::new(&[]).await;
        order_service::migrate(h.schema.url())
            .await
            .expect("outbox migrations");
        h
    }

    /// A relay over this test's schema publishing to the broker; `options` tuned by the caller.
    pub fn relay(
        &self,
        amqp_url: &str,
        options: oncely::outbox::RelayOptions,
    ) -> oncely::outbox::Relay {
        let publisher = Arc::new(oncely::Publisher::new(
            amqp_url,
            format!("{}-relay", self.name),
            oncely::PublisherOptions {
                confirm_timeout: Duration::from_secs(2),
                ..oncely::PublisherOptions::default()
            },
        ));
        oncely::outbox::Relay::new(self.schema.url(), publisher, options)
    }

    /// Outbox rows (published, unpublished).
    pub async fn outbox_counts(&self) -> (i64, i64) {
        use diesel_async::RunQueryDsl;
        #[derive(diesel::QueryableByName)]
        struct Counts {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            published: i64,
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            unpublished: i64,
        }
        let mut conn = self.pool.get().await.expect("connection");
        let c: Counts = diesel::sql_query(
            "SELECT count(*) FILTER (WHERE published_at IS NOT NULL) AS published, \
                    count(*) FILTER (WHERE published_at IS NULL) AS unpublished FROM outbox_message",
        )
        .get_result(&mut conn)
        .await
        .expect("outbox counts");
        (c.published, c.unpublished)
    }

    /// Connection name of this test's consumers, for [`Harness::close_consumer_connections`].
    pub fn consumer_connection_name(&self) -> String {
        format!("{}-consumer", self.name)
    }

    /// A consumer builder wired to this test's inbox, broker and topology.
    pub fn consumer<H: Handler>(&self, handler: H) -> ConsumerBuilder<H> {
        Consumer::builder(handler, self.inbox.clone())
            .amqp_url(self.amqp_url.clone())
            .topology(self.topology.clone())
            .connection_name(self.consumer_connection_name())
    }

    /// Runs `handler` in the background with this test's default consumer settings.
    pub fn run<H: Handler>(&self, handler: H) -> Running {
        self.start(
            self.consumer(handler)
                .build()
                .expect("valid consumer settings"),
        )
    }

    /// The inbox row of `message_id` for `consumer`; fails the test when there is none.
    pub async fn inbox_row(&self, consumer: &str, message_id: &str) -> oncely::inbox::InboxRow {
        self.inbox
            .find(consumer, message_id)
            .await
            .expect("find")
            .unwrap_or_else(|| panic!("no inbox row for {consumer}/{message_id}"))
    }

    /// Publishes poison message `n` of `kind` to this test's exchange, and waits for it in the
    /// dead-letter queue.
    pub async fn dead_letter_poison(&self, kind: billing::PoisonKind) -> Vec<Received> {
        billing::publish_poison(
            &self.publisher,
            self.topology.exchange(),
            &self.name,
            0,
            kind,
        )
        .await
        .expect("publish");
        self.expect_in_queue(&self.topology.dlq(), 1).await
    }

    /// Runs `consumer` in the background.
    pub fn start(&self, consumer: Consumer) -> Running {
        Running {
            handle: consumer.spawn(),
        }
    }

    /// Publishes `orders` orders of this test, plus `duplicate_rate` of repeats, with confirms.
    pub async fn publish_orders(
        &self,
        orders: usize,
        duplicate_rate: f64,
        seed: u64,
    ) -> PublishSummary {
        let plan = PublishPlan {
            prefix: self.name.clone(),
            orders,
            duplicate_rate,
            poison: 0,
            seed,
        };
        billing::publish_orders(&self.publisher, self.topology.exchange(), &plan)
            .await
            .expect("publish orders")
    }

    /// Publishes an order with its stable message id.
    pub async fn publish_order(&self, order: &OrderCreated) {
        billing::publish_order(&self.publisher, self.topology.exchange(), order)
            .await
            .expect("publish order");
    }

    /// Publishes any body with any properties to the test exchange.
    pub async fn publish_raw(&self, body: &[u8], properties: BasicProperties) {
        self.publisher
            .publish(OutgoingMessage {
                exchange: self.topology.exchange(),
                routing_key: ORDER_CREATED_V1,
                body,
                properties,
            })
            .await
            .expect("publish");
    }

    /// Publishes to the test exchange with `routing_key` through the hand-written client, for
    /// properties and headers lapin cannot send (bytes that are not UTF-8, odd value types).
    pub async fn publish_hostile(
        &self,
        routing_key: &[u8],
        properties: &raw_amqp::RawProperties,
        body: &[u8],
    ) {
        let mut raw = raw_amqp::RawPublisher::connect(&amqp_url())
            .await
            .expect("raw AMQP connection");
        raw.publish(
            self.topology.exchange().as_bytes(),
            routing_key,
            properties,
            body,
        )
        .await
        .expect("raw publish confirmed");
        raw.close().await.expect("raw close");
    }

    /// Invoices in this test's schema.
    pub async fn invoices(&self) -> i64 {
        counted("invoices", || async {
            let mut conn = self.pool.get().await.map_err(|e| e.to_string())?;
            billing::count_invoices(&mut conn, "")
                .await
                .map_err(|e| e.to_string())
        })
        .await
    }

    /// Order ids of the invoices, in the order they were created.
    pub async fn invoice_order(&self) -> Vec<String> {
        use diesel::prelude::*;
        use diesel_async::RunQueryDsl;
        let mut conn = self.pool.get().await.expect("connection");
        billing::invoices::table
            .order(billing::invoices::invoice_id)
            .select(billing::invoices::order_id)
            .load(&mut conn)
            .await
            .expect("invoices")
    }

    /// Messages the inbox holds as processed for the billing consumer.
    pub async fn processed(&self) -> i64 {
        counted("processed messages", || async {
            self.inbox
                .count_processed("billing")
                .await
                .map_err(|e| e.to_string())
        })
        .await
    }

    /// Messages ready in `queue`.
    pub async fn queue_len(&self, queue: &str) -> u32 {
        self.queue_counts(queue).await.0
    }

    /// Waits until the broker reports a consumer on this test's queue.
    pub async fn wait_for_consumer(&self) {
        wait_until(
            "a consumer on the queue",
            Duration::from_secs(20),
            || async { self.queue_counts(self.topology.queue()).await.1 >= 1 },
        )
        .await;
    }

    /// (messages ready, consumers) of `queue`.
    pub async fn queue_counts(&self, queue: &str) -> (u32, u32) {
        let depth = oncely::amqp::queue_depth(&self.connection, queue)
            .await
            .expect("queue exists");
        (depth.messages, depth.consumers)
    }

    /// Takes every message out of `queue`.
    pub async fn drain(&self, queue: &str) -> Vec<Received> {
        let channel = self.connection.create_channel().await.expect("channel");
        let mut out = Vec::new();
        while let Some(m) = channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .expect("basic.get")
        {
            let delivery = m.delivery;
            delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .expect("ack");
            out.push(Received {
                properties: delivery.properties.clone(),
                body: delivery.data.clone(),
            });
        }
        oncely::amqp::close_channel(&channel, 200, "done").await;
        out
    }

    /// Waits until `queue` holds `count` messages, then takes them.
    pub async fn expect_in_queue(&self, queue: &str, count: u32) -> Vec<Received> {
        wait_until(
            &format!("{count} messages in {queue}"),
            Duration::from_secs(20),
            || async { self.queue_len(queue).await >= count },
        )
        .await;
        let got = self.drain(queue).await;
        assert_eq!(got.len() as u32, count, "messages in {queue}");
        got
    }

    /// Terminates every PostgreSQL backend of this test's pool (as a database restart or a
    /// failover would). Returns how many were terminated.
    pub async fn terminate_database_connections(&self) -> i64 {
        self.count_backends("count(pg_terminate_backend(pid))", "true")
            .await
    }

    /// Backends of this test still running `pg_sleep`.
    pub async fn sleeping_backends(&self) -> i64 {
        self.count_backends(
            "count(*)",
            "query LIKE 'SELECT pg_sleep%' AND state = 'active'",
        )
        .await
    }

    /// `SELECT <aggregate> FROM pg_stat_activity` over this test's backends (the schema name is
    /// also their application name), from an admin connection outside the test's pool.
    async fn count_backends(&self, aggregate: &str, condition: &str) -> i64 {
        use diesel_async::{AsyncConnection, RunQueryDsl};
        let mut admin =
            diesel_async::AsyncPgConnection::establish(&oncely::testing::database_url())
                .await
                .expect("admin connection");
        let sql = format!(
            "(SELECT {aggregate} FROM pg_stat_activity WHERE application_name = '{}' AND {condition})",
            self.schema.name()
        );
        diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(&sql))
            .get_result::<i64>(&mut admin)
            .await
            .expect("query pg_stat_activity")
    }

    /// Closes, from the broker's side, every connection of this test's consumers (as
    /// `rabbitmqctl close_connection` would in production). Returns how many were closed.
    pub async fn close_consumer_connections(&self) -> usize {
        let name = self.consumer_connection_name();
        tokio::task::spawn_blocking(move || close_connections_named(&name))
            .await
            .expect("rabbitmqctl task")
    }
}

fn close_connections_named(name: &str) -> usize {
    oncely_example_messages::close_connections_where(
        |n| n == name,
        "oncely test: broker closed the connection",
    )
    .expect("rabbitmqctl close_connection")
}

impl Drop for Harness {
    fn drop(&mut self) {
        let more = self
            .more_topologies
            .lock()
            .map(|more| more.clone())
            .unwrap_or_default();
        let topologies: Vec<_> = std::iter::once(self.topology.clone()).chain(more).collect();
        let url = self.amqp_url.clone();
        oncely::testing::block_on_thread(async move {
            // Any node of a cluster will do (the one the test used may be down).
            let once = oncely::amqp::Backoff {
                max_attempts: Some(1),
                ..oncely::amqp::Backoff::default()
            };
            let Ok(conn) = oncely::amqp::connect(&url, "cleanup", once).await else {
                return;
            };
            // Topologies of one harness may share the exchange: a second deletion is a no-op.
            for t in &topologies {
                let _ = t.delete(&conn).await;
            }
            oncely::amqp::close_connection(&conn, 200, "cleanup").await;
        });
    }
}

/// A consumer running in the background, with polling helpers.
pub struct Running {
    handle: ConsumerHandle,
}

impl Running {
    /// Its counters now.
    pub fn stats(&self) -> StatsSnapshot {
        self.handle.stats()
    }

    /// Waits until the counters satisfy `condition`.
    pub async fn wait_for_stats(&self, what: &str, condition: impl Fn(&StatsSnapshot) -> bool) {
        wait_until(what, Duration::from_secs(30), || {
            let ok = condition(&self.stats());
            async move { ok }
        })
        .await;
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn stop(self) -> Result<(), AmqpError> {
        self.handle.shutdown().await
    }
}

/// Polls `condition` every 25 ms until it holds; fails the test after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Runs `f` and returns its value, failing the test if it takes longer than `timeout`.
pub async fn within<T>(what: &str, timeout: Duration, f: impl Future<Output = T>) -> T {
    let timed = async {
        tokio::time::sleep(timeout).await;
        None
    };
    future::or(async { Some(f.await) }, timed)
        .await
        .unwrap_or_else(|| panic!("{what} took longer than {timeout:?}"))
}

/// GET `path` from `addr` over plain HTTP/1.0: (status code, body). For the `/metrics` and
/// `/health/*` endpoints.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .expect("send request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read response");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of the Prometheus series `name` whose labels include all of `labels`, summed over
/// the matching series; 0 when there is none.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, number) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
            (series_name == name
                && labels
                    .iter()
                    .all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\""))))
            .then(|| number.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

/// A count, tried again for up to 15 s: tests kill the pool's connections on purpose, and a
/// pool hands out each dead connection once before it opens new ones.
async fn counted<F, Fut>(what: &str, mut count: F) -> i64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<i64, String>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        match count().await {
            Ok(n) => return n,
            Err(e) if std::time::Instant::now() >= deadline => panic!("cannot count {what}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
