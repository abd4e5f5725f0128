//! `oncely topology declare|check --config oncely.toml`.

use crate::Mismatch;
use oncely::config::{Config, ConsumerSettings};
use std::path::Path;

fn selected<'c>(
    config: &'c Config,
    consumer: Option<&str>,
) -> anyhow::Result<Vec<&'c ConsumerSettings>> {
    Ok(match consumer {
        Some(name) => vec![config.consumer(name)?],
        None => config.consumers.values().collect(),
    })
}

async fn connect(config: &Config) -> anyhow::Result<oncely::lapin::Connection> {
    let backoff = oncely::amqp::Backoff {
        max_attempts: Some(3),
        ..oncely::amqp::Backoff::default()
    };
    Ok(oncely::amqp::connect(&config.connections.amqp_url, "oncely-cli", backoff).await?)
}

pub(crate) async fn declare(path: &Path, consumer: Option<&str>) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let connection = connect(&config).await?;
    for settings in selected(&config, consumer)? {
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            settings.topology.declare(&connection),
        )
        .await
        .map_err(|_| {
            anyhow::anyhow!("{}: the broker did not answer within 30 s", settings.name)
        })??;
        println!(
            "{}: declared {} ({} queues)",
            settings.name,
            settings.topology.queue(),
            settings.topology.queues().len()
        );
    }
    crate::close(&connection).await;
    Ok(())
}

pub(crate) async fn check(path: &Path, consumer: Option<&str>) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let connection = connect(&config).await?;
    let mut problems = 0;
    for settings in selected(&config, consumer)? {
        let found = settings.topology.check(&connection).await?;
        if found.is_empty() {
            println!(
                "{}: all {} queues as configured",
                settings.name,
                settings.topology.queues().len()
            );
        }
        for problem in &found {
            println!("{}: {problem}", settings.name);
        }
        problems += found.len();
    }
    crate::close(&connection).await;
    if problems > 0 {
        return Err(Mismatch(problems).into());
    }
    Ok(())
}
