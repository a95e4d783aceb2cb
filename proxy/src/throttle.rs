//! Failed-login throttling per source address.
//!
//! After `limit` failed logins from one address within `window`, further
//! connections from it are refused at accept, before any TLS or SCRAM
//! work, until the window has passed. A success does not reset the count
//! (an attacker holding one valid account could otherwise keep guessing
//! another's password).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Entries kept before expired ones are swept (bounds memory under a
/// spray from many addresses).
const SWEEP_AT: usize = 65_536;

pub struct AuthThrottle {
    limit: u32,
    window: Duration,
    failures: Mutex<HashMap<IpAddr, Window>>,
}

struct Window {
    count: u32,
    since: Instant,
}

impl AuthThrottle {
    pub fn new(limit: u32, window: Duration) -> Self {
        AuthThrottle {
            limit,
            window,
            failures: Mutex::default(),
        }
    }

    /// Whether `ip` is refused right now.
    pub fn is_blocked(&self, ip: IpAddr) -> bool {
        if self.limit == 0 {
            return false;
        }
        let map = self.failures.lock().unwrap();
        map.get(&ip)
            .is_some_and(|w| w.count >= self.limit && w.since.elapsed() < self.window)
    }

    pub fn record_failure(&self, ip: IpAddr) {
        if self.limit == 0 {
            return;
        }
        let mut map = self.failures.lock().unwrap();
        if map.len() >= SWEEP_AT {
            let window = self.window;
            map.retain(|_, w| w.since.elapsed() < window);
        }
        let w = map.entry(ip).or_insert(Window {
            count: 0,
            since: Instant::now(),
        });
        if w.since.elapsed() >= self.window {
            *w = Window {
                count: 0,
                since: Instant::now(),
            };
        }
        w.count = w.count.saturating_add(1);
        if w.count == self.limit {
            tracing::warn!(address = %ip, failures = w.count, window = ?self.window, "too many failed logins; refusing this address for the rest of the window");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_limit_within_window_only() {
        let t = AuthThrottle::new(3, Duration::from_millis(200));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..2 {
            t.record_failure(a);
        }
        assert!(!t.is_blocked(a));
        t.record_failure(a);
        assert!(t.is_blocked(a));
        assert!(!t.is_blocked(b), "other addresses are unaffected");
        std::thread::sleep(Duration::from_millis(250));
        assert!(!t.is_blocked(a), "the window passes");
        assert!(!AuthThrottle::new(0, Duration::from_secs(1)).is_blocked(a));
    }
}
