//! Counters of one pool. Written with relaxed atomics on the hot path and
//! read as snapshots by the admin console and /metrics.

use crate::shard::{self, Padded, SHARDS};
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
    /// PgBouncer's totals (see `Total`), per thread (`shard`).
    totals: [Padded<[AtomicU64; 7]>; SHARDS],
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

/// PgBouncer's totals, in its order (SHOW STATS' total_* columns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Total {
    XactCount = 0,
    /// Requests answered by a ReadyForQuery (a simple query string or an
    /// extended-protocol Sync), as PgBouncer counts them.
    QueryCount,
    Received,
    Sent,
    /// Microseconds, as the other times.
    XactTime,
    QueryTime,
    WaitTime,
}

impl PoolStats {
    /// Adds to a total, in the calling thread's shard.
    pub fn add(&self, t: Total, v: u64) {
        self.totals[shard::current()].0[t as usize].fetch_add(v, Relaxed);
    }

    pub fn total(&self, t: Total) -> u64 {
        self.totals.iter().map(|s| s.0[t as usize].load(Relaxed)).sum()
    }

    /// xact count, query count, bytes received, bytes sent, xact time,
    /// query time, wait time (microseconds): PgBouncer's order.
    pub fn totals(&self) -> [u64; 7] {
        let mut out = [0; 7];
        for s in &self.totals {
            for (o, c) in out.iter_mut().zip(&s.0) {
                *o += c.load(Relaxed);
            }
        }
        out
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
        s.add(Total::XactCount, 100);
        s.add(Total::XactTime, 100_000);
        s.end_period(Duration::from_secs(10));
        // Another thread's additions count too.
        std::thread::scope(|t| {
            t.spawn(|| {
                s.add(Total::XactCount, 50);
                s.add(Total::XactTime, 100_000);
            });
        });
        s.add(Total::QueryCount, 40);
        assert_eq!(s.total(Total::XactCount), 150);
        s.end_period(Duration::from_secs(10));
        let a = s.averages();
        assert_eq!(
            (a.xact_count, a.xact_time, a.query_count, a.query_time),
            (5, 2000, 4, 0)
        );
    }
}
