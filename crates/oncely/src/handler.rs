//! The handler trait: what `#[oncely::handler]` implements for an async fn.

use diesel_async::AsyncPgConnection;
use oncely_core::{Envelope, HandlerError};
use serde::de::DeserializeOwned;

/// A boxed, `Send` future, as returned by [`Handler::handle`].
pub use oncely_inbox::BoxFuture;

/// A message handler bound to one consumer name.
///
/// The handler runs inside the inbox transaction: every statement it sends through `conn`
/// commits together with the inbox row, or not at all. It must not commit or roll back itself.
///
/// Write one with `#[oncely::handler(consumer = "...")]` on an async fn; for a handler with
/// state, on an `impl` block holding one `async fn(&self, conn, msg)`:
///
/// ```
/// use oncely::{AsyncPgConnection, Envelope, HandlerError};
///
/// const CONSUMER: &str = "pong";
///
/// #[derive(serde::Deserialize)]
/// struct Ping { n: u32 }
///
/// struct Pong { limit: u32 }
///
/// #[oncely::handler(consumer = CONSUMER)]
/// impl Pong {
///     async fn pong(&self, _conn: &mut AsyncPgConnection, msg: Envelope<Ping>)
///         -> Result<(), HandlerError>
///     {
///         if msg.payload.n > self.limit { return Err(HandlerError::permanent("big", "n too big")); }
///         Ok(())
///     }
/// }
/// ```
///
/// or by hand:
///
/// ```
/// use oncely::{AsyncPgConnection, BoxFuture, Envelope, Handler, HandlerError};
///
/// #[derive(serde::Deserialize)]
/// struct Ping { n: u32 }
///
/// struct Pong;
///
/// impl Handler for Pong {
///     type Message = Ping;
///     fn consumer_name(&self) -> &str { "pong" }
///     fn handle<'c>(&'c self, _conn: &'c mut AsyncPgConnection, msg: Envelope<Ping>)
///         -> BoxFuture<'c, Result<(), HandlerError>>
///     {
///         Box::pin(async move {
///             if msg.payload.n == 0 { return Err(HandlerError::permanent("zero", "n is 0")); }
///             Ok(())
///         })
///     }
/// }
/// ```
pub trait Handler: Send + Sync + 'static {
    /// The payload type the body is decoded into.
    type Message: DeserializeOwned + Send + 'static;

    /// The consumer name: the first half of the inbox key (consumer_name, message_id).
    fn consumer_name(&self) -> &str;

    /// Handles one message inside the inbox transaction.
    fn handle<'c>(
        &'c self,
        conn: &'c mut AsyncPgConnection,
        msg: Envelope<Self::Message>,
    ) -> BoxFuture<'c, Result<(), HandlerError>>;
}
