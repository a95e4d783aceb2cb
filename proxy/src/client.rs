//! One client connection from accept to close: startup, authentication,
//! login, then the session.
//!
//! The task's own future stays tiny: login runs in a boxed future that is
//! freed once it completes, and the session it produces is boxed too, so a
//! connected client costs the session's state and little else.

use crate::auth::authenticate;
use crate::clientio::ClientIo;
use crate::error::ClientError;
use crate::handshake::{handshake, Handshake};
use crate::params::ClientParams;
use crate::session::{Session, SessionInit};
use crate::shared::Shared;
use bytes::BytesMut;
use pgferry_protocol::backend::TxStatus;
use pgferry_protocol::encode::{self, Severity};
use pgferry_protocol::{sqlstate, startup::parse_options};
use pgferry_routing::Role;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::Instrument;

type SessionFuture = Pin<Box<dyn Future<Output = Result<(), ClientError>> + Send>>;

pub async fn serve(stream: TcpStream, peer: SocketAddr, role: Role, shared: Arc<Shared>) {
    let id = shared.next_client_id.fetch_add(1, Relaxed);
    let span = tracing::info_span!("client", id, %peer, port = role.as_str());
    async move {
        let r = match Box::pin(start(stream, id, peer, role, shared)).await {
            Ok(Some(session)) => session.await,
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        match &r {
            Ok(()) => tracing::debug!("client closed"),
            Err(ClientError::Disconnected) => tracing::debug!("client disconnected"),
            Err(e @ ClientError::Auth { .. }) => tracing::warn!(error = %e, "login failed"),
            Err(e) => tracing::info!(error = %e, "client closed with error"),
        }
    }
    .instrument(span)
    .await
}

/// Runs the startup phase; returns the session to run, or None when the
/// connection was a cancel request.
async fn start(
    stream: TcpStream,
    id: u64,
    peer: SocketAddr,
    role: Role,
    shared: Arc<Shared>,
) -> Result<Option<SessionFuture>, ClientError> {
    let mut io = ClientIo::new(stream);
    let timeout = shared.config.limits.client_login_timeout;
    let login = tokio::time::timeout(timeout, login(&mut io, role, &shared))
        .await
        .unwrap_or(Err(ClientError::LoginTimeout));
    let login = match login {
        Ok(Some(l)) => l,
        Ok(None) => return Ok(None),
        Err(e) => {
            if let Some((code, msg)) = e.to_client() {
                io.wbuf.clear();
                encode::error_response(&mut io.wbuf, Severity::Fatal, &code, &msg);
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), io.stream.write_all(&io.wbuf)).await;
            }
            return Err(e);
        }
    };
    let cancel = shared.cancels.register();
    encode::backend_key_data(&mut io.wbuf, cancel.entry.pid, cancel.entry.key);
    encode::ready_for_query(&mut io.wbuf, TxStatus::Idle);
    io.flush().await?;
    tracing::info!(user = %login.user, db = %login.database, node = %login.route.member.addr, "client logged in");
    let pool = login.pool.clone();
    pool.stats.cl_active.fetch_add(1, Relaxed);
    let (rd, wr) = io.stream.into_split();
    // Usually empty by now: do not keep the login buffer's capacity.
    let rbuf = if io.rbuf.is_empty() { BytesMut::new() } else { io.rbuf };
    let init = SessionInit {
        id,
        peer,
        rd,
        wr,
        rbuf,
        pool: login.pool,
        route: login.route,
        params: login.params,
        cancel,
    };
    let session = Session::new(shared, init);
    Ok(Some(Box::pin(async move {
        let r = session.run().await;
        pool.stats.cl_active.fetch_sub(1, Relaxed);
        r
    })))
}

struct Login {
    user: String,
    database: String,
    pool: Arc<pgferry_pool::Pool>,
    route: pgferry_routing::Route,
    params: ClientParams,
}
/// Startup and authentication. Returns None for a served cancel request.
async fn login(io: &mut ClientIo, role: Role, shared: &Shared) -> Result<Option<Login>, ClientError> {
    let params = match handshake(io).await? {
        Handshake::Cancel { pid, key } => {
            let done = shared.cancels.cancel(pid, key).await;
            tracing::info!(forwarded = done, "cancel request");
            return Ok(None);
        }
        Handshake::Startup(p) => p,
    };
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
    if !shared.config.pool.auto_database && shared.config.database(&database).is_none() {
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

    let auth = authenticate(io, &user, shared).await?;

    let route = shared.router.route(role).ok_or_else(|| {
        ClientError::refused(
            sqlstate::CANNOT_CONNECT_NOW,
            format!("no server is available for the {} port", role.as_str()),
        )
    })?;
    let pool = shared.pool(&database, &user, &route.member.addr);
    if let Some((secret, client_key)) = &auth.scram {
        pool.credentials()
            .learn_scram_keys(&secret.salt, secret.iterations, *client_key, secret.server_key);
    }
    let base = pool.startup_params().await?;
    let client_params = ClientParams::new(base, &startup);
    for (k, v) in client_params.reported() {
        encode::parameter_status(&mut io.wbuf, k, v);
    }
    Ok(Some(Login {
        user,
        database,
        pool,
        route,
        params: client_params,
    }))
}
