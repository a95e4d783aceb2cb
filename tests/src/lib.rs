//! End-to-end test harness for pgferry: real PostgreSQL clusters, real
//! clients and the real `pgferry` binary. No mocks.
//!
//! * [`PgCluster`] runs a PostgreSQL 15 primary (and optionally a streaming
//!   standby) as an unprivileged OS user in a fresh directory under `/tmp`, on
//!   free ports. [`shared_cluster`] gives one per test binary.
//! * [`Ferry`] runs the `pgferry` binary against a config and waits until it
//!   listens. [`Ferry::for_cluster`] builds the config for a cluster.
//! * Every cluster and every pgferry process is paired with a detached
//!   watchdog process that cleans up once the test process is gone, however it
//!   died (panic, abort, SIGKILL), so no postmaster outlives its test binary.
//!
//! See `tests/README.md`.

pub mod citus;
mod client;
mod cluster;
mod ferry;
mod osuser;
mod patroni;
pub mod patroni_citus;
mod ports;
mod util;
mod wait;
mod watchdog;

pub use client::{backend_pid, connect, in_recovery};
pub use cluster::{shared_cluster, Node, PgCluster, PgOptions, APP_PASS, PG_BIN, STANDARD_USERS};
pub use ferry::{merge_toml, pgferry_bin, workspace_root, Ferry};
pub use osuser::{pg_os_user, OsUser};
pub use patroni::{
    patroni_member_json, write_citus_layout, CitusGroup, Etcd, PatroniCluster, PatroniOptions, CITUS_LAYOUT_XLOG,
    ETCDCTL_BIN, ETCD_BIN, PATRONICTL_BIN, PATRONI_BIN, PATRONI_REPLICATION_PASSWORD, PATRONI_REWIND_PASSWORD,
    PATRONI_SUPERUSER_PASSWORD,
};
pub use patroni_citus::{PatroniCitus, PatroniCitusOptions, PATRONI_CITUS_DB};
pub use ports::free_port;
pub use util::{conn_str, port_accepts, quote_ident, quote_literal, raise_nofile, tail_file};
pub use wait::{wait_for, wait_for_async, wait_until};
