//! The last 15 minutes for the status page's charts: one sample every 5 s
//! of each pool (transactions/s, p99 query latency, waiting clients,
//! server connections) and of the topology (leader, replicas serving
//! reads, failovers).
//!
//! Everything lives in fixed-size rings allocated when a pool (or the
//! history) first appears, so a sample costs a few atomic loads and no
//! allocation; the page reads the rings under the same short lock.

use super::View;
use pgferry_pool::latency::{Kind, BUCKETS_US};
use pgferry_pool::stats::Total;
use pgferry_pool::PoolKey;
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;

/// Time between samples.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// Samples kept: 15 minutes.
pub const SLOTS: usize = 180;
/// Pools followed at most: with many auto-created pools the history stays
/// bounded (about 4 KiB per pool); the others are counted, not charted.
pub const MAX_POOLS: usize = 256;

/// Cumulative latency bucket counts, +Inf last (`Latency::buckets`).
type Buckets = [u64; BUCKETS_US.len() + 1];

/// A fixed-capacity ring: pushing onto a full ring drops the oldest item.
#[derive(Debug)]
pub struct Ring<T> {
    items: Vec<T>,
    /// Index of the oldest item once the ring is full.
    head: usize,
    cap: usize,
}

impl<T> Ring<T> {
    pub fn new(cap: usize) -> Self {
        Ring {
            items: Vec::with_capacity(cap),
            head: 0,
            cap,
        }
    }

    pub fn push(&mut self, item: T) {
        if self.items.len() < self.cap {
            self.items.push(item);
        } else if let Some(slot) = self.items.get_mut(self.head) {
            *slot = item;
            self.head = (self.head + 1) % self.cap;
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        let (newer, older) = self.items.split_at(self.head);
        older.iter().chain(newer)
    }

    pub fn last(&self) -> Option<&T> {
        if self.items.len() < self.cap || self.head == 0 {
            self.items.last()
        } else {
            self.items.get(self.head - 1)
        }
    }
}

/// One pool at one sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolPoint {
    pub tick: u64,
    pub tps: f64,
    /// None: no query finished during the interval.
    pub p99_ms: Option<f64>,
    pub waiting: u64,
    /// Active and idle.
    pub servers: u64,
}

/// What a sample reads from one pool.
#[derive(Debug, Clone, Copy)]
pub struct PoolReading<'a> {
    pub key: &'a PoolKey,
    pub xacts: u64,
    pub query_buckets: Buckets,
    pub waiting: u64,
    pub servers: u64,
}

#[derive(Debug)]
pub struct PoolSeries {
    /// "app/app rw 10.0.0.1:5432".
    pub label: String,
    pub points: Ring<PoolPoint>,
    last_xacts: u64,
    last_buckets: Buckets,
}

/// The topology at one sample.
#[derive(Debug, Clone)]
pub struct TopoPoint {
    pub tick: u64,
    pub at: SystemTime,
    /// The member confirmed writable (None during a failover).
    pub leader: Option<Arc<str>>,
    /// Members serving reads.
    pub replicas: Arc<[Arc<str>]>,
    /// The leader changed since the previous sample.
    pub failover: bool,
}

#[derive(Debug)]
pub struct History {
    /// Samples taken so far; point `tick`s count from 1.
    tick: u64,
    last_at: Instant,
    pools: HashMap<PoolKey, PoolSeries>,
    /// Pools seen in the last sample but not followed (over `MAX_POOLS`).
    pub untracked: usize,
    pub topology: Ring<TopoPoint>,
    last_leader_changes: u64,
}

/// Nearest-rank quantile `q` of the observations counted in cumulative
/// `buckets`, interpolated linearly inside its bucket as Prometheus's
/// `histogram_quantile` does, in milliseconds. None without observations.
/// An estimate: exact only to the bucket bounds (e.g. 2.5 ms to 5 ms).
pub fn quantile_ms(q: f64, buckets: &Buckets) -> Option<f64> {
    let total = *buckets.last()?;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let i = buckets.iter().position(|&c| c as f64 >= rank)?;
    let Some(&upper) = BUCKETS_US.get(i) else {
        // Beyond the last bound: the bound is all that is known.
        return BUCKETS_US.last().map(|&us| us as f64 / 1000.0);
    };
    let lower = if i == 0 { 0 } else { BUCKETS_US[i - 1] };
    let below = if i == 0 { 0 } else { buckets[i - 1] };
    let inside = (buckets[i] - below).max(1) as f64;
    let us = lower as f64 + (upper - lower) as f64 * ((rank - below as f64) / inside).clamp(0.0, 1.0);
    Some(us / 1000.0)
}

/// `now - before`, or `now` when the counter restarted (a pool replaced
/// under the same key).
fn delta(now: u64, before: u64) -> u64 {
    if now >= before {
        now - before
    } else {
        now
    }
}

impl History {
    pub fn new(now: Instant) -> Self {
        History {
            tick: 0,
            last_at: now,
            pools: HashMap::new(),
            untracked: 0,
            topology: Ring::new(SLOTS),
            last_leader_changes: 0,
        }
    }

    /// Position of `tick` on a chart of `SLOTS` columns (the latest sample
    /// is the last column); None when it is out of the window.
    pub fn slot(&self, tick: u64) -> Option<usize> {
        let age = usize::try_from(self.tick.checked_sub(tick)?).ok()?;
        (age < SLOTS).then(|| SLOTS - 1 - age)
    }

    /// The pools' series, by label.
    pub fn pools(&self) -> Vec<&PoolSeries> {
        let mut v: Vec<&PoolSeries> = self.pools.values().collect();
        v.sort_by(|a, b| a.label.cmp(&b.label));
        v
    }

    /// Records one sample: the pools' counters and gauges now, the members
    /// leading and serving reads, and the leader-change counter.
    pub fn record<'a, 'r>(
        &mut self,
        now: Instant,
        at: SystemTime,
        pools: impl IntoIterator<Item = PoolReading<'a>>,
        leader: Option<&str>,
        replicas: impl Iterator<Item = &'r str> + Clone,
        leader_changes: u64,
    ) {
        self.tick += 1;
        let tick = self.tick;
        let secs = now.saturating_duration_since(self.last_at).as_secs_f64().max(0.001);
        self.last_at = now;
        self.untracked = 0;
        for r in pools {
            if !self.pools.contains_key(r.key) {
                if self.pools.len() >= MAX_POOLS {
                    self.untracked += 1;
                    continue;
                }
                let label = format!(
                    "{}/{} {} {}",
                    r.key.database,
                    r.key.user,
                    if r.key.read_only { "ro" } else { "rw" },
                    r.key.node
                );
                self.pools.insert(
                    r.key.clone(),
                    PoolSeries {
                        label,
                        points: Ring::new(SLOTS),
                        last_xacts: 0,
                        last_buckets: [0; BUCKETS_US.len() + 1],
                    },
                );
            }
            let Some(s) = self.pools.get_mut(r.key) else { continue };
            let xacts = delta(r.xacts, s.last_xacts);
            let restarted = r.query_buckets[BUCKETS_US.len()] < s.last_buckets[BUCKETS_US.len()];
            let mut window = r.query_buckets;
            if !restarted {
                for (w, before) in window.iter_mut().zip(&s.last_buckets) {
                    *w = w.saturating_sub(*before);
                }
            }
            s.last_xacts = r.xacts;
            s.last_buckets = r.query_buckets;
            s.points.push(PoolPoint {
                tick,
                tps: xacts as f64 / secs,
                p99_ms: quantile_ms(0.99, &window),
                waiting: r.waiting,
                servers: r.servers,
            });
        }
        // Pools gone for the whole window leave the history.
        self.pools
            .retain(|_, s| s.points.last().is_some_and(|p| tick - p.tick < SLOTS as u64));

        let previous = self.topology.last();
        let leader = match (previous.and_then(|p| p.leader.as_ref()), leader) {
            (Some(p), Some(l)) if **p == *l => Some(p.clone()),
            (_, l) => l.map(Arc::from),
        };
        let replicas = match previous {
            Some(p) if p.replicas.iter().map(|r| &**r).eq(replicas.clone()) => p.replicas.clone(),
            _ => replicas.map(Arc::from).collect(),
        };
        let failover = leader_changes > self.last_leader_changes && previous.is_some();
        self.last_leader_changes = leader_changes;
        self.topology.push(TopoPoint {
            tick,
            at,
            leader,
            replicas,
            failover,
        });
    }

    /// Samples the proxy now.
    fn sample(&mut self, view: &View) {
        let pools = view.pools.all();
        let readings = pools.iter().map(|p| PoolReading {
            key: &p.key,
            xacts: p.stats.total(Total::XactCount),
            query_buckets: p.latency.buckets(Kind::Query).0,
            waiting: p.stats.cl_waiting.load(Relaxed) as u64,
            servers: (p.stats.sv_active.load(Relaxed) + p.idle_count()) as u64,
        });
        let topo = view.router.topology();
        self.record(
            Instant::now(),
            SystemTime::now(),
            readings,
            topo.primary.as_ref().map(|m| m.name.as_str()),
            topo.standbys.iter().map(|m| m.name.as_str()),
            view.obs.counters.leader_changes.load(Relaxed),
        );
    }
}

/// Samples into `history` every `INTERVAL` until `shutdown` turns true.
pub async fn sample_every(view: Arc<View>, history: Arc<Mutex<History>>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        history.lock().unwrap_or_else(|e| e.into_inner()).sample(&view);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgferry_pool::NodeAddr;

    fn key(db: &str) -> PoolKey {
        PoolKey {
            database: db.into(),
            user: "app".into(),
            node: Arc::new(NodeAddr {
                host: "10.0.0.1".into(),
                port: 5432,
            }),
            read_only: false,
        }
    }

    /// Cumulative buckets with `n` observations of `us` microseconds each.
    fn buckets(obs: &[(u64, u64)]) -> Buckets {
        let mut b = [0; BUCKETS_US.len() + 1];
        for &(us, n) in obs {
            let i = BUCKETS_US.iter().position(|&x| us <= x).unwrap_or(BUCKETS_US.len());
            for c in &mut b[i..] {
                *c += n;
            }
        }
        b
    }

    #[test]
    fn ring_keeps_the_newest_in_order() {
        let mut r = Ring::new(3);
        assert_eq!(r.last(), None);
        for i in 1..=2 {
            r.push(i);
        }
        assert_eq!(r.iter().copied().collect::<Vec<_>>(), [1, 2]);
        assert_eq!(r.last(), Some(&2));
        for i in 3..=7 {
            r.push(i);
        }
        assert_eq!(r.iter().copied().collect::<Vec<_>>(), [5, 6, 7]);
        assert_eq!(r.last(), Some(&7));
        assert_eq!(r.len(), 3);
        assert_eq!(r.items.capacity(), 3, "no growth past the capacity");
        let mut empty = Ring::new(0);
        empty.push(1);
        assert_eq!(empty.len(), 0);
    }

    #[test]
    fn quantile_interpolates_within_the_bucket() {
        assert_eq!(quantile_ms(0.99, &buckets(&[])), None);
        // 100 observations between 1 and 2.5 ms: p99 is 99% of the way.
        let q = quantile_ms(0.99, &buckets(&[(2_000, 100)])).unwrap();
        assert!((q - (1.0 + 1.5 * 0.99)).abs() < 1e-9, "{q}");
        // 98 fast, 2 slow (25-50 ms): p99 falls in the slow bucket.
        let q = quantile_ms(0.99, &buckets(&[(50, 98), (30_000, 2)])).unwrap();
        assert!((25.0..=50.0).contains(&q), "{q}");
        // Beyond the last bound: the last bound.
        assert_eq!(quantile_ms(0.99, &buckets(&[(100_000_000, 5)])), Some(60_000.0));
    }

    #[test]
    fn samples_rates_and_windows_from_counter_deltas() {
        let t0 = Instant::now();
        let mut h = History::new(t0);
        let k = key("app");
        let none = std::iter::empty::<&str>();
        let reading = |xacts, b| PoolReading {
            key: &k,
            xacts,
            query_buckets: b,
            waiting: 2,
            servers: 3,
        };
        let at = SystemTime::now();
        h.record(
            t0 + INTERVAL,
            at,
            [reading(50, buckets(&[(2_000, 50)]))],
            Some("a"),
            none.clone(),
            0,
        );
        // The next 5 s: 100 more transactions, all slow.
        let b = buckets(&[(2_000, 50), (30_000, 100)]);
        h.record(t0 + 2 * INTERVAL, at, [reading(150, b)], Some("a"), none.clone(), 0);
        // Then nothing.
        h.record(t0 + 3 * INTERVAL, at, [reading(150, b)], Some("a"), none.clone(), 0);
        let series = h.pools();
        assert_eq!(series.len(), 1);
        assert_eq!(series[0].label, "app/app rw 10.0.0.1:5432");
        let pts: Vec<PoolPoint> = series[0].points.iter().copied().collect();
        assert_eq!(pts.iter().map(|p| p.tps).collect::<Vec<_>>(), [10.0, 20.0, 0.0]);
        assert!(pts[0].p99_ms.unwrap() < 2.5);
        assert!(pts[1].p99_ms.unwrap() > 25.0, "the window's p99, not the lifetime's");
        assert_eq!(pts[2].p99_ms, None, "no queries, no p99");
        assert_eq!((pts[2].waiting, pts[2].servers), (2, 3));
        assert_eq!(pts.iter().map(|p| p.tick).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(h.slot(3), Some(SLOTS - 1));
        assert_eq!(h.slot(1), Some(SLOTS - 3));

        // A pool replaced under the same key: its counters restart.
        h.record(t0 + 4 * INTERVAL, at, [reading(5, buckets(&[]))], Some("a"), none, 0);
        assert_eq!(h.pools()[0].points.last().unwrap().tps, 1.0);
    }

    #[test]
    fn pools_leave_after_the_window_and_are_bounded() {
        let t0 = Instant::now();
        let mut h = History::new(t0);
        let keys: Vec<PoolKey> = (0..MAX_POOLS + 3).map(|i| key(&format!("db{i}"))).collect();
        let read = |k| PoolReading {
            key: k,
            xacts: 0,
            query_buckets: [0; BUCKETS_US.len() + 1],
            waiting: 0,
            servers: 0,
        };
        let at = SystemTime::now();
        h.record(t0, at, keys.iter().map(read), None, std::iter::empty(), 0);
        assert_eq!((h.pools.len(), h.untracked), (MAX_POOLS, 3));
        for _ in 0..SLOTS - 1 {
            h.record(t0, at, keys[..1].iter().map(read), None, std::iter::empty(), 0);
        }
        assert_eq!(h.pools.len(), MAX_POOLS, "still in the window");
        h.record(t0, at, keys[..1].iter().map(read), None, std::iter::empty(), 0);
        assert_eq!(h.pools.len(), 1, "the others left the window");
        assert!(h.pools.values().all(|s| s.points.len() <= SLOTS));
        assert_eq!(h.topology.len(), SLOTS);
    }

    #[test]
    fn topology_marks_leader_changes_and_reuses_names() {
        let t0 = Instant::now();
        let mut h = History::new(t0);
        let at = SystemTime::now();
        let no_pools: [PoolReading; 0] = [];
        h.record(t0, at, no_pools, Some("a"), ["b", "c"].into_iter(), 3);
        h.record(t0, at, no_pools, Some("a"), ["b", "c"].into_iter(), 3);
        h.record(t0, at, no_pools, None, ["c"].into_iter(), 3);
        h.record(t0, at, no_pools, Some("b"), ["c"].into_iter(), 4);
        let t: Vec<&TopoPoint> = h.topology.iter().collect();
        assert_eq!(
            t.iter().map(|p| p.failover).collect::<Vec<_>>(),
            [false, false, false, true],
            "the first sample is no failover, whatever the counter says"
        );
        assert!(Arc::ptr_eq(
            t[0].leader.as_ref().unwrap(),
            t[1].leader.as_ref().unwrap()
        ));
        assert!(
            Arc::ptr_eq(&t[0].replicas, &t[1].replicas),
            "unchanged: shared, not copied"
        );
        assert_eq!(t[2].leader, None);
        assert_eq!(t[3].leader.as_deref(), Some("b"));
        assert_eq!(t[3].replicas.iter().map(|r| &**r).collect::<Vec<_>>(), ["c"]);
    }
}
