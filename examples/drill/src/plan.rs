//! What a run starts and with which settings: its names and faults, fixed from the command line
//! before anything starts, then the database, the queues, the proxies and the services started
//! from them.

use crate::broker::Broker;
use crate::faults::{self, FaultKind};
use crate::fleet::{Fleet, Role};
use crate::hostile::{self, Hostile};
use crate::proxy::{self, Proxy};
use crate::{Cli, note};
use anyhow::Context;
use oncely::{PoolOptions, Publisher, PublisherOptions, RetryPolicy, Topology};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Names of one run's exchange and queues.
#[derive(Debug, Clone)]
pub struct Names {
    /// The exchange every event goes to.
    pub exchange: String,
    billing: Topology,
    fulfillment: Topology,
    audit: Topology,
}

impl Names {
    fn new(namespace: &str, services: &oncely_example_messages::Services) -> Names {
        let n = |base: &str| {
            if namespace.is_empty() {
                base.to_owned()
            } else {
                format!("{base}.{namespace}")
            }
        };
        let exchange = n(oncely_example_messages::ORDER_EVENTS_EXCHANGE);
        Names {
            billing: services.queues(billing_topology(&exchange, &n(billing::QUEUE))),
            fulfillment: services.queues(
                fulfillment::topology(&exchange, &n(fulfillment::QUEUE))
                    .retry_tiers(fulfillment::retry_policy().tiers()),
            ),
            audit: audit::topology(&exchange, &n(audit::QUEUE))
                .retry_tiers(RetryPolicy::default().tiers()),
            exchange,
        }
    }

    /// The consumers' topologies: billing, fulfillment, audit.
    pub fn all(&self) -> [&Topology; 3] {
        [&self.billing, &self.fulfillment, &self.audit]
    }
}

fn billing_topology(exchange: &str, queue: &str) -> Topology {
    Topology::new(exchange, queue)
        .bind(billing::ORDER_CREATED_V1)
        .retry_tiers(RetryPolicy::default().tiers())
}

/// What one run does, fixed before anything starts.
#[derive(Debug)]
pub struct Plan {
    /// The drill's command line.
    pub cli: Cli,
    /// When the run started.
    pub started: Instant,
    /// Run id (its start time).
    pub run: String,
    /// Prefix of the run's order ids: `ord-<run>-<pid>`.
    pub prefix: String,
    /// Seed of the random choices.
    pub seed: u64,
    /// The run's exchange and queues.
    pub names: Names,
    /// Prefix of the broker connection names of the drill and its services.
    pub connection_prefix: String,
    /// Where logs, counters.csv and report.json go.
    pub out_dir: PathBuf,
    /// The fault kinds asked for, sorted, once each.
    pub kinds: Vec<FaultKind>,
    /// The hostile producer's messages (none without the hostile fault).
    pub hostile: Vec<Hostile>,
    /// The broker's version, as `rabbitmqctl` tells it.
    pub broker_version: String,
}

impl Plan {
    /// The plan of a run of `cli`; creates its output directory.
    pub fn new(cli: Cli) -> anyhow::Result<Plan> {
        let started = Instant::now();
        let run = format!("{}", chrono::Utc::now().format("%Y%m%d-%H%M%S"));
        let prefix = format!("ord-{run}-{}", std::process::id());
        let out_dir = cli
            .out_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("target/drill").join(&run));
        std::fs::create_dir_all(&out_dir)?;
        let mut kinds = if cli.no_faults {
            Vec::new()
        } else {
            cli.faults.clone()
        };
        kinds.sort();
        kinds.dedup();
        let hostile = if kinds.contains(&FaultKind::Hostile) {
            hostile::messages(&prefix)
        } else {
            Vec::new()
        };
        Ok(Plan {
            started,
            seed: cli.seed.unwrap_or_else(rand::random),
            names: Names::new(&cli.namespace, &cli.services),
            connection_prefix: format!("drill-{}-", std::process::id()),
            run,
            prefix,
            out_dir,
            kinds,
            hostile,
            broker_version: String::new(),
            cli,
        })
    }

    /// Says on the console what the run will do, and on which broker.
    pub fn announce(&mut self) {
        let cli = &self.cli;
        println!(
            "drill {}: {} orders ({}-*){}, faults [{}], duplicate rate {}, {} poison, seed {}",
            self.run,
            cli.orders,
            self.prefix,
            if cli.services.batch > 0 {
                format!(", consumers in batches of {}", cli.services.batch)
            } else {
                String::new()
            },
            self.kind_names().join(", "),
            cli.duplicate_rate,
            cli.poison,
            self.seed
        );
        self.broker_version = oncely_example_messages::broker_version().unwrap_or_else(|e| {
            note(false, &format!("the broker's version is unknown: {e}"));
            "unknown".to_owned()
        });
        println!(
            "RabbitMQ {}, {} queues for billing and fulfillment, quorum for audit",
            self.broker_version, self.cli.services.queue_type
        );
        println!(
            "logs, counters.csv and report.json in {}",
            self.out_dir.display()
        );
    }

    /// Whether faults of `kind` are injected.
    pub fn has(&self, kind: FaultKind) -> bool {
        self.kinds.contains(&kind)
    }

    /// The fault kinds, as on the command line.
    pub fn kind_names(&self) -> Vec<String> {
        self.kinds.iter().map(|k| k.name()).collect()
    }

    /// Orders placed through the outbox.
    pub fn orders(&self) -> i64 {
        self.cli.orders as i64
    }

    /// Valid orders sent by the hostile producer: invoiced, reserved and audited like the others.
    pub fn hostile_orders(&self) -> i64 {
        hostile::orders(&self.hostile) as i64
    }

    /// Orders every consumer must process once: the placed ones and the hostile producer's.
    pub fn expected(&self) -> i64 {
        self.orders() + self.hostile_orders()
    }

    /// The pattern of the run's order ids, for `LIKE`.
    pub fn order_ids(&self) -> String {
        format!("{}-", self.prefix)
    }

    /// Environment of every service: where RabbitMQ and PostgreSQL are, and the settings of
    /// `oncely_example_messages::Services` through the variables its flags read.
    fn service_env(&self, amqp_url: &str, database_url: &str) -> Vec<(String, String)> {
        let services = &self.cli.services;
        let mut env: Vec<(String, String)> = Vec::new();
        if self.has(FaultKind::Failpoints) {
            env.push(("FAILPOINTS".into(), faults::FAILPOINTS.into()));
        }
        env.extend([
            ("AMQP_URL".into(), amqp_url.to_owned()),
            ("DATABASE_URL".into(), database_url.to_owned()),
            ("ONCELY_STATS_EVERY_MS".into(), "250".into()),
            // A drill stopped by a signal takes its services with it.
            (oncely_example_messages::EXIT_WITH_PARENT.into(), "1".into()),
            // --batch of the drill runs the consumers in batched mode.
            ("ONCELY_BATCH".into(), services.batch.to_string()),
            ("ONCELY_QUEUE_TYPE".into(), services.queue_type.clone()),
            (
                "ONCELY_BATCH_WAIT_MS".into(),
                services.batch_wait_ms.to_string(),
            ),
        ]);
        env
    }

    /// The command line of `role` after its binary, for the settings whose flags have no
    /// environment variable.
    fn args(&self, role: Role) -> Vec<String> {
        let names = &self.names;
        let queue = |i: usize| Some(names.all()[i].queue());
        let to = |exchange: &str, queue: Option<&str>| {
            let mut args = vec!["--exchange".to_owned(), exchange.to_owned()];
            if let Some(queue) = queue {
                args.extend(["--queue".to_owned(), queue.to_owned()]);
            }
            args.extend([
                "--connection-name".to_owned(),
                format!("{}{}", self.connection_prefix, role.name()),
            ]);
            args
        };
        let (fail_rate, lose_rate) = if self.has(FaultKind::Api) {
            (self.cli.api_fail_rate, self.cli.api_lose_rate)
        } else {
            (0.0, 0.0)
        };
        let run = || vec!["run".to_owned()];
        match role {
            Role::InventoryApi => [
                "inventory-api",
                "--addr",
                "127.0.0.1:0",
                "--fail-rate",
                &fail_rate.to_string(),
                "--lose-rate",
                &lose_rate.to_string(),
                "--lose-delay-ms",
                "2500",
            ]
            .map(str::to_owned)
            .to_vec(),
            Role::Relay => [to(&names.exchange, None), vec!["relay".to_owned()]].concat(),
            Role::Billing => [run(), to(&names.exchange, queue(0))].concat(),
            Role::Fulfillment => [run(), to(&names.exchange, queue(1))].concat(),
            Role::Audit => [to(&names.exchange, queue(2)), run()].concat(),
        }
    }
}

/// What the drill started for a run, and its own connections.
pub struct Setup {
    /// The drill's own database pool.
    pub pool: oncely::Pool,
    /// The drill's own view of the broker.
    pub broker: Broker,
    /// The drill's publisher of duplicates and poison.
    pub publisher: Arc<Publisher>,
    /// The fault proxies the services go through (none without a network fault).
    pub proxies: Vec<Proxy>,
    /// The services.
    pub fleet: Arc<Fleet>,
    /// The application name of the services' PostgreSQL connections.
    pub app_name: String,
    /// The inventory API's base URL.
    pub inventory_url: String,
    /// DLQ depths before the run, in [`Names::all`] order: this run's poison comes on top.
    pub dlq_before: Vec<u32>,
}

impl Setup {
    /// Migrates the database, declares every queue, starts the proxies `plan` needs and the
    /// services.
    pub async fn start(plan: &Plan) -> anyhow::Result<Setup> {
        let database_url = &plan.cli.services.database_url;
        let amqp_url = &plan.cli.services.amqp_url;
        // Migrations once, before any service starts (they would race each other otherwise).
        billing::migrate(database_url).await?;
        fulfillment::migrate(database_url).await?;
        fulfillment::migrate_inventory_api(database_url).await?;
        audit::migrate(database_url).await?;
        order_service::migrate(database_url).await?;
        let pool = oncely::connect_pool(database_url, &PoolOptions::default());

        // Every queue bound before the first event exists, so none is routed to only some of
        // them.
        let broker = Broker::new(amqp_url, &format!("{}observer", plan.connection_prefix));
        {
            let connection = broker.connection().await?;
            for topology in plan.names.all() {
                topology.declare(&connection).await?;
            }
        }
        let dlq_before = broker
            .queue_state(&plan.names)
            .await
            .map(|q| q.per_queue)
            .unwrap_or_default();
        let publisher = Arc::new(Publisher::new(
            amqp_url,
            format!("{}publisher", plan.connection_prefix),
            PublisherOptions::default(),
        ));

        // An application name that lets the drill find the services' PostgreSQL backends.
        let app_name = proxy::param(database_url, "application_name")
            .unwrap_or_else(|| format!("drill-{}", std::process::id()));
        let (service_amqp_url, service_db_url, proxies) = start_proxies(plan, &app_name).await?;
        let env = plan.service_env(&service_amqp_url, &service_db_url);
        let (fleet, inventory_url) = start_fleet(plan, env).await?;
        Ok(Setup {
            pool,
            broker,
            publisher,
            proxies,
            fleet,
            app_name,
            inventory_url,
            dlq_before,
        })
    }
}

/// The services' own AMQP and database URLs: through proxies when a network fault is asked
/// for, with `app_name` as the database connections' application name. Returns the proxies too.
async fn start_proxies(
    plan: &Plan,
    app_name: &str,
) -> anyhow::Result<(String, String, Vec<Proxy>)> {
    let amqp_url = &plan.cli.services.amqp_url;
    let database_url = &plan.cli.services.database_url;
    let service_db_url = proxy::with_param(database_url, "application_name", app_name);
    if !plan.kinds.iter().any(|k| k.needs_proxy()) {
        return Ok((amqp_url.clone(), service_db_url, Vec::new()));
    }
    let amqp_proxy =
        Proxy::start(&proxy::authority(amqp_url, 5672).context("the host of AMQP_URL")?).await?;
    let pg_proxy =
        Proxy::start(&proxy::authority(database_url, 5432).context("the host of DATABASE_URL")?)
            .await?;
    // Heartbeats every 5 s: the only way a black-holed AMQP connection is noticed.
    let service_amqp_url = proxy::with_param(
        &proxy::via(amqp_url, amqp_proxy.addr()).context("AMQP_URL")?,
        "heartbeat",
        "5",
    );
    let service_db_url = proxy::via(&service_db_url, pg_proxy.addr()).context("DATABASE_URL")?;
    println!(
        "services reach RabbitMQ through {} and PostgreSQL through {}",
        amqp_proxy.addr(),
        pg_proxy.addr()
    );
    Ok((service_amqp_url, service_db_url, vec![amqp_proxy, pg_proxy]))
}

/// Starts the inventory API, then the relay and the consumers, every one with `env`. Returns
/// the fleet and the inventory API's base URL.
async fn start_fleet(
    plan: &Plan,
    env: Vec<(String, String)>,
) -> anyhow::Result<(Arc<Fleet>, String)> {
    let bin_dir = match &plan.cli.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the drill's directory")?
            .to_owned(),
    };
    let mut fleet = Fleet::new(&bin_dir, &plan.out_dir, env)?;
    for role in [
        Role::InventoryApi,
        Role::Relay,
        Role::Billing,
        Role::Fulfillment,
        Role::Audit,
    ] {
        fleet.set_args(role, plan.args(role));
    }
    // The inventory API stands for an outside service: straight to PostgreSQL, past the
    // proxies and the backends the faults terminate.
    fleet.set_env(
        Role::InventoryApi,
        vec![(
            "DATABASE_URL".into(),
            plan.cli.services.database_url.clone(),
        )],
    );
    let first = fleet
        .start(Role::InventoryApi, true)
        .await?
        .unwrap_or_default();
    let inventory_url = first
        .rsplit(' ')
        .next()
        .filter(|u| u.starts_with("http://"))
        .with_context(|| format!("inventory API said {first:?}"))?
        .to_owned();
    fleet.set_env(
        Role::Fulfillment,
        vec![("INVENTORY_URL".into(), inventory_url.clone())],
    );
    let fleet = Arc::new(fleet);
    for role in [Role::Relay, Role::Billing, Role::Fulfillment, Role::Audit] {
        fleet.start(role, false).await?;
    }
    Ok((fleet, inventory_url))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn plan(args: &[&str]) -> Plan {
        let out = std::env::temp_dir().join(format!("drill-plan-{}", std::process::id()));
        let cli = Cli::parse_from(
            [
                "drill",
                "--out-dir",
                out.to_str().unwrap_or("."),
                "--namespace",
                "t",
            ]
            .iter()
            .chain(args),
        );
        let plan = Plan::new(cli).expect("a plan");
        let _ = std::fs::remove_dir_all(&out);
        plan
    }

    fn args(plan: &Plan, role: Role) -> String {
        plan.args(role).join(" ")
    }

    #[test]
    fn services_get_the_run_s_names_on_their_command_lines() {
        let plan = plan(&[]);
        let c = &plan.connection_prefix;
        assert_eq!(
            args(&plan, Role::Relay),
            format!("--exchange order.events.t --connection-name {c}relay relay")
        );
        assert_eq!(
            args(&plan, Role::Billing),
            format!(
                "run --exchange order.events.t --queue billing.order-events.q.t \
                 --connection-name {c}billing"
            )
        );
        assert_eq!(
            args(&plan, Role::Fulfillment),
            format!(
                "run --exchange order.events.t --queue fulfillment.order-events.q.t \
                 --connection-name {c}fulfillment"
            )
        );
        assert_eq!(
            args(&plan, Role::Audit),
            format!(
                "--exchange order.events.t --queue audit.order-events.q.t \
                 --connection-name {c}audit run"
            )
        );
    }

    #[test]
    fn the_inventory_api_fails_and_loses_only_with_the_api_fault() {
        assert_eq!(
            args(&plan(&[]), Role::InventoryApi),
            "inventory-api --addr 127.0.0.1:0 --fail-rate 0.02 --lose-rate 0.02 --lose-delay-ms 2500"
        );
        assert_eq!(
            args(&plan(&["--faults", "kill"]), Role::InventoryApi),
            "inventory-api --addr 127.0.0.1:0 --fail-rate 0 --lose-rate 0 --lose-delay-ms 2500"
        );
    }

    #[test]
    fn settings_of_the_services_go_through_their_environment_variables() {
        let plan = plan(&["--faults", "failpoints", "--batch", "10"]);
        let env: std::collections::HashMap<_, _> = plan
            .service_env("amqp://proxy", "postgres://proxy")
            .into_iter()
            .collect();
        assert_eq!(env["AMQP_URL"], "amqp://proxy");
        assert_eq!(env["DATABASE_URL"], "postgres://proxy");
        assert_eq!(env["ONCELY_BATCH"], "10");
        assert_eq!(env["ONCELY_STATS_EVERY_MS"], "250");
        assert_eq!(env["FAILPOINTS"], faults::FAILPOINTS);
    }
}
