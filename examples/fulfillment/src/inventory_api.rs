//! A simulated external inventory API: `POST /reservations` with an `Idempotency-Key` header
//! reserves at most once per key. It can fail requests and lose responses on purpose, as real
//! remote services do.

use crate::client::{Reservation, ReserveRequest};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

diesel::table! {
    /// The API's own storage (it is another system: fulfillment never reads it).
    inventory_api_reservations (idempotency_key) {
        /// The caller's `Idempotency-Key`.
        idempotency_key -> Text,
        /// The API's id.
        reservation_id -> Text,
        /// Order.
        order_id -> Text,
        /// Stock keeping unit.
        sku -> Text,
        /// Units.
        quantity -> Int4,
        /// When it was reserved.
        created_at -> Timestamptz,
    }
}

/// Failures the API injects.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Share of reservation requests answered 503 before anything is reserved.
    pub fail_rate: f64,
    /// Share of reservation requests whose reservation is made and committed, but whose
    /// response is held back for `lose_delay` (longer than the client waits): the caller sees a
    /// timeout although the stock is reserved.
    pub lose_rate: f64,
    /// How long a lost response is held back.
    pub lose_delay: Duration,
}

/// What the API did since it started.
#[derive(Debug, Default)]
pub struct ApiStats {
    requests: AtomicU64,
    created: AtomicU64,
    replayed: AtomicU64,
    failed_on_purpose: AtomicU64,
    responses_lost: AtomicU64,
}

/// [`ApiStats`] as served by `GET /stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ApiStatsSnapshot {
    /// Reservation requests received.
    pub requests: u64,
    /// Reservations made.
    pub created: u64,
    /// Requests answered from an earlier call with the same key.
    pub replayed: u64,
    /// Requests answered 503 on purpose.
    pub failed_on_purpose: u64,
    /// Responses held back on purpose.
    pub responses_lost: u64,
}

impl ApiStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> ApiStatsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ApiStatsSnapshot {
            requests: r(&self.requests),
            created: r(&self.created),
            replayed: r(&self.replayed),
            failed_on_purpose: r(&self.failed_on_purpose),
            responses_lost: r(&self.responses_lost),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The API's state.
#[derive(Debug, Clone)]
pub struct InventoryApi {
    pool: oncely::Pool,
    faults: Faults,
    stats: Arc<ApiStats>,
}

impl InventoryApi {
    /// An API storing its reservations through `pool`.
    pub fn new(pool: oncely::Pool, faults: Faults) -> Self {
        InventoryApi {
            pool,
            faults,
            stats: Arc::default(),
        }
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<ApiStats> {
        self.stats.clone()
    }

    /// The routes: `POST /reservations`, `GET /reservations/{key}`, `GET /stats`.
    pub fn router(self) -> Router {
        Router::new()
            .route("/reservations", post(reserve))
            .route("/reservations/{key}", get(lookup))
            .route("/stats", get(stats))
            .with_state(self)
    }

    /// Serves on `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }
}

/// Idempotency keys longer than this are refused.
const MAX_KEY_LEN: usize = 200;

fn error(status: StatusCode, text: impl Into<String>) -> Response {
    (status, text.into()).into_response()
}

async fn reserve(
    State(api): State<InventoryApi>,
    headers: HeaderMap,
    Json(request): Json<ReserveRequest>,
) -> Response {
    bump(&api.stats.requests);
    let Some(key) = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.trim().is_empty() && k.len() <= MAX_KEY_LEN)
        .map(str::to_owned)
    else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("an Idempotency-Key header of 1 to {MAX_KEY_LEN} bytes is required"),
        );
    };
    if request.quantity <= 0 {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "quantity must be positive",
        );
    }
    let (fail, lose) = (
        rand::random::<f64>() < api.faults.fail_rate,
        rand::random::<f64>() < api.faults.lose_rate,
    );
    if fail {
        bump(&api.stats.failed_on_purpose);
        return error(StatusCode::SERVICE_UNAVAILABLE, "inventory busy, try again");
    }
    let (status, reservation) = match store(&api.pool, &key, &request).await {
        Ok(Stored::Created(r)) => {
            bump(&api.stats.created);
            (StatusCode::CREATED, r)
        }
        Ok(Stored::Replayed(r)) => {
            bump(&api.stats.replayed);
            (StatusCode::OK, r)
        }
        Ok(Stored::Conflict(r)) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "Idempotency-Key {key} was used for order {} with another request",
                    r.order_id
                ),
            );
        }
        Err(e) => {
            tracing::warn!(error = %e, "inventory API storage failed");
            return error(StatusCode::SERVICE_UNAVAILABLE, "storage unavailable");
        }
    };
    if lose {
        bump(&api.stats.responses_lost);
        tokio::time::sleep(api.faults.lose_delay).await;
    }
    (status, Json(reservation)).into_response()
}

enum Stored {
    Created(Reservation),
    Replayed(Reservation),
    Conflict(Reservation),
}

#[derive(Debug, thiserror::Error)]
enum StoreError {
    #[error("no database connection: {0}")]
    Pool(String),
    #[error(transparent)]
    Query(#[from] diesel::result::Error),
}

type Row = (String, String, String, i32);

fn reservation(row: Row, replayed: bool) -> Reservation {
    let (reservation_id, order_id, sku, quantity) = row;
    Reservation {
        reservation_id,
        order_id,
        sku,
        quantity,
        replayed,
    }
}

async fn store(
    pool: &oncely::Pool,
    key: &str,
    request: &ReserveRequest,
) -> Result<Stored, StoreError> {
    use inventory_api_reservations::dsl as r;
    let mut conn = pool
        .get()
        .await
        .map_err(|e| StoreError::Pool(e.to_string()))?;
    let columns = (r::reservation_id, r::order_id, r::sku, r::quantity);
    let created: Option<Row> = diesel::insert_into(r::inventory_api_reservations)
        .values((
            r::idempotency_key.eq(key),
            r::reservation_id.eq(format!("rsv-{}", uuid::Uuid::new_v4())),
            r::order_id.eq(&request.order_id),
            r::sku.eq(&request.sku),
            r::quantity.eq(request.quantity),
        ))
        .on_conflict(r::idempotency_key)
        .do_nothing()
        .returning(columns)
        .get_result(&mut conn)
        .await
        .optional()?;
    if let Some(row) = created {
        return Ok(Stored::Created(reservation(row, false)));
    }
    let row: Row = r::inventory_api_reservations
        .find(key)
        .select(columns)
        .first(&mut conn)
        .await?;
    let earlier = reservation(row, true);
    if earlier.order_id != request.order_id
        || earlier.sku != request.sku
        || earlier.quantity != request.quantity
    {
        return Ok(Stored::Conflict(earlier));
    }
    Ok(Stored::Replayed(earlier))
}

async fn lookup(State(api): State<InventoryApi>, Path(key): Path<String>) -> Response {
    use inventory_api_reservations::dsl as r;
    let found = async {
        let mut conn = api
            .pool
            .get()
            .await
            .map_err(|e| StoreError::Pool(e.to_string()))?;
        let row: Option<Row> = r::inventory_api_reservations
            .find(&key)
            .select((r::reservation_id, r::order_id, r::sku, r::quantity))
            .first(&mut conn)
            .await
            .optional()?;
        Ok::<_, StoreError>(row)
    }
    .await;
    match found {
        Ok(Some(row)) => Json(reservation(row, true)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no reservation under {key}")),
        Err(e) => {
            tracing::warn!(error = %e, "inventory API storage failed");
            error(StatusCode::SERVICE_UNAVAILABLE, "storage unavailable")
        }
    }
}

async fn stats(State(api): State<InventoryApi>) -> Json<ApiStatsSnapshot> {
    Json(api.stats.snapshot())
}
