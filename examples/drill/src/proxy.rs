//! A TCP proxy on 127.0.0.1 between the services and RabbitMQ or PostgreSQL, to break the
//! network on purpose: add latency, cut every connection, or black-hole them (bytes stop
//! flowing but both sides keep their sockets open, as with a dead peer behind a firewall:
//! only heartbeats or timeouts notice).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug)]
struct Shared {
    upstream: String,
    latency_ms: AtomicU64,
    black_hole: AtomicBool,
    cuts: watch::Sender<u64>,
    accepted: AtomicU64,
}

/// A running proxy. Dropping it does not stop it; it lives as long as the drill.
#[derive(Debug, Clone)]
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards every connection to `upstream`
    /// (`host:port`).
    pub async fn start(upstream: &str) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cuts, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            upstream: upstream.to_owned(),
            latency_ms: AtomicU64::new(0),
            black_hole: AtomicBool::new(false),
            cuts,
            accepted: AtomicU64::new(0),
        });
        let accept = shared.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                accept.accepted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(connection(client, accept.clone()));
            }
        });
        Ok(Proxy { addr, shared })
    }

    /// `127.0.0.1:<port>` to connect to instead of the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Delays every chunk of bytes, both ways, by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        self.shared
            .latency_ms
            .store(latency.as_millis() as u64, Ordering::Relaxed);
    }

    /// Closes every connection open now (both sides see a reset or EOF).
    pub fn cut_all(&self) {
        self.shared.cuts.send_modify(|n| *n += 1);
    }

    /// While on, no byte moves in either direction and sockets stay open.
    pub fn set_black_hole(&self, on: bool) {
        self.shared.black_hole.store(on, Ordering::Relaxed);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }
}

async fn connection(client: TcpStream, shared: Arc<Shared>) {
    let Ok(upstream) = TcpStream::connect(&shared.upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    // Either direction ending (EOF, error, cut) drops all four halves: both sockets close.
    tokio::select! {
        _ = pump(client_read, upstream_write, &shared) => {}
        _ = pump(upstream_read, client_write, &shared) => {}
    }
}

async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, shared: &Shared) {
    let mut cuts = shared.cuts.subscribe();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            _ = cuts.changed() => return,
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
        };
        loop {
            let held = shared.black_hole.load(Ordering::Relaxed);
            let latency = shared.latency_ms.load(Ordering::Relaxed);
            if !held && latency == 0 {
                break;
            }
            let wait = if held { 50 } else { latency };
            tokio::select! {
                _ = cuts.changed() => return,
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            }
            if !held {
                break;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// `host:port` of a `scheme://[user[:password]@]host[:port][/rest]` URL, with `default_port`.
pub fn authority(url: &str, default_port: u16) -> Option<String> {
    let (_, rest) = url.split_once("://")?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let host_port = rest[..end].rsplit('@').next()?;
    if host_port.is_empty() {
        return None;
    }
    if host_port
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        Some(host_port.to_owned())
    } else {
        Some(format!("{host_port}:{default_port}"))
    }
}

/// `url` with its host and port replaced by `addr`.
pub fn via(url: &str, addr: SocketAddr) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let userinfo = authority.rsplit_once('@').map(|(u, _)| u);
    Some(match userinfo {
        Some(u) => format!("{scheme}://{u}@{addr}{}", &rest[end..]),
        None => format!("{scheme}://{addr}{}", &rest[end..]),
    })
}

/// `url` with the query parameter `key=value` added (the URL's own value wins if it has one).
pub fn with_param(url: &str, key: &str, value: &str) -> String {
    let query = url.split_once('?').map(|(_, q)| q).unwrap_or("");
    if query.split('&').any(|p| p.split('=').next() == Some(key)) {
        return url.to_owned();
    }
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{key}={value}")
}

/// The value of query parameter `key` in `url`.
pub fn param(url: &str, key: &str) -> Option<String> {
    let (_, query) = url.split_once('?')?;
    query.split('&').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k == key).then(|| v.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_rewritten_to_the_proxy() {
        let addr: SocketAddr = "127.0.0.1:4000".parse().expect("addr");
        assert_eq!(
            authority("amqp://guest:guest@127.0.0.1:5672/%2f", 5672).as_deref(),
            Some("127.0.0.1:5672")
        );
        assert_eq!(
            authority("postgres://postgres@db.example/oncely", 5432).as_deref(),
            Some("db.example:5432")
        );
        assert_eq!(
            via("amqp://guest:guest@127.0.0.1:5672/%2f", addr).as_deref(),
            Some("amqp://guest:guest@127.0.0.1:4000/%2f")
        );
        assert_eq!(
            via("postgres://postgres@127.0.0.1:5432/oncely?options=x", addr).as_deref(),
            Some("postgres://postgres@127.0.0.1:4000/oncely?options=x")
        );
        assert_eq!(
            with_param("postgres://h/db", "application_name", "a"),
            "postgres://h/db?application_name=a"
        );
        assert_eq!(
            with_param(
                "postgres://h/db?application_name=b",
                "application_name",
                "a"
            ),
            "postgres://h/db?application_name=b"
        );
        assert_eq!(
            param("postgres://h/db?x=1&application_name=b", "application_name").as_deref(),
            Some("b")
        );
    }

    #[tokio::test]
    async fn bytes_flow_stall_and_are_cut() {
        let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let echo_addr = echo.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let proxy = Proxy::start(&echo_addr.to_string()).await.expect("proxy");
        let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
        let mut buf = [0u8; 4];
        s.write_all(b"ping").await.expect("write");
        s.read_exact(&mut buf).await.expect("echo");
        assert_eq!(&buf, b"ping");

        proxy.set_black_hole(true);
        s.write_all(b"lost").await.expect("write is accepted");
        let stalled =
            tokio::time::timeout(Duration::from_millis(300), s.read_exact(&mut buf)).await;
        assert!(stalled.is_err(), "nothing comes back through a black hole");
        proxy.set_black_hole(false);
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
            .await
            .expect("flows again")
            .expect("read");
        assert_eq!(&buf, b"lost");

        proxy.cut_all();
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the cut is seen");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        assert_eq!(proxy.accepted(), 1);
    }
}
