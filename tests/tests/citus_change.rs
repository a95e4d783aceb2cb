//! Citus metadata changing under load (issue 14, item 8): 16 clients write
//! and read by key through pgferry while shards move
//! (`citus_move_shard_placement`) and the rebalancer runs
//! (`citus_rebalance_start`). Nothing may be lost: every acknowledged insert
//! is found at the end, errors are counted by SQLSTATE (none expected), and
//! routes follow a move within a few refresh intervals.
//!
//! Its own test binary: it moves shards of the cluster it uses.

mod common;

use common::*;
use pgferry_tests::citus::{shared_citus_or_skip, CitusCluster};
use pgferry_tests::Ferry;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CLIENTS: usize = 16;
const TENANTS: i64 = 64;

fn citus_ferry(cluster: &CitusCluster) -> Ferry {
    cluster
        .ferry("[pool]\npool_size = 8\n[citus]\nrefresh_interval = \"250ms\"\n")
        .expect("start pgferry")
}

fn owner_port(cluster: &CitusCluster, tenant: i64) -> u16 {
    cluster
        .coordinator_sql(&format!(
            "SELECT n.nodeport FROM pg_dist_placement p JOIN pg_dist_node n USING (groupid) \
             WHERE n.noderole = 'primary' AND p.shardid = get_shard_id_for_distribution_column('ch_events', {tenant})"
        ))
        .unwrap()
        .parse()
        .unwrap()
}

struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(i64, i64)>>>,
    errors: Arc<Mutex<BTreeMap<String, usize>>>,
    reads: Arc<std::sync::atomic::AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    async fn start(ferry: &Ferry) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(BTreeMap::new()));
        let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for client in 0..CLIENTS {
            let c = connect(ferry, "app", APP_PASS).await;
            let (stop, acked, errors, reads) = (stop.clone(), acked.clone(), errors.clone(), reads.clone());
            tasks.push(tokio::spawn(async move {
                let insert = c
                    .prepare("INSERT INTO ch_events (tenant_id, id, v) VALUES ($1, $2, 'x')")
                    .await
                    .unwrap();
                let read = c
                    .prepare("SELECT count(*) FROM ch_events WHERE tenant_id = $1")
                    .await
                    .unwrap();
                let mut n: i64 = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let tenant = 1 + (n * 7 + client as i64) % TENANTS;
                    let id = (client as i64) << 32 | n;
                    match c.execute(&insert, &[&tenant, &id]).await {
                        Ok(1) => acked.lock().unwrap().push((tenant, id)),
                        Ok(k) => panic!("insert affected {k} rows"),
                        Err(e) => {
                            let code = e.code().map(|c| c.code().to_owned()).unwrap_or_else(|| e.to_string());
                            *errors.lock().unwrap().entry(code).or_default() += 1;
                        }
                    }
                    match c.query_one(&read, &[&tenant]).await {
                        Ok(_) => {
                            reads.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            let code = e.code().map(|c| c.code().to_owned()).unwrap_or_else(|| e.to_string());
                            *errors.lock().unwrap().entry(code).or_default() += 1;
                        }
                    }
                }
            }));
        }
        Load {
            stop,
            acked,
            errors,
            reads,
            tasks,
        }
    }

    async fn finish(self) -> (Vec<(i64, i64)>, BTreeMap<String, usize>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let acked = std::mem::take(&mut *self.acked.lock().unwrap());
        let errors = std::mem::take(&mut *self.errors.lock().unwrap());
        (acked, errors, self.reads.load(Ordering::Relaxed))
    }
}

/// Waits until tenant `t`'s transactions run on `port` (routes followed the
/// move); returns how long that took.
async fn wait_route(ferry: &Ferry, t: i64, port: u16) -> Duration {
    let c = connect(ferry, "app", APP_PASS).await;
    let q = c
        .prepare("SELECT count(*) FROM ch_events WHERE tenant_id = $1")
        .await
        .unwrap();
    let start = Instant::now();
    loop {
        let before = xacts_per_port(ferry);
        c.query_one(&q, &[&t]).await.unwrap();
        let after = xacts_per_port(ferry);
        if after.get(&port).copied().unwrap_or(0) > before.get(&port).copied().unwrap_or(0) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "routes never followed the move"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_moves_and_rebalancing_lose_nothing() {
    let Some(cluster) = shared_citus_or_skip() else {
        return;
    };
    cluster
        .coordinator_sql(
            "DROP TABLE IF EXISTS ch_events;\n\
             CREATE TABLE ch_events (tenant_id bigint NOT NULL, id bigint NOT NULL, v text, PRIMARY KEY (tenant_id, id));\n\
             SELECT create_distributed_table('ch_events', 'tenant_id', shard_count := 8);\n\
             GRANT ALL ON ch_events TO app;",
        )
        .unwrap();
    let ferry = citus_ferry(cluster);
    let start = Instant::now();
    while !admin(ferry.rw_port, "SHOW CITUS").contains("public.ch_events") {
        assert!(start.elapsed() < Duration::from_secs(20), "metadata not loaded");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (w1, w2) = (cluster.worker_port(1), cluster.worker_port(2));
    let load = Load::start(&ferry).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 1. Move tenant 1's shard to the other worker while the load runs.
    let from = owner_port(cluster, 1);
    let to = if from == w1 { w2 } else { w1 };
    let moved = Instant::now();
    cluster
        .coordinator_sql(&format!(
            "SELECT citus_move_shard_placement(get_shard_id_for_distribution_column('ch_events', 1), \
             '127.0.0.1', {from}, '127.0.0.1', {to}, shard_transfer_mode := 'block_writes')"
        ))
        .unwrap();
    let move_took = moved.elapsed();
    assert_eq!(owner_port(cluster, 1), to);
    let follow = wait_route(&ferry, 1, to).await;
    println!("move: {move_took:?}; routes followed {follow:?} after it");
    assert!(
        follow < Duration::from_secs(3),
        "routes followed the move after {follow:?}"
    );

    // 2. Unbalance (every shard to worker 1), then let the rebalancer
    //    spread them again, all under load.
    let shards = cluster
        .coordinator_sql(&format!(
            "SELECT string_agg(s.shardid::text, ' ') FROM pg_dist_shard s JOIN pg_dist_placement p USING (shardid) \
             JOIN pg_dist_node n USING (groupid) WHERE s.logicalrelid = 'ch_events'::regclass AND n.nodeport = {w2}"
        ))
        .unwrap();
    for shard in shards.split_whitespace() {
        cluster
            .coordinator_sql(&format!(
                "SELECT citus_move_shard_placement({shard}, '127.0.0.1', {w2}, '127.0.0.1', {w1}, shard_transfer_mode := 'block_writes')"
            ))
            .unwrap();
    }
    let rebalanced = Instant::now();
    cluster
        .coordinator_sql(
            "SELECT citus_rebalance_start(shard_transfer_mode := 'block_writes'); SELECT citus_rebalance_wait();",
        )
        .unwrap();
    let on_w2: i64 = cluster
        .coordinator_sql(&format!(
            "SELECT count(*) FROM pg_dist_shard s JOIN pg_dist_placement p USING (shardid) JOIN pg_dist_node n USING (groupid) \
             WHERE s.logicalrelid = 'ch_events'::regclass AND n.nodeport = {w2}"
        ))
        .unwrap()
        .parse()
        .unwrap();
    println!(
        "rebalance: {:?}, {on_w2} of 8 shards back on worker 2",
        rebalanced.elapsed()
    );
    assert!(on_w2 >= 3, "the rebalancer moved shards back");

    // 3. A new worker joins and the rebalancer gives it shards: their
    //    tenants' transactions go there, under load.
    let added = Instant::now();
    let w3 = cluster.add_worker().unwrap();
    cluster
        .coordinator_sql(
            "SELECT citus_rebalance_start(shard_transfer_mode := 'block_writes'); SELECT citus_rebalance_wait();",
        )
        .unwrap();
    let on_w3: Vec<i64> = (1..=TENANTS).filter(|t| owner_port(cluster, *t) == w3).collect();
    println!(
        "worker added and rebalanced in {:?}: tenants now on it: {on_w3:?}",
        added.elapsed()
    );
    assert!(!on_w3.is_empty(), "the rebalancer gave the new worker shards");
    let follow = wait_route(&ferry, on_w3[0], w3).await;
    println!("routes followed to the new worker {follow:?} after the rebalance");
    assert!(follow < Duration::from_secs(3), "after {follow:?}");

    // 4. It is drained and removed again: nothing goes there any more.
    cluster
        .coordinator_sql(&format!(
            "SELECT citus_drain_node('127.0.0.1', {w3}, shard_transfer_mode := 'block_writes'); \
             SELECT citus_remove_node('127.0.0.1', {w3});"
        ))
        .unwrap();
    let back = owner_port(cluster, on_w3[0]);
    let follow = wait_route(&ferry, on_w3[0], back).await;
    println!("routes left the drained worker {follow:?} after its removal");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = xacts_per_port(&ferry);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let d = delta(&before, &xacts_per_port(&ferry));
    assert!(
        !d.contains_key(&w3),
        "transactions still reach the removed worker: {d:?}"
    );
    // Leaving the Citus primaries is not a demotion: the pools on it drain
    // (running transactions finish), nothing is cut.
    let log = ferry.log();
    assert!(
        log.contains("node left the Citus worker primaries") && !log.contains("read-write pool retired"),
        "the removed worker's pools were cut, not drained:\n{log}"
    );

    let (acked, errors, reads) = load.finish().await;
    let found: i64 = cluster
        .coordinator_sql("SELECT count(*) FROM ch_events")
        .unwrap()
        .parse()
        .unwrap();
    let routed = admin(ferry.rw_port, "SHOW CITUS");
    println!(
        "under change: {} inserts acknowledged, {found} rows found, {reads} reads, errors by SQLSTATE: {errors:?}\n{}",
        acked.len(),
        routed
            .lines()
            .filter(|l| l.starts_with("status"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        found,
        acked.len() as i64,
        "every acknowledged insert is there, nothing else"
    );
    assert!(errors.is_empty(), "errors: {errors:?}");
    assert!(acked.len() > 100 && reads > 100, "the load ran");
}
