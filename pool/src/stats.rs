//! Counters of one pool. Written with relaxed atomics on the hot path and
//! read as snapshots by the admin console and /metrics.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

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
    /// Requests answered by a ReadyForQuery (a simple query string or an
    /// extended-protocol Sync), as PgBouncer counts them.
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
    /// The totals when the current stats period began, and the averages of
    /// the last complete one.
    period: Mutex<([u64; 7], Averages)>,
}

/// PgBouncer's avg_* columns over the last complete stats period: counts
/// and bytes per second; times in microseconds per transaction (xact,
/// wait) or per query.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Averages {
    pub xact_count: u64,
    pub query_count: u64,
    pub recv: u64,
    pub sent: u64,
    pub xact_time: u64,
    pub query_time: u64,
    pub wait_time: u64,
}

impl PoolStats {
    pub fn add(counter: &AtomicU64, v: u64) {
        counter.fetch_add(v, Relaxed);
    }

    /// xact count, query count, bytes received, bytes sent, xact time,
    /// query time, wait time (microseconds): PgBouncer's order.
    pub fn totals(&self) -> [u64; 7] {
        [
            &self.total_xact_count,
            &self.total_query_count,
            &self.total_received,
            &self.total_sent,
            &self.total_xact_time,
            &self.total_query_time,
            &self.total_wait_time,
        ]
        .map(|c| c.load(Relaxed))
    }

    /// Ends a stats period of length `elapsed`: its averages replace the
    /// previous period's.
    pub fn end_period(&self, elapsed: Duration) {
        let now = self.totals();
        let mut p = self.period.lock().unwrap();
        let d: [u64; 7] = std::array::from_fn(|i| now[i].saturating_sub(p.0[i]));
        let secs = elapsed.as_secs_f64().max(0.001);
        let rate = |v: u64| (v as f64 / secs).round() as u64;
        let per = |v: u64, n: u64| v.checked_div(n).unwrap_or(0);
        p.1 = Averages {
            xact_count: rate(d[0]),
            query_count: rate(d[1]),
            recv: rate(d[2]),
            sent: rate(d[3]),
            xact_time: per(d[4], d[0]),
            query_time: per(d[5], d[1]),
            wait_time: per(d[6], d[0]),
        };
        p.0 = now;
    }

    pub fn averages(&self) -> Averages {
        self.period.lock().unwrap().1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_cover_the_last_period_only() {
        let s = PoolStats::default();
        s.total_xact_count.store(100, Relaxed);
        s.total_xact_time.store(100_000, Relaxed);
        s.end_period(Duration::from_secs(10));
        s.total_xact_count.store(150, Relaxed);
        s.total_xact_time.store(200_000, Relaxed);
        s.total_query_count.store(40, Relaxed);
        s.end_period(Duration::from_secs(10));
        let a = s.averages();
        assert_eq!(
            (a.xact_count, a.xact_time, a.query_count, a.query_time),
            (5, 2000, 4, 0)
        );
    }
}
