//! The `billing` binary stops cleanly on SIGTERM: in-flight work finished, exit code 0.

use billing::order;
use oncely_e2e::{Harness, wait_until};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_billing_consumer_with_exit_code_0() {
    let h = Harness::new(&[]).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_billing"))
        .env("DATABASE_URL", h.schema.url())
        .env("AMQP_URL", oncely_e2e::amqp_url())
        .env("RUST_LOG", "info")
        .args([
            "run",
            "--exchange",
            h.topology.exchange(),
            "--queue",
            h.topology.queue(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start billing");
    let stdout = child.stdout.take().expect("stdout");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut output = Vec::new();
    let wait_for_line = |needle: &str, output: &mut Vec<String>| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(line) = lines_rx.recv_timeout(Duration::from_millis(100)) {
                let found = line.contains(needle);
                output.push(line);
                if found {
                    return true;
                }
            }
        }
        false
    };
    assert!(
        wait_for_line("consuming", &mut output),
        "billing never started consuming: {output:#?}"
    );

    for n in 0..3 {
        h.publish_order(&order(&h.name, n)).await;
    }
    wait_until("3 invoices", Duration::from_secs(20), || async {
        h.invoices().await == 3
    })
    .await;

    let pid = child.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "billing did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        wait_for_line("stopped", &mut output),
        "no clean stop logged: {output:#?}"
    );
    assert_eq!(status.code(), Some(0), "{output:#?}");
    assert_eq!(
        h.queue_counts(h.topology.queue()).await,
        (0, 0),
        "all acked, consumer gone"
    );
}
