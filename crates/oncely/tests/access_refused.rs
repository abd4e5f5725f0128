//! A wrong AMQP password: the service's default logging says so once per attempt, naming
//! `ACCESS_REFUSED` and what to check, without lapin's own lines around it.
//!
//! The test runs itself as a child process (the service installs a global subscriber writing
//! to stderr) and reads what the child printed.

use oncely::prelude::*;
use std::process::Command;
use std::time::Duration;

#[derive(Debug, serde::Deserialize)]
struct Ping {}

#[oncely::handler(consumer = "access-refused")]
async fn ping(_conn: &mut AsyncPgConnection, _msg: Envelope<Ping>) -> Result<(), HandlerError> {
    Ok(())
}

const CHILD: &str = "ONCELY_ACCESS_REFUSED_CHILD";

#[tokio::test]
async fn a_wrong_password_is_one_clear_line_per_attempt() {
    if std::env::var_os(CHILD).is_some() {
        return run_service_with_a_wrong_password().await;
    }
    let output = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "a_wrong_password_is_one_clear_line_per_attempt",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .output()
        .expect("run the child");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    assert!(
        lines.len() >= 2,
        "several attempts in 3 s, each logged: {stderr}"
    );
    for line in &lines {
        assert!(
            line.contains("ACCESS_REFUSED") && line.contains("check the user name and password"),
            "every line names the cause and what to check: {line}"
        );
        assert!(!line.contains("lapin"), "no lapin line: {line}");
        assert!(
            !line.contains("wrong-secret"),
            "the password never logged: {line}"
        );
    }
}

async fn run_service_with_a_wrong_password() {
    let pool = oncely::connect_pool(
        "postgres://postgres@127.0.0.1:5432/oncely",
        &oncely::PoolOptions::default(),
    );
    let consumer = Consumer::builder(ping, Inbox::new(pool))
        .amqp_url("amqp://guest:wrong-secret@127.0.0.1:5672/%2f")
        .topology(Topology::new("access-refused", "access-refused.q"))
        .build()
        .expect("build");
    let _ = oncely::Service::new("access-refused")
        .consumer(consumer)
        .run_until(tokio::time::sleep(Duration::from_secs(3)))
        .await;
}
