//! What the Citus routing decision costs per transaction, without a
//! network: the analysis of a statement text (cached per text or template)
//! and, for a prepared statement, hashing its Bind's key.
//!
//!     cargo run --release -p pgferry-routing --example route_cost
//!
//! Prints nanoseconds per decision for simple-protocol texts (each with
//! different constants, as pgbench sends them) and for a prepared statement
//! bound with new values each time. BENCHMARKS.md quotes it.

use pgferry_routing::citus::hash::DistType;
use pgferry_routing::citus::metadata::{NodeRow, ShardRange, Table, TableKind};
use pgferry_routing::citus::{analyze::Plan, Citus, Snapshot, Target};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

const N: usize = 200_000;

fn snapshot() -> Snapshot {
    let inc = (1u64 << 32) / 32;
    let shards = (0..32u32)
        .map(|i| {
            let min = (i32::MIN as i64 + i as i64 * inc as i64) as i32;
            let max = if i == 31 {
                i32::MAX
            } else {
                (min as i64 + inc as i64 - 1) as i32
            };
            ShardRange {
                min,
                max,
                shard: 102008 + i as u64,
                group: 1 + i % 2,
            }
        })
        .collect();
    let table = Table {
        oid: 1,
        schema: "public".into(),
        name: "bench_events".into(),
        kind: TableKind::Hash,
        colocation: 1,
        column: Some("tenant_id".into()),
        dist_type: Some(DistType::Int8),
        type_oid: 20,
        sequence_columns: vec![],
        shards,
    };
    let mut s = Snapshot {
        loaded_at: Some(SystemTime::now()),
        generation: 1,
        ..Snapshot::default()
    };
    s.tables
        .insert(("public".into(), "bench_events".into()), Arc::new(table));
    s.same_named
        .entry("bench_events".into())
        .or_default()
        .push("public".into());
    for (g, port) in [(0, 5432), (1, 5433), (2, 5434)] {
        s.nodes.push(NodeRow {
            nodeid: g as i32 + 1,
            group: g,
            host: "127.0.0.1".into(),
            port,
            primary: true,
            active: true,
            metadata_synced: true,
        });
    }
    s
}

/// A small deterministic generator (no dependency).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn main() {
    let citus = Citus::new("app".into(), true, false);
    citus.install(snapshot());
    let path = vec!["app".to_string(), "public".to_string()];
    let mut rng = Lcg(7);

    let texts: Vec<String> = (0..N)
        .map(|_| {
            format!(
                "SELECT v FROM bench_events WHERE tenant_id = {} AND id = {};",
                1 + rng.next(1000),
                1 + rng.next(100)
            )
        })
        .collect();
    for round in 0..3 {
        let mut routed = 0;
        let start = Instant::now();
        for t in &texts {
            let a = citus.analysis(t.as_bytes(), Some(&path));
            if let Some(Target::Group(_)) = a.plan.target() {
                routed += 1;
            }
        }
        let ns = start.elapsed().as_nanos() as f64 / N as f64;
        assert_eq!(routed, N);
        println!("simple text, new constants each time (round {round}): {ns:.0} ns per decision");
    }

    let prepared = b"SELECT v FROM bench_events WHERE tenant_id = $1 AND id = $2";
    let keys: Vec<(String, String)> = (0..N)
        .map(|_| ((1 + rng.next(1000)).to_string(), (1 + rng.next(100)).to_string()))
        .collect();
    for round in 0..3 {
        let mut routed = 0;
        let start = Instant::now();
        for (t, i) in &keys {
            let a = citus.analysis(prepared, Some(&path));
            let Plan::Params(pp) = &a.plan else {
                panic!("{:?}", a.plan)
            };
            let values = [Some(t.as_bytes()), Some(i.as_bytes())];
            if pp.group(&values, &[], &[20, 23]).is_some() {
                routed += 1;
            }
        }
        let ns = start.elapsed().as_nanos() as f64 / N as f64;
        assert_eq!(routed, N);
        println!("prepared statement, new key each time (round {round}): {ns:.0} ns per decision");
    }
}
