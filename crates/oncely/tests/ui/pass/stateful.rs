//! Handlers with state: `#[oncely::handler]` on an `impl` block, and a constant for the name.

use oncely::{AsyncPgConnection, Envelope, Handler, HandlerError};

#[derive(Debug, serde::Deserialize)]
pub struct OrderCreated {
    pub order_id: String,
}

pub const CONSUMER: &str = "fulfillment";

mod names {
    pub const AUDIT: &str = "audit";
}

/// A free handler named by a constant.
#[oncely::handler(consumer = names::AUDIT)]
pub async fn audit(_conn: &mut AsyncPgConnection, _msg: Envelope<OrderCreated>) -> Result<(), HandlerError> {
    Ok(())
}

pub struct ReserveStock {
    limit: usize,
}

/// The handler's method, with the value as `self`.
#[oncely::handler(consumer = CONSUMER)]
impl ReserveStock {
    /// Refuses long order ids.
    pub async fn reserve(
        &self,
        _conn: &mut AsyncPgConnection,
        msg: Envelope<OrderCreated>,
    ) -> Result<(), HandlerError> {
        self.check(&msg.payload.order_id)
    }
}

// Helpers live in another block.
impl ReserveStock {
    fn check(&self, order_id: &str) -> Result<(), HandlerError> {
        if order_id.len() > self.limit {
            return Err(HandlerError::permanent("too_long", "order id too long"));
        }
        Ok(())
    }
}

/// A name read from the value, and a method called `handle` like the trait's.
struct Named {
    name: String,
}

#[oncely::handler(consumer = &self.name)]
impl Named {
    async fn handle(
        &self,
        _conn: &mut AsyncPgConnection,
        _msg: Envelope<serde_json::Value>,
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}

fn consumer_of<H: Handler>(handler: &H) -> &str {
    handler.consumer_name()
}

fn main() {
    assert_eq!(audit::CONSUMER, "audit");
    assert_eq!(consumer_of(&ReserveStock { limit: 3 }), "fulfillment");
    assert_eq!(consumer_of(&Named { name: "n-1".into() }), "n-1");
    let boxed: Box<dyn Handler<Message = OrderCreated>> = Box::new(ReserveStock { limit: 3 });
    assert_eq!(boxed.consumer_name(), "fulfillment");
}
