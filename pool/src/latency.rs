//! Latency of one pool, three ways: how long clients waited for a server,
//! how long each query (request to ReadyForQuery) and each transaction
//! (checkout to checkin) took.
//!
//! Two views of the same observations:
//! - HDR histograms over a rolling window (the current stats period and the
//!   one before), for percentiles in SHOW LATENCY: what operators ask at
//!   3 a.m. is "how slow is it now", not since the process started.
//! - Fixed Prometheus buckets, cumulative over the process's life as the
//!   exposition format requires, for /metrics (Prometheus computes rates
//!   and quantiles itself).
//!
//! Both are kept per thread (`shard`): recording takes the thread's own
//! lock, uncontended, and adds to its own buckets; readers merge.

use crate::shard::{self, Padded, SHARDS};
use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Wait = 0,
    Query = 1,
    Xact = 2,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Wait, Kind::Query, Kind::Xact];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Wait => "wait",
            Kind::Query => "query",
            Kind::Xact => "xact",
        }
    }
}

/// Upper bounds of the Prometheus buckets, in microseconds (+Inf is implied).
pub const BUCKETS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    10_000_000, 60_000_000,
];

/// Cumulative bucket counts of one kind (not yet summed: `buckets()` does).
#[derive(Debug, Default)]
struct Series {
    /// Observations per bucket; the last one is +Inf.
    counts: [AtomicU64; BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

/// Percentiles of one kind over the window, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p95: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

struct Window {
    current: [Histogram<u32>; 3],
    previous: [Histogram<u32>; 3],
}

/// One thread's part. Its window (six histograms, ~84 KiB) is made at the
/// thread's first observation: a pool used from two threads holds two.
#[derive(Default)]
struct Shard {
    series: [Series; 3],
    window: Mutex<Option<Box<Window>>>,
}

pub struct Latency {
    shards: [Padded<Shard>; SHARDS],
    /// When the current period began.
    started: Mutex<Instant>,
}

/// Longest value tracked exactly, in microseconds; longer ones count as this.
const HIGHEST_US: u64 = 3_600_000_000;

fn histogram() -> Histogram<u32> {
    // Two significant digits (1% error) from 1 us to an hour: about 14 KiB
    // with 32-bit counts (a window holds far fewer than 4e9 values).
    Histogram::new_with_bounds(1, HIGHEST_US, 2).expect("valid bounds")
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            shards: Default::default(),
            started: Mutex::new(Instant::now()),
        }
    }
}

impl Window {
    fn new() -> Box<Window> {
        Box::new(Window {
            current: [histogram(), histogram(), histogram()],
            previous: [histogram(), histogram(), histogram()],
        })
    }
}

impl Latency {
    pub fn record(&self, kind: Kind, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let shard = &self.shards[shard::current()].0;
        let s = &shard.series[kind as usize];
        let i = BUCKETS_US.iter().position(|&b| us <= b).unwrap_or(BUCKETS_US.len());
        s.counts[i].fetch_add(1, Relaxed);
        s.sum_us.fetch_add(us, Relaxed);
        shard.window.lock().unwrap().get_or_insert_with(Window::new).current[kind as usize]
            .saturating_record(us.clamp(1, HIGHEST_US));
    }

    /// Starts a new window once `period` has passed: the current one
    /// becomes the previous one. Returns the length of the period that
    /// ended. Called by the pool's housekeeping tick.
    pub fn rotate(&self, period: Duration) -> Option<Duration> {
        let mut started = self.started.lock().unwrap();
        let elapsed = started.elapsed();
        if elapsed < period {
            return None;
        }
        for shard in &self.shards {
            if let Some(w) = shard.0.window.lock().unwrap().as_deref_mut() {
                std::mem::swap(&mut w.previous, &mut w.current);
                for h in &mut w.current {
                    h.reset();
                }
            }
        }
        *started = Instant::now();
        Some(elapsed)
    }

    /// Percentiles over the current and the previous period.
    pub fn percentiles(&self, kind: Kind) -> Percentiles {
        Self::merged_percentiles(&[self], kind)
    }

    /// Cumulative counts per bucket (the last is +Inf, i.e. the total),
    /// and the sum in microseconds, over the process's life.
    pub fn buckets(&self, kind: Kind) -> ([u64; BUCKETS_US.len() + 1], u64) {
        let mut out = [0u64; BUCKETS_US.len() + 1];
        let mut sum = 0;
        for shard in &self.shards {
            let s = &shard.0.series[kind as usize];
            for (o, c) in out.iter_mut().zip(&s.counts) {
                *o += c.load(Relaxed);
            }
            sum += s.sum_us.load(Relaxed);
        }
        let mut acc = 0;
        for o in &mut out {
            acc += *o;
            *o = acc;
        }
        (out, sum)
    }

    /// Percentiles over the windows of several pools (per database).
    pub fn merged_percentiles(pools: &[&Latency], kind: Kind) -> Percentiles {
        let mut h = histogram();
        for shard in pools.iter().flat_map(|l| &l.shards) {
            if let Some(w) = shard.0.window.lock().unwrap().as_deref() {
                // Same bounds everywhere, so adding cannot fail on range.
                let _ = h.add(&w.previous[kind as usize]);
                let _ = h.add(&w.current[kind as usize]);
            }
        }
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p95: h.value_at_quantile(0.95),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_percentiles_follow_the_data() {
        let l = Latency::default();
        for i in 1..=1000u64 {
            l.record(Kind::Query, Duration::from_micros(i * 10));
        }
        // From another thread: its own shard, the same totals.
        std::thread::scope(|t| {
            t.spawn(|| l.record(Kind::Xact, Duration::from_secs(100)));
        });
        let (b, sum) = l.buckets(Kind::Query);
        assert_eq!(b[0], 10, "10..=100 us");
        assert_eq!(b[BUCKETS_US.len()], 1000);
        assert!(b.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(sum, (1..=1000u64).map(|i| i * 10).sum::<u64>());
        let (x, _) = l.buckets(Kind::Xact);
        assert_eq!((x[BUCKETS_US.len() - 1], x[BUCKETS_US.len()]), (0, 1), "only +Inf");
        let p = l.percentiles(Kind::Query);
        assert_eq!(p.count, 1000);
        assert!((4900..=5100).contains(&p.p50), "{p:?}");
        assert!((9800..=10_100).contains(&p.p99), "{p:?}");
        assert_eq!(l.percentiles(Kind::Wait), Percentiles::default());
    }

    #[test]
    fn the_window_keeps_two_periods() {
        let l = Latency::default();
        l.record(Kind::Wait, Duration::from_millis(5));
        assert!(l.rotate(Duration::ZERO).is_some());
        l.record(Kind::Wait, Duration::from_millis(5));
        assert_eq!(l.percentiles(Kind::Wait).count, 2, "previous + current");
        assert!(l.rotate(Duration::ZERO).is_some());
        assert_eq!(l.percentiles(Kind::Wait).count, 1, "the oldest period left");
        assert!(l.rotate(Duration::from_secs(3600)).is_none());
        // Prometheus counts never go back.
        assert_eq!(l.buckets(Kind::Wait).0[BUCKETS_US.len()], 2);
    }
}
