//! The HTTP listener (default 127.0.0.1:8404): `/metrics` in the Prometheus
//! text format, `/health` (the process is up), `/ready` (a leader is
//! confirmed for the read-write port), and `/`, a plain HTML status page
//! that refreshes itself.
//!
//! A few GET requests a second at most: a minimal HTTP/1.1 responder (one
//! request per connection, bounded request size and time) is all it needs.
//! Every value is computed at request time from the same counters the
//! admin console reads.

use crate::clients::ClientRegistry;
use crate::shared::{Observability, PoolRegistry};
use pgferry_pool::latency::{Kind, BUCKETS_US};
use pgferry_pool::Pool;
use pgferry_routing::Router;
use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const MAX_REQUEST: usize = 8192;

/// What the endpoints read: counters and events, the pools, the topology,
/// and the clients (for the servers they hold).
pub struct View {
    pub obs: Arc<Observability>,
    pub pools: Arc<PoolRegistry>,
    pub router: Router,
    pub clients: Arc<ClientRegistry>,
    pub tls: Arc<pgferry_tls::Acceptor>,
}

/// Serves until `shutdown` turns true.
pub async fn serve(listener: TcpListener, view: Arc<View>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let view = view.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), handle(stream, &view)).await;
        });
    }
}

async fn handle(mut stream: TcpStream, view: &View) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() + n > MAX_REQUEST {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(buf.split(|b| *b == b'\r').next().unwrap_or_default()).into_owned();
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics(&view.obs, &view.pools, &view.router, &view.tls),
        ),
        ("GET" | "HEAD", "/health") => ("200 OK", "text/plain", "ok\n".to_owned()),
        ("GET" | "HEAD", "/ready") => {
            if view.router.topology().primary.is_some() {
                ("200 OK", "text/plain", "ready: a leader is confirmed\n".to_owned())
            } else {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    "not ready: no confirmed leader\n".to_owned(),
                )
            }
        }
        ("GET" | "HEAD", "/") => ("200 OK", "text/html; charset=utf-8", status_page(view)),
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".to_owned()),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&out).await?;
    stream.shutdown().await
}

fn pools(registry: &PoolRegistry) -> Vec<Arc<Pool>> {
    let mut p = registry.all();
    p.sort_by(|a, b| {
        (
            &a.key.database,
            &a.key.user,
            a.key.read_only,
            &a.key.node.host,
            a.key.node.port,
        )
            .cmp(&(
                &b.key.database,
                &b.key.user,
                b.key.read_only,
                &b.key.node.host,
                b.key.node.port,
            ))
    });
    p
}

/// Escapes a label value (backslash, quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', r"\\").replace('"', "\\\"").replace('\n', r"\n")
}

fn metrics(obs: &Observability, registry: &PoolRegistry, router: &Router, tls: &pgferry_tls::Acceptor) -> String {
    let mut m = String::with_capacity(8192);
    let pools = pools(registry);
    let pool_labels = |p: &Pool| {
        format!(
            "database=\"{}\",user=\"{}\",node=\"{}\",port=\"{}\"",
            label(&p.key.database),
            label(&p.key.user),
            label(&p.key.node.to_string()),
            if p.key.read_only { "ro" } else { "rw" }
        )
    };
    type Gauge = fn(&Pool) -> f64;
    let per_pool: &[(&str, &str, &str, Gauge)] = &[
        (
            "pgferry_pool_clients_active",
            "gauge",
            "Clients logged in to the pool.",
            |p| p.stats.cl_active.load(Relaxed) as f64,
        ),
        (
            "pgferry_pool_clients_waiting",
            "gauge",
            "Clients waiting for a server connection.",
            |p| p.stats.cl_waiting.load(Relaxed) as f64,
        ),
        (
            "pgferry_pool_servers_active",
            "gauge",
            "Server connections in use by a client.",
            |p| p.stats.sv_active.load(Relaxed) as f64,
        ),
        ("pgferry_pool_servers_idle", "gauge", "Idle server connections.", |p| {
            p.idle_count() as f64
        }),
        (
            "pgferry_pool_servers_login",
            "gauge",
            "Server connections being established.",
            |p| p.stats.sv_login.load(Relaxed) as f64,
        ),
        ("pgferry_pool_transactions_total", "counter", "Transactions run.", |p| {
            p.stats.total_xact_count.load(Relaxed) as f64
        }),
        (
            "pgferry_pool_queries_total",
            "counter",
            "Requests answered by ReadyForQuery (a simple query string or a Sync).",
            |p| p.stats.total_query_count.load(Relaxed) as f64,
        ),
        (
            "pgferry_pool_received_bytes_total",
            "counter",
            "Bytes received from clients.",
            |p| p.stats.total_received.load(Relaxed) as f64,
        ),
        (
            "pgferry_pool_sent_bytes_total",
            "counter",
            "Bytes sent to clients.",
            |p| p.stats.total_sent.load(Relaxed) as f64,
        ),
        (
            "pgferry_pool_servers_opened_total",
            "counter",
            "Server connections opened.",
            |p| p.stats.servers_opened.load(Relaxed) as f64,
        ),
        (
            "pgferry_pool_server_errors_total",
            "counter",
            "Failed server connection attempts.",
            |p| p.stats.server_errors.load(Relaxed) as f64,
        ),
        (
            "pgferry_pool_wait_timeouts_total",
            "counter",
            "Clients refused after query_wait_timeout.",
            |p| p.stats.wait_timeouts.load(Relaxed) as f64,
        ),
    ];
    for (name, kind, help, get) in per_pool {
        let _ = writeln!(m, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for p in &pools {
            let _ = writeln!(m, "{name}{{{}}} {}", pool_labels(p), get(p));
        }
    }
    // Latency histograms, cumulative over the process's life.
    for (kind, name, help) in [
        (
            Kind::Wait,
            "pgferry_pool_wait_seconds",
            "Time a transaction waited for a server connection.",
        ),
        (
            Kind::Query,
            "pgferry_pool_query_seconds",
            "Time from a request to its ReadyForQuery.",
        ),
        (
            Kind::Xact,
            "pgferry_pool_transaction_seconds",
            "Time a transaction held a server connection.",
        ),
    ] {
        let _ = writeln!(m, "# HELP {name} {help}\n# TYPE {name} histogram");
        for p in &pools {
            let labels = pool_labels(p);
            let (buckets, sum_us) = p.latency.buckets(kind);
            for (i, count) in buckets.iter().enumerate() {
                let le = BUCKETS_US
                    .get(i)
                    .map_or_else(|| "+Inf".to_owned(), |us| (*us as f64 / 1e6).to_string());
                let _ = writeln!(m, "{name}_bucket{{{labels},le=\"{le}\"}} {count}");
            }
            let _ = writeln!(m, "{name}_sum{{{labels}}} {}", sum_us as f64 / 1e6);
            let _ = writeln!(m, "{name}_count{{{labels}}} {}", buckets[BUCKETS_US.len()]);
        }
    }
    let c = &obs.counters;
    let _ = writeln!(
        m,
        "# HELP pgferry_connections_accepted_total Client connections accepted, by port.\n\
         # TYPE pgferry_connections_accepted_total counter\n\
         pgferry_connections_accepted_total{{port=\"rw\"}} {}\n\
         pgferry_connections_accepted_total{{port=\"ro\"}} {}",
        c.accepted_rw.load(Relaxed),
        c.accepted_ro.load(Relaxed)
    );
    let _ = writeln!(
        m,
        "# HELP pgferry_connections_refused_total Client connections refused at accept, by reason.\n\
         # TYPE pgferry_connections_refused_total counter\n\
         pgferry_connections_refused_total{{reason=\"max_client_conn\"}} {}\n\
         pgferry_connections_refused_total{{reason=\"max_pending_logins\"}} {}\n\
         pgferry_connections_refused_total{{reason=\"max_pending_logins_per_address\"}} {}",
        c.refused_max_client_conn.load(Relaxed),
        c.refused_pending_logins.load(Relaxed),
        c.refused_pending_per_address.load(Relaxed)
    );
    let _ = writeln!(
        m,
        "# HELP pgferry_tls_handshakes_total Client TLS handshakes completed.\n\
         # TYPE pgferry_tls_handshakes_total counter\npgferry_tls_handshakes_total {}\n\
         # HELP pgferry_auth_failures_total Failed client logins, by reason (password: wrong password, unknown or \
         expired user; hba: no rule or a reject rule; tls_required: plaintext where TLS is required).\n\
         # TYPE pgferry_auth_failures_total counter\n\
         pgferry_auth_failures_total{{reason=\"password\"}} {}\n\
         pgferry_auth_failures_total{{reason=\"hba\"}} {}\n\
         pgferry_auth_failures_total{{reason=\"tls_required\"}} {}\n\
         # HELP pgferry_auth_failures_delayed_total Failed logins answered after auth_failure_delay (too many failures of \
         that user from that address).\n\
         # TYPE pgferry_auth_failures_delayed_total counter\npgferry_auth_failures_delayed_total {}\n\
         # HELP pgferry_cancel_requests_total Cancel requests received, by whether they reached a running query.\n\
         # TYPE pgferry_cancel_requests_total counter\n\
         pgferry_cancel_requests_total{{forwarded=\"true\"}} {}\n\
         pgferry_cancel_requests_total{{forwarded=\"false\"}} {}",
        c.tls_handshakes.load(Relaxed),
        c.auth_failures.load(Relaxed),
        c.auth_failures_hba.load(Relaxed),
        c.auth_failures_tls.load(Relaxed),
        c.auth_failures_delayed.load(Relaxed),
        c.cancels_forwarded.load(Relaxed),
        c.cancel_requests.load(Relaxed).saturating_sub(c.cancels_forwarded.load(Relaxed))
    );
    if let Some(citus) = router.citus() {
        let c = &citus.counters;
        let snap = citus.snapshot();
        let age = snap
            .loaded_at
            .and_then(|t| t.elapsed().ok())
            .map_or(-1.0, |d| d.as_secs_f64());
        let _ = writeln!(
            m,
            "# HELP pgferry_citus_transactions_total Read-write transactions by where Citus routing sent them.\n\
             # TYPE pgferry_citus_transactions_total counter\n\
             pgferry_citus_transactions_total{{target=\"worker\"}} {}\n\
             pgferry_citus_transactions_total{{target=\"coordinator\"}} {}\n\
             pgferry_citus_transactions_total{{target=\"any_node\"}} {}\n\
             # HELP pgferry_citus_no_primary_total Routed transactions whose group had no known primary (sent to the coordinator).\n\
             # TYPE pgferry_citus_no_primary_total counter\npgferry_citus_no_primary_total {}\n\
             # HELP pgferry_citus_metadata_age_seconds Age of the Citus metadata snapshot (-1: none loaded).\n\
             # TYPE pgferry_citus_metadata_age_seconds gauge\npgferry_citus_metadata_age_seconds {:.3}\n\
             # HELP pgferry_citus_metadata_refreshes_total Snapshots loaded (start, topology changes, fingerprint changes).\n\
             # TYPE pgferry_citus_metadata_refreshes_total counter\npgferry_citus_metadata_refreshes_total {}\n\
             # HELP pgferry_citus_metadata_errors_total Failed metadata reads.\n\
             # TYPE pgferry_citus_metadata_errors_total counter\npgferry_citus_metadata_errors_total {}\n\
             # HELP pgferry_citus_plans_total Statement texts analysed (plan cache misses).\n\
             # TYPE pgferry_citus_plans_total counter\npgferry_citus_plans_total {}\n\
             # HELP pgferry_citus_tables Distributed tables in the snapshot.\n\
             # TYPE pgferry_citus_tables gauge\npgferry_citus_tables {}",
            c.routed.load(Relaxed),
            c.coordinator.load(Relaxed),
            c.any_node.load(Relaxed),
            c.no_primary.load(Relaxed),
            age,
            c.refreshes.load(Relaxed),
            c.refresh_errors.load(Relaxed),
            c.plans_analysed.load(Relaxed),
            snap.tables.len(),
        );
    }
    let topo = router.topology();
    let v = &topo.view;
    let _ = writeln!(
        m,
        "# HELP pgferry_topology_leader_confirmed 1 when a leader is confirmed writable for the read-write port.\n\
         # TYPE pgferry_topology_leader_confirmed gauge\npgferry_topology_leader_confirmed {}\n\
         # HELP pgferry_topology_etcd_connected 1 while the etcd watch is up (etcd source only).\n\
         # TYPE pgferry_topology_etcd_connected gauge\npgferry_topology_etcd_connected {}\n\
         # HELP pgferry_topology_etcd_revision Last etcd revision seen.\n\
         # TYPE pgferry_topology_etcd_revision gauge\npgferry_topology_etcd_revision {}\n\
         # HELP pgferry_topology_leader_changes_total Times the read-write port's server changed (failovers, switchovers).\n\
         # TYPE pgferry_topology_leader_changes_total counter\npgferry_topology_leader_changes_total {}\n\
         # HELP pgferry_topology_leader Current leader of the read-write port (value 1; absent while there is none).\n\
         # TYPE pgferry_topology_leader gauge",
        u8::from(topo.primary.is_some()),
        u8::from(v.etcd_connected),
        v.etcd_revision,
        c.leader_changes.load(Relaxed)
    );
    if let Some(p) = &topo.primary {
        let _ = writeln!(
            m,
            "pgferry_topology_leader{{member=\"{}\",addr=\"{}\"}} 1",
            label(v.leader.as_deref().unwrap_or_default()),
            label(&p.addr.to_string())
        );
    }
    let _ = writeln!(
        m,
        "# HELP pgferry_member_info Cluster members as pgferry sees them (value 1).\n# TYPE pgferry_member_info gauge"
    );
    for mem in &v.members {
        let _ = writeln!(
            m,
            "pgferry_member_info{{member=\"{}\",addr=\"{}\",role=\"{}\",state=\"{}\",takes_reads=\"{}\"}} 1",
            label(&mem.name),
            label(&mem.addr),
            label(&mem.role),
            label(&mem.state),
            mem.serving_reads
        );
    }
    let _ = writeln!(
        m,
        "# HELP pgferry_member_lag_bytes WAL bytes a member is behind the leader.\n# TYPE pgferry_member_lag_bytes gauge"
    );
    for mem in v.members.iter().filter(|x| x.lag.is_some()) {
        let _ = writeln!(
            m,
            "pgferry_member_lag_bytes{{member=\"{}\"}} {}",
            label(&mem.name),
            mem.lag.unwrap_or(0)
        );
    }
    let _ = writeln!(
        m,
        "# HELP pgferry_member_lag_seconds How long ago the leader passed a member's WAL position.\n# TYPE pgferry_member_lag_seconds gauge"
    );
    for mem in &v.members {
        if let Some(t) = mem.lag_time {
            let _ = writeln!(
                m,
                "pgferry_member_lag_seconds{{member=\"{}\"}} {:.3}",
                label(&mem.name),
                t.as_secs_f64()
            );
        }
    }
    // Citus worker groups: 1 while the group has a leader to route to.
    let _ = writeln!(
        m,
        "# HELP pgferry_citus_group_leader 1 while a Citus worker group has a leader, 0 while it has none (a failover).\n\
         # TYPE pgferry_citus_group_leader gauge"
    );
    for (g, leader, _) in &v.workers {
        let _ = writeln!(
            m,
            "pgferry_citus_group_leader{{group=\"{g}\"}} {}",
            u8::from(leader.is_some())
        );
    }
    let _ = writeln!(
        m,
        "# HELP pgferry_tls_cert_not_after_seconds When the listeners' certificate expires (Unix time; absent without TLS).\n\
         # TYPE pgferry_tls_cert_not_after_seconds gauge"
    );
    if let Some(t) = tls.current().and_then(|t| t.not_after) {
        let _ = writeln!(m, "pgferry_tls_cert_not_after_seconds {t}");
    }
    let (rss, fds) = process_stats();
    let _ = writeln!(
        m,
        "# HELP pgferry_process_resident_memory_bytes Resident memory.\n\
         # TYPE pgferry_process_resident_memory_bytes gauge\npgferry_process_resident_memory_bytes {rss}\n\
         # HELP pgferry_process_open_fds Open file descriptors.\n\
         # TYPE pgferry_process_open_fds gauge\npgferry_process_open_fds {fds}"
    );
    m
}

/// (RSS bytes, open fds) from /proc/self; zeros where unavailable.
fn process_stats() -> (u64, usize) {
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096);
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    (rss, fds)
}

fn html(v: &str) -> String {
    v.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn status_page(view: &View) -> String {
    let mut h = String::with_capacity(8192);
    let topo = view.router.topology();
    let v = &topo.view;
    let leader = match (&v.leader, v.leader_confirmed) {
        (Some(l), true) => format!("{} (confirmed writable)", html(l)),
        (Some(l), false) => format!("{} (not confirmed yet: writes are held)", html(l)),
        (None, _) => "none: writes are held".into(),
    };
    let _ = write!(
        h,
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"5\">\
         <title>pgferry status</title><style>\
         body{{font-family:sans-serif;margin:1em}}table{{border-collapse:collapse;margin-bottom:1.5em}}\
         th,td{{border:1px solid #999;padding:2px 8px;text-align:right}}th{{background:#ddd}}\
         td.l,th.l{{text-align:left}}#pools th{{background:#1f4e79;color:#fff}}.bad{{background:#f99}}\
         .ok{{background:#9f9}}</style></head><body>\
         <h1>pgferry {}</h1><p>topology source: {} &middot; leader: {} &middot; etcd revision {} &middot; \
         page refreshes every 5 s</p>",
        env!("CARGO_PKG_VERSION"),
        v.source,
        leader,
        v.etcd_revision
    );
    h.push_str(
        "<h2>Pools</h2><table id=\"pools\"><tr><th class=l>database</th><th class=l>user</th><th class=l>node</th>\
         <th class=l>port</th><th>clients active</th><th>clients waiting</th><th>servers active</th>\
         <th>servers idle</th><th>transactions</th><th>wait ms total</th><th class=l>mode</th></tr>",
    );
    for p in pools(&view.pools) {
        let s = &p.stats;
        let waiting = s.cl_waiting.load(Relaxed);
        let _ = write!(
            h,
            "<tr><td class=l>{}</td><td class=l>{}</td><td class=l>{}</td><td class=l>{}</td><td>{}</td>\
             <td{}>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=l>{}</td></tr>",
            html(&p.key.database),
            html(&p.key.user),
            html(&p.key.node.to_string()),
            if p.key.read_only { "ro" } else { "rw" },
            s.cl_active.load(Relaxed),
            if waiting > 0 { " class=bad" } else { "" },
            waiting,
            s.sv_active.load(Relaxed),
            p.idle_count(),
            s.total_xact_count.load(Relaxed),
            s.total_wait_time.load(Relaxed) / 1000,
            p.settings.pool_mode.as_str()
        );
    }
    h.push_str(
        "</table><h2>Topology</h2><table id=\"topology\"><tr><th class=l>member</th><th class=l>address</th>\
         <th class=l>role</th><th class=l>state</th><th>lag bytes</th><th class=l>reads</th></tr>",
    );
    for m in &v.members {
        let _ = write!(
            h,
            "<tr><td class=l>{}</td><td class=l>{}</td><td class=l>{}</td><td class=l>{}</td><td>{}</td>\
             <td class=\"l {}\">{}</td></tr>",
            html(&m.name),
            html(&m.addr),
            html(&m.role),
            html(&m.state),
            m.lag.map(|l| l.to_string()).unwrap_or_default(),
            if m.serving_reads { "ok" } else { "" },
            if m.serving_reads { "yes" } else { "no" }
        );
    }
    if let Some(citus) = view.router.citus() {
        let snap = citus.snapshot();
        let c = &citus.counters;
        let age = snap
            .loaded_at
            .and_then(|t| t.elapsed().ok())
            .map(|d| format!("{:.1} s", d.as_secs_f64()))
            .unwrap_or_else(|| "not loaded".into());
        let _ = write!(
            h,
            "</table><h2>Citus</h2><table id=\"citus\"><tr><th class=l>database</th><th class=l>routing</th>\
             <th class=l>metadata age</th><th>tables</th><th>refreshes</th><th>refresh errors</th>\
             <th>to workers</th><th>to coordinator</th><th>any node</th></tr>\
             <tr><td class=l>{}</td><td class=l>{}</td><td class=l>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td></tr>",
            html(&citus.database),
            if citus.enabled { "shard" } else { "off" },
            html(&age),
            snap.tables.len(),
            c.refreshes.load(Relaxed),
            c.refresh_errors.load(Relaxed),
            c.routed.load(Relaxed),
            c.coordinator.load(Relaxed),
            c.any_node.load(Relaxed),
        );
        h.push_str("</table><table id=\"citus-groups\"><tr><th>group</th><th class=l>leader</th></tr>");
        for (g, m) in view.router.group_leaders() {
            let _ = write!(h, "<tr><td>{g}</td><td class=l>{}</td></tr>", html(&m.addr.to_string()));
        }
        if let Some(e) = citus.last_error.lock().unwrap().as_ref() {
            let _ = write!(h, "<tr><td></td><td class=l>last refresh error: {}</td></tr>", html(e));
        }
    }
    h.push_str(
        "</table><h2>Latency (last one or two stats periods, ms)</h2><table id=\"latency\"><tr>\
         <th class=l>database</th><th class=l>user</th><th class=l>port</th><th class=l>kind</th><th>count</th>\
         <th>p50</th><th>p95</th><th>p99</th><th>p99.9</th><th>max</th></tr>",
    );
    let ms = |us: u64| format!("{:.2}", us as f64 / 1000.0);
    for p in pools(&view.pools) {
        for kind in Kind::ALL {
            let l = p.latency.percentiles(kind);
            let _ = write!(
                h,
                "<tr><td class=l>{}</td><td class=l>{}</td><td class=l>{}</td><td class=l>{}</td><td>{}</td>\
                 <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                html(&p.key.database),
                html(&p.key.user),
                if p.key.read_only { "ro" } else { "rw" },
                kind.as_str(),
                l.count,
                ms(l.p50),
                ms(l.p95),
                ms(l.p99),
                ms(l.p999),
                ms(l.max)
            );
        }
    }
    h.push_str(
        "</table><h2>Servers</h2><table id=\"servers\"><tr><th class=l>id</th><th class=l>database</th>\
         <th class=l>user</th><th class=l>node</th><th class=l>state</th><th>backend pid</th><th class=l>client</th>\
         <th>age s</th></tr>",
    );
    let mut servers: Vec<(u64, String)> = Vec::new();
    for e in view.clients.all() {
        if let Some(t) = e.row().server {
            servers.push((
                t.server,
                format!(
                    "<tr><td class=l>{}</td><td class=l>{}</td><td class=l>{}</td><td class=l>{}</td>\
                     <td class=\"l ok\">active</td><td>{}</td><td class=l>{}</td><td>{}</td></tr>",
                    t.server,
                    html(&e.info.database),
                    html(&e.info.user),
                    html(&t.addr.to_string()),
                    t.pid,
                    e.info.id,
                    t.server_created.elapsed().as_secs()
                ),
            ));
        }
    }
    for p in pools(&view.pools) {
        for (id, pid, age, _idle, _uses) in p.idle_snapshot() {
            servers.push((
                id,
                format!(
                    "<tr><td class=l>{id}</td><td class=l>{}</td><td class=l>{}</td><td class=l>{}</td>\
                     <td class=l>idle</td><td>{pid}</td><td class=l></td><td>{}</td></tr>",
                    html(&p.key.database),
                    html(&p.key.user),
                    html(&p.key.node.to_string()),
                    age.as_secs()
                ),
            ));
        }
    }
    servers.sort_by_key(|s| s.0);
    for (_, row) in servers {
        h.push_str(&row);
    }
    h.push_str(
        "</table><h2>Recent events</h2><table id=\"events\"><tr><th class=l>time (UTC)</th><th class=l>event</th></tr>",
    );
    for (t, what) in view.obs.events().iter().rev() {
        let _ = write!(
            h,
            "<tr><td class=l>{}</td><td class=l>{}</td></tr>",
            crate::admin::timestamp(*t),
            html(what)
        );
    }
    let c = &view.obs.counters;
    let _ = write!(
        h,
        "</table><h2>Listeners</h2><table><tr><th class=l>accepted rw</th><th class=l>accepted ro</th>\
         <th>TLS handshakes</th><th>auth failures</th><th>failures slowed down</th></tr>\
         <tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr></table></body></html>",
        c.accepted_rw.load(Relaxed),
        c.accepted_ro.load(Relaxed),
        c.tls_handshakes.load(Relaxed),
        c.auth_failures.load(Relaxed) + c.auth_failures_hba.load(Relaxed) + c.auth_failures_tls.load(Relaxed),
        c.auth_failures_delayed.load(Relaxed)
    );
    h
}
