//! A framed byte stream to a server: the socket's halves and a read
//! buffer. A leaf module (it needs nothing else of the crate's but the
//! error type), so that login and server connections can both build on it.

use crate::error::PoolError;
use bytes::BytesMut;
use pgferry_protocol::{decode_frame, Frame};
use pgferry_tls::stream::{ServerReadHalf, ServerWriteHalf};
use tokio::io::{AsyncRead, AsyncWriteExt};

/// Bytes kept free in a read buffer before each read.
const READ_CHUNK: usize = 8192;

/// A framed byte stream: the socket's halves plus a read buffer. The halves
/// are separate so that a session can write to the server while it reads
/// the server's replies (a pipelined client can fill both directions).
pub struct Wire {
    pub rd: ServerReadHalf,
    pub wr: ServerWriteHalf,
    pub rbuf: BytesMut,
    pub max_message: usize,
}

/// Reads more bytes into `buf`, keeping some room free first. Returns 0 at
/// end of stream. Cancel safe: bytes are either appended or not read.
pub async fn fill<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut BytesMut) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| poll_fill(rd, cx, buf)).await
}

/// [`fill`] as a poll function, for a session's event loop.
pub fn poll_fill<R: AsyncRead + Unpin>(
    rd: &mut R,
    cx: &mut std::task::Context<'_>,
    buf: &mut BytesMut,
) -> std::task::Poll<std::io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_CHUNK / 2 {
        buf.reserve(READ_CHUNK);
    }
    tokio_util::io::poll_read_buf(std::pin::Pin::new(rd), cx, buf)
}

impl Wire {
    pub fn new(stream: pgferry_tls::stream::ServerStream, max_message: usize) -> Self {
        let (rd, wr) = stream.split();
        Wire {
            rd,
            wr,
            rbuf: BytesMut::new(),
            max_message,
        }
    }

    pub async fn fill(&mut self) -> std::io::Result<usize> {
        fill(&mut self.rd, &mut self.rbuf).await
    }

    /// Reads one whole message. Not cancel safe once it has started reading.
    pub async fn read_frame(&mut self) -> Result<Frame, PoolError> {
        loop {
            if let Some(f) = decode_frame(&mut self.rbuf, self.max_message)? {
                return Ok(f);
            }
            if self.fill().await? == 0 {
                return Err(PoolError::Closed);
            }
        }
    }

    /// Writes and flushes (over TLS, bytes may otherwise wait in the
    /// TLS layer).
    pub async fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.wr.write_all(b).await?;
        self.wr.flush().await
    }
}
