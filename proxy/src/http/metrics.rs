//! `/metrics`: the Prometheus text format, computed at request time from
//! the same counters the admin console reads.

use crate::shared::{Observability, PoolRegistry};
use pgferry_pool::latency::{Kind, BUCKETS_US};
use pgferry_pool::stats::Total;
use pgferry_pool::Pool;
use pgferry_routing::Router;
use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;

/// Escapes a label value (backslash, quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', r"\\").replace('"', "\\\"").replace('\n', r"\n")
}

pub(super) fn metrics(
    obs: &Observability,
    registry: &PoolRegistry,
    router: &Router,
    tls: &pgferry_tls::Acceptor,
) -> String {
    let mut m = String::with_capacity(8192);
    let pools = registry.sorted();
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
            p.stats.total(Total::XactCount) as f64
        }),
        (
            "pgferry_pool_queries_total",
            "counter",
            "Requests answered by ReadyForQuery (a simple query string or a Sync).",
            |p| p.stats.total(Total::QueryCount) as f64,
        ),
        (
            "pgferry_pool_received_bytes_total",
            "counter",
            "Bytes received from clients.",
            |p| p.stats.total(Total::Received) as f64,
        ),
        (
            "pgferry_pool_sent_bytes_total",
            "counter",
            "Bytes sent to clients.",
            |p| p.stats.total(Total::Sent) as f64,
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
    let (parked, parks) = crate::park::stats();
    let _ = writeln!(
        m,
        "# HELP pgferry_clients_parked Idle clients parked now (no task or buffers; see park_idle_after).\n\
         # TYPE pgferry_clients_parked gauge\npgferry_clients_parked {parked}\n\
         # HELP pgferry_client_parks_total Times an idle client was parked.\n\
         # TYPE pgferry_client_parks_total counter\npgferry_client_parks_total {parks}\n\
         # HELP pgferry_client_state_bytes Memory of the slab that holds clients' long-lived state (registry entries, parameters).\n\
         # TYPE pgferry_client_state_bytes gauge\npgferry_client_state_bytes {}",
        crate::memory::slab_bytes()
    );
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
        let age = snap.age().map_or(-1.0, |d| d.as_secs_f64());
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
