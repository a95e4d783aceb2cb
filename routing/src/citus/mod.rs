//! Citus: metadata, exact shard hashing, and the routing decision for a
//! statement (which group owns the rows it touches).
//!
//! [`Citus`] holds the current metadata [`Snapshot`] (swapped whole by the
//! refresh task, [`refresh::run`]), each group's primary as a routable
//! [`Member`], and a cache of plans per statement text, so a prepared
//! statement is analysed once.

pub mod analyze;
pub mod hash;
pub mod metadata;
pub mod refresh;

use crate::Member;
use analyze::{Analysis, Plan};
use arc_swap::ArcSwap;
pub use metadata::Snapshot;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

/// Plans kept per statement text; past this the cache starts over (texts
/// with literals in them rarely repeat).
const PLANS_KEPT: usize = 10_000;

/// Where a transaction goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The coordinator (group 0's leader: what 5432 follows).
    Coordinator,
    /// A worker group's primary.
    Group(u32),
    /// Any primary holds what it reads (reference tables).
    AnyPrimary,
    /// A multi-shard read any metadata-synced primary can run.
    AnyNode,
    /// Not decided by this statement (BEGIN, SET): the next one decides.
    Undecided,
}

/// What /metrics and SHOW CITUS count.
#[derive(Debug, Default)]
pub struct Counters {
    /// Transactions sent to a worker group's primary.
    pub routed: AtomicU64,
    /// Transactions on the coordinator (not routable, or group 0).
    pub coordinator: AtomicU64,
    /// Reference-table reads sent to whichever primary the session had.
    pub any_node: AtomicU64,
    pub refreshes: AtomicU64,
    pub refresh_errors: AtomicU64,
    /// Fingerprint checks that found nothing changed.
    pub checks: AtomicU64,
    pub plans_analysed: AtomicU64,
    /// Routed transactions whose group had no known primary (sent to the
    /// coordinator instead).
    pub no_primary: AtomicU64,
}

/// A plan for one statement text under one search_path (an unqualified
/// name resolves through it): sessions with different paths each get
/// theirs, and none evicts another's.
struct CachedPlan {
    generation: u64,
    search_path: Option<Box<[String]>>,
    analysis: Arc<Analysis>,
}

/// Search paths kept per text; past this the text's plans start over.
const PATHS_KEPT: usize = 16;

/// The live Citus state one pgferry shares between sessions.
pub struct Citus {
    /// The server database holding the extension.
    pub database: String,
    pub enabled: bool,
    /// Balance multi-shard reads across primaries ([citus] any_node).
    pub any_node: bool,
    /// Round robin for those.
    next_node: std::sync::atomic::AtomicUsize,
    snapshot: ArcSwap<Snapshot>,
    /// Each group's primary from `pg_dist_node` (group 0 excluded: the
    /// coordinator is the topology's primary). Members are kept across
    /// refreshes while their address is unchanged.
    groups: ArcSwap<BTreeMap<u32, Arc<Member>>>,
    /// Each worker group's active secondaries (`noderole = 'secondary'`).
    secondaries: ArcSwap<BTreeMap<u32, Vec<Arc<Member>>>>,
    /// Per text; looked up without allocating.
    plans: RwLock<HashMap<Box<[u8]>, Vec<CachedPlan>>>,
    pub counters: Counters,
    /// Asks the refresh task for a reload now (a stale-placement error).
    pub refresh_now: tokio::sync::Notify,
    /// The last refresh error, for SHOW CITUS.
    pub last_error: std::sync::Mutex<Option<String>>,
}

impl std::fmt::Debug for Citus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Citus").field("database", &self.database).finish()
    }
}

impl Citus {
    pub fn new(database: String, enabled: bool, any_node: bool) -> Arc<Citus> {
        Arc::new(Citus {
            database,
            enabled,
            any_node,
            next_node: std::sync::atomic::AtomicUsize::new(0),
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            groups: ArcSwap::from_pointee(BTreeMap::new()),
            secondaries: ArcSwap::from_pointee(BTreeMap::new()),
            plans: RwLock::new(HashMap::new()),
            counters: Counters::default(),
            refresh_now: tokio::sync::Notify::new(),
            last_error: std::sync::Mutex::new(None),
        })
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Whether a snapshot with Citus in it was loaded.
    pub fn loaded(&self) -> bool {
        self.snapshot.load().loaded_at.is_some()
    }

    /// Installs a new snapshot: plans made under the old one are recomputed
    /// on next use (they carry its generation).
    pub fn install(&self, snap: Snapshot) {
        let old = self.groups.load();
        let mut groups = BTreeMap::new();
        for (g, (host, port)) in snap.group_primaries() {
            if g == 0 {
                continue;
            }
            let m = match old.get(&g) {
                Some(m) if m.addr.host == host && m.addr.port == port => m.clone(),
                _ => Member::new(&format!("group {g} ({host}:{port})"), host, port),
            };
            groups.insert(g, m);
        }
        self.groups.store(Arc::new(groups));
        let old = self.secondaries.load();
        let mut secondaries: BTreeMap<u32, Vec<Arc<Member>>> = BTreeMap::new();
        for n in snap.nodes.iter().filter(|n| !n.primary && n.active && n.group != 0) {
            let m = old
                .get(&n.group)
                .and_then(|v| {
                    v.iter()
                        .find(|m| m.addr.host == n.host && m.addr.port == n.port)
                        .cloned()
                })
                .unwrap_or_else(|| {
                    Member::new(
                        &format!("group {} secondary ({}:{})", n.group, n.host, n.port),
                        n.host.clone(),
                        n.port,
                    )
                });
            secondaries.entry(n.group).or_default().push(m);
        }
        self.secondaries.store(Arc::new(secondaries));
        self.snapshot.store(Arc::new(snap));
        self.plans.write().unwrap().clear();
    }

    /// The next node (0: the coordinator, k: the k-th worker of `n`) for a
    /// balanced read.
    pub fn next_node(&self, workers: usize) -> usize {
        self.next_node.fetch_add(1, Relaxed) % (workers + 1)
    }

    /// A worker group's primary.
    pub fn group(&self, g: u32) -> Option<Arc<Member>> {
        self.groups.load().get(&g).cloned()
    }

    pub fn groups(&self) -> Arc<BTreeMap<u32, Arc<Member>>> {
        self.groups.load_full()
    }

    /// A worker group's secondaries from `pg_dist_node`.
    pub fn group_secondaries(&self, g: u32) -> Vec<Arc<Member>> {
        self.secondaries.load().get(&g).cloned().unwrap_or_default()
    }

    pub fn is_group_secondary(&self, addr: &pgferry_pool::NodeAddr) -> bool {
        self.secondaries.load().values().flatten().any(|m| *m.addr == *addr)
    }

    /// Whether `addr` is a worker group's primary now.
    pub fn is_group_primary(&self, addr: &pgferry_pool::NodeAddr) -> bool {
        self.groups.load().values().any(|m| *m.addr == *addr)
    }

    /// The analysis of a query string, cached per text (and search_path,
    /// when the plan depended on it). Texts that differ only in constants
    /// share one analysis through a [`Template`](analyze::Template): the
    /// key is read from each text's constants.
    pub fn analysis(&self, sql: &[u8], search_path: Option<&[String]>) -> Arc<Analysis> {
        let snap = self.snapshot.load();
        if let Some(a) = self.cached(sql, snap.generation, search_path) {
            return a;
        }
        let Ok(text) = std::str::from_utf8(sql) else {
            return Arc::new(Analysis {
                plan: Plan::Coordinator("not UTF-8"),
                uses_search_path: false,
                control: None,
            });
        };
        if let Some(t) = analyze::Template::scan(text) {
            // Template keys hold NUL markers, which no query text has: the
            // two kinds of entries cannot collide.
            if let Some(a) = self.cached(&t.key, snap.generation, search_path) {
                return resolve(&a, &t);
            }
            self.counters.plans_analysed.fetch_add(1, Relaxed);
            if let Some(a) = analyze::analyze_template(text, &t, &snap, search_path) {
                let a = Arc::new(a);
                self.remember(&t.key, snap.generation, search_path, a.clone());
                return resolve(&a, &t);
            }
        } else {
            self.counters.plans_analysed.fetch_add(1, Relaxed);
        }
        let a = Arc::new(analyze::analyze(text, &snap, search_path));
        self.remember(sql, snap.generation, search_path, a.clone());
        a
    }

    fn cached(&self, key: &[u8], generation: u64, search_path: Option<&[String]>) -> Option<Arc<Analysis>> {
        let plans = self.plans.read().unwrap();
        let c = plans
            .get(key)?
            .iter()
            .find(|c| c.search_path.as_deref() == search_path)?;
        (c.generation == generation).then(|| c.analysis.clone())
    }

    fn remember(&self, key: &[u8], generation: u64, search_path: Option<&[String]>, a: Arc<Analysis>) {
        let mut plans = self.plans.write().unwrap();
        if plans.len() >= PLANS_KEPT && !plans.contains_key(key) {
            plans.clear();
        }
        let per_path = match plans.get_mut(key) {
            Some(v) => v,
            None => plans.entry(key.into()).or_default(),
        };
        per_path.retain(|c| c.search_path.as_deref() != search_path);
        if per_path.len() >= PATHS_KEPT {
            per_path.clear();
        }
        per_path.push(CachedPlan {
            generation,
            search_path: search_path.map(Into::into),
            analysis: a,
        });
    }

    /// Counts a transaction's destination.
    pub fn count(&self, t: Target) {
        let c = &self.counters;
        match t {
            Target::Group(_) => &c.routed,
            Target::AnyPrimary => &c.any_node,
            Target::AnyNode if self.any_node => &c.any_node,
            Target::AnyNode | Target::Coordinator | Target::Undecided => &c.coordinator,
        }
        .fetch_add(1, Relaxed);
    }
}

/// A template's analysis applied to one text: its key constants decide.
fn resolve(a: &Arc<Analysis>, t: &analyze::Template) -> Arc<Analysis> {
    let Plan::Params(pp) = &a.plan else {
        return a.clone();
    };
    let values: Vec<Option<&[u8]>> = t.values.iter().map(|v| v.as_deref().map(str::as_bytes)).collect();
    let plan = match pp.group(&values, &[], &[]) {
        Some(g) => Plan::Group(g),
        None => Plan::Coordinator("key constant not placed"),
    };
    Arc::new(Analysis {
        plan,
        uses_search_path: a.uses_search_path,
        control: a.control,
    })
}

impl Plan {
    /// The target for a plan whose keys are all in the text.
    pub fn target(&self) -> Option<Target> {
        Some(match self {
            Plan::Coordinator(_) => Target::Coordinator,
            Plan::Group(0) => Target::Coordinator,
            Plan::Group(g) => Target::Group(*g),
            Plan::AnyPrimary => Target::AnyPrimary,
            Plan::AnyNodeRead => Target::AnyNode,
            Plan::Neutral => Target::Undecided,
            Plan::Params(_) => return None,
        })
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;

    fn citus() -> Arc<Citus> {
        let c = Citus::new("app".into(), true, false);
        let mut snap = analyze::tests::snapshot();
        snap.loaded_at = Some(std::time::SystemTime::now());
        c.install(snap);
        c
    }

    #[test]
    fn plans_are_kept_per_text_and_search_path() {
        let c = citus();
        let analysed = || c.counters.plans_analysed.load(Relaxed);
        let sql = b"SELECT * FROM events WHERE tenant_id = $1";
        let (a, b) = (
            vec!["public".to_string()],
            vec!["tenant_acme".to_string(), "public".into()],
        );
        c.analysis(sql, Some(&a));
        c.analysis(sql, Some(&a));
        assert_eq!(analysed(), 1, "the same text and path: analysed once");
        c.analysis(sql, Some(&b));
        c.analysis(sql, None);
        assert_eq!(analysed(), 3, "another path, and none, each have their own");
        c.analysis(sql, Some(&a));
        c.analysis(sql, Some(&b));
        c.analysis(sql, None);
        assert_eq!(analysed(), 3, "and none evicted another");
        // Templates: texts that differ in constants share one analysis,
        // and each text's own key decides.
        let t1 = c.analysis(b"SELECT * FROM events WHERE tenant_id = 1", Some(&a));
        let t2 = c.analysis(b"SELECT * FROM events WHERE tenant_id = 2", Some(&a));
        assert_eq!(analysed(), 4);
        assert!(matches!(t1.plan, Plan::Group(_)) && matches!(t2.plan, Plan::Group(_)));
        // A new snapshot: analysed again.
        let mut snap = analyze::tests::snapshot();
        snap.loaded_at = Some(std::time::SystemTime::now());
        snap.generation = 2;
        c.install(snap);
        c.analysis(sql, Some(&a));
        assert_eq!(analysed(), 5);
    }

    #[test]
    fn many_search_paths_for_one_text_stay_bounded() {
        let c = citus();
        let sql = b"SELECT * FROM events WHERE tenant_id = $1";
        for i in 0..100 {
            c.analysis(sql, Some(&[format!("s{i}")]));
        }
        let plans = c.plans.read().unwrap();
        assert!(plans[&sql[..]].len() <= PATHS_KEPT);
    }
}
