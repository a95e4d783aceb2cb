//! The etcd topology source against a real etcd, with Patroni's keys
//! written by the test (plain and Citus layouts) and pointing at the shared
//! PostgreSQL primary and standby: routing, holding transactions while there
//! is no leader, cutting the old leader's connections, never sending writes
//! to a node that is not writable, replica lag, and etcd outages.
//! (tests/patroni_failover.rs does the same with real Patroni.)

mod common;

use common::*;
use pgferry_tests::Ferry;
use pgferry_tests::{in_recovery, patroni_member_json, Etcd};
use std::time::{Duration, Instant};

/// pgferry in front of the shared cluster, following `scope` in `etcd`.
fn etcd_ferry(etcd: &Etcd, scope: &str, citus: bool, extra_topology: &str, extra: &str) -> Ferry {
    let cluster = pgferry_tests::shared_cluster();
    let dir = std::env::temp_dir().join(format!("pgferry-etcd-cfg-{scope}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base = Ferry::cluster_config(cluster, &dir, extra).unwrap();
    let mut t: toml::Table = base.parse().unwrap();
    let topo = format!(
        "source = \"etcd\"\nendpoints = [\"{}\"]\nscope = \"{scope}\"\ncitus = {citus}\ncheck_user = \"postgres\"\n{extra_topology}\n",
        etcd.endpoint()
    );
    t.insert("topology".into(), toml::Value::Table(topo.parse().unwrap()));
    Ferry::start(&toml::to_string(&t).unwrap()).expect("start pgferry")
}

async fn ro(f: &Ferry) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(&f.ro_conn_str("app", APP_PASS, "app"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c
}

/// A fresh etcd with Patroni's keys for the shared cluster under
/// `/service/{scope}/`: pg1 the primary and leader, pg2 the standby, both
/// at WAL position `xlog`. Returns etcd, the key prefix and the standby's port.
fn two_members(scope: &str, xlog: u64) -> (Etcd, String, u16) {
    let cluster = pgferry_tests::shared_cluster();
    let (p, s) = (cluster.primary_port, cluster.standby_port.unwrap());
    let etcd = Etcd::start().unwrap();
    let pre = format!("/service/{scope}/");
    etcd.put(
        &format!("{pre}members/pg1"),
        &patroni_member_json("master", "running", p, xlog),
    )
    .unwrap();
    etcd.put(
        &format!("{pre}members/pg2"),
        &patroni_member_json("replica", "running", s, xlog),
    )
    .unwrap();
    etcd.put(&format!("{pre}leader"), "pg1").unwrap();
    // Members publish once per loop_wait: lag readings are judged on that
    // cadence (a replica leaves after lagging for loop_wait + 1 s).
    etcd.put(&format!("{pre}config"), r#"{"ttl":30,"loop_wait":1}"#)
        .unwrap();
    (etcd, pre, s)
}

/// Waits until `needle` appears `n` times in pgferry's log.
fn wait_count(f: &Ferry, needle: &str, n: usize, timeout: Duration) {
    let end = Instant::now() + timeout;
    while f.log().matches(needle).count() < n {
        assert!(Instant::now() < end, "{needle:?} not seen {n} times:\n{}", f.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_key_routes_writes_and_lag_routes_reads() {
    let (etcd, pre, s) = two_members("plain", 5000);
    etcd.put(&format!("{pre}status"), r#"{"optime":5000}"#).unwrap();
    let f = etcd_ferry(&etcd, "plain", false, "max_replica_lag = 1000", "");

    let rw = app(&f).await;
    assert!(!in_recovery(&rw).await, "5432 goes to the leader");
    let r = ro(&f).await;
    assert!(in_recovery(&r).await, "5433 goes to the replica");
    let log = f.log();
    assert!(log.contains("leader confirmed writable"), "{log}");

    // The replica falls behind: new read-only transactions go elsewhere (the
    // leader, as ro_fallback_to_primary allows), with no error.
    etcd.put(&format!("{pre}status"), r#"{"optime":9000000}"#).unwrap();
    // Its key, never rewritten, vouches for its position one loop (+ 1 s)
    // later; then it stays behind for the hold (loop_wait + 1 s).
    f.wait_log("standbys=[]", Duration::from_secs(10));
    assert!(!in_recovery(&r).await, "a lagging replica gets no new transactions");
    // It catches up: reads go back to it.
    etcd.put(
        &format!("{pre}members/pg2"),
        &patroni_member_json("replica", "running", s, 9000000),
    )
    .unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while !in_recovery(&r).await {
        assert!(Instant::now() < end, "reads did not return to the replica");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // noloadbalance takes it out too.
    let tagged = patroni_member_json("replica", "running", s, 9000000)
        .replace(r#""timeline":1"#, r#""timeline":1,"tags":{"noloadbalance":true}"#);
    etcd.put(&format!("{pre}members/pg2"), &tagged).unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while in_recovery(&r).await {
        assert!(Instant::now() < end, "noloadbalance was ignored");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_leader_holds_transactions_and_cuts_the_old_leader() {
    let (etcd, pre, _) = two_members("hold", 1);
    let f = etcd_ferry(&etcd, "hold", false, "failover_hold_timeout = \"4s\"", "");

    let busy = app(&f).await;
    let idle = app(&f).await;
    busy.simple_query("BEGIN; SELECT 1").await.unwrap();
    idle.simple_query("SELECT 1").await.unwrap();

    // The leader key goes away (a failover begins).
    etcd.delete(&format!("{pre}leader")).unwrap();
    f.wait_log("read-write pool retired", Duration::from_secs(5));
    // The transaction in flight on the old leader cannot be saved: an error.
    let e = busy.simple_query("SELECT 2").await;
    assert!(e.is_err(), "a transaction on the old leader must fail");

    // A client between transactions waits for the new leader, then runs.
    let put_back = {
        let etcd_key = format!("{pre}leader");
        let endpoint = etcd.endpoint();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1200));
            let out = std::process::Command::new("etcdctl")
                .args(["--endpoints", &endpoint, "put", &etcd_key, "pg1"])
                .env("ETCDCTL_API", "3")
                .output()
                .unwrap();
            assert!(out.status.success());
        })
    };
    let t = Instant::now();
    let rows = idle
        .query_one("SELECT NOT pg_is_in_recovery()", &[])
        .await
        .expect("held, then run");
    assert!(rows.get::<_, bool>(0));
    let waited = t.elapsed();
    put_back.join().unwrap();
    assert!(
        waited >= Duration::from_millis(1000),
        "did not wait for the leader: {waited:?}"
    );
    assert!(waited < Duration::from_secs(4), "waited too long: {waited:?}");
    // The failed client can go on with a new transaction.
    let _ = busy.simple_query("ROLLBACK").await;
    busy.simple_query("SELECT 3")
        .await
        .expect("the session survives the lost transaction");

    // The leader key names a node that is not writable (a standby): writes
    // never go there; after failover_hold_timeout the client is told so.
    etcd.put(&format!("{pre}leader"), "pg2").unwrap();
    f.wait_log("leader not confirmed writable", Duration::from_secs(10));
    let e = idle.simple_query("CREATE TEMP TABLE x (a int)").await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("57P03"), "{e}");
    etcd.put(&format!("{pre}leader"), "pg1").unwrap();
    wait_count(&f, "leader confirmed writable", 3, Duration::from_secs(5));
    idle.simple_query("SELECT 4").await.expect("back on the leader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn citus_layout_follows_group_zero() {
    let cluster = pgferry_tests::shared_cluster();
    let (p, s) = (cluster.primary_port, cluster.standby_port.unwrap());
    let etcd = Etcd::start().unwrap();
    let pre = "/service/citusdemo/";
    // Group 1 (a worker) is written first and points at the standby: 5432
    // must follow group 0 only.
    etcd.put(
        &format!("{pre}1/members/w1a"),
        &patroni_member_json("master", "running", s, 1),
    )
    .unwrap();
    etcd.put(&format!("{pre}1/leader"), "w1a").unwrap();
    etcd.put(
        &format!("{pre}0/members/c1"),
        &patroni_member_json("master", "running", p, 1),
    )
    .unwrap();
    etcd.put(
        &format!("{pre}0/members/c2"),
        &patroni_member_json("replica", "running", s, 1),
    )
    .unwrap();
    etcd.put(&format!("{pre}0/leader"), "c1").unwrap();
    let f = etcd_ferry(&etcd, "citusdemo", true, "", "");
    let rw = app(&f).await;
    assert!(!in_recovery(&rw).await);
    assert!(in_recovery(&ro(&f).await).await);
    let log = f.wait_log("workers", Duration::from_secs(3));
    assert!(
        log.contains(&format!("1:w1a@127.0.0.1:{s}")),
        "worker groups are tracked: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_stops_writes_after_the_grace_period() {
    let cluster = pgferry_tests::shared_cluster();
    let p = cluster.primary_port;
    let etcd = Etcd::start().unwrap();
    let pre = "/service/outage/";
    etcd.put(
        &format!("{pre}members/pg1"),
        &patroni_member_json("master", "running", p, 1),
    )
    .unwrap();
    etcd.put(&format!("{pre}leader"), "pg1").unwrap();
    let f = etcd_ferry(
        &etcd,
        "outage",
        false,
        "etcd_grace = \"3s\"\nfailover_hold_timeout = \"2s\"",
        "",
    );
    let c = app(&f).await;
    c.simple_query("SELECT 1").await.unwrap();
    let stopped = Instant::now();
    etcd.stop();
    // Within the grace period the last leader keeps serving.
    c.simple_query("SELECT 2").await.expect("inside the grace period");
    f.wait_log(
        "etcd unreachable for longer than the grace period",
        Duration::from_secs(10),
    );
    // The grace period runs from the last successful contact with etcd,
    // which is at most one heartbeat (1 s) before it was stopped.
    assert!(
        stopped.elapsed() >= Duration::from_millis(1800),
        "writes stopped before the grace period: {:?}",
        stopped.elapsed()
    );
    let e = c.simple_query("SELECT 3").await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("57P03"), "{e}");
    // etcd is back: so is the leader.
    etcd.restart().unwrap();
    wait_count(&f, "leader confirmed writable", 2, Duration::from_secs(15));
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match c.simple_query("SELECT 4").await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < end, "writes did not resume: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A session that moves between a standby and the primary is told so:
/// in_hot_standby follows the node it is really on (what keycloak#49515
/// shows going wrong behind proxies that do not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_hot_standby_follows_the_node() {
    let (etcd, pre, s) = two_members("hotstandby", 5000);
    let f = etcd_ferry(&etcd, "hotstandby", false, "max_replica_lag = 1000", "");
    let mut raw = Raw::login(f.ro_port.unwrap(), "app", APP_PASS).await;
    let hot = |frames: &[pgferry_protocol::Frame]| {
        frames
            .iter()
            .filter(|f| f.tag == b'S')
            .filter_map(|f| pgferry_protocol::backend::parameter_status(f.body()).ok())
            .find(|(k, _)| *k == "in_hot_standby")
            .map(|(_, v)| v.to_owned())
    };
    let r = raw.query("SELECT pg_is_in_recovery()").await;
    assert_eq!(rows(&r)[0][0].as_deref(), Some("t"));
    // The standby falls behind: the session moves to the primary and is told.
    etcd.put(&format!("{pre}status"), r#"{"optime":9000000}"#).unwrap();
    // Its key, never rewritten, vouches for its position one loop (+ 1 s)
    // later; then it stays behind for the hold (loop_wait + 1 s).
    f.wait_log("standbys=[]", Duration::from_secs(10));
    let r = raw.query("SELECT pg_is_in_recovery()").await;
    assert_eq!(rows(&r)[0][0].as_deref(), Some("f"));
    assert_eq!(
        hot(&r).as_deref(),
        Some("off"),
        "ParameterStatus in_hot_standby=off expected: {}",
        tags(&r)
    );
    // Caught up: back to the standby, and told again.
    etcd.put(
        &format!("{pre}members/pg2"),
        &patroni_member_json("replica", "running", s, 9000000),
    )
    .unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let r = raw.query("SELECT pg_is_in_recovery()").await;
        if rows(&r)[0][0].as_deref() == Some("t") {
            assert_eq!(hot(&r).as_deref(), Some("on"), "{}", tags(&r));
            break;
        }
        assert!(Instant::now() < end, "the session did not return to the standby");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A server that accepts and then drops logins (a postmaster on its way down
/// does this; seen when Patroni stops a replica): like a refused connection,
/// the transaction is held (failover_hold_timeout) and runs once the server
/// takes logins again; the client sees no error.
/// A gate in front of the real PostgreSQL resets (or closes) every new
/// connection while shut, and relays to PostgreSQL while open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_reset_by_the_server_are_held_not_failed() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;
    let pg_port = pgferry_tests::shared_cluster().primary_port;
    let gate = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gate_port = gate.local_addr().unwrap().port();
    let open = Arc::new(AtomicBool::new(true));
    let refused = Arc::new(AtomicUsize::new(0));
    let relays = Arc::new(std::sync::Mutex::new(tokio::task::JoinSet::new()));
    {
        let (open, refused, relays) = (open.clone(), refused.clone(), relays.clone());
        tokio::spawn(async move {
            loop {
                let (mut s, _) = gate.accept().await.unwrap();
                if open.load(SeqCst) {
                    relays.lock().unwrap().spawn(async move {
                        let mut pg = tokio::net::TcpStream::connect(("127.0.0.1", pg_port)).await.unwrap();
                        let _ = tokio::io::copy_bidirectional(&mut s, &mut pg).await;
                    });
                    continue;
                }
                // Every other login is reset (closed with its startup packet
                // unread: RST), the others closed cleanly (EOF).
                let n = refused.fetch_add(1, SeqCst);
                tokio::spawn(async move {
                    if n % 2 == 0 {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    drop(s);
                });
            }
        });
    }
    let etcd = Etcd::start().unwrap();
    let pre = "/service/gate/";
    etcd.put(
        &format!("{pre}members/pg1"),
        &patroni_member_json("master", "running", gate_port, 1),
    )
    .unwrap();
    etcd.put(&format!("{pre}leader"), "pg1").unwrap();
    let f = etcd_ferry(&etcd, "gate", false, "", "");
    let c = app(&f).await;
    assert_eq!(c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);

    // Shut the gate and cut the pool's connections.
    open.store(false, SeqCst);
    relays.lock().unwrap().abort_all();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let opener = {
        let open = open.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            open.store(true, SeqCst);
        })
    };
    let t = Instant::now();
    let got = c.query_one("SELECT 2", &[]).await;
    opener.await.unwrap();
    assert_eq!(got.expect("held, then served").get::<_, i32>(0), 2);
    assert!(
        refused.load(SeqCst) >= 2,
        "the gate refused {} logins",
        refused.load(SeqCst)
    );
    assert!(
        t.elapsed() >= Duration::from_millis(1000),
        "served after {:?}",
        t.elapsed()
    );
    let log = f.log();
    assert!(log.contains("holding the transaction"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}
