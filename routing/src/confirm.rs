//! Confirming that a new leader accepts writes before any are sent there.
//!
//! Patroni takes the leader key 140–350 ms before promotion finishes
//! (reference, pitfall 1), so the key alone is not enough: a control
//! connection polls `pg_is_in_recovery()` until it is false. Every step has
//! a client-side timeout: a primary waiting on a lost synchronous standby
//! ignores statement_timeout (pitfall 7).

use pgferry_pool::NodeAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How to log in for checks.
#[derive(Clone)]
pub struct CheckLogin {
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    /// TLS for the control connection (None: plaintext).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub ssl_mode: tokio_postgres::config::SslMode,
}

impl std::fmt::Debug for CheckLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CheckLogin({:?}@{:?}, <redacted>)", self.user, self.dbname)
    }
}

const STEP_TIMEOUT: Duration = Duration::from_secs(2);
const POLL_EVERY: Duration = Duration::from_millis(25);

/// Polls `addr` until it is out of recovery, for at most `deadline`.
/// Returns how long that took, or why it gave up.
pub async fn wait_writable(addr: &NodeAddr, login: &CheckLogin, deadline: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    let mut last_err = String::from("not tried");
    while start.elapsed() < deadline {
        match tokio::time::timeout(STEP_TIMEOUT, connect(addr, login)).await {
            Ok(Ok(client)) => loop {
                let q = tokio::time::timeout(STEP_TIMEOUT, client.query_one("SELECT pg_is_in_recovery()", &[])).await;
                match q {
                    Ok(Ok(row)) if !row.get::<_, bool>(0) => return Ok(start.elapsed()),
                    Ok(Ok(_)) => last_err = "still in recovery".into(),
                    Ok(Err(e)) => {
                        last_err = e.to_string();
                        break;
                    }
                    Err(_) => {
                        last_err = "check timed out".into();
                        break;
                    }
                }
                if start.elapsed() >= deadline {
                    break;
                }
                tokio::time::sleep(POLL_EVERY).await;
            },
            Ok(Err(e)) => last_err = e,
            Err(_) => last_err = "connect timed out".into(),
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    Err(last_err)
}

/// What a node says about itself, asked directly (while etcd cannot say).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub in_recovery: bool,
    /// A replica whose WAL receiver is streaming from a primary.
    pub streaming: bool,
}

/// One direct check of `addr`, bounded by the step timeouts.
pub async fn probe(addr: &NodeAddr, login: &CheckLogin) -> Result<Probe, String> {
    let client = tokio::time::timeout(STEP_TIMEOUT, connect(addr, login))
        .await
        .map_err(|_| "connect timed out".to_string())??;
    let sql = "SELECT pg_is_in_recovery(), \
               coalesce((SELECT status = 'streaming' FROM pg_stat_wal_receiver LIMIT 1), false)";
    let row = tokio::time::timeout(STEP_TIMEOUT, client.query_one(sql, &[]))
        .await
        .map_err(|_| "check timed out".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(Probe {
        in_recovery: row.get(0),
        streaming: row.get(1),
    })
}

async fn connect(addr: &NodeAddr, login: &CheckLogin) -> Result<tokio_postgres::Client, String> {
    connect_as(addr, login, "pgferry leader check").await
}

/// A control connection to `addr` (its connection task spawned).
pub async fn connect_as(addr: &NodeAddr, login: &CheckLogin, app: &str) -> Result<tokio_postgres::Client, String> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&addr.host)
        .port(addr.port)
        .user(&login.user)
        .dbname(&login.dbname)
        .application_name(app)
        .connect_timeout(STEP_TIMEOUT)
        .ssl_mode(login.ssl_mode);
    if let Some(p) = &login.password {
        cfg.password(p);
    }
    macro_rules! spawn_conn {
        ($r:expr) => {{
            let (client, conn) = $r.map_err(|e| error_chain(&e))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(client)
        }};
    }
    match &login.tls {
        Some(tls) => spawn_conn!(
            cfg.connect(tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone()))
                .await
        ),
        None => spawn_conn!(cfg.connect(tokio_postgres::NoTls).await),
    }
}

/// An error with its sources ("error performing TLS handshake: ..."): the
/// outer message alone does not say what went wrong.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}
