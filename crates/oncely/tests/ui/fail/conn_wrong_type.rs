use oncely::{AsyncPgConnection, Envelope, HandlerError};

pub struct Connection;

#[oncely::handler(consumer = "billing")]
pub async fn wrong_connection(
    _conn: &mut Connection,
    _msg: Envelope<String>,
) -> Result<(), HandlerError> {
    Ok(())
}

#[oncely::handler(consumer = "billing")]
pub async fn shared_ref(
    _conn: &AsyncPgConnection,
    _msg: Envelope<String>,
) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
