//! What operators read: the listeners' counters (/metrics) and recent
//! operational events (the status page).

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::SystemTime;

pub struct Observability {
    /// Listener counters for /metrics.
    pub counters: Counters,
    /// Recent operational events for the status page, newest last.
    events: Mutex<VecDeque<(SystemTime, String)>>,
    pub started: SystemTime,
}

/// How many events the status page keeps.
const EVENTS_KEPT: usize = 100;

impl Default for Observability {
    fn default() -> Self {
        Observability {
            counters: Counters::default(),
            events: Mutex::default(),
            started: SystemTime::now(),
        }
    }
}

impl Observability {
    /// Records an operational event (a reload, a console command, a
    /// topology change) for the status page. Callers log it themselves.
    pub fn event(&self, what: impl Into<String>) {
        let mut e = self.events.lock().unwrap();
        if e.len() == EVENTS_KEPT {
            e.pop_front();
        }
        e.push_back((SystemTime::now(), what.into()));
    }

    pub fn events(&self) -> Vec<(SystemTime, String)> {
        self.events.lock().unwrap().iter().cloned().collect()
    }
}

/// What the listeners count (read by /metrics).
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections accepted on the read-write and read-only ports.
    pub accepted_rw: AtomicU64,
    pub accepted_ro: AtomicU64,
    pub tls_handshakes: AtomicU64,
    /// Failed logins: wrong password / unknown user, hba refusal,
    /// plaintext where TLS is required.
    pub auth_failures: AtomicU64,
    pub auth_failures_hba: AtomicU64,
    pub auth_failures_tls: AtomicU64,
    /// Cancel requests received, and those that matched a client with a
    /// query on a server (and were passed on).
    pub cancel_requests: AtomicU64,
    pub cancels_forwarded: AtomicU64,
    /// Times the read-write port's server changed.
    pub leader_changes: AtomicU64,
    /// Failed logins answered late (see `throttle.rs`).
    pub auth_failures_delayed: AtomicU64,
    /// Connections refused at accept, by reason.
    pub refused_max_client_conn: AtomicU64,
    pub refused_pending_logins: AtomicU64,
    pub refused_pending_per_address: AtomicU64,
}
