//! The orders the drill places through the outbox, with the duplicate and poison publishes
//! mixed in.

use oncely::{OutgoingMessage, Publisher};
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Places `orders` orders through the outbox at `rate` per second; publishes a duplicate of an
/// earlier order's event with probability `duplicate_rate` after each, and `poison` bad
/// messages spread over the run. Rides out database and broker faults by retrying.
#[allow(clippy::too_many_arguments)]
pub async fn produce(
    pool: oncely::Pool,
    publisher: Arc<Publisher>,
    prefix: String,
    exchange: String,
    orders: usize,
    rate: u32,
    duplicate_rate: f64,
    poison: usize,
    seed: u64,
    duplicates_sent: Arc<AtomicUsize>,
) -> anyhow::Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    let every = (orders / poison.max(1)).max(1);
    for n in 0..orders {
        tick.tick().await;
        let order = order_service::order(&prefix, n);
        retrying("placing an order", || async {
            let mut conn = pool.get().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            match order_service::create_order(&mut conn, &order, &exchange).await {
                Ok(()) => Ok(()),
                // Committed by an attempt whose answer was lost.
                Err(diesel::result::Error::DatabaseError(
                    diesel::result::DatabaseErrorKind::UniqueViolation,
                    _,
                )) => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
        .await?;
        if rng.random_bool(duplicate_rate.clamp(0.0, 1.0)) {
            let earlier = order_service::order(&prefix, rng.random_range(0..=n));
            let (body, properties) = billing::order_message(&earlier);
            publish(&publisher, &exchange, &body, properties).await?;
            duplicates_sent.fetch_add(1, Ordering::Relaxed);
        }
        if poison > 0 && n % every == 0 && n / every < poison {
            let i = n / every;
            let kind = if i.is_multiple_of(2) {
                billing::PoisonKind::InvalidJson
            } else {
                billing::PoisonKind::MissingMessageId
            };
            let (body, properties) = billing::poison_message(&prefix, i, kind);
            publish(&publisher, &exchange, &body, properties).await?;
        }
    }
    Ok(())
}

async fn publish(
    publisher: &Publisher,
    exchange: &str,
    body: &[u8],
    properties: oncely::lapin::BasicProperties,
) -> anyhow::Result<()> {
    retrying("publishing", || async {
        publisher
            .publish(OutgoingMessage {
                exchange,
                routing_key: billing::ORDER_CREATED_V1,
                body,
                properties: properties.clone(),
            })
            .await
            .map_err(anyhow::Error::from)
    })
    .await
}

/// Retries `attempt` every 500 ms for up to two minutes.
async fn retrying<F, Fut>(what: &str, mut attempt: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match attempt().await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{what}: still failing after 2 minutes")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}
