use oncely::{AsyncPgConnection, Envelope, HandlerError};

#[oncely::handler(consumer = "billing", queue = "orders")]
pub async fn unknown_key(
    _conn: &mut AsyncPgConnection,
    _msg: Envelope<String>,
) -> Result<(), HandlerError> {
    Ok(())
}

#[oncely::handler(consumer = &self.name)]
pub async fn reads_self(
    _conn: &mut AsyncPgConnection,
    _msg: Envelope<String>,
) -> Result<(), HandlerError> {
    Ok(())
}

#[oncely::handler(consumer = 42)]
pub async fn not_a_string(
    _conn: &mut AsyncPgConnection,
    _msg: Envelope<String>,
) -> Result<(), HandlerError> {
    Ok(())
}

#[oncely::handler(consumer)]
pub async fn no_value(
    _conn: &mut AsyncPgConnection,
    _msg: Envelope<String>,
) -> Result<(), HandlerError> {
    Ok(())
}

#[oncely::handler(consumer = "a", consumer = "b")]
pub async fn duplicate(
    _conn: &mut AsyncPgConnection,
    _msg: Envelope<String>,
) -> Result<(), HandlerError> {
    Ok(())
}

#[oncely::handler(consumer = "")]
pub async fn empty(
    _conn: &mut AsyncPgConnection,
    _msg: Envelope<String>,
) -> Result<(), HandlerError> {
    Ok(())
}

#[oncely::handler(consumer = "  ")]
pub async fn blank(
    _conn: &mut AsyncPgConnection,
    _msg: Envelope<String>,
) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
