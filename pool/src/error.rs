use pgferry_protocol::login::LoginError;
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
    /// The read-write port's server is in recovery (a demoted leader).
    #[error("server {0} is in recovery (not a primary): writes wait for one")]
    InRecovery(String),
    /// A read-only user's session turned default_transaction_read_only off
    /// (SQL the guard could not see): the connection is not safe to keep.
    #[error("a read-only session turned default_transaction_read_only off")]
    LeftReadOnly,
}

impl From<LoginError> for PoolError {
    fn from(e: LoginError) -> Self {
        match e {
            LoginError::Server {
                severity,
                code,
                message,
            } => PoolError::Server {
                severity,
                code,
                message,
            },
            LoginError::Protocol(e) => PoolError::Protocol(e),
            e => PoolError::Auth(e.to_string()),
        }
    }
}

impl PoolError {
    /// For an error from [`crate::Pool::checkout`]: the server could not be
    /// reached or went away while a new connection logged in, which a node
    /// that is restarting, going away or coming back does. Worth waiting
    /// for (the topology may move the client, or the node come back);
    /// refused credentials and the like are not.
    pub fn server_unavailable(&self) -> bool {
        match self {
            PoolError::Connect { .. } | PoolError::ConnectTimeout(_) => true,
            // A postmaster on its way down accepts, then drops the socket
            // (seen when Patroni stops a replica).
            PoolError::Io(_) | PoolError::Closed => true,
            // A demoted leader: the topology will move, or it comes back.
            PoolError::InRecovery(_) => true,
            // "the database system is starting up / shutting down", and a
            // login the server ends because it is going down (an
            // administrator's shutdown, or the postmaster died under it).
            PoolError::Server { code, .. } => matches!(code.as_str(), "57P01" | "57P02" | "57P03"),
            _ => false,
        }
    }

    /// SQLSTATE to report to a client.
    pub fn sqlstate(&self) -> &str {
        use pgferry_protocol::sqlstate::*;
        match self {
            PoolError::Server { code, .. } => code,
            PoolError::Auth(_) => INVALID_PASSWORD,
            PoolError::WaitTimeout => TOO_MANY_CONNECTIONS,
            PoolError::ShuttingDown => ADMIN_SHUTDOWN,
            PoolError::NoServer(_) | PoolError::InRecovery(_) => CANNOT_CONNECT_NOW,
            PoolError::Connect { .. } | PoolError::ConnectTimeout(_) | PoolError::Tls(_) => {
                SQLCLIENT_UNABLE_TO_ESTABLISH
            }
            _ => CONNECTION_FAILURE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PoolError;

    #[test]
    fn only_an_unreachable_or_restarting_server_is_worth_waiting_for() {
        let server = |code: &str| PoolError::Server {
            severity: "FATAL".into(),
            code: code.into(),
            message: String::new(),
        };
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(PoolError::Io(reset).server_unavailable());
        assert!(PoolError::Closed.server_unavailable());
        assert!(PoolError::ConnectTimeout("n".into()).server_unavailable());
        assert!(server("57P03").server_unavailable());
        // A login cut by a shutdown or by the postmaster's death.
        assert!(server("57P01").server_unavailable());
        assert!(server("57P02").server_unavailable());
        assert!(PoolError::InRecovery("n".into()).server_unavailable());
        assert!(!server("28P01").server_unavailable());
        assert!(!server("3D000").server_unavailable());
        assert!(!PoolError::Auth("no".into()).server_unavailable());
        assert!(!PoolError::WaitTimeout.server_unavailable());
    }
}
