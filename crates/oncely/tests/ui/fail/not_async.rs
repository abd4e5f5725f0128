use oncely::{AsyncPgConnection, Envelope, HandlerError};

#[oncely::handler(consumer = "billing")]
pub fn create_invoice(
    _conn: &mut AsyncPgConnection,
    _msg: Envelope<String>,
) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
