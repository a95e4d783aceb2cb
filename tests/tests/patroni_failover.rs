//! pgferry in front of a real 3-member Patroni cluster (Debian's Patroni
//! 3.0.2, etcd 3.4, PostgreSQL 15), with clients running a steady stream of
//! transactions through it while the cluster goes through a planned
//! switchover, a crash of the leader's Patroni and postmaster, a crash of
//! the leader's Patroni alone (PostgreSQL keeps running and writable), a
//! replica stopped, and etcd stopped and restarted.

use pgferry_tests::{Ferry, PatroniCluster, PatroniOptions, APP_PASS, PATRONI_SUPERUSER_PASSWORD};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Cluster, app role and table, and pgferry following it.
fn setup(extra_topology: &str) -> (PatroniCluster, Ferry) {
    let cluster = PatroniCluster::start(PatroniOptions::default()).expect("Patroni cluster");
    cluster.create_app_and_probe().unwrap();
    // The replicas must have replayed the database and table before reads go there.
    let leader = cluster.leader().unwrap().unwrap();
    for name in cluster.member_names().into_iter().filter(|n| *n != leader) {
        let end = Instant::now() + Duration::from_secs(30);
        while cluster
            .psql(&name, "app", "SELECT count(*) FROM pg_class WHERE relname = 'probe'")
            .ok()
            .as_deref()
            != Some("1")
        {
            assert!(Instant::now() < end, "{name} did not replay the setup");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let config = cluster.ferry_config(6, extra_topology).unwrap();
    let f = Ferry::start(&config).expect("start pgferry");
    (cluster, f)
}

async fn client(port: u16) -> tokio_postgres::Client {
    let cs = pgferry_tests::conn_str(port, "app", APP_PASS, "app");
    let (c, conn) = tokio_postgres::connect(&cs, tokio_postgres::NoTls)
        .await
        .expect("connect through pgferry");
    tokio::spawn(conn);
    c
}

/// What a client saw: (when, server port or error).
type Outcomes = Arc<Mutex<Vec<(Instant, Result<i32, String>)>>>;

/// Clients that each run one short transaction every `pause`: between
/// transactions nearly all the time.
struct Load {
    stop: Arc<AtomicBool>,
    results: Outcomes,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    async fn start(port: u16, clients: usize, sql: &'static str, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let c = client(port).await;
            let (stop, results) = (stop.clone(), results.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let r = match c.query_one(sql, &[]).await {
                        Ok(row) => Ok(row.get::<_, i32>(0)),
                        Err(e) => Err(match e.as_db_error() {
                            Some(d) => format!("{}: {}", d.code().code(), d.message()),
                            None => e.to_string(),
                        }),
                    };
                    results.lock().unwrap().push((Instant::now(), r));
                    tokio::time::sleep(pause).await;
                }
            }));
        }
        Load { stop, results, tasks }
    }

    /// The first success on `port` at or after `since`.
    fn first_on(&self, port: i32, since: Instant) -> Option<Instant> {
        self.results
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, r)| *t >= since && r.as_ref().is_ok_and(|p| *p == port))
            .map(|(t, _)| *t)
            .min()
    }

    async fn wait_for_port(&self, port: i32, since: Instant, timeout: Duration) -> Instant {
        let end = Instant::now() + timeout;
        loop {
            if let Some(t) = self.first_on(port, since) {
                return t;
            }
            assert!(
                Instant::now() < end,
                "no transaction reached port {port} in {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn errors(&self) -> Vec<String> {
        let r = self.results.lock().unwrap();
        r.iter().filter_map(|(_, r)| r.as_ref().err().cloned()).collect()
    }

    /// `clients` readers on the read-only port, each reporting the server
    /// port it reached.
    async fn reads(f: &Ferry, clients: usize, pause: Duration) -> Load {
        Load::start(f.ro_port.unwrap(), clients, "SELECT inet_server_port()", pause).await
    }

    fn count(&self) -> usize {
        self.results.lock().unwrap().len()
    }

    async fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let r = self.results.lock().unwrap();
        r.iter().filter_map(|(_, r)| r.as_ref().err().cloned()).collect()
    }
}

const WRITE: &str = "INSERT INTO probe (port) VALUES (inet_server_port()) RETURNING port";
/// A write that runs 100 ms: likely in flight when a switchover is
/// announced, which must let it finish (issue 13, item 3).
const SLOW_WRITE: &str = "INSERT INTO probe (port) SELECT inet_server_port() FROM pg_sleep(0.1) RETURNING port";

/// When `name` first answers pg_is_in_recovery() = false, polled directly.
async fn writable_at(cluster: &PatroniCluster, name: &str, timeout: Duration) -> Instant {
    let port = cluster.pg_port(name);
    let cs = pgferry_tests::conn_str(port, "postgres", PATRONI_SUPERUSER_PASSWORD, "postgres");
    let end = Instant::now() + timeout;
    let mut conn: Option<tokio_postgres::Client> = None;
    loop {
        assert!(Instant::now() < end, "{name} never became writable");
        if conn.as_ref().is_none_or(|c| c.is_closed()) {
            conn = match tokio_postgres::connect(&cs, tokio_postgres::NoTls).await {
                Ok((c, k)) => {
                    tokio::spawn(k);
                    Some(c)
                }
                Err(_) => None,
            };
        }
        if let Some(c) = &conn {
            if let Ok(r) = c.query_one("SELECT pg_is_in_recovery()", &[]).await {
                if !r.get::<_, bool>(0) {
                    return Instant::now();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_switchover_is_a_non_event() {
    let (cluster, f) = setup("");
    let old = cluster.leader().unwrap().unwrap();
    let new = cluster.member_names().into_iter().find(|n| *n != old).unwrap();
    let load = Load::start(f.rw_port, 6, WRITE, Duration::from_millis(100)).await;
    let slow = Load::start(f.rw_port, 3, SLOW_WRITE, Duration::from_millis(20)).await;
    let reads = Load::reads(&f, 3, Duration::from_millis(100)).await;
    load.wait_for_port(
        cluster.pg_port(&old) as i32,
        Instant::now() - Duration::from_secs(60),
        Duration::from_secs(10),
    )
    .await;

    let started = Instant::now();
    let watcher = {
        let c = &cluster;
        let n = new.clone();
        async move { writable_at(c, &n, Duration::from_secs(30)).await }
    };
    let (writable, ()) = tokio::join!(watcher, async {
        tokio::task::block_in_place(|| cluster.switchover(&old, &new).unwrap());
    });
    let first = load
        .wait_for_port(cluster.pg_port(&new) as i32, started, Duration::from_secs(30))
        .await;
    let gap = first.saturating_duration_since(writable);
    let early = writable.saturating_duration_since(first);
    // The write unavailability as clients saw it: the longest stretch
    // without a committed write around the switchover.
    let mut times: Vec<Instant> = load
        .results
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, r)| r.is_ok() && *t >= started - Duration::from_secs(1))
        .map(|(t, _)| *t)
        .collect();
    times.sort();
    let window = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let n = load.count();
    let write_errors = load.finish().await;
    let slow_writes = slow.count();
    let slow_errors = slow.finish().await;
    let read_errors = reads.finish().await;
    println!(
        "switchover {old} -> {new}: new leader writable (5 ms direct poll) -> first write through pgferry {gap:?} \
         (or {early:?} before the poll saw it); \
         longest gap between committed writes {window:?}; {n} writes, {} write errors, {} read errors",
        write_errors.len(),
        read_errors.len()
    );
    println!("slow writes (100 ms each, in flight at the announcement): {slow_writes}, errors {slow_errors:?}");
    assert!(write_errors.is_empty(), "write errors: {write_errors:?}\n{}", f.log());
    assert!(
        slow_errors.is_empty(),
        "slow write errors: {slow_errors:?}\n{}",
        f.log()
    );
    assert!(read_errors.is_empty(), "read errors: {read_errors:?}");
    assert!(
        gap < Duration::from_secs(1),
        "writes resumed {gap:?} after the new leader was writable"
    );
    let log = f.log();
    assert!(log.contains("switchover announced"), "{log}");
    assert!(log.contains("leader confirmed writable"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_crash_and_patroni_only_crash() {
    let (cluster, f) = setup("");
    let load = Load::start(f.rw_port, 4, WRITE, Duration::from_millis(100)).await;
    let first = cluster.leader().unwrap().unwrap();
    load.wait_for_port(
        cluster.pg_port(&first) as i32,
        Instant::now() - Duration::from_secs(60),
        Duration::from_secs(10),
    )
    .await;

    // 1. SIGKILL of the leader's Patroni and postmaster: clients are held
    // until the lease expires and a new leader is confirmed, then go on.
    let t = Instant::now();
    cluster.kill_member(&first).unwrap();
    let second =
        tokio::task::block_in_place(|| cluster.wait_for_leader(Some(&first), Duration::from_secs(30))).unwrap();
    let resumed = load
        .wait_for_port(cluster.pg_port(&second) as i32, t, Duration::from_secs(40))
        .await;
    println!("leader crash: writes resumed on {second} after {:?}", resumed - t);
    // A write executing at the instant of the SIGKILL cannot be saved: it
    // gets 08007 "server connection lost while a request was running:
    // whether it took effect is unknown" (at most one per client). Clients
    // between transactions are held, so nothing else may fail.
    let errors = load.errors();
    assert!(
        errors.len() <= 4
            && errors
                .iter()
                .all(|e| e.starts_with("08007: server connection lost while a request was running")),
        "errors during a leader crash: {errors:?}\n{}",
        f.log()
    );

    // 2. Only the new leader's Patroni dies: its PostgreSQL stays up and
    // writable, but once its key expires nothing more may reach it.
    let t = Instant::now();
    cluster.kill_patroni(&second).unwrap();
    let third =
        tokio::task::block_in_place(|| cluster.wait_for_leader(Some(&second), Duration::from_secs(30))).unwrap();
    let key_gone = Instant::now();
    let gone_at = cluster
        .psql(&second, "postgres", "SELECT clock_timestamp()")
        .expect("the old primary is still up");
    load.wait_for_port(cluster.pg_port(&third) as i32, t, Duration::from_secs(40))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let errors = load.finish().await;
    println!(
        "patroni-only crash: key moved {second} -> {third} after {:?}; {} errors",
        key_gone - t,
        errors.len()
    );
    // Writes committed on the old primary after its key was gone (as seen
    // by the test, a little later than pgferry saw it): none.
    let late = cluster
        .psql(
            &second,
            "app",
            &format!("SELECT count(*) FROM probe WHERE at > '{gone_at}'"),
        )
        .unwrap();
    assert_eq!(late, "0", "writes reached the old primary after its key was gone");
    assert!(
        cluster.psql(&second, "postgres", "SELECT pg_is_in_recovery()").unwrap() == "f",
        "the scenario needs the old primary still writable"
    );
    // In-flight writes on the old primary may fail when it is cut off;
    // clients between transactions must not.
    assert!(errors.len() <= 4, "errors: {errors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_stopped_and_etcd_restarted() {
    let (cluster, f) = setup("");
    let leader = cluster.leader().unwrap().unwrap();
    let replicas: Vec<String> = cluster.member_names().into_iter().filter(|n| *n != leader).collect();
    let reads = Load::reads(&f, 4, Duration::from_millis(100)).await;
    let writes = Load::start(f.rw_port, 2, WRITE, Duration::from_millis(100)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A replica stops: reads move to the other one.
    let stopped = &replicas[0];
    let t = Instant::now();
    tokio::task::block_in_place(|| cluster.stop_member(stopped)).unwrap();
    let other = cluster.pg_port(&replicas[1]) as i32;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after: Vec<i32> = reads
        .results
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, r)| *at > t + Duration::from_secs(1) && r.is_ok())
        .map(|(_, r)| *r.as_ref().unwrap())
        .collect();
    assert!(
        !after.is_empty() && after.iter().all(|p| *p == other),
        "reads still reach the stopped replica: {after:?}"
    );

    // etcd stops for a few seconds (less than Patroni's ttl): pgferry keeps
    // the confirmed leader, then watches again.
    cluster.etcd.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::task::block_in_place(|| cluster.etcd.restart()).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = f.log();
    assert!(
        log.matches("etcd: watching").count() >= 2,
        "the watch did not resume: {log}"
    );
    let write_errors = writes.finish().await;
    let read_errors = reads.finish().await;
    println!(
        "replica stop + etcd restart: {} write errors, {} read errors",
        write_errors.len(),
        read_errors.len()
    );
    assert!(write_errors.is_empty(), "write errors: {write_errors:?}");
    // A read running at the instant Patroni shuts the replica down (fast
    // mode) is cut by PostgreSQL itself and said to be of unknown outcome;
    // at most one per client, and nothing else: reads between
    // transactions move to the other replica.
    assert!(
        read_errors.len() <= 4
            && read_errors
                .iter()
                .all(|e| e.starts_with("08007: server connection lost while a request was running")),
        "read errors: {read_errors:?}"
    );
}

/// A replica whose WAL receiver is frozen (SIGSTOP) falls behind: once
/// Patroni publishes its position, read-only transactions stop going there,
/// and come back after it catches up. No client sees an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_replica_leaves_the_read_port() {
    let (cluster, f) = setup("max_replica_lag = 1048576");
    let leader = cluster.leader().unwrap().unwrap();
    let replicas: Vec<String> = cluster.member_names().into_iter().filter(|n| *n != leader).collect();
    let lagging = &replicas[0];
    let reads = Load::reads(&f, 4, Duration::from_millis(50)).await;
    reads
        .wait_for_port(
            cluster.pg_port(lagging) as i32,
            Instant::now() - Duration::from_secs(60),
            Duration::from_secs(10),
        )
        .await;

    let receiver: i32 = cluster
        .psql(lagging, "postgres", "SELECT pid FROM pg_stat_wal_receiver")
        .unwrap()
        .parse()
        .expect("a WAL receiver");
    signal_process(receiver, libc::SIGSTOP);
    // 8 MB or so of WAL on the leader, which the frozen receiver misses.
    cluster
        .psql_leader(
            "app",
            "INSERT INTO probe (port) SELECT g FROM generate_series(1, 100000) g",
        )
        .unwrap();
    let t = Instant::now();
    let end = t + Duration::from_secs(20);
    // Replicas' published positions flap around max_replica_lag while the
    // cluster settles (each member publishes on its own schedule), so only
    // routing decided after the burst counts, and "out" must hold: no later
    // routing change brings the lagging replica back for 1.5 s. Whether the
    // healthy replica or the leader (ro_fallback_to_primary) serves the
    // reads meanwhile is not this test's concern.
    let lagging_addr = format!("127.0.0.1:{}\"", cluster.pg_port(lagging));
    let routing = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains("topology: routing changed"))
            .map(str::to_owned)
            .collect()
    };
    let before = routing(&f.log()).len();
    let out_at = loop {
        let log = f.log();
        let lines = routing(&log);
        if lines.len() > before && !lines[lines.len() - 1].contains(&lagging_addr) {
            let seen = Instant::now();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let later = routing(&f.log());
            if later[lines.len()..].iter().all(|l| !l.contains(&lagging_addr)) {
                break seen;
            }
            continue;
        }
        assert!(Instant::now() < end, "the lagging replica was never taken out:\n{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lagging_port = cluster.pg_port(lagging) as i32;
    let late: Vec<i32> = reads
        .results
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, r)| *at > out_at + Duration::from_millis(200) && r.is_ok())
        .map(|(_, r)| *r.as_ref().unwrap())
        .collect();
    assert!(
        !late.is_empty() && late.iter().all(|p| *p != lagging_port),
        "reads still reach the lagging replica ({lagging_port}): {late:?}"
    );
    println!(
        "lagging replica taken out of the read port {:?} after the WAL burst",
        out_at - t
    );
    signal_process(receiver, libc::SIGCONT);
    reads
        .wait_for_port(cluster.pg_port(lagging) as i32, Instant::now(), Duration::from_secs(30))
        .await;
    let errors = reads.finish().await;
    assert!(errors.is_empty(), "read errors: {errors:?}");
}

/// Sends a signal to a process this test found (the WAL receiver).
fn signal_process(pid: i32, sig: i32) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// etcd stops for 5 s, 15 s and 45 s (Patroni's retry_timeout is 5 s):
/// past it Patroni demotes the leader and restarts it read-only. No write
/// reaches it (no 25006): pgferry sees it in recovery (direct checks while
/// etcd is away, and in_hot_standby at every new server login) and holds
/// writes until etcd is back and a leader is elected (past
/// failover_hold_timeout, 30 s, they get 57P03). Reads go on throughout,
/// past the grace period, from nodes a direct check shows current.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outages_never_send_writes_to_a_demoted_leader() {
    let (cluster, f) = setup("");
    for secs in [5u64, 15, 45] {
        let reads = Load::reads(&f, 3, Duration::from_millis(100)).await;
        let writes = Load::start(f.rw_port, 2, WRITE, Duration::from_millis(100)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        cluster.etcd.stop();
        let stopped = Instant::now();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        tokio::task::block_in_place(|| cluster.etcd.restart()).unwrap();
        let leader = tokio::task::block_in_place(|| cluster.wait_for_leader(None, Duration::from_secs(40))).unwrap();
        let back = stopped + Duration::from_secs(secs);
        let resumed = writes
            .wait_for_port(cluster.pg_port(&leader) as i32, back, Duration::from_secs(40))
            .await;
        let n_reads = reads.count();
        let write_errors = writes.finish().await;
        let read_errors = reads.finish().await;
        println!(
            "etcd stopped {secs} s: writes resumed on {leader} {:?} after the stop; {} write errors {write_errors:?}; \
             {n_reads} reads, {} read errors {read_errors:?}",
            resumed - stopped,
            write_errors.len(),
            read_errors.len()
        );
        let log = f.log();
        assert!(
            !write_errors.iter().any(|e| e.starts_with("25006")),
            "{secs} s: writes reached a read-only node: {write_errors:?}\n{log}"
        );
        // A write running when Patroni restarts the demoted leader is cut;
        // past failover_hold_timeout held writes get 57P03.
        assert!(
            write_errors
                .iter()
                .all(|e| e.starts_with("08007") || (secs > 30 && e.starts_with("57P03"))),
            "{secs} s: write errors: {write_errors:?}"
        );
        assert!(read_errors.is_empty(), "{secs} s: read errors: {read_errors:?}\n{log}");
        if secs > 5 {
            assert!(
                log.contains("in recovery"),
                "{secs} s: the leader was not demoted:\n{log}"
            );
        }
    }
}

/// A sustained WAL rate of 10+ MB/s on the leader, with the default
/// max_replica_lag (16 MB) and loop_wait 2: every member publishes its
/// position on its own schedule, up to 2 s (20+ MB) apart, and the replicas
/// are streaming right behind. Both must stay in the read set all along,
/// and no read goes to the leader (issue 13, item 4: every replica,
/// including the synchronous one, used to leave every 2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_wal_keeps_replicas_in_the_read_set() {
    let (cluster, f) = setup("");
    let leader = cluster.leader().unwrap().unwrap();
    let replicas: Vec<String> = cluster.member_names().into_iter().filter(|n| *n != leader).collect();
    let writer = client(f.rw_port).await;
    writer.batch_execute("CREATE TABLE wal_fill (b text)").await.unwrap();
    let reads = Load::start(
        f.ro_port.unwrap(),
        4,
        "SELECT inet_server_port()",
        Duration::from_millis(50),
    )
    .await;
    for r in &replicas {
        reads
            .wait_for_port(
                cluster.pg_port(r) as i32,
                Instant::now() - Duration::from_secs(60),
                Duration::from_secs(15),
            )
            .await;
    }
    let routing_lines = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains("topology: routing changed"))
            .map(str::to_owned)
            .collect()
    };
    let before = routing_lines(&f.log()).len();
    let lsn = |c: &PatroniCluster| c.psql_leader("postgres", "SELECT pg_current_wal_lsn()").unwrap();
    let start_lsn = lsn(&cluster);
    let start = Instant::now();
    // About 6 MB of WAL per statement (rows under the TOAST threshold, so
    // not compressed), as fast as the leader takes them.
    while start.elapsed() < Duration::from_secs(20) {
        writer
            .batch_execute("INSERT INTO wal_fill SELECT repeat(md5(g::text), 45) FROM generate_series(1, 4000) g")
            .await
            .unwrap();
    }
    let took = start.elapsed();
    let end_lsn = lsn(&cluster);
    let bytes: f64 = cluster
        .psql_leader(
            "postgres",
            &format!("SELECT pg_wal_lsn_diff('{end_lsn}', '{start_lsn}')"),
        )
        .unwrap()
        .parse()
        .unwrap();
    let rate = bytes / took.as_secs_f64() / (1 << 20) as f64;
    let log = f.log();
    let changes: Vec<String> = routing_lines(&log)[before..].to_vec();
    let leader_port = cluster.pg_port(&leader) as i32;
    let during: Vec<i32> = reads
        .results
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, r)| *at >= start && *at <= start + took && r.is_ok())
        .map(|(_, r)| *r.as_ref().unwrap())
        .collect();
    let on_leader = during.iter().filter(|p| **p == leader_port).count();
    println!(
        "sustained WAL: {rate:.1} MB/s for {took:?}; {} routing changes; {} reads, {on_leader} on the leader",
        changes.len(),
        during.len()
    );
    assert!(
        rate >= 10.0,
        "the test must write 10+ MB/s of WAL, wrote {rate:.1} MB/s"
    );
    assert!(
        changes.is_empty(),
        "routing changed under load:\n{}",
        changes.join("\n")
    );
    assert_eq!(on_leader, 0, "reads went to the leader");
    for r in &replicas {
        let port = cluster.pg_port(r) as i32;
        assert!(during.contains(&port), "{r} served no reads under load");
    }
    let errors = reads.finish().await;
    assert!(errors.is_empty(), "read errors: {errors:?}");
}

/// Read balance after a switchover: the demoted leader comes back as a
/// replica while idle write clients are still routed to it (they re-route
/// only at their next transaction). Read sessions are balanced on read
/// sessions only, so readers spread over both replicas again (issue 13,
/// item 5: with one counter per member, the idle writers kept every reader
/// away from the old leader for the rest of the run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_spread_to_the_demoted_leader_after_a_switchover() {
    let (cluster, f) = setup("");
    let old = cluster.leader().unwrap().unwrap();
    let replicas: Vec<String> = cluster.member_names().into_iter().filter(|n| *n != old).collect();
    let new = replicas[0].clone();
    let other = replicas[1].clone();
    // Idle write clients: one transaction each, then nothing.
    let mut idle = Vec::new();
    for _ in 0..8 {
        let c = client(f.rw_port).await;
        c.simple_query("SELECT 1").await.unwrap();
        idle.push(c);
    }
    let reads = Load::start(
        f.ro_port.unwrap(),
        6,
        "SELECT inet_server_port()",
        Duration::from_millis(50),
    )
    .await;
    reads
        .wait_for_port(
            cluster.pg_port(&other) as i32,
            Instant::now() - Duration::from_secs(60),
            Duration::from_secs(15),
        )
        .await;
    tokio::task::block_in_place(|| cluster.switchover(&old, &new).unwrap());
    let switched = Instant::now();
    // The old leader rejoins as a replica (4-8 s) and takes readers.
    let old_port = cluster.pg_port(&old) as i32;
    let back = reads.wait_for_port(old_port, switched, Duration::from_secs(40)).await;
    println!(
        "switchover {old} -> {new}: first read on the demoted leader {:?} after the switchover",
        back - switched
    );
    // Counts settle at the next transactions (50 ms apart): look at the
    // last two seconds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let since = Instant::now() - Duration::from_secs(2);
    let recent: Vec<i32> = reads
        .results
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, r)| *at >= since && r.is_ok())
        .map(|(_, r)| *r.as_ref().unwrap())
        .collect();
    let share = |port: i32| recent.iter().filter(|p| **p == port).count() as f64 / recent.len() as f64;
    let (on_old, on_other) = (share(old_port), share(cluster.pg_port(&other) as i32));
    println!("read share over the last 2 s: {old} {on_old:.2}, {other} {on_other:.2}");
    assert!(
        on_old >= 0.3 && on_other >= 0.3,
        "reads not spread over the replicas: {old} {on_old:.2}, {other} {on_other:.2}"
    );
    for c in &idle {
        c.simple_query("SELECT 1")
            .await
            .expect("idle writers follow the new leader");
    }
    let errors = reads.finish().await;
    assert!(errors.is_empty(), "read errors: {errors:?}");
}
