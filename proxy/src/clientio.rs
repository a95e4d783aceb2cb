//! The client socket during the startup phase, before it is split for the
//! session loop.

use crate::error::ClientError;
use bytes::BytesMut;
use pgferry_protocol::{decode_frame, Frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Messages during authentication are small; this bounds them.
pub const MAX_AUTH_MESSAGE: usize = 16 * 1024;

pub struct ClientIo {
    pub stream: TcpStream,
    pub rbuf: BytesMut,
    pub wbuf: BytesMut,
}

impl ClientIo {
    pub fn new(stream: TcpStream) -> Self {
        ClientIo {
            stream,
            rbuf: BytesMut::with_capacity(1024),
            wbuf: BytesMut::with_capacity(1024),
        }
    }

    /// Reads more bytes; a closed connection is an error here.
    pub async fn fill(&mut self) -> Result<(), ClientError> {
        if self.rbuf.capacity() - self.rbuf.len() < 512 {
            self.rbuf.reserve(1024);
        }
        match self.stream.read_buf(&mut self.rbuf).await? {
            0 => Err(ClientError::Disconnected),
            _ => Ok(()),
        }
    }

    pub async fn read_frame(&mut self, max: usize) -> Result<Frame, ClientError> {
        loop {
            if let Some(f) = decode_frame(&mut self.rbuf, max)? {
                return Ok(f);
            }
            self.fill().await?;
        }
    }

    /// Writes and clears `wbuf`.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }
}
