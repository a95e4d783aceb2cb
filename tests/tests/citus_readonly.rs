//! The read-only port with a static topology: a single-shard read goes to
//! a secondary of the owning group registered in `pg_dist_node`
//! (`citus_add_secondary_node`), or, for a group without one, to its
//! primary (`ro_fallback_to_primary`). Its own test binary: it adds a node
//! to the cluster it uses.

mod common;

use common::*;
use pgferry_tests::citus::shared_citus_or_skip;
use pgferry_tests::free_port;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_reads_use_the_owning_groups_secondary() {
    let Some(cluster) = shared_citus_or_skip() else {
        return;
    };
    cluster
        .coordinator_sql(
            "DROP TABLE IF EXISTS ro_events;\n\
             CREATE TABLE ro_events (tenant_id bigint NOT NULL, v text);\n\
             SELECT create_distributed_table('ro_events', 'tenant_id', shard_count := 8);\n\
             INSERT INTO ro_events SELECT t, 'v' || t FROM generate_series(1, 40) t;\n\
             GRANT ALL ON ro_events TO app;",
        )
        .unwrap();
    let secondary = cluster.add_worker_secondary(1).unwrap();
    // The secondary has replayed the rows.
    let start = Instant::now();
    while cluster
        .psql(secondary, "app", "SELECT count(*) FROM ro_events")
        .ok()
        .as_deref()
        != Some("40")
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the secondary never caught up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let ferry = cluster
        .ferry(&format!(
            "[listen]\nro = \"127.0.0.1:{}\"\n[pool]\nro_fallback_to_primary = true\n",
            free_port()
        ))
        .expect("start pgferry");
    let start = Instant::now();
    loop {
        let out = admin(ferry.rw_port, "SHOW CITUS");
        if out.contains("public.ro_events") && out.contains("|secondary|") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "metadata not loaded:\n{out}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let owner: BTreeMap<i64, u16> = (1..=40i64)
        .map(|t| {
            let port = cluster
                .coordinator_sql(&format!(
                    "SELECT n.nodeport FROM pg_dist_placement p JOIN pg_dist_node n USING (groupid) \
                     WHERE n.noderole = 'primary' AND p.shardid = get_shard_id_for_distribution_column('ro_events', {t})"
                ))
                .unwrap()
                .parse()
                .unwrap();
            (t, port)
        })
        .collect();
    let (w1, w2) = (cluster.worker_port(1), cluster.worker_port(2));
    let (c, conn) = tokio_postgres::connect(&ferry.ro_conn_str("app", APP_PASS, "app"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let before = xacts_per_port(&ferry);
    for t in 1..=40i64 {
        let rows = c
            .simple_query(&format!("SELECT v FROM ro_events WHERE tenant_id = {t}"))
            .await
            .unwrap();
        let n = rows
            .iter()
            .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
            .count();
        assert_eq!(n, 1, "tenant {t}");
    }
    let got = delta(&before, &xacts_per_port(&ferry));
    let mut want = BTreeMap::new();
    for p in owner.values() {
        let to = if *p == w1 { secondary } else { w2 };
        *want.entry(to).or_insert(0u64) += 1;
    }
    assert_eq!(
        got, want,
        "group 1's reads on its secondary, group 2's on its primary (fallback)"
    );
}
