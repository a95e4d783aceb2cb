//! The Citus metadata a router needs, read from the coordinator as one
//! immutable [`Snapshot`] (swapped whole, like the topology).
//!
//! Facts this relies on (reference/citus.md §2-5): `pg_dist_*` catalogs are
//! readable by any role; hash shards carry inclusive int32 bounds; a shard
//! move only changes `pg_dist_placement.groupid`; Citus sends no
//! notification of changes, so a cheap fingerprint is polled.

use super::hash::DistType;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

/// How a table is distributed, as far as routing goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableKind {
    /// Hash-distributed on `column`; shards in the table's colocation
    /// group's ranges.
    Hash,
    /// One shard replicated on every node: reads may go to any primary.
    Reference,
    /// One shard on one group: schema-based sharding, a distributed table
    /// without a key, or a Citus-local table (group 0).
    SingleShard { group: u32 },
    /// Append/range distribution, replicated hash shards, anything else:
    /// never routed.
    Other,
}

/// A distributed table.
#[derive(Debug)]
pub struct Table {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    pub kind: TableKind,
    pub colocation: u32,
    /// The distribution column (hash tables).
    pub column: Option<String>,
    /// Its type, when pgferry can hash it exactly (and its collation is
    /// deterministic).
    pub dist_type: Option<DistType>,
    pub type_oid: u32,
    /// Columns whose default draws from a sequence (serial, identity):
    /// an INSERT that leaves one out stays on the coordinator, where the
    /// values come from the coordinator's sequence (on a worker int
    /// sequences fail and bigint ones give node-specific ranges).
    pub sequence_columns: Vec<String>,
    /// Sorted, inclusive hash ranges and the group of each (hash tables).
    pub shards: Vec<ShardRange>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardRange {
    pub min: i32,
    pub max: i32,
    pub shard: u64,
    pub group: u32,
}

impl Table {
    /// The shard whose range holds `hash` (binary search: ranges are not
    /// uniform after a split).
    pub fn shard_for(&self, hash: i32) -> Option<&ShardRange> {
        let i = self.shards.partition_point(|r| r.max < hash);
        self.shards.get(i).filter(|r| r.min <= hash)
    }

    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// A `pg_dist_node` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    pub nodeid: i32,
    pub group: u32,
    pub host: String,
    pub port: u16,
    pub primary: bool,
    pub active: bool,
    pub metadata_synced: bool,
}

/// Everything routing reads, loaded at once.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub loaded_at: Option<SystemTime>,
    /// Bumped on every load that changed something; plans remember it.
    pub generation: u64,
    pub citus_version: String,
    pub fingerprint: String,
    pub tables: HashMap<(String, String), Arc<Table>>,
    /// Every (schema, relation) whose name is also a distributed table's:
    /// an unqualified name resolves to a distributed table only if the
    /// search path cannot find another relation of that name first.
    pub same_named: HashMap<String, Vec<String>>,
    pub nodes: Vec<NodeRow>,
}

impl Snapshot {
    /// How long ago it was loaded; None if never (or the clock went back).
    pub fn age(&self) -> Option<std::time::Duration> {
        self.loaded_at.and_then(|t| t.elapsed().ok())
    }

    /// The active primary of each group, from `pg_dist_node`, where its
    /// metadata is synced: a worker without Citus metadata has only shard
    /// tables, so a statement naming the distributed table fails there.
    pub fn group_primaries(&self) -> BTreeMap<u32, (String, u16)> {
        self.nodes
            .iter()
            .filter(|n| n.primary && n.active && (n.group == 0 || n.metadata_synced))
            .map(|n| (n.group, (n.host.clone(), n.port)))
            .collect()
    }

    /// Resolves a relation name the way PostgreSQL's search path would, as
    /// far as pgferry knows: a qualified name directly; an unqualified one
    /// through `search_path` (when the client set one) or, without it,
    /// only when the name is unique in the database. None: not a
    /// distributed table, or not certain.
    pub fn resolve(&self, schema: Option<&str>, name: &str, search_path: Option<&[String]>) -> Option<&Arc<Table>> {
        if let Some(schema) = schema {
            return self.tables.get(&(schema.to_owned(), name.to_owned()));
        }
        let schemas = self.same_named.get(name)?;
        let schema = match search_path {
            // pg_catalog is searched first unless listed.
            Some(path) => {
                if schemas.iter().any(|s| s == "pg_catalog") && !path.iter().any(|s| s == "pg_catalog") {
                    return None;
                }
                path.iter().find(|p| schemas.contains(p))?
            }
            None if schemas.len() == 1 => &schemas[0],
            None => return None,
        };
        self.tables.get(&(schema.clone(), name.to_owned()))
    }
}

/// Why a load failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("Citus is not installed in this database")]
    NoCitus,
    #[error("{0}")]
    Query(#[from] tokio_postgres::Error),
}

/// The change-detection fingerprint (reference §4): changes on new tables,
/// splits, moves, node changes.
pub const FINGERPRINT_SQL: &str = "SELECT \
 (SELECT md5(coalesce(string_agg(concat_ws(':', s.logicalrelid::oid, s.shardid, s.shardminvalue, \
   s.shardmaxvalue, p.groupid, p.shardstate), ',' ORDER BY s.shardid, p.groupid), '')) \
   FROM pg_dist_shard s JOIN pg_dist_placement p USING (shardid)) \
 || (SELECT md5(coalesce(string_agg(concat_ws(':', nodeid, groupid, nodename, nodeport, noderole, isactive, \
   nodecluster, metadatasynced), ',' ORDER BY nodeid), '')) FROM pg_dist_node) \
 || (SELECT md5(coalesce(string_agg(concat_ws(':', logicalrelid::oid, partmethod, colocationid, repmodel, partkey), \
   ',' ORDER BY logicalrelid::oid), '')) FROM pg_dist_partition) \
 || (SELECT md5(coalesce(string_agg(concat_ws(':', c.oid, c.relname, c.relnamespace), ',' ORDER BY c.oid), '')) \
   FROM pg_class c WHERE c.relname IN (SELECT c2.relname FROM pg_dist_partition p2 JOIN pg_class c2 ON c2.oid = p2.logicalrelid)) \
 || (SELECT md5(coalesce(string_agg(concat_ws(':', d.adrelid, d.adnum, md5(d.adbin::text)), ',' ORDER BY d.adrelid, d.adnum), '')) \
   FROM pg_attrdef d WHERE d.adrelid IN (SELECT logicalrelid FROM pg_dist_partition))";

const VERSION_SQL: &str = "SELECT extversion FROM pg_extension WHERE extname = 'citus'";

const TABLES_SQL: &str = "SELECT p.logicalrelid::oid::int8, n.nspname::text, c.relname::text, p.partmethod::text, \
 p.repmodel::text, p.colocationid::int8, a.attname::text, a.atttypid::oid::int8, \
 coalesce(co.collisdeterministic, true), coalesce(a.atttypmod, -1) \
 FROM pg_dist_partition p \
 JOIN pg_class c ON c.oid = p.logicalrelid \
 JOIN pg_namespace n ON n.oid = c.relnamespace \
 LEFT JOIN pg_attribute a ON p.partkey IS NOT NULL AND a.attrelid = p.logicalrelid \
      AND a.attname = column_to_column_name(p.logicalrelid, p.partkey) \
 LEFT JOIN pg_collation co ON co.oid = a.attcollation";

const SHARDS_SQL: &str = "SELECT s.logicalrelid::oid::int8, s.shardid, s.shardminvalue::int4, s.shardmaxvalue::int4, \
 pl.groupid::int8 FROM pg_dist_shard s JOIN pg_dist_placement pl USING (shardid) \
 WHERE pl.shardstate = 1 ORDER BY 1, 3, 2";

const NODES_SQL: &str = "SELECT nodeid, groupid::int8, nodename::text, nodeport::int8, noderole::text = 'primary', \
 isactive, metadatasynced FROM pg_dist_node ORDER BY nodeid";

const SEQUENCE_COLUMNS_SQL: &str = "SELECT a.attrelid::oid::int8, a.attname::text FROM pg_attribute a \
 JOIN pg_dist_partition p ON p.logicalrelid = a.attrelid \
 LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
 WHERE a.attnum > 0 AND NOT a.attisdropped \
   AND (a.attidentity <> '' OR pg_get_expr(d.adbin, d.adrelid) LIKE '%nextval(%')";

const SAME_NAMED_SQL: &str = "SELECT n.nspname::text, c.relname::text FROM pg_class c \
 JOIN pg_namespace n ON n.oid = c.relnamespace \
 WHERE c.relname IN (SELECT c2.relname FROM pg_dist_partition p JOIN pg_class c2 ON c2.oid = p.logicalrelid) \
   AND c.relkind IN ('r', 'p', 'v', 'm', 'f') \
   AND n.nspname NOT LIKE 'pg\\_temp\\_%' AND n.nspname NOT LIKE 'pg\\_toast%'";

/// Reads the fingerprint.
pub async fn fingerprint(client: &tokio_postgres::Client) -> Result<String, tokio_postgres::Error> {
    client.query_one(FINGERPRINT_SQL, &[]).await.map(|r| r.get(0))
}

/// Loads a whole snapshot in one repeatable-read transaction (one
/// consistent view of the catalogs).
pub async fn load(client: &mut tokio_postgres::Client, generation: u64) -> Result<Snapshot, LoadError> {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let Some(version) = tx.query_opt(VERSION_SQL, &[]).await? else {
        return Err(LoadError::NoCitus);
    };
    let fingerprint: String = tx.query_one(FINGERPRINT_SQL, &[]).await?.get(0);
    let mut sequence_columns: HashMap<u32, Vec<String>> = HashMap::new();
    for r in tx.query(SEQUENCE_COLUMNS_SQL, &[]).await? {
        sequence_columns
            .entry(r.get::<_, i64>(0) as u32)
            .or_default()
            .push(r.get(1));
    }
    let mut placements: HashMap<u32, Vec<Placement>> = HashMap::new();
    for r in tx.query(SHARDS_SQL, &[]).await? {
        placements.entry(r.get::<_, i64>(0) as u32).or_default().push((
            r.get::<_, i64>(1) as u64,
            r.get(2),
            r.get(3),
            r.get::<_, i64>(4) as u32,
        ));
    }
    let mut tables = HashMap::new();
    for r in tx.query(TABLES_SQL, &[]).await? {
        let oid = r.get::<_, i64>(0) as u32;
        let method: String = r.get(3);
        let repmodel: String = r.get(4);
        let type_oid = r.get::<_, Option<i64>>(7).unwrap_or(0) as u32;
        let deterministic: bool = r.get(8);
        // numeric(p,s) rounds a value before storing (and hashing) it:
        // pgferry would hash the unrounded literal.
        let typmod: i32 = r.get(9);
        let exact = deterministic && !(type_oid == 1700 && typmod != -1);
        let places = placements.remove(&oid).unwrap_or_default();
        let (kind, shards) = classify(&method, &repmodel, &places);
        let t = Table {
            oid,
            schema: r.get(1),
            name: r.get(2),
            kind,
            colocation: r.get::<_, i64>(5) as u32,
            column: r.get(6),
            dist_type: DistType::from_oid(type_oid).filter(|_| exact),
            type_oid,
            sequence_columns: sequence_columns.remove(&oid).unwrap_or_default(),
            shards,
        };
        tables.insert((t.schema.clone(), t.name.clone()), Arc::new(t));
    }
    let mut same_named: HashMap<String, Vec<String>> = HashMap::new();
    for r in tx.query(SAME_NAMED_SQL, &[]).await? {
        same_named.entry(r.get(1)).or_default().push(r.get(0));
    }
    let nodes = tx
        .query(NODES_SQL, &[])
        .await?
        .iter()
        .map(|r| NodeRow {
            nodeid: r.get(0),
            group: r.get::<_, i64>(1) as u32,
            host: r.get(2),
            port: r.get::<_, i64>(3) as u16,
            primary: r.get(4),
            active: r.get(5),
            metadata_synced: r.get(6),
        })
        .collect();
    tx.commit().await?;
    Ok(Snapshot {
        loaded_at: Some(SystemTime::now()),
        generation,
        citus_version: version.get(0),
        fingerprint,
        tables,
        same_named,
        nodes,
    })
}

/// An active placement: (shard, min, max, group).
type Placement = (u64, Option<i32>, Option<i32>, u32);

/// What routing may do with a table, from its `pg_dist_partition` row and
/// active placements.
fn classify(method: &str, repmodel: &str, places: &[Placement]) -> (TableKind, Vec<ShardRange>) {
    match (method, repmodel) {
        ("n", "t") => (TableKind::Reference, Vec::new()),
        ("n", _) => {
            let groups: HashSet<u32> = places.iter().map(|p| p.3).collect();
            match (groups.len(), places.first()) {
                (1, Some(p)) => (TableKind::SingleShard { group: p.3 }, Vec::new()),
                _ => (TableKind::Other, Vec::new()),
            }
        }
        ("h", _) => {
            let mut shards = Vec::with_capacity(places.len());
            let mut seen = HashSet::new();
            for &(shard, min, max, group) in places {
                let (Some(min), Some(max)) = (min, max) else {
                    return (TableKind::Other, Vec::new());
                };
                // A shard with two active placements (replication factor
                // > 1, legacy): either could serve; pgferry does not pick.
                if !seen.insert(shard) {
                    return (TableKind::Other, Vec::new());
                }
                shards.push(ShardRange { min, max, shard, group });
            }
            shards.sort_by_key(|s| s.min);
            // The ranges must cover int32 without gaps or overlaps, else
            // something is mid-change: do not route.
            let covers = shards.first().is_some_and(|s| s.min == i32::MIN)
                && shards.last().is_some_and(|s| s.max == i32::MAX)
                && shards.windows(2).all(|w| w[0].max.checked_add(1) == Some(w[1].min));
            if covers {
                (TableKind::Hash, shards)
            } else {
                (TableKind::Other, Vec::new())
            }
        }
        _ => (TableKind::Other, Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uniform(n: u32) -> Vec<Placement> {
        let inc = (1u64 << 32) / n as u64;
        (0..n)
            .map(|i| {
                let min = (i32::MIN as i64 + (i as i64) * inc as i64) as i32;
                let max = if i == n - 1 {
                    i32::MAX
                } else {
                    (min as i64 + inc as i64 - 1) as i32
                };
                (100 + i as u64, Some(min), Some(max), 1 + i % 2)
            })
            .collect()
    }

    #[test]
    fn hash_tables_need_full_coverage() {
        let (kind, shards) = classify("h", "s", &uniform(32));
        assert_eq!(kind, TableKind::Hash);
        assert_eq!(shards.len(), 32);
        let t = Table {
            oid: 1,
            schema: "public".into(),
            name: "events".into(),
            kind,
            colocation: 1,
            column: Some("tenant_id".into()),
            dist_type: Some(DistType::Int8),
            type_oid: 20,
            sequence_columns: vec![],
            shards,
        };
        // Reference values (citus.md §3): hashint8(42) = 1509752520 is index
        // 27; -96758253 index 15; i32::MIN index 0, i32::MAX index 31.
        assert_eq!(t.shard_for(1509752520).unwrap().shard, 127);
        assert_eq!(t.shard_for(-96758253).unwrap().shard, 115);
        assert_eq!(t.shard_for(i32::MIN).unwrap().shard, 100);
        assert_eq!(t.shard_for(i32::MAX).unwrap().shard, 131);
        // A gap or an overlap (a split in progress) is not routed.
        let mut gap = uniform(4);
        gap.remove(1);
        assert_eq!(classify("h", "s", &gap).0, TableKind::Other);
        let mut twice = uniform(4);
        twice.push(twice[0]);
        assert_eq!(classify("h", "s", &twice).0, TableKind::Other);
        let mut nulls = uniform(4);
        nulls[0].1 = None;
        assert_eq!(classify("h", "s", &nulls).0, TableKind::Other);
    }

    #[test]
    fn split_ranges_are_searched_not_computed() {
        let places = vec![
            (7, Some(i32::MIN), Some(-2_000_000_000), 1),
            (8, Some(-1_999_999_999), Some(-1_073_741_825), 2),
            (2, Some(-1_073_741_824), Some(-1), 1),
            (3, Some(0), Some(1_073_741_823), 2),
            (4, Some(1_073_741_824), Some(i32::MAX), 1),
        ];
        let (kind, shards) = classify("h", "s", &places);
        assert_eq!(kind, TableKind::Hash);
        let t = Table {
            oid: 1,
            schema: "s".into(),
            name: "t".into(),
            kind,
            colocation: 1,
            column: None,
            dist_type: None,
            type_oid: 0,
            sequence_columns: vec![],
            shards,
        };
        for (h, shard) in [
            (i32::MIN, 7),
            (-2_000_000_000, 7),
            (-1_999_999_999, 8),
            (-1_073_741_825, 8),
            (-5, 2),
            (0, 3),
            (i32::MAX, 4),
        ] {
            assert_eq!(t.shard_for(h).unwrap().shard, shard, "hash {h}");
        }
    }

    #[test]
    fn single_shard_and_reference() {
        assert_eq!(
            classify("n", "t", &[(1, None, None, 0), (1, None, None, 1)]).0,
            TableKind::Reference
        );
        assert_eq!(
            classify("n", "s", &[(1, None, None, 2)]).0,
            TableKind::SingleShard { group: 2 }
        );
        assert_eq!(classify("n", "s", &[]).0, TableKind::Other);
        assert_eq!(classify("a", "c", &[]).0, TableKind::Other);
    }

    #[test]
    fn unqualified_names_resolve_only_when_certain() {
        let mut s = Snapshot::default();
        let t = |schema: &str| {
            Arc::new(Table {
                oid: 1,
                schema: schema.into(),
                name: "events".into(),
                kind: TableKind::Reference,
                colocation: 0,
                column: None,
                dist_type: None,
                type_oid: 0,
                sequence_columns: vec![],
                shards: vec![],
            })
        };
        s.tables.insert(("public".into(), "events".into()), t("public"));
        s.same_named.insert("events".into(), vec!["public".into()]);
        assert!(s.resolve(None, "events", None).is_some());
        assert!(s.resolve(Some("public"), "events", None).is_some());
        assert!(s.resolve(Some("other"), "events", None).is_none());
        assert!(s.resolve(None, "nope", None).is_none());
        // A local table of the same name elsewhere: only a search path that
        // finds the distributed one first resolves.
        s.same_named
            .insert("events".into(), vec!["public".into(), "app".into()]);
        assert!(s.resolve(None, "events", None).is_none());
        let path = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(s.resolve(None, "events", Some(&path(&["public", "app"]))).is_some());
        assert!(s.resolve(None, "events", Some(&path(&["app", "public"]))).is_none());
        assert!(s.resolve(None, "events", Some(&path(&["x"]))).is_none());
    }
}
