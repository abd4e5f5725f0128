use oncely::{AsyncPgConnection, Envelope};

#[oncely::handler(consumer = "billing")]
pub async fn string_error(
    _conn: &mut AsyncPgConnection,
    _msg: Envelope<String>,
) -> Result<(), String> {
    Ok(())
}

fn main() {}
