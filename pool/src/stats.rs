//! Counters of one pool. Written with relaxed atomics on the hot path and
//! read as snapshots by the admin console and /metrics.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct PoolStats {
    /// Clients logged in to this pool.
    pub cl_active: AtomicUsize,
    /// Clients waiting for a server connection.
    pub cl_waiting: AtomicUsize,
    /// Server connections checked out.
    pub sv_active: AtomicUsize,
    /// Server connections being established.
    pub sv_login: AtomicUsize,
    pub total_xact_count: AtomicU64,
    pub total_query_count: AtomicU64,
    pub total_received: AtomicU64,
    pub total_sent: AtomicU64,
    /// Microseconds.
    pub total_xact_time: AtomicU64,
    pub total_query_time: AtomicU64,
    pub total_wait_time: AtomicU64,
    /// Server connections opened and closed over the pool's life.
    pub servers_opened: AtomicU64,
    pub servers_closed: AtomicU64,
    pub server_errors: AtomicU64,
    pub wait_timeouts: AtomicU64,
}

impl PoolStats {
    pub fn add(counter: &AtomicU64, v: u64) {
        counter.fetch_add(v, Relaxed);
    }
}
