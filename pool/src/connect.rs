//! How a pool opens server connections: [`TcpConnect`] (TCP, TLS as
//! server_tls asks, then login) unless a pool is built with another
//! [`Connect`], as tests do to put a fake server behind an in-memory pipe
//! (`ServerConn::over_stream`).

use crate::addr::NodeAddr;
use crate::error::PoolError;
use crate::login::ServerCredentials;
use crate::server::ServerConn;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// What opening one connection needs.
pub struct Dial<'a> {
    /// The new connection's process-unique id.
    pub id: u64,
    pub addr: &'a Arc<NodeAddr>,
    pub creds: &'a ServerCredentials,
    /// The StartupMessage's parameters after `user`.
    pub startup: &'a [(&'a str, &'a str)],
    /// server_connect_timeout, zero for none.
    pub timeout: Duration,
    pub max_message: usize,
}

/// A connection being opened and logged in.
pub type Connecting<'a> = Pin<Box<dyn Future<Output = Result<ServerConn, PoolError>> + Send + 'a>>;

/// Opens and logs in one server connection. A trait object in the pool:
/// it runs once per new connection, never on a read or a write.
pub trait Connect: Send + Sync {
    fn connect<'a>(&'a self, dial: Dial<'a>) -> Connecting<'a>;
}

/// The real connector.
pub struct TcpConnect(pub Arc<pgferry_tls::Connector>);

impl Connect for TcpConnect {
    fn connect<'a>(&'a self, d: Dial<'a>) -> Connecting<'a> {
        Box::pin(ServerConn::connect(
            d.id,
            d.addr.clone(),
            d.creds,
            d.startup,
            d.timeout,
            d.max_message,
            &self.0,
        ))
    }
}
