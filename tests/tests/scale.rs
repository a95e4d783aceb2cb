//! 10,000 concurrent clients through a pool of at most 20 server
//! connections, each running a few transactions. Bounded in time; loopback.

mod common;

use common::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CLIENTS: usize = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_clients_on_twenty_server_connections() {
    pgferry_tests::raise_nofile().expect("raise RLIMIT_NOFILE");
    let f = ferry("[pool]\npool_size = 20\nquery_wait_timeout = \"120s\"\n[limits]\nmax_client_conn = 12000\nclient_login_timeout = \"120s\"\nmax_pending_logins_per_address = 0\n[listen]\nbacklog = 8192\n");
    let conn_str = f.rw_conn_str("app", APP_PASS, "app");
    let rss_idle = rss_kib(f.pid());
    let errors = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let connected = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let start = Instant::now();
    let limit = Arc::new(tokio::sync::Semaphore::new(200));
    let mut tasks = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        let (conn_str, errors, done, connected, limit) = (
            conn_str.clone(),
            errors.clone(),
            done.clone(),
            connected.clone(),
            limit.clone(),
        );
        tasks.push(tokio::spawn(async move {
            // Bounded concurrency for connection setup only (SCRAM costs CPU).
            let permit = limit.acquire().await.unwrap();
            let r = tokio_postgres::connect(&conn_str, tokio_postgres::NoTls).await;
            drop(permit);
            let (c, conn) = match r {
                Ok(x) => x,
                Err(e) => {
                    if errors.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("connect {i}: {e}");
                    }
                    connected.wait().await;
                    return None;
                }
            };
            let h = tokio::spawn(conn);
            // Every client is connected at the same time before any query runs.
            connected.wait().await;
            for n in 0..3i32 {
                match c.query_one("SELECT $1::int + 1", &[&n]).await {
                    Ok(r) if r.get::<_, i32>(0) == n + 1 => {}
                    other => {
                        if errors.fetch_add(1, Ordering::Relaxed) < 5 {
                            eprintln!("query {i}: {other:?}");
                        }
                    }
                }
            }
            done.fetch_add(1, Ordering::Relaxed);
            Some((c, h))
        }));
    }
    let mut held = Vec::new();
    for t in tasks {
        held.push(
            tokio::time::timeout(Duration::from_secs(300), t)
                .await
                .expect("bounded in time")
                .unwrap(),
        );
    }
    let elapsed = start.elapsed();
    let servers =
        primary_sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend'");
    eprintln!(
        "{CLIENTS} clients, {} done, {} errors, {elapsed:?}, {servers} server connections",
        done.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed)
    );
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "{}",
        f.log().lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    assert_eq!(done.load(Ordering::Relaxed), CLIENTS);
    assert!(
        servers.parse::<usize>().unwrap() <= 20,
        "at most pool_size server connections: {servers}"
    );
    // Once the clients are gone, pgferry gives the memory back (a periodic
    // malloc_trim; glibc alone would keep RSS at the high-water mark).
    let rss_held = rss_kib(f.pid());
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(75);
    let mut rss = rss_kib(f.pid());
    while rss > rss_idle + (rss_held - rss_idle) / 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss = rss_kib(f.pid());
    }
    eprintln!("RSS: {rss_idle} KiB before, {rss_held} KiB with {CLIENTS} clients, {rss} KiB after they left");
    assert!(
        rss <= rss_idle + (rss_held - rss_idle) / 2,
        "memory not given back after the clients left: {rss_idle} KiB before, {rss_held} KiB held, {rss} KiB 75 s after"
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line["VmRSS:".len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap()
}
