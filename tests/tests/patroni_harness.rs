//! Tests of the etcd + Patroni harness itself (no pgferry needed): a real
//! etcd and a real 3-member Patroni cluster, switchover, crash failovers, an
//! etcd restart, and the hand-written Citus key layout.

use std::time::{Duration, Instant};

use pgferry_tests::{
    conn_str, port_accepts, write_citus_layout, Etcd, PatroniCluster, PatroniOptions, CITUS_LAYOUT_XLOG,
    PATRONI_SUPERUSER_PASSWORD,
};

#[test]
fn harness_types_are_shareable_between_threads() {
    fn check<T: Send + Sync>() {}
    check::<Etcd>();
    check::<PatroniCluster>();
}

fn others(cluster: &PatroniCluster, not: &str) -> Vec<String> {
    cluster.member_names().into_iter().filter(|n| n != not).collect()
}

/// One cluster, driven through every transition in turn.
#[test]
fn patroni_cluster_lifecycle() {
    let t = Instant::now();
    let cluster = PatroniCluster::start(PatroniOptions::default()).expect("start the Patroni cluster");
    println!("cluster start: {:?}", t.elapsed());

    // A leader (the first member: it bootstrapped alone) and two streaming
    // replicas.
    let names = cluster.member_names();
    assert_eq!(names, ["pg1", "pg2", "pg3"]);
    let leader = cluster.leader().unwrap().expect("a leader key");
    assert_eq!(leader, "pg1");
    assert_eq!(cluster.streaming_replicas(&leader).unwrap(), others(&cluster, &leader));
    for n in &names {
        assert_eq!(
            cluster.psql(n, "postgres", "SELECT pg_is_in_recovery()").unwrap(),
            if *n == leader { "f" } else { "t" }
        );
        let v = cluster.member_value(n).unwrap().expect("member key");
        assert!(
            v.contains(&format!(
                "\"conn_url\":\"postgres://127.0.0.1:{}/postgres\"",
                cluster.pg_port(n)
            )),
            "{v}"
        );
    }
    let keys: Vec<String> = cluster
        .etcd
        .get_prefix(&cluster.key_prefix())
        .unwrap()
        .into_iter()
        .map(|(k, _)| k.trim_start_matches(&cluster.key_prefix()).to_string())
        .collect();
    for k in [
        "config",
        "initialize",
        "leader",
        "members/pg1",
        "members/pg2",
        "members/pg3",
    ] {
        assert!(keys.iter().any(|x| x == k), "{k} missing from {keys:?}");
    }
    // REST is up on every member; only the leader answers 200 on /primary.
    for n in &names {
        let (status, _) = cluster
            .rest(n, "GET", "/primary", None, Duration::from_secs(5))
            .unwrap();
        assert_eq!(status, if *n == leader { 200 } else { 503 }, "{n} GET /primary");
    }
    let list = cluster.patronictl(&["list", &cluster.scope]).unwrap();
    assert!(list.contains("Leader") && list.contains(&leader), "{list}");
    // SCRAM over TCP for the superuser and for a created user.
    cluster.create_user("app", "app-pass").unwrap();
    cluster.create_database("app", "app").unwrap();
    cluster
        .psql(&leader, "app", "CREATE TABLE t (id int); INSERT INTO t VALUES (1);")
        .unwrap();
    let hba = cluster
        .psql(
            &leader,
            "postgres",
            "SELECT count(*) FROM pg_hba_file_rules WHERE auth_method = 'scram-sha-256'",
        )
        .unwrap();
    assert_ne!(hba, "0");
    for (user, password) in [("postgres", PATRONI_SUPERUSER_PASSWORD), ("app", "app-pass")] {
        let ok = tokio_login(cluster.pg_port(&leader), user, password, "app");
        assert_eq!(ok.as_deref(), Ok("f"), "SCRAM login of {user}");
    }
    assert!(tokio_login(cluster.pg_port(&leader), "app", "wrong", "app").is_err());

    // Planned switchover through REST.
    let candidate = "pg2";
    let t = Instant::now();
    cluster.switchover(&leader, candidate).unwrap();
    let moved = t.elapsed();
    cluster.wait_writable(candidate, Duration::from_secs(10)).unwrap();
    println!(
        "REST switchover {leader} -> {candidate}: leader key moved after {moved:?}, writable after {:?}",
        t.elapsed()
    );
    cluster.psql(candidate, "app", "INSERT INTO t VALUES (2);").unwrap();
    cluster.wait_streaming(&leader, Duration::from_secs(60)).unwrap();
    println!(
        "old leader {leader} streams again {:?} after the switchover",
        t.elapsed()
    );

    // Node crash of the leader: Patroni and postmaster SIGKILLed; the lease
    // expires and another member takes the key.
    let leader = candidate.to_string();
    let t = Instant::now();
    cluster.kill_member(&leader).unwrap();
    assert!(!cluster.patroni_running(&leader));
    let new_leader = cluster.wait_for_leader(Some(&leader), Duration::from_secs(20)).unwrap();
    let took = t.elapsed();
    cluster.wait_writable(&new_leader, Duration::from_secs(10)).unwrap();
    println!(
        "kill_member({leader}): {new_leader} took the leader key after {took:?}, writable after {:?}",
        t.elapsed()
    );
    assert!(took < Duration::from_secs(15), "failover took {took:?}");
    assert_eq!(
        cluster
            .psql(&new_leader, "app", "INSERT INTO t VALUES (3); SELECT count(*) FROM t;")
            .unwrap(),
        "3"
    );
    let t = Instant::now();
    cluster.start_member(&leader).unwrap();
    cluster.wait_streaming(&leader, Duration::from_secs(60)).unwrap();
    println!("{leader} restarted and streams again after {:?}", t.elapsed());

    // Postmaster crash (primary_start_timeout: 0): Patroni releases the key
    // and a replica takes over; the old node comes back as a replica by
    // itself.
    let leader = new_leader;
    let t = Instant::now();
    cluster.kill_postmaster(&leader).unwrap();
    let new_leader = cluster.wait_for_leader(Some(&leader), Duration::from_secs(20)).unwrap();
    let took = t.elapsed();
    cluster.wait_writable(&new_leader, Duration::from_secs(10)).unwrap();
    println!(
        "kill_postmaster({leader}): {new_leader} took the leader key after {took:?}, writable after {:?}",
        t.elapsed()
    );
    assert!(cluster.patroni_running(&leader));
    cluster.wait_streaming(&leader, Duration::from_secs(60)).unwrap();
    println!(
        "{leader} streams again {:?} after its postmaster was killed",
        t.elapsed()
    );

    // etcd restart: same data dir and ports, the cluster keeps going.
    let leader = new_leader;
    let t = Instant::now();
    cluster.etcd.restart().expect("restart etcd");
    println!("etcd stopped and started again in {:?}", t.elapsed());
    let after = cluster.wait_for_leader(None, Duration::from_secs(30)).unwrap();
    cluster.wait_writable(&after, Duration::from_secs(30)).unwrap();
    println!(
        "etcd restarted: leader {leader} -> {after}, writable {:?} after the restart",
        t.elapsed()
    );
    assert_eq!(
        cluster
            .psql(&after, "app", "INSERT INTO t VALUES (4); SELECT count(*) FROM t;")
            .unwrap(),
        "4"
    );
    let healthy = cluster.wait_healthy(Duration::from_secs(60)).unwrap();
    println!(
        "healthy again with leader {healthy} {:?} after the etcd restart",
        t.elapsed()
    );
}

fn tokio_login(port: u16, user: &str, password: &str, db: &str) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&conn_str(port, user, password, db), tokio_postgres::NoTls)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let row = client
            .query_one("SELECT pg_is_in_recovery()::text", &[])
            .await
            .map_err(|e| e.to_string())?;
        let v: String = row.get(0);
        Ok(if v == "false" { "f".to_string() } else { v })
    })
}

/// Standalone etcd: put / get / delete / prefix reads, revision, kill and
/// restart with the same data dir and ports.
#[test]
fn etcd_put_get_delete_restart() {
    let etcd = Etcd::start().expect("start etcd");
    assert!(etcd.endpoint().starts_with("127.0.0.1:"));
    etcd.put("/x/a", "1").unwrap();
    etcd.put("/x/b", r#"{"json":"-value with spaces"}"#).unwrap();
    etcd.put("/x/c", "").unwrap();
    etcd.put("/y/a", "other").unwrap();
    assert_eq!(etcd.get("/x/a").unwrap().as_deref(), Some("1"));
    assert_eq!(etcd.get("/x/c").unwrap().as_deref(), Some(""));
    assert_eq!(etcd.get("/x/missing").unwrap(), None);
    let (rev, kvs) = etcd.get_prefix_with_revision("/x/").unwrap();
    assert_eq!(
        kvs,
        vec![
            ("/x/a".to_string(), "1".to_string()),
            ("/x/b".to_string(), r#"{"json":"-value with spaces"}"#.to_string()),
            ("/x/c".to_string(), String::new()),
        ]
    );
    assert_eq!(rev, etcd.revision().unwrap());
    assert_eq!(etcd.delete("/x/a").unwrap(), 1);
    assert_eq!(etcd.delete("/x/a").unwrap(), 0);

    etcd.kill();
    assert!(!etcd.is_running() && etcd.pid().is_none());
    assert!(!port_accepts(etcd.client_port), "etcd accepts connections after kill");
    let t = Instant::now();
    etcd.restart().unwrap();
    println!("etcd restart after kill: {:?}", t.elapsed());
    assert_eq!(etcd.get_prefix("/x/").unwrap().len(), 2);
    etcd.stop();
    etcd.restart().unwrap();
    assert_eq!(etcd.delete_prefix("/x/").unwrap(), 2);
    assert_eq!(etcd.get_prefix("/y/").unwrap().len(), 1);
}

/// The hand-written Citus layout has exactly the documented keys.
#[test]
fn citus_layout_keys() {
    let etcd = Etcd::start().expect("start etcd");
    let coord: &[(&str, &str, u16)] = &[("c1", "master", 15432), ("c2", "replica", 15433)];
    let w1: &[(&str, &str, u16)] = &[("w1a", "master", 15442), ("w1b", "replica", 15443)];
    let w2: &[(&str, &str, u16)] = &[("w2a", "primary", 15452)];
    write_citus_layout(&etcd, "citusdemo", &[(0, coord, "c1"), (1, w1, "w1a"), (2, w2, "w2a")]).unwrap();
    let kvs = etcd.get_prefix("/service/citusdemo/").unwrap();
    let keys: Vec<&str> = kvs.iter().map(|(k, _)| k.as_str()).collect();
    let mut expected = Vec::new();
    for (g, members) in [(0, vec!["c1", "c2"]), (1, vec!["w1a", "w1b"]), (2, vec!["w2a"])] {
        for k in ["config", "initialize", "leader"] {
            expected.push(format!("/service/citusdemo/{g}/{k}"));
        }
        for m in members {
            expected.push(format!("/service/citusdemo/{g}/members/{m}"));
        }
        for k in ["status", "sync"] {
            expected.push(format!("/service/citusdemo/{g}/{k}"));
        }
    }
    expected.sort();
    assert_eq!(keys, expected);
    let get = |k: &str| etcd.get(&format!("/service/citusdemo/{k}")).unwrap().unwrap();
    assert_eq!(get("0/leader"), "c1");
    assert_eq!(get("1/leader"), "w1a");
    assert_eq!(get("2/leader"), "w2a");
    assert_eq!(
        get("0/members/c1"),
        format!(
            "{{\"conn_url\":\"postgres://127.0.0.1:15432/postgres\",\"api_url\":\"http://127.0.0.1:8008/patroni\",\
             \"state\":\"running\",\"role\":\"master\",\"version\":\"3.0.2\",\"xlog_location\":{CITUS_LAYOUT_XLOG},\
             \"timeline\":1}}"
        )
    );
    assert!(get("1/members/w1b").contains("\"role\":\"replica\""));
    assert!(get("1/members/w1b").contains("postgres://127.0.0.1:15443/postgres"));
    assert!(get("2/members/w2a").contains("\"role\":\"primary\""));
    assert_eq!(get("1/status"), format!("{{\"optime\":{CITUS_LAYOUT_XLOG}}}"));
    assert_eq!(get("1/sync"), "{\"leader\":\"w1a\",\"sync_standby\":null}");
    assert!(get("0/config").contains("\"ttl\":10"));
    assert!(get("0/initialize").parse::<u64>().is_ok());
    // Nothing outside the scope.
    assert_eq!(etcd.get_prefix("/").unwrap().len(), kvs.len());
}
