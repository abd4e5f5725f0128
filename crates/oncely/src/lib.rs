//! oncely: effectively-once RabbitMQ consumers.

mod handler;

pub use diesel_async::AsyncPgConnection;
pub use handler::{BoxFuture, Handler};
pub use oncely_core::{Envelope, ErrorKind, HandlerError, Metadata};
pub use oncely_macros::handler;

#[doc(hidden)]
pub mod __private {
    pub use crate::handler::BoxFuture;
    pub use diesel_async::AsyncPgConnection;
    pub use oncely_core::{Envelope, HandlerError};
    pub use std::boxed::Box;
    pub use std::result::Result;
}
