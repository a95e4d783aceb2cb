//! A pool of server connections for one (database, user, node).
//!
//! Waiting is fair: clients queue on a FIFO semaphore whose permits are the
//! pool's size, and a connection returned to the pool is pushed onto the
//! idle stack before its permit is released, so the next waiter finds it.
//! The idle stack is LIFO so that a few hot connections serve a light load
//! and the rest age out through server_idle_timeout.

use crate::addr::NodeAddr;
use crate::connect::{Connect, Dial, TcpConnect};
use crate::error::PoolError;
use crate::login::ServerCredentials;
use crate::server::ServerConn;
use crate::stats::PoolStats;
use pgferry_config::PoolSettings;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolKey {
    pub database: String,
    pub user: String,
    pub node: Arc<NodeAddr>,
    /// Pools for the read-only port are separate from the read-write
    /// port's, even on the same node: when a node stops being the leader,
    /// its read-write connections are cut while read-only ones may stay.
    pub read_only: bool,
}

/// A [`PoolKey`] made of borrowed parts: every login looks its pool up,
/// and building an owned key for that would cost two allocations.
/// A map keyed by `PoolKey` takes it as `&dyn AsPoolKeyRef`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolKeyRef<'a> {
    pub database: &'a str,
    pub user: &'a str,
    pub node: &'a NodeAddr,
    pub read_only: bool,
}

/// What an owned and a borrowed key have in common; hashing and equality
/// of both go through it, as `Borrow` requires.
pub trait AsPoolKeyRef {
    fn key_ref(&self) -> PoolKeyRef<'_>;
}

impl AsPoolKeyRef for PoolKey {
    fn key_ref(&self) -> PoolKeyRef<'_> {
        PoolKeyRef {
            database: &self.database,
            user: &self.user,
            node: &self.node,
            read_only: self.read_only,
        }
    }
}

impl AsPoolKeyRef for PoolKeyRef<'_> {
    fn key_ref(&self) -> PoolKeyRef<'_> {
        *self
    }
}

impl<'a> std::borrow::Borrow<dyn AsPoolKeyRef + 'a> for PoolKey {
    fn borrow(&self) -> &(dyn AsPoolKeyRef + 'a) {
        self
    }
}

impl std::hash::Hash for PoolKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.key_ref().hash(h)
    }
}

impl std::hash::Hash for dyn AsPoolKeyRef + '_ {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.key_ref().hash(h)
    }
}

impl PartialEq for dyn AsPoolKeyRef + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.key_ref() == other.key_ref()
    }
}

impl Eq for dyn AsPoolKeyRef + '_ {}

/// Name/value pairs, shared.
pub type ParamList = Arc<Vec<(String, String)>>;

static NEXT_SERVER_ID: AtomicU64 = AtomicU64::new(1);

pub struct Pool {
    pub key: PoolKey,
    pub settings: PoolSettings,
    creds: ServerCredentials,
    /// Boxed so that a checkout moves a pointer into the client's session,
    /// not the whole connection state.
    #[allow(clippy::vec_box)]
    idle: Mutex<Vec<Box<ServerConn>>>,
    permits: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
    /// Shared by every pool of one database when max_db_connections is set,
    /// and of one user when max_user_connections is set.
    shared_limits: Vec<Arc<Semaphore>>,
    pub stats: PoolStats,
    pub latency: crate::Latency,
    closed: AtomicBool,
    max_message: usize,
    /// ParameterStatus values of the first connection, replayed to clients
    /// at login so that login needs no server round trip.
    startup_params: Mutex<Option<ParamList>>,
    /// Opens new connections: [`TcpConnect`] except in tests.
    connector: Arc<dyn Connect>,
    /// Every open connection's socket, idle or in use (see `retire`).
    live: Mutex<Vec<Weak<socket2::Socket>>>,
}

/// Failed connection attempts are logged once per node per second, with
/// the count since the last line: while a server is down every held client
/// retries (and pools of unlisted databases come and go), and one line each
/// would flood the log.
#[derive(Default)]
struct FailureLog {
    last: Option<Instant>,
    unlogged: u64,
}

const CONNECT_FAILURE_LOG_EVERY: Duration = Duration::from_secs(1);

static CONNECT_FAILURES: std::sync::LazyLock<Mutex<HashMap<NodeAddr, FailureLog>>> =
    std::sync::LazyLock::new(Mutex::default);

/// Whether this failure gets a log line now, and how many it stands for.
fn connect_failure_to_log(node: &NodeAddr) -> Option<u64> {
    let mut all = CONNECT_FAILURES.lock().unwrap();
    let log = all.entry(node.clone()).or_default();
    let now = Instant::now();
    if log
        .last
        .is_some_and(|t| now.duration_since(t) < CONNECT_FAILURE_LOG_EVERY)
    {
        log.unlogged += 1;
        return None;
    }
    log.last = Some(now);
    Some(std::mem::take(&mut log.unlogged) + 1)
}

enum Permit {
    Main(#[allow(dead_code)] OwnedSemaphorePermit),
    Reserve(#[allow(dead_code)] OwnedSemaphorePermit),
}

impl Pool {
    /// A pool whose connections go over TCP, with TLS as `tls` asks.
    pub fn new(
        key: PoolKey,
        settings: PoolSettings,
        creds: ServerCredentials,
        shared_limits: Vec<Arc<Semaphore>>,
        max_message: usize,
        tls: Arc<pgferry_tls::Connector>,
    ) -> Arc<Pool> {
        let connector = Arc::new(TcpConnect(tls));
        Pool::with_connector(key, settings, creds, shared_limits, max_message, connector)
    }

    /// A pool whose connections `connector` opens (tests: a fake server).
    pub fn with_connector(
        key: PoolKey,
        settings: PoolSettings,
        creds: ServerCredentials,
        shared_limits: Vec<Arc<Semaphore>>,
        max_message: usize,
        connector: Arc<dyn Connect>,
    ) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            permits: Arc::new(Semaphore::new(settings.pool_size)),
            reserve: Arc::new(Semaphore::new(settings.reserve_pool_size)),
            key,
            settings,
            creds,
            idle: Mutex::new(Vec::new()),
            shared_limits,
            stats: PoolStats::default(),
            latency: crate::Latency::default(),
            closed: AtomicBool::new(false),
            max_message,
            startup_params: Mutex::new(None),
            connector,
            live: Mutex::new(Vec::new()),
        });
        tokio::spawn(maintain(Arc::downgrade(&pool)));
        pool
    }

    /// Takes an idle connection if one is free right now, without waiting
    /// or connecting: the fast path, which allocates nothing.
    pub fn try_checkout(self: &Arc<Self>) -> Option<PooledConn> {
        if self.closed.load(Relaxed) || !self.shared_limits.is_empty() {
            return None;
        }
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        let conn = self.pop_idle()?;
        self.stats.sv_active.fetch_add(1, Relaxed);
        Some(PooledConn {
            conn: Some(conn),
            pool: self.clone(),
            _permit: Permit::Main(permit),
            _limits: Vec::new(),
        })
    }

    /// Takes a connection, waiting (fairly, up to query_wait_timeout) for
    /// one to be free and connecting a new one when none is idle.
    /// Cancel safe: dropping the future gives back whatever it held.
    pub async fn checkout(self: &Arc<Self>) -> Result<PooledConn, PoolError> {
        if self.closed.load(Relaxed) {
            return Err(PoolError::ShuttingDown);
        }
        let start = Instant::now();
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => Permit::Main(p),
            Err(_) => {
                self.stats.cl_waiting.fetch_add(1, Relaxed);
                let r = self.wait_permit().await;
                self.stats.cl_waiting.fetch_sub(1, Relaxed);
                r?
            }
        };
        let mut limits = Vec::new();
        for s in &self.shared_limits {
            let p = match self.remaining_wait(start) {
                None => s.clone().acquire_owned().await,
                Some(d) => tokio::time::timeout(d, s.clone().acquire_owned())
                    .await
                    .map_err(|_| self.timed_out())?,
            };
            limits.push(p.map_err(|_| PoolError::ShuttingDown)?);
        }
        let conn = match self.pop_idle() {
            Some(c) => c,
            None => self.connect().await?,
        };
        self.stats.sv_active.fetch_add(1, Relaxed);
        Ok(PooledConn {
            conn: Some(conn),
            pool: self.clone(),
            _permit: permit,
            _limits: limits,
        })
    }

    fn remaining_wait(&self, start: Instant) -> Option<Duration> {
        let t = self.settings.query_wait_timeout;
        (!t.is_zero()).then(|| t.saturating_sub(start.elapsed()))
    }

    fn timed_out(&self) -> PoolError {
        self.stats.wait_timeouts.fetch_add(1, Relaxed);
        PoolError::WaitTimeout
    }

    async fn wait_permit(&self) -> Result<Permit, PoolError> {
        let wait = async {
            let main = self.permits.clone();
            if self.settings.reserve_pool_size == 0 {
                return main.acquire_owned().await.map(Permit::Main);
            }
            tokio::select! {
                p = main.clone().acquire_owned() => return p.map(Permit::Main),
                _ = tokio::time::sleep(self.settings.reserve_pool_timeout) => {}
            }
            tokio::select! {
                p = main.acquire_owned() => p.map(Permit::Main),
                p = self.reserve.clone().acquire_owned() => p.map(Permit::Reserve),
            }
        };
        let r = match self.settings.query_wait_timeout {
            t if t.is_zero() => wait.await,
            t => tokio::time::timeout(t, wait).await.map_err(|_| self.timed_out())?,
        };
        r.map_err(|_| PoolError::ShuttingDown)
    }

    fn pop_idle(&self) -> Option<Box<ServerConn>> {
        let here = crate::affinity::current();
        loop {
            let mut c = {
                let mut idle = self.idle.lock().unwrap();
                // The most recently used connection of this event loop (the
                // stack is at most pool_size long). Without one, a new
                // connection on this loop while the pool has room, so that
                // each loop comes to own its connections; at pool_size, the
                // most recent of another loop's.
                let i = match idle.iter().rposition(|c| c.home == here) {
                    Some(i) => i,
                    None if idle.is_empty() => return None,
                    None => {
                        let opened =
                            idle.len() + self.stats.sv_active.load(Relaxed) + self.stats.sv_login.load(Relaxed);
                        if opened < self.settings.pool_size {
                            return None;
                        }
                        idle.len() - 1
                    }
                };
                idle.remove(i)
            };
            // An idle connection may have been closed by the server (a
            // shutdown sends FATAL to idle sessions): never hand one out.
            // Cheap for back-to-back reuse (see `is_stale`).
            if c.is_stale(Instant::now()) {
                self.close(c, "closed by server while idle");
                continue;
            }
            return Some(c);
        }
    }

    async fn connect(&self) -> Result<Box<ServerConn>, PoolError> {
        struct Login<'a>(&'a PoolStats);
        impl Drop for Login<'_> {
            fn drop(&mut self) {
                self.0.sv_login.fetch_sub(1, Relaxed);
            }
        }
        self.stats.sv_login.fetch_add(1, Relaxed);
        let _login = Login(&self.stats);
        let id = NEXT_SERVER_ID.fetch_add(1, Relaxed);
        let s = &self.settings;
        // A read-only user's connections are read-only from the start, on
        // either port and whichever node serves it (the read-only port may
        // fall back to the primary): PostgreSQL itself refuses the writes.
        let startup = [
            ("database", s.server_dbname.as_str()),
            ("default_transaction_read_only", "on"),
        ];
        let startup = if s.read_only { &startup[..] } else { &startup[..1] };
        let r = self
            .connector
            .connect(Dial {
                id,
                addr: &self.key.node,
                creds: &self.creds,
                startup,
                timeout: s.server_connect_timeout,
                max_message: self.max_message,
            })
            .await;
        // A read-write pool never uses a server in recovery: a leader that
        // Patroni demoted (etcd unreachable past retry_timeout) restarts as
        // a replica, and writes sent there would fail with 25006. PostgreSQL
        // reports in_hot_standby at login, so this costs nothing.
        let r = match r {
            Ok(mut c) if !self.key.read_only && c.param("in_hot_standby") == Some("on") => {
                c.terminate();
                Err(PoolError::InRecovery(self.key.node.to_string()))
            }
            r => r,
        };
        match &r {
            Ok(c) => {
                self.stats.servers_opened.fetch_add(1, Relaxed);
                tracing::info!(server = c.id, node = %self.key.node, db = %self.key.database, user = %self.key.user, backend_pid = c.backend_pid, "server connection opened");
                {
                    let mut live = self.live.lock().unwrap();
                    live.retain(|w| w.strong_count() > 0);
                    if let Some(s) = &c.sever {
                        live.push(Arc::downgrade(s));
                    }
                }
                let mut sp = self.startup_params.lock().unwrap();
                if sp.is_none() {
                    *sp = Some(Arc::new(c.params.clone()));
                }
            }
            Err(e) => {
                self.stats.server_errors.fetch_add(1, Relaxed);
                if let Some(failures) = connect_failure_to_log(&self.key.node) {
                    tracing::warn!(node = %self.key.node, db = %self.key.database, user = %self.key.user, error = %e, failures, "server connection failed");
                }
            }
        }
        r.map(Box::new)
    }

    /// ParameterStatus values a new client should see, connecting a server
    /// first if the pool has never had one.
    pub async fn startup_params(self: &Arc<Self>) -> Result<ParamList, PoolError> {
        if let Some(p) = self.startup_params.lock().unwrap().clone() {
            return Ok(p);
        }
        let c = self.checkout().await?;
        c.checkin();
        Ok(self.startup_params.lock().unwrap().clone().unwrap_or_default())
    }

    fn close(&self, mut c: Box<ServerConn>, why: &str) {
        c.terminate();
        self.stats.servers_closed.fetch_add(1, Relaxed);
        tracing::info!(server = c.id, node = %self.key.node, db = %self.key.database, user = %self.key.user, reason = why, "server connection closed");
    }

    /// Closes every idle connection (RECONNECT, failover). Connections in
    /// use are closed when they come back.
    pub fn close_idle(&self, why: &str) {
        let idle = std::mem::take(&mut *self.idle.lock().unwrap());
        for c in idle {
            self.close(c, why);
        }
    }

    /// Stops handing out connections and closes the idle ones.
    pub fn shut_down(&self, why: &str) {
        self.closed.store(true, Relaxed);
        self.permits.close();
        self.reserve.close();
        self.close_idle(why);
    }

    /// Shuts the pool down and cuts every connection it has, including the
    /// ones sessions hold in the middle of a transaction: their next read
    /// fails, so the client gets an error and nothing more reaches this
    /// server. Used when a node stops being the leader (or an eligible
    /// replica).
    pub fn retire(&self, why: &str) -> usize {
        self.shut_down(why);
        let live = std::mem::take(&mut *self.live.lock().unwrap());
        let mut cut = 0;
        for s in live.iter().filter_map(Weak::upgrade) {
            if s.shutdown(std::net::Shutdown::Both).is_ok() {
                cut += 1;
            }
        }
        cut
    }

    pub fn credentials(&self) -> &ServerCredentials {
        &self.creds
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Relaxed)
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap().len()
    }

    /// Snapshot of idle connections for the admin console: (id, backend pid,
    /// age, idle time, uses).
    pub fn idle_snapshot(&self) -> Vec<(u64, u32, Duration, Duration, u64)> {
        self.idle
            .lock()
            .unwrap()
            .iter()
            .map(|c| (c.id, c.backend_pid, c.created.elapsed(), c.idle_since.elapsed(), c.uses))
            .collect()
    }

    fn checkin(&self, mut c: Box<ServerConn>, now: Instant) {
        let s = &self.settings;
        if self.closed.load(Relaxed) {
            return self.close(c, "pool closed");
        }
        if !s.server_lifetime.is_zero() && now.saturating_duration_since(c.created) > s.server_lifetime {
            return self.close(c, "server_lifetime reached");
        }
        c.idle_since = now;
        c.uses += 1;
        self.idle.lock().unwrap().push(c);
    }

    /// One pass of housekeeping: expire idle connections, keep min_pool_size.
    async fn housekeep(self: &Arc<Self>) {
        let s = &self.settings;
        if let Some(elapsed) = self.latency.rotate(s.stats_period) {
            self.stats.end_period(elapsed);
        }
        let mut expired = Vec::new();
        {
            let mut idle = self.idle.lock().unwrap();
            let total = idle.len() + self.stats.sv_active.load(Relaxed);
            let mut excess = total.saturating_sub(s.min_pool_size);
            // Oldest idle first (bottom of the LIFO stack).
            let mut i = 0;
            while i < idle.len() {
                let c = &idle[i];
                let too_old = !s.server_lifetime.is_zero() && c.created.elapsed() > s.server_lifetime;
                let too_idle =
                    !s.server_idle_timeout.is_zero() && c.idle_since.elapsed() > s.server_idle_timeout && excess > 0;
                if too_old || too_idle {
                    excess = excess.saturating_sub(1);
                    expired.push((
                        idle.remove(i),
                        if too_old {
                            "server_lifetime reached"
                        } else {
                            "server_idle_timeout reached"
                        },
                    ));
                } else {
                    i += 1;
                }
            }
        }
        for (c, why) in expired {
            self.close(c, why);
        }
        // Top up to min_pool_size. Each new connection holds a permit while
        // it is made, like a checkout, so that top-ups racing with clients
        // never take the pool past pool_size.
        while !self.is_closed() && self.total() < s.min_pool_size {
            let Ok(_permit) = self.permits.clone().try_acquire_owned() else {
                break;
            };
            if self.total() >= s.min_pool_size {
                break;
            }
            match self.connect().await {
                Ok(c) => self.checkin(c, Instant::now()),
                Err(_) => break,
            }
        }
    }

    /// Server connections open or opening.
    fn total(&self) -> usize {
        self.idle_count() + self.stats.sv_active.load(Relaxed) + self.stats.sv_login.load(Relaxed)
    }
}

async fn maintain(pool: Weak<Pool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(p) = pool.upgrade() else { return };
        if p.is_closed() && p.stats.sv_active.load(Relaxed) == 0 {
            return;
        }
        p.housekeep().await;
    }
}

/// A checked-out server connection. Give it back with [`PooledConn::checkin`]
/// only when it is in sync (ReadyForQuery received, nothing in flight);
/// otherwise drop it or call [`PooledConn::discard`], which closes it.
pub struct PooledConn {
    conn: Option<Box<ServerConn>>,
    pool: Arc<Pool>,
    // Released after the connection is back on the idle stack (field order).
    _permit: Permit,
    _limits: Vec<OwnedSemaphorePermit>,
}

impl PooledConn {
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    pub fn checkin(self) {
        self.checkin_at(Instant::now());
    }

    /// `checkin` with the caller's clock reading.
    pub fn checkin_at(mut self, now: Instant) {
        if let Some(c) = self.conn.take() {
            self.pool.stats.sv_active.fetch_sub(1, Relaxed);
            self.pool.checkin(c, now);
        }
    }

    pub fn discard(mut self, why: &str) {
        if let Some(c) = self.conn.take() {
            self.pool.stats.sv_active.fetch_sub(1, Relaxed);
            self.pool.close(c, why);
        }
    }
}

impl std::ops::Deref for PooledConn {
    type Target = ServerConn;
    fn deref(&self) -> &ServerConn {
        self.conn.as_ref().expect("connection present until checkin")
    }
}

impl std::ops::DerefMut for PooledConn {
    fn deref_mut(&mut self) -> &mut ServerConn {
        self.conn.as_mut().expect("connection present until checkin")
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            self.pool.stats.sv_active.fetch_sub(1, Relaxed);
            self.pool.close(c, "dropped while not in sync");
        }
    }
}

#[cfg(test)]
mod tests;
