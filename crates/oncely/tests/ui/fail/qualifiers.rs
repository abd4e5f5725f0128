use oncely::{AsyncPgConnection, Envelope, HandlerError};

#[oncely::handler(consumer = "billing")]
pub const fn constant(
    _conn: &mut AsyncPgConnection,
    _msg: Envelope<String>,
) -> Result<(), HandlerError> {
    Ok(())
}

#[oncely::handler(consumer = "billing")]
pub async unsafe fn not_safe(
    _conn: &mut AsyncPgConnection,
    _msg: Envelope<String>,
) -> Result<(), HandlerError> {
    Ok(())
}

#[oncely::handler(consumer = "billing")]
pub async extern "C" fn foreign(
    _conn: &mut AsyncPgConnection,
    _msg: Envelope<String>,
) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
