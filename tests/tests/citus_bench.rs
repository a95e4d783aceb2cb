//! Benchmark (ignored by default; BENCHMARKS.md records its output):
//! single-tenant point reads and single-row inserts by key, through pgferry
//! with shard routing, pgferry coordinator-only, directly to the
//! coordinator, and directly to the owning worker, all in one run on a real
//! Citus (coordinator + 2 workers).
//!
//!   cargo build --release --bins
//!   PGFERRY_BIN=target/release/pgferry cargo test --release -p pgferry-tests \
//!       --test citus_bench -- --ignored --nocapture
//!
//! Settings: CITUS_BENCH_SECONDS (default 10), CITUS_BENCH_CLIENTS
//! (default "16 100"), CITUS_BENCH_ROUNDS (default 1).
//!
//! Every shard of the benchmark tables is on worker 1 (worker 2 takes no
//! shards while they are made), so "the owning worker" is one node for
//! every tenant and the direct-to-owner target is a fair comparison.

mod common;

use common::*;
use pgferry_tests::citus::{shared_citus_or_skip, CitusCluster};
use pgferry_tests::{Ferry, PG_BIN};
use std::time::Duration;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn ferry(cluster: &CitusCluster, routing: &str) -> Ferry {
    ferry_with(cluster, routing, false)
}

fn ferry_with(cluster: &CitusCluster, routing: &str, any_node: bool) -> Ferry {
    cluster
        .ferry(&format!(
            "[pool]\npool_size = 16\n[citus]\nrouting = \"{routing}\"\nany_node = {any_node}\n"
        ))
        .expect("start pgferry")
}

/// utime + stime of `pid`, in clock ticks (100 per second here).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

struct Run {
    tps: f64,
    latency_ms: f64,
    /// The proxy's CPU per transaction, microseconds (None: direct).
    cpu_us: Option<f64>,
}

fn pgbench(
    port: u16,
    script: &std::path::Path,
    mode: &str,
    clients: usize,
    seconds: u64,
    ferry_pid: Option<u32>,
) -> Run {
    let before = ferry_pid.map(cpu_ticks);
    let out = std::process::Command::new(std::path::Path::new(PG_BIN).join("pgbench"))
        .env("PGPASSWORD", APP_PASS)
        .args([
            "-n",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "app",
            "-M",
            mode,
        ])
        .args(["-c", &clients.to_string(), "-j", "2", "-T", &seconds.to_string(), "-f"])
        .arg(script)
        .arg("app")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "pgbench failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let num = |prefix: &str| -> f64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix:?} in {text}"))
    };
    let tps = num("tps =");
    let xacts = num("number of transactions actually processed:");
    let cpu_us = ferry_pid
        .zip(before)
        .map(|(pid, b)| (cpu_ticks(pid) - b) as f64 * 10_000.0 / xacts.max(1.0));
    Run {
        tps,
        latency_ms: num("latency average ="),
        cpu_us,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn citus_routing_benchmark() {
    let Some(cluster) = shared_citus_or_skip() else {
        return;
    };
    let seconds: u64 = env_or("CITUS_BENCH_SECONDS", "10").parse().unwrap();
    let rounds: usize = env_or("CITUS_BENCH_ROUNDS", "1").parse().unwrap();
    let clients: Vec<usize> = env_or("CITUS_BENCH_CLIENTS", "16 100")
        .split_whitespace()
        .map(|c| c.parse().unwrap())
        .collect();
    let w1 = cluster.worker_port(1);
    let w2 = cluster.worker_port(2);
    cluster
        .coordinator_sql(&format!(
            "DROP TABLE IF EXISTS bench_events, bench_inserts;\n\
             SELECT citus_set_node_property('127.0.0.1', {w2}, 'shouldhaveshards', false);\n\
             CREATE TABLE bench_events (tenant_id bigint NOT NULL, id int NOT NULL, v text, PRIMARY KEY (tenant_id, id));\n\
             SELECT create_distributed_table('bench_events', 'tenant_id', shard_count := 32);\n\
             CREATE TABLE bench_inserts (tenant_id bigint NOT NULL, v text);\n\
             SELECT create_distributed_table('bench_inserts', 'tenant_id', colocate_with := 'bench_events');\n\
             SELECT citus_set_node_property('127.0.0.1', {w2}, 'shouldhaveshards', true);\n\
             INSERT INTO bench_events SELECT t, i, md5((t * 1000 + i)::text) FROM generate_series(1, 1000) t, generate_series(1, 100) i;\n\
             GRANT ALL ON bench_events, bench_inserts TO app;\n\
             VACUUM ANALYZE bench_events;"
        ))
        .unwrap();
    let groups = cluster
        .coordinator_sql(
            "SELECT string_agg(DISTINCT n.nodeport::text, ',') FROM pg_dist_placement p JOIN pg_dist_shard s USING (shardid) \
             JOIN pg_dist_node n USING (groupid) WHERE s.logicalrelid = 'bench_events'::regclass",
        )
        .unwrap();
    assert_eq!(groups, w1.to_string(), "every shard on worker 1");
    let dir = std::env::temp_dir().join(format!("pgferry-citus-bench-scripts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let read = dir.join("read.sql");
    std::fs::write(
        &read,
        "\\set t random(1, 1000)\n\\set i random(1, 100)\nSELECT v FROM bench_events WHERE tenant_id = :t AND id = :i;\n",
    )
    .unwrap();
    let insert = dir.join("insert.sql");
    std::fs::write(
        &insert,
        "\\set t random(1, 1000)\nINSERT INTO bench_inserts (tenant_id, v) VALUES (:t, 'x');\n",
    )
    .unwrap();

    let routed = ferry(cluster, "shard");
    let plain = ferry(cluster, "off");
    for f in [&routed, &plain] {
        let start = std::time::Instant::now();
        while !admin(f.rw_port, "SHOW CITUS").contains("bench_events") {
            assert!(start.elapsed() < Duration::from_secs(20), "metadata not loaded");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let targets: [(&str, u16, Option<u32>); 4] = [
        ("pgferry routed", routed.rw_port, Some(routed.pid())),
        ("pgferry coordinator-only", plain.rw_port, Some(plain.pid())),
        ("direct coordinator", cluster.coordinator_port(), None),
        ("direct owning worker", w1, None),
    ];
    println!("\nCitus routing benchmark: pgbench -n -j 2 -T {seconds}, {rounds} round(s), every shard on worker 1");
    println!("| workload | mode | clients | target | TPS | latency ms | proxy CPU us/txn | vs coordinator-only |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut floors = Vec::new();
    for (workload, script) in [("point read", &read), ("insert", &insert)] {
        for mode in ["simple", "prepared"] {
            for &n in &clients {
                if workload == "insert" && n != clients[0] {
                    continue;
                }
                // Rounds interleave the targets (the machine's load drifts).
                let mut results: Vec<Vec<Run>> = (0..targets.len()).map(|_| Vec::new()).collect();
                for _ in 0..rounds {
                    for (i, (_, port, pid)) in targets.iter().enumerate() {
                        results[i].push(pgbench(*port, script, mode, n, seconds, *pid));
                    }
                }
                let median = |runs: &Vec<Run>, f: &dyn Fn(&Run) -> f64| {
                    let mut v: Vec<f64> = runs.iter().map(f).collect();
                    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
                    v[v.len() / 2]
                };
                let base = median(&results[1], &|r| r.tps);
                for (i, (name, _, _)) in targets.iter().enumerate() {
                    let tps = median(&results[i], &|r| r.tps);
                    let lat = median(&results[i], &|r| r.latency_ms);
                    let cpu = results[i][0]
                        .cpu_us
                        .map(|_| median(&results[i], &|r| r.cpu_us.unwrap()));
                    println!(
                        "| {workload} | {mode} | {n} | {name} | {tps:.0} | {lat:.2} | {} | {:.2}x |",
                        cpu.map(|c| format!("{c:.1}")).unwrap_or_else(|| "-".into()),
                        tps / base
                    );
                    if i == 0 && workload == "point read" {
                        floors.push((mode, n, tps / base));
                    }
                }
            }
        }
    }
    // Query from any node: multi-shard reads (an index lookup in each of
    // the 32 shards) through the coordinator only, or spread over the
    // coordinator and both workers.
    let multi = dir.join("multi.sql");
    std::fs::write(
        &multi,
        "\\set i random(1, 100)\nSELECT count(*) FROM bench_events WHERE id = :i;\n",
    )
    .unwrap();
    let spread = ferry_with(cluster, "shard", true);
    let start = std::time::Instant::now();
    while !admin(spread.rw_port, "SHOW CITUS").contains("bench_events") {
        assert!(start.elapsed() < Duration::from_secs(20), "metadata not loaded");
        std::thread::sleep(Duration::from_millis(100));
    }
    for mode in ["simple", "prepared"] {
        let n = clients[0];
        let base = pgbench(routed.rw_port, &multi, mode, n, seconds, Some(routed.pid()));
        let any = pgbench(spread.rw_port, &multi, mode, n, seconds, Some(spread.pid()));
        for (name, r) in [("pgferry, coordinator only", &base), ("pgferry any_node", &any)] {
            println!(
                "| multi-shard read | {mode} | {n} | {name} | {:.0} | {:.2} | {:.1} | {:.2}x |",
                r.tps,
                r.latency_ms,
                r.cpu_us.unwrap_or(0.0),
                r.tps / base.tps
            );
        }
    }
    let show = admin(routed.rw_port, "SHOW CITUS");
    println!(
        "\nSHOW CITUS status after the run:\n{}",
        show.lines()
            .filter(|l| l.starts_with("status"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    for (mode, n, ratio) in floors {
        let floor = if mode == "prepared" { 2.0 } else { 1.5 };
        println!("floor check: point read {mode} {n} clients: routed/coordinator-only = {ratio:.2} (floor {floor})");
    }
}
