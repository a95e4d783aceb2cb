//! Errors at the client boundary. Each carries what to tell the client
//! (SQLSTATE and a message safe to show) separately from what to log.

use pgferry_pool::PoolError;
use pgferry_protocol::{sqlstate, ProtocolError};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("client connection error: {0}")]
    Io(#[from] std::io::Error),
    #[error("client did not finish logging in within client_login_timeout")]
    LoginTimeout,
    /// Authentication failed; the string is for the log, never for the client.
    #[error("authentication failed for user {user:?}: {reason}")]
    Auth { user: String, reason: String },
    #[error("{0}")]
    Refused(Refusal),
    #[error("server error: {0}")]
    Pool(#[from] PoolError),
    #[error("client disconnected")]
    Disconnected,
    /// TLS negotiation failed: there is no channel to report it on.
    #[error("{0}")]
    Tls(String),
}

/// A refusal with a fixed SQLSTATE and a message meant for the client.
#[derive(Debug)]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl ClientError {
    pub fn refused(code: &'static str, message: impl Into<String>) -> Self {
        ClientError::Refused(Refusal {
            code,
            message: message.into(),
        })
    }

    /// (SQLSTATE, message) for a FATAL sent before closing, if one is due.
    pub fn to_client(&self) -> Option<(String, String)> {
        match self {
            // PostgreSQL's answer to a protocol version it does not speak.
            ClientError::Protocol(ProtocolError::UnsupportedProtocol { major, minor }) => Some((
                sqlstate::FEATURE_NOT_SUPPORTED.into(),
                format!("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"),
            )),
            ClientError::Protocol(e) => Some((sqlstate::PROTOCOL_VIOLATION.into(), format!("protocol violation: {e}"))),
            ClientError::LoginTimeout => Some((
                sqlstate::PROTOCOL_VIOLATION.into(),
                "client_login_timeout expired".into(),
            )),
            ClientError::Auth { user, .. } => Some((
                sqlstate::INVALID_PASSWORD.into(),
                format!("password authentication failed for user \"{user}\""),
            )),
            ClientError::Refused(r) => Some((r.code.into(), r.message.clone())),
            ClientError::Pool(e) => Some((e.sqlstate().into(), pool_message(e))),
            ClientError::Io(_) | ClientError::Disconnected | ClientError::Tls(_) => None,
        }
    }
}

/// Client-facing text for a pool error: the server's own message when the
/// server refused, a generic one otherwise (no internal detail leaks).
pub fn pool_message(e: &PoolError) -> String {
    match e {
        PoolError::Server { message, .. } => message.clone(),
        PoolError::WaitTimeout => "no server connection available within query_wait_timeout".into(),
        PoolError::ShuttingDown => "pgferry is shutting down".into(),
        PoolError::NoServer(m) => m.clone(),
        PoolError::Auth(_) => "pgferry could not log in to the server (see pgferry's log)".into(),
        PoolError::Connect { .. } | PoolError::ConnectTimeout(_) => "pgferry could not connect to the server".into(),
        _ => "server connection failed".into(),
    }
}
