use oncely::{AsyncPgConnection, Envelope, HandlerError};

pub struct Billing;

impl Billing {
    #[oncely::handler(consumer = "billing")]
    pub async fn create_invoice(
        &self,
        _conn: &mut AsyncPgConnection,
        _msg: Envelope<String>,
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}

fn main() {}
