//! The inventory API's client, as fulfillment calls it.

use oncely::HandlerError;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What fulfillment asks the inventory API to reserve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReserveRequest {
    /// The order the stock is for.
    pub order_id: String,
    /// Stock keeping unit.
    pub sku: String,
    /// Units.
    pub quantity: i32,
}

/// A reservation as the inventory API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The API's id of the reservation.
    pub reservation_id: String,
    /// The order it is for.
    pub order_id: String,
    /// Stock keeping unit.
    pub sku: String,
    /// Units.
    pub quantity: i32,
    /// True when the API answered from an earlier call with the same `Idempotency-Key`.
    #[serde(default)]
    pub replayed: bool,
}

/// Why a call to the inventory API gave no reservation.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// No answer within the client's timeout: the API may or may not have reserved.
    #[error("inventory API did not answer within {0:?}")]
    Timeout(Duration),
    /// Could not connect, or the API answered 5xx: nothing is known to be reserved.
    #[error("inventory API unavailable: {0}")]
    Unavailable(String),
    /// The API refused the request (4xx): asking again will not help.
    #[error("inventory API refused the reservation ({status}): {body}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// Response body, cut to 500 bytes.
        body: String,
    },
    /// The API answered 2xx with a body that is not a reservation.
    #[error("inventory API answered with an unreadable body: {0}")]
    BadResponse(String),
}

impl From<InventoryError> for HandlerError {
    fn from(e: InventoryError) -> Self {
        let text = e.to_string();
        match e {
            InventoryError::Timeout(_) => HandlerError::retryable("inventory_timeout", text),
            InventoryError::Unavailable(_) => {
                HandlerError::retryable("inventory_unavailable", text)
            }
            InventoryError::Rejected { .. } => HandlerError::permanent("inventory_rejected", text),
            InventoryError::BadResponse(_) => {
                HandlerError::retryable("inventory_bad_response", text)
            }
        }
    }
}

/// HTTP client of the inventory API.
#[derive(Debug, Clone)]
pub struct InventoryClient {
    http: reqwest::Client,
    base_url: String,
    timeout: Duration,
}

impl InventoryClient {
    /// A client of the API at `base_url` (e.g. `http://127.0.0.1:8089`) that gives up on a call
    /// after `timeout`.
    pub fn new(base_url: &str, timeout: Duration) -> Result<Self, InventoryError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| InventoryError::Unavailable(format!("building the HTTP client: {e}")))?;
        Ok(InventoryClient {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            timeout,
        })
    }

    /// Reserves, under `idempotency_key`: the API reserves at most once per key and answers a
    /// repeated call with the reservation it made the first time.
    pub async fn reserve(
        &self,
        idempotency_key: &str,
        request: &ReserveRequest,
    ) -> Result<Reservation, InventoryError> {
        let response = self
            .http
            .post(format!("{}/reservations", self.base_url))
            .header("Idempotency-Key", idempotency_key)
            .json(request)
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        let status = response.status();
        if status.is_success() {
            return response
                .json::<Reservation>()
                .await
                .map_err(|e| self.body(e));
        }
        Err(self.failure(response).await)
    }

    /// The reservation made under `idempotency_key`, if any.
    pub async fn lookup(
        &self,
        idempotency_key: &str,
    ) -> Result<Option<Reservation>, InventoryError> {
        let response = self
            .http
            .get(format!("{}/reservations/{idempotency_key}", self.base_url))
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if response.status().is_success() {
            return response.json().await.map(Some).map_err(|e| self.body(e));
        }
        Err(self.failure(response).await)
    }

    /// The API's counters (`GET /stats`).
    pub async fn stats(&self) -> Result<crate::inventory_api::ApiStatsSnapshot, InventoryError> {
        let response = self
            .http
            .get(format!("{}/stats", self.base_url))
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        if !response.status().is_success() {
            return Err(self.failure(response).await);
        }
        response.json().await.map_err(|e| self.body(e))
    }

    fn transport(&self, e: reqwest::Error) -> InventoryError {
        if e.is_timeout() {
            InventoryError::Timeout(self.timeout)
        } else {
            InventoryError::Unavailable(e.to_string())
        }
    }

    fn body(&self, e: reqwest::Error) -> InventoryError {
        if e.is_timeout() {
            InventoryError::Timeout(self.timeout)
        } else {
            InventoryError::BadResponse(e.to_string())
        }
    }

    async fn failure(&self, response: reqwest::Response) -> InventoryError {
        let status = response.status();
        let mut body = response.text().await.unwrap_or_default();
        if body.len() > 500 {
            let mut cut = 500;
            while !body.is_char_boundary(cut) {
                cut -= 1;
            }
            body.truncate(cut);
        }
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            InventoryError::Unavailable(format!("{status}: {body}"))
        } else {
            InventoryError::Rejected {
                status: status.as_u16(),
                body,
            }
        }
    }
}
