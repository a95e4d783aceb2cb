//! Operating a running pgferry through the admin console (psql) and
//! signals: SHOW CLIENTS / SERVERS / LATENCY / PREPARED_STATEMENTS and the
//! averages, KILL_CLIENT, KILL, RECONNECT, WAIT_CLOSE, SET, RELOAD and
//! SIGHUP (a good file, a broken one, a restart-only change), RELOAD while
//! 1000 clients run transactions, and SHUTDOWN.

mod common;

use common::*;
use pgferry_tests::{backend_pid, merge_toml, wait_for_async};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The value column of a SHOW CONFIG row.
fn config_value(port: u16, key: &str) -> String {
    let out = admin(port, "SHOW CONFIG");
    rows_starting(&out, &format!("{key}|"))
        .first()
        .map(|r| r[1].to_owned())
        .unwrap_or_else(|| panic!("no {key} in\n{out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_servers_kill_and_reconnect() {
    let f = ferry("[[database]]\nname = \"app\"\n");
    let port = f.rw_port;
    let (c, conn) = tokio_postgres::connect(
        &format!("{} application_name=probe", f.rw_conn_str("app", APP_PASS, "app")),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let pid = backend_pid(&c).await;

    // The client, with its application_name; its id is in `ptr`.
    let clients = admin(port, "SHOW CLIENTS");
    let me = rows_starting(&clients, "C|app|app|active|127.0.0.1|");
    let me: Vec<_> = me.iter().filter(|r| r[17] == "probe").collect();
    assert_eq!(me.len(), 1, "{clients}");
    let id = me[0][13].to_owned();
    assert_eq!(me[0][7], port.to_string(), "local_port: {clients}");
    assert_eq!(me[0][14], "", "no server linked between transactions");
    // The server it used, idle now, with PostgreSQL's pid.
    let servers = admin(port, "SHOW SERVERS");
    assert!(
        rows_starting(&servers, "S|app|app|idle|")
            .iter()
            .any(|r| r[15] == pid.to_string()),
        "{servers}"
    );
    // Inside a transaction: the client and its server are linked.
    c.batch_execute("BEGIN").await.unwrap();
    let pid = backend_pid(&c).await;
    let servers = admin(port, "SHOW SERVERS");
    let active = rows_starting(&servers, "S|app|app|active|");
    assert!(
        active.iter().any(|r| r[14] == id && r[15] == pid.to_string()),
        "{servers}"
    );
    let clients = admin(port, "SHOW CLIENTS");
    let me = rows_starting(&clients, "C|app|app|active|");
    let server_id = me.iter().find(|r| r[13] == id).unwrap()[14].to_owned();
    assert!(active.iter().any(|r| r[13] == server_id), "{clients}\n{servers}");

    // RECONNECT: the connection in use finishes its transaction, then
    // closes; WAIT_CLOSE returns once it has; the next one is new.
    assert_eq!(admin(port, "RECONNECT app").trim(), "RECONNECT");
    assert_eq!(backend_pid(&c).await, pid, "the open transaction keeps its server");
    let port2 = port;
    let wait = tokio::task::spawn_blocking(move || admin(port2, "WAIT_CLOSE app"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !wait.is_finished(),
        "WAIT_CLOSE returned with the old connection in use"
    );
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(wait.await.unwrap().trim(), "WAIT_CLOSE");
    let new_pid = backend_pid(&c).await;
    assert_ne!(new_pid, pid, "RECONNECT closed the old server connection");
    let gone = primary_sql(&format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"));
    assert_eq!(gone.trim(), "0");

    // KILL_CLIENT: that client is told (57P01) and closed; others go on.
    let other = app(&f).await;
    assert_eq!(admin(port, &format!("KILL_CLIENT {id}")).trim(), "KILL_CLIENT");
    let e = c.simple_query("SELECT 1").await.unwrap_err();
    assert!(
        e.code().map(|c| c.code()) == Some("57P01") || c.is_closed(),
        "killed client: {e}"
    );
    other.simple_query("SELECT 1").await.unwrap();
    let e = console(port, "admin", "admin-pass", "pgbouncer", "KILL_CLIENT 999999999").unwrap_err();
    assert!(e.contains("no client with id"), "{e}");

    // KILL app: its clients are closed and new transactions wait for RESUME.
    assert_eq!(admin(port, "KILL app").trim(), "KILL");
    assert!(other.simple_query("SELECT 1").await.is_err(), "killed by KILL app");
    let late = app(&f).await;
    let q = tokio::spawn(async move { late.query_one("SELECT 5::int4", &[]).await.map(|r| r.get::<_, i32>(0)) });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!q.is_finished(), "a transaction ran on a killed (paused) database");
    let dbs = admin(port, "SHOW DATABASES");
    assert_eq!(rows_starting(&dbs, "app|")[0][11], "1", "paused: {dbs}");
    assert_eq!(admin(port, "RESUME app").trim(), "RESUME");
    assert_eq!(q.await.unwrap().unwrap(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_averages_and_prepared_statements() {
    let f = ferry("[runtime]\nstats_period = \"1s\"\n");
    let port = f.rw_port;
    let c = app(&f).await;
    let stmt = c.prepare("SELECT $1::int4 + 41").await.unwrap();
    // Traffic across at least two stats periods.
    let t = Instant::now();
    let mut n = 0;
    while t.elapsed() < Duration::from_millis(2500) {
        let r = c.query_one(&stmt, &[&1i32]).await.unwrap();
        assert_eq!(r.get::<_, i32>(0), 42);
        c.simple_query("SELECT pg_sleep(0.002)").await.unwrap();
        n += 1;
    }
    let lat = admin(port, "SHOW LATENCY");
    assert!(
        lat.starts_with("database|user|port|node|kind|count|p50_us|p95_us|p99_us|p999_us|max_us"),
        "{lat}"
    );
    for kind in ["wait", "query", "xact"] {
        let rows = rows_starting(&lat, "app|app|rw|");
        let r = rows
            .iter()
            .find(|r| r[4] == kind)
            .unwrap_or_else(|| panic!("{kind}: {lat}"));
        let v: Vec<u64> = r[5..].iter().map(|v| v.parse().unwrap()).collect();
        assert!(v[0] >= 10, "{kind} count: {lat}");
        assert!(
            v[1] <= v[2] && v[2] <= v[3] && v[3] <= v[4] && v[4] <= v[5],
            "{kind}: {lat}"
        );
        if kind == "xact" {
            // Half the transactions sleep 2 ms on the server.
            assert!(v[3] >= 2000, "xact p99 includes pg_sleep(0.002): {lat}");
        }
    }
    let avg = admin(port, "SHOW STATS_AVERAGES");
    let row = &rows_starting(&avg, "app|")[0];
    let xacts_per_sec: u64 = row[1].parse().unwrap();
    assert!(xacts_per_sec > 10, "{avg} ({n} loops)");
    let xact_time: u64 = row[5].parse().unwrap();
    assert!(xact_time > 0, "{avg}");
    let stats = admin(port, "SHOW STATS");
    let row = &rows_starting(&stats, "app|")[0];
    assert!(row[8].parse::<u64>().unwrap() > 10, "avg_xact_count: {stats}");
    // The prepared statement, shared under pgferry's name.
    let ps = admin(port, "SHOW PREPARED_STATEMENTS");
    assert!(ps.starts_with("name|client_refs|verified|query"), "{ps}");
    assert!(
        ps.lines()
            .any(|l| l.starts_with("pgferry_") && l.ends_with("|1|true|SELECT $1::int4 + 41")),
        "{ps}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_reload_and_sighup() {
    let mut f = ferry("[pool]\npool_size = 5\n");
    let port = f.rw_port;
    let c = app(&f).await;
    c.simple_query("SELECT 1").await.unwrap();

    // SET: a reloadable setting changes; others are refused by name.
    assert_eq!(admin(port, "SET default_pool_size = 3").trim(), "SET");
    assert_eq!(config_value(port, "default_pool_size"), "3");
    let cfg = admin(port, "SHOW CONFIG");
    assert!(cfg.contains("\ndefault_pool_size|3|20|yes\n"), "{cfg}");
    let e = console(port, "admin", "admin-pass", "pgbouncer", "SET listen_rw = '1.2.3.4:5'").unwrap_err();
    assert!(e.contains("restart"), "{e}");
    let e = console(
        port,
        "admin",
        "admin-pass",
        "pgbouncer",
        "SET query_wait_timeout = soon",
    )
    .unwrap_err();
    assert!(e.contains("invalid duration"), "{e}");
    let e = console(port, "admin", "admin-pass", "pgbouncer", "SET min_pool_size = 50").unwrap_err();
    assert!(e.contains("min_pool_size cannot exceed"), "{e}");
    // The client never noticed (its pool was replaced between transactions).
    c.simple_query("SELECT 1").await.unwrap();

    // RELOAD of an edited file.
    let original = std::fs::read_to_string(&f.config_path).unwrap();
    let edit = |extra: &str| std::fs::write(&f.config_path, merge_toml(&original, extra).unwrap()).unwrap();
    edit("[pool]\npool_size = 7\n");
    assert_eq!(admin(port, "RELOAD").trim(), "RELOAD");
    assert_eq!(config_value(port, "default_pool_size"), "7");
    c.simple_query("SELECT 1").await.unwrap();
    // A broken file is refused and the running configuration stays.
    std::fs::write(&f.config_path, "[pool]\npool_size = \"many\"\n").unwrap();
    let e = console(port, "admin", "admin-pass", "pgbouncer", "RELOAD").unwrap_err();
    assert!(e.contains("reload refused"), "{e}");
    assert_eq!(config_value(port, "default_pool_size"), "7");
    // A restart-only change is named and not applied.
    edit("[pool]\npool_size = 8\n[limits]\nmax_client_conn = 77\n");
    admin(port, "RELOAD");
    assert_eq!(config_value(port, "default_pool_size"), "8");
    assert_ne!(config_value(port, "max_client_conn"), "77");
    assert!(f.log().contains("limits.max_client_conn"), "{}", f.log());
    // SIGHUP does the same as RELOAD.
    edit("[pool]\npool_size = 9\n");
    f.signal(libc::SIGHUP).unwrap();
    wait_for_async("SIGHUP reload", Duration::from_secs(15), || async {
        config_value(port, "default_pool_size") == "9"
    })
    .await;
    c.simple_query("SELECT 1").await.unwrap();
    assert!(!f.log().contains("panicked"));
}

/// RELOAD (each one replacing the pool) and SIGHUP while 1000 clients run
/// transactions: 0 errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_1000_clients() {
    const CLIENTS: usize = 1000;
    pgferry_tests::raise_nofile().expect("raise RLIMIT_NOFILE");
    let mut f = ferry(
        "[pool]\npool_size = 20\nquery_wait_timeout = \"60s\"\n[limits]\nmax_client_conn = 2000\nclient_login_timeout = \"60s\"\n\
         max_pending_logins_per_address = 0\n",
    );
    let conn_str = f.rw_conn_str("app", APP_PASS, "app");
    let errors = Arc::new(AtomicUsize::new(0));
    let xacts = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let limit = Arc::new(tokio::sync::Semaphore::new(100));
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let (conn_str, errors, xacts, limit, mut stop_rx) = (
            conn_str.clone(),
            errors.clone(),
            xacts.clone(),
            limit.clone(),
            stop_rx.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let permit = limit.acquire().await.unwrap();
            let r = tokio_postgres::connect(&conn_str, tokio_postgres::NoTls).await;
            drop(permit);
            let (c, conn) = match r {
                Ok(x) => x,
                Err(e) => {
                    if errors.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("connect {i}: {e}");
                    }
                    return;
                }
            };
            tokio::spawn(conn);
            let mut n = 0i64;
            while !*stop_rx.borrow_and_update() {
                // A two-statement transaction, so that a reload can land
                // in the middle of one.
                let r = async {
                    c.batch_execute("BEGIN").await?;
                    let v: i64 = c.query_one("SELECT $1::int8 * 2", &[&n]).await?.get(0);
                    c.batch_execute("COMMIT").await?;
                    Ok::<_, tokio_postgres::Error>(v)
                }
                .await;
                match r {
                    Ok(v) if v == n * 2 => {
                        xacts.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        if errors.fetch_add(1, Ordering::Relaxed) < 5 {
                            eprintln!("client {i}: {other:?}");
                        }
                    }
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    // Wait until every client is connected and working.
    let t = Instant::now();
    // psql prints a header, the rows and a footer.
    while admin(f.rw_port, "SHOW CLIENTS").lines().count() < CLIENTS + 2 {
        assert!(t.elapsed() < Duration::from_secs(120), "clients did not connect");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let original = std::fs::read_to_string(&f.config_path).unwrap();
    let before = xacts.load(Ordering::Relaxed);
    for round in 0..6 {
        let size = if round % 2 == 0 { 15 } else { 20 };
        std::fs::write(
            &f.config_path,
            merge_toml(&original, &format!("[pool]\npool_size = {size}\n")).unwrap(),
        )
        .unwrap();
        if round == 3 {
            f.signal(libc::SIGHUP).unwrap();
        } else {
            assert_eq!(admin(f.rw_port, "RELOAD").trim(), "RELOAD");
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(config_value(f.rw_port, "default_pool_size"), size.to_string());
    }
    let during = xacts.load(Ordering::Relaxed) - before;
    stop_tx.send_replace(true);
    for t in tasks {
        t.await.unwrap();
    }
    let errors = errors.load(Ordering::Relaxed);
    eprintln!("{during} transactions during 6 reloads, {errors} errors");
    assert_eq!(errors, 0, "{}", pgferry_tests::tail_file(&f.log_path, 40));
    assert!(during > 1000, "transactions went on during the reloads: {during}");
    // Server connections stayed bounded: at most the old and the new pool.
    let servers =
        primary_sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend'");
    assert!(servers.trim().parse::<usize>().unwrap() <= 40, "{servers}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_from_the_console_is_graceful() {
    let mut f = ferry("");
    let c = app(&f).await;
    c.batch_execute("BEGIN").await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    assert_eq!(admin(f.rw_port, "SHUTDOWN").trim(), "SHUTDOWN");
    // The open transaction may finish; then the process exits by itself.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(f.is_running(), "exited with a transaction in flight");
    c.simple_query("SELECT 2").await.unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    let status = f.wait_exit(Duration::from_secs(15)).unwrap();
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{}", f.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_clients_show_in_pools_and_clients() {
    let f = ferry("[pool]\npool_size = 1\n");
    let port = f.rw_port;
    let holder = app(&f).await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder.simple_query("SELECT 1").await.unwrap();
    let waiter = app(&f).await;
    let q = tokio::spawn(async move { waiter.simple_query("SELECT 1").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let clients = admin(port, "SHOW CLIENTS");
    let waiting = rows_starting(&clients, "C|app|app|waiting|");
    assert_eq!(waiting.len(), 1, "{clients}");
    assert_eq!(waiting[0][10], "1", "wait (s): {clients}");
    let pools = admin(port, "SHOW POOLS");
    let row = &rows_starting(&pools, "app|app|")[0];
    assert_eq!((row[2], row[3], row[6]), ("2", "1", "1"), "{pools}");
    assert_eq!(row[13], "1", "maxwait (s): {pools}");
    holder.batch_execute("COMMIT").await.unwrap();
    q.await.unwrap().unwrap();
    let clients = admin(port, "SHOW CLIENTS");
    assert!(rows_starting(&clients, "C|app|app|waiting|").is_empty(), "{clients}");
}
