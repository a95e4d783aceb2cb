use pgferry_protocol::ProtocolError;

/// Why a server connection could not be had or used.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("could not connect to server {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("timed out connecting to server {0}")]
    ConnectTimeout(String),
    #[error("server login failed: {0}")]
    Auth(String),
    /// An ErrorResponse from the server during login, passed on as is.
    #[error("{severity}: {message}")]
    Server {
        severity: String,
        code: String,
        message: String,
    },
    #[error("protocol error from server: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("server closed the connection")]
    Closed,
    #[error("io error on server connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("no server connection available within query_wait_timeout")]
    WaitTimeout,
    #[error("{0}")]
    Tls(String),
    /// No member to route to within failover_hold_timeout.
    #[error("{0}")]
    NoServer(String),
    #[error("pool is shutting down")]
    ShuttingDown,
}

impl PoolError {
    /// SQLSTATE to report to a client.
    pub fn sqlstate(&self) -> &str {
        use pgferry_protocol::sqlstate::*;
        match self {
            PoolError::Server { code, .. } => code,
            PoolError::Auth(_) => INVALID_PASSWORD,
            PoolError::WaitTimeout => TOO_MANY_CONNECTIONS,
            PoolError::ShuttingDown => ADMIN_SHUTDOWN,
            PoolError::NoServer(_) => CANNOT_CONNECT_NOW,
            PoolError::Connect { .. } | PoolError::ConnectTimeout(_) | PoolError::Tls(_) => {
                SQLCLIENT_UNABLE_TO_ESTABLISH
            }
            _ => CONNECTION_FAILURE,
        }
    }
}
