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

use crate::clients::{CancelTarget, Signal};
use crate::params::{self, ClientParams};
use crate::shared::Shared;
use crate::ClientError;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use pgferry_config::{PoolMode, SessionStatePolicy};
use pgferry_pool::latency::Kind as LatencyKind;
use pgferry_pool::statements::Statement;
use pgferry_pool::{Pool, PoolError, PooledConn, ServerConn};
use pgferry_protocol::backend::{self, TxStatus};
use pgferry_protocol::encode::{self, Severity};
use pgferry_protocol::replies::{Fate, Received, Replies, Reply, Request};
use pgferry_protocol::sql::{self, Pin};
use pgferry_protocol::{decode_frame, frontend, sqlstate, Frame, ProtocolError};
use pgferry_routing::{Role, Route};
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
/// Stop reading a client with this many requests waiting for replies.
const MAX_QUEUED_REQUESTS: usize = 32 * 1024;
/// Bound on pgferry's own short queries (sync, capture, reset).
const INTERNAL_QUERY_TIMEOUT: Duration = Duration::from_secs(10);

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
    pub id: u64,
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

pub struct Session {
    shared: Arc<Shared>,
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
    mode: PoolMode,
    /// Rename named statements (transaction mode with a statement cache).
    rewrite: bool,
    policy: SessionStatePolicy,
    max_prepared: usize,
    max_message: usize,
    server: Option<PooledConn>,
    bound_at: Instant,
    /// When the oldest request still waiting for a ReadyForQuery was sent
    /// (query time: request to ReadyForQuery).
    query_start: Option<Instant>,
    /// What the bound server still owes, and where it is in the protocol.
    replies: Replies<Effect>,
    /// The client's named statements.
    statements: HashMap<Box<[u8]>, Arc<Statement>>,
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
}

/// A pending idle timeout and what the client is told when it fires.
struct Timer {
    sleep: StdPin<Box<tokio::time::Sleep>>,
    code: &'static str,
    what: &'static str,
}

impl Session {
    pub fn new(shared: Arc<Shared>, init: SessionInit) -> Self {
        let settings = &init.pool.settings;
        let mode = settings.pool_mode;
        Session {
            id: init.id,
            rd: init.rd,
            wr: init.wr,
            rbuf: init.rbuf,
            to_client: BytesMut::new(),
            to_server: BytesMut::new(),
            client_unflushed: false,
            server_unflushed: false,
            read_only: init.read_only,
            mode,
            rewrite: mode == PoolMode::Transaction && settings.max_prepared_statements > 0,
            policy: shared.config().pool.session_state,
            shared: shared.clone(),
            max_prepared: settings.max_prepared_statements,
            max_message: shared.config().limits.max_message_size,
            pool: init.pool,
            route: init.route,
            route_gen: shared.router.generation(),
            server: None,
            bound_at: Instant::now(),
            query_start: None,
            replies: Replies::new(),
            statements: HashMap::new(),
            interned: None,
            params: init.params,
            pin: None,
            recheck_pin: false,
            capture: Vec::new(),
            reset_all: false,
            forget_server_statements: false,
            skip_until_sync: false,
            lost_transaction: None,
            server_fatal: None,
            client: init.client,
            _user_permit: init.user_permit,
            drain_seen: false,
            timer: None,
        }
    }

    /// Runs the session to its end, then returns or discards the server.
    /// Boxed: an `async fn` keeps its by-value arguments twice (the
    /// argument and the body's binding), 700 bytes per client for a session.
    pub async fn run(mut self: Box<Self>) -> Result<(), ClientError> {
        self.pool.stats.cl_active.fetch_add(1, Relaxed);
        let result = self.main_loop().await;
        if let Err(e) = &result {
            // Boxed: this rare path's timer and write would otherwise
            // enlarge every session's future.
            Box::pin(self.report_fatal(e)).await;
        }
        Box::pin(self.release_on_exit()).await;
        self.pool.stats.cl_active.fetch_sub(1, Relaxed);
        result
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

    async fn main_loop(&mut self) -> Result<(), ClientError> {
        loop {
            self.maybe_release().await;
            self.release_idle_buffers();
            // Shutting down. A client idle at a transaction boundary is
            // closed after DRAIN_GRACE (idle_timeout): a transaction can span
            // several round trips at "idle" status (prepare, then execute),
            // so a boundary alone is not proof it is done. One that keeps
            // working is closed at a boundary once half of shutdown_timeout
            // has passed.
            if let Some(age) = self.shared.drain_age() {
                if age >= self.shared.config().runtime.shutdown_timeout / 2 && self.between_transactions() {
                    return Err(shutting_down());
                }
            }
            match self.next_event().await {
                Event::ClientWrote(r) => match r? {
                    Some(n) => {
                        self.to_client.advance(n);
                        self.client_unflushed = self.wr.is_tls();
                        self.pool.stats.total_sent.fetch_add(n as u64, Relaxed);
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
                        return Ok(());
                    }
                    self.pool.stats.total_received.fetch_add(n as u64, Relaxed);
                    if self.on_client_data().await? == Flow::Terminate {
                        return Ok(());
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

    /// A client between transactions holds no buffer memory: with thousands
    /// of mostly idle clients, what each once read or received (up to 64 KiB
    /// apiece) would otherwise stay allocated. The next request allocates
    /// what it needs again: a few small allocations per transaction, which
    /// BENCHMARKS.md measured as no cost in CPU per transaction.
    fn release_idle_buffers(&mut self) {
        if self.server.is_some() || self.replies.pending() || self.client_unflushed {
            return;
        }
        // `capacity()` does not show what an advanced or split buffer still
        // holds, so an empty buffer is replaced outright (free when it holds
        // nothing).
        for buf in [&mut self.rbuf, &mut self.to_client, &mut self.to_server] {
            if buf.is_empty() {
                *buf = BytesMut::new();
            }
        }
        self.replies.release_memory();
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
        if let Poll::Ready(signal) = self.client.entry.poll_signal(cx, wake_on_drain, self.shared.draining()) {
            return Poll::Ready(match signal {
                Signal::Killed => Event::Killed,
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
        let Some((d, code, what)) = self.idle_timeout() else {
            self.timer = None;
            return;
        };
        let deadline = tokio::time::Instant::now() + d;
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
        if self.shared.drain_age().is_some() && self.between_transactions() {
            return Some((DRAIN_GRACE, sqlstate::ADMIN_SHUTDOWN, SHUTTING_DOWN));
        }
        if self.replies.pending() || !self.to_client.is_empty() {
            return None;
        }
        let l = &self.shared.config().limits;
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
        while let Some(frame) = decode_frame(&mut self.rbuf, self.max_message)? {
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
            if frame.tag != frontend::SYNC && !is_copy {
                if let Some(lost) = self.lost_transaction.take() {
                    self.fail_request(&lost.0, &lost.1, frame.tag == frontend::QUERY);
                    continue;
                }
            }
            if self.server.is_none() && self.needs_server(&frame)? {
                let bound = match self.bind_now() {
                    Ok(conn) => {
                        self.attach(conn, None);
                        Ok(())
                    }
                    // Boxed: see `bind_now`.
                    Err(checked_out) => Box::pin(self.bind_server_slow(checked_out)).await,
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
                    self.respond_local(b.freeze(), true, None);
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

    fn on_query(&mut self, frame: Frame) -> Result<(), ClientError> {
        let Ok(text) = frontend::query(frame.body()) else {
            // As PostgreSQL: an error for this query, not a closed connection.
            self.fail_request(sqlstate::PROTOCOL_VIOLATION, "invalid string in message", true);
            return Ok(());
        };
        if self.read_only && sql::may_leave_read_only(text) {
            self.refuse_read_write(true);
            return Ok(());
        }
        if self.mode == PoolMode::Transaction {
            let fx = sql::scan(text);
            if !self.note_effects(&fx, true) {
                return Ok(());
            }
            // DEALLOCATE of a protocol-level statement: pgferry holds those,
            // so it answers itself.
            if let (Some(Some(name)), 1) = (&fx.deallocate, fx.statements) {
                if !self.rewrite {
                    return self.with_server(&frame, Request::Query);
                }
                if let Some(stmt) = self.statements.remove(name.as_bytes()) {
                    let mut b = BytesMut::new();
                    encode::command_complete(&mut b, "DEALLOCATE");
                    encode::ready_for_query(&mut b, self.replies.status());
                    let name = name.as_bytes().into();
                    self.respond_local(b.freeze(), true, Some(Effect::Closed { name, stmt }));
                    return Ok(());
                }
            }
        }
        self.with_server(&frame, Request::Query)
    }

    /// Applies what a statement does to session state. Returns false if the
    /// statement was refused (the error is already queued).
    fn note_effects(&mut self, fx: &sql::Effects, simple: bool) -> bool {
        if let Some(pin) = fx.pin {
            if self.policy == SessionStatePolicy::Error {
                let msg = format!(
                    "{} is not supported in transaction pooling mode (pgferry session_state = \"error\")",
                    pin.as_str()
                );
                self.fail_request(sqlstate::FEATURE_NOT_SUPPORTED, &msg, simple);
                return false;
            }
            if self.pin.is_none() {
                tracing::info!(
                    client = self.id,
                    reason = pin.as_str(),
                    "client pinned to its server connection"
                );
            }
            self.pin = Some(self.pin.map_or(pin, |p| p.min(pin)));
        }
        if fx.maybe_release && self.pin.is_some() {
            self.recheck_pin = true;
        }
        if fx.reset_all {
            self.reset_all = true;
            if self.pin == Some(Pin::DynamicSetting) {
                self.pin = None;
                self.recheck_pin = true;
            }
        }
        if fx.discard_all || fx.deallocate == Some(None) {
            self.statements.clear();
            self.forget_server_statements = true;
        }
        self.capture.extend(fx.settings.iter().cloned());
        true
    }

    /// A read-only user tried to leave read-only mode.
    fn refuse_read_write(&mut self, simple: bool) {
        self.fail_request(
            sqlstate::READ_ONLY_SQL_TRANSACTION,
            "this user is read-only through pgferry: statements that could leave read-only mode are refused",
            simple,
        );
    }

    fn on_parse(&mut self, frame: Frame) -> Result<(), ClientError> {
        let p = frontend::parse(frame.body())?;
        let held = self.interned.take();
        if self.read_only && sql::may_leave_read_only(p.query) {
            self.refuse_read_write(false);
            return Ok(());
        }
        if !self.rewrite || p.name.is_empty() {
            // Unnamed statements are parsed for each execution, so this is
            // the place to see their effects. Named ones: at each Bind.
            if self.mode == PoolMode::Transaction && !self.note_effects(&sql::scan(p.query), false) {
                return Ok(());
            }
            return self.with_server(&frame, Request::Parse);
        }
        if self.statements.contains_key(p.name) {
            let msg = format!(
                "prepared statement \"{}\" already exists",
                String::from_utf8_lossy(p.name)
            );
            self.fail_request(sqlstate::DUPLICATE_PSTATEMENT, &msg, false);
            return Ok(());
        }
        let tail = &frame.body()[p.name.len() + 1..];
        let stmt = match held {
            Some(s) if s.parse_tail[..] == *tail => s,
            _ => self.shared.statements.intern(tail),
        };
        if self.server.is_none() && stmt.is_verified() {
            // Known good: no server needed now. Waiting for one here could
            // deadlock a client library that prepares synchronously on one
            // thread while another of its connections holds a server.
            self.statements.insert(p.name.into(), stmt.clone());
            let effect = Effect::Named {
                name: p.name.into(),
                stmt,
            };
            self.respond_local(Bytes::from_static(PARSE_COMPLETE), false, Some(effect));
            return Ok(());
        }
        if !self.require_server(false) {
            return Ok(());
        }
        self.statements.insert(p.name.into(), stmt.clone());
        self.prepare_on_server(&stmt, Some(p.name));
        Ok(())
    }

    /// Makes sure the bound server has `stmt`. For the client's own Parse
    /// of `client_name` the client gets a ParseComplete either way; for one
    /// pgferry adds before a Bind or Describe, the reply is swallowed.
    fn prepare_on_server(&mut self, stmt: &Arc<Statement>, client_name: Option<&[u8]>) {
        let srv = self.server.as_deref_mut().expect("bound");
        if srv.statements.touch(stmt.id) {
            if let Some(name) = client_name {
                let effect = Effect::Named {
                    name: name.into(),
                    stmt: stmt.clone(),
                };
                self.respond_local(Bytes::from_static(PARSE_COMPLETE), false, Some(effect));
            }
            return;
        }
        if let Some(victim) = srv.statements.insert(stmt.id, self.max_prepared) {
            encode::close(&mut self.to_server, b'S', format!("pgferry_{victim}").as_bytes());
            self.replies.sent(Request::Close, Reply::Swallow, None);
        }
        encode::message(&mut self.to_server, frontend::PARSE, |b| {
            b.put_slice(&stmt.name);
            b.put_u8(0);
            b.put_slice(&stmt.parse_tail);
        });
        let reply = if client_name.is_some() {
            Reply::Forward
        } else {
            Reply::Swallow
        };
        let effect = Effect::Prepared {
            stmt: stmt.clone(),
            client: client_name.map(Into::into),
        };
        self.replies.sent(Request::Parse, reply, Some(effect));
    }

    /// The client's statement `name`, or None with 26000 queued for the request.
    fn client_statement(&mut self, name: &[u8]) -> Option<Arc<Statement>> {
        let stmt = self.statements.get(name).cloned();
        if stmt.is_none() {
            let msg = format!(
                "prepared statement \"{}\" does not exist",
                String::from_utf8_lossy(name)
            );
            self.fail_request(sqlstate::INVALID_SQL_STATEMENT_NAME, &msg, false);
        }
        stmt
    }

    /// Notes a client request written to the server, its reply forwarded.
    fn expect_forwarded(&mut self, req: Request) {
        if self.query_start.is_none() {
            self.query_start = Some(Instant::now());
        }
        self.replies.sent(req, Reply::Forward, None);
    }

    fn on_bind(&mut self, frame: Frame) -> Result<(), ClientError> {
        let b = frontend::bind(frame.body())?;
        if !self.rewrite || b.statement.is_empty() {
            return self.with_server(&frame, Request::Bind);
        }
        let Some(stmt) = self.client_statement(b.statement) else {
            return Ok(());
        };
        // Executing it is what creates session state (a lock, a LISTEN, ...).
        if !self.note_effects(&stmt.effects, false) || !self.require_server(false) {
            return Ok(());
        }
        self.prepare_on_server(&stmt, None);
        encode::bind(
            &mut self.to_server,
            b.portal,
            &stmt.name,
            &frame.body()[b.rest_offset..],
        );
        self.expect_forwarded(Request::Bind);
        Ok(())
    }

    fn on_describe(&mut self, frame: Frame) -> Result<(), ClientError> {
        let (kind, name) = frontend::target(frame.body(), "Describe")?;
        if !self.rewrite || kind != b'S' || name.is_empty() {
            return self.with_server(&frame, Request::Describe);
        }
        let Some(stmt) = self.client_statement(name) else {
            return Ok(());
        };
        if self.require_server(false) {
            self.prepare_on_server(&stmt, None);
            encode::describe(&mut self.to_server, b'S', &stmt.name);
            self.expect_forwarded(Request::Describe);
        }
        Ok(())
    }

    fn on_close(&mut self, frame: Frame) -> Result<(), ClientError> {
        let (kind, name) = frontend::target(frame.body(), "Close")?;
        if self.rewrite && kind == b'S' && !name.is_empty() {
            // The server copy stays cached for other clients.
            let effect = self.statements.remove(name).map(|stmt| Effect::Closed {
                name: name.into(),
                stmt,
            });
            self.respond_local(Bytes::from_static(CLOSE_COMPLETE), false, effect);
            return Ok(());
        }
        if self.server.is_none() && self.mode == PoolMode::Transaction && kind == b'P' {
            // No server, so no portal: closing a missing portal succeeds.
            self.respond_local(Bytes::from_static(CLOSE_COMPLETE), false, None);
            return Ok(());
        }
        self.with_server(&frame, Request::Close)
    }

    /// Forwards `frame` to the bound server.
    fn with_server(&mut self, frame: &Frame, req: Request) -> Result<(), ClientError> {
        if self.require_server(req == Request::Query) {
            self.forward(frame, req);
        }
        Ok(())
    }

    /// on_client_data binds a server before a handler that needs one runs;
    /// this checks it, reporting an error for the request if it is missing.
    fn require_server(&mut self, simple: bool) -> bool {
        if self.server.is_some() {
            return true;
        }
        tracing::error!(client = self.id, "handler ran without a server connection");
        self.fail_request(
            sqlstate::INTERNAL_ERROR,
            "pgferry internal error: no server connection",
            simple,
        );
        false
    }

    fn forward(&mut self, frame: &Frame, req: Request) {
        self.to_server.extend_from_slice(&frame.bytes);
        self.expect_forwarded(req);
    }

    /// Answers a client request itself, in order with the replies the
    /// server still owes. `sync_point`: the answer ends with ReadyForQuery.
    fn respond_local(&mut self, bytes: Bytes, sync_point: bool, effect: Option<Effect>) {
        self.replies.local(&mut self.to_client, bytes, sync_point, effect);
        self.apply_fates();
    }

    /// Reports an error for the current request, with PostgreSQL's
    /// consequences: a simple query gets its ReadyForQuery; an
    /// extended-protocol one skips to the next Sync; an open transaction
    /// (explicit, or the implicit one of a pipeline) is aborted. With a
    /// server bound, only the server can abort it: pgferry sends it a
    /// request that fails (a portal nobody has, or a query that raises) and
    /// puts its own error in place of the server's.
    fn fail_request(&mut self, code: &str, message: &str, simple: bool) {
        let mut b = BytesMut::new();
        encode::error_response(&mut b, Severity::Error, code, message);
        if self.server.is_some() {
            let b = b.freeze();
            if simple {
                encode::query(&mut self.to_server, REFUSED_QUERY);
                self.replies.sent(Request::Query, Reply::ReplaceError(b), None);
            } else {
                encode::message(&mut self.to_server, frontend::EXECUTE, |m| {
                    m.put_slice(REFUSED_PORTAL);
                    m.put_u8(0);
                    m.put_i32(1);
                });
                self.replies.sent(Request::Execute, Reply::ReplaceError(b), None);
            }
            if self.query_start.is_none() {
                self.query_start = Some(Instant::now());
            }
            return;
        }
        if simple {
            encode::ready_for_query(&mut b, self.replies.status());
        } else {
            self.skip_until_sync = true;
        }
        self.respond_local(b.freeze(), simple, None);
    }

    /// Keeps or undoes what requests meant, now that their fate is known.
    fn apply_fates(&mut self) {
        for (effect, fate) in self.replies.take_fates() {
            match (effect, fate) {
                (Effect::Prepared { stmt, .. }, Fate::Done) => stmt.set_verified(),
                (Effect::Prepared { stmt, client }, _) => {
                    // The server does not have it; nor does the client, if
                    // it was the client's Parse (PostgreSQL creates no
                    // statement on a failed or skipped Parse).
                    if let Some(srv) = self.server.as_deref_mut() {
                        srv.statements.remove(stmt.id);
                    }
                    if let Some(name) = client {
                        forget_if_same(&mut self.statements, &name, &stmt);
                    }
                }
                (_, Fate::Done) => {}
                (Effect::Named { name, stmt }, _) => forget_if_same(&mut self.statements, &name, &stmt),
                (Effect::Closed { name, stmt }, _) => {
                    self.statements.entry(name).or_insert(stmt);
                }
            }
        }
    }

    fn fail_pool(&mut self, e: &PoolError, simple: bool) {
        tracing::warn!(client = self.id, error = %e, "no server connection for client");
        self.fail_request(e.sqlstate(), &crate::error::pool_message(e), simple);
    }

    /// Binds a server connection before a request is forwarded, the common
    /// case: no PAUSE, no topology change, an idle connection whose session
    /// parameters match the client's. No await, so the slow path
    /// ([`bind_server_slow`], boxed by the caller) does not enlarge every
    /// client's future (memory per idle client). Err carries a connection
    /// that was checked out but needs its settings synced, if any.
    fn bind_now(&mut self) -> Result<PooledConn, Option<PooledConn>> {
        if self.shared.any_paused.load(Relaxed) || self.route_stale() {
            return Err(None);
        }
        let mut conn = self.pool.try_checkout().ok_or(None)?;
        if self.params.fingerprint() != params::server_fingerprint(&mut conn) {
            return Err(Some(conn));
        }
        Ok(conn)
    }

    /// The topology changed since this session last routed, or its pool was
    /// replaced: route again before the next transaction.
    fn route_stale(&self) -> bool {
        self.route_gen != self.shared.router.generation() || self.pool.is_closed()
    }

    /// Makes `conn` the session's server connection. `asked` is when the
    /// client started waiting for it; None when it did not wait (the fast
    /// path: one clock read, a zero wait recorded).
    fn attach(&mut self, conn: PooledConn, asked: Option<Instant>) {
        self.client.entry.set_target(Some(CancelTarget {
            addr: conn.addr.clone(),
            pid: conn.backend_pid,
            key: conn.backend_key,
            server: conn.id,
            server_created: conn.created,
        }));
        self.server = Some(conn);
        self.server_unflushed = false;
        self.bound_at = Instant::now();
        let waited = asked.map_or(Duration::ZERO, |a| self.bound_at.saturating_duration_since(a));
        self.pool
            .stats
            .total_wait_time
            .fetch_add(waited.as_micros() as u64, Relaxed);
        self.pool.latency.record(LatencyKind::Wait, waited);
    }

    /// Binds a server connection the slow way: waits out a PAUSE, follows
    /// the topology, waits for a connection (or holds while the server is
    /// unreachable), and brings the connection's settings in line with the
    /// client's. `conn` is one already checked out that only needs the sync.
    async fn bind_server_slow(&mut self, conn: Option<PooledConn>) -> Result<(), PoolError> {
        let asked = Instant::now();
        let mut conn = match conn {
            Some(c) => c,
            None => {
                if self.shared.any_paused.load(Relaxed) {
                    self.wait_unpaused().await?;
                }
                if self.route_stale() {
                    self.reroute().await?;
                }
                // The fast path found no idle connection (or the pool has
                // just changed): checkout takes an idle one first anyway.
                self.checkout_or_hold().await?
            }
        };
        if self.params.fingerprint() != params::server_fingerprint(&mut conn) {
            self.sync_server(&mut conn).await?;
        }
        self.attach(conn, Some(asked));
        Ok(())
    }

    /// PAUSE: new transactions wait (bounded like any wait for a server)
    /// until RESUME.
    async fn wait_unpaused(&self) -> Result<(), PoolError> {
        let paused = self.shared.wait_unpaused(&self.pool.key.database);
        let wait = self.pool.settings.query_wait_timeout;
        if wait.is_zero() {
            paused.await;
        } else if tokio::time::timeout(wait, paused).await.is_err() {
            return Err(PoolError::WaitTimeout);
        }
        Ok(())
    }

    /// Checks a connection out; when the server cannot be reached (it just
    /// crashed, or is restarting in place), holds the transaction, retrying
    /// and following topology changes, for up to failover_hold_timeout: a
    /// client between transactions sees a pause, not an error, while etcd
    /// catches up with a dead leader.
    async fn checkout_or_hold(&mut self) -> Result<PooledConn, PoolError> {
        self.client.entry.set_waiting(true);
        let r = self.checkout_or_hold_inner().await;
        self.client.entry.set_waiting(false);
        r
    }

    async fn checkout_or_hold_inner(&mut self) -> Result<PooledConn, PoolError> {
        let hold = self.shared.failover_hold();
        let deadline = Instant::now() + hold;
        let mut topology = self.shared.router.subscribe();
        let mut logged = false;
        loop {
            let err = match self.pool.checkout().await {
                Ok(c) => return Ok(c),
                // The pool was replaced (RELOAD, RECONNECT, a failover)
                // while this client waited: wait in the new one.
                Err(PoolError::ShuttingDown) if self.pool.is_closed() => {
                    self.reroute().await?;
                    continue;
                }
                // Nothing of the client's was sent: wait and retry.
                Err(e) if e.server_unavailable() => e,
                Err(e) => return Err(e),
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(err);
            }
            if !logged {
                tracing::info!(client = self.id, error = %err, "server unreachable; holding the transaction until it returns or the topology changes");
                logged = true;
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(250)), topology.changed()).await;
            if self.route_stale() {
                self.reroute().await?;
            }
        }
    }

    /// The topology changed since this session last routed (a failover, a
    /// replica gone or back): keep the member if it still serves this port,
    /// else route again, waiting up to failover_hold_timeout for a leader.
    /// Runs only between transactions, so a client that is not in one sees
    /// nothing of a failover but a short wait.
    async fn reroute(&mut self) -> Result<(), PoolError> {
        let role = if self.pool.key.read_only {
            Role::ReadOnly
        } else {
            Role::ReadWrite
        };
        let router = &self.shared.router;
        let generation = router.generation();
        let mut candidate = None;
        if !self.pool.is_closed() && router.keeps(role, &self.route.member.addr) {
            // Read-only sessions also rebalance when the set of replicas
            // changes (one came back): move if another is less loaded.
            let mine = &self.route.member;
            candidate = match role {
                Role::ReadWrite => None,
                Role::ReadOnly => router.route(role).filter(|c| {
                    !Arc::ptr_eq(&c.member, mine) && c.member.sessions.load(Relaxed) < mine.sessions.load(Relaxed)
                }),
            };
            if candidate.is_none() {
                self.route_gen = generation;
                return Ok(());
            }
        }
        let hold = self.shared.failover_hold();
        let route = match candidate {
            Some(c) => c,
            None => router.route_wait(role, hold).await.ok_or_else(|| {
                PoolError::NoServer(format!(
                    "no server is available for the {} port (no confirmed leader within failover_hold_timeout, {hold:?})",
                    role.as_str()
                ))
            })?,
        };
        let key = &self.pool.key;
        let pool = self.shared.pool(&key.database, &key.user, &route.member.addr, role);
        pool.credentials().adopt(self.pool.credentials());
        tracing::info!(client = self.id, from = %self.route.member.addr, to = %route.member.addr, port = role.as_str(), "session moved to a new server");
        self.pool.stats.cl_active.fetch_sub(1, Relaxed);
        pool.stats.cl_active.fetch_add(1, Relaxed);
        self.pool = pool;
        self.route = route;
        self.route_gen = generation;
        Ok(())
    }

    /// Brings a server connection's session parameters in line with the
    /// client's. On failure the caller drops `conn`, which closes it.
    async fn sync_server(&mut self, conn: &mut PooledConn) -> Result<(), PoolError> {
        if let Some(sql) = params::sync_sql(&self.params, conn) {
            self.internal_query(conn, &sql).await?;
            conn.replace_settings(self.params.settings().to_vec());
        }
        // Facts about the server (in_hot_standby after a failover, ...).
        for &name in params::INFORMATIONAL {
            if let Some(v) = conn.param(name) {
                if self.params.set(name, v) {
                    encode::parameter_status(&mut self.to_client, name, v);
                }
            }
        }
        Ok(())
    }

    // ---- server → client ----

    fn on_server_data(&mut self) {
        loop {
            let Some(srv) = self.server.as_deref_mut() else {
                return;
            };
            match decode_frame(&mut srv.wire.rbuf, self.max_message) {
                Ok(Some(frame)) => {
                    if let Err(e) = self.on_server_frame(frame) {
                        return self.server_lost(e);
                    }
                }
                Ok(None) => return,
                Err(e) => return self.server_lost(e.into()),
            }
        }
    }

    fn on_server_frame(&mut self, frame: Frame) -> Result<(), PoolError> {
        tracing::trace!(client = self.id, tag = %(frame.tag as char), len = frame.len(), "from server");
        let mut frame = frame;
        if frame.tag == backend::ERROR_RESPONSE {
            let e = backend::error_fields(frame.body())?;
            if matches!(e.severity, "FATAL" | "PANIC") {
                // The server connection is ending, not the client's: keep
                // the reason for server_lost, which reports it as an ERROR.
                self.server_fatal = Some(Box::new((e.code.to_owned(), e.message.to_owned())));
                return Ok(());
            }
            if self.rewrite {
                if let Some(f) = self.client_names_in_error(&frame) {
                    frame = f;
                }
            }
        }
        match self.replies.received(&frame, &mut self.to_client) {
            Ok(Received::ParameterStatus) => {
                let (name, value) = backend::parameter_status(frame.body())?;
                self.server.as_deref_mut().expect("bound").set_param(name, value);
                if self.params.set(name, value) {
                    self.to_client.extend_from_slice(&frame.bytes);
                }
            }
            Ok(Received::Ready(_)) => self.query_done(),
            Ok(Received::Reply) => {}
            Err(e) => return Err(PoolError::Protocol(e.into())),
        }
        self.apply_fates();
        Ok(())
    }

    /// An error that names pgferry's statement (`pgferry_7`) where the
    /// client knows its own name (`s1`), rewritten with the client's name.
    /// Rare: only errors that quote a statement name pay for the scan.
    fn client_names_in_error(&self, frame: &Frame) -> Option<Frame> {
        const PREFIX: &[u8] = b"\"pgferry_";
        let body = frame.body();
        body.windows(PREFIX.len()).position(|w| w == PREFIX)?;
        let mut out = BytesMut::with_capacity(frame.len() + 64);
        let mut changed = false;
        encode::message(&mut out, backend::ERROR_RESPONSE, |b| {
            let mut fields = body;
            while let [code, rest @ ..] = fields {
                if *code == 0 {
                    break;
                }
                let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
                let mut value = rest[..end].to_vec();
                for (client, stmt) in &self.statements {
                    let server = format!("\"{}\"", String::from_utf8_lossy(&stmt.name));
                    let mine = format!("\"{}\"", String::from_utf8_lossy(client));
                    if let Some(v) = replace_all(&value, server.as_bytes(), mine.as_bytes()) {
                        value = v;
                        changed = true;
                    }
                }
                b.put_u8(*code);
                b.put_slice(&value);
                b.put_u8(0);
                fields = rest.get(end + 1..).unwrap_or(&[]);
            }
            b.put_u8(0);
        });
        changed.then(|| Frame {
            tag: backend::ERROR_RESPONSE,
            bytes: out.freeze(),
        })
    }

    /// A client request got its ReadyForQuery: one query, as PgBouncer
    /// counts them. Pipelined requests are timed from the previous reply.
    fn query_done(&mut self) {
        let now = Instant::now();
        if let Some(start) = self.query_start.take() {
            let d = now.saturating_duration_since(start);
            self.pool.stats.total_query_count.fetch_add(1, Relaxed);
            self.pool
                .stats
                .total_query_time
                .fetch_add(d.as_micros() as u64, Relaxed);
            self.pool.latency.record(LatencyKind::Query, d);
        }
        if self.replies.pending() {
            self.query_start = Some(now);
        }
    }

    /// The server connection failed while bound: tell the client what it
    /// lost, in protocol order, and carry on without it.
    fn server_lost(&mut self, e: PoolError) {
        let Some(conn) = self.server.take() else {
            return;
        };
        tracing::warn!(client = self.id, server = conn.id, error = %e, "server connection lost");
        conn.discard("connection lost");
        self.client.entry.set_target(None);
        // Say "rolled back" only when it is certain: nothing that could
        // have committed was in flight.
        let fatal = self.server_fatal.take().map(|b| *b);
        let (code, msg) = if self.replies.executing() {
            let why = fatal.map_or(String::new(), |(_, m)| format!(" ({m})"));
            (
                sqlstate::TRANSACTION_RESOLUTION_UNKNOWN.to_owned(),
                format!("server connection lost while a request was running{why}: whether it took effect is unknown"),
            )
        } else {
            match fatal {
                Some((code, m)) => (
                    code,
                    format!("server connection lost ({m}); the transaction was rolled back"),
                ),
                None => (
                    sqlstate::CONNECTION_FAILURE.to_owned(),
                    "server connection lost; the transaction was rolled back".to_owned(),
                ),
            }
        };
        let in_block = self.replies.status() != TxStatus::Idle;
        let mut err = BytesMut::new();
        encode::error_response(&mut err, Severity::Error, &code, &msg);
        let lost = self.replies.lost(&mut self.to_client, &err);
        self.apply_fates();
        if lost.told {
            // The client's open group already failed: skip the rest of it.
            self.skip_until_sync = true;
        } else if lost.open || in_block || self.pin.is_some() {
            // Between requests: report it on the client's next request.
            self.lost_transaction = Some(Box::new((code, msg)));
        }
        self.to_server.clear();
        self.query_start = None;
        self.pin = None;
        self.capture.clear();
    }

    // ---- transaction boundaries ----

    /// In transaction mode, returns the server to the pool at the end of a
    /// transaction unless session state pins it.
    async fn maybe_release(&mut self) {
        if self.mode == PoolMode::Session || self.server.is_none() {
            return;
        }
        if !self.replies.releasable() || !self.to_server.is_empty() {
            return;
        }
        let mut conn = self.server.take().expect("bound");
        let work = self.reset_all
            || self.forget_server_statements
            || !self.capture.is_empty()
            || (self.pin.is_some() && self.recheck_pin);
        if work && Box::pin(self.end_of_transaction(&mut conn)).await.is_err() {
            self.client.entry.set_target(None);
            conn.discard("internal query failed");
            return;
        }
        if self.pin.is_some() {
            self.server = Some(conn);
            return;
        }
        self.client.entry.set_target(None);
        let stats = &self.pool.stats;
        let took = self.bound_at.elapsed();
        stats.total_xact_count.fetch_add(1, Relaxed);
        stats.total_xact_time.fetch_add(took.as_micros() as u64, Relaxed);
        self.pool.latency.record(LatencyKind::Xact, took);
        tracing::trace!(client = self.id, "server released");
        conn.checkin();
        shrink_if_large(&mut self.rbuf);
        shrink_if_large(&mut self.to_client);
        shrink_if_large(&mut self.to_server);
    }

    /// Bookkeeping when a transaction ends: settings it changed, statements
    /// the server dropped, and whether pinned state is gone.
    async fn end_of_transaction(&mut self, conn: &mut ServerConn) -> Result<(), PoolError> {
        if std::mem::take(&mut self.reset_all) {
            self.params.reset_settings();
            conn.replace_settings(Vec::new());
            // The client's startup settings go back on at the next sync.
        }
        if std::mem::take(&mut self.forget_server_statements) {
            conn.statements.clear();
        }
        if !self.capture.is_empty() {
            let mut names = std::mem::take(&mut self.capture);
            names.retain(|n| !self.params.is_reported(n));
            names.sort();
            names.dedup();
            if !names.is_empty() {
                let row = self.internal_query(conn, &params::capture_sql(&names)).await?;
                for (i, name) in names.iter().enumerate() {
                    let value = row.get(i).and_then(|v| v.as_deref());
                    self.params.set_setting(name, value);
                    conn.set_setting(name, value);
                }
            }
        }
        if self.pin.is_some() && std::mem::take(&mut self.recheck_pin) && self.pin != Some(Pin::DynamicSetting) {
            let row = self.internal_query(conn, params::PIN_PROBE_SQL).await?;
            if row.first().and_then(|v| v.as_deref()) == Some("0") {
                tracing::info!(client = self.id, "session state released; client unpinned");
                self.pin = None;
            }
        }
        Ok(())
    }

    /// Runs pgferry's own query on an in-sync connection and returns the
    /// first row. ParameterStatus changes it causes are tracked and passed on.
    async fn internal_query(&mut self, conn: &mut ServerConn, sql: &[u8]) -> Result<Vec<Option<String>>, PoolError> {
        let mut q = BytesMut::with_capacity(sql.len() + 6);
        encode::query(&mut q, sql);
        let work = async {
            conn.wire.write_all(&q).await?;
            let mut row: Option<Vec<Option<String>>> = None;
            let mut error: Option<PoolError> = None;
            loop {
                let f = conn.wire.read_frame().await?;
                match f.tag {
                    backend::PARAMETER_STATUS => {
                        let (name, value) = backend::parameter_status(f.body())?;
                        conn.set_param(name, value);
                        if self.params.set(name, value) {
                            self.to_client.extend_from_slice(&f.bytes);
                        }
                    }
                    backend::NOTIFICATION_RESPONSE => self.to_client.extend_from_slice(&f.bytes),
                    backend::DATA_ROW if row.is_none() => row = Some(data_row(f.body())?),
                    backend::ERROR_RESPONSE => {
                        let e = backend::error_fields(f.body())?;
                        error = Some(PoolError::Server {
                            severity: e.severity.to_owned(),
                            code: e.code.to_owned(),
                            message: e.message.to_owned(),
                        });
                    }
                    backend::READY_FOR_QUERY => {
                        return match error {
                            Some(e) => Err(e),
                            None => Ok(row.unwrap_or_default()),
                        }
                    }
                    _ => {}
                }
            }
        };
        let r = tokio::time::timeout(INTERNAL_QUERY_TIMEOUT, work)
            .await
            .unwrap_or(Err(PoolError::Closed));
        if let Err(e) = &r {
            tracing::warn!(client = self.id, server = conn.id, error = %e, "internal query failed");
        }
        r
    }

    /// The client is gone: leave the server clean for the next client, or
    /// close it.
    async fn release_on_exit(&mut self) {
        self.client.entry.set_target(None);
        let Some(mut conn) = self.server.take() else {
            return;
        };
        if self.replies.pending() || !self.to_server.is_empty() {
            // A query is running: cancel it so that its locks go now, and
            // close the connection, which rolls the transaction back.
            let t = CancelTarget {
                addr: conn.addr.clone(),
                pid: conn.backend_pid,
                key: conn.backend_key,
                server: conn.id,
                server_created: conn.created,
            };
            let tls = self.shared.server_tls.clone();
            tokio::spawn(async move {
                let _ = crate::clients::send_cancel(&t, &tls).await;
            });
            tracing::info!(
                client = self.id,
                server = conn.id,
                "client left mid-query; server connection closed"
            );
            conn.discard("client disconnected during a query");
            return;
        }
        if !self.replies.at_boundary() {
            // Mid-pipeline (no Sync yet, or skipping to one): a Sync would
            // commit the group's implicit transaction. Closing rolls it back.
            conn.discard("client left in the middle of a pipeline");
            return;
        }
        let mut steps: Vec<&[u8]> = Vec::new();
        if self.replies.status() != TxStatus::Idle {
            steps.push(b"ROLLBACK");
        }
        let reset = self.pool.settings.server_reset_query.clone();
        if self.pin.is_some() {
            steps.push(b"DISCARD ALL");
        } else if self.mode == PoolMode::Session && !reset.is_empty() {
            steps.push(reset.as_bytes());
        }
        // What the reset did to the session, from the same scanner that
        // reads clients' SQL (a custom server_reset_query included).
        let mut forget_statements = false;
        let mut forget_settings = false;
        for sql in steps {
            let fx = sql::scan(sql);
            forget_statements |= fx.discard_all || fx.deallocate == Some(None);
            forget_settings |= fx.reset_all;
            if self.internal_query(&mut conn, sql).await.is_err() {
                conn.discard("reset after client left failed");
                return;
            }
        }
        if forget_statements {
            conn.statements.clear();
        }
        if forget_settings {
            conn.replace_settings(Vec::new());
        }
        conn.checkin();
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

/// Removes the client's statement `name` if it is still `stmt` (a later
/// request may have reused the name).
fn forget_if_same(statements: &mut HashMap<Box<[u8]>, Arc<Statement>>, name: &[u8], stmt: &Arc<Statement>) {
    if statements.get(name).is_some_and(|s| Arc::ptr_eq(s, stmt)) {
        statements.remove(name);
    }
}

/// `value` with every `from` replaced by `to`, or None if it has none.
fn replace_all(value: &[u8], from: &[u8], to: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = value;
    let mut found = false;
    while let Some(i) = rest.windows(from.len()).position(|w| w == from) {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(to);
        rest = &rest[i + from.len()..];
        found = true;
    }
    out.extend_from_slice(rest);
    found.then_some(out)
}

/// Gives back a buffer's memory after a large message has passed through.
fn shrink_if_large(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > 64 * 1024 {
        *buf = BytesMut::new();
    }
}

/// Text values of a DataRow.
fn data_row(body: &[u8]) -> Result<Vec<Option<String>>, ProtocolError> {
    let mut r = pgferry_protocol::frame::Reader::new(body, "DataRow");
    let n = r.i16()?;
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = r.i32()?;
        if len < 0 {
            out.push(None);
        } else {
            out.push(Some(String::from_utf8_lossy(r.bytes(len as usize)?).into_owned()));
        }
    }
    Ok(out)
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("peer", &self.client.entry.info.peer)
            .finish()
    }
}
