use oncely::{AsyncPgConnection, Envelope, HandlerError};

#[oncely::handler(consumer = "billing")]
pub async fn generic<T: serde::de::DeserializeOwned>(
    _conn: &mut AsyncPgConnection,
    _msg: Envelope<T>,
) -> Result<(), HandlerError> {
    Ok(())
}

#[oncely::handler(consumer = "billing")]
pub async fn with_where(
    _conn: &mut AsyncPgConnection,
    _msg: Envelope<String>,
) -> Result<(), HandlerError>
where
    String: Send,
{
    Ok(())
}

fn main() {}
