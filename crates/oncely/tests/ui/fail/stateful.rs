use oncely::{AsyncPgConnection, Envelope, HandlerError};

pub struct Two;

#[oncely::handler(consumer = "two")]
impl Two {
    pub async fn a(&self, _conn: &mut AsyncPgConnection, _msg: Envelope<String>) -> Result<(), HandlerError> {
        Ok(())
    }
    pub async fn b(&self, _conn: &mut AsyncPgConnection, _msg: Envelope<String>) -> Result<(), HandlerError> {
        Ok(())
    }
}

pub struct Exclusive;

#[oncely::handler(consumer = "exclusive")]
impl Exclusive {
    pub async fn handle(&mut self, _conn: &mut AsyncPgConnection, _msg: Envelope<String>) -> Result<(), HandlerError> {
        Ok(())
    }
}

pub struct NoSelf;

#[oncely::handler(consumer = "no-self")]
impl NoSelf {
    pub async fn handle(_conn: &mut AsyncPgConnection, _msg: Envelope<String>) -> Result<(), HandlerError> {
        Ok(())
    }
}

pub struct NotStr {
    id: u32,
}

#[oncely::handler(consumer = self.id)]
impl NotStr {
    pub async fn handle(&self, _conn: &mut AsyncPgConnection, _msg: Envelope<String>) -> Result<(), HandlerError> {
        Ok(())
    }
}

fn main() {}
