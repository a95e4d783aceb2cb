//! Per-thread shards of hot counters.
//!
//! Every transaction adds to a pool's totals and latency series. With one
//! shared atomic per counter, sessions on different threads take turns
//! owning the same cache lines, and every addition may wait for a line to
//! cross cores. Each thread writes its own shard instead (a line no other
//! thread writes); readers, rare (the console, /metrics, the stats tick),
//! add the shards up.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Shards per pool. Threads beyond this share shards (still exact: the
/// additions are atomic), they only contend again.
pub const SHARDS: usize = 8;

/// The calling thread's shard, fixed at its first use.
pub fn current() -> usize {
    thread_local! {
        static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    SHARD.with(|s| {
        let mut v = s.get();
        if v == usize::MAX {
            v = NEXT.fetch_add(1, Relaxed) % SHARDS;
            s.set(v);
        }
        v
    })
}

/// `T` on a cache-line pair of its own (x86 prefetches lines in pairs).
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Padded<T>(pub T);

#[cfg(test)]
mod tests {
    #[test]
    fn a_thread_keeps_its_shard_and_threads_spread() {
        let mine = super::current();
        assert_eq!(mine, super::current());
        let others: Vec<usize> = (0..super::SHARDS - 1)
            .map(|_| std::thread::spawn(super::current).join().unwrap())
            .collect();
        assert!(others.iter().all(|&s| s < super::SHARDS));
        assert!(others.iter().any(|&s| s != mine), "{mine} {others:?}");
    }
}
