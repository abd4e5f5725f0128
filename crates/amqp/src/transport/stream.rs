//! The socket lapin reads through: the broker's bytes pass the [`FrameRewriter`] first.

use super::frames::FrameRewriter;
use futures_lite::io::{AsyncRead, AsyncWrite};
use std::fmt;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

/// Whatever carries the bytes: plain TCP, or TLS over TCP.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// How much is read from the socket at a time.
const READ_CHUNK: usize = 64 * 1024;

/// A connection's byte stream whose read side is rewritten frame by frame (above TLS, so the
/// rewriter sees AMQP frames, not ciphertext); the write side is passed through.
pub struct GuardedStream {
    inner: Box<dyn Io>,
    rewriter: FrameRewriter,
    /// Rewritten bytes not yet handed to lapin, from `pending_at` on.
    pending: Vec<u8>,
    pending_at: usize,
    read_buf: Box<[u8]>,
    eof: bool,
}

impl fmt::Debug for GuardedStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardedStream")
            .field("rewriter", &self.rewriter)
            .field("pending", &(self.pending.len() - self.pending_at))
            .field("eof", &self.eof)
            .finish_non_exhaustive()
    }
}

impl GuardedStream {
    /// Wraps `inner`; `client_frame_max` is the frame_max the client asks for (0: the server's).
    pub(crate) fn new(inner: Box<dyn Io>, client_frame_max: u32) -> GuardedStream {
        GuardedStream {
            inner,
            rewriter: FrameRewriter::new(client_frame_max),
            pending: Vec::new(),
            pending_at: 0,
            read_buf: vec![0; READ_CHUNK].into_boxed_slice(),
            eof: false,
        }
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            if this.pending_at < this.pending.len() {
                let n = (this.pending.len() - this.pending_at).min(buf.len());
                buf[..n].copy_from_slice(&this.pending[this.pending_at..this.pending_at + n]);
                this.pending_at += n;
                if this.pending_at == this.pending.len() {
                    this.pending.clear();
                    this.pending_at = 0;
                }
                return Poll::Ready(Ok(n));
            }
            if this.eof {
                return Poll::Ready(Ok(0));
            }
            // Nothing ready for lapin: read more. A partial frame gives no output yet, so loop
            // until there is some or the socket says Pending (which registers the waker).
            match Pin::new(&mut this.inner).poll_read(cx, &mut this.read_buf) {
                Poll::Ready(Ok(0)) => {
                    this.eof = true;
                    this.rewriter.finish(&mut this.pending);
                }
                Poll::Ready(Ok(n)) => {
                    let n = n.min(this.read_buf.len());
                    this.rewriter.feed(&this.read_buf[..n], &mut this.pending);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}
