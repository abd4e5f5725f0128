//! A minimal AMQP 0-9-1 publisher written by hand over a TCP socket, for producers that lapin
//! cannot imitate: lapin only sends UTF-8 short strings, while RabbitMQ accepts any bytes there
//! (Python's pika sends them raw). Every property is a byte string here, header names included,
//! and headers may carry every value type RabbitMQ reads.
//!
//! It speaks just enough of the protocol to publish with confirms: protocol header, PLAIN
//! login, tune, open, channel, confirm.select, basic.publish, close. No heartbeats (it asks for
//! none), no TLS.
//!
//! Used by the end-to-end tests (`oncely_e2e::raw_amqp`) and by the drill's hostile producer
//! (`--faults hostile`).

use std::io;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_END: u8 = 0xCE;
const CHANNEL: u16 = 1;

/// A header value of any type RabbitMQ's field tables carry.
#[derive(Debug, Clone, PartialEq)]
pub enum RawValue {
    /// `t`
    Bool(bool),
    /// `b`
    I8(i8),
    /// `B`
    U8(u8),
    /// `s` (RabbitMQ's short int)
    I16(i16),
    /// `u`
    U16(u16),
    /// `I`
    I32(i32),
    /// `i`
    U32(u32),
    /// `l`
    I64(i64),
    /// `f`
    F32(f32),
    /// `d`
    F64(f64),
    /// `D`: scale (decimal places) and unscaled value.
    Decimal(u8, u32),
    /// `S`: any bytes.
    LongString(Vec<u8>),
    /// `A`
    Array(Vec<RawValue>),
    /// `T`: seconds since the epoch.
    Timestamp(u64),
    /// `F`
    Table(RawTable),
    /// `x`
    Bytes(Vec<u8>),
    /// `V`
    Void,
    /// Any tag followed by any bytes, for values no parser knows.
    Tagged(u8, Vec<u8>),
}

/// A field table whose names are raw bytes (they need not be UTF-8).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawTable(pub Vec<(Vec<u8>, RawValue)>);

impl RawTable {
    /// Adds an entry.
    pub fn with(mut self, name: impl Into<Vec<u8>>, value: RawValue) -> RawTable {
        self.0.push((name.into(), value));
        self
    }

    /// The table as it goes on the wire, length prefix included.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        for (name, value) in &self.0 {
            short_string(&mut body, name);
            value.encode(&mut body);
        }
        long_bytes(&body)
    }
}

impl RawValue {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            RawValue::Bool(b) => out.extend([b't', u8::from(*b)]),
            RawValue::I8(n) => out.extend([b'b', n.to_be_bytes()[0]]),
            RawValue::U8(n) => out.extend([b'B', *n]),
            RawValue::I16(n) => tagged(out, b's', &n.to_be_bytes()),
            RawValue::U16(n) => tagged(out, b'u', &n.to_be_bytes()),
            RawValue::I32(n) => tagged(out, b'I', &n.to_be_bytes()),
            RawValue::U32(n) => tagged(out, b'i', &n.to_be_bytes()),
            RawValue::I64(n) => tagged(out, b'l', &n.to_be_bytes()),
            RawValue::F32(n) => tagged(out, b'f', &n.to_be_bytes()),
            RawValue::F64(n) => tagged(out, b'd', &n.to_be_bytes()),
            RawValue::Decimal(scale, value) => {
                out.extend([b'D', *scale]);
                out.extend(value.to_be_bytes());
            }
            RawValue::LongString(s) => tagged(out, b'S', &long_bytes(s)),
            RawValue::Array(items) => {
                let mut body = Vec::new();
                for item in items {
                    item.encode(&mut body);
                }
                tagged(out, b'A', &long_bytes(&body));
            }
            RawValue::Timestamp(t) => tagged(out, b'T', &t.to_be_bytes()),
            RawValue::Table(t) => tagged(out, b'F', &t.encode()),
            RawValue::Bytes(b) => tagged(out, b'x', &long_bytes(b)),
            RawValue::Void => out.push(b'V'),
            RawValue::Tagged(tag, bytes) => tagged(out, *tag, bytes),
        }
    }
}

/// Basic class properties as raw bytes; `None` leaves a property out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawProperties {
    /// `content-type`
    pub content_type: Option<Vec<u8>>,
    /// `content-encoding`
    pub content_encoding: Option<Vec<u8>>,
    /// `headers`
    pub headers: Option<RawTable>,
    /// `delivery-mode`
    pub delivery_mode: Option<u8>,
    /// `priority`
    pub priority: Option<u8>,
    /// `correlation-id`
    pub correlation_id: Option<Vec<u8>>,
    /// `reply-to`
    pub reply_to: Option<Vec<u8>>,
    /// `expiration`
    pub expiration: Option<Vec<u8>>,
    /// `message-id`
    pub message_id: Option<Vec<u8>>,
    /// `timestamp`
    pub timestamp: Option<u64>,
    /// `type`
    pub kind: Option<Vec<u8>>,
    /// `user-id` (RabbitMQ refuses one that is not the logged-in user)
    pub user_id: Option<Vec<u8>>,
    /// `app-id`
    pub app_id: Option<Vec<u8>>,
}

impl RawProperties {
    /// A JSON, persistent message with `message_id`.
    pub fn json(message_id: impl Into<Vec<u8>>) -> RawProperties {
        RawProperties {
            content_type: Some(b"application/json".to_vec()),
            delivery_mode: Some(2),
            message_id: Some(message_id.into()),
            ..RawProperties::default()
        }
    }

    /// Property flags and list, as they follow body-size in a content header.
    fn encode(&self) -> Vec<u8> {
        let mut flags = 0u16;
        let mut list = Vec::new();
        let mut short = |bit: u16, value: &Option<Vec<u8>>, list: &mut Vec<u8>| {
            if let Some(v) = value {
                flags |= 1 << bit;
                short_string(list, v);
            }
        };
        short(15, &self.content_type, &mut list);
        short(14, &self.content_encoding, &mut list);
        let mut flags2 = 0u16;
        if let Some(h) = &self.headers {
            flags2 |= 1 << 13;
            list.extend(h.encode());
        }
        if let Some(m) = self.delivery_mode {
            flags2 |= 1 << 12;
            list.push(m);
        }
        if let Some(p) = self.priority {
            flags2 |= 1 << 11;
            list.push(p);
        }
        short(10, &self.correlation_id, &mut list);
        short(9, &self.reply_to, &mut list);
        short(8, &self.expiration, &mut list);
        short(7, &self.message_id, &mut list);
        if let Some(t) = self.timestamp {
            flags2 |= 1 << 6;
            list.extend(t.to_be_bytes());
        }
        short(5, &self.kind, &mut list);
        short(4, &self.user_id, &mut list);
        short(3, &self.app_id, &mut list);
        let mut out = (flags | flags2).to_be_bytes().to_vec();
        out.extend(list);
        out
    }
}

fn tagged(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
    out.push(tag);
    out.extend_from_slice(bytes);
}

fn short_string(out: &mut Vec<u8>, s: &[u8]) {
    let len = s.len().min(255);
    out.push(len as u8);
    out.extend_from_slice(&s[..len]);
}

fn long_bytes(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

fn protocol_error(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Where and as whom to connect, from an `amqp://user:pass@host:port/vhost` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// `host:port`
    pub host_port: String,
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
    /// Virtual host (percent-decoded).
    pub vhost: String,
}

impl Address {
    /// Parses a plain `amqp://` URL (the forms the tests use; defaults as RabbitMQ's).
    pub fn parse(url: &str) -> io::Result<Address> {
        let rest = url
            .strip_prefix("amqp://")
            .ok_or_else(|| protocol_error(format!("not an amqp:// URL: {url}")))?;
        let (authority, vhost) = rest.split_once('/').unwrap_or((rest, ""));
        let (credentials, host) = authority
            .rsplit_once('@')
            .unwrap_or(("guest:guest", authority));
        let (user, password) = credentials.split_once(':').unwrap_or((credentials, ""));
        let host_port = if host.contains(':') {
            host.to_owned()
        } else {
            format!("{host}:5672")
        };
        let vhost = match vhost {
            "" => "/".to_owned(),
            v => v.replace("%2f", "/").replace("%2F", "/"),
        };
        Ok(Address {
            host_port,
            user: user.to_owned(),
            password: password.to_owned(),
            vhost,
        })
    }
}

/// One connection with one channel in confirm mode.
#[derive(Debug)]
pub struct RawPublisher {
    stream: TcpStream,
    frame_max: u32,
    published: u64,
}

impl RawPublisher {
    /// Connects and logs in (PLAIN), opens channel 1 and turns on publisher confirms.
    pub async fn connect(url: &str) -> io::Result<RawPublisher> {
        let address = Address::parse(url)?;
        let mut stream = TcpStream::connect(&address.host_port).await?;
        stream.write_all(b"AMQP\x00\x00\x09\x01").await?;
        let mut p = RawPublisher {
            stream,
            frame_max: 4096,
            published: 0,
        };
        p.expect(0, 10, 10).await?; // connection.start
        let mut start_ok = method(10, 11);
        start_ok.extend(RawTable::default().encode()); // client properties
        short_string(&mut start_ok, b"PLAIN");
        let response = format!("\0{}\0{}", address.user, address.password);
        start_ok.extend(long_bytes(response.as_bytes()));
        short_string(&mut start_ok, b"en_US");
        p.send(FRAME_METHOD, 0, &start_ok).await?;
        let tune = p.expect(0, 10, 30).await?;
        let channel_max = tune.get(4..6).ok_or_else(|| protocol_error("short tune"))?;
        let frame_max = tune
            .get(6..10)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| protocol_error("short tune"))?;
        p.frame_max = if frame_max == 0 { 131_072 } else { frame_max };
        let mut tune_ok = method(10, 31);
        tune_ok.extend_from_slice(channel_max);
        tune_ok.extend(p.frame_max.to_be_bytes());
        tune_ok.extend(0u16.to_be_bytes()); // no heartbeats
        p.send(FRAME_METHOD, 0, &tune_ok).await?;
        let mut open = method(10, 40);
        short_string(&mut open, address.vhost.as_bytes());
        short_string(&mut open, b"");
        open.push(0);
        p.send(FRAME_METHOD, 0, &open).await?;
        p.expect(0, 10, 41).await?;
        let mut channel_open = method(20, 10);
        short_string(&mut channel_open, b"");
        p.send(FRAME_METHOD, CHANNEL, &channel_open).await?;
        p.expect(CHANNEL, 20, 11).await?;
        let mut select = method(85, 10);
        select.push(0);
        p.send(FRAME_METHOD, CHANNEL, &select).await?;
        p.expect(CHANNEL, 85, 11).await?;
        Ok(p)
    }

    /// Binds `queue` to `exchange` with any routing key bytes.
    pub async fn bind(
        &mut self,
        queue: &[u8],
        exchange: &[u8],
        routing_key: &[u8],
    ) -> io::Result<()> {
        let mut bind = method(50, 20);
        bind.extend(0u16.to_be_bytes());
        short_string(&mut bind, queue);
        short_string(&mut bind, exchange);
        short_string(&mut bind, routing_key);
        bind.push(0);
        bind.extend(RawTable::default().encode());
        self.send(FRAME_METHOD, CHANNEL, &bind).await?;
        self.expect(CHANNEL, 50, 21).await.map(drop)
    }

    /// Publishes one message and waits for the broker's confirm.
    pub async fn publish(
        &mut self,
        exchange: &[u8],
        routing_key: &[u8],
        properties: &RawProperties,
        body: &[u8],
    ) -> io::Result<()> {
        let mut publish = method(60, 40);
        publish.extend(0u16.to_be_bytes());
        short_string(&mut publish, exchange);
        short_string(&mut publish, routing_key);
        publish.push(0); // neither mandatory nor immediate
        self.send(FRAME_METHOD, CHANNEL, &publish).await?;
        let mut header = 60u16.to_be_bytes().to_vec();
        header.extend(0u16.to_be_bytes());
        header.extend((body.len() as u64).to_be_bytes());
        header.extend(properties.encode());
        self.send(FRAME_HEADER, CHANNEL, &header).await?;
        let chunk = (self.frame_max as usize).saturating_sub(8).max(1);
        for part in body.chunks(chunk) {
            self.send(FRAME_BODY, CHANNEL, part).await?;
        }
        self.published += 1;
        let ack = self.expect_any(CHANNEL, &[(60, 80), (60, 120)]).await?;
        if ack.get(2..4) == Some(&120u16.to_be_bytes()[..]) {
            return Err(protocol_error("the broker nacked the publish"));
        }
        Ok(())
    }

    /// Closes the connection politely.
    pub async fn close(mut self) -> io::Result<()> {
        let mut close = method(10, 50);
        close.extend(200u16.to_be_bytes());
        short_string(&mut close, b"done");
        close.extend([0, 0, 0, 0]);
        self.send(FRAME_METHOD, 0, &close).await?;
        self.expect(0, 10, 51).await.map(drop)
    }

    async fn send(&mut self, kind: u8, channel: u16, payload: &[u8]) -> io::Result<()> {
        let mut frame = vec![kind];
        frame.extend(channel.to_be_bytes());
        frame.extend((payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        frame.push(FRAME_END);
        self.stream.write_all(&frame).await
    }

    async fn expect(&mut self, channel: u16, class: u16, method: u16) -> io::Result<Vec<u8>> {
        self.expect_any(channel, &[(class, method)]).await
    }

    /// Reads frames until a method frame on `channel` is one of `wanted`; a close from the
    /// broker is an error carrying its reply text.
    async fn expect_any(&mut self, channel: u16, wanted: &[(u16, u16)]) -> io::Result<Vec<u8>> {
        loop {
            let (kind, on, payload) = self.read_frame().await?;
            if kind != FRAME_METHOD || payload.len() < 4 {
                continue;
            }
            let id = (
                u16::from_be_bytes([payload[0], payload[1]]),
                u16::from_be_bytes([payload[2], payload[3]]),
            );
            if id == (10, 50) || id == (20, 40) {
                let text = payload
                    .get(7..)
                    .and_then(|t| t.get(..usize::from(payload[6])))
                    .unwrap_or_default();
                return Err(protocol_error(format!(
                    "broker closed the {}: {}",
                    if id.0 == 10 { "connection" } else { "channel" },
                    String::from_utf8_lossy(text)
                )));
            }
            if on == channel && wanted.contains(&id) {
                return Ok(payload);
            }
        }
    }

    async fn read_frame(&mut self) -> io::Result<(u8, u16, Vec<u8>)> {
        let mut header = [0u8; 7];
        self.stream.read_exact(&mut header).await?;
        let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
        let mut payload = vec![0u8; size + 1];
        self.stream.read_exact(&mut payload).await?;
        if payload.pop() != Some(FRAME_END) {
            return Err(protocol_error("frame without frame-end"));
        }
        Ok((
            header[0],
            u16::from_be_bytes([header[1], header[2]]),
            payload,
        ))
    }
}

fn method(class: u16, method: u16) -> Vec<u8> {
    let mut out = class.to_be_bytes().to_vec();
    out.extend(method.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_like_rabbitmqs_defaults() {
        let a = Address::parse("amqp://guest:guest@127.0.0.1:5672/%2f").expect("url");
        assert_eq!(a.host_port, "127.0.0.1:5672");
        assert_eq!((a.user.as_str(), a.password.as_str()), ("guest", "guest"));
        assert_eq!(a.vhost, "/");
        let a = Address::parse("amqp://u:p@broker/orders").expect("url");
        assert_eq!(
            (a.host_port.as_str(), a.vhost.as_str()),
            ("broker:5672", "orders")
        );
    }

    #[test]
    fn properties_are_encoded_in_flag_order() {
        let p = RawProperties {
            headers: Some(RawTable::default().with(b"k\xff".to_vec(), RawValue::Void)),
            ..RawProperties::json(b"m\xff".to_vec())
        };
        let e = p.encode();
        // content-type, headers, delivery-mode, message-id
        assert_eq!(
            u16::from_be_bytes([e[0], e[1]]),
            0x8000 | 0x2000 | 0x1000 | 0x0080
        );
        assert_eq!(&e[2..19], b"\x10application/json");
        assert_eq!(&e[19..23], &[0, 0, 0, 4]);
        assert_eq!(&e[23..27], b"\x02k\xffV");
        assert_eq!(e[27], 2);
        assert_eq!(&e[28..], b"\x02m\xff");
    }
}
