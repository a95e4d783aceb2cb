//! Failed-login throttling per (source address, user).
//!
//! Brute-force protection must not be a denial-of-service tool: nothing is
//! refused up front. A correct password always logs in, and cancel requests
//! and TLS negotiation are never refused, whoever else fails from the same
//! address (a NAT, a shared host). Instead, after `limit` failed logins of
//! one user from one address within `window`, each further failure of that
//! pair is answered only after `delay`. Guessing then runs at most at
//! (logins one address may have pending) / `delay` per second, and each
//! guess holds one of that address's pending-login places meanwhile.
//!
//! A success does not reset the count (an attacker holding one valid
//! account could otherwise keep guessing another's password).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Entries kept before expired ones are swept (bounds memory under a
/// spray from many addresses and user names). If the map is still full
/// after a sweep, failures are counted per address alone.
const SWEEP_AT: usize = 65_536;

pub struct AuthThrottle {
    limit: u32,
    window: Duration,
    delay: Duration,
    /// Keyed by address and user; `None`: the address's overflow count.
    failures: Mutex<HashMap<(IpAddr, Option<String>), Window>>,
}

struct Window {
    count: u32,
    since: Instant,
}

impl AuthThrottle {
    pub fn new(limit: u32, window: Duration, delay: Duration) -> Self {
        AuthThrottle {
            limit,
            window,
            delay,
            failures: Mutex::default(),
        }
    }

    /// Counts a failed login of `user` from `ip`; returns how long to wait
    /// before answering it (zero below the limit).
    pub fn record_failure(&self, ip: IpAddr, user: &str) -> Duration {
        if self.limit == 0 {
            return Duration::ZERO;
        }
        let mut map = self.failures.lock().unwrap();
        let mut key = (ip, Some(user.to_owned()));
        if map.len() >= SWEEP_AT && !map.contains_key(&key) {
            let window = self.window;
            map.retain(|_, w| w.since.elapsed() < window);
            if map.len() >= SWEEP_AT {
                key.1 = None;
            }
        }
        let w = map.entry(key).or_insert(Window {
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
        if w.count == self.limit + 1 {
            tracing::warn!(address = %ip, user, failures = w.count, window = ?self.window, delay = ?self.delay, "too many failed logins; slowing down further failures of this user from this address");
        }
        if w.count > self.limit {
            self.delay
        } else {
            Duration::ZERO
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slows_failures_per_address_and_user_within_the_window() {
        let d = Duration::from_millis(500);
        let t = AuthThrottle::new(3, Duration::from_millis(200), d);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(t.record_failure(a, "app"), Duration::ZERO);
        }
        assert_eq!(t.record_failure(a, "app"), d, "over the limit: slowed down");
        assert_eq!(
            t.record_failure(a, "other"),
            Duration::ZERO,
            "another user on the address"
        );
        assert_eq!(t.record_failure(b, "app"), Duration::ZERO, "another address");
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(t.record_failure(a, "app"), Duration::ZERO, "the window passes");
        let off = AuthThrottle::new(0, Duration::from_secs(1), d);
        for _ in 0..10 {
            assert_eq!(off.record_failure(a, "app"), Duration::ZERO);
        }
    }
}
