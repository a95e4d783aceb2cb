//! Shutdown and upgrades: SIGTERM closes idle clients with 57P01 and lets
//! a transaction in flight finish; with `reuse_port` a second pgferry binds
//! the same ports (SO_REUSEPORT) and takes over while the first drains,
//! under load, with no refused connection and no failed transaction;
//! without it a second pgferry on a port in use refuses to start.

mod common;

use common::*;
use pgferry_tests::Ferry;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn config(extra: &str) -> String {
    let cluster = pgferry_tests::shared_cluster();
    let dir = std::env::temp_dir().join(format!("pgferry-lifecycle-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let extra = format!("[runtime]\nshutdown_timeout = \"10s\"\n{extra}");
    Ferry::cluster_config(cluster, &dir, &extra).unwrap()
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_idle_clients_and_lets_transactions_finish() {
    // reuse_port: the HTTP endpoints serve through the drain.
    let mut f = Ferry::start(&config("[listen]\nreuse_port = true\n")).unwrap();
    let idle = app(&f).await;
    let busy = app(&f).await;
    busy.batch_execute("BEGIN").await.unwrap();
    busy.simple_query("SELECT 1").await.unwrap();
    let http = http_port(&f);
    assert_eq!(get(http, "/ready").await.0, 200);
    f.signal(libc::SIGTERM).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // While it drains, the HTTP endpoints answer: not ready (no new
    // clients), but alive, and the metrics still come (with reuse_port,
    // as in a rolling restart).
    let (code, body) = get(http, "/ready").await;
    assert_eq!(
        (code, body.as_str()),
        (503, "not ready: pgferry is shutting down (draining)\n")
    );
    assert_eq!(get(http, "/health").await, (200, "ok: draining\n".to_owned()));
    assert_eq!(get(http, "/metrics").await.0, 200);
    // The idle client was told why it was closed.
    let e = idle.simple_query("SELECT 1").await.unwrap_err();
    assert!(
        e.as_db_error().is_some_and(|d| d.code().code() == "57P01") || idle.is_closed(),
        "{e}"
    );
    // The transaction in flight goes on and commits.
    busy.simple_query("SELECT 2")
        .await
        .expect("the open transaction continues");
    busy.batch_execute("COMMIT").await.expect("and commits");
    // Then pgferry exits, without waiting for shutdown_timeout.
    let t = Instant::now();
    let status = tokio::task::block_in_place(|| f.wait_exit(Duration::from_secs(8))).unwrap();
    assert!(status.is_some(), "pgferry did not exit:\n{}", f.log());
    assert!(t.elapsed() < Duration::from_secs(5));
    let log = f.log();
    assert!(
        log.contains("SIGTERM: graceful shutdown") && log.contains("all clients gone"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_load() {
    let cfg = config("[listen]\nreuse_port = true\n");
    let mut old = Ferry::start(&cfg).unwrap();
    let port = old.rw_port;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (stop, ok, cs) = (stop.clone(), ok.clone(), old.rw_conn_str("app", APP_PASS, "app"));
        tasks.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                // A new connection for every transaction: every one of them
                // must be accepted by one pgferry or the other.
                match tokio_postgres::connect(&cs, tokio_postgres::NoTls).await {
                    Ok((c, conn)) => {
                        let h = tokio::spawn(conn);
                        match c.query_one("SELECT 1::int4", &[]).await {
                            Ok(_) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => errors.push(format!("query: {e:?}")),
                        }
                        drop(c);
                        let _ = h.await;
                    }
                    Err(e) => errors.push(format!("connect: {e:?}")),
                }
            }
            errors
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The new process binds the same ports while the old one still runs.
    let new = Ferry::start(&cfg).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while !new.log().contains("listening") {
        assert!(Instant::now() < end, "the new pgferry did not bind:\n{}", new.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = ok.load(Ordering::Relaxed);
    old.signal(libc::SIGTERM).unwrap();
    let status = tokio::task::block_in_place(|| old.wait_exit(Duration::from_secs(15))).unwrap();
    assert!(status.is_some(), "the old pgferry did not exit:\n{}", old.log());
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for t in tasks {
        errors.extend(t.await.unwrap());
    }
    let after = ok.load(Ordering::Relaxed);
    println!(
        "rolling restart: {after} transactions ({} after the new pgferry started), errors: {errors:?}",
        after - before
    );
    assert!(
        errors.is_empty(),
        "refused connections or failed transactions: {errors:?}"
    );
    assert!(after > before + 50, "the new pgferry served the load");
    assert!(port > 0 && new.log().contains("client logged in"));
}

/// Without `reuse_port`, a second pgferry on ports in use exits at start
/// (non-zero, with an error naming the address), and the first keeps its
/// clients. (Run directly, not through `Ferry::start`, whose readiness
/// probe would find the first one listening.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_use_stops_the_start_without_reuse_port() {
    let first = Ferry::start(&config("")).unwrap();
    let c = app(&first).await;
    let mut second = std::process::Command::new(pgferry_tests::pgferry_bin().unwrap())
        .arg("--config")
        .arg(&first.config_path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = second.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > end {
            second.kill().unwrap();
            panic!("a second pgferry kept running on ports in use");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let out = second.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "{err}");
    let addr = format!("127.0.0.1:{}", first.rw_port);
    assert!(
        err.contains(&format!("cannot listen on {addr}")) && err.contains("reuse_port"),
        "{err}"
    );
    assert_eq!(c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    let next = app(&first).await;
    assert_eq!(next.query_one("SELECT 2", &[]).await.unwrap().get::<_, i32>(0), 2);
}
