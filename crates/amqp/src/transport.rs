//! How oncely opens an AMQP connection: lapin over a socket whose incoming frames are made
//! readable first.
//!
//! RabbitMQ forwards any bytes in AMQP short strings (`message_id`, `type`, header names,
//! routing keys...), and amq-protocol decodes them with `String::from_utf8`: one such delivery
//! fails the whole connection, and a consumer that reconnects gets the same message again, for
//! ever. Patching amq-protocol in our workspace would not reach our users' builds, so the fix
//! lives in the transport instead: lapin's [`Connection::connector`] takes the function that opens
//! the socket, and ours wraps it (above TLS) in a [`frames::FrameRewriter`] that gives every
//! non-UTF-8 short string a same-length placeholder and keeps the original bytes in the
//! `x-oncely-invalid-utf8` header ([`oncely_core::headers::INVALID_UTF8`]), which the contract check turns into a dead letter. See
//! docs/decisions.md.
//!
//! lapin ties the socket type to the runtime (`AsyncTcpStream<<RK as Reactor>::TcpStream>`),
//! so the wrapped socket comes with a runtime kit: tokio's, with [`GuardedStream`] as its TCP
//! stream type.

mod frames;
mod stream;

pub(crate) use frames::{INVALID_UTF8_HEADER, UNREADABLE_HEADERS_HEADER};
pub use stream::GuardedStream;

use async_rs::traits::{Executor, Reactor, RuntimeKit};
use async_rs::util::Task;
use async_rs::{Runtime, Tokio};
use futures_lite::io::{AsyncRead, AsyncWrite};
use lapin::tcp::{AMQPUriTcpExt, AsyncTcpStream, OwnedTLSConfig};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties, ErrorKind};
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Opens one AMQP connection to `url` (`amqp://` or `amqps://`) whose incoming frames pass the
/// UTF-8 guard. Every connection oncely opens goes through here.
///
/// Must be called inside a tokio runtime, like lapin's own `Connection::connect`.
pub async fn open_connection(
    url: &str,
    properties: ConnectionProperties,
) -> lapin::Result<Connection> {
    let uri: AMQPUri = url
        .parse()
        .map_err(|e: String| lapin::Error::from(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let handle = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
    let tokio = Tokio::default().with_handle(handle);
    let client_frame_max = uri.query.frame_max.unwrap_or(0);
    let tls = OwnedTLSConfig::default();
    let socket_runtime = Runtime::new(tokio.clone());
    Connection::connector(
        uri,
        Runtime::new(GuardedKit { tokio }),
        // Called again by lapin on every automatic reconnection: each socket gets a fresh
        // rewriter, as frames never span connections.
        async move |uri: AMQPUri, _runtime: Runtime<GuardedKit>| {
            let socket = uri
                .connect_with_config_async(tls.as_ref(), &socket_runtime)
                .await
                .map_err(|e| io_error(&socket_runtime, e))?;
            Ok(AsyncTcpStream::Plain(GuardedStream::new(
                Box::new(socket),
                client_frame_max,
            )))
        },
        properties,
    )
    .await
}

/// The same classification lapin makes of a socket error: a runtime shutting down is not a
/// network failure.
fn io_error(runtime: &Runtime<Tokio>, error: io::Error) -> lapin::Error {
    if runtime.is_runtime_shutdown_error(&error) {
        ErrorKind::RuntimeShutdownError(Arc::new(error)).into()
    } else {
        error.into()
    }
}

/// tokio's runtime kit with [`GuardedStream`] as its TCP stream type: lapin names the socket
/// type through the runtime, so this is where the guarded socket is declared.
#[derive(Clone, Debug)]
pub struct GuardedKit {
    tokio: Tokio,
}

impl RuntimeKit for GuardedKit {}

impl Executor for GuardedKit {
    type Task<T: Send + 'static> = <Tokio as Executor>::Task<T>;

    fn block_on<T, F: Future<Output = T>>(&self, f: F) -> T {
        self.tokio.block_on(f)
    }

    fn spawn<T: Send + 'static, F: Future<Output = T> + Send + 'static>(
        &self,
        f: F,
    ) -> Task<Self::Task<T>> {
        self.tokio.spawn(f)
    }

    fn spawn_blocking<T: Send + 'static, F: FnOnce() -> T + Send + 'static>(
        &self,
        f: F,
    ) -> Task<Self::Task<T>> {
        self.tokio.spawn_blocking(f)
    }
}

impl Reactor for GuardedKit {
    type TcpStream = GuardedStream;
    type Sleep = <Tokio as Reactor>::Sleep;

    /// Not used by lapin (sockets come from the connect function); async-rs does not let other
    /// crates name the bound it needs to forward, so this says so instead.
    fn register<H: Read + Write + Send + 'static>(
        &self,
        _socket: H,
    ) -> io::Result<impl AsyncRead + AsyncWrite + Send + Unpin + 'static> {
        Err::<GuardedStream, _>(io::Error::new(
            io::ErrorKind::Unsupported,
            "oncely's guarded runtime does not register raw sockets",
        ))
    }

    fn sleep(&self, dur: Duration) -> Self::Sleep {
        self.tokio.sleep(dur)
    }

    fn interval(
        &self,
        dur: Duration,
    ) -> impl futures_lite::Stream<Item = Instant> + Send + 'static {
        self.tokio.interval(dur)
    }

    fn tcp_connect_addr(
        &self,
        addr: SocketAddr,
    ) -> impl Future<Output = io::Result<Self::TcpStream>> + Send + 'static {
        let socket = self.tokio.tcp_connect_addr(addr);
        async move { Ok(GuardedStream::new(Box::new(socket.await?), 0)) }
    }
}
