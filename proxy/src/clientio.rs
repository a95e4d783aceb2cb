//! The client socket during the startup phase, before it is split for the
//! session loop. It starts plain and may be upgraded to TLS.

use crate::error::ClientError;
use bytes::BytesMut;
use pgferry_protocol::{decode_frame, Frame};
use pgferry_tls::stream::{ClientStream, MaybeTls};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Messages during authentication are small; this bounds them.
pub const MAX_AUTH_MESSAGE: usize = 16 * 1024;

pub struct ClientIo {
    pub stream: ClientStream,
    pub rbuf: BytesMut,
    pub wbuf: BytesMut,
}

impl ClientIo {
    pub fn new(stream: TcpStream) -> Self {
        ClientIo {
            stream: MaybeTls::Plain(stream),
            rbuf: BytesMut::with_capacity(1024),
            wbuf: BytesMut::with_capacity(1024),
        }
    }

    /// The next byte the client will send, without consuming it; None at
    /// end of stream. Only before TLS.
    pub async fn peek_byte(&mut self) -> Result<Option<u8>, ClientError> {
        let MaybeTls::Plain(tcp) = &self.stream else {
            return Ok(None);
        };
        let mut b = [0u8; 1];
        Ok(match tcp.peek(&mut b).await? {
            0 => None,
            _ => Some(b[0]),
        })
    }

    /// Runs the TLS handshake on the plain socket.
    pub async fn start_tls(&mut self, config: Arc<rustls::ServerConfig>) -> Result<(), ClientError> {
        let MaybeTls::Plain(tcp) = std::mem::replace(&mut self.stream, MaybeTls::Closed) else {
            return Err(ClientError::Tls("TLS requested twice".into()));
        };
        let tls = pgferry_tls::stream::accept(config, tcp)
            .await
            .map_err(|e| ClientError::Tls(format!("TLS handshake failed: {e}")))?;
        self.stream = MaybeTls::Tls(Box::new(tls));
        Ok(())
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
            self.stream.flush().await?;
            self.wbuf.clear();
        }
        Ok(())
    }
}
