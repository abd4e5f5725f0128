//! Passwords in connection strings never reach `Debug` output (logs, panics, `dbg!`).
//!
//! No services: the pool connects lazily and nothing is consumed.

use oncely::config::Config;
use oncely::{AsyncPgConnection, Consumer, Envelope, HandlerError, Inbox, PoolOptions};

const AMQP_SECRET: &str = "amqp-pw-7f3a";
const PG_SECRET: &str = "pg-pw-91c2";

#[derive(Debug, serde::Deserialize)]
struct Ping {}

#[oncely::handler(consumer = "secrets")]
async fn ping(_conn: &mut AsyncPgConnection, _msg: Envelope<Ping>) -> Result<(), HandlerError> {
    Ok(())
}

#[tokio::test]
async fn debug_of_a_consumer_shows_its_amqp_url_without_the_password() {
    let pool = oncely::connect_pool(
        &format!("postgres://app:{PG_SECRET}@127.0.0.1:5432/oncely"),
        &PoolOptions::default(),
    );
    let consumer = Consumer::builder(ping, Inbox::new(pool))
        .amqp_url(format!(
            "amqps://app:{AMQP_SECRET}@rabbit.example:5671/prod"
        ))
        .build()
        .expect("valid consumer settings");
    let shown = format!("{consumer:?}");
    assert!(!shown.contains(AMQP_SECRET), "{shown}");
    assert!(!shown.contains(PG_SECRET), "{shown}");
    assert!(
        shown.contains("amqps://***@rabbit.example:5671/prod"),
        "{shown}"
    );
}

#[test]
fn debug_of_a_config_shows_its_urls_without_the_passwords() {
    let text = format!(
        "[connections]\namqp_url = \"amqp://app:{AMQP_SECRET}@rabbit:5672/%2f\"\n\
         database_url = \"host=db user=app password='{PG_SECRET}' dbname=orders\"\n"
    );
    let config = Config::parse("oncely.toml", &text, |_| None).expect("valid configuration");
    let shown = format!("{config:?}");
    assert!(!shown.contains(AMQP_SECRET), "{shown}");
    assert!(!shown.contains(PG_SECRET), "{shown}");
    assert!(shown.contains("amqp://***@rabbit:5672/%2f"), "{shown}");
    assert!(shown.contains("password=***"), "{shown}");
    // The values themselves are untouched: only their display is redacted.
    assert!(config.connections.amqp_url.contains(AMQP_SECRET));
}
