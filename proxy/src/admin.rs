//! The admin console: the virtual database `pgbouncer` (alias `pgferry`) on
//! either port, for users in `admin_users` or `stats_users`, on the simple
//! query protocol. Commands and column names follow PgBouncer's (1.18, as
//! Debian ships it) so that existing tools read them unchanged.
//!
//! SHOW HELP, VERSION, POOLS, CLIENTS, SERVERS, STATS, STATS_TOTALS,
//! STATS_AVERAGES, DATABASES, USERS, CONFIG, LISTS; pgferry's own SHOW
//! TOPOLOGY, LATENCY, PREPARED_STATEMENTS; PAUSE [db], RESUME [db], RELOAD,
//! RECONNECT [db], KILL db, KILL_CLIENT id, WAIT_CLOSE [db], SHUTDOWN,
//! SET key = value. PgBouncer commands that have no meaning here (SUSPEND,
//! DISABLE, ENABLE, SHOW FDS, ...) get 0A000; anything else is a syntax
//! error (42601). A stats user gets 42501 for admin commands.

use crate::clientio::ClientIo;
use crate::error::ClientError;
use crate::shared::Shared;
use bytes::BytesMut;
use pgferry_pool::latency::Kind;
use pgferry_pool::Pool;
use pgferry_protocol::backend::TxStatus;
use pgferry_protocol::encode::{self, Severity};
use pgferry_protocol::{frontend, sqlstate};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

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

/// PgBouncer SHOW commands that have no meaning for pgferry (no online
/// restart by fd passing, no DNS cache, no peering).
const SHOW_NOT_HERE: &[&str] = &[
    "SOCKETS",
    "ACTIVE_SOCKETS",
    "FDS",
    "DNS_HOSTS",
    "DNS_ZONES",
    "MEM",
    "STATE",
    "PEERS",
    "PEER_POOLS",
];

const HELP: &str = "\n\tSHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION\n\
\tSHOW STATS|STATS_TOTALS|STATS_AVERAGES|LISTS\n\
\tSHOW TOPOLOGY|LATENCY|PREPARED_STATEMENTS (pgferry)\n\
\tSET key = arg\n\
\tRELOAD\n\
\tPAUSE [<db>]\n\
\tRESUME [<db>]\n\
\tKILL <db>\n\
\tKILL_CLIENT <id>\n\
\tRECONNECT [<db>]\n\
\tWAIT_CLOSE [<db>]\n\
\tSHUTDOWN";

/// How long PAUSE and WAIT_CLOSE wait at most (the console stays usable).
const WAIT_LIMIT: Duration = Duration::from_secs(600);

/// Runs a console session after login until the client leaves. Takes the
/// whole shared state: the console reads and operates every part of it.
pub async fn run(mut io: ClientIo, user: String, admin: bool, shared: Arc<Shared>) -> Result<(), ClientError> {
    tracing::info!(user = %user, admin, "admin console session");
    let mut drain = shared.lifecycle.drain_tx.subscribe();
    loop {
        // A console session between commands ends when pgferry shuts down,
        // like any idle client.
        let read = tokio::select! {
            r = io.read_frame(1 << 20) => r,
            _ = async { let _ = drain.wait_for(|d| *d).await; } => {
                encode::error_response(&mut io.wbuf, Severity::Fatal, sqlstate::ADMIN_SHUTDOWN, "pgferry is shutting down");
                let _ = tokio::time::timeout(Duration::from_secs(1), io.flush()).await;
                return Ok(());
            }
        };
        let f = match read {
            Ok(f) => f,
            Err(ClientError::Disconnected) => return Ok(()),
            Err(e) => return Err(e),
        };
        match f.tag {
            frontend::TERMINATE => return Ok(()),
            frontend::QUERY => {
                let sql = String::from_utf8_lossy(frontend::query(f.body())?).into_owned();
                answer(&mut io.wbuf, &sql, &user, admin, &shared).await;
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

/// Waits (polling, bounded) until `done` holds.
async fn wait_until(mut done: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while !done() {
        if start.elapsed() > WAIT_LIMIT {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Server connections in use in the pools of `db` (None: all).
fn busy(db: Option<&str>, pools: Vec<Arc<Pool>>) -> usize {
    pools
        .iter()
        .filter(|p| db.is_none_or(|d| p.key.database == d))
        .map(|p| p.stats.sv_active.load(Relaxed))
        .sum()
}

/// The commands of a query string: split at `;` outside single quotes
/// (`SET server_reset_query = 'RESET ALL; DISCARD PLANS'` is one command).
fn split_commands(sql: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in sql.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            ';' if !quoted => {
                out.push(&sql[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&sql[start..]);
    out.into_iter().map(str::trim).filter(|c| !c.is_empty()).collect()
}

/// Answers one query string (possibly several `;`-separated commands).
async fn answer(out: &mut BytesMut, sql: &str, user: &str, admin: bool, shared: &Shared) {
    let commands = split_commands(sql);
    if commands.is_empty() {
        encode::empty_query_response(out);
        return;
    }
    for c in commands {
        if let Err((code, msg)) = command(out, c, user, admin, shared).await {
            encode::error_response(out, Severity::Error, code, &msg);
            return;
        }
    }
}

type Refusal = (&'static str, String);

async fn command(out: &mut BytesMut, text: &str, user: &str, admin: bool, shared: &Shared) -> Result<(), Refusal> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let verb = words.first().map(|w| w.to_ascii_uppercase()).unwrap_or_default();
    let syntax = || {
        (
            sqlstate::SYNTAX_ERROR,
            format!("invalid command '{text}', use SHOW HELP;"),
        )
    };
    if verb == "SHOW" {
        let what = words.get(1).ok_or_else(syntax)?.to_ascii_uppercase();
        if words.len() > 2 {
            return Err(syntax());
        }
        return show(out, &what, shared).ok_or_else(|| {
            if SHOW_NOT_HERE.contains(&what.as_str()) {
                (
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    format!("SHOW {what} has no meaning in pgferry"),
                )
            } else {
                syntax()
            }
        });
    }
    if !ADMIN_COMMANDS.contains(&verb.as_str()) {
        return Err(syntax());
    }
    if !admin {
        return Err((
            sqlstate::INSUFFICIENT_PRIVILEGE,
            "admin access needed: this user is in stats_users only".into(),
        ));
    }
    // The optional or required argument: a database name or client id.
    let arg = words.get(1).map(|d| d.trim_matches('"'));
    let at_most = |n: usize| if words.len() > n { Err(syntax()) } else { Ok(()) };
    tracing::info!(user, command = text, "admin command");
    match verb.as_str() {
        "PAUSE" => {
            at_most(2)?;
            shared.lifecycle.pause(arg);
            tracing::info!(db = arg.unwrap_or("*"), "PAUSE: holding new transactions");
            // As PgBouncer's: returns once the transactions in flight there
            // (in pools a reload is replacing too) have finished, and closes
            // the server connections, so that PostgreSQL can be restarted.
            let all = || {
                let mut p = shared.pools.all();
                p.extend(shared.pools.retired_pools());
                p
            };
            if !wait_until(|| busy(arg, all()) == 0).await {
                return Err((
                    sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
                    "PAUSE: transactions still running after 10 minutes; new ones stay held until RESUME".into(),
                ));
            }
            let n = shared.pools.replace_pools(arg, "PAUSE", false);
            tracing::info!(db = arg.unwrap_or("*"), pools = n, "PAUSE: server connections closed");
        }
        "RESUME" => {
            at_most(2)?;
            if !shared.lifecycle.resume(arg) {
                return Err((
                    sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
                    "pooler is not paused".into(),
                ));
            }
            tracing::info!(db = arg.unwrap_or("*"), "RESUME");
        }
        "RELOAD" => {
            at_most(1)?;
            crate::reload(shared, "RELOAD").await.map_err(|e| {
                (
                    sqlstate::CONFIG_FILE_ERROR,
                    format!("reload refused, the running configuration stays: {e}"),
                )
            })?;
        }
        "RECONNECT" => {
            at_most(2)?;
            let n = shared.pools.replace_pools(arg, "RECONNECT", false);
            tracing::info!(
                db = arg.unwrap_or("*"),
                pools = n,
                "RECONNECT: server connections close as their transactions end"
            );
        }
        "WAIT_CLOSE" => {
            at_most(2)?;
            wait_until(|| busy(arg, shared.pools.retired_pools()) == 0).await;
        }
        "KILL" => {
            at_most(2)?;
            let db = arg.ok_or_else(syntax)?;
            // New clients of `db` wait until RESUME, as in PgBouncer.
            shared.lifecycle.pause(Some(db));
            let clients = shared.clients.kill(|c| *c.database == *db);
            let pools = shared.pools.replace_pools(Some(db), "KILL", true);
            tracing::warn!(
                db,
                clients,
                pools,
                "KILL: clients and server connections closed; db paused until RESUME"
            );
        }
        "KILL_CLIENT" => {
            at_most(2)?;
            let id: u64 = arg.and_then(|a| a.parse().ok()).ok_or_else(syntax)?;
            if shared.clients.kill(|c| c.id == id) == 0 {
                return Err((sqlstate::UNDEFINED_OBJECT, format!("no client with id {id}")));
            }
        }
        "SHUTDOWN" => {
            at_most(1)?;
            tracing::warn!("SHUTDOWN from the admin console: graceful shutdown");
            shared.lifecycle.stop_tx.send_replace(true);
        }
        "SET" => {
            // SET key = value, SET key TO value, SET key=value.
            let rest = text[3..].trim();
            let (key, value) = rest
                .split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .or_else(|| {
                    let (k, v) = rest.split_once(char::is_whitespace)?;
                    let v = v.trim();
                    let v = v.strip_prefix("TO ").or_else(|| v.strip_prefix("to "))?;
                    Some((k.trim(), v.trim()))
                })
                .ok_or_else(syntax)?;
            shared
                .settings
                .set(key, value, &shared.pools)
                .map_err(|e| (sqlstate::INVALID_PARAMETER_VALUE, e))?;
            tracing::info!(key, value, "SET");
        }
        other => {
            return Err((
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!("{other} has no meaning in pgferry"),
            ))
        }
    }
    shared.obs.event(format!("console ({user}): {text}"));
    encode::command_complete(out, &verb);
    Ok(())
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
    let pools = shared.pools.sorted();
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
            // maxwait: the longest a client of (database, user) has been
            // waiting for a server right now.
            let mut maxwait: BTreeMap<(String, String), Duration> = BTreeMap::new();
            for e in shared.clients.all() {
                if let Some(waited) = e.row().waiting {
                    let w = maxwait
                        .entry((e.info.database.to_string(), e.info.user.to_string()))
                        .or_default();
                    *w = (*w).max(waited);
                }
            }
            let rows: Vec<Vec<String>> = pools
                .iter()
                .map(|p| {
                    let s = &p.stats;
                    let n = |v: usize| v.to_string();
                    let wait = if s.cl_waiting.load(Relaxed) > 0 {
                        maxwait
                            .get(&(p.key.database.clone(), p.key.user.clone()))
                            .copied()
                            .unwrap_or_default()
                    } else {
                        Duration::ZERO
                    };
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
                        wait.as_secs().to_string(),
                        wait.subsec_micros().to_string(),
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
            let avgs = averages_per_database(&pools);
            let rows: Vec<Vec<String>> = per_database(&pools)
                .into_iter()
                .map(|(db, t)| {
                    let mut r = vec![db.clone()];
                    r.extend(t.iter().map(u64::to_string));
                    r.extend(avgs[&db].iter().map(u64::to_string));
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
            let rows: Vec<Vec<String>> = if what == "STATS_TOTALS" {
                per_database(&pools).into_iter()
            } else {
                averages_per_database(&pools).into_iter()
            }
            .map(|(db, t)| {
                let mut r = vec![db];
                r.extend(t.iter().map(u64::to_string));
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
            let c = &shared.settings.config();
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
                    u8::from(shared.lifecycle.is_paused(&d.name)).to_string(),
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
            let c = &shared.settings.config();
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
            let yes_no = |b: bool| if b { "yes" } else { "no" }.to_owned();
            let rows: Vec<Vec<String>> = crate::reload::settings(&shared.settings.config())
                .into_iter()
                .map(|r| vec![r.key.to_owned(), r.value, r.default, yes_no(r.changeable)])
                .collect();
            table(out, &["key", "value", "default", "changeable"], &rows);
        }
        "CLIENTS" => {
            let config = shared.settings.config();
            let rows: Vec<Vec<String>> = shared
                .clients
                .all()
                .iter()
                .map(|e| {
                    let c = &e.info;
                    let row = e.row();
                    let waiting = row.waiting.is_some();
                    let local = match c.port {
                        pgferry_routing::Role::ReadWrite => Some(config.listen.rw),
                        pgferry_routing::Role::ReadOnly => config.listen.ro,
                    };
                    let wait = row.waiting.unwrap_or_default();
                    vec![
                        "C".into(),
                        c.user.to_string(),
                        c.database.to_string(),
                        if waiting { "waiting" } else { "active" }.into(),
                        c.peer.ip().to_string(),
                        c.peer.port().to_string(),
                        local.map(|a| a.ip().to_string()).unwrap_or_default(),
                        local.map(|a| a.port().to_string()).unwrap_or_default(),
                        timestamp(c.connected),
                        timestamp(SystemTime::now() - row.request_age),
                        wait.as_secs().to_string(),
                        wait.subsec_micros().to_string(),
                        "0".into(),
                        c.id.to_string(),
                        row.server.map(|t| t.server.to_string()).unwrap_or_default(),
                        "0".into(),
                        c.tls.to_string(),
                        c.application_name.to_string(),
                    ]
                })
                .collect();
            table(out, CLIENT_COLUMNS, &rows);
        }
        "SERVERS" => {
            let now = std::time::Instant::now();
            let ago = |t: std::time::Instant| timestamp(SystemTime::now() - now.saturating_duration_since(t));
            let mut rows: Vec<Vec<String>> = Vec::new();
            // Servers in use: where each client's transaction runs.
            for e in shared.clients.all() {
                let Some(t) = e.row().server else { continue };
                let c = &e.info;
                rows.push(vec![
                    "S".into(),
                    c.user.to_string(),
                    c.database.to_string(),
                    "active".into(),
                    t.addr.host.clone(),
                    t.addr.port.to_string(),
                    String::new(),
                    String::new(),
                    ago(t.server_created),
                    timestamp(SystemTime::now() - e.row().request_age),
                    "0".into(),
                    "0".into(),
                    "0".into(),
                    t.server.to_string(),
                    c.id.to_string(),
                    t.pid.to_string(),
                    String::new(),
                    c.application_name.to_string(),
                ]);
            }
            for p in &pools {
                for (id, pid, age, idle, _uses) in p.idle_snapshot() {
                    rows.push(vec![
                        "S".into(),
                        p.key.user.clone(),
                        p.key.database.clone(),
                        "idle".into(),
                        p.key.node.host.clone(),
                        p.key.node.port.to_string(),
                        String::new(),
                        String::new(),
                        timestamp(SystemTime::now() - age),
                        timestamp(SystemTime::now() - idle),
                        "0".into(),
                        "0".into(),
                        "0".into(),
                        id.to_string(),
                        String::new(),
                        pid.to_string(),
                        String::new(),
                        String::new(),
                    ]);
                }
            }
            rows.sort_by_key(|r| r[13].parse::<u64>().unwrap_or(0));
            table(out, CLIENT_COLUMNS, &rows);
        }
        "LATENCY" => {
            let mut rows: Vec<Vec<String>> = Vec::new();
            for p in &pools {
                for kind in Kind::ALL {
                    let l = p.latency.percentiles(kind);
                    rows.push(vec![
                        p.key.database.clone(),
                        p.key.user.clone(),
                        if p.key.read_only { "ro" } else { "rw" }.into(),
                        p.key.node.to_string(),
                        kind.as_str().into(),
                        l.count.to_string(),
                        l.p50.to_string(),
                        l.p95.to_string(),
                        l.p99.to_string(),
                        l.p999.to_string(),
                        l.max.to_string(),
                    ]);
                }
            }
            table(
                out,
                &[
                    "database", "user", "port", "node", "kind", "count", "p50_us", "p95_us", "p99_us", "p999_us",
                    "max_us",
                ],
                &rows,
            );
        }
        "PREPARED_STATEMENTS" => {
            let rows: Vec<Vec<String>> = shared
                .statements
                .snapshot()
                .iter()
                .map(|st| {
                    vec![
                        String::from_utf8_lossy(&st.name).into_owned(),
                        // The registry's Arc is held by each client naming it.
                        (Arc::strong_count(st) - 1).to_string(),
                        st.is_verified().to_string(),
                        String::from_utf8_lossy(st.query()).into_owned(),
                    ]
                })
                .collect();
            table(out, &["name", "client_refs", "verified", "query"], &rows);
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
                vec!["databases".into(), n(shared.settings.config().databases.len())],
                vec!["users".into(), n(shared.settings.config().users.len())],
                vec!["pools".into(), n(pools.len())],
                vec!["free_clients".into(), "0".into()],
                vec!["used_clients".into(), n(clients)],
                // Connections still in startup or authentication.
                vec!["login_clients".into(), n(shared.auth.pending_logins.count())],
                vec!["free_servers".into(), n(free)],
                vec!["used_servers".into(), n(servers)],
                vec!["dns_names".into(), "0".into()],
                vec!["dns_zones".into(), "0".into()],
                vec!["dns_queries".into(), "0".into()],
                vec!["dns_pending".into(), "0".into()],
            ];
            table(out, &["list", "items"], &rows);
        }
        "CITUS" => show_citus(out, &shared.router),
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

/// SHOW CITUS: one row per distributed table (method, shard count,
/// colocation, the groups its shards are on, where statements on it go),
/// then one row per group (its primary) and one summary row (snapshot age,
/// refreshes, routed transaction counts).
fn show_citus(out: &mut BytesMut, router: &pgferry_routing::Router) {
    use pgferry_routing::citus::metadata::TableKind;
    let Some(citus) = router.citus() else {
        table(
            out,
            &["kind", "name", "detail"],
            &[vec!["status".into(), "off".into(), "no [citus] section".into()]],
        );
        return;
    };
    let snap = citus.snapshot();
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut tables: Vec<_> = snap.tables.values().collect();
    tables.sort_by(|a, b| (&a.schema, &a.name).cmp(&(&b.schema, &b.name)));
    for t in tables {
        let (method, routed) = match &t.kind {
            TableKind::Hash if t.dist_type.is_some() => ("hash", "owning group by key".to_string()),
            TableKind::Hash => ("hash", "coordinator (key type not hashed by pgferry)".into()),
            TableKind::Reference => ("reference", "reads: any primary; writes: coordinator".into()),
            TableKind::SingleShard { group } => ("single shard", format!("group {group}")),
            TableKind::Other => ("other", "coordinator".into()),
        };
        let mut groups: Vec<u32> = t.shards.iter().map(|s| s.group).collect();
        groups.sort_unstable();
        groups.dedup();
        rows.push(vec![
            "table".into(),
            t.qualified(),
            method.into(),
            t.column.clone().unwrap_or_default(),
            t.shards.len().to_string(),
            t.colocation.to_string(),
            groups.iter().map(|g| g.to_string()).collect::<Vec<_>>().join(","),
            routed,
        ]);
    }
    for n in &snap.nodes {
        let routed = if n.group == 0 {
            "coordinator (the topology's primary)".to_string()
        } else if n.primary && n.active {
            "worker primary".into()
        } else {
            "not routed".into()
        };
        rows.push(vec![
            "node".into(),
            format!("{}:{}", n.host, n.port),
            if n.primary { "primary" } else { "secondary" }.into(),
            format!("active={}", n.active),
            String::new(),
            format!("nodeid={}", n.nodeid),
            n.group.to_string(),
            routed,
        ]);
    }
    let c = &citus.counters;
    let age = snap
        .age()
        .map(|d| format!("{:.1}", d.as_secs_f64()))
        .unwrap_or_else(|| "never".into());
    rows.push(vec![
        "status".into(),
        citus.database.clone(),
        if citus.enabled { "routing=shard" } else { "routing=off" }.into(),
        format!("citus {}", snap.citus_version),
        format!("snapshot_age_s={age}"),
        format!("generation={}", snap.generation),
        format!(
            "refreshes={} checks={} errors={}",
            c.refreshes.load(Relaxed),
            c.checks.load(Relaxed),
            c.refresh_errors.load(Relaxed)
        ),
        format!(
            "routed={} coordinator={} any_node={} no_primary={} plans={}{}",
            c.routed.load(Relaxed),
            c.coordinator.load(Relaxed),
            c.any_node.load(Relaxed),
            c.no_primary.load(Relaxed),
            c.plans_analysed.load(Relaxed),
            citus
                .last_error
                .lock()
                .unwrap()
                .as_ref()
                .map(|e| format!(" last_error: {e}"))
                .unwrap_or_default()
        ),
    ]);
    table(
        out,
        &[
            "kind",
            "name",
            "method",
            "column",
            "shards",
            "colocation",
            "groups",
            "routed_to",
        ],
        &rows,
    );
}

/// SHOW CLIENTS and SHOW SERVERS: PgBouncer 1.18's columns. `ptr` holds
/// pgferry's client or server id (KILL_CLIENT takes it), `link` the id on
/// the other side.
const CLIENT_COLUMNS: &[&str] = &[
    "type",
    "user",
    "database",
    "state",
    "addr",
    "port",
    "local_addr",
    "local_port",
    "connect_time",
    "request_time",
    "wait",
    "wait_us",
    "close_needed",
    "ptr",
    "link",
    "remote_pid",
    "tls",
    "application_name",
];

/// "2026-11-22 10:56:18 UTC", as PgBouncer prints times.
pub(crate) fn timestamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Per database: xact count, query count, bytes in, bytes out, xact time,
/// query time, wait time (microseconds), summed over its pools.
fn per_database(pools: &[Arc<Pool>]) -> BTreeMap<String, [u64; 7]> {
    let mut m: BTreeMap<String, [u64; 7]> = BTreeMap::new();
    for p in pools {
        let s = &p.stats;
        let t = m.entry(p.key.database.clone()).or_default();
        for (t, v) in t.iter_mut().zip(s.totals()) {
            *t += v;
        }
    }
    m
}

/// Per database: PgBouncer's averages over the last stats period, in the
/// order of `per_database`: rates summed over pools, times weighted by
/// each pool's transaction (or query) rate.
fn averages_per_database(pools: &[Arc<Pool>]) -> BTreeMap<String, [u64; 7]> {
    let mut acc: BTreeMap<String, [u64; 7]> = BTreeMap::new();
    for p in pools {
        let a = p.stats.averages();
        let t = acc.entry(p.key.database.clone()).or_default();
        t[0] += a.xact_count;
        t[1] += a.query_count;
        t[2] += a.recv;
        t[3] += a.sent;
        t[4] += a.xact_time * a.xact_count;
        t[5] += a.query_time * a.query_count;
        t[6] += a.wait_time * a.xact_count;
    }
    for t in acc.values_mut() {
        t[4] = t[4].checked_div(t[0]).unwrap_or(0);
        t[5] = t[5].checked_div(t[1]).unwrap_or(0);
        t[6] = t[6].checked_div(t[0]).unwrap_or(0);
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::split_commands;

    #[test]
    fn commands_split_at_semicolons_outside_quotes() {
        assert_eq!(split_commands("SHOW POOLS; SHOW STATS;"), ["SHOW POOLS", "SHOW STATS"]);
        assert_eq!(
            split_commands("SET server_reset_query = 'RESET ALL; DISCARD PLANS'; RELOAD"),
            ["SET server_reset_query = 'RESET ALL; DISCARD PLANS'", "RELOAD"]
        );
        assert_eq!(split_commands("SET x = 'it''s; fine'"), ["SET x = 'it''s; fine'"]);
        assert!(split_commands(" ; ;").is_empty());
    }

    #[test]
    fn timestamps_print_like_pgbouncer() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_344_978);
        assert_eq!(super::timestamp(t), "2026-11-22 10:56:18 UTC");
        assert_eq!(super::timestamp(std::time::UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
    }
}
