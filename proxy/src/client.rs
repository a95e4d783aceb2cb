//! One client connection from accept to close: startup, authentication,
//! login, then the session.
//!
//! The task's own future stays tiny: login runs in a boxed future that is
//! freed once it completes, and the session it produces is boxed too, so a
//! connected client costs the session's state and little else.

use crate::auth::{authenticate, Attempt};
use crate::clientio::ClientIo;
use crate::clients::ClientInfo;
use crate::error::ClientError;
use crate::handshake::{handshake, Handshake};
use crate::params::ClientParams;
use crate::pending::PendingLogin;
use crate::session::{Exit, Session, SessionInit};
use crate::shared::{AuthState, Observability, Settings, Shared};
use bytes::BytesMut;
use pgferry_config::{Access, ClientTls, HbaMethod};
use pgferry_protocol::backend::TxStatus;
use pgferry_protocol::encode::{self, Severity};
use pgferry_protocol::{sqlstate, startup::parse_options};
use pgferry_routing::Role;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

type ConsoleFuture = Pin<Box<dyn Future<Output = Result<(), ClientError>> + Send>>;

/// What a finished startup leads to.
enum Begun {
    Session(Box<Session>),
    Console(ConsoleFuture),
}

/// The client's task: its whole life inside its tracing span. `slot` is
/// the client's max_client_conn place, freed when the task ends.
///
/// The body is an `async move` block, not an `async fn`: an async fn keeps
/// each by-value argument twice (the argument and the body's binding),
/// while a block uses its captures in place, and this future lives as long
/// as the client (bytes per idle client).
pub fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    role: Role,
    shared: Arc<Shared>,
    pending: PendingLogin,
    slot: OwnedSemaphorePermit,
) -> impl Future<Output = ()> + Send {
    let id = shared.next_client_id.fetch_add(1, Relaxed);
    async move {
        // The span (client id, address, port) prefixes the login's log
        // lines. The session does not run inside it: entering a span on
        // every poll, and an open span per idle client in the subscriber's
        // registry, cost CPU per request and memory per client; the
        // session's own lines carry client = id instead.
        let span = || tracing::info_span!("client", id, %peer, port = role.as_str());
        // Login runs in its own box, freed once it completes.
        let started = Box::pin(start(stream, id, peer, role, shared.clone(), pending))
            .instrument(span())
            .await;
        let r = match started {
            Ok(Some(Begun::Session(session))) => return run_session(session, slot).await,
            Ok(Some(Begun::Console(console))) => console.await,
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        if matches!(r, Err(ClientError::Auth { .. })) {
            shared.obs.counters.auth_failures.fetch_add(1, Relaxed);
        }
        log_close(&span(), &r);
        drop(slot);
    }
}

/// A logged-in client's session, until it parks (`park.rs`) or leaves; an
/// unparked client's new task runs the rest of it here too.
pub async fn run_session(session: Box<Session>, slot: OwnedSemaphorePermit) {
    let (id, peer, role) = session.who();
    // In place, not boxed: the task ends when the session parks, so a box
    // would free nothing sooner, and would cost an allocation per session
    // and one more indirection on every wake-up.
    let r = match session.run().await {
        Exit::Closed(r) => r,
        Exit::Parked(p) => return crate::park::park(p, slot),
    };
    log_close(&tracing::info_span!("client", id, %peer, port = role.as_str()), &r);
    drop(slot);
}

/// The client's closing line, in its span.
fn log_close(span: &tracing::Span, r: &Result<(), ClientError>) {
    let _in = span.enter();
    match r {
        Ok(()) => tracing::debug!("client closed"),
        Err(ClientError::Disconnected) => tracing::debug!("client disconnected"),
        Err(e @ ClientError::Auth { .. }) => tracing::warn!(error = %e, "login failed"),
        Err(e) => tracing::info!(error = %e, "client closed with error"),
    }
}

/// Runs the startup phase; returns the session to run, or None when the
/// connection was a cancel request.
async fn start(
    stream: TcpStream,
    id: u64,
    peer: SocketAddr,
    role: Role,
    shared: Arc<Shared>,
    pending: PendingLogin,
) -> Result<Option<Begun>, ClientError> {
    let mut io = ClientIo::new(stream);
    let timeout = shared.settings.config().limits.client_login_timeout;
    // 0 means no timeout, as in PgBouncer (a zero deadline would refuse
    // every login, the console's included).
    let login = if timeout.is_zero() {
        login(&mut io, peer, role, &shared).await
    } else {
        tokio::time::timeout(timeout, login(&mut io, peer, role, &shared))
            .await
            .unwrap_or(Err(ClientError::LoginTimeout))
    };
    drop(pending);
    let login = match login {
        Ok(Some(Started::Session(l))) => l,
        Ok(Some(Started::Console { user, admin })) => {
            // The console's own startup reply: what psql needs to show a prompt.
            for (k, v) in [
                ("server_version", "15.0 (pgferry)"),
                ("client_encoding", "UTF8"),
                ("server_encoding", "UTF8"),
                ("DateStyle", "ISO"),
                ("standard_conforming_strings", "on"),
                ("integer_datetimes", "on"),
            ] {
                encode::parameter_status(&mut io.wbuf, k, v);
            }
            encode::backend_key_data(&mut io.wbuf, rand::random(), rand::random());
            encode::ready_for_query(&mut io.wbuf, TxStatus::Idle);
            io.flush().await?;
            return Ok(Some(Begun::Console(Box::pin(crate::admin::run(
                io, user, admin, shared,
            )))));
        }
        Ok(None) => return Ok(None),
        Err(e) => {
            if let Some((code, msg)) = e.to_client() {
                io.wbuf.clear();
                encode::error_response(&mut io.wbuf, Severity::Fatal, &code, &msg);
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), io.flush()).await;
            }
            return Err(e);
        }
    };
    let (tls, client_cert) = (login.tls.is_some(), login.tls.as_ref().is_some_and(|t| t.0));
    let client = crate::memory::long_lived(|| {
        shared.clients.register(ClientInfo {
            id,
            application_name: login.params.get("application_name").unwrap_or_default().into(),
            user: login.user.as_str().into(),
            database: login.database.as_str().into(),
            peer,
            port: role,
            connected: std::time::SystemTime::now(),
            tls: login.tls.map(|t| t.1).unwrap_or_default().into(),
        })
    });
    encode::backend_key_data(&mut io.wbuf, client.entry.pid, client.entry.key);
    encode::ready_for_query(&mut io.wbuf, TxStatus::Idle);
    io.flush().await?;
    tracing::info!(user = %login.user, db = %login.database, node = %login.route.member.addr, tls, client_cert, "client logged in");
    let (rd, wr) = io.stream.split();
    // Usually empty by now: do not keep the login buffer's capacity.
    let rbuf = if io.rbuf.is_empty() { BytesMut::new() } else { io.rbuf };
    let init = SessionInit {
        rd,
        wr,
        rbuf,
        pool: login.pool,
        route: login.route,
        params: login.params,
        client,
        read_only: login.read_only,
        user_permit: login.user_permit,
    };
    // The session lives in its own box, held once by `run`'s future (see
    // `Session::run`), and that future in another: about 1 KB per idle
    // client together (loadtest/idle-heaptrack.sh), given back when the
    // client parks.
    Ok(Some(Begun::Session(Box::new(Session::new(
        shared.session.clone(),
        init,
    )))))
}

struct Login {
    user: String,
    database: String,
    pool: Arc<pgferry_pool::Pool>,
    route: pgferry_routing::Route,
    params: ClientParams,
    read_only: bool,
    user_permit: Option<OwnedSemaphorePermit>,
    /// On TLS: whether a client certificate was presented, and the
    /// version and cipher suite.
    tls: Option<(bool, String)>,
}
/// Startup and authentication. Returns None for a served cancel request.
/// What a successful startup leads to.
enum Started {
    Session(Login),
    /// The admin console; `admin` is false for a stats-only user.
    Console {
        user: String,
        admin: bool,
    },
}

async fn login(
    io: &mut ClientIo,
    peer: SocketAddr,
    role: Role,
    shared: &Shared,
) -> Result<Option<Started>, ClientError> {
    let (settings, counters) = (&*shared.settings, &shared.obs.counters);
    let (params, tls) = match handshake(io, &shared.tls).await? {
        Handshake::Cancel { pid, key } => {
            // Accepted with or without TLS: libpq sends cancels on a new,
            // plain connection whatever the main one uses.
            let done = shared.clients.cancel(pid, key, &shared.pools.server_tls).await;
            // One line per cancel at INFO would let a cancel flood fill the
            // log: counted here, summed up once per stats_period (lib.rs).
            counters.cancel_requests.fetch_add(1, Relaxed);
            if done {
                counters.cancels_forwarded.fetch_add(1, Relaxed);
            }
            tracing::debug!(forwarded = done, "cancel request");
            return Ok(None);
        }
        Handshake::Startup { params, tls } => (params, tls),
    };
    if tls.is_some() {
        counters.tls_handshakes.fetch_add(1, Relaxed);
    }
    if tls.is_none() && shared.tls.mode() == ClientTls::Require {
        counters.auth_failures_tls.fetch_add(1, Relaxed);
        return Err(ClientError::refused(
            sqlstate::INVALID_AUTHORIZATION,
            "pgferry requires TLS: connect with sslmode=require (or verify-ca / verify-full)",
        ));
    }
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let user = get("user").filter(|u| !u.is_empty()).ok_or_else(|| {
        ClientError::refused(
            sqlstate::INVALID_AUTHORIZATION,
            "no PostgreSQL user name specified in startup packet",
        )
    })?;
    let user = user.to_owned();
    let database = get("database").filter(|d| !d.is_empty()).unwrap_or(&user).to_owned();
    if let Some(r) = get("replication") {
        if !matches!(r.to_ascii_lowercase().as_str(), "false" | "off" | "no" | "0") {
            return Err(ClientError::refused(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "replication connections are not supported by pgferry",
            ));
        }
    }
    if crate::admin::is_console(&database) {
        return console_login(io, peer, tls.as_ref(), &user, &database, shared).await;
    }
    if !settings.config().pool.auto_database && settings.config().database(&database).is_none() {
        return Err(ClientError::refused(
            sqlstate::INVALID_CATALOG_NAME,
            format!("no such database: {database}"),
        ));
    }
    let mut startup: Vec<(String, String)> = Vec::new();
    for (k, v) in &params {
        match k.as_str() {
            "user" | "database" | "replication" => {}
            "options" => startup.extend(parse_options(v)?),
            _ => startup.push((k.clone(), v.clone())),
        }
    }
    if startup
        .iter()
        .any(|(k, v)| k == "application_name" && v.starts_with("citus_internal"))
    {
        return Err(ClientError::refused(
            sqlstate::INSUFFICIENT_PRIVILEGE,
            "application_name prefix citus_internal is reserved",
        ));
    }

    let access = settings.config().user(&user).map(|u| u.access).unwrap_or_default();
    if access == Access::ReadOnlyPort && role == Role::ReadWrite {
        return Err(ClientError::refused(
            sqlstate::INSUFFICIENT_PRIVILEGE,
            format!("user \"{user}\" may only connect to pgferry's read-only port"),
        ));
    }
    // Read-only on both ports: the read-only port may fall back to the
    // primary. The pool's connections log in read-only; a client asking for
    // read-write in its startup packet would have pgferry's parameter sync
    // SET it on the server, so its value is overridden here.
    let read_only = access == Access::ReadOnly;
    if read_only {
        startup.retain(|(k, _)| !k.eq_ignore_ascii_case("default_transaction_read_only"));
        startup.push(("default_transaction_read_only".into(), "on".into()));
    }

    let method = match hba_method(settings, &shared.obs, peer, tls.is_some(), &database, &user) {
        Ok(m) => m,
        Err(e) => return Err(failed_login(&shared.auth, &shared.obs, peer, &user, e).await),
    };
    // During a failover there is briefly no leader: wait for one (bounded)
    // rather than fail the login.
    let route = shared
        .router
        .route_wait(role, settings.failover_hold())
        .await
        .ok_or_else(|| {
            ClientError::refused(
                sqlstate::CANNOT_CONNECT_NOW,
                format!("no server is available for the {} port", role.as_str()),
            )
        })?;
    let attempt = Attempt {
        user: &user,
        database: &database,
        node: Some(&route.member.addr),
        tls: tls.as_ref(),
    };
    let auth = match authenticate(io, &attempt, method, settings, &shared.auth).await {
        Ok(a) => a,
        Err(e @ ClientError::Auth { .. }) => return Err(failed_login(&shared.auth, &shared.obs, peer, &user, e).await),
        Err(e) => return Err(e),
    };
    let user_permit = shared.auth.user_client_permit(&settings.config(), &user)?;
    let pool = shared.pools.login_pool(&database, &user, &route.member.addr, role)?;
    if let Some((secret, client_key)) = &auth.scram {
        pool.credentials()
            .learn_scram_keys(&secret.salt, secret.iterations, *client_key, secret.server_key);
    }
    let base = match pool.startup_params().await {
        Ok(b) => b,
        Err(e) => {
            // E.g. a database that does not exist: its pool goes now.
            shared.pools.forget_if_unused(pool);
            return Err(e.into());
        }
    };
    // Kept for the client's life, parked or not: in the slab (memory.rs).
    let client_params = crate::memory::long_lived(|| ClientParams::new(base, &startup));
    for (k, v) in client_params.reported() {
        encode::parameter_status(&mut io.wbuf, k, v);
    }
    Ok(Some(Started::Session(Login {
        user,
        database,
        pool,
        route,
        params: client_params,
        read_only,
        user_permit,
        tls: tls.map(|t| (t.client_cert, t.describe)),
    })))
}

/// Authenticates an admin-console user: only users named in admin_users or
/// stats_users, with the method the hba rules give, against the users file.
async fn console_login(
    io: &mut ClientIo,
    peer: SocketAddr,
    tls: Option<&crate::handshake::TlsInfo>,
    user: &str,
    database: &str,
    shared: &Shared,
) -> Result<Option<Started>, ClientError> {
    let auth = &shared.settings.config().auth;
    let admin = auth.admin_users.iter().any(|u| u == user);
    if !admin && !auth.stats_users.iter().any(|u| u == user) {
        return Err(ClientError::refused(
            sqlstate::INVALID_AUTHORIZATION,
            format!("user \"{user}\" may not use the admin console (not in admin_users or stats_users)"),
        ));
    }
    let method = match hba_method(&shared.settings, &shared.obs, peer, tls.is_some(), database, user) {
        Ok(m) => m,
        Err(e) => return Err(failed_login(&shared.auth, &shared.obs, peer, user, e).await),
    };
    // Console users come from the users file; auth_query is not asked.
    let attempt = Attempt {
        user,
        database,
        node: None,
        tls,
    };
    match authenticate(io, &attempt, method, &shared.settings, &shared.auth).await {
        Ok(_) => {}
        Err(e @ ClientError::Auth { .. }) => return Err(failed_login(&shared.auth, &shared.obs, peer, user, e).await),
        Err(e) => return Err(e),
    }
    Ok(Some(Started::Console {
        user: user.to_owned(),
        admin,
    }))
}

/// The authentication method for this client: the first matching hba rule,
/// or `auth.method` when there are none. No match, or `reject`, refuses the
/// login as pg_hba.conf does (and counts as a failed login).
fn hba_method(
    settings: &Settings,
    obs: &Observability,
    peer: SocketAddr,
    tls: bool,
    database: &str,
    user: &str,
) -> Result<HbaMethod, ClientError> {
    let rules = &settings.config().hba;
    if rules.is_empty() {
        return Ok(settings.config().auth.method);
    }
    let method = rules
        .iter()
        .find(|r| r.matches(peer.ip(), tls, database, user))
        .map(|r| r.method);
    match method {
        Some(HbaMethod::Reject) | None => {
            let enc = if tls { "TLS" } else { "no encryption" };
            let how = if method.is_some() {
                "rejects"
            } else {
                "has no entry for"
            };
            let msg = format!(
                "pgferry hba {how} host \"{}\", user \"{user}\", database \"{database}\", {enc}",
                peer.ip()
            );
            tracing::warn!(user, reason = %msg, "login refused");
            obs.counters.auth_failures_hba.fetch_add(1, Relaxed);
            Err(ClientError::refused(sqlstate::INVALID_AUTHORIZATION, msg))
        }
        Some(m) => Ok(m),
    }
}

/// Counts a failed login of `user` from `peer` and, once that pair has
/// failed too often (see `throttle.rs`), holds the answer back for
/// `auth_failure_delay`: guessing slows down while nobody is refused.
/// Returns `e`, to be sent to the client after the wait.
async fn failed_login(
    auth: &AuthState,
    obs: &Observability,
    peer: SocketAddr,
    user: &str,
    e: ClientError,
) -> ClientError {
    let delay = auth.throttle.record_failure(peer.ip(), user);
    if !delay.is_zero() {
        obs.counters.auth_failures_delayed.fetch_add(1, Relaxed);
        tracing::debug!(user, ?delay, "failed login answered late");
        tokio::time::sleep(delay).await;
    }
    e
}
