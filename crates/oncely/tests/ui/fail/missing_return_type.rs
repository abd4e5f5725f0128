use oncely::{AsyncPgConnection, Envelope};

#[oncely::handler(consumer = "billing")]
pub async fn no_return(_conn: &mut AsyncPgConnection, _msg: Envelope<String>) {}

fn main() {}
