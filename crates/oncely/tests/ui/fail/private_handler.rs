use oncely::{AsyncPgConnection, Envelope, HandlerError};

mod handlers {
    use super::*;

    #[oncely::handler(consumer = "billing")]
    async fn create_invoice(
        _conn: &mut AsyncPgConnection,
        _msg: Envelope<String>,
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}

fn main() {
    let _ = handlers::create_invoice::CONSUMER;
}
