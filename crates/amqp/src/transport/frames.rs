//! A byte-level AMQP 0-9-1 frame rewriter for the bytes the broker sends us.
//!
//! RabbitMQ passes any bytes in short strings (properties, header names, routing keys) from the
//! producer to the consumer, while the client's parser only accepts UTF-8 there and fails the
//! whole connection otherwise. The rewriter sits between the socket and lapin's parser: it
//! reassembles frames and, in the few frames that carry producer-controlled short strings,
//! replaces each one that is not UTF-8 with a placeholder of the same length and records the
//! original bytes in a header ([`INVALID_UTF8_HEADER`]), so that the message reaches the contract
//! check (which dead-letters it) instead of taking the connection down. Everything else passes
//! through byte for byte.
//!
//! It is pure logic with no I/O, fed with whatever the socket gave, and never panics: a frame it
//! cannot read is passed through unchanged, so that lapin reports it as it always did.

use std::collections::HashMap;

/// Set when the frame had no room for the original headers next to the markers.
pub use oncely_core::headers::HEADERS_DROPPED as HEADERS_DROPPED_HEADER;
/// Added to a message whose properties, header names, exchange or routing key were not UTF-8.
pub use oncely_core::headers::INVALID_UTF8 as INVALID_UTF8_HEADER;
// No intra-doc link in the doc of a re-export: rustdoc stops with an internal error ("no
// resolutions for a doc link") on one.
/// Replaces a headers table that cannot be read at all (an unknown value type, a length that
/// runs past its end, nesting deeper than `MAX_TABLE_DEPTH`).
pub use oncely_core::headers::UNREADABLE_HEADERS as UNREADABLE_HEADERS_HEADER;

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_END: u8 = 0xCE;
const FRAME_HEADER_LEN: usize = 7;
/// Frame type + channel + size + frame-end: what a frame weighs besides its payload.
const FRAME_OVERHEAD: usize = FRAME_HEADER_LEN + 1;
/// AMQP 0-9-1 `frame-min-size`: no peer may negotiate a smaller frame_max.
const FRAME_MIN_SIZE: u32 = 4096;
/// Largest method or content-header frame held in memory before the tune tells the real limit
/// (connection.start carries the server's properties and may be a few KiB).
const MAX_BUFFERED_BEFORE_TUNE: usize = 1 << 20;
/// Largest method or content-header frame ever held in memory to be inspected, whatever the
/// negotiated frame_max; larger ones pass through unread.
const MAX_BUFFERED: usize = 16 << 20;
/// Nesting of header tables and arrays that is still inspected; deeper is treated as unreadable
/// rather than recursing without bound on hostile input.
pub const MAX_TABLE_DEPTH: usize = 32;

const CLASS_CONNECTION: u16 = 10;
const CLASS_CHANNEL: u16 = 20;
const CLASS_BASIC: u16 = 60;

/// The original bytes of one field that was not UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mark {
    /// `message_id`, `routing_key`, `headers.<name>`, ...
    pub field: String,
    pub original: Vec<u8>,
}

/// Rewrites the server-to-client byte stream of one connection; see the module documentation.
#[derive(Debug)]
pub struct FrameRewriter {
    state: State,
    /// The client's own frame_max (0: take the server's), as lapin starts from it.
    client_frame_max: u32,
    /// The frame_max lapin negotiated, once the server's connection.tune went by.
    frame_max: Option<u32>,
    /// Exchange / routing key marks of a basic.deliver, get-ok or return, waiting for the
    /// content header that follows it on the same channel.
    pending: HashMap<u16, Vec<Mark>>,
}

#[derive(Debug)]
enum State {
    /// Collecting the 7-byte frame header.
    Header {
        buf: [u8; FRAME_HEADER_LEN],
        have: usize,
    },
    /// Collecting a whole method or content-header frame (payload and frame-end).
    Frame {
        header: [u8; FRAME_HEADER_LEN],
        payload: Vec<u8>,
        need: usize,
    },
    /// Passing the rest of a frame through untouched.
    Stream { remaining: u64 },
    /// The framing is lost (garbage, a protocol header, a bad frame-end): everything passes
    /// through and lapin reports the problem.
    Passthrough,
}

impl State {
    fn header() -> State {
        State::Header {
            buf: [0; FRAME_HEADER_LEN],
            have: 0,
        }
    }
}

impl FrameRewriter {
    /// A rewriter for a connection whose client asks for `client_frame_max` (the URI's
    /// `frame_max`, 0 when not set).
    pub fn new(client_frame_max: u32) -> FrameRewriter {
        FrameRewriter {
            state: State::header(),
            client_frame_max,
            frame_max: None,
            pending: HashMap::new(),
        }
    }

    /// Feeds bytes read from the socket and appends what lapin should read to `out`.
    ///
    /// Bytes of a frame that is not complete yet are held back until it is (only frames that may
    /// be rewritten are held; bodies stream through).
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            match &mut self.state {
                State::Passthrough => {
                    out.extend_from_slice(input);
                    return;
                }
                State::Stream { remaining } => {
                    let n = usize::try_from(*remaining)
                        .unwrap_or(usize::MAX)
                        .min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    *remaining -= n as u64;
                    if *remaining == 0 {
                        self.state = State::header();
                    }
                }
                State::Header { buf, have } => {
                    let n = (FRAME_HEADER_LEN - *have).min(input.len());
                    buf[*have..*have + n].copy_from_slice(&input[..n]);
                    *have += n;
                    input = &input[n..];
                    if *have == FRAME_HEADER_LEN {
                        let header = *buf;
                        self.state = self.after_header(header, out);
                    }
                }
                State::Frame { payload, need, .. } => {
                    let n = (*need - payload.len()).min(input.len());
                    payload.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if payload.len() == *need
                        && let State::Frame {
                            header, payload, ..
                        } = std::mem::replace(&mut self.state, State::header())
                    {
                        self.state = self.complete_frame(header, payload, out);
                    }
                }
            }
        }
    }

    /// The bytes held back for an incomplete frame, for when the socket ends in the middle of
    /// one: lapin gets exactly what the server sent and reports the truncation itself.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        match std::mem::replace(&mut self.state, State::Passthrough) {
            State::Header { buf, have } => out.extend_from_slice(&buf[..have]),
            State::Frame {
                header, payload, ..
            } => {
                out.extend_from_slice(&header);
                out.extend_from_slice(&payload);
            }
            State::Stream { .. } | State::Passthrough => {}
        }
    }

    /// The frame size lapin enforces on what it reads, as far as we know it.
    fn frame_limit(&self) -> usize {
        let limit = match self.frame_max {
            Some(negotiated) => negotiated,
            // Content headers only come after the tune; should one come before, stay within
            // what every peer must accept.
            None => FRAME_MIN_SIZE,
        };
        usize::try_from(limit).unwrap_or(usize::MAX)
    }

    fn after_header(&mut self, header: [u8; FRAME_HEADER_LEN], out: &mut Vec<u8>) -> State {
        let kind = header[0];
        let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]);
        let whole = usize::try_from(size)
            .ok()
            .and_then(|s| s.checked_add(1))
            .unwrap_or(usize::MAX);
        let cap = match self.frame_max {
            Some(_) => self.frame_limit().min(MAX_BUFFERED),
            None => MAX_BUFFERED_BEFORE_TUNE,
        };
        match kind {
            FRAME_METHOD | FRAME_HEADER if whole <= cap => State::Frame {
                header,
                // The size comes from the wire: grow as bytes arrive rather than trusting it.
                payload: Vec::with_capacity(whole.min(64 * 1024)),
                need: whole,
            },
            // Method, header, body and heartbeat frames (RabbitMQ sends heartbeats as type 8).
            1..=4 | 8 => {
                out.extend_from_slice(&header);
                State::Stream {
                    remaining: u64::from(size) + 1,
                }
            }
            _ => {
                out.extend_from_slice(&header);
                State::Passthrough
            }
        }
    }

    fn complete_frame(
        &mut self,
        header: [u8; FRAME_HEADER_LEN],
        mut payload: Vec<u8>,
        out: &mut Vec<u8>,
    ) -> State {
        if payload.last() != Some(&FRAME_END) {
            out.extend_from_slice(&header);
            out.extend_from_slice(&payload);
            return State::Passthrough;
        }
        let channel = u16::from_be_bytes([header[1], header[2]]);
        let body_len = payload.len() - 1;
        let rewritten = match header[0] {
            FRAME_METHOD => {
                self.inspect_method(channel, &mut payload[..body_len]);
                None
            }
            FRAME_HEADER => {
                let marks = self.pending.remove(&channel).unwrap_or_default();
                rewrite_content_header(&payload[..body_len], marks, self.frame_limit())
            }
            _ => None,
        };
        match rewritten {
            Some(body) => match u32::try_from(body.len()) {
                Ok(size) => {
                    out.push(header[0]);
                    out.extend_from_slice(&header[1..3]);
                    out.extend_from_slice(&size.to_be_bytes());
                    out.extend_from_slice(&body);
                    out.push(FRAME_END);
                }
                Err(_) => {
                    out.extend_from_slice(&header);
                    out.extend_from_slice(&payload);
                }
            },
            None => {
                out.extend_from_slice(&header);
                out.extend_from_slice(&payload);
            }
        }
        State::header()
    }

    /// Learns the frame_max from connection.tune and replaces non-UTF-8 short strings of the
    /// method frames that carry them in place (same length, so the frame keeps its size).
    fn inspect_method(&mut self, channel: u16, body: &mut [u8]) {
        let (Some(class), Some(method)) = (read_u16(body, 0), read_u16(body, 2)) else {
            return;
        };
        match (class, method) {
            (CLASS_CONNECTION, 30) => {
                if let Some(server) = read_u32(body, 6) {
                    self.frame_max = Some(negotiate_frame_max(self.client_frame_max, server));
                }
            }
            // connection.close / channel.close: reply-code, reply-text. Nothing to keep: the
            // text is the broker's and only logged.
            (CLASS_CONNECTION, 50) | (CLASS_CHANNEL, 40) => {
                let mut marks = Vec::new();
                sanitize_in_place(body, 6, "reply_text", &mut marks);
            }
            // basic.deliver: consumer-tag, delivery-tag, redelivered, exchange, routing-key.
            (CLASS_BASIC, 60) => {
                let mut marks = Vec::new();
                let pos = short_string_end(body, 4).map(|p| p + 9);
                let pos = pos.and_then(|p| sanitize_in_place(body, p, "exchange", &mut marks));
                pos.and_then(|p| sanitize_in_place(body, p, "routing_key", &mut marks));
                self.pending.insert(channel, marks);
            }
            // basic.get-ok: delivery-tag, redelivered, exchange, routing-key, message-count.
            (CLASS_BASIC, 71) => {
                let mut marks = Vec::new();
                let pos = sanitize_in_place(body, 13, "exchange", &mut marks);
                pos.and_then(|p| sanitize_in_place(body, p, "routing_key", &mut marks));
                self.pending.insert(channel, marks);
            }
            // basic.return: reply-code, reply-text, exchange, routing-key.
            (CLASS_BASIC, 50) => {
                let mut marks = Vec::new();
                let pos = sanitize_in_place(body, 6, "reply_text", &mut Vec::new());
                let pos = pos.and_then(|p| sanitize_in_place(body, p, "exchange", &mut marks));
                pos.and_then(|p| sanitize_in_place(body, p, "routing_key", &mut marks));
                self.pending.insert(channel, marks);
            }
            _ => {}
        }
    }
}

/// lapin's rule: the lower of the two non-zero values, at least the protocol minimum when the
/// server's is taken; 0 on both sides means no limit.
fn negotiate_frame_max(client: u32, server: u32) -> u32 {
    let mut negotiated = client;
    if server != 0 && (negotiated == 0 || server < negotiated) {
        negotiated = server.max(FRAME_MIN_SIZE);
    }
    if negotiated == 0 {
        u32::MAX
    } else {
        negotiated
    }
}

fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// End of the short string starting at `at`, if it fits in `b`.
fn short_string_end(b: &[u8], at: usize) -> Option<usize> {
    let len = usize::from(*b.get(at)?);
    let end = at + 1 + len;
    (end <= b.len()).then_some(end)
}

/// Replaces the short string at `at` with its placeholder when it is not UTF-8, recording the
/// original under `field`. Returns where the next field starts.
fn sanitize_in_place(b: &mut [u8], at: usize, field: &str, marks: &mut Vec<Mark>) -> Option<usize> {
    let end = short_string_end(b, at)?;
    let text = &mut b[at + 1..end];
    if std::str::from_utf8(text).is_err() {
        marks.push(Mark {
            field: field.to_owned(),
            original: text.to_vec(),
        });
        let replaced = placeholder(text);
        text.copy_from_slice(&replaced);
    }
    Some(end)
}

/// The same bytes with every byte that is not part of a valid UTF-8 sequence replaced by `?`:
/// valid UTF-8 of exactly the original length, so a frame never grows because of it.
pub(crate) fn placeholder(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.extend_from_slice(chunk.valid().as_bytes());
        out.extend(std::iter::repeat_n(b'?', chunk.invalid().len()));
    }
    out
}

/// How a Basic property is encoded.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PropertyKind {
    ShortString,
    Table,
    Octet,
    Timestamp,
}

/// The Basic class properties in flag order (bit 15 first), with their contract field names.
const BASIC_PROPERTIES: [(u16, &str, PropertyKind); 14] = [
    (15, "content_type", PropertyKind::ShortString),
    (14, "content_encoding", PropertyKind::ShortString),
    (13, "headers", PropertyKind::Table),
    (12, "delivery_mode", PropertyKind::Octet),
    (11, "priority", PropertyKind::Octet),
    (10, "correlation_id", PropertyKind::ShortString),
    (9, "reply_to", PropertyKind::ShortString),
    (8, "expiration", PropertyKind::ShortString),
    (7, "message_id", PropertyKind::ShortString),
    (6, "timestamp", PropertyKind::Timestamp),
    (5, "type", PropertyKind::ShortString),
    (4, "user_id", PropertyKind::ShortString),
    (3, "app_id", PropertyKind::ShortString),
    (2, "cluster_id", PropertyKind::ShortString),
];
const HEADERS_FLAG: u16 = 1 << 13;
/// class-id, weight, body-size, property-flags.
const CONTENT_HEADER_FIXED: usize = 2 + 2 + 8 + 2;

/// One property of a content header, as read.
struct Property<'a> {
    bit: u16,
    /// Its encoded bytes (length prefix included).
    raw: &'a [u8],
    /// Replacement encoding, when it had to change.
    replaced: Option<Vec<u8>>,
}

/// The rewritten payload of a Basic content header, or `None` to pass it unchanged (nothing to
/// fix, or nothing readable).
fn rewrite_content_header(body: &[u8], mut marks: Vec<Mark>, limit: usize) -> Option<Vec<u8>> {
    if read_u16(body, 0)? != CLASS_BASIC {
        return None;
    }
    let flags = read_u16(body, 12)?;
    // Bit 0 would announce a second flag word and bit 1 is unused: not ours to guess.
    if flags & 0b11 != 0 {
        return None;
    }
    let mut pos = CONTENT_HEADER_FIXED;
    let mut properties = Vec::new();
    let mut table_body: Option<&[u8]> = None;
    for (bit, name, kind) in BASIC_PROPERTIES {
        if flags & (1 << bit) == 0 {
            continue;
        }
        let len = match kind {
            PropertyKind::ShortString => 1 + usize::from(*body.get(pos)?),
            PropertyKind::Table => 4 + usize::try_from(read_u32(body, pos)?).ok()?,
            PropertyKind::Octet => 1,
            PropertyKind::Timestamp => 8,
        };
        let raw = body.get(pos..pos.checked_add(len)?)?;
        let mut replaced = None;
        match kind {
            PropertyKind::ShortString if std::str::from_utf8(&raw[1..]).is_err() => {
                marks.push(Mark {
                    field: name.to_owned(),
                    original: raw[1..].to_vec(),
                });
                let mut encoded = vec![raw[0]];
                encoded.extend(placeholder(&raw[1..]));
                replaced = Some(encoded);
            }
            PropertyKind::Table => table_body = Some(&raw[4..]),
            _ => {}
        }
        properties.push(Property { bit, raw, replaced });
        pos += len;
    }
    // Whatever follows the properties is not ours: it is kept as it came.
    let rest = &body[pos..];

    let mut header_marks = Vec::new();
    let mut unreadable = None;
    let headers = match table_body {
        None => Vec::new(),
        Some(table) => match sanitize_table(table, "headers", 0, &mut header_marks) {
            Ok(Some(rewritten)) => rewritten,
            Ok(None) => table.to_vec(),
            Err(Unreadable) => {
                unreadable = Some(table.to_vec());
                Vec::new()
            }
        },
    };
    if marks.is_empty() && header_marks.is_empty() && unreadable.is_none() {
        return None;
    }

    let assemble = |headers: &[u8], markers: &[u8]| -> Vec<u8> {
        let mut out = Vec::with_capacity(body.len() + markers.len() + 64);
        out.extend_from_slice(&body[..12]);
        out.extend_from_slice(&(flags | HEADERS_FLAG).to_be_bytes());
        let mut table_written = false;
        let write_table = |out: &mut Vec<u8>| {
            let len = headers.len() + markers.len();
            out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
            out.extend_from_slice(headers);
            out.extend_from_slice(markers);
        };
        for p in &properties {
            // The headers table goes in its place in flag order, also when the message had none.
            if !table_written && p.bit <= 13 {
                write_table(&mut out);
                table_written = true;
                if p.bit == 13 {
                    continue;
                }
            }
            out.extend_from_slice(p.replaced.as_deref().unwrap_or(p.raw));
        }
        if !table_written {
            write_table(&mut out);
        }
        out.extend_from_slice(rest);
        out
    };

    let all_marks: Vec<Mark> = marks.iter().chain(&header_marks).cloned().collect();
    // First choice: everything kept, original bytes included.
    let full = assemble(
        &headers,
        &markers(&all_marks, unreadable.as_deref(), true, false),
    );
    if full.len() + FRAME_OVERHEAD <= limit {
        return Some(full);
    }
    // The frame would pass lapin's frame_max: keep the names of the fields, not their bytes.
    let names_only = assemble(
        &headers,
        &markers(&all_marks, unreadable.as_deref(), false, false),
    );
    if names_only.len() + FRAME_OVERHEAD <= limit {
        return Some(names_only);
    }
    // Still too large: the headers go, the markers stay, so that the message is dead-lettered
    // rather than taken for a valid one (always fits: without headers a content header is a
    // few hundred bytes, well under the protocol's 4096-byte minimum).
    let mut collapsed = marks;
    if !header_marks.is_empty() {
        collapsed.push(Mark {
            field: "headers".to_owned(),
            original: Vec::new(),
        });
    }
    Some(assemble(
        &[],
        &markers(&collapsed, unreadable.as_deref(), false, true),
    ))
}

/// The marker entries appended to the top-level headers table.
fn markers(marks: &[Mark], unreadable: Option<&[u8]>, with_bytes: bool, dropped: bool) -> Vec<u8> {
    let mut out = Vec::new();
    if !marks.is_empty() {
        let mut table = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, mark) in marks.iter().enumerate() {
            let mut name = truncate_name(&mark.field, 255);
            if !seen.insert(name.clone()) {
                // Two fields whose placeholders collide: keep both entries apart.
                name = format!("{}#{i}", truncate_name(&mark.field, 240));
                seen.insert(name.clone());
            }
            push_short_string(&mut table, name.as_bytes());
            push_bytes_or_void(&mut table, &mark.original, with_bytes);
        }
        push_short_string(&mut out, INVALID_UTF8_HEADER.as_bytes());
        out.push(b'F');
        out.extend_from_slice(&u32::try_from(table.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(&table);
    }
    if let Some(raw) = unreadable {
        push_short_string(&mut out, UNREADABLE_HEADERS_HEADER.as_bytes());
        push_bytes_or_void(&mut out, raw, with_bytes);
    }
    if dropped {
        push_short_string(&mut out, HEADERS_DROPPED_HEADER.as_bytes());
        out.push(b'V');
    }
    out
}

fn push_short_string(out: &mut Vec<u8>, s: &[u8]) {
    let len = s.len().min(255);
    out.push(len as u8);
    out.extend_from_slice(&s[..len]);
}

fn push_bytes_or_void(out: &mut Vec<u8>, bytes: &[u8], with_bytes: bool) {
    match u32::try_from(bytes.len()) {
        Ok(len) if with_bytes => {
            out.push(b'x');
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(bytes);
        }
        _ => out.push(b'V'),
    }
}

/// `name` cut to at most `max` bytes on a character boundary.
fn truncate_name(name: &str, max: usize) -> String {
    let mut end = name.len().min(max);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_owned()
}

/// A headers table that cannot be read: unknown value type, a length past the end, too deep.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Unreadable;

/// Replaces every field name that is not UTF-8 in the table body `b` (without its length
/// prefix), recursing into nested tables and arrays. `Ok(None)` when nothing changed.
pub(crate) fn sanitize_table(
    b: &[u8],
    path: &str,
    depth: usize,
    marks: &mut Vec<Mark>,
) -> Result<Option<Vec<u8>>, Unreadable> {
    if depth > MAX_TABLE_DEPTH {
        return Err(Unreadable);
    }
    let mut out = Vec::with_capacity(b.len());
    let mut changed = false;
    let mut pos = 0;
    while pos < b.len() {
        let end = short_string_end(b, pos).ok_or(Unreadable)?;
        let key = &b[pos + 1..end];
        let name = match std::str::from_utf8(key) {
            Ok(name) => {
                out.extend_from_slice(&b[pos..end]);
                name.to_owned()
            }
            Err(_) => {
                let replaced = placeholder(key);
                let name = String::from_utf8_lossy(&replaced).into_owned();
                marks.push(Mark {
                    field: format!("{path}.{name}"),
                    original: key.to_vec(),
                });
                out.push(b[pos]);
                out.extend_from_slice(&replaced);
                changed = true;
                name
            }
        };
        pos = end;
        let value_path = format!("{path}.{name}");
        pos = sanitize_value(b, pos, &value_path, depth, marks, &mut out, &mut changed)?;
    }
    Ok(changed.then_some(out))
}

/// Copies the tagged value at `pos` to `out` (rewriting nested names); returns where the next
/// entry starts.
fn sanitize_value(
    b: &[u8],
    pos: usize,
    path: &str,
    depth: usize,
    marks: &mut Vec<Mark>,
    out: &mut Vec<u8>,
    changed: &mut bool,
) -> Result<usize, Unreadable> {
    let tag = *b.get(pos).ok_or(Unreadable)?;
    let start = pos + 1;
    let fixed = |len: usize, out: &mut Vec<u8>| -> Result<usize, Unreadable> {
        let end = start.checked_add(len).ok_or(Unreadable)?;
        out.extend_from_slice(b.get(pos..end).ok_or(Unreadable)?);
        Ok(end)
    };
    // The tags lapin reads (RabbitMQ's flavour of the spec: 's' is a short int).
    match tag {
        b'V' => fixed(0, out),
        b't' | b'b' | b'B' => fixed(1, out),
        b's' | b'U' | b'u' => fixed(2, out),
        b'I' | b'i' | b'f' => fixed(4, out),
        b'D' => fixed(5, out),
        b'L' | b'l' | b'd' | b'T' => fixed(8, out),
        b'S' | b'x' => {
            let len =
                usize::try_from(read_u32(b, start).ok_or(Unreadable)?).map_err(|_| Unreadable)?;
            fixed(4 + len, out)
        }
        b'F' | b'A' => {
            let len =
                usize::try_from(read_u32(b, start).ok_or(Unreadable)?).map_err(|_| Unreadable)?;
            let inner_start = start + 4;
            let end = inner_start.checked_add(len).ok_or(Unreadable)?;
            let inner = b.get(inner_start..end).ok_or(Unreadable)?;
            let rewritten = if tag == b'F' {
                sanitize_table(inner, path, depth + 1, marks)?
            } else {
                sanitize_array(inner, path, depth + 1, marks)?
            };
            match rewritten {
                Some(new) => {
                    out.push(tag);
                    out.extend_from_slice(
                        &u32::try_from(new.len())
                            .map_err(|_| Unreadable)?
                            .to_be_bytes(),
                    );
                    out.extend_from_slice(&new);
                    *changed = true;
                }
                None => out.extend_from_slice(&b[pos..end]),
            }
            Ok(end)
        }
        _ => Err(Unreadable),
    }
}

fn sanitize_array(
    b: &[u8],
    path: &str,
    depth: usize,
    marks: &mut Vec<Mark>,
) -> Result<Option<Vec<u8>>, Unreadable> {
    if depth > MAX_TABLE_DEPTH {
        return Err(Unreadable);
    }
    let mut out = Vec::with_capacity(b.len());
    let mut changed = false;
    let mut pos = 0;
    let mut index = 0usize;
    while pos < b.len() {
        let element_path = format!("{path}[{index}]");
        pos = sanitize_value(b, pos, &element_path, depth, marks, &mut out, &mut changed)?;
        index += 1;
    }
    Ok(changed.then_some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::frame::{AMQPContentHeader, AMQPFrame, WriteContext, gen_frame, parse_frame};
    use amq_protocol::protocol::{AMQPClass, basic, connection};
    use amq_protocol::types::{
        AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
    };

    fn encode(frame: &AMQPFrame) -> Vec<u8> {
        gen_frame(frame)(WriteContext::from(Vec::new()))
            .expect("generate frame")
            .into_inner()
            .0
    }

    /// Parses `bytes` as lapin does, all of it.
    fn parse_all(mut bytes: &[u8]) -> Vec<AMQPFrame> {
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            let (rest, frame) = parse_frame(bytes).expect("lapin reads the frame");
            frames.push(frame);
            bytes = rest;
        }
        frames
    }

    fn rewrite(input: &[u8]) -> Vec<u8> {
        let mut r = FrameRewriter::new(0);
        let mut out = Vec::new();
        r.feed(&tune(131_072), &mut out);
        out.clear();
        r.feed(input, &mut out);
        out
    }

    fn tune(frame_max: u32) -> Vec<u8> {
        encode(&AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
                channel_max: 2047,
                frame_max,
                heartbeat: 60,
            })),
        ))
    }

    fn raw_frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![kind];
        f.extend_from_slice(&channel.to_be_bytes());
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        f.push(FRAME_END);
        f
    }

    fn short(out: &mut Vec<u8>, s: &[u8]) {
        out.push(s.len() as u8);
        out.extend_from_slice(s);
    }

    /// A Basic content header with the given properties, encoded by hand so that any bytes fit.
    fn content_header(channel: u16, props: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&CLASS_BASIC.to_be_bytes());
        p.extend_from_slice(&0u16.to_be_bytes());
        p.extend_from_slice(&2u64.to_be_bytes());
        let flags = props.iter().fold(0u16, |f, (bit, _)| f | (1 << bit));
        p.extend_from_slice(&flags.to_be_bytes());
        let mut sorted: Vec<_> = props.to_vec();
        sorted.sort_by_key(|p| std::cmp::Reverse(p.0));
        for (_, encoded) in sorted {
            p.extend_from_slice(&encoded);
        }
        raw_frame(FRAME_HEADER, channel, &p)
    }

    fn short_prop(bit: u16, s: &[u8]) -> (u16, Vec<u8>) {
        let mut e = Vec::new();
        short(&mut e, s);
        (bit, e)
    }

    fn table_prop(body: &[u8]) -> (u16, Vec<u8>) {
        let mut e = (body.len() as u32).to_be_bytes().to_vec();
        e.extend_from_slice(body);
        (13, e)
    }

    fn header_of(frames: &[AMQPFrame]) -> &basic::AMQPProperties {
        frames
            .iter()
            .find_map(|f| match f {
                AMQPFrame::Header(_, h) => Some(&h.properties),
                _ => None,
            })
            .expect("a content header")
    }

    fn marker(props: &basic::AMQPProperties) -> FieldTable {
        match props
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(INVALID_UTF8_HEADER).cloned())
        {
            Some(AMQPValue::FieldTable(t)) => t,
            other => panic!("no marker table: {other:?}"),
        }
    }

    fn every_header_type() -> FieldTable {
        let mut nested = FieldTable::default();
        nested.insert("inner".into(), AMQPValue::LongString("deep".into()));
        let mut t = FieldTable::default();
        t.insert("bool".into(), AMQPValue::Boolean(true));
        t.insert("i8".into(), AMQPValue::ShortShortInt(-1));
        t.insert("u8".into(), AMQPValue::ShortShortUInt(1));
        t.insert("i16".into(), AMQPValue::ShortInt(-2));
        t.insert("u16".into(), AMQPValue::ShortUInt(2));
        t.insert("i32".into(), AMQPValue::LongInt(-3));
        t.insert("u32".into(), AMQPValue::LongUInt(3));
        t.insert("i64".into(), AMQPValue::LongLongInt(-4));
        t.insert("f32".into(), AMQPValue::Float(1.5));
        t.insert("f64".into(), AMQPValue::Double(2.5));
        t.insert(
            "decimal".into(),
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 12345,
            }),
        );
        t.insert(
            "text".into(),
            AMQPValue::LongString(LongString::from(vec![0xff, 0x00])),
        );
        t.insert(
            "array".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::LongLongInt(1),
                AMQPValue::FieldTable(nested.clone()),
            ])),
        );
        t.insert("timestamp".into(), AMQPValue::Timestamp(1_700_000_000));
        t.insert("table".into(), AMQPValue::FieldTable(nested));
        t.insert(
            "bytes".into(),
            AMQPValue::ByteArray(ByteArray::from(vec![0u8, 0xff])),
        );
        t.insert("void".into(), AMQPValue::Void);
        t
    }

    /// A realistic server-to-client stream: tune, open-ok, deliver, full properties, body,
    /// heartbeat.
    fn valid_stream() -> Vec<u8> {
        let props = basic::AMQPProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("identity".into())
            .with_headers(every_header_type())
            .with_delivery_mode(2)
            .with_priority(5)
            .with_correlation_id("c-1".into())
            .with_reply_to("replies".into())
            .with_expiration("60000".into())
            .with_message_id("m-1 é".into())
            .with_timestamp(1_700_000_000)
            .with_type("order.created.v1".into())
            .with_user_id("guest".into())
            .with_app_id("order-service".into())
            .with_cluster_id("c".into());
        let mut s = tune(131_072);
        for frame in [
            AMQPFrame::Method(
                1,
                AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                    consumer_tag: "ctag".into(),
                    delivery_tag: 7,
                    redelivered: false,
                    exchange: "order.events".into(),
                    routing_key: "order.created.v1".into(),
                })),
            ),
            AMQPFrame::Header(
                1,
                AMQPContentHeader {
                    class_id: CLASS_BASIC,
                    body_size: 5,
                    properties: props,
                },
            ),
            AMQPFrame::Body(1, b"{...}".to_vec()),
            AMQPFrame::Heartbeat,
            AMQPFrame::Body(1, vec![0xff; 70_000]),
        ] {
            s.extend(encode(&frame));
        }
        s
    }

    #[test]
    fn valid_frames_pass_through_byte_for_byte() {
        let input = valid_stream();
        let mut r = FrameRewriter::new(0);
        let mut out = Vec::new();
        r.feed(&input, &mut out);
        assert_eq!(out, input);
    }

    #[test]
    fn frames_split_anywhere_across_reads_come_out_the_same() {
        let input = valid_stream();
        for split in (0..input.len()).step_by(37).chain([1, 7, 8, 22]) {
            let mut r = FrameRewriter::new(0);
            let mut out = Vec::new();
            r.feed(&input[..split], &mut out);
            r.feed(&input[split..], &mut out);
            assert_eq!(out, input, "split at {split}");
        }
        let mut r = FrameRewriter::new(0);
        let mut out = Vec::new();
        for b in &input {
            r.feed(std::slice::from_ref(b), &mut out);
        }
        assert_eq!(out, input, "one byte at a time");
    }

    #[test]
    fn every_short_string_property_that_is_not_utf8_gets_a_placeholder_and_a_marker() {
        for (bit, name, kind) in BASIC_PROPERTIES {
            if kind != PropertyKind::ShortString {
                continue;
            }
            let bad = b"id-\xff\xfe-\xc3".to_vec();
            let mut props = vec![short_prop(7, b"m-1")];
            props.retain(|(b, _)| *b != bit);
            props.push(short_prop(bit, &bad));
            let input = content_header(1, &props);
            let out = rewrite(&input);
            let frames = parse_all(&out);
            let p = header_of(&frames);
            let m = marker(p);
            assert_eq!(
                m.inner().get(name),
                Some(&AMQPValue::ByteArray(ByteArray::from(bad.clone()))),
                "{name}"
            );
            let value = match name {
                "content_type" => p.content_type(),
                "content_encoding" => p.content_encoding(),
                "correlation_id" => p.correlation_id(),
                "reply_to" => p.reply_to(),
                "expiration" => p.expiration(),
                "message_id" => p.message_id(),
                "type" => p.kind(),
                "user_id" => p.user_id(),
                "app_id" => p.app_id(),
                "cluster_id" => p.cluster_id(),
                other => panic!("unexpected {other}"),
            };
            assert_eq!(
                value.as_ref().map(ShortString::as_str),
                Some("id-??-?"),
                "{name}"
            );
        }
    }

    #[test]
    fn invalid_message_id_next_to_existing_headers_keeps_them() {
        let table = encode_table(&every_header_type());
        let input = content_header(
            3,
            &[
                short_prop(15, b"application/json"),
                table_prop(&table),
                short_prop(7, b"\xff"),
            ],
        );
        let out = rewrite(&input);
        assert_eq!(&out[..3], &input[..3], "type and channel kept");
        let frames = parse_all(&out);
        let p = header_of(&frames);
        let headers = p.headers().clone().unwrap_or_default();
        for (k, v) in every_header_type().inner() {
            assert_eq!(headers.inner().get(k.as_str()), Some(v), "{k} kept");
        }
        assert_eq!(
            p.content_type().as_ref().map(ShortString::as_str),
            Some("application/json")
        );
        assert_eq!(
            marker(p).inner().get("message_id"),
            Some(&AMQPValue::ByteArray(ByteArray::from(vec![0xff])))
        );
    }

    fn encode_table(t: &FieldTable) -> Vec<u8> {
        use amq_protocol::types::generation::gen_field_table;
        let bytes = gen_field_table(t)(WriteContext::from(Vec::new()))
            .expect("table")
            .into_inner()
            .0;
        bytes[4..].to_vec()
    }

    fn entry(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
        short(out, key);
        out.extend_from_slice(value);
    }

    fn nested(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn header_names_that_are_not_utf8_are_renamed_in_nested_tables_and_arrays() {
        let mut inner = Vec::new();
        entry(&mut inner, b"in\xff", b"t\x01");
        let mut in_array = Vec::new();
        entry(&mut in_array, b"\xfex", b"V");
        let mut array = Vec::new();
        array.extend(nested(b'F', &in_array));
        array.extend_from_slice(b"I\x00\x00\x00\x01");
        let mut top = Vec::new();
        entry(&mut top, b"k\xff", &nested(b'S', b"v"));
        entry(&mut top, b"outer", &nested(b'F', &inner));
        entry(&mut top, b"arr", &nested(b'A', &array));
        entry(&mut top, b"ok", b"T\x00\x00\x00\x00\x00\x00\x00\x01");
        let input = content_header(1, &[table_prop(&top), short_prop(7, b"m-1")]);
        let out = rewrite(&input);
        let frames = parse_all(&out);
        let p = header_of(&frames);
        let headers = p.headers().clone().unwrap_or_default();
        assert_eq!(
            headers.inner().get("k?"),
            Some(&AMQPValue::LongString("v".into()))
        );
        assert_eq!(headers.inner().get("ok"), Some(&AMQPValue::Timestamp(1)));
        let m = marker(p);
        let bytes = |b: &[u8]| Some(AMQPValue::ByteArray(ByteArray::from(b.to_vec())));
        assert_eq!(m.inner().get("headers.k?").cloned(), bytes(b"k\xff"));
        assert_eq!(
            m.inner().get("headers.outer.in?").cloned(),
            bytes(b"in\xff")
        );
        assert_eq!(m.inner().get("headers.arr[0].?x").cloned(), bytes(b"\xfex"));
        assert_eq!(
            p.message_id().as_ref().map(ShortString::as_str),
            Some("m-1")
        );
    }

    #[test]
    fn deliver_with_invalid_exchange_and_routing_key_marks_the_next_content_header() {
        let mut deliver = Vec::new();
        deliver.extend_from_slice(&CLASS_BASIC.to_be_bytes());
        deliver.extend_from_slice(&60u16.to_be_bytes());
        short(&mut deliver, b"ctag");
        deliver.extend_from_slice(&9u64.to_be_bytes());
        deliver.push(0);
        short(&mut deliver, b"ex\xff");
        short(&mut deliver, b"rk\xfe\xfd");
        let mut input = raw_frame(FRAME_METHOD, 2, &deliver);
        let deliver_len = input.len();
        input.extend(content_header(2, &[short_prop(7, b"m-1")]));
        input.extend(raw_frame(3, 2, b"{}"));
        let out = rewrite(&input);
        let frames = parse_all(&out);
        match &frames[0] {
            AMQPFrame::Method(2, AMQPClass::Basic(basic::AMQPMethod::Deliver(d))) => {
                assert_eq!(d.exchange.as_str(), "ex?");
                assert_eq!(d.routing_key.as_str(), "rk??");
                assert_eq!(d.delivery_tag, 9);
                assert_eq!(d.consumer_tag.as_str(), "ctag");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(out[..deliver_len].len(), deliver_len, "same size");
        let m = marker(header_of(&frames));
        assert!(m.inner().contains_key("exchange"));
        assert!(m.inner().contains_key("routing_key"));
        assert_eq!(frames[2], AMQPFrame::Body(2, b"{}".to_vec()));
    }

    #[test]
    fn unreadable_headers_table_is_kept_as_bytes_and_the_frame_reads() {
        let mut top = Vec::new();
        entry(&mut top, b"odd", b"Z\x01");
        let input = content_header(1, &[table_prop(&top), short_prop(7, b"m-1")]);
        let out = rewrite(&input);
        let frames = parse_all(&out);
        let p = header_of(&frames);
        let headers = p.headers().clone().unwrap_or_default();
        assert_eq!(
            headers.inner().get(UNREADABLE_HEADERS_HEADER),
            Some(&AMQPValue::ByteArray(ByteArray::from(top)))
        );
        assert_eq!(
            p.message_id().as_ref().map(ShortString::as_str),
            Some("m-1")
        );
    }

    #[test]
    fn too_deep_nesting_is_unreadable_not_a_stack_overflow() {
        let mut value = b"V".to_vec();
        for _ in 0..10_000 {
            let mut t = Vec::new();
            entry(&mut t, b"a", &value);
            value = nested(b'F', &t);
        }
        let mut top = Vec::new();
        entry(&mut top, b"deep", &value);
        let input = content_header(1, &[table_prop(&top)]);
        let mut r = FrameRewriter::new(0);
        let mut out = Vec::new();
        r.feed(&tune(0), &mut out);
        out.clear();
        r.feed(&input, &mut out);
        assert_ne!(out, input, "marked as unreadable");
    }

    #[test]
    fn a_grown_header_stays_within_the_negotiated_frame_max() {
        // A header frame close to a 4096-byte frame_max, with a non-UTF-8 message id.
        let mut top = Vec::new();
        entry(&mut top, b"big", &nested(b'S', &vec![b'a'; 3700]));
        let input = content_header(1, &[table_prop(&top), short_prop(7, &[0xff; 200])]);
        assert!(input.len() <= 4096);
        let mut r = FrameRewriter::new(0);
        let mut out = Vec::new();
        r.feed(&tune(4096), &mut out);
        out.clear();
        r.feed(&input, &mut out);
        assert!(out.len() <= 4096, "{} bytes", out.len());
        let frames = parse_all(&out);
        let p = header_of(&frames);
        assert_eq!(marker(p).inner().get("message_id"), Some(&AMQPValue::Void));
        let headers = p.headers().clone().unwrap_or_default();
        assert!(
            headers.inner().contains_key("big"),
            "headers kept, bytes dropped"
        );

        // No room for the headers either: they go, the marker stays.
        let mut top = Vec::new();
        entry(&mut top, b"big", &nested(b'S', &vec![b'a'; 3700]));
        for i in 0..20u8 {
            entry(&mut top, &[b'k', b'a' + i, 0xff], b"V");
        }
        let input = content_header(1, &[table_prop(&top), short_prop(7, &[0xff; 200])]);
        assert!(input.len() <= 4096);
        let mut r = FrameRewriter::new(0);
        let mut out = Vec::new();
        r.feed(&tune(4096), &mut out);
        out.clear();
        r.feed(&input, &mut out);
        assert!(out.len() <= 4096, "{} bytes", out.len());
        let frames = parse_all(&out);
        let p = header_of(&frames);
        let headers = p.headers().clone().unwrap_or_default();
        assert!(headers.inner().contains_key(HEADERS_DROPPED_HEADER));
        assert!(marker(p).inner().contains_key("message_id"));
        assert!(marker(p).inner().contains_key("headers"));
    }

    #[test]
    fn frame_max_follows_lapins_negotiation() {
        assert_eq!(negotiate_frame_max(0, 131_072), 131_072);
        assert_eq!(negotiate_frame_max(8192, 131_072), 8192);
        assert_eq!(negotiate_frame_max(0, 0), u32::MAX);
        assert_eq!(negotiate_frame_max(0, 100), FRAME_MIN_SIZE);
    }

    #[test]
    fn placeholder_has_the_length_of_the_original_and_is_utf8() {
        for bytes in [
            &b"abc"[..],
            b"\xff",
            b"a\xc3",
            b"\xe2\x82",
            "é€".as_bytes(),
            b"",
        ] {
            let p = placeholder(bytes);
            assert_eq!(p.len(), bytes.len());
            assert!(std::str::from_utf8(&p).is_ok());
        }
    }

    #[test]
    fn truncated_frames_are_handed_over_as_they_came() {
        let input = valid_stream();
        for cut in [3, 7, 20, 200, input.len() - 1] {
            let mut r = FrameRewriter::new(0);
            let mut out = Vec::new();
            r.feed(&input[..cut], &mut out);
            r.finish(&mut out);
            assert_eq!(out, &input[..cut], "cut at {cut}");
        }
    }

    #[test]
    fn bad_frame_end_and_protocol_header_pass_through() {
        let mut bad = content_header(1, &[short_prop(7, b"\xff")]);
        let last = bad.len() - 1;
        bad[last] = 0;
        bad.extend_from_slice(b"more bytes");
        assert_eq!(rewrite(&bad), bad);
        let header = b"AMQP\x00\x00\x09\x01".to_vec();
        let mut r = FrameRewriter::new(0);
        let mut out = Vec::new();
        r.feed(&header, &mut out);
        assert_eq!(out, header);
    }

    /// xorshift: deterministic noise without a dependency.
    struct Noise(u64);
    impl Noise {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    #[test]
    fn garbage_and_mutated_frames_never_panic() {
        let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
        let valid = valid_stream();
        let hostile = {
            let mut top = Vec::new();
            entry(&mut top, b"k\xff", &nested(b'F', b"\x01\xffV"));
            let mut s = tune(131_072);
            s.extend(content_header(
                1,
                &[table_prop(&top), short_prop(7, b"\xff")],
            ));
            s
        };
        for round in 0..3000 {
            let mut input = if round % 2 == 0 {
                valid.clone()
            } else {
                hostile.clone()
            };
            if round % 3 == 0 {
                // Pure noise, with frame-looking starts now and then.
                input = (0..noise.below(600)).map(|_| noise.next() as u8).collect();
                if round % 6 == 0 {
                    input.splice(0..0, [2u8, 0, 1, 0, 0, 0, 40]);
                }
            } else {
                for _ in 0..=noise.below(8) {
                    let at = noise.below(input.len());
                    input[at] = noise.next() as u8;
                }
                input.truncate(noise.below(input.len() + 1));
            }
            let mut r = FrameRewriter::new(0);
            let mut out = Vec::new();
            let mut rest = &input[..];
            while !rest.is_empty() {
                let n = 1 + noise.below(rest.len());
                r.feed(&rest[..n], &mut out);
                rest = &rest[n..];
            }
            r.finish(&mut out);
            // Rewrites only replace bytes in place or add markers: nothing is ever lost.
            assert!(out.len() >= input.len(), "round {round}");
        }
    }

    #[test]
    fn rewritten_hostile_frames_always_parse_when_the_input_was_well_framed() {
        let mut noise = Noise(42);
        for _ in 0..2000 {
            // Random short strings in every property and random header names.
            let mut props = Vec::new();
            for (bit, _, kind) in BASIC_PROPERTIES {
                if kind == PropertyKind::ShortString && noise.below(2) == 0 {
                    let s: Vec<u8> = (0..noise.below(20)).map(|_| noise.next() as u8).collect();
                    props.push(short_prop(bit, &s));
                }
            }
            let mut top = Vec::new();
            for _ in 0..noise.below(5) {
                let k: Vec<u8> = (0..noise.below(10)).map(|_| noise.next() as u8).collect();
                let v: Vec<u8> = (0..noise.below(10)).map(|_| noise.next() as u8).collect();
                entry(&mut top, &k, &nested(b'x', &v));
            }
            props.push(table_prop(&top));
            let out = rewrite(&content_header(1, &props));
            let frames = parse_all(&out);
            assert_eq!(frames.len(), 1);
        }
    }
}
