//! Fulfillment, the consumer of the oncely drill that talks to another system: it reserves
//! stock for each `order.created.v1` through an inventory HTTP API, never twice per order.
//!
//! The API call cannot be part of the inbox transaction, so the handler:
//!
//! 1. writes (and commits, on its own connection) an operation row `reservation_operations`
//!    *before* the call, so a call is never forgotten, whatever happens next;
//! 2. calls `POST /reservations` with the stable key `reservation:<order_id>` in the
//!    `Idempotency-Key` header: the API reserves at most once per key and answers a repeated
//!    call with the first reservation;
//! 3. records the outcome (the `reservations` row and the operation marked `succeeded`) inside
//!    the inbox transaction, which commits before the ack.
//!
//! A consumer killed after the API reserved and before its commit leaves the message unacked:
//! the redelivery calls again with the same key and gets the same reservation. When a response
//! is lost and the message does not come back (it went to the DLQ, or an operator purged it),
//! the [reconciler](reconcile_once) settles the operation from the API's `GET
//! /reservations/{key}`.

use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use oncely::Pool;
use oncely::prelude::*;
pub use oncely_example_messages::{ORDER_CREATED_V1, ORDER_EVENTS_EXCHANGE, OrderCreated};
use std::time::Duration;

pub mod client;
pub mod inventory_api;

pub use client::{InventoryClient, InventoryError, Reservation, ReserveRequest};

/// Consumer name.
pub const CONSUMER: &str = "fulfillment";

/// The queue fulfillment consumes.
pub const QUEUE: &str = "fulfillment.order-events.q";

/// Fulfillment's tables: `reservation_operations` and `reservations`.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/fulfillment");

/// The simulated inventory API's table.
pub const INVENTORY_API_MIGRATIONS: EmbeddedMigrations =
    embed_migrations!("migrations/inventory-api");

diesel::table! {
    /// One row per order whose stock fulfillment set out to reserve.
    reservation_operations (order_id) {
        /// The order.
        order_id -> Text,
        /// The key sent to the API.
        idempotency_key -> Text,
        /// `pending`, `succeeded` or `failed`.
        status -> Text,
        /// Calls made.
        calls -> Int4,
        /// Why the last call failed.
        last_error -> Nullable<Text>,
        /// The API's reservation id, once known.
        reservation_id -> Nullable<Text>,
        /// `handler` or `reconciler`.
        settled_by -> Nullable<Text>,
        /// First attempt.
        created_at -> Timestamptz,
        /// Last change.
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    /// The business effect: at most one reservation per order.
    reservations (order_id) {
        /// The order.
        order_id -> Text,
        /// The API's reservation id.
        reservation_id -> Text,
        /// Stock keeping unit.
        sku -> Text,
        /// Units.
        quantity -> Int4,
        /// When it was recorded.
        created_at -> Timestamptz,
    }
}

/// The drill's fulfillment topology: `queue` bound to `exchange` for `order.created.v1`.
pub fn topology(exchange: &str, queue: &str) -> Topology {
    Topology::new(exchange, queue).bind(ORDER_CREATED_V1)
}

/// Retries suited to a remote API that is briefly unavailable: 8 attempts, after 1 s, 3 s, then
/// every 10 s.
pub fn retry_policy() -> RetryPolicy {
    RetryPolicy::new(
        8,
        vec![
            Duration::from_secs(1),
            Duration::from_secs(3),
            Duration::from_secs(10),
        ],
    )
}

/// Applies the inbox migrations and fulfillment's own.
pub async fn migrate(database_url: &str) -> Result<(), oncely::MigrationError> {
    oncely::run_migrations(database_url, oncely::INBOX_MIGRATIONS).await?;
    oncely::run_migrations(database_url, MIGRATIONS).await?;
    Ok(())
}

/// Applies the inventory API's migration.
pub async fn migrate_inventory_api(database_url: &str) -> Result<(), oncely::MigrationError> {
    oncely::run_migrations(database_url, INVENTORY_API_MIGRATIONS).await?;
    Ok(())
}

/// The idempotency key of an order's reservation: stable across redeliveries, retries,
/// restarts and re-publishes of the event.
pub fn reservation_key(order_id: &str) -> String {
    format!("reservation:{order_id}")
}

/// What an order reserves: one unit of a SKU derived from the order.
pub fn reserve_request(order: &OrderCreated) -> ReserveRequest {
    ReserveRequest {
        order_id: order.order_id.clone(),
        sku: format!("sku-{}", order.amount_cents.rem_euclid(50)),
        quantity: 1,
    }
}

/// The fulfillment handler: reserves an order's stock, once.
#[derive(Debug, Clone)]
pub struct ReserveStock {
    operations: Pool,
    api: InventoryClient,
}

#[oncely::handler(consumer = CONSUMER)]
impl ReserveStock {
    /// Reserves the order's stock unless a reservation is already recorded: the operation row
    /// first, then the API call with the order's idempotency key, then the reservation inside
    /// the inbox transaction.
    pub async fn reserve(
        &self,
        conn: &mut AsyncPgConnection,
        msg: Envelope<OrderCreated>,
    ) -> Result<(), HandlerError> {
        let order = &msg.payload;
        // Settled by the reconciler while the message waited for a retry: nothing left to do.
        let reserved: Option<String> = reservations::table
            .find(&order.order_id)
            .select(reservations::reservation_id)
            .first(conn)
            .await
            .optional()?;
        if reserved.is_some() {
            return Ok(());
        }
        let key = reservation_key(&order.order_id);
        self.begin_operation(&order.order_id, &key).await?;
        match self.api.reserve(&key, &reserve_request(order)).await {
            Ok(reservation) => {
                record_reservation(conn, &reservation, "handler").await?;
                Ok(())
            }
            Err(e) => {
                let error = HandlerError::from(e);
                self.note_failure(&order.order_id, &error).await;
                Err(error)
            }
        }
    }
}

impl ReserveStock {
    /// A handler calling `api`, writing operation rows through `operations`: a pool of its own,
    /// apart from the inbox's, so a handler holding its transaction connection never waits for
    /// a second one from the same pool.
    pub fn new(operations: Pool, api: InventoryClient) -> Self {
        ReserveStock { operations, api }
    }

    /// Writes the operation row (or counts one more call on it) and commits it at once, on a
    /// connection of its own: it must survive the inbox transaction's rollback or a crash.
    async fn begin_operation(&self, order_id: &str, key: &str) -> Result<(), HandlerError> {
        use reservation_operations::dsl as op;
        let mut conn = self.operations.get().await.map_err(|e| {
            HandlerError::retryable("operations_db_unavailable", format!("operation row: {e}"))
        })?;
        diesel::insert_into(op::reservation_operations)
            .values((
                op::order_id.eq(order_id),
                op::idempotency_key.eq(key),
                op::calls.eq(1),
            ))
            .on_conflict(op::order_id)
            .do_update()
            .set((
                op::calls.eq(op::calls + 1),
                op::updated_at.eq(diesel::dsl::now),
            ))
            .execute(&mut conn)
            .await?;
        Ok(())
    }

    /// Keeps why the call failed (best effort: the message's retry does not depend on it).
    async fn note_failure(&self, order_id: &str, error: &HandlerError) {
        use reservation_operations::dsl as op;
        let status = if error.kind() == oncely::ErrorKind::Retryable {
            "pending"
        } else {
            "failed"
        };
        let result = async {
            let mut conn = self
                .operations
                .get()
                .await
                .map_err(|e| diesel::result::Error::QueryBuilderError(e.to_string().into()))?;
            diesel::update(op::reservation_operations.find(order_id))
                .filter(op::status.eq("pending"))
                .set((
                    op::status.eq(status),
                    op::last_error.eq(error.to_string()),
                    op::updated_at.eq(diesel::dsl::now),
                ))
                .execute(&mut conn)
                .await
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(order_id, error = %e, "could not record the failed reservation call");
        }
    }
}

/// Records a reservation the API confirmed: the `reservations` row (kept if one is there
/// already) and the operation marked `succeeded`. Runs in the caller's transaction.
async fn record_reservation(
    conn: &mut AsyncPgConnection,
    reservation: &Reservation,
    settled_by: &str,
) -> Result<(), diesel::result::Error> {
    use reservation_operations::dsl as op;
    diesel::insert_into(reservations::table)
        .values((
            reservations::order_id.eq(&reservation.order_id),
            reservations::reservation_id.eq(&reservation.reservation_id),
            reservations::sku.eq(&reservation.sku),
            reservations::quantity.eq(reservation.quantity),
        ))
        .on_conflict(reservations::order_id)
        .do_nothing()
        .execute(conn)
        .await?;
    diesel::update(op::reservation_operations.find(&reservation.order_id))
        .filter(op::status.ne("succeeded"))
        .set((
            op::status.eq("succeeded"),
            op::reservation_id.eq(&reservation.reservation_id),
            op::settled_by.eq(settled_by),
            op::updated_at.eq(diesel::dsl::now),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// What one reconciliation pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReconcileSummary {
    /// Pending operations looked at.
    pub examined: usize,
    /// Found reserved at the API and recorded here.
    pub settled: usize,
    /// Not reserved at the API: left pending for the message's next attempt.
    pub not_reserved: usize,
}

/// Why a reconciliation pass stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// No database connection.
    #[error("no database connection: {0}")]
    Pool(String),
    /// A query failed.
    #[error(transparent)]
    Query(#[from] diesel::result::Error),
    /// The API could not be asked.
    #[error(transparent)]
    Api(#[from] InventoryError),
}

/// Settles operations left `pending` for longer than `settle_after`: a call whose response was
/// lost may have reserved. Asks the API for the reservation under the operation's key; when it
/// exists, records it exactly as the handler would have (same transaction shape, same unique
/// key), so a later redelivery of the message finds it and stops there.
pub async fn reconcile_once(
    pool: &Pool,
    api: &InventoryClient,
    settle_after: Duration,
) -> Result<ReconcileSummary, ReconcileError> {
    use reservation_operations::dsl as op;
    let mut conn = pool
        .get()
        .await
        .map_err(|e| ReconcileError::Pool(e.to_string()))?;
    let cutoff = chrono::Utc::now()
        - chrono::Duration::from_std(settle_after).unwrap_or(chrono::Duration::zero());
    let pending: Vec<String> = op::reservation_operations
        .filter(op::status.eq("pending"))
        .filter(op::updated_at.lt(cutoff))
        .order(op::updated_at)
        .select(op::idempotency_key)
        .limit(200)
        .load(&mut conn)
        .await?;
    let mut summary = ReconcileSummary {
        examined: pending.len(),
        ..ReconcileSummary::default()
    };
    for key in pending {
        match api.lookup(&key).await? {
            Some(reservation) => {
                conn.transaction::<_, diesel::result::Error, _>(async |conn| {
                    record_reservation(conn, &reservation, "reconciler").await
                })
                .await?;
                summary.settled += 1;
            }
            None => summary.not_reserved += 1,
        }
    }
    Ok(summary)
}

/// Runs [`reconcile_once`] every `every` until `shutdown` completes.
pub async fn reconcile_loop(
    pool: Pool,
    api: InventoryClient,
    every: Duration,
    settle_after: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let work = async {
        loop {
            tokio::time::sleep(every).await;
            match reconcile_once(&pool, &api, settle_after).await {
                Ok(s) if s.settled > 0 => {
                    tracing::info!(
                        settled = s.settled,
                        "reconciled reservations whose response was lost"
                    )
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "reconciliation pass failed; next pass retries")
                }
            }
        }
    };
    tokio::select! {
        _ = work => {}
        _ = shutdown => {}
    }
}

/// Fulfillment's state for orders whose ids start with `prefix`, with the API's side of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, QueryableByName)]
pub struct FulfillmentCounts {
    /// Reservations recorded by fulfillment.
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub reservations: i64,
    /// Reservations the API made.
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub api_reservations: i64,
    /// Orders the API reserved more than once (must be 0).
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub api_orders_reserved_twice: i64,
    /// Reservations recorded with another id than the API's (must be 0).
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub mismatched: i64,
    /// Operations still pending.
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub pending_operations: i64,
    /// Operations settled by the reconciler.
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub settled_by_reconciler: i64,
    /// Calls made to the API.
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub api_calls: i64,
}

/// Reads [`FulfillmentCounts`] for orders whose ids start with `prefix`.
pub async fn counts(
    conn: &mut AsyncPgConnection,
    prefix: &str,
) -> Result<FulfillmentCounts, diesel::result::Error> {
    diesel::sql_query(
        "SELECT \
           (SELECT count(*) FROM reservations WHERE order_id LIKE $1) AS reservations, \
           (SELECT count(*) FROM inventory_api_reservations WHERE order_id LIKE $1) \
              AS api_reservations, \
           (SELECT count(*) FROM (SELECT order_id FROM inventory_api_reservations \
              WHERE order_id LIKE $1 GROUP BY order_id HAVING count(*) > 1) twice) \
              AS api_orders_reserved_twice, \
           (SELECT count(*) FROM reservations r JOIN inventory_api_reservations a \
              ON a.order_id = r.order_id \
              WHERE r.order_id LIKE $1 AND a.reservation_id <> r.reservation_id) AS mismatched, \
           (SELECT count(*) FROM reservation_operations \
              WHERE order_id LIKE $1 AND status = 'pending') AS pending_operations, \
           (SELECT count(*) FROM reservation_operations \
              WHERE order_id LIKE $1 AND settled_by = 'reconciler') AS settled_by_reconciler, \
           (SELECT coalesce(sum(calls), 0)::bigint FROM reservation_operations \
              WHERE order_id LIKE $1) AS api_calls",
    )
    .bind::<diesel::sql_types::Text, _>(format!("{prefix}%"))
    .get_result(conn)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_stable_per_order() {
        assert_eq!(reservation_key("ord-7"), "reservation:ord-7");
        assert_eq!(reservation_key("ord-7"), reservation_key("ord-7"));
    }

    #[test]
    fn timeouts_and_unavailability_retry_and_refusals_do_not() {
        let e = HandlerError::from(InventoryError::Timeout(Duration::from_secs(1)));
        assert_eq!(e.kind(), oncely::ErrorKind::Retryable);
        assert_eq!(e.code(), "inventory_timeout");
        let e = HandlerError::from(InventoryError::Unavailable("503".into()));
        assert_eq!(e.kind(), oncely::ErrorKind::Retryable);
        let e = HandlerError::from(InventoryError::Rejected {
            status: 422,
            body: "no".into(),
        });
        assert_eq!(e.kind(), oncely::ErrorKind::Permanent);
        assert_eq!(e.code(), "inventory_rejected");
    }
}
