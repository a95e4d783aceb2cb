//! Server connections and pools.
//!
//! A [`Pool`] holds the server connections of one (database, user, node)
//! key. A client session checks a connection out for a transaction (or a
//! whole session) and owns it exclusively through a [`PooledConn`] guard;
//! the guard's `Drop` discards a connection that was not explicitly checked
//! back in, so a connection whose IO was interrupted is never reused.

#![forbid(unsafe_code)]

// Module dependencies run one way: addr and wire (leaves) <- login <-
// server <- connect <- pool; error, stats, latency and statements are
// leaves too.
mod addr;
pub mod affinity;
pub mod connect;
mod error;
pub mod latency;
mod login;
pub mod pool;
pub mod server;
pub mod shard;
pub mod statements;
pub mod stats;
mod wire;

pub use addr::NodeAddr;
pub use connect::{Connect, TcpConnect};
pub use error::PoolError;
pub use latency::Latency;
pub use login::ServerCredentials;
pub use pool::{AsPoolKeyRef, Pool, PoolKey, PoolKeyRef, PooledConn, Queued, Room};
pub use server::ServerConn;
pub use stats::{Averages, PoolStats};
