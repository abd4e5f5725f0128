//! The fault-injection suite: the drill once per fault scenario, then every fault at once, each
//! ending in the drill's invariants (no loss, no duplicate effect, DLQs holding exactly the
//! poison, queues drained). Prints a table of scenarios and writes it to `summary.md`.
//!
//!   cargo run -p drill --bin fault-suite -- --orders 2000
//!   cargo run -p drill --bin fault-suite -- --small        # 300 orders, as CI runs it

use anyhow::Context;
use clap::Parser;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(
    name = "fault-suite",
    about = "Every fault scenario of the oncely drill, with its invariants"
)]
struct Cli {
    /// Orders per scenario.
    #[arg(long, default_value_t = 2000)]
    orders: usize,
    /// The CI size: 300 orders per scenario, 4 kills.
    #[arg(long)]
    small: bool,
    /// Run only these scenarios (comma-separated names).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Directory of the drill and service binaries (default: this program's).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Where scenario outputs and summary.md go (default `target/faults/<time>`).
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

/// All the faults the drill knows.
const EVERYTHING: &str = "kill,relay-kill,audit-outage,cut,broker-restart,memory-alarm,pg-terminate,pg-restart,proxy-latency,proxy-cut,half-open,api,failpoints";

/// (name, --faults of the drill, what it breaks)
const SCENARIOS: &[(&str, &str, &str)] = &[
    (
        "consumer-kills",
        "kill",
        "consumers and relay SIGKILLed at random moments",
    ),
    (
        "relay-kills",
        "relay-kill",
        "the outbox relay SIGKILLed again and again",
    ),
    (
        "failpoints",
        "failpoints",
        "processes aborted before commit, after commit, after a DLQ copy, before a confirm, in the relay after confirm",
    ),
    (
        "broker-connections",
        "cut",
        "rabbitmqctl close_connection on every service connection",
    ),
    (
        "broker-restart",
        "broker-restart",
        "rabbitmqctl stop_app, 3 s, start_app",
    ),
    (
        "memory-alarm",
        "memory-alarm",
        "publishers blocked by a memory alarm for 5 s",
    ),
    (
        "pg-terminate",
        "pg-terminate",
        "pg_terminate_backend on every service connection, 3 times",
    ),
    ("pg-restart", "pg-restart", "PostgreSQL restarted"),
    (
        "network-latency",
        "proxy-latency",
        "30 ms on every packet to RabbitMQ and PostgreSQL",
    ),
    (
        "network-cuts",
        "proxy-cut",
        "every TCP connection to RabbitMQ and PostgreSQL cut, twice",
    ),
    (
        "half-open",
        "half-open",
        "every connection black-holed for 15 s, then cut",
    ),
    (
        "external-api",
        "api",
        "inventory API failing 2% of calls and losing 2% of responses",
    ),
    ("everything", EVERYTHING, "all of the above in one run"),
    (
        "everything-batched",
        EVERYTHING,
        "all of the above, consumers in batched mode (25 per transaction)",
    ),
    (
        "hostile-producer",
        "hostile",
        "a client that is not lapin publishes, between the orders, short strings and a header name that are not UTF-8, NUL bytes, bodies that are not orders and orders with odd header types",
    ),
];

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (orders, kills) = if cli.small { (300, 4) } else { (cli.orders, 8) };
    let bin_dir = match &cli.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this program's directory")?
            .to_owned(),
    };
    let drill = bin_dir.join("drill");
    anyhow::ensure!(
        drill.is_file(),
        "{} is missing: cargo build -p drill -p billing -p fulfillment -p audit -p order-service",
        drill.display()
    );
    let out_dir = cli.out_dir.clone().unwrap_or_else(|| {
        PathBuf::from("target/faults").join(chrono::Utc::now().format("%Y%m%d-%H%M%S").to_string())
    });
    std::fs::create_dir_all(&out_dir)?;
    let chosen: Vec<_> = SCENARIOS
        .iter()
        .filter(|(name, ..)| cli.only.is_empty() || cli.only.iter().any(|o| o == name))
        .collect();
    anyhow::ensure!(!chosen.is_empty(), "no scenario named {:?}", cli.only);
    println!(
        "fault suite: {} scenarios, {orders} orders each (plus 10% duplicate publishes and 4 poison messages); output in {}",
        chosen.len(),
        out_dir.display()
    );

    let mut table = String::new();
    let _ = writeln!(
        table,
        "| scenario | faults | orders | messages | faults injected | duplicates detected | invariants | result | seconds |"
    );
    let _ = writeln!(table, "|---|---|---|---|---|---|---|---|---|");
    let mut failed = Vec::new();
    let mut broker = None;
    for (name, faults, what) in chosen {
        let dir = out_dir.join(name);
        std::fs::create_dir_all(&dir)?;
        let started = Instant::now();
        println!("- {name}: {what} ...");
        let output = std::process::Command::new(&drill)
            .args([
                "--orders",
                &orders.to_string(),
                "--kills",
                &kills.to_string(),
            ])
            .args(["--faults", faults, "--cleanup", "--timeout-secs", "900"])
            .args([
                "--namespace",
                &format!("faults-{name}-{}", std::process::id()),
            ])
            .arg("--out-dir")
            .arg(&dir)
            .env(oncely_example_messages::EXIT_WITH_PARENT, "1")
            .output()
            .with_context(|| format!("running {}", drill.display()))?;
        std::fs::write(dir.join("drill.out"), &output.stdout)?;
        std::fs::write(dir.join("drill.err"), &output.stderr)?;
        let seconds = started.elapsed().as_secs();
        let report: Option<serde_json::Value> = std::fs::read(dir.join("report.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let row = match &report {
            Some(r) => {
                if broker.is_none() {
                    broker = r["broker"].as_str().map(str::to_owned);
                }
                let checks = r["checks"].as_array().cloned().unwrap_or_default();
                let passed = checks.iter().filter(|c| c["ok"] == true).count();
                let figure = |n: &str| {
                    r["figures"]
                        .as_array()
                        .and_then(|f| f.iter().find(|p| p[0] == n))
                        .and_then(|p| p[1].as_i64())
                        .unwrap_or(0)
                };
                let injected: Vec<String> = r["injected"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|p| format!("{} x{}", p[0].as_str().unwrap_or("?"), p[1]))
                            .collect()
                    })
                    .unwrap_or_default();
                let messages = figure("orders")
                    + figure("duplicate publishes injected")
                    + figure("poison messages injected")
                    + figure("hostile messages injected");
                let ok = output.status.success() && r["ok"] == true;
                if !ok {
                    failed.push(name.to_string());
                }
                format!(
                    "| {name} | {faults} | {} | {messages} | {} | {} | {passed}/{} | {} | {seconds} |",
                    figure("orders"),
                    if injected.is_empty() {
                        "none".into()
                    } else {
                        injected.join(", ")
                    },
                    figure("duplicates detected"),
                    checks.len(),
                    if ok { "OK" } else { "FAILED" }
                )
            }
            None => {
                failed.push(name.to_string());
                format!(
                    "| {name} | {faults} | - | - | - | - | - | DID NOT RUN ({}) | {seconds} |",
                    output.status
                )
            }
        };
        println!("  {row}");
        let _ = writeln!(table, "{row}");
    }
    let table = format!(
        "On {}.\n\n{table}",
        broker
            .as_deref()
            .unwrap_or("a broker the drill could not name")
    );
    std::fs::write(out_dir.join("summary.md"), &table)?;
    println!("\n{table}");
    if failed.is_empty() {
        println!("OK: every scenario kept every invariant");
        Ok(())
    } else {
        println!(
            "FAILED: {} (see {}/<scenario>/drill.out)",
            failed.join(", "),
            out_dir.display()
        );
        std::process::exit(1);
    }
}
