//! The startup phase: SSLRequest / GSSENCRequest negotiation, cancel
//! requests, and the StartupMessage with protocol-version negotiation.

use crate::clientio::ClientIo;
use crate::error::ClientError;
use pgferry_protocol::startup::TLS_HANDSHAKE_BYTE;
use pgferry_protocol::{decode_startup, encode, sqlstate, StartupPacket};

pub enum Handshake {
    Startup(Vec<(String, String)>),
    Cancel { pid: u32, key: u32 },
}

pub async fn handshake(io: &mut ClientIo) -> Result<Handshake, ClientError> {
    loop {
        if io.rbuf.first() == Some(&TLS_HANDSHAKE_BYTE) {
            // PostgreSQL 17 direct TLS; a plaintext error would be garbage
            // to a TLS client, so just close.
            return Err(ClientError::refused(
                sqlstate::PROTOCOL_VIOLATION,
                "direct TLS is not enabled on this listener",
            ));
        }
        let Some(packet) = decode_startup(&mut io.rbuf)? else {
            io.fill().await?;
            continue;
        };
        match packet {
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                // Anything sent before our answer would be read as if it
                // came after the negotiation: refuse it.
                if !io.rbuf.is_empty() {
                    return Err(pgferry_protocol::ProtocolError::Malformed("data after SSLRequest").into());
                }
                io.wbuf.extend_from_slice(b"N");
                io.flush().await?;
            }
            StartupPacket::Cancel { pid, key } => return Ok(Handshake::Cancel { pid, key }),
            StartupPacket::Startup { minor, params, .. } => {
                let unrecognized: Vec<&str> = params
                    .iter()
                    .filter(|(k, _)| k.starts_with("_pq_."))
                    .map(|(k, _)| k.as_str())
                    .collect();
                if minor > 0 || !unrecognized.is_empty() {
                    encode::negotiate_protocol_version(&mut io.wbuf, 0, &unrecognized);
                }
                let params = params.into_iter().filter(|(k, _)| !k.starts_with("_pq_.")).collect();
                return Ok(Handshake::Startup(params));
            }
        }
    }
}
