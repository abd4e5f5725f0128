use oncely::{AsyncPgConnection, Envelope, HandlerError};

#[oncely::handler]
pub async fn no_args(
    _conn: &mut AsyncPgConnection,
    _msg: Envelope<String>,
) -> Result<(), HandlerError> {
    Ok(())
}

#[oncely::handler()]
pub async fn empty_args(
    _conn: &mut AsyncPgConnection,
    _msg: Envelope<String>,
) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
