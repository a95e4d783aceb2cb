//! Sans-IO PostgreSQL wire protocol (v3.0) codec.
//!
//! Both sides of the proxy use it: `proxy` decodes what clients send, `pool`
//! decodes what servers send. Nothing here does IO; every function works on
//! byte buffers so that it can be fuzzed and property-tested in isolation.
//!
//! Design rules:
//! * a [`Frame`] keeps the original bytes of one message, so forwarding a
//!   message is a plain copy of those bytes and never a re-encode;
//! * typed views (in [`backend`] and [`frontend`]) borrow a frame's body and
//!   only the handful of messages the proxy inspects have one;
//! * framing is check-then-parse: nothing is consumed until a whole message
//!   is buffered, and declared lengths are bounded before any allocation.

#![forbid(unsafe_code)]

pub mod backend;
pub mod encode;
pub mod frame;
pub mod frontend;
pub mod login;
pub mod replies;
pub mod scram;
pub mod sql;
pub mod startup;

pub use frame::{decode_frame, Frame, ProtocolError};
pub use startup::{decode_startup, StartupPacket};

/// SQLSTATE codes pgferry sends itself (PostgreSQL's `errcodes.txt`).
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const TRANSACTION_RESOLUTION_UNKNOWN: &str = "08007";
    pub const CONNECTION_EXCEPTION: &str = "08000";
    pub const SQLCLIENT_UNABLE_TO_ESTABLISH: &str = "08001";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    pub const QUERY_CANCELED: &str = "57014";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const DUPLICATE_PSTATEMENT: &str = "42P05";
    pub const INVALID_SQL_STATEMENT_NAME: &str = "26000";
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
    pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";
    pub const IN_FAILED_SQL_TRANSACTION: &str = "25P02";
    pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
    pub const INTERNAL_ERROR: &str = "XX000";
    pub const SYNTAX_ERROR: &str = "42601";
    pub const UNDEFINED_OBJECT: &str = "42704";
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
    pub const CONFIG_FILE_ERROR: &str = "F0000";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    pub const READ_ONLY_SQL_TRANSACTION: &str = "25006";
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";
}
