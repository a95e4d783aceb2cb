//! The startup phase: TLS (after SSLRequest, or PostgreSQL 17's direct
//! TLS), GSSENCRequest, cancel requests, and the StartupMessage with
//! protocol-version negotiation.

use crate::clientio::ClientIo;
use crate::error::ClientError;
use pgferry_protocol::startup::TLS_HANDSHAKE_BYTE;
use pgferry_protocol::{decode_startup, encode, StartupPacket};
use pgferry_tls::{Acceptor, ALPN_POSTGRESQL};
use std::sync::Arc;

pub enum Handshake {
    Startup {
        params: Vec<(String, String)>,
        tls: Option<TlsInfo>,
    },
    Cancel {
        pid: u32,
        key: u32,
    },
}

/// What the TLS layer established.
pub struct TlsInfo {
    /// tls-server-end-point data for SCRAM-SHA-256-PLUS.
    pub end_point: Arc<[u8]>,
    /// A client certificate was presented (and verified, as mTLS requires).
    pub client_cert: bool,
    /// Version and cipher suite (SHOW CLIENTS).
    pub describe: String,
}

pub async fn handshake(io: &mut ClientIo, acceptor: &Acceptor) -> Result<Handshake, ClientError> {
    let mut tls = None;
    if io.peek_byte().await? == Some(TLS_HANDSHAKE_BYTE) {
        // PostgreSQL 17 direct TLS: a TLS ClientHello instead of SSLRequest.
        // A plaintext error would be garbage to a TLS client: just close.
        let Some(t) = acceptor.current() else {
            return Err(ClientError::Tls("direct TLS attempted but TLS is not enabled".into()));
        };
        tls = Some(start_tls(io, &t, true).await?);
    }
    loop {
        let Some(packet) = decode_startup(&mut io.rbuf)? else {
            io.fill().await?;
            continue;
        };
        match packet {
            StartupPacket::SslRequest => {
                // Anything sent before our answer would be read as if it came
                // after the negotiation (and inside TLS): refuse it.
                if !io.rbuf.is_empty() {
                    return Err(pgferry_protocol::ProtocolError::Malformed("data after SSLRequest").into());
                }
                match acceptor.current().filter(|_| tls.is_none()) {
                    Some(t) => {
                        io.wbuf.extend_from_slice(b"S");
                        io.flush().await?;
                        tls = Some(start_tls(io, &t, false).await?);
                    }
                    None => {
                        io.wbuf.extend_from_slice(b"N");
                        io.flush().await?;
                    }
                }
            }
            StartupPacket::GssEncRequest => {
                if !io.rbuf.is_empty() {
                    return Err(pgferry_protocol::ProtocolError::Malformed("data after GSSENCRequest").into());
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
                return Ok(Handshake::Startup { params, tls });
            }
        }
    }
}

async fn start_tls(io: &mut ClientIo, t: &pgferry_tls::Termination, direct: bool) -> Result<TlsInfo, ClientError> {
    io.start_tls(t.config.clone()).await?;
    let pgferry_tls::stream::MaybeTls::Tls(s) = &io.stream else {
        unreachable!("start_tls succeeded");
    };
    let (alpn, client_cert) = pgferry_tls::stream::session_info(s);
    // rustls already refused a client offering only other protocols; direct
    // TLS must name "postgresql" (PostgreSQL 17 requires it too, so that a
    // TLS connection meant for another service is never taken for ours).
    if direct && alpn.as_deref() != Some(ALPN_POSTGRESQL) {
        return Err(ClientError::Tls(
            "direct TLS connection without ALPN \"postgresql\"".into(),
        ));
    }
    Ok(TlsInfo {
        end_point: t.end_point.clone(),
        client_cert,
        describe: pgferry_tls::stream::describe(s),
    })
}
