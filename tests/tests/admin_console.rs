//! The admin console through real psql: who may connect, the column names
//! and order of each implemented SHOW command (checked against PgBouncer
//! 1.18's, as Debian ships it), counters that move with traffic, and the
//! errors for stats users, unknown commands and PgBouncer commands that
//! have no meaning here. The other commands are in operations.rs.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// PgBouncer 1.18's header line for each command (captured from Debian's
/// pgbouncer 1.18.0 with psql -A).
const HEADERS: &[(&str, &str)] = &[
    ("POOLS", "database|user|cl_active|cl_waiting|cl_active_cancel_req|cl_waiting_cancel_req|sv_active|sv_active_cancel|sv_being_canceled|sv_idle|sv_used|sv_tested|sv_login|maxwait|maxwait_us|pool_mode"),
    ("STATS", "database|total_xact_count|total_query_count|total_received|total_sent|total_xact_time|total_query_time|total_wait_time|avg_xact_count|avg_query_count|avg_recv|avg_sent|avg_xact_time|avg_query_time|avg_wait_time"),
    ("STATS_TOTALS", "database|xact_count|query_count|bytes_received|bytes_sent|xact_time|query_time|wait_time"),
    ("STATS_AVERAGES", "database|xact_count|query_count|bytes_received|bytes_sent|xact_time|query_time|wait_time"),
    ("DATABASES", "name|host|port|database|force_user|pool_size|min_pool_size|reserve_pool|pool_mode|max_connections|current_connections|paused|disabled"),
    ("USERS", "name|pool_mode"),
    ("CONFIG", "key|value|default|changeable"),
    ("LISTS", "list|items"),
    ("VERSION", "version"),
    ("CLIENTS", "type|user|database|state|addr|port|local_addr|local_port|connect_time|request_time|wait|wait_us|close_needed|ptr|link|remote_pid|tls|application_name"),
    ("SERVERS", "type|user|database|state|addr|port|local_addr|local_port|connect_time|request_time|wait|wait_us|close_needed|ptr|link|remote_pid|tls|application_name"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_commands_match_pgbouncer_columns() {
    let f = ferry("[auth]\nstats_users = [\"other\"]\n[[database]]\nname = \"app\"\n");
    // Some traffic, so that the app pool exists and its counters move.
    let c = app(&f).await;
    for _ in 0..5 {
        c.simple_query("SELECT 1").await.unwrap();
    }
    for port in [f.rw_port, f.ro_port.unwrap()] {
        for (cmd, header) in HEADERS {
            let out = console(port, "admin", "admin-pass", "pgbouncer", &format!("SHOW {cmd};"))
                .unwrap_or_else(|e| panic!("SHOW {cmd}: {e}"));
            assert_eq!(out.lines().next(), Some(*header), "SHOW {cmd}");
        }
    }
    let pools = console(f.rw_port, "admin", "admin-pass", "pgferry", "show pools").unwrap();
    let app_row = pools
        .lines()
        .find(|l| l.starts_with("app|app|"))
        .unwrap_or_else(|| panic!("no app pool row:\n{pools}"));
    let cols: Vec<&str> = app_row.split('|').collect();
    assert_eq!(cols[2], "1", "one client logged in: {app_row}");
    assert_eq!(cols[15], "transaction");
    assert!(
        cols[9].parse::<u32>().unwrap() >= 1,
        "an idle server connection: {app_row}"
    );
    let totals = console(f.rw_port, "admin", "admin-pass", "pgbouncer", "SHOW STATS_TOTALS").unwrap();
    let row = totals.lines().find(|l| l.starts_with("app|")).expect("app totals");
    let xacts: u64 = row.split('|').nth(1).unwrap().parse().unwrap();
    assert!(xacts >= 5, "transactions counted: {row}");
    let topo = console(f.rw_port, "admin", "admin-pass", "pgbouncer", "SHOW TOPOLOGY").unwrap();
    assert!(
        topo.starts_with("group|member|addr|role|state|lag_bytes|takes_writes|takes_reads|source"),
        "{topo}"
    );
    assert!(topo.contains("|primary|configured||true|false|static|"), "{topo}");
    let help = Command::new(Path::new(PG_BIN).join("psql"))
        .arg(format!(
            "host=127.0.0.1 port={} user=admin password=admin-pass dbname=pgbouncer sslmode=disable",
            f.rw_port
        ))
        .args(["-X", "-c", "SHOW HELP"])
        .output()
        .unwrap();
    assert!(help.status.success());
    let notice = String::from_utf8_lossy(&help.stderr);
    assert!(
        notice.contains("NOTICE:  Console usage") && notice.contains("SHOW HELP|CONFIG"),
        "{notice}"
    );

    // A stats user reads but may not act; unknown commands are syntax errors.
    assert!(console(f.rw_port, "other", "other-pass", "pgbouncer", "SHOW POOLS").is_ok());
    let e = console(f.rw_port, "other", "other-pass", "pgbouncer", "PAUSE").unwrap_err();
    assert!(e.contains("admin access needed"), "{e}");
    let e = console(f.rw_port, "admin", "admin-pass", "pgbouncer", "SHOW NONSENSE").unwrap_err();
    assert!(e.contains("invalid command"), "{e}");
    let e = console(f.rw_port, "admin", "admin-pass", "pgbouncer", "DROP TABLE x").unwrap_err();
    assert!(e.contains("invalid command"), "{e}");
    let e = console(f.rw_port, "other", "other-pass", "pgbouncer", "RESUME").unwrap_err();
    assert!(e.contains("admin access needed"), "{e}");
    let e = console(f.rw_port, "admin", "admin-pass", "pgbouncer", "SHOW FDS").unwrap_err();
    assert!(e.contains("no meaning in pgferry"), "{e}");
    let e = console(f.rw_port, "other", "other-pass", "pgbouncer", "SHUTDOWN").unwrap_err();
    assert!(e.contains("admin access needed"), "{e}");
    // A driver on the extended protocol is told the console speaks only the
    // simple one, and can go on with simple queries.
    let (k, conn) = tokio_postgres::connect(
        &f.rw_conn_str("admin", "admin-pass", "pgbouncer"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let e = k.query("SHOW POOLS", &[]).await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("0A000"), "{e}");
    let v = k.simple_query("SHOW VERSION").await.unwrap();
    let version = v.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    });
    assert!(version.is_some_and(|v| v.starts_with("pgferry ")));
    // Only admin and stats users, and only with the right password.
    let e = console(f.rw_port, "app", APP_PASS, "pgbouncer", "SHOW POOLS").unwrap_err();
    assert!(e.contains("may not use the admin console"), "{e}");
    let e = console(f.rw_port, "admin", "wrong", "pgbouncer", "SHOW POOLS").unwrap_err();
    assert!(e.contains("password authentication failed"), "{e}");
}

/// PAUSE waits for the transaction in flight and holds new ones; RESUME
/// lets them run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_transactions_until_resume() {
    let f = ferry("");
    let busy = app(&f).await;
    let waiter = app(&f).await;
    busy.batch_execute("BEGIN").await.unwrap();
    busy.simple_query("SELECT 1").await.unwrap();
    // PAUSE (blocking) while a transaction is open.
    let port = f.rw_port;
    let pause = tokio::task::spawn_blocking(move || console(port, "admin", "admin-pass", "pgbouncer", "PAUSE app"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pause.is_finished(), "PAUSE returned with a transaction in flight");
    // The open transaction may go on and commit.
    busy.simple_query("SELECT 2").await.unwrap();
    busy.batch_execute("COMMIT").await.unwrap();
    assert_eq!(pause.await.unwrap().unwrap().trim(), "PAUSE");
    // As PgBouncer's, PAUSE has closed the server connections.
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let servers = console(port, "admin", "admin-pass", "pgbouncer", "SHOW SERVERS").unwrap();
        if rows_starting(&servers, "S|app|app|").is_empty() {
            break;
        }
        assert!(Instant::now() < end, "server connections left after PAUSE:\n{servers}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A new transaction now waits.
    let t = Instant::now();
    let q = tokio::spawn(async move {
        waiter
            .query_one("SELECT 7::int4", &[])
            .await
            .map(|r| r.get::<_, i32>(0))
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!q.is_finished(), "a transaction ran while paused");
    assert_eq!(
        console(port, "admin", "admin-pass", "pgbouncer", "RESUME app")
            .unwrap()
            .trim(),
        "RESUME"
    );
    assert_eq!(q.await.unwrap().unwrap(), 7);
    assert!(t.elapsed() >= Duration::from_millis(500));
    let e = console(port, "admin", "admin-pass", "pgbouncer", "RESUME").unwrap_err();
    assert!(e.contains("not paused"), "{e}");
}
