//! Parked clients (`park_idle_after`): an idle plain-TCP client gives up its
//! task and buffers and waits in a shared epoll set; when it sends again its
//! session is rebuilt. Nothing it set up may be lost (parameters, named
//! statements, its cancel key), and everything that reaches idle sessions
//! must reach parked ones: KILL_CLIENT, the idle timeout, a drain, the
//! client leaving.

mod common;

use common::*;
use pgferry_tests::{backend_pid, Ferry};
use std::time::{Duration, Instant};

/// Parks clients after 200 ms of quiet (asked within 300 ms).
const FAST_PARKING: &str = "[runtime]\npark_idle_after = \"200ms\"\n";

/// (clients parked now, parkings since start), from `/metrics`.
async fn parked(f: &Ferry) -> (u64, u64) {
    let (code, body) = get(http_port(f), "/metrics").await;
    assert_eq!(code, 200);
    let value = |name: &str| -> u64 {
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
            .trim()
            .parse()
            .unwrap()
    };
    (value("pgferry_clients_parked"), value("pgferry_client_parks_total"))
}

/// Waits until `want` clients are parked (at most 5 s).
async fn until_parked(f: &Ferry, want: u64) -> (u64, u64) {
    let t = Instant::now();
    loop {
        let p = parked(f).await;
        if p.0 == want {
            return p;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "parked {p:?}, want {want}\n{}",
            f.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_client_keeps_its_parameters_statements_and_cancel_key() {
    let f = ferry(&format!("{FAST_PARKING}[pool]\npool_size = 2\n"));
    let c = app(&f).await;
    c.batch_execute("SET work_mem = '7MB'; SET application_name = 'parked-one'")
        .await
        .unwrap();
    // tokio-postgres names its statements: pgferry renames them per server.
    let stmt = c.prepare("SELECT $1::int + 1").await.unwrap();
    let (_, parks_before) = until_parked(&f, 1).await;
    assert!(parks_before >= 1);

    // Woken by its next request, which runs as if nothing happened.
    let row = c.query_one(&stmt, &[&41i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    for (name, want) in [("work_mem", "7MB"), ("application_name", "parked-one")] {
        let show = c.simple_query(&format!("SHOW {name}")).await.unwrap();
        let got = show.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        });
        assert_eq!(got.as_deref(), Some(want), "{name}");
    }
    // Parked again once idle, and still listed.
    let (_, parks_after) = until_parked(&f, 1).await;
    assert!(
        parks_after > parks_before,
        "parked again: {parks_before} -> {parks_after}"
    );
    let clients = admin(f.rw_port, "SHOW CLIENTS");
    assert_eq!(rows_starting(&clients, "C|app|app|").len(), 1, "{clients}");
    // Its statement survives a second parking too, and its cancel key
    // still reaches the query it runs.
    assert_eq!(c.query_one(&stmt, &[&1i32]).await.unwrap().get::<_, i32>(0), 2);
    let cancel = c.cancel_token();
    let slow = c.simple_query("SELECT pg_sleep(30)");
    let canceller = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
    };
    let t = Instant::now();
    let (r, ()) = tokio::join!(slow, canceller);
    let e = r.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("57014"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(10));
    // Every client counted once in SHOW POOLS, parked or not.
    let pools = admin(f.rw_port, "SHOW POOLS");
    let app_pool = rows_starting(&pools, "app|app|");
    assert_eq!(app_pool[0][2], "1", "cl_active: {pools}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_that_wakes_a_parked_client_is_answered_whole() {
    // The request that wakes the client arrives as several messages at
    // once (Parse/Bind/Execute/Sync twice, then a query): all of it is read
    // by the rebuilt session, nothing dropped, in order.
    let f = ferry(FAST_PARKING);
    let mut r = Raw::login(f.rw_port, "app", APP_PASS).await;
    until_parked(&f, 1).await;
    let mut b = bytes::BytesMut::new();
    for v in ["1", "2"] {
        // No parameter types; no formats, parameters or result formats.
        pgferry_protocol::encode::parse(&mut b, b"", format!("SELECT {v}").as_bytes(), b"\0\0");
        pgferry_protocol::encode::bind(&mut b, b"", b"", b"\0\0\0\0\0\0");
        pgferry_protocol::encode::execute(&mut b, b"", 0);
        pgferry_protocol::encode::sync(&mut b);
    }
    r.send(&b).await;
    let first = r.until_ready().await;
    let second = r.until_ready().await;
    assert_eq!(rows(&first), vec![vec![Some("1".to_owned())]]);
    assert_eq!(rows(&second), vec![vec![Some("2".to_owned())]]);
    let third = r.query("SELECT 3").await;
    assert_eq!(rows(&third), vec![vec![Some("3".to_owned())]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_client_reaches_a_parked_client() {
    let f = ferry(FAST_PARKING);
    let mut r = Raw::login(f.rw_port, "app", APP_PASS).await;
    until_parked(&f, 1).await;
    let clients = admin(f.rw_port, "SHOW CLIENTS");
    let me = rows_starting(&clients, "C|app|app|");
    assert_eq!(me.len(), 1, "{clients}");
    let t = Instant::now();
    assert_eq!(
        admin(f.rw_port, &format!("KILL_CLIENT {}", me[0][13])).trim(),
        "KILL_CLIENT"
    );
    let got = r.until_closed().await;
    assert_eq!(error_code(&got).as_deref(), Some("57P01"), "{}", tags(&got));
    assert!(t.elapsed() < Duration::from_secs(2), "told at once, not at a sweep");
    until_parked(&f, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_timeout_runs_on_while_parked() {
    let f = ferry(&format!("{FAST_PARKING}[limits]\nclient_idle_timeout = \"1500ms\"\n"));
    let mut r = Raw::login(f.rw_port, "app", APP_PASS).await;
    let t = Instant::now();
    r.query("SELECT 1").await;
    until_parked(&f, 1).await;
    let got = r.until_closed().await;
    let took = t.elapsed();
    assert_eq!(error_code(&got).as_deref(), Some("57P05"), "{}", tags(&got));
    // Counted from the last request, not from the parking; checked once a
    // second while parked.
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_millis(3500),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_client_that_leaves_is_forgotten() {
    let f = ferry(FAST_PARKING);
    let r = Raw::login(f.rw_port, "app", APP_PASS).await;
    let keep = Raw::login(f.rw_port, "app", APP_PASS).await;
    until_parked(&f, 2).await;
    drop(r);
    until_parked(&f, 1).await;
    let t = Instant::now();
    loop {
        let clients = admin(f.rw_port, "SHOW CLIENTS");
        let n = rows_starting(&clients, "C|app|app|").len();
        if n == 1 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{clients}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pools = admin(f.rw_port, "SHOW POOLS");
    assert_eq!(rows_starting(&pools, "app|app|")[0][2], "1", "cl_active: {pools}");
    drop(keep);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_or_a_session_mode_server_is_never_parked() {
    let f = ferry(FAST_PARKING);
    let c = app(&f).await;
    c.batch_execute("BEGIN; SELECT 1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(parked(&f).await.0, 0, "parked inside a transaction");
    c.batch_execute("COMMIT").await.unwrap();
    until_parked(&f, 1).await;

    let s = ferry(&format!("{FAST_PARKING}[pool]\npool_mode = \"session\"\n"));
    let c = app(&s).await;
    let pid = backend_pid(&c).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(parked(&s).await.0, 0, "a session-mode client holds its server");
    assert_eq!(backend_pid(&c).await, pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_parked_clients() {
    let cluster = pgferry_tests::shared_cluster();
    let dir = std::env::temp_dir().join(format!("pgferry-parking-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut f = Ferry::start(&Ferry::cluster_config(cluster, &dir, FAST_PARKING).unwrap()).unwrap();
    let mut r = Raw::login(f.rw_port, "app", APP_PASS).await;
    until_parked(&f, 1).await;
    let t = Instant::now();
    f.signal(libc::SIGTERM).unwrap();
    let got = r.until_closed().await;
    assert_eq!(error_code(&got).as_deref(), Some("57P01"), "{}", tags(&got));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(f.wait_exit(Duration::from_secs(10)).unwrap().is_some(), "{}", f.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parking_off_keeps_sessions_running() {
    let f = ferry("[runtime]\npark_idle_after = \"0s\"\n");
    let c = app(&f).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(parked(&f).await, (0, 0));
    c.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_park_and_resume_on_every_runtime_shape() {
    // One event loop (current-thread), and four loops with one parker each
    // (thread-per-core): every loop parks and resumes its own clients.
    for runtime in [
        "worker_threads = 1",
        "worker_threads = 4\nscheduler = \"thread-per-core\"",
    ] {
        let f = ferry(&format!("{FAST_PARKING}{runtime}\n"));
        let mut clients = Vec::new();
        for _ in 0..12 {
            clients.push(app(&f).await);
        }
        until_parked(&f, 12).await;
        for round in 0..2 {
            for (i, c) in clients.iter().enumerate() {
                let n = i as i32 + round;
                let row = c.query_one("SELECT $1::int * 2", &[&n]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), n * 2, "{runtime}");
            }
            until_parked(&f, 12).await;
        }
    }
}

/// `pgferry_client_state_bytes` from `/metrics`.
async fn state_bytes(f: &Ferry) -> u64 {
    let (code, body) = get(http_port(f), "/metrics").await;
    assert_eq!(code, 200);
    body.lines()
        .find_map(|l| l.strip_prefix("pgferry_client_state_bytes "))
        .expect("pgferry_client_state_bytes in /metrics")
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_long_lived_state_is_in_the_slab_and_leaves_with_them() {
    // Each client's registry entry and parameters live in the slab
    // (memory.rs), so that parking frees whole pages: the slab grows with
    // the clients, and its pages go back once they leave.
    let f = ferry(FAST_PARKING);
    let before = state_bytes(&f).await;
    let mut clients = Vec::new();
    for _ in 0..1000 {
        clients.push(Raw::login(f.rw_port, "app", APP_PASS).await);
    }
    until_parked(&f, 1000).await;
    let held = state_bytes(&f).await;
    // At least the 256-byte registry entry each (16 per page): 62 pages,
    // well beyond the 30 that may stay once they leave.
    assert!(
        held >= before + 60 * 4096,
        "slab {before} -> {held} bytes for 1000 clients"
    );
    // Dense: under 1 KiB of slab per client.
    assert!(
        held - before < 1000 * 1024,
        "slab {before} -> {held} bytes for 1000 clients"
    );
    drop(clients);
    until_parked(&f, 0).await;
    let t = Instant::now();
    loop {
        let after = state_bytes(&f).await;
        // (Two emptied pages per size class are kept for reuse, see
        // memory.rs: a handful of classes hold client state.)
        if after <= before + 30 * 4096 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "slab {before} -> {held} -> {after} bytes after the clients left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
