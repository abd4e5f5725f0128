//! The `#[oncely::handler]` attribute; use it through the `oncely` crate.
//!
//! The crate is split the usual way: this file is the entry point, `attr` parses the
//! attribute arguments, `item` parses and validates the function, `expand` generates code.

mod attr;
mod expand;
mod item;

use proc_macro::TokenStream;

/// Turns an `async fn`, or an `impl` block holding one async method, into an
/// [`oncely::Handler`] bound to one consumer name.
///
/// ```ignore
/// use oncely::{AsyncPgConnection, Envelope, HandlerError};
///
/// /// Creates the invoice for a new order.
/// #[oncely::handler(consumer = "billing")]
/// pub async fn create_invoice(
///     conn: &mut AsyncPgConnection,
///     msg: Envelope<OrderCreated>,
/// ) -> Result<(), HandlerError> {
///     // ... write through `conn`: it commits together with the inbox row ...
///     Ok(())
/// }
/// ```
///
/// The function must have exactly this shape:
/// `async fn NAME(conn: &mut AsyncPgConnection, msg: Envelope<T>) -> Result<(), HandlerError>`,
/// with no generics, no `self`, and not `const`, `unsafe` or `extern`. The argument patterns
/// are free (`mut conn`, `_msg`, ...); `T` is the message type, read from the last path
/// segment `Envelope<T>` of the second argument. The types are checked by the compiler, and a
/// mismatch is reported on the type as written.
///
/// The function becomes a unit struct with the same name and visibility, in the style of
/// actix-web's route macros:
///
/// ```ignore
/// /// Creates the invoice for a new order.
/// #[derive(Debug, Clone, Copy, Default)]
/// pub struct create_invoice;
///
/// impl create_invoice {
///     /// The consumer name.
///     pub const CONSUMER: &'static str = "billing";
///
///     /// The original body, callable directly (e.g. from unit tests).
///     pub async fn call(conn: &mut AsyncPgConnection, msg: Envelope<OrderCreated>)
///         -> Result<(), HandlerError> { /* ... */ }
/// }
///
/// impl oncely::Handler for create_invoice {
///     type Message = OrderCreated;
///     fn consumer_name(&self) -> &str { Self::CONSUMER }
///     fn handle<'c>(&'c self, conn: &'c mut AsyncPgConnection, msg: Envelope<OrderCreated>)
///         -> BoxFuture<'c, Result<(), HandlerError>> { Box::pin(Self::call(conn, msg)) }
/// }
/// ```
///
/// Doc comments go on the struct; other attributes stay on `call`; `#[cfg]` applies to all of
/// it. The generated code names the runtime crate as `::oncely`.
///
/// `consumer` is a string literal or the path of a `&str` constant, so a service that also
/// needs its consumer name elsewhere (queue names, flags) writes it once:
/// `#[oncely::handler(consumer = CONSUMER)]`.
///
/// # Handlers with state
///
/// A handler that holds clients, pools or configuration puts the attribute on an inherent
/// `impl` block holding exactly one `async fn(&self, conn, msg)`; the value it is called on is
/// the handler, and other methods go in another block:
///
/// ```ignore
/// pub struct ReserveStock { inventory: InventoryClient }
///
/// #[oncely::handler(consumer = CONSUMER)]
/// impl ReserveStock {
///     /// Reserves the order's stock.
///     pub async fn reserve(
///         &self,
///         conn: &mut AsyncPgConnection,
///         msg: Envelope<OrderCreated>,
///     ) -> Result<(), HandlerError> {
///         // ... self.inventory ...
///         Ok(())
///     }
/// }
/// ```
///
/// The block is kept as written and gains
/// `impl oncely::Handler for ReserveStock`, whose `handle` boxes `Self::reserve(self, conn, msg)`.
/// Here `consumer` may also read the value: `consumer = &self.name`.
///
/// [`oncely::Handler`]: https://docs.rs/oncely/latest/oncely/trait.Handler.html
#[proc_macro_attribute]
pub fn handler(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::handler(args.into(), item.into()).into()
}

#[cfg(test)]
mod tests;
