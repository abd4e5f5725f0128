//! A smaller drill, with the same faults, as part of the test suite: the drill binary drives
//! the real services (as processes) against the real RabbitMQ and PostgreSQL, and the test
//! checks its report and, independently, the business tables.

use diesel::QueryableByName;
use diesel::sql_types::BigInt;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use oncely::testing::{TestSchema, unique_name};
use std::time::Duration;

#[derive(QueryableByName, Debug, PartialEq, Eq)]
struct Tables {
    #[diesel(sql_type = BigInt)]
    orders: i64,
    #[diesel(sql_type = BigInt)]
    invoices: i64,
    #[diesel(sql_type = BigInt)]
    reservations: i64,
    #[diesel(sql_type = BigInt)]
    api_reservations: i64,
    #[diesel(sql_type = BigInt)]
    audit: i64,
    #[diesel(sql_type = BigInt)]
    orders_invoiced_twice: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_drill_under_faults_loses_nothing_and_doubles_nothing() {
    let schema = TestSchema::create().await.expect("schema");
    let namespace = unique_name("drill");
    let out = std::env::temp_dir().join(&namespace);
    let amqp_url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let mut drill = tokio::process::Command::new(env!("CARGO_BIN_EXE_drill"));
    drill
        .args([
            "--orders", "300", "--rate", "150", "--kills", "4", "--poison", "2",
        ])
        .args([
            "--namespace",
            &namespace,
            "--cleanup",
            "--timeout-secs",
            "240",
        ])
        .arg("--out-dir")
        .arg(&out)
        .env("DATABASE_URL", schema.url())
        .env("AMQP_URL", &amqp_url)
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(300), drill.output())
        .await
        .expect("the drill finishes within 5 minutes")
        .expect("run the drill");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "drill failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("OK: no loss, no duplicate effect"),
        "{stdout}"
    );

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).expect("report.json"))
            .expect("report is JSON");
    assert_eq!(report["ok"], true);
    let checks = report["checks"].as_array().expect("checks");
    assert!(checks.len() >= 14, "{checks:?}");
    for check in checks {
        assert_eq!(check["ok"], true, "{check}");
    }
    let figure = |name: &str| {
        report["figures"]
            .as_array()
            .and_then(|f| f.iter().find(|p| p[0] == name))
            .and_then(|p| p[1].as_i64())
            .unwrap_or(-1)
    };
    assert!(figure("SIGKILL") >= 1, "{report}");
    assert_eq!(figure("broker connections closed"), 1, "{report}");
    assert!(figure("duplicates detected") > 0, "{report}");

    // The tables themselves, read apart from the drill.
    let mut conn = AsyncPgConnection::establish(schema.url())
        .await
        .expect("connect");
    let tables: Tables = diesel::sql_query(
        "SELECT (SELECT count(*) FROM orders) AS orders, \
                (SELECT count(*) FROM invoices) AS invoices, \
                (SELECT count(*) FROM reservations) AS reservations, \
                (SELECT count(*) FROM inventory_api_reservations) AS api_reservations, \
                (SELECT count(*) FROM audit_events) AS audit, \
                (SELECT count(*) FROM (SELECT order_id FROM invoices GROUP BY order_id \
                   HAVING count(*) > 1) d) AS orders_invoiced_twice",
    )
    .get_result(&mut conn)
    .await
    .expect("count");
    assert_eq!(
        tables,
        Tables {
            orders: 300,
            invoices: 300,
            reservations: 300,
            api_reservations: 300,
            audit: 300,
            orders_invoiced_twice: 0,
        }
    );
    let _ = std::fs::remove_dir_all(&out);
}
