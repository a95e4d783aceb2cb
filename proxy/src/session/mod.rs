//! A logged-in client: the session state machine.
//!
//! One loop (`main_loop`) waits on four things at once: bytes from the
//! client, bytes from the bound server, and room to write to either. Client
//! messages are inspected and forwarded (sometimes rewritten); what was sent
//! and what comes back goes through the reply matcher
//! ([`pgferry_protocol::replies::Replies`]), which places server replies and
//! pgferry's own answers in order and knows, by PostgreSQL's rules, when the
//! server is at a ReadyForQuery boundary.
//!
//! In transaction mode the server connection goes back to the pool only when
//! the matcher says so (every request answered, the last one a sync point,
//! the server idle and not skipping to a Sync) and no session state pins the
//! client; in session mode it stays until the client leaves.

mod binding;
use binding::Bind;
mod boundary;
mod citus;
mod requests;
mod server;

use crate::clients::{CancelTarget, Signal};
use crate::params::{self, ClientParams};
use crate::shared::{Lifecycle, PoolRegistry, Settings};
use crate::ClientError;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use pgferry_config::{PoolMode, SessionStatePolicy};
use pgferry_pool::latency::Kind as LatencyKind;
use pgferry_pool::statements::{Statement, StatementRegistry};
use pgferry_pool::stats::Total;
use pgferry_pool::{Pool, PoolError, PooledConn, ServerConn};
use pgferry_protocol::backend::{self, TxStatus};
use pgferry_protocol::encode::{self, Severity};
use pgferry_protocol::frame::decode_frame_take;
use pgferry_protocol::replies::{Fate, Received, Replies, Reply, Request};
use pgferry_protocol::sql::{self, Pin};
use pgferry_protocol::{decode_frame, frontend, sqlstate, Frame, ProtocolError};
use pgferry_routing::{Role, Route, Router};
use pgferry_tls::stream::{ClientReadHalf, ClientWriteHalf};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin as StdPin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Stop reading from one side while this much is waiting to be written to
/// the other: backpressure instead of unbounded buffering.
const HIGH_WATER: usize = 256 * 1024;
/// Buffer capacity a client keeps between transactions (see
/// `release_idle_buffers`).
const KEEP_BETWEEN_TRANSACTIONS: usize = 2048;
/// Reply-queue capacity kept between transactions (a pipeline of a few
/// requests).
const KEEP_QUEUED: usize = 8;
/// A client whose transactions end less than this apart is busy: it keeps
/// its small buffers between them.
const HOT_GAP: Duration = Duration::from_millis(100);
/// Stop reading a client with this many requests waiting for replies.
const MAX_QUEUED_REQUESTS: usize = 32 * 1024;
/// Bound on pgferry's own short queries (sync, capture, reset).
const INTERNAL_QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a read session checks, at a transaction boundary, whether its
/// replica has clearly more read sessions than another (`rebalance_due`):
/// often enough to follow drift within seconds, rarely enough to cost
/// nothing per transaction.
const REBALANCE_EVERY: Duration = Duration::from_secs(1);

/// What a request meant for pgferry's statement bookkeeping, kept or undone
/// by its [`Fate`]: PostgreSQL skips everything after an error up to the
/// next Sync, so a request pgferry already accounted for may never happen.
#[derive(Debug)]
enum Effect {
    /// pgferry sent a Parse of `stmt` to the bound server; `client` names
    /// the client's statement when it was the client's own Parse.
    Prepared {
        stmt: Arc<Statement>,
        client: Option<Box<[u8]>>,
    },
    /// The client's Parse of `name`, answered by pgferry.
    Named { name: Box<[u8]>, stmt: Arc<Statement> },
    /// The client's Close (or DEALLOCATE) of `name`, answered by pgferry.
    Closed { name: Box<[u8]>, stmt: Arc<Statement> },
}

#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    Terminate,
}

/// How `main_loop` ended without an error.
enum End {
    /// The client left (Terminate or end of file).
    Closed,
    /// Idle long enough, and nothing in flight: hand the client to the
    /// parker (`park.rs`).
    Park,
}

/// How a session's task ends. `Parked` is large, and moved once per
/// parking straight into the parker's table: a box would only add an
/// allocation.
#[allow(clippy::large_enum_variant)]
pub enum Exit {
    Closed(Result<(), ClientError>),
    /// The client waits parked; its session is rebuilt by `Session::unpark`.
    Parked(Parked),
}

/// A client's named statements, by the client's names.
type Statements = HashMap<Box<[u8]>, Arc<Statement>>;

/// What of a session outlives parking: the state that spans transactions.
/// Everything else is empty at a parking point (no server, no buffered
/// bytes, no request in flight) and is rebuilt on unparking.
struct Kept {
    pool: Arc<Pool>,
    route: Route,
    route_gen: u64,
    read_only: bool,
    params: ClientParams,
    /// Boxed: most clients have none, and a parked client's size counts.
    statements: Option<Box<Statements>>,
    client: crate::clients::ClientGuard,
    user_permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// A parked client: its socket, out of tokio's reactor, and the session
/// state that spans transactions (a few hundred bytes, against a session's
/// task, future, buffers and registration).
pub struct Parked {
    shared: Arc<Handles>,
    kept: Kept,
    citus: Option<Box<citus::CitusRoute>>,
    /// When the idle timeout that was running fires.
    deadline: Option<tokio::time::Instant>,
    pub stream: std::net::TcpStream,
}

impl Parked {
    pub fn entry(&self) -> &Arc<crate::clients::ClientEntry> {
        &self.kept.client.entry
    }

    /// When the client's idle timeout fires, if one applies.
    pub fn deadline(&self) -> Option<tokio::time::Instant> {
        self.deadline
    }

    /// pgferry's lifecycle: a drain resumes a parked client, to close it.
    pub fn lifecycle(&self) -> &Arc<Lifecycle> {
        &self.shared.lifecycle
    }
}

enum Event {
    ClientRead(std::io::Result<usize>),
    /// Bytes written, or None for a completed flush.
    ClientWrote(std::io::Result<Option<usize>>),
    ServerRead(std::io::Result<usize>),
    ServerWrote(std::io::Result<Option<usize>>),
    /// pgferry started shutting down while this client was idle.
    Drain,
    /// KILL_CLIENT or KILL db from the console.
    Killed,
    Timeout(&'static str, &'static str),
    /// Idle for `park_idle_after`: park if nothing is in flight.
    Park,
}

static PARSE_COMPLETE: &[u8] = b"1\0\0\0\x04";
/// A portal no client has: executing it makes the server fail where pgferry
/// refused a client's request (see `fail_request`).
const REFUSED_PORTAL: &[u8] = b"pgferry: request refused by the proxy";
/// The simple-query counterpart.
const REFUSED_QUERY: &[u8] = b"DO $pgferry$BEGIN RAISE EXCEPTION 'pgferry refused a client request'; END$pgferry$";
static CLOSE_COMPLETE: &[u8] = b"3\0\0\0\x04";

/// Everything a session starts with.
pub struct SessionInit {
    pub rd: ClientReadHalf,
    pub wr: ClientWriteHalf,
    pub rbuf: BytesMut,
    pub pool: Arc<Pool>,
    /// Refuse statements that would leave read-only mode (`access = "read-only"`).
    pub read_only: bool,
    pub route: Route,
    pub params: ClientParams,
    pub client: crate::clients::ClientGuard,
    /// The user's max_client_connections slot, held for the session's life.
    pub user_permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// The shared-state handles sessions use. One per process, shared by
/// every session (one pointer per client, however many handles).
pub struct Handles {
    pub settings: Arc<Settings>,
    pub pools: Arc<PoolRegistry>,
    pub lifecycle: Arc<Lifecycle>,
    pub router: Router,
    pub statements: Arc<StatementRegistry>,
}

pub struct Session {
    shared: Arc<Handles>,
    id: u64,
    rd: ClientReadHalf,
    wr: ClientWriteHalf,
    rbuf: BytesMut,
    to_client: BytesMut,
    to_server: BytesMut,
    /// Over TLS a write can leave bytes in the TLS layer: flush once the
    /// buffer has drained. Always false on plain sockets.
    client_unflushed: bool,
    server_unflushed: bool,
    read_only: bool,
    pool: Arc<Pool>,
    /// The member this session is routed to, and the router generation
    /// that decision was made under.
    route: Route,
    route_gen: u64,
    /// Read sessions: when the read balance is next checked, and whether
    /// that check asked for a move (see `rebalance_due`).
    rebalance_at: Instant,
    rebalance: bool,
    mode: PoolMode,
    /// Rename named statements (transaction mode with a statement cache).
    rewrite: bool,
    policy: SessionStatePolicy,
    max_prepared: usize,
    max_message: usize,
    server: Option<PooledConn>,
    bound_at: Instant,
    /// The time of the event being handled, read once (`now`): a
    /// transaction's timestamps (bound, sent, answered, released) then cost
    /// two clock reads, not seven.
    clock: Option<Instant>,
    /// When the server was last given back, and whether the transaction
    /// before came back within `HOT_GAP` of it (`release_idle_buffers`).
    released_at: Option<Instant>,
    hot: bool,
    /// When the oldest request still waiting for a ReadyForQuery was sent
    /// (query time: request to ReadyForQuery).
    query_start: Option<Instant>,
    /// What the bound server still owes, and where it is in the protocol.
    replies: Replies<Effect>,
    /// The client's named statements.
    statements: Statements,
    /// The registry entry of the Parse being handled, held from
    /// `needs_server`'s decision to `on_parse`: in between, the last other
    /// client using it could drop it, and `on_parse` would find a new,
    /// unverified entry and no server (seen under connect-per-transaction
    /// load).
    interned: Option<Arc<Statement>>,
    params: ClientParams,
    pin: Option<Pin>,
    /// A statement that may have released pinned state ran: probe at the end.
    recheck_pin: bool,
    /// Unreported settings changed in this transaction, read back at its end.
    capture: Vec<String>,
    reset_all: bool,
    /// DEALLOCATE ALL / DISCARD ALL ran: the server lost its statements.
    forget_server_statements: bool,
    /// With no server bound: after an error pgferry reported itself, drop
    /// messages up to Sync. (With one bound, the server skips.)
    skip_until_sync: bool,
    /// The server died while the client was between requests in a transaction.
    lost_transaction: Option<Box<(String, String)>>,
    /// A FATAL the server sent before closing: reported as the reason.
    server_fatal: Option<Box<(String, String)>>,
    client: crate::clients::ClientGuard,
    _user_permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The drain already woke this session once.
    drain_seen: bool,
    /// The idle timeout that applies, if any (see `arm_timer`).
    timer: Option<Timer>,
    /// Shard-aware routing, where it applies. Boxed: most sessions have
    /// none, and the session's hot fields stay in fewer cache lines.
    citus: Option<Box<citus::CitusRoute>>,
    /// A BEGIN pgferry answered itself (Citus routing): the Query frame,
    /// replayed on the server the transaction's first statement binds.
    pending_begin: Option<Bytes>,
    /// The deferred transaction failed before reaching a server: aborted,
    /// as PostgreSQL would have it, until the client ends it.
    deferred_failed: bool,
    /// Unparked: the idle timeout keeps the deadline it had when parking.
    resume_deadline: Option<tokio::time::Instant>,
}

/// A pending idle timeout and what the client is told when it fires.
struct Timer {
    sleep: StdPin<Box<tokio::time::Sleep>>,
    code: &'static str,
    what: &'static str,
}

impl Session {
    pub fn new(shared: Arc<Handles>, init: SessionInit) -> Self {
        let settings = &init.pool.settings;
        let mode = settings.pool_mode;
        let citus = shared
            .router
            .citus()
            .filter(|c| c.enabled && mode == PoolMode::Transaction && settings.server_dbname == c.database)
            .map(|c| Box::new(citus::CitusRoute::new(c.clone())));
        // Counted once per client, parked or not: SHOW POOLS' cl_active.
        init.pool.stats.cl_active.fetch_add(1, Relaxed);
        let kept = Kept {
            route_gen: shared.router.generation(),
            pool: init.pool,
            route: init.route,
            read_only: init.read_only,
            params: init.params,
            statements: None,
            client: init.client,
            user_permit: init.user_permit,
        };
        Session::assemble(shared, kept, citus, init.rd, init.wr, init.rbuf)
    }

    /// A parked client's session again, on the current runtime. On error
    /// the client is gone (its socket closed).
    pub fn unpark(p: Parked) -> std::io::Result<Box<Session>> {
        let (rd, wr) = match pgferry_tls::stream::from_std(p.stream) {
            Ok(halves) => halves,
            Err(e) => {
                p.kept.pool.stats.cl_active.fetch_sub(1, Relaxed);
                return Err(e);
            }
        };
        let mut s = Box::new(Session::assemble(p.shared, p.kept, p.citus, rd, wr, BytesMut::new()));
        s.resume_deadline = p.deadline;
        Ok(s)
    }

    fn assemble(
        shared: Arc<Handles>,
        kept: Kept,
        citus: Option<Box<citus::CitusRoute>>,
        rd: ClientReadHalf,
        wr: ClientWriteHalf,
        rbuf: BytesMut,
    ) -> Self {
        let settings = &kept.pool.settings;
        let mode = settings.pool_mode;
        Session {
            id: kept.client.entry.info.id,
            rd,
            wr,
            rbuf,
            to_client: BytesMut::new(),
            to_server: BytesMut::new(),
            client_unflushed: false,
            server_unflushed: false,
            read_only: kept.read_only,
            mode,
            rewrite: mode == PoolMode::Transaction && settings.max_prepared_statements > 0,
            policy: shared.settings.config().pool.session_state,
            max_prepared: settings.max_prepared_statements,
            max_message: shared.settings.config().limits.max_message_size,
            pool: kept.pool,
            route: kept.route,
            route_gen: kept.route_gen,
            rebalance_at: Instant::now() + REBALANCE_EVERY,
            rebalance: false,
            server: None,
            bound_at: Instant::now(),
            clock: None,
            released_at: None,
            hot: false,
            query_start: None,
            replies: Replies::new(),
            statements: kept.statements.map(|b| *b).unwrap_or_default(),
            interned: None,
            params: kept.params,
            pin: None,
            recheck_pin: false,
            capture: Vec::new(),
            reset_all: false,
            forget_server_statements: false,
            skip_until_sync: false,
            lost_transaction: None,
            server_fatal: None,
            client: kept.client,
            _user_permit: kept.user_permit,
            drain_seen: false,
            timer: None,
            citus,
            pending_begin: None,
            deferred_failed: false,
            resume_deadline: None,
            shared,
        }
    }

    /// The time of the event being handled (see `clock`).
    fn now(&mut self) -> Instant {
        *self.clock.get_or_insert_with(Instant::now)
    }

    /// The client's id, address and port (for the closing log line).
    pub fn who(&self) -> (u64, std::net::SocketAddr, Role) {
        let info = &self.client.entry.info;
        (self.id, info.peer, info.port)
    }

    /// Nothing in flight, nothing buffered, no server and no state that
    /// only this task holds: the session can be taken apart into `Parked`
    /// and rebuilt later without the client seeing a difference.
    fn parkable(&self) -> bool {
        self.wr.is_plain()
            && self.server.is_none()
            && self.rbuf.is_empty()
            && self.to_client.is_empty()
            && self.to_server.is_empty()
            && !self.client_unflushed
            && self.replies.releasable()
            && self.interned.is_none()
            && self.pin.is_none()
            && !self.recheck_pin
            && self.capture.is_empty()
            && !self.reset_all
            && !self.forget_server_statements
            && !self.skip_until_sync
            && self.lost_transaction.is_none()
            && self.server_fatal.is_none()
            && self.pending_begin.is_none()
            && !self.deferred_failed
            && !self.drain_seen
            && self.shared.lifecycle.drain_age().is_none()
    }

    /// Takes the session apart (see `parkable`); the socket leaves tokio's
    /// reactor.
    fn into_parked(self: Box<Self>) -> std::io::Result<Parked> {
        let s = *self;
        let deadline = s.timer.as_ref().map(|t| t.sleep.deadline());
        let stream = pgferry_tls::stream::into_std(s.rd, s.wr)?;
        Ok(Parked {
            kept: Kept {
                pool: s.pool,
                route: s.route,
                route_gen: s.route_gen,
                read_only: s.read_only,
                params: s.params,
                statements: (!s.statements.is_empty()).then(|| Box::new(s.statements)),
                client: s.client,
                user_permit: s._user_permit,
            },
            citus: s.citus,
            deadline,
            stream,
            shared: s.shared,
        })
    }

    /// Runs the session to its end, then returns or discards the server.
    /// Boxed: an `async fn` keeps its by-value arguments twice (the
    /// argument and the body's binding), 700 bytes per client for a session.
    pub async fn run(mut self: Box<Self>) -> Exit {
        let result = match self.main_loop().await {
            Ok(End::Park) => {
                let pool = self.pool.clone();
                match self.into_parked() {
                    Ok(p) => return Exit::Parked(p),
                    Err(e) => {
                        pool.stats.cl_active.fetch_sub(1, Relaxed);
                        return Exit::Closed(Err(e.into()));
                    }
                }
            }
            Ok(End::Closed) => Ok(()),
            Err(e) => {
                // Boxed: this rare path's timer and write would otherwise
                // enlarge every session's future.
                Box::pin(self.report_fatal(&e)).await;
                Err(e)
            }
        };
        Box::pin(self.release_on_exit()).await;
        self.pool.stats.cl_active.fetch_sub(1, Relaxed);
        Exit::Closed(result)
    }

    /// Tells the client why its session ends, if it should know.
    async fn report_fatal(&mut self, e: &ClientError) {
        let Some((code, msg)) = e.to_client() else {
            return;
        };
        self.to_client.clear();
        encode::error_response(&mut self.to_client, Severity::Fatal, &code, &msg);
        let wr = &mut self.wr;
        let out = &self.to_client;
        let _ = tokio::time::timeout(Duration::from_secs(1), async move {
            wr.write_all(out).await?;
            wr.flush().await
        })
        .await;
    }

    async fn main_loop(&mut self) -> Result<End, ClientError> {
        loop {
            self.maybe_release().await;
            self.release_idle_buffers();
            // Shutting down. A client idle at a transaction boundary is
            // closed after DRAIN_GRACE (idle_timeout): a transaction can span
            // several round trips at "idle" status (prepare, then execute),
            // so a boundary alone is not proof it is done. One that keeps
            // working is closed at a boundary once half of shutdown_timeout
            // has passed.
            if let Some(age) = self.shared.lifecycle.drain_age() {
                if age >= self.shared.settings.config().runtime.shutdown_timeout / 2 && self.between_transactions() {
                    return Err(shutting_down());
                }
            }
            let event = self.next_event().await;
            self.clock = None;
            match event {
                Event::ClientWrote(r) => match r? {
                    Some(n) => {
                        self.to_client.advance(n);
                        self.client_unflushed = self.wr.is_tls();
                        self.pool.stats.add(Total::Sent, n as u64);
                    }
                    None => self.client_unflushed = false,
                },
                Event::ServerWrote(Ok(Some(n))) => {
                    self.to_server.advance(n);
                    self.server_unflushed = self.server.as_ref().is_some_and(|s| s.wire.wr.is_tls());
                }
                Event::ServerWrote(Ok(None)) => self.server_unflushed = false,
                Event::ServerWrote(Err(e)) => self.server_lost(e.into()),
                Event::ServerRead(Ok(0)) => self.server_lost(PoolError::Closed),
                Event::ServerRead(Ok(_)) => self.on_server_data(),
                Event::ServerRead(Err(e)) => self.server_lost(e.into()),
                Event::ClientRead(r) => {
                    let n = r?;
                    if n == 0 {
                        return Ok(End::Closed);
                    }
                    self.client.entry.touch();
                    self.pool.stats.add(Total::Received, n as u64);
                    if self.on_client_data().await? == Flow::Terminate {
                        return Ok(End::Closed);
                    }
                }
                Event::Park => {
                    let park = self.parkable();
                    self.client.entry.parked(park);
                    if park {
                        return Ok(End::Park);
                    }
                }
                // Woken to re-evaluate: an idle client now gets a short grace
                // (idle_timeout) in case its next request is already on the way.
                Event::Drain => {}
                Event::Killed => {
                    tracing::info!(client = self.id, "closing client: killed from the admin console");
                    return Err(ClientError::refused(
                        sqlstate::ADMIN_SHUTDOWN,
                        "terminating connection due to administrator command (pgferry console)",
                    ));
                }
                Event::Timeout(code, what) => {
                    tracing::info!(client = self.id, "closing client: {what}");
                    return Err(ClientError::refused(code, what));
                }
            }
        }
    }

    /// Between transactions a busy client (`hot`) keeps small buffers (what
    /// a point query needs) for its next transaction, which then allocates
    /// nothing for them; larger ones (up to 64 KiB for a big result) are
    /// freed. Any other client keeps none: with thousands of mostly idle
    /// clients, what each once read or received would otherwise stay
    /// allocated (and a burst of logins reuses what the first ones freed).
    fn release_idle_buffers(&mut self) {
        if self.server.is_some() || self.replies.pending() || self.client_unflushed {
            return;
        }
        let keep = if self.hot { KEEP_BETWEEN_TRANSACTIONS } else { 0 };
        for buf in [&mut self.rbuf, &mut self.to_client, &mut self.to_server] {
            // `capacity()` of an advanced buffer hides what it consumed;
            // `try_reclaim` rewinds it over its whole allocation without
            // allocating, and succeeds only if that is larger than kept.
            if buf.is_empty() && buf.try_reclaim(keep + 1) {
                *buf = BytesMut::new();
            }
        }
        self.replies.release_memory(if self.hot { KEEP_QUEUED } else { 0 });
    }

    /// Waits for the next thing to do. The future holds only `&mut self`:
    /// an idle client's task keeps no per-branch future state, which is
    /// most of what a `select!` over socket futures cost per client.
    fn next_event(&mut self) -> impl std::future::Future<Output = Event> + '_ {
        self.arm_timer();
        std::future::poll_fn(move |cx| self.poll_event(cx))
    }

    /// One pass over everything the session waits on, in priority order:
    /// writes before reads (drain before taking in more), the server before
    /// the client. Every branch that is not ready registers `cx`'s waker,
    /// so the task wakes when any of them can make progress. Nothing is
    /// consumed unless its event is returned.
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        if !self.to_client.is_empty() || self.client_unflushed {
            if let Poll::Ready(r) = poll_write_or_flush(&mut self.wr, cx, &self.to_client) {
                return Poll::Ready(Event::ClientWrote(r));
            }
        }
        if let Some(s) = self.server.as_deref_mut() {
            let w = &mut s.wire;
            if !self.to_server.is_empty() || self.server_unflushed {
                if let Poll::Ready(r) = poll_write_or_flush(&mut w.wr, cx, &self.to_server) {
                    return Poll::Ready(Event::ServerWrote(r));
                }
            }
            if self.to_client.len() < HIGH_WATER {
                if let Poll::Ready(r) = pgferry_pool::server::poll_fill(&mut w.rd, cx, &mut w.rbuf) {
                    return Poll::Ready(Event::ServerRead(r));
                }
            }
        }
        // Replies the client does not read (pgferry's own answers included:
        // Sync without a server, Close, a known Parse) stop the reading of
        // its requests, as PostgreSQL stops reading a client it cannot
        // write to: memory stays bounded.
        let backlog = self.to_server.len().max(self.to_client.len());
        if backlog < HIGH_WATER && self.replies.queued() < MAX_QUEUED_REQUESTS {
            if let Poll::Ready(r) = poll_read_client(&mut self.rd, cx, &mut self.rbuf) {
                return Poll::Ready(Event::ClientRead(r));
            }
        }
        // A kill always; the start of a drain only while no server is bound
        // (waiting for the client), once.
        let wake_on_drain =
            (self.server.is_none() || self.mode == PoolMode::Session) && self.to_client.is_empty() && !self.drain_seen;
        if let Poll::Ready(signal) = self
            .client
            .entry
            .poll_signal(cx, wake_on_drain, self.shared.lifecycle.draining())
        {
            return Poll::Ready(match signal {
                Signal::Killed => Event::Killed,
                Signal::Park => Event::Park,
                Signal::Drain => {
                    self.drain_seen = true;
                    Event::Drain
                }
            });
        }
        if let Some(t) = &mut self.timer {
            if t.sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Timeout(t.code, t.what));
            }
        }
        Poll::Pending
    }

    /// Sets the timer to the idle timeout that applies now, counted from
    /// now; drops it when none applies (the default), so that clients
    /// without timeouts hold no timer.
    fn arm_timer(&mut self) {
        // An unparked session keeps the deadline it parked with.
        let resumed = self.resume_deadline.take();
        let Some((d, code, what)) = self.idle_timeout() else {
            self.timer = None;
            return;
        };
        let deadline = resumed.unwrap_or_else(|| tokio::time::Instant::now() + d);
        match &mut self.timer {
            Some(t) => {
                t.sleep.as_mut().reset(deadline);
                t.code = code;
                t.what = what;
            }
            None => {
                self.timer = Some(Timer {
                    sleep: Box::pin(tokio::time::sleep_until(deadline)),
                    code,
                    what,
                })
            }
        }
    }

    /// Nothing in flight either way and no transaction open: the client can
    /// be closed without losing anything.
    fn between_transactions(&self) -> bool {
        self.replies.releasable()
            && self.to_server.is_empty()
            && self.to_client.is_empty()
            && !self.client_unflushed
            && (self.server.is_none() || self.mode == PoolMode::Session)
    }

    /// The idle timeout that applies now, if any.
    fn idle_timeout(&self) -> Option<(Duration, &'static str, &'static str)> {
        if self.shared.lifecycle.drain_age().is_some() && self.between_transactions() {
            return Some((DRAIN_GRACE, sqlstate::ADMIN_SHUTDOWN, SHUTTING_DOWN));
        }
        if self.replies.pending() || !self.to_client.is_empty() {
            return None;
        }
        let l = &self.shared.settings.config().limits;
        // An open extended-protocol group holds its server like a
        // transaction block does.
        let in_transaction = !self.replies.releasable();
        if in_transaction && !l.idle_transaction_timeout.is_zero() {
            return Some((
                l.idle_transaction_timeout,
                sqlstate::IDLE_IN_TRANSACTION_TIMEOUT,
                "idle_transaction_timeout expired",
            ));
        }
        if !in_transaction && !l.client_idle_timeout.is_zero() {
            return Some((
                l.client_idle_timeout,
                sqlstate::IDLE_SESSION_TIMEOUT,
                "client_idle_timeout expired",
            ));
        }
        None
    }

    // ---- client → server ----

    /// Handles every complete message from the client. Handlers are
    /// synchronous: a message that needs a server gets one bound first, here,
    /// which keeps this future (and so every client's memory) small.
    async fn on_client_data(&mut self) -> Result<Flow, ClientError> {
        while let Some(frame) = decode_frame_take(&mut self.rbuf, self.max_message)? {
            if !frontend::is_known(frame.tag) {
                return Err(ProtocolError::UnexpectedTag(frame.tag as char).into());
            }
            if frame.tag == frontend::TERMINATE {
                return Ok(Flow::Terminate);
            }
            if self.skip_until_sync && frame.tag != frontend::SYNC {
                continue;
            }
            let is_copy = matches!(
                frame.tag,
                frontend::COPY_DATA | frontend::COPY_DONE | frontend::COPY_FAIL
            );
            if !is_copy {
                if let Some(lost) = self.lost_transaction.take() {
                    // A Sync too: the client's transaction (or open
                    // pipeline) is gone, and its ReadyForQuery must not
                    // say idle without saying why.
                    let ends_group = matches!(frame.tag, frontend::QUERY | frontend::SYNC);
                    self.fail_request(&lost.0, &lost.1, ends_group);
                    continue;
                }
            }
            // Citus routing: a lone BEGIN waits for the statement that
            // chooses the node (and an empty transaction's end needs none).
            if self.server.is_none()
                && matches!(frame.tag, frontend::QUERY | frontend::PARSE | frontend::BIND)
                && self.citus.is_some()
                && self.answer_tx_control(&frame)
            {
                continue;
            }
            if self.server.is_none() && self.deferred_failed && self.needs_server(&frame)? {
                self.interned = None;
                self.fail_request(
                    sqlstate::IN_FAILED_SQL_TRANSACTION,
                    "current transaction is aborted, commands ignored until end of transaction block",
                    frame.tag == frontend::QUERY,
                );
                continue;
            }
            if self.server.is_none() && self.needs_server(&frame)? {
                // Shard-aware routing picks the transaction's node first.
                if self.citus.is_some() {
                    match self.route_transaction(&frame) {
                        citus::RouteStep::Ready => {}
                        // The slow path waits for a coordinator.
                        citus::RouteStep::NeedHome => self.route_gen = 0,
                        citus::RouteStep::HoldForGroup(g) => {
                            let held = Box::pin(self.hold_for_group(g)).await;
                            self.clock = None;
                            if let Err(e) = held {
                                self.interned = None;
                                self.fail_pool(&e, frame.tag == frontend::QUERY);
                                continue;
                            }
                        }
                    }
                }
                let bound = match self.bind_now() {
                    Bind::Now(conn) => {
                        self.attach(conn, None);
                        Ok(())
                    }
                    Bind::Queue => self.bind_queued().await,
                    // Boxed: see `bind_now`.
                    Bind::Slow(start) => {
                        let asked = Instant::now();
                        Box::pin(self.bind_server_slow(start, asked)).await
                    }
                };
                if let Err(e) = bound {
                    self.interned = None;
                    self.fail_pool(&e, frame.tag == frontend::QUERY);
                    continue;
                }
            }
            self.on_client_frame(frame)?;
        }
        Ok(Flow::Continue)
    }

    /// Whether handling `frame` needs a server connection bound.
    fn needs_server(&mut self, frame: &Frame) -> Result<bool, ClientError> {
        Ok(match frame.tag {
            frontend::SYNC | frontend::FLUSH | frontend::COPY_DATA | frontend::COPY_DONE | frontend::COPY_FAIL => false,
            frontend::PARSE => {
                let p = frontend::parse(frame.body())?;
                if !self.rewrite || p.name.is_empty() {
                    true
                } else if self.statements.contains_key(p.name) {
                    // A duplicate name is refused without a server (on_parse).
                    false
                } else {
                    // A statement some server already accepted is answered
                    // without a server (on_parse).
                    let stmt = self.shared.statements.intern(&frame.body()[p.name.len() + 1..]);
                    let verified = stmt.is_verified();
                    self.interned = Some(stmt);
                    !verified
                }
            }
            frontend::CLOSE => {
                let (kind, name) = frontend::target(frame.body(), "Close")?;
                let local_statement = self.rewrite && kind == b'S' && !name.is_empty();
                let missing_portal = self.mode == PoolMode::Transaction && kind == b'P';
                !(local_statement || missing_portal)
            }
            _ => true,
        })
    }

    fn on_client_frame(&mut self, frame: Frame) -> Result<(), ClientError> {
        tracing::trace!(client = self.id, tag = %(frame.tag as char), len = frame.len(), bound = self.server.is_some(), "from client");
        let r = self.on_client_request(frame);
        // Requests the server will skip are known now: forget what they
        // prepared before the next request looks (a later group's Bind
        // must not count on a Parse the server skipped).
        self.apply_fates();
        r
    }

    fn on_client_request(&mut self, frame: Frame) -> Result<(), ClientError> {
        match frame.tag {
            frontend::QUERY => self.on_query(frame),
            frontend::PARSE => self.on_parse(frame),
            frontend::BIND => self.on_bind(frame),
            frontend::DESCRIBE => self.on_describe(frame),
            frontend::CLOSE => self.on_close(frame),
            frontend::SYNC => {
                self.skip_until_sync = false;
                if self.server.is_some() {
                    self.forward(&frame, Request::Sync);
                } else {
                    let mut b = BytesMut::with_capacity(6);
                    encode::ready_for_query(&mut b, self.replies.status());
                    self.respond_local(b.freeze(), true, || None);
                }
                Ok(())
            }
            frontend::EXECUTE => self.with_server(&frame, Request::Execute),
            frontend::FUNCTION_CALL => self.with_server(&frame, Request::FunctionCall),
            // Without a server there is nothing to flush but what pgferry
            // answered itself, which goes out anyway; outside COPY,
            // PostgreSQL ignores copy messages too (postgres.c).
            frontend::FLUSH | frontend::COPY_DATA | frontend::COPY_DONE | frontend::COPY_FAIL => {
                if self.server.is_some() {
                    let req = Request::from_tag(frame.tag).expect("a request tag");
                    self.to_server.extend_from_slice(&frame.bytes);
                    self.replies.sent(req, Reply::Forward, None);
                }
                Ok(())
            }
            t => Err(ProtocolError::UnexpectedTag(t as char).into()),
        }
    }
}

/// Writes some of `buf`, or flushes when it is empty: over TLS a write can
/// leave bytes in the TLS layer until a flush. Cancel safe.
fn poll_write_or_flush<W: AsyncWrite + Unpin>(
    w: &mut W,
    cx: &mut Context<'_>,
    buf: &[u8],
) -> Poll<std::io::Result<Option<usize>>> {
    if buf.is_empty() {
        StdPin::new(w).poll_flush(cx).map_ok(|()| None)
    } else {
        StdPin::new(w).poll_write(cx, buf).map_ok(Some)
    }
}

/// Reads from the client. Small reads (the common case) land in a 2 KiB
/// stack chunk and are copied to `buf`, which therefore grows only to what
/// is actually pending: an idle client holds no read buffer. Once a read
/// fills the chunk, more is likely coming (COPY, a large message), so the
/// buffer grows and later reads land in it directly. Over TLS the bytes come
/// out of rustls's own buffer the same way.
fn poll_read_client(rd: &mut ClientReadHalf, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<std::io::Result<usize>> {
    if buf.capacity() - buf.len() >= 4096 {
        return tokio_util::io::poll_read_buf(StdPin::new(rd), cx, buf);
    }
    let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
    let mut rb = ReadBuf::uninit(&mut chunk);
    std::task::ready!(StdPin::new(rd).poll_read(cx, &mut rb))?;
    let n = rb.filled().len();
    buf.extend_from_slice(rb.filled());
    if n == chunk.len() {
        buf.reserve(64 * 1024);
    }
    Poll::Ready(Ok(n))
}

const SHUTTING_DOWN: &str = "terminating connection due to administrator command: pgferry is shutting down";

/// While draining, a client idle this long is closed: long enough for a
/// request already on its way (a client that just connected) to arrive.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

fn shutting_down() -> ClientError {
    ClientError::refused(sqlstate::ADMIN_SHUTDOWN, SHUTTING_DOWN)
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("peer", &self.client.entry.info.peer)
            .finish()
    }
}
#[cfg(test)]
mod tests {
    /// Every resumed session touches its fields from a cold cache under
    /// load (1,000 clients): rare parts (Citus routing, ...) stay boxed so
    /// that the rest spans few cache lines. Raise deliberately, not by
    /// accident.
    #[test]
    fn session_stays_small() {
        let size = std::mem::size_of::<super::Session>();
        assert!(size <= 704, "Session is {size} bytes");
    }
}
