//! Explicit transactions under shard-aware routing, with the extended
//! protocol as drivers send it (real Citus, coordinator + 2 workers):
//! pgferry answers the BEGIN, replays it on the node the first statement
//! chooses, and keeps PostgreSQL's transaction states when the transaction
//! fails before reaching any server.
//!
//! Where a transaction ran is read inside it from `pg_dist_local_group`,
//! against the owner Citus itself names.

mod common;

use bytes::BytesMut;
use common::*;
use pgferry_protocol::{encode, Frame};
use pgferry_tests::citus::{shared_citus_or_skip, CitusCluster};
use pgferry_tests::{Ferry, PG_BIN};
use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

const TENANTS: i64 = 24;

/// The table, once per test binary (tests run concurrently).
fn setup(cluster: &CitusCluster) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        cluster
            .coordinator_sql(&format!(
                "DROP TABLE IF EXISTS xt_items CASCADE;\n\
                 CREATE TABLE xt_items (tenant_id bigint NOT NULL, id int NOT NULL, v text);\n\
                 SELECT create_distributed_table('xt_items', 'tenant_id', shard_count := 8);\n\
                 INSERT INTO xt_items SELECT t, 1, 'v' || t FROM generate_series(1, {TENANTS}) t;\n\
                 GRANT ALL ON xt_items TO app;"
            ))
            .unwrap();
    });
}

fn ferry(cluster: &CitusCluster, extra: &str) -> Ferry {
    let ferry = cluster.ferry(extra).expect("start pgferry");
    let start = Instant::now();
    loop {
        let out = admin(ferry.rw_port, "SHOW CITUS");
        if out.contains("public.xt_items") && out.contains("worker primary") {
            return ferry;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "metadata never loaded:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Each tenant's group, as Citus says.
fn owners(cluster: &CitusCluster) -> BTreeMap<i64, String> {
    let out = cluster
        .coordinator_sql(&format!(
            "SELECT t, (SELECT groupid FROM pg_dist_placement \
               WHERE shardid = get_shard_id_for_distribution_column('xt_items', t)) \
             FROM generate_series(1, {TENANTS}) t"
        ))
        .unwrap();
    out.lines()
        .map(|l| {
            let (t, g) = l.split_once('|').unwrap();
            (t.parse().unwrap(), g.to_owned())
        })
        .collect()
}

/// Parse/Bind/Execute of `sql` (unnamed statement and portal) with text
/// parameters, the portal described first when `describe`.
fn extended(b: &mut BytesMut, sql: &str, params: &[&str], describe: bool) {
    encode::parse(b, b"", sql.as_bytes(), &[0, 0]);
    let mut rest = vec![0, 0];
    rest.extend_from_slice(&(params.len() as u16).to_be_bytes());
    for p in params {
        rest.extend_from_slice(&(p.len() as i32).to_be_bytes());
        rest.extend_from_slice(p.as_bytes());
    }
    rest.extend_from_slice(&[0, 0]);
    encode::bind(b, b"", b"", &rest);
    if describe {
        encode::describe(b, b'P', b"");
    }
    encode::execute(b, b"", 0);
}

/// The transaction status of the last ReadyForQuery.
fn status(frames: &[Frame]) -> char {
    let z = frames.iter().rev().find(|f| f.tag == b'Z').expect("ReadyForQuery");
    z.body()[0] as char
}

/// BEGIN through the extended protocol, alone (libpq's pipeline, pgbench
/// -M extended) or in one write with the first statement (pgjdbc with
/// autocommit off): answered by pgferry, replayed on the owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_begin_is_replayed_on_the_owner() {
    let Some(cluster) = shared_citus_or_skip() else {
        return;
    };
    setup(cluster);
    let ferry = ferry(cluster, "");
    let owners = owners(cluster);
    let mut r = Raw::login(ferry.rw_port, "app", APP_PASS).await;
    let mut b = BytesMut::new();
    for (t, owner) in &owners {
        let key = t.to_string();
        // BEGIN alone, then the statements.
        b.clear();
        extended(&mut b, "BEGIN", &[], true);
        encode::sync(&mut b);
        r.send(&b).await;
        let f = r.until_ready().await;
        assert_eq!(tags(&f), "1 2 n C Z", "tenant {t}");
        assert_eq!(status(&f), 'T');
        b.clear();
        extended(
            &mut b,
            "SELECT v FROM xt_items WHERE tenant_id = $1 AND id = 1",
            &[&key],
            false,
        );
        extended(&mut b, "SELECT groupid FROM pg_dist_local_group", &[], false);
        encode::sync(&mut b);
        r.send(&b).await;
        let f = r.until_ready().await;
        let got = rows(&f);
        assert_eq!(got.len(), 2, "tenant {t}: {}", tags(&f));
        assert_eq!(got[0][0].as_deref(), Some(format!("v{t}").as_str()));
        assert_eq!(got[1][0].as_ref(), Some(owner), "tenant {t}: ran on its owner");
        assert_eq!(status(&f), 'T');
        b.clear();
        extended(&mut b, "COMMIT", &[], false);
        encode::sync(&mut b);
        r.send(&b).await;
        let f = r.until_ready().await;
        assert_eq!(tags(&f), "1 2 C Z");
        assert_eq!(status(&f), 'I');

        // BEGIN and the first statement in one write, one Sync.
        b.clear();
        extended(&mut b, "BEGIN", &[], false);
        extended(
            &mut b,
            "UPDATE xt_items SET v = v WHERE tenant_id = $1 AND id = 1",
            &[&key],
            true,
        );
        extended(&mut b, "SELECT groupid FROM pg_dist_local_group", &[], false);
        encode::sync(&mut b);
        r.send(&b).await;
        let f = r.until_ready().await;
        assert_eq!(tags(&f), "1 2 C 1 2 n C 1 2 D C Z", "tenant {t}");
        assert_eq!(
            rows(&f)[0][0].as_ref(),
            Some(owner),
            "tenant {t}: batch ran on its owner"
        );
        assert_eq!(status(&f), 'T');
        let f = r.query("ROLLBACK").await;
        assert_eq!(status(&f), 'I');
    }
    // An empty transaction, extended, needs no server.
    let before = xacts_per_port(&ferry);
    for end in ["COMMIT", "ROLLBACK", "END"] {
        b.clear();
        extended(&mut b, "START TRANSACTION ISOLATION LEVEL SERIALIZABLE", &[], false);
        encode::sync(&mut b);
        extended(&mut b, end, &[], false);
        encode::sync(&mut b);
        r.send(&b).await;
        let f = r.until_ready().await;
        assert_eq!((tags(&f).as_str(), status(&f)), ("1 2 C Z", 'T'));
        let f = r.until_ready().await;
        assert_eq!((tags(&f).as_str(), status(&f)), ("1 2 C Z", 'I'), "{end}");
    }
    assert!(delta(&before, &xacts_per_port(&ferry)).is_empty());
    // The replayed BEGIN keeps its options.
    b.clear();
    extended(&mut b, "BEGIN ISOLATION LEVEL REPEATABLE READ", &[], false);
    extended(&mut b, "SELECT v FROM xt_items WHERE tenant_id = $1", &["3"], false);
    extended(&mut b, "SELECT current_setting('transaction_isolation')", &[], false);
    encode::sync(&mut b);
    r.send(&b).await;
    let f = r.until_ready().await;
    assert_eq!(rows(&f)[1][0].as_deref(), Some("repeatable read"));
    r.query("COMMIT").await;
}

/// A transaction whose BEGIN pgferry answered and whose first statement
/// then fails before reaching a server (here: no worker connection within
/// query_wait_timeout) is aborted as PostgreSQL's would be: status E,
/// 25P02 for what follows, ROLLBACK for its COMMIT. Nothing of it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_transaction_that_fails_stays_failed_until_it_ends() {
    let Some(cluster) = shared_citus_or_skip() else {
        return;
    };
    setup(cluster);
    let ferry = ferry(cluster, "[pool]\npool_size = 1\nquery_wait_timeout = \"500ms\"\n");
    let t = 5i64;
    // Another client holds the owning worker's only connection.
    let holder = app_of(&ferry).await;
    holder.simple_query("BEGIN").await.unwrap();
    holder
        .simple_query(&format!("UPDATE xt_items SET v = v WHERE tenant_id = {t} AND id = 1"))
        .await
        .unwrap();
    let mut r = Raw::login(ferry.rw_port, "app", APP_PASS).await;
    for protocol in ["simple", "extended"] {
        assert_eq!(status(&r.query("BEGIN").await), 'T');
        let f = r
            .query(&format!(
                "INSERT INTO xt_items (tenant_id, id, v) VALUES ({t}, 99, '{protocol}')"
            ))
            .await;
        assert!(error_code(&f).is_some(), "{protocol}: {}", tags(&f));
        assert_eq!(status(&f), 'E', "{protocol}: the transaction failed, and is still open");
        let f = match protocol {
            "simple" => r.query("SELECT 1").await,
            _ => {
                let mut b = BytesMut::new();
                extended(&mut b, "SELECT 1", &[], false);
                encode::sync(&mut b);
                r.send(&b).await;
                r.until_ready().await
            }
        };
        assert_eq!(error_code(&f).as_deref(), Some("25P02"), "{protocol}");
        assert_eq!(status(&f), 'E');
        let f = match protocol {
            "simple" => r.query("COMMIT").await,
            _ => {
                let mut b = BytesMut::new();
                extended(&mut b, "COMMIT", &[], false);
                encode::sync(&mut b);
                r.send(&b).await;
                r.until_ready().await
            }
        };
        let tag = f
            .iter()
            .find(|f| f.tag == b'C')
            .map(|f| String::from_utf8_lossy(&f.body()[..f.body().len() - 1]).into_owned());
        assert_eq!(tag.as_deref(), Some("ROLLBACK"), "{protocol}: {}", tags(&f));
        assert_eq!(status(&f), 'I');
    }
    holder.simple_query("COMMIT").await.unwrap();
    // Once the connection is free, the same work goes through.
    assert_eq!(status(&r.query("BEGIN").await), 'T');
    let f = r
        .query(&format!("SELECT count(*) FROM xt_items WHERE tenant_id = {t}"))
        .await;
    assert_eq!(rows(&f)[0][0].as_deref(), Some("1"), "none of the failed INSERTs ran");
    assert_eq!(status(&r.query("COMMIT").await), 'I');
}

async fn app_of(ferry: &Ferry) -> tokio_postgres::Client {
    connect(ferry, "app", APP_PASS).await
}

/// pgbench scripts with explicit transactions, in every query mode: the
/// transactions run on the workers, none on the coordinator.
#[test]
fn pgbench_transactions_run_on_the_owners() {
    let Some(cluster) = shared_citus_or_skip() else {
        return;
    };
    setup(cluster);
    let ferry = ferry(cluster, "");
    let script = std::env::temp_dir().join(format!("pgferry-xt-{}.sql", std::process::id()));
    std::fs::write(
        &script,
        format!(
            "\\set t random(1, {TENANTS})\n\
             BEGIN;\n\
             SELECT v FROM xt_items WHERE tenant_id = :t AND id = 1;\n\
             UPDATE xt_items SET v = v WHERE tenant_id = :t AND id = 1;\n\
             END;\n"
        ),
    )
    .unwrap();
    for mode in ["simple", "extended", "prepared"] {
        let before = xacts_per_port(&ferry);
        let out = Command::new(std::path::Path::new(PG_BIN).join("pgbench"))
            .env("PGPASSWORD", APP_PASS)
            .args(["-h", "127.0.0.1", "-p", &ferry.rw_port.to_string(), "-U", "app"])
            .args(["-n", "-M", mode, "-c", "4", "-j", "2", "-t", "100", "-f"])
            .arg(&script)
            .arg("app")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{mode}: {text}\n{}", ferry.log());
        assert!(text.contains("processed: 400/400"), "{mode}: {text}");
        let d = delta(&before, &xacts_per_port(&ferry));
        let on_coordinator = d.get(&cluster.coordinator_port()).copied().unwrap_or(0);
        let total: u64 = d.values().sum();
        assert!(total >= 400, "{mode}: {d:?}");
        // -M prepared: the first Parse of each statement (with its own
        // Sync, no Bind) is checked on the coordinator, once per client.
        let allowed = if mode == "prepared" { 4 * 4 } else { 0 };
        assert!(
            on_coordinator <= allowed,
            "{mode}: transactions on the coordinator: {d:?}"
        );
        let workers = d.keys().filter(|p| **p != cluster.coordinator_port()).count();
        assert_eq!(workers, 2, "{mode}: both workers: {d:?}");
    }
}

/// pgjdbc with autocommit off sends its BEGIN in the same write as the
/// first statement, and uses named server-side statements after five
/// executions: every transaction runs on its owner.
#[test]
fn pgjdbc_transactions_run_on_the_owners() {
    let Some(cluster) = shared_citus_or_skip() else {
        return;
    };
    let jar = std::path::Path::new("/usr/share/java/postgresql.jar");
    assert!(
        jar.exists(),
        "pgjdbc missing: apt-get install default-jdk-headless libpostgresql-jdbc-java (.ci/run does)"
    );
    setup(cluster);
    let ferry = ferry(cluster, "");
    let owners = owners(cluster);
    let dir = std::env::temp_dir().join(format!("pgferry-xt-jdbc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("Tx.java");
    std::fs::write(&src, JDBC_TX).unwrap();
    let out = Command::new("java")
        .args(["-cp", jar.to_str().unwrap()])
        .arg(&src)
        .args([ferry.rw_port.to_string(), APP_PASS.to_string(), TENANTS.to_string()])
        .output()
        .expect("java runs (apt-get install default-jdk-headless)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        ferry.log()
    );
    let mut seen = 0;
    for line in stdout.lines() {
        let mut f = line.split(' ');
        let (t, v, g) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
        let t: i64 = t.parse().unwrap();
        assert_eq!(v, format!("v{t}"));
        assert_eq!(Some(g), owners.get(&t).map(String::as_str), "tenant {t}: {line}");
        seen += 1;
    }
    assert_eq!(seen, 2 * TENANTS, "{stdout}");
}

const JDBC_TX: &str = r#"
import java.sql.*;

public class Tx {
    public static void main(String[] a) throws Exception {
        String url = "jdbc:postgresql://127.0.0.1:" + a[0] + "/app?sslmode=disable";
        int tenants = Integer.parseInt(a[2]);
        try (Connection c = DriverManager.getConnection(url, "app", a[1])) {
            c.setAutoCommit(false);
            try (PreparedStatement byKey = c.prepareStatement("SELECT v FROM xt_items WHERE tenant_id = ? AND id = 1");
                 PreparedStatement where = c.prepareStatement("SELECT groupid FROM pg_dist_local_group")) {
                for (int round = 0; round < 2; round++) {
                    for (long t = 1; t <= tenants; t++) {
                        byKey.setLong(1, t);
                        String v;
                        try (ResultSet r = byKey.executeQuery()) { r.next(); v = r.getString(1); }
                        String g;
                        try (ResultSet r = where.executeQuery()) { r.next(); g = r.getString(1); }
                        c.commit();
                        System.out.println(t + " " + v + " " + g);
                    }
                }
            }
        }
    }
}
"#;
