//! `/`: the HTML status page (tables of current numbers, and charts of
//! the last 15 minutes), refreshing itself every 5 s.

use super::charts::{self, Line, LineChart, Moment};
use super::history::{History, PoolPoint, PoolSeries, SLOTS};
use super::{html, View};
use pgferry_pool::latency::Kind;
use pgferry_pool::stats::Total;
use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;

pub(super) fn status_page(view: &View, history: &Mutex<History>) -> String {
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
         .ok{{background:#9f9}}.charts{{display:flex;flex-wrap:wrap;gap:8px;margin-bottom:1.5em}}</style></head><body>\
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
    for p in view.pools.sorted() {
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
            s.total(Total::XactCount),
            s.total(Total::WaitTime) / 1000,
            p.settings.pool_mode.as_str()
        );
    }
    h.push_str("</table>");
    charts_section(&mut h, history);
    h.push_str(
        "<h2>Topology</h2><table id=\"topology\"><tr><th class=l>member</th><th class=l>address</th>\
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
            .age()
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
    for p in view.pools.sorted() {
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
    for p in view.pools.sorted() {
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

/// Lines drawn per chart at most (the busiest pools); more would not be
/// told apart.
const MAX_LINES: usize = 8;

/// "Last 15 minutes": a chart per pool metric and the topology timeline.
fn charts_section(h: &mut String, history: &Mutex<History>) {
    // Held while drawing only (the sampler waits meanwhile). A poisoned
    // lock (a panic while sampling) still holds valid rings: draw them.
    let history = &*history.lock().unwrap_or_else(|e| e.into_inner());
    h.push_str("<h2>Last 15 minutes</h2><div class=\"charts\">");
    let mut series = history.pools();
    let hidden = series.len().saturating_sub(MAX_LINES);
    if hidden > 0 {
        // The busiest pools by transactions over the window, then by label
        // again so that colours follow names.
        let total = |s: &PoolSeries| s.points.iter().map(|p| p.tps).sum::<f64>();
        series.sort_by(|a, b| total(b).total_cmp(&total(a)));
        series.truncate(MAX_LINES);
        series.sort_by(|a, b| a.label.cmp(&b.label));
    }
    let hidden = hidden + history.untracked;
    type Metric = fn(&PoolPoint) -> Option<f64>;
    let metrics: [(&str, &str, &str, Metric); 4] = [
        (
            "chart-tps",
            "Transactions/s per pool",
            "no pool yet: a sample every 5 s",
            |p| Some(p.tps),
        ),
        (
            "chart-p99",
            "p99 query latency per pool, ms (each 5 s, from the histogram buckets)",
            "no query answered in the last 15 min",
            |p| p.p99_ms,
        ),
        (
            "chart-waiting",
            "Clients waiting for a server connection",
            "no pool yet: a sample every 5 s",
            |p| Some(p.waiting as f64),
        ),
        (
            "chart-servers",
            "Server connections per pool (active + idle)",
            "no pool yet: a sample every 5 s",
            |p| Some(p.servers as f64),
        ),
    ];
    for (id, title, empty, value) in metrics {
        let lines: Vec<Line> = series
            .iter()
            .map(|s| Line {
                label: &s.label,
                points: s
                    .points
                    .iter()
                    .filter_map(|p| Some((history.slot(p.tick)?, value(p))))
                    .collect(),
            })
            .collect();
        charts::line_chart(
            h,
            &LineChart {
                id,
                title,
                empty,
                slots: SLOTS,
                lines: &lines,
                hidden,
            },
        );
    }
    let moments: Vec<Moment> = history
        .topology
        .iter()
        .filter_map(|t| {
            Some(Moment {
                slot: history.slot(t.tick)?,
                at: t.at,
                leader: t.leader.as_deref(),
                replicas: &t.replicas,
                failover: t.failover,
            })
        })
        .collect();
    charts::timeline(h, "chart-topology", SLOTS, &moments);
    h.push_str("</div>");
}
