//! The process's phases as sessions see them: a drain (SIGTERM), a
//! console SHUTDOWN, and PAUSE / RESUME of new transactions.

use super::Observability;
use crate::clients::ClientRegistry;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub struct Lifecycle {
    /// Wakes sessions idle between transactions when draining starts.
    pub drain_tx: watch::Sender<bool>,
    /// Console SHUTDOWN: asks `run` to stop as SIGTERM does.
    pub stop_tx: watch::Sender<bool>,
    /// Set on SIGTERM: sessions close at their next transaction boundary.
    drain_started: OnceLock<Instant>,
    draining: AtomicBool,
    /// PAUSE: databases whose new transactions wait ("*" = all).
    pause: watch::Sender<BTreeSet<String>>,
    /// Whether anything is paused: the one check on the hot path.
    pub any_paused: AtomicBool,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            drain_tx: watch::channel(false).0,
            stop_tx: watch::channel(false).0,
            drain_started: OnceLock::new(),
            draining: AtomicBool::new(false),
            pause: watch::channel(Default::default()).0,
            any_paused: AtomicBool::new(false),
        }
    }
}

impl Lifecycle {
    /// Starts a graceful shutdown: idle clients are closed with 57P01 now,
    /// the others at the end of their transaction.
    pub fn start_draining(&self, obs: &Observability, clients: &ClientRegistry) {
        if self.drain_started.set(Instant::now()).is_ok() {
            obs.event("shutting down: closing clients at transaction boundaries");
        }
        self.draining.store(true, Ordering::Release);
        self.drain_tx.send_replace(true);
        for c in clients.all() {
            c.nudge();
        }
    }

    /// Set once a drain has started (sessions check it when nudged).
    pub fn draining(&self) -> &AtomicBool {
        &self.draining
    }

    /// How long pgferry has been draining; None while it is not.
    pub fn drain_age(&self) -> Option<Duration> {
        self.drain_started.get().map(|t| t.elapsed())
    }

    /// PAUSE `db` (None: every database): new transactions wait.
    pub fn pause(&self, db: Option<&str>) {
        self.pause.send_modify(|p| {
            p.insert(db.unwrap_or("*").to_owned());
        });
        self.any_paused.store(true, Ordering::Relaxed);
    }

    /// RESUME `db` (None: everything). Returns false if it was not paused.
    pub fn resume(&self, db: Option<&str>) -> bool {
        let mut was = false;
        self.pause.send_modify(|p| {
            was = match db {
                Some(d) => p.remove(d),
                None => {
                    let any = !p.is_empty();
                    p.clear();
                    any
                }
            };
            self.any_paused.store(!p.is_empty(), Ordering::Relaxed);
        });
        was
    }

    pub fn is_paused(&self, db: &str) -> bool {
        let p = self.pause.borrow();
        p.contains("*") || p.contains(db)
    }

    /// Waits until `db` is not paused.
    pub async fn wait_unpaused(&self, db: &str) {
        let mut rx = self.pause.subscribe();
        while self.is_paused(db) {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}
