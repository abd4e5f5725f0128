use oncely::{AsyncPgConnection, HandlerError};

#[oncely::handler(consumer = "billing")]
pub async fn bare_payload(_conn: &mut AsyncPgConnection, _msg: String) -> Result<(), HandlerError> {
    Ok(())
}

#[oncely::handler(consumer = "billing")]
pub async fn other_generic(
    _conn: &mut AsyncPgConnection,
    _msg: Vec<String>,
) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
