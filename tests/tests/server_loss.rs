//! What clients are told when a server connection dies (issue 13, items 1,
//! 2 and 7, without Patroni): nothing at all when none of their bytes had
//! been sent, "unknown" (08007) when a statement was running, "rolled back"
//! only when that is certain; and one log line per pool per second while a
//! server refuses connections, however many clients wait.

mod common;

use common::*;
use std::time::{Duration, Instant};

/// The pid of the idle backend of pgferry's pool with `app_name`.
fn idle_backend(app_name: &str) -> Option<String> {
    let out = primary_sql(&format!(
        "SELECT pid FROM pg_stat_activity \
         WHERE usename = 'app' AND application_name = '{app_name}' AND state = 'idle'"
    ));
    let pid = out.trim();
    (!pid.is_empty()).then(|| pid.to_owned())
}

fn signal(pid: &str, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, pid])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// A pooled connection stops answering (its backend frozen with SIGSTOP,
/// as a server that dies without closing its sockets); the next client's
/// settings differ, so pgferry first syncs them on it, and that fails
/// (after the 10 s bound on its own queries). None of the client's bytes
/// were sent: it gets a fresh connection, not an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_connection_found_before_the_clients_request_is_replaced() {
    let f = ferry("[pool]\npool_size = 2\n");
    let conn = |name: &str| format!("{} application_name={name}", f.rw_conn_str("app", APP_PASS, "app"));
    let c = pgferry_tests::connect(&conn("frozen")).await.unwrap();
    c.query_one("SELECT 1", &[]).await.unwrap();
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(5);
    let pid = loop {
        if let Some(pid) = idle_backend("frozen") {
            break pid;
        }
        assert!(Instant::now() < deadline, "no idle backend");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    signal(&pid, "-STOP");
    let other = pgferry_tests::connect(&conn("second")).await.unwrap();
    let r = other.query_one("SELECT 5", &[]).await;
    signal(&pid, "-CONT");
    let v: i32 = r.unwrap_or_else(|e| panic!("{e}\n{}", f.log())).get(0);
    assert_eq!(v, 5);
    assert!(f.log().contains("retrying"), "the frozen connection was used first");
}

/// A statement running when its backend dies: its outcome is unknown
/// (08007). An idle transaction block when its backend dies: rolled back,
/// said at the client's next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_outcomes_are_08007_and_rollbacks_are_certain() {
    let f = ferry("[pool]\npool_size = 2\n");
    let mut a = Raw::login(f.rw_port, "app", APP_PASS).await;
    let pid = rows(&a.query("SELECT pg_backend_pid()").await)[0][0].clone().unwrap();
    let mut b = bytes::BytesMut::new();
    pgferry_protocol::encode::query(&mut b, b"SELECT pg_sleep(30)");
    a.send(&b).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    primary_sql(&format!("SELECT pg_terminate_backend({pid})"));
    let got = a.until_ready().await;
    assert_eq!(error_code(&got).as_deref(), Some("08007"), "{}", tags(&got));
    assert_eq!(rows(&a.query("SELECT 1").await), vec![vec![Some("1".into())]]);

    primary_sql("CREATE TABLE IF NOT EXISTS server_loss_rows (n int); GRANT ALL ON server_loss_rows TO app");
    assert_eq!(tags(&a.query("BEGIN").await), "C Z");
    assert_eq!(tags(&a.query("INSERT INTO server_loss_rows VALUES (1)").await), "C Z");
    let pid = rows(&a.query("SELECT pg_backend_pid()").await)[0][0].clone().unwrap();
    primary_sql(&format!("SELECT pg_terminate_backend({pid})"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = a.query("SELECT 2").await;
    let e = got.iter().find(|m| m.tag == b'E').expect("an error");
    let e = pgferry_protocol::backend::error_fields(e.body()).unwrap();
    assert_ne!(e.code, "08007");
    assert!(e.message.contains("rolled back"), "{}", e.message);
    let left = primary_sql("SELECT count(*) FROM server_loss_rows");
    assert_eq!(left.trim(), "0", "a write told 'rolled back' must be absent");
    assert_eq!(rows(&a.query("SELECT 3").await), vec![vec![Some("3".into())]]);
}

/// A server that refuses connections while 10 clients ask for one: the
/// "server connection failed" warning comes once per second with a count,
/// not once per client per attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_failures_are_logged_once_per_second() {
    let dead = pgferry_tests::free_port();
    let f = ferry(&format!("[topology]\nprimary = \"127.0.0.1:{dead}\"\nstandbys = []\n"));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let conn_str = f.rw_conn_str("app", APP_PASS, "app");
        tasks.push(tokio::spawn(async move {
            match tokio_postgres::connect(&conn_str, tokio_postgres::NoTls).await {
                Ok((c, conn)) => {
                    tokio::spawn(conn);
                    c.query_one("SELECT 1", &[]).await.is_err()
                }
                Err(_) => true,
            }
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap(), "no server: every client gets an error");
    }
    let secs = started.elapsed().as_secs() as usize;
    let lines = f
        .log()
        .lines()
        .filter(|l| l.contains("server connection failed"))
        .count();
    assert!(
        lines >= 1 && lines <= secs + 2,
        "{lines} lines in {secs} s:\n{}",
        f.log()
    );
}
