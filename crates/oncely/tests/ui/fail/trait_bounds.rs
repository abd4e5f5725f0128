use oncely::{AsyncPgConnection, Envelope, HandlerError};

use std::rc::Rc;

#[oncely::handler(consumer = "billing")]
pub async fn holds_rc(
    _conn: &mut AsyncPgConnection,
    _msg: Envelope<String>,
) -> Result<(), HandlerError> {
    let rc = Rc::new(1);
    std::future::ready(()).await;
    drop(rc);
    Ok(())
}

pub struct NotDeserialize;

#[oncely::handler(consumer = "billing")]
pub async fn bad_message(
    _conn: &mut AsyncPgConnection,
    _msg: Envelope<NotDeserialize>,
) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
