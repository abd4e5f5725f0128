//! `#[oncely::handler]` expands to a unit struct that implements `oncely::Handler`.
//!
//! No database: `handle` is never called with a real connection here.

#![deny(missing_docs)]

use oncely::{AsyncPgConnection, Envelope, Handler, HandlerError};
use std::future::Future;
use std::sync::Arc;

/// A message.
#[derive(Debug, serde::Deserialize)]
pub struct OrderCreated {
    /// The order.
    pub order_id: String,
}

/// Another message.
#[derive(Debug, serde::Deserialize)]
pub struct OrderCancelled {
    /// The order.
    pub order_id: String,
}

/// Handlers with different visibilities; `missing_docs` is denied, so the generated struct
/// must carry the doc comment and the generated `CONSUMER` and `call` must have docs of their
/// own.
pub mod handlers {
    use super::{OrderCancelled, OrderCreated};
    use oncely::{AsyncPgConnection, Envelope, HandlerError};

    /// Creates the invoice for a new order.
    #[oncely::handler(consumer = "billing")]
    pub async fn create_invoice(
        _conn: &mut AsyncPgConnection,
        msg: Envelope<OrderCreated>,
    ) -> Result<(), HandlerError> {
        if msg.payload.order_id.is_empty() {
            return Err(HandlerError::permanent("empty_order_id", "no order id"));
        }
        Ok(())
    }

    /// Voids the invoice of a cancelled order.
    #[oncely::handler(consumer = "billing")]
    pub async fn void_invoice(
        _conn: &mut AsyncPgConnection,
        _msg: Envelope<OrderCancelled>,
    ) -> Result<(), HandlerError> {
        Ok(())
    }

    /// Sends the receipt; visible in this crate only.
    #[oncely::handler(consumer = "mailer")]
    pub(crate) async fn send_receipt(
        _conn: &mut AsyncPgConnection,
        _msg: Envelope<OrderCreated>,
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}

use handlers::{create_invoice, send_receipt, void_invoice};

fn message_is<H: Handler<Message = M>, M>(handler: H) -> H {
    handler
}

#[test]
fn implements_handler_with_the_consumer_name() {
    let handler = message_is::<_, OrderCreated>(create_invoice);
    assert_eq!(handler.consumer_name(), "billing");
    assert_eq!(create_invoice::CONSUMER, "billing");
    assert_eq!(create_invoice.consumer_name(), create_invoice::CONSUMER);

    let handler = message_is::<_, OrderCancelled>(void_invoice);
    assert_eq!(handler.consumer_name(), "billing");

    let handler = message_is::<_, OrderCreated>(send_receipt);
    assert_eq!(handler.consumer_name(), "mailer");
    assert_eq!(send_receipt::CONSUMER, "mailer");
}

#[test]
fn consumer_is_a_const() {
    const CONSUMER: &str = create_invoice::CONSUMER;
    assert_eq!(CONSUMER, "billing");
}

#[test]
fn is_a_plain_unit_struct() {
    let handler = create_invoice;
    let copy = handler;
    let _clone = Clone::clone(&handler);
    let default = <create_invoice as Default>::default();
    assert_eq!(format!("{copy:?}"), "create_invoice");
    assert_eq!(format!("{default:?}"), "create_invoice");
    assert_eq!(size_of::<create_invoice>(), 0);
}

#[test]
fn usable_as_trait_objects() {
    let boxed: Vec<Box<dyn Handler<Message = OrderCreated>>> =
        vec![Box::new(create_invoice), Box::new(send_receipt)];
    let names: Vec<&str> = boxed.iter().map(|h| h.consumer_name()).collect();
    assert_eq!(names, ["billing", "mailer"]);

    let shared: Arc<dyn Handler<Message = OrderCancelled>> = Arc::new(void_invoice);
    let other = Arc::clone(&shared);
    std::thread::spawn(move || assert_eq!(other.consumer_name(), "billing"))
        .join()
        .expect("thread");
    assert_eq!(shared.consumer_name(), "billing");
}

/// `call` keeps the original signature (with the runtime's types) and returns a `Send` future.
fn call_signature(
    conn: &mut AsyncPgConnection,
    msg: Envelope<OrderCreated>,
) -> impl Future<Output = Result<(), HandlerError>> + Send + '_ {
    create_invoice::call(conn, msg)
}

/// `handle` is the trait's, boxed.
fn handle_signature<'c>(
    conn: &'c mut AsyncPgConnection,
    msg: Envelope<OrderCreated>,
) -> oncely::BoxFuture<'c, Result<(), HandlerError>> {
    static HANDLER: create_invoice = create_invoice;
    HANDLER.handle(conn, msg)
}

#[test]
fn call_and_handle_have_the_expected_signatures() {
    // Compiling the two functions above is the test; this keeps them used.
    let _ = (call_signature, handle_signature);
}
