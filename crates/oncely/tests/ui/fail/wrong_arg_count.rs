use oncely::{AsyncPgConnection, Envelope, HandlerError};

#[oncely::handler(consumer = "billing")]
pub async fn none() -> Result<(), HandlerError> {
    Ok(())
}

#[oncely::handler(consumer = "billing")]
pub async fn one(_msg: Envelope<String>) -> Result<(), HandlerError> {
    Ok(())
}

#[oncely::handler(consumer = "billing")]
pub async fn three(
    _conn: &mut AsyncPgConnection,
    _msg: Envelope<String>,
    _extra: u32,
) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
