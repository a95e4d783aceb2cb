//! Shard-aware routing against a real Citus (coordinator + 2 workers): a
//! single-shard statement runs on the owning worker's primary, anything
//! else on the coordinator, and the results are what the coordinator gives.
//!
//! Where each transaction ran is read from pgferry's per-node transaction
//! counts (SHOW LATENCY, kind "xact"), against the owner Citus itself names
//! (`get_shard_id_for_distribution_column` and `pg_dist_placement`).

mod common;

use common::*;
use pgferry_tests::citus::{shared_citus_or_skip, CitusCluster};
use pgferry_tests::Ferry;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const TENANTS: i64 = 40;

fn citus_ferry(cluster: &CitusCluster, extra: &str) -> Ferry {
    cluster.ferry(extra).expect("start pgferry")
}

/// The port of the worker owning `tenant` of `table`, as Citus says.
fn owner_port(cluster: &CitusCluster, table: &str, tenant: &str) -> u16 {
    cluster
        .coordinator_sql(&format!(
            "SELECT n.nodeport FROM pg_dist_placement p JOIN pg_dist_node n USING (groupid) \
             WHERE n.noderole = 'primary' AND p.shardid = get_shard_id_for_distribution_column('{table}', {tenant})"
        ))
        .unwrap()
        .parse()
        .unwrap()
}

fn wait_metadata(ferry: &Ferry, table: &str) {
    let start = Instant::now();
    loop {
        let out = admin(ferry.rw_port, "SHOW CITUS");
        if out.contains(table) && out.contains("worker primary") {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "metadata never loaded:\n{out}\n{}",
            ferry.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The tables, once per test binary (tests run concurrently).
fn setup(cluster: &CitusCluster) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| setup_tables(cluster));
}

fn setup_tables(cluster: &CitusCluster) {
    cluster
        .coordinator_sql(
            "DROP TABLE IF EXISTS rt_events, rt_ref, rt_seq, rt_tx CASCADE;\n\
             CREATE TABLE rt_events (tenant_id bigint NOT NULL, id int NOT NULL, v text);\n\
             SELECT create_distributed_table('rt_events', 'tenant_id', shard_count := 8);\n\
             CREATE TABLE rt_ref (code text PRIMARY KEY, name text);\n\
             SELECT create_reference_table('rt_ref');\n\
             INSERT INTO rt_ref VALUES ('fi', 'Finland'), ('se', 'Sweden');\n\
             CREATE TABLE rt_seq (tenant_id bigint NOT NULL, id bigserial, v text);\n\
             SELECT create_distributed_table('rt_seq', 'tenant_id', shard_count := 8);\n\
             CREATE TABLE rt_tx (tenant_id bigint NOT NULL, id int NOT NULL, v text);\n\
             SELECT create_distributed_table('rt_tx', 'tenant_id', colocate_with := 'rt_events');\n\
             INSERT INTO rt_tx SELECT t, 2, 'tx' FROM generate_series(1, 40) t;\n\
             GRANT ALL ON rt_events, rt_ref, rt_seq, rt_tx TO app;\n\
             GRANT ALL ON SEQUENCE rt_seq_id_seq TO app;",
        )
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_shard_statements_run_on_the_owner() {
    let Some(cluster) = shared_citus_or_skip() else {
        return;
    };
    setup(cluster);
    let ferry = citus_ferry(cluster, "");
    wait_metadata(&ferry, "public.rt_events");
    let coord = cluster.coordinator_port();
    let owners: Vec<u16> = (1..=TENANTS)
        .map(|t| owner_port(cluster, "rt_events", &t.to_string()))
        .collect();
    assert!(owners.iter().all(|p| *p != coord));
    assert!(owners.iter().any(|p| *p != owners[0]), "both workers own tenants");
    let expected = |per: u64| {
        let mut m = BTreeMap::new();
        for p in &owners {
            *m.entry(*p).or_insert(0) += per;
        }
        m
    };
    let c = connect(&ferry, "app", APP_PASS).await;

    // Simple protocol, literal keys: INSERTs and SELECTs by key.
    let before = xacts_per_port(&ferry);
    for t in 1..=TENANTS {
        c.simple_query(&format!(
            "INSERT INTO rt_events (tenant_id, id, v) VALUES ({t}, 1, 'simple')"
        ))
        .await
        .unwrap();
    }
    for t in 1..=TENANTS {
        let rows = c
            .simple_query(&format!("SELECT v FROM rt_events WHERE tenant_id = {t}"))
            .await
            .unwrap();
        let n = rows
            .iter()
            .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
            .count();
        assert_eq!(n, 1, "tenant {t}");
    }
    assert_eq!(delta(&before, &xacts_per_port(&ferry)), expected(2), "simple protocol");

    // Extended protocol, binary int8 parameter, a named statement prepared
    // once (its Parse and Describe go to the coordinator: no values yet).
    let select = c
        .prepare("SELECT v FROM rt_events WHERE tenant_id = $1 AND id = $2")
        .await
        .unwrap();
    let update = c
        .prepare("UPDATE rt_events SET v = $2 WHERE tenant_id = $1")
        .await
        .unwrap();
    let before = xacts_per_port(&ferry);
    for t in 1..=TENANTS {
        let n = c.execute(&update, &[&t, &"extended"]).await.unwrap();
        assert_eq!(n, 1);
        let rows = c.query(&select, &[&t, &1i32]).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].get::<_, &str>(0), "extended");
    }
    assert_eq!(
        delta(&before, &xacts_per_port(&ferry)),
        expected(2),
        "extended protocol"
    );

    // Unnamed statements with text parameters (Parse, Bind, Execute, Sync
    // in one write), as many drivers send them.
    let before = xacts_per_port(&ferry);
    for t in 1..=TENANTS {
        let rows = c
            .query_typed(
                "SELECT count(*) FROM rt_events WHERE tenant_id = $1",
                &[(&t.to_string(), tokio_postgres::types::Type::TEXT)],
            )
            .await;
        // text parameter declared as text for a bigint column: PostgreSQL
        // refuses the comparison on any node; pgferry sends it to the
        // coordinator, which says so.
        assert!(rows.is_err());
    }
    let d = delta(&before, &xacts_per_port(&ferry));
    assert_eq!(
        d.keys().copied().collect::<Vec<_>>(),
        vec![coord],
        "declared text: coordinator only"
    );

    // Not single-shard: the coordinator.
    let before = xacts_per_port(&ferry);
    let total: i64 = c.query_one("SELECT count(*) FROM rt_events", &[]).await.unwrap().get(0);
    assert_eq!(total, TENANTS);
    c.simple_query("SELECT * FROM rt_events WHERE tenant_id = 1 OR tenant_id = 2")
        .await
        .unwrap();
    c.simple_query("SELECT * FROM rt_events WHERE tenant_id IN (1, 2)")
        .await
        .unwrap();
    // bigserial default: drawn on the coordinator.
    c.simple_query("INSERT INTO rt_seq (tenant_id, v) VALUES (7, 'seq')")
        .await
        .unwrap();
    let d = delta(&before, &xacts_per_port(&ferry));
    // query_one prepares first: its Parse/Describe/Sync is a transaction too.
    assert_eq!(
        d,
        BTreeMap::from([(coord, 5)]),
        "multi-shard and sequence statements on the coordinator"
    );
    let id: String = cluster
        .coordinator_sql("SELECT id FROM rt_seq WHERE tenant_id = 7")
        .unwrap();
    assert_eq!(id, "1", "the coordinator's sequence range, not a worker's");

    // Reference-table reads stay on whichever primary the session is on.
    let before = xacts_per_port(&ferry);
    c.simple_query("SELECT v FROM rt_events WHERE tenant_id = 1")
        .await
        .unwrap();
    let rows = c.query("SELECT name FROM rt_ref WHERE code = 'fi'", &[]).await.unwrap();
    assert_eq!(rows[0].get::<_, &str>(0), "Finland");
    let d = delta(&before, &xacts_per_port(&ferry));
    // The reference read is prepared, then run: two transactions, both there.
    assert_eq!(
        d,
        BTreeMap::from([(owners[0], 3)]),
        "reference read on the worker the session was on"
    );

    let citus = admin(ferry.rw_port, "SHOW CITUS");
    assert!(citus.contains("public.rt_events|hash|tenant_id|8|"), "{citus}");
    assert!(citus.contains("public.rt_ref|reference"), "{citus}");
    let (code, metrics) = get(http_port(&ferry), "/metrics").await;
    assert_eq!(code, 200);
    assert!(metrics.contains("pgferry_citus_transactions_total{target=\"worker\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_off_sends_everything_to_the_coordinator() {
    let Some(cluster) = shared_citus_or_skip() else {
        return;
    };
    setup(cluster);
    let ferry = citus_ferry(cluster, "[citus]\nrouting = \"off\"\n");
    wait_metadata(&ferry, "public.rt_events");
    let c = connect(&ferry, "app", APP_PASS).await;
    let before = xacts_per_port(&ferry);
    for t in 1..=10i64 {
        c.simple_query(&format!("SELECT * FROM rt_events WHERE tenant_id = {t}"))
            .await
            .unwrap();
    }
    let d = delta(&before, &xacts_per_port(&ferry));
    assert_eq!(d, BTreeMap::from([(cluster.coordinator_port(), 10)]));
}

fn owner_group(cluster: &CitusCluster, table: &str, tenant: i64) -> String {
    cluster
        .coordinator_sql(&format!(
            "SELECT groupid FROM pg_dist_placement WHERE shardid = get_shard_id_for_distribution_column('{table}', {tenant})"
        ))
        .unwrap()
}

fn first_value(msgs: &[tokio_postgres::SimpleQueryMessage]) -> String {
    msgs.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .expect("a row")
}

/// BEGIN is answered by pgferry and replayed, options and all, on the node
/// the transaction's first statement chooses: the whole transaction runs on
/// the owner (pg_dist_local_group, read inside it, names the node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begin_is_replayed_on_the_owner() {
    let Some(cluster) = shared_citus_or_skip() else {
        return;
    };
    setup(cluster);
    let ferry = citus_ferry(cluster, "");
    wait_metadata(&ferry, "public.rt_tx");
    let mut c = connect(&ferry, "app", APP_PASS).await;
    let by_key = c
        .prepare("SELECT v FROM rt_tx WHERE tenant_id = $1 AND id = 2")
        .await
        .unwrap();
    for t in 1..=20i64 {
        let expected = owner_group(cluster, "rt_tx", t);
        // Simple protocol inside the transaction.
        let tx = c.transaction().await.unwrap();
        tx.simple_query(&format!(
            "UPDATE rt_tx SET v = 'tx{t}' WHERE tenant_id = {t} AND id = 2"
        ))
        .await
        .unwrap();
        let g = first_value(
            &tx.simple_query("SELECT groupid FROM pg_dist_local_group")
                .await
                .unwrap(),
        );
        assert_eq!(g, expected, "tenant {t}: the transaction ran on its owner");
        tx.commit().await.unwrap();
        // A statement prepared before the transaction, bound inside it.
        let tx = c.transaction().await.unwrap();
        let rows = tx.query(&by_key, &[&t]).await.unwrap();
        assert_eq!(rows[0].get::<_, &str>(0), format!("tx{t}"));
        let g = first_value(
            &tx.simple_query("SELECT groupid FROM pg_dist_local_group")
                .await
                .unwrap(),
        );
        assert_eq!(g, expected, "tenant {t}: extended protocol");
        tx.rollback().await.unwrap();
    }
    // Options are replayed exactly.
    c.simple_query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .unwrap();
    c.simple_query("SELECT * FROM rt_tx WHERE tenant_id = 3").await.unwrap();
    let iso = first_value(
        &c.simple_query(
            "SELECT current_setting('transaction_isolation') || ' ' || current_setting('transaction_read_only')",
        )
        .await
        .unwrap(),
    );
    assert_eq!(iso, "repeatable read on");
    let err = c
        .simple_query("UPDATE rt_tx SET v = 'no' WHERE tenant_id = 3")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("25006"), "read-only transaction");
    c.simple_query("ROLLBACK").await.unwrap();
    // An empty transaction needs no server at all.
    let before = xacts_per_port(&ferry);
    for _ in 0..10 {
        c.simple_query("BEGIN").await.unwrap();
        c.simple_query("COMMIT").await.unwrap();
        c.simple_query("START TRANSACTION").await.unwrap();
        c.simple_query("ROLLBACK").await.unwrap();
    }
    assert!(delta(&before, &xacts_per_port(&ferry)).is_empty());
    // The client sees the right transaction status throughout.
    c.simple_query("BEGIN").await.unwrap();
    let err = c
        .simple_query("SELECT * FROM rt_tx WHERE tenant_id = 'x'")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("22P02"));
    let err = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(
        err.code().map(|c| c.code()),
        Some("25P02"),
        "the failed transaction is still open"
    );
    c.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(first_value(&c.simple_query("SELECT 'ok'").await.unwrap()), "ok");
}

/// Consecutive transactions on different groups keep the session whole:
/// settings follow the client to every node, named statements work on
/// both workers, cancel reaches the worker running the query, and a
/// session pinned by a temporary table stays where the table is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_follows_the_client_across_groups() {
    let Some(cluster) = shared_citus_or_skip() else {
        return;
    };
    setup(cluster);
    let ferry = citus_ferry(cluster, "");
    wait_metadata(&ferry, "public.rt_events");
    let c = connect(&ferry, "app", APP_PASS).await;
    let groups: Vec<String> = (1..=40).map(|t| owner_group(cluster, "rt_tx", t)).collect();
    let t1 = 1 + groups.iter().position(|g| g == "1").unwrap() as i64;
    let t2 = 1 + groups.iter().position(|g| g == "2").unwrap() as i64;
    c.simple_query("SET application_name = 'ferry-citus'; SET statement_timeout = '55s'")
        .await
        .unwrap();
    let probe_routed = c
        .prepare("SELECT current_setting('application_name'), current_setting('statement_timeout') FROM rt_tx WHERE tenant_id = $1 AND id = 2")
        .await
        .unwrap();
    for round in 0..10 {
        for t in [t1, t2] {
            let r = c.query_one(&probe_routed, &[&t]).await.unwrap();
            assert_eq!(r.get::<_, &str>(0), "ferry-citus", "round {round} tenant {t}");
            assert_eq!(r.get::<_, &str>(1), "55s");
        }
        // And on the coordinator, in between.
        let r = c
            .query_one("SELECT current_setting('application_name')", &[])
            .await
            .unwrap();
        assert_eq!(r.get::<_, &str>(0), "ferry-citus");
    }
    let before = xacts_per_port(&ferry);
    for t in [t1, t2, t1, t2] {
        c.query_one(&probe_routed, &[&t]).await.unwrap();
    }
    let d = delta(&before, &xacts_per_port(&ferry));
    assert_eq!(d.len(), 2, "both workers served: {d:?}");
    assert!(!d.contains_key(&cluster.coordinator_port()));

    // Cancel reaches the worker running the statement.
    let token = c.cancel_token();
    let slow = c
        .prepare("SELECT pg_sleep(20), v FROM rt_tx WHERE tenant_id = $1 AND id = 2")
        .await
        .unwrap();
    let started = Instant::now();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        token.cancel_query(tokio_postgres::NoTls).await
    });
    let err = c.query(&slow, &[&t2]).await.unwrap_err();
    canceller.await.unwrap().unwrap();
    assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    c.query_one(&probe_routed, &[&t1]).await.unwrap();

    // A temporary table pins the session to its node: keyed statements
    // after it stay there (else the table would vanish).
    c.simple_query("CREATE TEMP TABLE pinned_here (x int); INSERT INTO pinned_here VALUES (1)")
        .await
        .unwrap();
    for t in [t1, t2, t1, t2] {
        c.query_one(&probe_routed, &[&t]).await.unwrap();
        let n: i64 = c
            .query_one("SELECT count(*) FROM pinned_here", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1);
    }
}

/// `any_node = true`: multi-shard reads are spread over the coordinator and
/// the workers (each runs them through Citus, "query from any node"), with
/// the same answers; writes and node-dependent functions stay on the
/// coordinator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_balances_multi_shard_reads() {
    let Some(cluster) = shared_citus_or_skip() else {
        return;
    };
    setup(cluster);
    let ferry = citus_ferry(cluster, "[citus]\nany_node = true\n");
    wait_metadata(&ferry, "public.rt_tx");
    let c = connect(&ferry, "app", APP_PASS).await;
    let expected = cluster.coordinator_sql("SELECT count(*) FROM rt_tx").unwrap();
    let before = xacts_per_port(&ferry);
    for _ in 0..30 {
        let n = first_value(&c.simple_query("SELECT count(*) FROM rt_tx").await.unwrap());
        assert_eq!(n, expected);
    }
    let d = delta(&before, &xacts_per_port(&ferry));
    assert_eq!(d.len(), 3, "coordinator and both workers: {d:?}");
    assert!(d.values().all(|n| *n >= 5), "{d:?}");
    // A function whose result depends on the node: the coordinator only.
    let before = xacts_per_port(&ferry);
    for _ in 0..6 {
        c.simple_query("SELECT pg_backend_pid(), count(*) FROM rt_tx")
            .await
            .unwrap();
    }
    let d = delta(&before, &xacts_per_port(&ferry));
    assert_eq!(d, BTreeMap::from([(cluster.coordinator_port(), 6)]));
}

/// Schema-based sharding: a distributed schema's tables live on one group;
/// statements on them go there, by qualified name or through the client's
/// search_path. The status page shows the Citus state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_schemas_route_to_their_group() {
    let Some(cluster) = shared_citus_or_skip() else {
        return;
    };
    setup(cluster);
    cluster
        .coordinator_sql(
            "DROP SCHEMA IF EXISTS rt_tenant_a, rt_tenant_b CASCADE;\n\
             SET citus.enable_schema_based_sharding TO on;\n\
             CREATE SCHEMA rt_tenant_a; CREATE SCHEMA rt_tenant_b;\n\
             CREATE TABLE rt_tenant_a.orders (id int PRIMARY KEY, v text);\n\
             CREATE TABLE rt_tenant_b.orders (id int PRIMARY KEY, v text);\n\
             GRANT USAGE ON SCHEMA rt_tenant_a, rt_tenant_b TO app;\n\
             GRANT ALL ON rt_tenant_a.orders, rt_tenant_b.orders TO app;",
        )
        .unwrap();
    let group_of = |schema: &str| {
        cluster
            .coordinator_sql(&format!(
                "SELECT n.nodeport FROM pg_dist_partition p JOIN pg_dist_shard s USING (logicalrelid) \
                 JOIN pg_dist_placement pl USING (shardid) JOIN pg_dist_node n ON n.groupid = pl.groupid \
                 WHERE p.logicalrelid = '{schema}.orders'::regclass AND n.noderole = 'primary'"
            ))
            .unwrap()
            .parse::<u16>()
            .unwrap()
    };
    let (a, b) = (group_of("rt_tenant_a"), group_of("rt_tenant_b"));
    let ferry = citus_ferry(cluster, "");
    wait_metadata(&ferry, "rt_tenant_b.orders");
    let c = connect(&ferry, "app", APP_PASS).await;
    let before = xacts_per_port(&ferry);
    c.simple_query("INSERT INTO rt_tenant_a.orders VALUES (1, 'a')")
        .await
        .unwrap();
    c.simple_query("INSERT INTO rt_tenant_b.orders VALUES (1, 'b')")
        .await
        .unwrap();
    let mut expected = BTreeMap::new();
    *expected.entry(a).or_insert(0) += 1;
    *expected.entry(b).or_insert(0) += 1;
    assert_eq!(delta(&before, &xacts_per_port(&ferry)), expected, "qualified names");
    // Unqualified: "orders" exists in both schemas, so only the client's
    // search_path can say which (SET is kept by pgferry and synced).
    c.simple_query("SET search_path = rt_tenant_b, public").await.unwrap();
    let before = xacts_per_port(&ferry);
    let v = first_value(&c.simple_query("SELECT v FROM orders WHERE id = 1").await.unwrap());
    assert_eq!(v, "b");
    assert_eq!(
        delta(&before, &xacts_per_port(&ferry)),
        BTreeMap::from([(b, 1)]),
        "search_path; relations named orders: {}",
        cluster
            .coordinator_sql("SELECT string_agg(c.relnamespace::regnamespace || '.' || c.relname || ':' || c.relkind::text, ' ') FROM pg_class c WHERE c.relname = 'orders'")
            .unwrap()
    );
    let (code, page) = get(http_port(&ferry), "/").await;
    assert_eq!(code, 200);
    assert!(
        page.contains("<h2>Citus</h2>") && page.contains("id=\"citus-groups\""),
        "{page}"
    );
}
