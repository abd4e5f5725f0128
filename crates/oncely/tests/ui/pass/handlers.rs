//! Signatures `#[oncely::handler]` accepts.

use oncely::{AsyncPgConnection, Envelope, Handler, HandlerError};

#[derive(Debug, serde::Deserialize)]
pub struct OrderCreated {
    pub order_id: String,
}

mod handlers {
    use super::OrderCreated;
    use oncely::{AsyncPgConnection, Envelope, HandlerError};

    /// Plain imports.
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

    /// Fully qualified paths, `mut` and destructuring patterns, other attributes.
    #[oncely::handler(consumer = "audit")]
    #[allow(clippy::needless_return)]
    pub(crate) async fn audit(
        mut conn: &mut oncely::AsyncPgConnection,
        oncely::Envelope { payload, .. }: oncely::Envelope<OrderCreated>,
    ) -> std::result::Result<(), oncely::HandlerError> {
        let _reborrow: &mut AsyncPgConnection = &mut conn;
        let _ = payload.order_id;
        return Ok(());
    }

    /// A private handler, used from this module only.
    #[oncely::handler(consumer = "private")]
    async fn private(_: &mut AsyncPgConnection, _: Envelope<String>) -> Result<(), HandlerError> {
        Ok(())
    }

    pub(super) fn private_consumer() -> &'static str {
        private::CONSUMER
    }

    /// The message type may itself come from a path, and `Result` may be an alias.
    type HandlerResult = Result<(), HandlerError>;

    #[oncely::handler(consumer = "json")]
    pub async fn json(
        _conn: &mut AsyncPgConnection,
        _msg: Envelope<serde_json::Value>,
    ) -> HandlerResult {
        Ok(())
    }
}

macro_rules! handler_via_macro_rules {
    ($name:ident, $msg:ty) => {
        #[oncely::handler(consumer = "from_macro_rules")]
        pub async fn $name(
            conn: &mut AsyncPgConnection,
            msg: Envelope<$msg>,
        ) -> Result<(), HandlerError> {
            let _ = (conn, msg);
            Ok(())
        }
    };
}

handler_via_macro_rules!(generated, OrderCreated);

fn consumer_of<H: Handler>(handler: &H) -> &str {
    handler.consumer_name()
}

fn main() {
    assert_eq!(consumer_of(&handlers::create_invoice), "billing");
    assert_eq!(consumer_of(&handlers::audit), "audit");
    assert_eq!(handlers::private_consumer(), "private");
    assert_eq!(handlers::json::CONSUMER, "json");
    assert_eq!(generated::CONSUMER, "from_macro_rules");
    let boxed: Box<dyn Handler<Message = OrderCreated>> = Box::new(handlers::create_invoice);
    assert_eq!(boxed.consumer_name(), "billing");
}
