//! A pool of server connections for one (database, user, node).
//!
//! Waiting is fair and cheap. Permits (a semaphore of the pool's size)
//! count the connections open or opening; a client that finds none free
//! joins the pool's own FIFO queue of waiters. A connection coming back
//! goes straight to the first waiter, with its permit (nothing goes back
//! on the idle stack, no second pass through the semaphore), as PgBouncer
//! hands a released server to the first waiting client; a permit given
//! back without a connection goes to the first waiter the same way.
//! query_wait_timeout and reserve_pool_timeout are kept by one sweeper
//! task per pool, armed for the oldest waiter, rather than by a timer per
//! wait. The idle stack is LIFO so that a few hot connections serve a light
//! load and the rest age out through server_idle_timeout.

use crate::addr::NodeAddr;
use crate::connect::{Connect, Dial, TcpConnect};
use crate::error::PoolError;
use crate::login::ServerCredentials;
use crate::server::ServerConn;
use crate::stats::PoolStats;
use pgferry_config::PoolSettings;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

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
    /// Clients waiting for a connection (see the module's comment).
    waiters: Mutex<Waiters>,
    /// Wakes the sweeper when the queue was empty and is not any more.
    sweeper: Arc<Notify>,
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

/// Room for one server connection: of the pool's size, or of its reserve.
/// Give it back through [`Pool::release`] (which may hand it to a waiter),
/// never by dropping it where a client may be waiting.
enum Permit {
    Main(#[allow(dead_code)] OwnedSemaphorePermit),
    Reserve(#[allow(dead_code)] OwnedSemaphorePermit),
}

/// What a waiting client is given.
enum Given {
    /// A connection just checked in, with everything that came with it.
    Conn(Box<ServerConn>, Permit, Vec<OwnedSemaphorePermit>),
    /// Room for a connection: take an idle one or open one.
    Permit(Permit),
    TimedOut,
    Closed,
}

/// The waiters' queue: slots in a small free-listed vector (a client's
/// wait allocates nothing once the pool has seen as many waiters), their
/// indices in arrival order.
#[derive(Default)]
struct Waiters {
    queue: VecDeque<usize>,
    slots: Vec<Slot>,
    free: Vec<usize>,
}

struct Slot {
    since: Instant,
    waker: Option<Waker>,
    given: Option<Given>,
}

impl Waiters {
    fn enqueue(&mut self, since: Instant, waker: Waker) -> usize {
        let slot = Slot {
            since,
            waker: Some(waker),
            given: None,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        };
        self.queue.push_back(i);
        i
    }

    /// Gives the first waiter `g`; returns it back if there is none.
    fn give_first(&mut self, g: Given) -> Result<(), Given> {
        match self.queue.pop_front() {
            Some(i) => {
                self.give(i, g);
                Ok(())
            }
            None => Err(g),
        }
    }

    fn give(&mut self, i: usize, g: Given) {
        let slot = &mut self.slots[i];
        slot.given = Some(g);
        if let Some(w) = slot.waker.take() {
            w.wake();
        }
    }

    fn first_since(&self) -> Option<Instant> {
        self.queue.front().map(|&i| self.slots[i].since)
    }

    /// Frees slot `i`; returns what it was given and not taken.
    fn remove(&mut self, i: usize) -> Option<Given> {
        if self.slots[i].given.is_none() {
            // Still queued (a cancelled wait): rare, so a linear search.
            self.queue.retain(|&j| j != i);
        }
        let slot = &mut self.slots[i];
        slot.waker = None;
        let given = slot.given.take();
        self.free.push(i);
        // Nobody waits after a burst of thousands: give the slots back.
        if self.free.len() == self.slots.len() && self.slots.capacity() > 1024 {
            self.slots = Vec::new();
            self.free = Vec::new();
            self.queue = VecDeque::new();
        }
        given
    }
}

/// A client's place in the queue, as a future. Dropping it (the client
/// left, or the wait was cancelled) passes on whatever it had been given.
struct Wait<'a> {
    pool: &'a Pool,
    slot: Option<usize>,
}

impl Wait<'_> {
    fn poll_given(&mut self, cx: &mut Context<'_>, since: Instant) -> Poll<Given> {
        let pool = self.pool;
        let mut w = pool.waiters.lock().unwrap();
        let Some(i) = self.slot else {
            // Under the queue's lock, so that no permit given back between
            // the caller's failed try and this point can miss the queue.
            if pool.is_closed() {
                return Poll::Ready(Given::Closed);
            }
            if let Some(p) = pool.try_permit() {
                return Poll::Ready(Given::Permit(p));
            }
            let first = w.queue.is_empty();
            self.slot = Some(w.enqueue(since, cx.waker().clone()));
            // Counted while queued, however the wait ends (a client that
            // leaves while waiting is not counted forever).
            pool.stats.cl_waiting.fetch_add(1, Relaxed);
            if first {
                pool.sweeper.notify_one();
            }
            return Poll::Pending;
        };
        if w.slots[i].given.is_some() {
            self.slot = None;
            pool.stats.cl_waiting.fetch_sub(1, Relaxed);
            return Poll::Ready(w.remove(i).expect("given"));
        }
        let slot = &mut w.slots[i];
        if !slot.waker.as_ref().is_some_and(|old| old.will_wake(cx.waker())) {
            slot.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        let Some(i) = self.slot.take() else { return };
        self.pool.stats.cl_waiting.fetch_sub(1, Relaxed);
        let given = self.pool.waiters.lock().unwrap().remove(i);
        match given {
            Some(Given::Conn(c, permit, limits)) => self.pool.pass_on(c, permit, limits),
            Some(Given::Permit(p)) => self.pool.release(p),
            _ => {}
        }
    }
}

/// What waiting in the queue ([`Pool::queue`]) gave.
pub enum Queued {
    /// A connection another client just gave back, ready to use.
    Conn(PooledConn),
    /// Room for a connection but none to hand over: [`Room::open`] takes
    /// an idle one or connects.
    Room(Room),
}

/// Room for one server connection (a permit), given back to the pool's
/// waiters if it is dropped unused.
pub struct Room {
    pool: Arc<Pool>,
    permit: Option<Permit>,
    /// When the checkout began: shared limits wait at most what is left
    /// of query_wait_timeout.
    start: Instant,
}

impl Drop for Room {
    fn drop(&mut self) {
        if let Some(p) = self.permit.take() {
            self.pool.release(p);
        }
    }
}

impl Room {
    /// A connection in this room: an idle one, else a new one, once the
    /// shared limits (max_db_connections, max_user_connections) allow it.
    pub async fn open(mut self) -> Result<PooledConn, PoolError> {
        let pool = &self.pool;
        if pool.is_closed() {
            return Err(PoolError::ShuttingDown);
        }
        let mut limits = Vec::new();
        for s in &pool.shared_limits {
            let p = match pool.remaining_wait(self.start) {
                None => s.clone().acquire_owned().await,
                Some(d) => tokio::time::timeout(d, s.clone().acquire_owned())
                    .await
                    .map_err(|_| pool.timed_out())?,
            };
            limits.push(p.map_err(|_| PoolError::ShuttingDown)?);
        }
        let conn = match pool.pop_idle() {
            Some(c) => c,
            None => pool.connect().await?,
        };
        pool.stats.sv_active.fetch_add(1, Relaxed);
        Ok(PooledConn {
            conn: Some(conn),
            pool: pool.clone(),
            permit: self.permit.take(),
            limits,
        })
    }
}

/// Waiting in the queue, without connecting: a plain future of a few
/// words, so that a client session can await it in place (no boxed
/// future, no allocation) in the common wait of a busy pool.
pub struct Queue<'a> {
    pool: &'a Arc<Pool>,
    wait: Wait<'a>,
    start: Option<Instant>,
}

impl Future for Queue<'_> {
    type Output = Result<Queued, PoolError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let pool = this.pool;
        let start = *this.start.get_or_insert_with(Instant::now);
        let permit = match this.wait.poll_given(cx, start) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Given::Conn(c, permit, limits)) => match pool.adopt(c, permit, limits) {
                Ok(conn) => return Poll::Ready(Ok(Queued::Conn(conn))),
                Err(permit) => permit,
            },
            Poll::Ready(Given::Permit(p)) => p,
            Poll::Ready(Given::TimedOut) => return Poll::Ready(Err(pool.timed_out())),
            Poll::Ready(Given::Closed) => return Poll::Ready(Err(PoolError::ShuttingDown)),
        };
        Poll::Ready(Ok(Queued::Room(Room {
            pool: pool.clone(),
            permit: Some(permit),
            start,
        })))
    }
}

/// A permit held while a connection is taken or made outside the queue
/// (`try_checkout`, the top-up to min_pool_size): given back through
/// [`Pool::release`] if that finds none or fails.
struct Held<'a> {
    pool: &'a Pool,
    permit: Option<Permit>,
}

impl Held<'_> {
    fn take(mut self) -> Permit {
        self.permit.take().expect("held")
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.permit.take() {
            self.pool.release(p);
        }
    }
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
            waiters: Mutex::default(),
            sweeper: Arc::new(Notify::new()),
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
        tokio::spawn(sweep(Arc::downgrade(&pool), pool.sweeper.clone()));
        pool
    }

    /// Takes an idle connection if one is free right now, without waiting
    /// or connecting: the fast path, which allocates nothing.
    pub fn try_checkout(self: &Arc<Self>) -> Option<PooledConn> {
        if self.closed.load(Relaxed) || !self.shared_limits.is_empty() {
            return None;
        }
        let permit = Held {
            pool: self,
            permit: Some(self.try_permit()?),
        };
        let conn = self.pop_idle()?;
        self.stats.sv_active.fetch_add(1, Relaxed);
        Some(PooledConn {
            conn: Some(conn),
            pool: self.clone(),
            permit: Some(permit.take()),
            limits: Vec::new(),
        })
    }

    fn try_permit(&self) -> Option<Permit> {
        self.permits.clone().try_acquire_owned().ok().map(Permit::Main)
    }

    /// Takes a connection, waiting (fairly, up to query_wait_timeout) for
    /// one to be free and connecting a new one when none is idle.
    /// Cancel safe: dropping the future gives back whatever it held.
    pub async fn checkout(self: &Arc<Self>) -> Result<PooledConn, PoolError> {
        match self.queue().await? {
            Queued::Conn(c) => Ok(c),
            Queued::Room(room) => room.open().await,
        }
    }

    /// Waits for a connection handed over by a client done with it, or for
    /// room to open one; never connects. Takes room at once if there is
    /// some. Cancel safe like `checkout`.
    pub fn queue(self: &Arc<Self>) -> Queue<'_> {
        Queue {
            pool: self,
            wait: Wait { pool: self, slot: None },
            start: None,
        }
    }

    /// A connection handed over at checkin, unless the server closed it
    /// meanwhile (it waited for this task to run: the same check as an
    /// idle one); then only its permit, for a new connection.
    fn adopt(
        self: &Arc<Self>,
        mut c: Box<ServerConn>,
        permit: Permit,
        limits: Vec<OwnedSemaphorePermit>,
    ) -> Result<PooledConn, Permit> {
        if c.is_stale(Instant::now()) {
            self.close(c, "closed by server while idle");
            return Err(permit);
        }
        self.stats.sv_active.fetch_add(1, Relaxed);
        Ok(PooledConn {
            conn: Some(c),
            pool: self.clone(),
            permit: Some(permit),
            limits,
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

    /// Gives a permit back: to the first waiter, or to its semaphore. A
    /// reserve permit goes only to a waiter that has waited
    /// reserve_pool_timeout (the others wait for the pool's own).
    fn release(&self, p: Permit) {
        let mut w = self.waiters.lock().unwrap();
        if self.is_closed() {
            return;
        }
        let p = match p {
            Permit::Reserve(r) => {
                let due = w
                    .first_since()
                    .is_some_and(|t| t.elapsed() >= self.settings.reserve_pool_timeout);
                if !due {
                    return;
                }
                Permit::Reserve(r)
            }
            main => main,
        };
        // With nobody waiting the permit goes back to its semaphore, still
        // under the lock: a client about to queue then finds it.
        let _ = w.give_first(Given::Permit(p));
    }

    /// A connection in sync whose user is done with it: to the first
    /// waiter with its permits, else onto the idle stack.
    fn pass_on(&self, c: Box<ServerConn>, permit: Permit, limits: Vec<OwnedSemaphorePermit>) {
        if let Permit::Reserve(_) = permit {
            self.idle.lock().unwrap().push(c);
            drop(limits);
            return self.release(permit);
        }
        let mut w = self.waiters.lock().unwrap();
        if self.is_closed() {
            drop(w);
            return self.close(c, "pool closed");
        }
        match w.queue.pop_front() {
            Some(i) => w.give(i, Given::Conn(c, permit, limits)),
            // Pushed, and the permit freed, while the queue is locked: a
            // client that queues next finds both.
            None => self.idle.lock().unwrap().push(c),
        }
    }

    /// Times out the waiters that have waited query_wait_timeout and gives
    /// reserve permits to those that have waited reserve_pool_timeout;
    /// returns when to look again (None: when a client next queues).
    fn sweep_waiters(&self, now: Instant) -> Option<Instant> {
        let s = &self.settings;
        let mut w = self.waiters.lock().unwrap();
        if !s.query_wait_timeout.is_zero() {
            while w
                .first_since()
                .is_some_and(|t| now.saturating_duration_since(t) >= s.query_wait_timeout)
            {
                let _ = w.give_first(Given::TimedOut);
            }
        }
        let mut reserve_blocked = false;
        if s.reserve_pool_size > 0 {
            while w
                .first_since()
                .is_some_and(|t| now.saturating_duration_since(t) >= s.reserve_pool_timeout)
            {
                match self.reserve.clone().try_acquire_owned() {
                    Ok(p) => {
                        let _ = w.give_first(Given::Permit(Permit::Reserve(p)));
                    }
                    // None free: `release` gives the next one back to them.
                    Err(_) => {
                        reserve_blocked = true;
                        break;
                    }
                }
            }
        }
        let first = w.first_since()?;
        let mut next = None::<Instant>;
        let mut at = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if !s.query_wait_timeout.is_zero() {
            at(first + s.query_wait_timeout);
        }
        if s.reserve_pool_size > 0 {
            // None free for an overdue waiter: `release` hands it the next
            // one; look again soon for the ones that come due meanwhile.
            let due = first + s.reserve_pool_timeout;
            at(if reserve_blocked {
                due.max(now + RESERVE_RECHECK)
            } else {
                due
            });
        }
        // Waiters but no deadline: look again when a client next queues.
        next
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
        {
            let mut w = self.waiters.lock().unwrap();
            self.closed.store(true, Relaxed);
            while w.give_first(Given::Closed).is_ok() {}
        }
        self.sweeper.notify_one();
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

    fn checkin(&self, mut c: Box<ServerConn>, permit: Permit, limits: Vec<OwnedSemaphorePermit>, now: Instant) {
        let s = &self.settings;
        if self.closed.load(Relaxed) {
            return self.close(c, "pool closed");
        }
        if !s.server_lifetime.is_zero() && now.saturating_duration_since(c.created) > s.server_lifetime {
            self.close(c, "server_lifetime reached");
            drop(limits);
            return self.release(permit);
        }
        c.idle_since = now;
        c.uses += 1;
        self.pass_on(c, permit, limits);
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
            let Some(permit) = self.try_permit() else {
                break;
            };
            let permit = Held {
                pool: self,
                permit: Some(permit),
            };
            if self.total() >= s.min_pool_size {
                break;
            }
            match self.connect().await {
                Ok(mut c) => {
                    c.idle_since = Instant::now();
                    self.pass_on(c, permit.take(), Vec::new());
                }
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

/// How often the sweeper looks again while every reserve permit is taken.
const RESERVE_RECHECK: Duration = Duration::from_millis(50);

/// Keeps the waiters' deadlines (see [`Pool::sweep_waiters`]): one task
/// and at most one timer per pool, however many clients wait.
async fn sweep(pool: Weak<Pool>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(p) = pool.upgrade() else { return };
            if p.is_closed() {
                return;
            }
            p.sweep_waiters(Instant::now())
        };
        // Also every few seconds with nobody waiting, to notice that the
        // pool is gone.
        let until = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(5));
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep_until(until.into()) => {}
        }
    }
}

/// A checked-out server connection. Give it back with [`PooledConn::checkin`]
/// only when it is in sync (ReadyForQuery received, nothing in flight);
/// otherwise drop it or call [`PooledConn::discard`], which closes it.
pub struct PooledConn {
    conn: Option<Box<ServerConn>>,
    pool: Arc<Pool>,
    /// Always Some until the connection is given back or closed.
    permit: Option<Permit>,
    limits: Vec<OwnedSemaphorePermit>,
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
        if let (Some(c), Some(p)) = (self.conn.take(), self.permit.take()) {
            self.pool.stats.sv_active.fetch_sub(1, Relaxed);
            self.pool.checkin(c, p, std::mem::take(&mut self.limits), now);
        }
    }

    pub fn discard(mut self, why: &str) {
        self.close(why);
    }

    fn close(&mut self, why: &str) {
        if let Some(c) = self.conn.take() {
            self.pool.stats.sv_active.fetch_sub(1, Relaxed);
            self.pool.close(c, why);
        }
        self.limits.clear();
        if let Some(p) = self.permit.take() {
            self.pool.release(p);
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
        self.close("dropped while not in sync");
    }
}

#[cfg(test)]
mod tests;
