//! The admin console: the virtual database `pgbouncer` (alias `pgferry`) on
//! either port, for users in `admin_users` or `stats_users`, on the simple
//! query protocol. Commands and column names follow PgBouncer's (1.18, as
//! Debian ships it) so that existing tools read them unchanged.
//!
//! Implemented: SHOW HELP, VERSION, POOLS, STATS, STATS_TOTALS,
//! STATS_AVERAGES, DATABASES, USERS, CONFIG, LISTS, TOPOLOGY; PAUSE [db],
//! RESUME [db]. The other
//! PgBouncer commands are recognised and answered with 0A000 until they
//! exist; anything else is a syntax error (42601). A stats user gets 42501
//! for admin commands.

use crate::clientio::ClientIo;
use crate::error::ClientError;
use crate::shared::Shared;
use bytes::BytesMut;
use pgferry_pool::Pool;
use pgferry_protocol::backend::TxStatus;
use pgferry_protocol::encode::{self, Severity};
use pgferry_protocol::{frontend, sqlstate};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Database names that open the console.
pub fn is_console(database: &str) -> bool {
    matches!(database, "pgbouncer" | "pgferry")
}

/// Commands that change state: admin users only.
const ADMIN_COMMANDS: &[&str] = &[
    "PAUSE",
    "RESUME",
    "RELOAD",
    "RECONNECT",
    "KILL",
    "KILL_CLIENT",
    "WAIT_CLOSE",
    "SHUTDOWN",
    "SET",
    "SUSPEND",
    "DISABLE",
    "ENABLE",
];

/// PgBouncer SHOW commands pgferry does not answer yet.
const SHOW_NOT_YET: &[&str] = &[
    "CLIENTS",
    "SERVERS",
    "SOCKETS",
    "ACTIVE_SOCKETS",
    "FDS",
    "DNS_HOSTS",
    "DNS_ZONES",
    "MEM",
    "STATE",
    "PEERS",
    "PEER_POOLS",
    "PREPARED_STATEMENTS",
    "LATENCY",
];

const HELP: &str =
    "\n\tSHOW HELP|CONFIG|DATABASES|POOLS|STATS|STATS_TOTALS|STATS_AVERAGES|USERS|LISTS|VERSION|TOPOLOGY\n\
\tPAUSE [<db>], RESUME [<db>]\n\
\tnot yet: SHOW CLIENTS|SERVERS|PREPARED_STATEMENTS|LATENCY, RELOAD, RECONNECT, KILL, KILL_CLIENT, \
WAIT_CLOSE, SHUTDOWN, SET";

/// Runs a console session after login until the client leaves.
pub async fn run(mut io: ClientIo, user: String, admin: bool, shared: Arc<Shared>) -> Result<(), ClientError> {
    tracing::info!(user = %user, admin, "admin console session");
    loop {
        let f = match io.read_frame(1 << 20).await {
            Ok(f) => f,
            Err(ClientError::Disconnected) => return Ok(()),
            Err(e) => return Err(e),
        };
        match f.tag {
            frontend::TERMINATE => return Ok(()),
            frontend::QUERY => {
                let sql = String::from_utf8_lossy(frontend::query(f.body())?).into_owned();
                if let Some(db) = pause_target(&sql).filter(|_| admin) {
                    pause(&mut io.wbuf, db.as_deref(), &shared).await;
                } else {
                    answer(&mut io.wbuf, &sql, admin, &shared);
                }
                encode::ready_for_query(&mut io.wbuf, TxStatus::Idle);
            }
            frontend::SYNC => encode::ready_for_query(&mut io.wbuf, TxStatus::Idle),
            frontend::FLUSH => {}
            _ => {
                // The extended protocol is not spoken here (as in PgBouncer):
                // refuse, then skip to Sync.
                encode::error_response(
                    &mut io.wbuf,
                    Severity::Error,
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "the admin console speaks the simple query protocol only",
                );
                loop {
                    let g = io.read_frame(1 << 20).await?;
                    if g.tag == frontend::SYNC {
                        encode::ready_for_query(&mut io.wbuf, TxStatus::Idle);
                        break;
                    }
                }
            }
        }
        io.flush().await?;
    }
}

/// `PAUSE` or `PAUSE db` alone in a query string: Some(target).
fn pause_target(sql: &str) -> Option<Option<String>> {
    let words: Vec<&str> = sql.trim().trim_end_matches(';').split_whitespace().collect();
    match words.as_slice() {
        [w] if w.eq_ignore_ascii_case("PAUSE") => Some(None),
        [w, db] if w.eq_ignore_ascii_case("PAUSE") => Some(Some(db.trim_matches('"').to_owned())),
        _ => None,
    }
}

/// PAUSE: new transactions of `db` (or all) wait from now on; returns once
/// the transactions in flight there have finished, as PgBouncer's does.
async fn pause(out: &mut BytesMut, db: Option<&str>, shared: &Shared) {
    shared.pause(db);
    tracing::info!(db = db.unwrap_or("*"), "PAUSE: holding new transactions");
    loop {
        let busy: usize = shared
            .pools()
            .iter()
            .filter(|p| db.is_none_or(|d| p.key.database == d))
            .map(|p| p.stats.sv_active.load(Relaxed))
            .sum();
        if busy == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    encode::command_complete(out, "PAUSE");
}

/// Answers one query string (possibly several `;`-separated commands).
fn answer(out: &mut BytesMut, sql: &str, admin: bool, shared: &Shared) {
    let commands: Vec<&str> = sql.split(';').map(str::trim).filter(|c| !c.is_empty()).collect();
    if commands.is_empty() {
        encode::empty_query_response(out);
        return;
    }
    for c in commands {
        if let Err((code, msg)) = command(out, c, admin, shared) {
            encode::error_response(out, Severity::Error, code, &msg);
            return;
        }
    }
}

type Refusal = (&'static str, String);

fn command(out: &mut BytesMut, text: &str, admin: bool, shared: &Shared) -> Result<(), Refusal> {
    let words: Vec<String> = text.split_whitespace().map(|w| w.to_ascii_uppercase()).collect();
    let syntax = || {
        (
            sqlstate::SYNTAX_ERROR,
            format!("invalid command '{text}', use SHOW HELP;"),
        )
    };
    match words.first().map(String::as_str) {
        Some("SHOW") => {
            let what = words.get(1).ok_or_else(syntax)?;
            if words.len() > 2 {
                return Err(syntax());
            }
            show(out, what, shared).ok_or_else(|| {
                if SHOW_NOT_YET.contains(&what.as_str()) {
                    (
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        format!("SHOW {what} is not implemented by pgferry yet"),
                    )
                } else {
                    syntax()
                }
            })
        }
        Some(w) if ADMIN_COMMANDS.contains(&w) => {
            if !admin {
                return Err((
                    sqlstate::INSUFFICIENT_PRIVILEGE,
                    "admin access needed: this user is in stats_users only".into(),
                ));
            }
            if w == "RESUME" {
                let db = text.split_whitespace().nth(1).map(|d| d.trim_matches('"'));
                if !shared.resume(db) {
                    return Err((
                        sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
                        "pooler is not paused".into(),
                    ));
                }
                tracing::info!(db = db.unwrap_or("*"), "RESUME");
                encode::command_complete(out, "RESUME");
                return Ok(());
            }
            if w == "PAUSE" {
                return Err(syntax());
            }
            Err((
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!("{w} is not implemented by pgferry yet"),
            ))
        }
        _ => Err(syntax()),
    }
}

/// A result set with text columns.
fn table(out: &mut BytesMut, columns: &[&str], rows: &[Vec<String>]) {
    encode::row_description_text(out, columns);
    for r in rows {
        let vals: Vec<Option<&str>> = r.iter().map(|v| Some(v.as_str())).collect();
        encode::data_row_text(out, &vals);
    }
    encode::command_complete(out, "SHOW");
}

fn show(out: &mut BytesMut, what: &str, shared: &Shared) -> Option<()> {
    let pools = sorted_pools(shared);
    match what {
        "HELP" => {
            encode::notice_response(out, "00000", &format!("Console usage{HELP}"));
            encode::command_complete(out, "SHOW");
        }
        "VERSION" => table(
            out,
            &["version"],
            &[vec![format!("pgferry {}", env!("CARGO_PKG_VERSION"))]],
        ),
        "POOLS" => {
            let rows: Vec<Vec<String>> = pools
                .iter()
                .map(|p| {
                    let s = &p.stats;
                    let n = |v: usize| v.to_string();
                    vec![
                        p.key.database.clone(),
                        p.key.user.clone(),
                        n(s.cl_active.load(Relaxed)),
                        n(s.cl_waiting.load(Relaxed)),
                        "0".into(),
                        "0".into(),
                        n(s.sv_active.load(Relaxed)),
                        "0".into(),
                        "0".into(),
                        n(p.idle_count()),
                        "0".into(),
                        "0".into(),
                        n(s.sv_login.load(Relaxed)),
                        "0".into(),
                        "0".into(),
                        p.settings.pool_mode.as_str().into(),
                    ]
                })
                .collect();
            table(
                out,
                &[
                    "database",
                    "user",
                    "cl_active",
                    "cl_waiting",
                    "cl_active_cancel_req",
                    "cl_waiting_cancel_req",
                    "sv_active",
                    "sv_active_cancel",
                    "sv_being_canceled",
                    "sv_idle",
                    "sv_used",
                    "sv_tested",
                    "sv_login",
                    "maxwait",
                    "maxwait_us",
                    "pool_mode",
                ],
                &rows,
            );
        }
        "STATS" => {
            let rows: Vec<Vec<String>> = per_database(&pools)
                .into_iter()
                .map(|(db, t)| {
                    let mut r = vec![db];
                    r.extend(t.iter().map(u64::to_string));
                    // Averages over pgferry's lifetime (PgBouncer's are per
                    // stats_period; pgferry has none yet).
                    r.extend(t.iter().map(|_| "0".to_string()));
                    r
                })
                .collect();
            table(
                out,
                &[
                    "database",
                    "total_xact_count",
                    "total_query_count",
                    "total_received",
                    "total_sent",
                    "total_xact_time",
                    "total_query_time",
                    "total_wait_time",
                    "avg_xact_count",
                    "avg_query_count",
                    "avg_recv",
                    "avg_sent",
                    "avg_xact_time",
                    "avg_query_time",
                    "avg_wait_time",
                ],
                &rows,
            );
        }
        "STATS_TOTALS" | "STATS_AVERAGES" => {
            let totals = what == "STATS_TOTALS";
            let rows: Vec<Vec<String>> = per_database(&pools)
                .into_iter()
                .map(|(db, t)| {
                    let mut r = vec![db];
                    r.extend(t.iter().map(|v| if totals { v.to_string() } else { "0".into() }));
                    r
                })
                .collect();
            table(
                out,
                &[
                    "database",
                    "xact_count",
                    "query_count",
                    "bytes_received",
                    "bytes_sent",
                    "xact_time",
                    "query_time",
                    "wait_time",
                ],
                &rows,
            );
        }
        "DATABASES" => {
            let c = &shared.config;
            let mut rows: Vec<Vec<String>> = Vec::new();
            let topo = shared.router.topology();
            let (host, port) = topo
                .primary
                .as_ref()
                .map(|p| (p.addr.host.clone(), p.addr.port.to_string()))
                .unwrap_or_default();
            for d in &c.databases {
                let s = c.pool_settings(&d.name, "");
                let current: usize = pools
                    .iter()
                    .filter(|p| p.key.database == d.name)
                    .map(|p| p.stats.sv_active.load(Relaxed) + p.idle_count())
                    .sum();
                rows.push(vec![
                    d.name.clone(),
                    host.clone(),
                    port.clone(),
                    s.server_dbname,
                    String::new(),
                    s.pool_size.to_string(),
                    s.min_pool_size.to_string(),
                    s.reserve_pool_size.to_string(),
                    s.pool_mode.as_str().into(),
                    s.max_db_connections.to_string(),
                    current.to_string(),
                    "0".into(),
                    "0".into(),
                ]);
            }
            table(
                out,
                &[
                    "name",
                    "host",
                    "port",
                    "database",
                    "force_user",
                    "pool_size",
                    "min_pool_size",
                    "reserve_pool",
                    "pool_mode",
                    "max_connections",
                    "current_connections",
                    "paused",
                    "disabled",
                ],
                &rows,
            );
        }
        "USERS" => {
            let c = &shared.config;
            let rows: Vec<Vec<String>> = c
                .users
                .iter()
                .map(|u| {
                    vec![
                        u.name.clone(),
                        u.pool_mode.map(|m| m.as_str().to_owned()).unwrap_or_default(),
                    ]
                })
                .collect();
            table(out, &["name", "pool_mode"], &rows);
        }
        "CONFIG" => {
            let c = &shared.config;
            let p = &c.pool;
            let l = &c.limits;
            let secs = |d: std::time::Duration| d.as_secs_f64().to_string();
            let rows: Vec<Vec<String>> = [
                ("listen_rw", c.listen.rw.to_string()),
                ("listen_ro", c.listen.ro.map(|a| a.to_string()).unwrap_or_default()),
                ("max_client_conn", l.max_client_conn.to_string()),
                ("client_login_timeout", secs(l.client_login_timeout)),
                ("client_idle_timeout", secs(l.client_idle_timeout)),
                ("idle_transaction_timeout", secs(l.idle_transaction_timeout)),
                ("max_message_size", l.max_message_size.to_string()),
                ("pool_mode", p.pool_mode.as_str().into()),
                ("default_pool_size", p.pool_size.to_string()),
                ("min_pool_size", p.min_pool_size.to_string()),
                ("reserve_pool_size", p.reserve_pool_size.to_string()),
                ("reserve_pool_timeout", secs(p.reserve_pool_timeout)),
                ("max_db_connections", p.max_db_connections.to_string()),
                ("max_user_connections", p.max_user_connections.to_string()),
                ("query_wait_timeout", secs(p.query_wait_timeout)),
                ("server_connect_timeout", secs(p.server_connect_timeout)),
                ("server_lifetime", secs(p.server_lifetime)),
                ("server_idle_timeout", secs(p.server_idle_timeout)),
                ("server_reset_query", p.server_reset_query.clone()),
                ("max_prepared_statements", p.max_prepared_statements.to_string()),
                ("admin_users", c.auth.admin_users.join(",")),
                ("stats_users", c.auth.stats_users.join(",")),
            ]
            .into_iter()
            .map(|(k, v)| vec![k.to_owned(), v, String::new(), "no".to_owned()])
            .collect();
            table(out, &["key", "value", "default", "changeable"], &rows);
        }
        "LISTS" => {
            let clients: usize = pools.iter().map(|p| p.stats.cl_active.load(Relaxed)).sum();
            let servers: usize = pools
                .iter()
                .map(|p| p.stats.sv_active.load(Relaxed) + p.idle_count())
                .sum();
            let free: usize = pools.iter().map(|p| p.idle_count()).sum();
            let n = |v: usize| v.to_string();
            let rows = vec![
                vec!["databases".into(), n(shared.config.databases.len())],
                vec!["users".into(), n(shared.config.users.len())],
                vec!["pools".into(), n(pools.len())],
                vec!["free_clients".into(), "0".into()],
                vec!["used_clients".into(), n(clients)],
                vec!["login_clients".into(), "0".into()],
                vec!["free_servers".into(), n(free)],
                vec!["used_servers".into(), n(servers)],
                vec!["dns_names".into(), "0".into()],
                vec!["dns_zones".into(), "0".into()],
                vec!["dns_queries".into(), "0".into()],
                vec!["dns_pending".into(), "0".into()],
            ];
            table(out, &["list", "items"], &rows);
        }
        "TOPOLOGY" => {
            let topo = shared.router.topology();
            let v = &topo.view;
            let since = v
                .since
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs().to_string())
                .unwrap_or_default();
            let mut rows: Vec<Vec<String>> = v
                .members
                .iter()
                .map(|m| {
                    vec![
                        "0".into(),
                        m.name.clone(),
                        m.addr.clone(),
                        m.role.clone(),
                        m.state.clone(),
                        m.lag.map(|l| l.to_string()).unwrap_or_default(),
                        (v.leader.as_deref() == Some(m.name.as_str()) && v.leader_confirmed).to_string(),
                        m.serving_reads.to_string(),
                        v.source.into(),
                        v.etcd_revision.to_string(),
                        since.clone(),
                    ]
                })
                .collect();
            for (g, leader, addr) in &v.workers {
                rows.push(vec![
                    g.to_string(),
                    leader.clone().unwrap_or_default(),
                    addr.clone().unwrap_or_default(),
                    "leader".into(),
                    String::new(),
                    String::new(),
                    "false".into(),
                    "false".into(),
                    v.source.into(),
                    v.etcd_revision.to_string(),
                    since.clone(),
                ]);
            }
            table(
                out,
                &[
                    "group",
                    "member",
                    "addr",
                    "role",
                    "state",
                    "lag_bytes",
                    "takes_writes",
                    "takes_reads",
                    "source",
                    "etcd_revision",
                    "since",
                ],
                &rows,
            );
        }
        _ => return None,
    }
    Some(())
}

fn sorted_pools(shared: &Shared) -> Vec<Arc<Pool>> {
    let mut pools = shared.pools();
    pools.sort_by(|a, b| {
        (&a.key.database, &a.key.user, a.key.read_only).cmp(&(&b.key.database, &b.key.user, b.key.read_only))
    });
    pools
}

/// Per database: xact count, query count, bytes in, bytes out, xact time,
/// query time, wait time (microseconds), summed over its pools.
fn per_database(pools: &[Arc<Pool>]) -> BTreeMap<String, [u64; 7]> {
    let mut m: BTreeMap<String, [u64; 7]> = BTreeMap::new();
    for p in pools {
        let s = &p.stats;
        let t = m.entry(p.key.database.clone()).or_default();
        for (i, v) in [
            &s.total_xact_count,
            &s.total_query_count,
            &s.total_received,
            &s.total_sent,
            &s.total_xact_time,
            &s.total_query_time,
            &s.total_wait_time,
        ]
        .iter()
        .enumerate()
        {
            t[i] += v.load(Relaxed);
        }
    }
    m
}
