//! Topology and read/write routing.
//!
//! A topology source publishes the current [`Topology`] through a
//! `tokio::sync::watch` channel; routing reads the latest value on every
//! decision, so a source that changes at run time plugs in without touching
//! the sessions. Sources: `static` (the configured primary and standbys,
//! published once) and [`etcd`] (Patroni's keys, followed by a watch; a new
//! leader is published only once [`confirm`] has seen it writable).

#![forbid(unsafe_code)]

pub mod citus;
pub mod confirm;
pub mod etcd;
pub mod lag;
pub mod patroni;

use pgferry_config::{split_host_port, Config, Topology as TopologyConfig};
use pgferry_pool::NodeAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use tokio::sync::watch;

/// Which listener a client came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Port 5432: the primary only.
    ReadWrite,
    /// Port 5433: standbys, or the primary as a configured fallback.
    ReadOnly,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ReadWrite => "rw",
            Role::ReadOnly => "ro",
        }
    }
}

/// A member the router may send sessions to.
#[derive(Debug)]
pub struct Member {
    /// Patroni's member name (the address for static members).
    pub name: String,
    pub addr: Arc<NodeAddr>,
    /// Sessions currently routed here, per port (least-connections
    /// balancing): read sessions are balanced on read sessions only, so
    /// that idle write clients on a demoted leader do not keep readers away.
    read_sessions: AtomicUsize,
    write_sessions: AtomicUsize,
}

/// The current view of the cluster.
#[derive(Debug, Default)]
pub struct Topology {
    /// None while there is no confirmed primary (during failover).
    pub primary: Option<Arc<Member>>,
    pub standbys: Vec<Arc<Member>>,
    /// A switchover away from this node is announced: no new transaction
    /// goes there, but those already running may finish (until the leader
    /// key moves, or the node stops).
    pub draining_from: Option<NodeAddr>,
    /// Citus worker groups' leaders, when the source follows them (Patroni's
    /// Citus layout in etcd): None while a group has no leader (a failover).
    /// Without it, worker primaries come from the Citus metadata.
    pub groups: Option<std::collections::BTreeMap<u32, Option<Arc<Member>>>>,
    /// Citus worker groups' replicas that may serve reads now (caught up,
    /// streaming): the read-only port's single-shard reads go there.
    pub group_replicas: std::collections::BTreeMap<u32, Vec<Arc<Member>>>,
    /// What the console and metrics show.
    pub view: View,
}

impl Topology {
    /// A worker group's leader that Patroni is moving away from (a
    /// switchover announced in etcd): its running transactions may finish,
    /// new ones wait for the new leader.
    pub fn draining_worker(&self, addr: &NodeAddr) -> bool {
        let Some(groups) = &self.groups else { return false };
        let addr = addr.to_string();
        self.view
            .workers
            .iter()
            .any(|(g, _, a)| groups.get(g).is_some_and(Option::is_none) && a.as_deref() == Some(addr.as_str()))
    }
}

/// Where a Citus worker group's transactions may go now.
#[derive(Debug, Clone)]
pub enum GroupLeader {
    Leader(Arc<Member>),
    /// The topology source follows this group and it has no leader now
    /// (a failover): hold the transaction.
    NoLeader,
    /// Nobody knows the group.
    Unknown,
}

/// The topology as operators see it (SHOW TOPOLOGY, /metrics, logs).
#[derive(Debug, Clone, Default)]
pub struct View {
    /// "static" or "etcd".
    pub source: &'static str,
    /// The leader named by etcd, confirmed writable or not yet.
    pub leader: Option<String>,
    pub leader_confirmed: bool,
    pub members: Vec<MemberView>,
    /// Worker groups' leaders (Citus layout): (group, leader name, host:port).
    pub workers: Vec<(u32, Option<String>, Option<String>)>,
    pub etcd_revision: i64,
    pub etcd_connected: bool,
    pub failover_pending: bool,
    /// When routing (leader or readable replicas) last changed.
    pub since: Option<std::time::SystemTime>,
}

#[derive(Debug, Clone)]
pub struct MemberView {
    pub name: String,
    pub addr: String,
    pub role: String,
    pub state: String,
    /// Bytes behind the leader.
    pub lag: Option<u64>,
    /// How long ago the leader passed this member's position.
    pub lag_time: Option<std::time::Duration>,
    /// Takes new read-only sessions.
    pub serving_reads: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("invalid address {0:?}")]
    BadAddress(String),
}

fn member(addr: &str) -> Result<Arc<Member>, RoutingError> {
    let (host, port) = split_host_port(addr).ok_or_else(|| RoutingError::BadAddress(addr.to_owned()))?;
    Ok(Member::new(addr, host, port))
}

impl Member {
    pub fn new(name: &str, host: String, port: u16) -> Arc<Member> {
        Arc::new(Member {
            name: name.to_owned(),
            addr: Arc::new(NodeAddr { host, port }),
            read_sessions: AtomicUsize::new(0),
            write_sessions: AtomicUsize::new(0),
        })
    }

    fn counter(&self, role: Role) -> &AtomicUsize {
        match role {
            Role::ReadOnly => &self.read_sessions,
            Role::ReadWrite => &self.write_sessions,
        }
    }

    /// Sessions of `role`'s port routed here now.
    pub fn sessions(&self, role: Role) -> usize {
        self.counter(role).load(Relaxed)
    }
}

/// Whether a read session should move from a member with `mine` read
/// sessions (its own included) to one with `least`: only when clearly more
/// loaded, so that the move can never invert the imbalance (a difference of
/// 2 or more) nor chase small drifts on large counts (20 %).
pub fn clearly_more(mine: usize, least: usize) -> bool {
    mine > least + (mine / 5).max(1)
}

impl Topology {
    /// The starting topology: the configured one for `static`, none yet
    /// for `etcd` (its watcher publishes once it has read the keys).
    pub fn from_config(cfg: &Config) -> Result<Self, RoutingError> {
        match &cfg.topology {
            TopologyConfig::Static { primary, standbys } => {
                let primary = member(primary)?;
                let standbys: Vec<_> = standbys.iter().map(|s| member(s)).collect::<Result<_, _>>()?;
                let view = View {
                    source: "static",
                    leader: Some(primary.name.clone()),
                    leader_confirmed: true,
                    members: std::iter::once((&primary, "primary"))
                        .chain(standbys.iter().map(|s| (s, "standby")))
                        .map(|(m, role)| MemberView {
                            name: m.name.clone(),
                            addr: m.addr.to_string(),
                            role: role.into(),
                            state: "configured".into(),
                            lag: None,
                            lag_time: None,
                            serving_reads: role == "standby",
                        })
                        .collect(),
                    since: Some(std::time::SystemTime::now()),
                    ..View::default()
                };
                Ok(Topology {
                    primary: Some(primary),
                    standbys,
                    draining_from: None,
                    groups: None,
                    group_replicas: Default::default(),
                    view,
                })
            }
            TopologyConfig::Etcd(_) => Ok(Topology {
                view: View {
                    source: "etcd",
                    ..View::default()
                },
                ..Topology::default()
            }),
        }
    }
}

/// Routing decisions over the live topology.
#[derive(Clone)]
pub struct Router {
    rx: watch::Receiver<Arc<Topology>>,
    generation: Arc<AtomicU64>,
    ro_fallback_to_primary: bool,
    /// Citus worker groups the read-write port may also route to.
    citus: Option<Arc<citus::Citus>>,
}

/// The sending side: what a topology source publishes through.
pub struct Publisher {
    tx: watch::Sender<Arc<Topology>>,
    generation: Arc<AtomicU64>,
}

impl Publisher {
    /// Publishes a new topology; sessions re-route at their next transaction.
    pub fn publish(&self, t: Topology) {
        self.tx.send_replace(Arc::new(t));
        self.generation.fetch_add(1, Relaxed);
    }

    /// Publishes a topology whose routing is unchanged (lag, view only):
    /// sessions keep their routes.
    pub fn update_view(&self, t: Topology) {
        self.tx.send_replace(Arc::new(t));
    }

    pub fn current(&self) -> Arc<Topology> {
        self.tx.borrow().clone()
    }
}

/// A session's claim on a member; releases the least-connections count
/// (of the port it was routed for) on drop.
pub struct Route {
    pub member: Arc<Member>,
    pub role: Role,
}

impl Route {
    /// A claim on `member` for `role` (a Citus group's primary, chosen by
    /// the session rather than by [`Router::route`]).
    pub fn claim(member: Arc<Member>, role: Role) -> Route {
        member.counter(role).fetch_add(1, Relaxed);
        Route { member, role }
    }
}

impl Drop for Route {
    fn drop(&mut self) {
        self.member.counter(self.role).fetch_sub(1, Relaxed);
    }
}

impl Router {
    /// A router plus the publisher a topology source sends on.
    pub fn new(initial: Topology, ro_fallback_to_primary: bool) -> (Router, Publisher) {
        let (tx, rx) = watch::channel(Arc::new(initial));
        let generation = Arc::new(AtomicU64::new(1));
        (
            Router {
                rx,
                generation: generation.clone(),
                ro_fallback_to_primary,
                citus: None,
            },
            Publisher { tx, generation },
        )
    }

    pub fn topology(&self) -> Arc<Topology> {
        self.rx.borrow().clone()
    }

    /// Routes Citus transactions too: worker groups' primaries serve the
    /// read-write port.
    pub fn set_citus(&mut self, citus: Arc<citus::Citus>) {
        self.citus = Some(citus);
    }

    pub fn citus(&self) -> Option<&Arc<citus::Citus>> {
        self.citus.as_ref()
    }

    /// A Citus worker group's leader: the topology's (etcd, Citus layout)
    /// when it follows the group, else the Citus metadata's primary.
    pub fn group_leader(&self, group: u32) -> GroupLeader {
        if let Some(groups) = &self.rx.borrow().groups {
            match groups.get(&group) {
                Some(Some(m)) => return GroupLeader::Leader(m.clone()),
                Some(None) => return GroupLeader::NoLeader,
                None => {}
            }
        }
        match self.citus.as_ref().and_then(|c| c.group(group)) {
            Some(m) => GroupLeader::Leader(m),
            None => GroupLeader::Unknown,
        }
    }

    /// A read-only route for a Citus worker group's single-shard read: its
    /// least-loaded caught-up replica (the topology's, or a `pg_dist_node`
    /// secondary), else, with ro_fallback_to_primary, its leader. None: the
    /// read goes where the read-only port sends everything else.
    pub fn route_group_read(&self, group: u32) -> Option<Route> {
        let replica = {
            let topo = self.rx.borrow();
            let from_topology = topo.group_replicas.get(&group).filter(|r| !r.is_empty()).cloned();
            from_topology
                .or_else(|| self.citus.as_ref().map(|c| c.group_secondaries(group)))
                .and_then(|r| r.into_iter().min_by_key(|m| m.sessions(Role::ReadOnly)))
        };
        let m = match replica {
            Some(m) => m,
            None if self.ro_fallback_to_primary => match self.group_leader(group) {
                GroupLeader::Leader(m) => m,
                _ => return None,
            },
            None => return None,
        };
        Some(Route::claim(m, Role::ReadOnly))
    }

    /// Every worker group's leader now (for balanced reads).
    pub fn group_leaders(&self) -> Vec<(u32, Arc<Member>)> {
        if let Some(groups) = &self.rx.borrow().groups {
            return groups.iter().filter_map(|(g, m)| Some((*g, m.clone()?))).collect();
        }
        self.citus
            .as_ref()
            .map(|c| c.groups().iter().map(|(g, m)| (*g, m.clone())).collect())
            .unwrap_or_default()
    }

    /// Whether `addr` may serve a worker group's reads on the read-only
    /// port: one of its replicas, or (fallback) its leader.
    fn serves_group_reads(&self, topo: &Topology, addr: &NodeAddr) -> bool {
        let Some(citus) = &self.citus else { return false };
        topo.group_replicas.values().flatten().any(|m| *m.addr == *addr)
            || citus.is_group_secondary(addr)
            || (self.ro_fallback_to_primary && self.is_group_leader(topo, addr))
    }

    /// Whether `addr` is a Citus worker group's leader now.
    fn is_group_leader(&self, topo: &Topology, addr: &NodeAddr) -> bool {
        let Some(citus) = &self.citus else { return false };
        match &topo.groups {
            // The topology follows the groups: only its leaders count (a
            // stale pg_dist_node row must not keep a demoted worker).
            Some(groups) => groups.values().flatten().any(|m| *m.addr == *addr),
            None => citus.is_group_primary(addr),
        }
    }

    /// Makes sessions re-check their routes at their next transaction (the
    /// Citus groups changed).
    pub fn touch(&self) {
        self.generation.fetch_add(1, Relaxed);
    }

    /// Changes with every published topology: a session compares it with
    /// the one it routed under to know whether to route again. One atomic
    /// load, cheap enough for every transaction.
    pub fn generation(&self) -> u64 {
        self.generation.load(Relaxed)
    }

    /// A receiver that wakes on every change (for tasks that react to them).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Topology>> {
        self.rx.clone()
    }

    /// Routes like [`route`](Self::route), waiting up to `hold` for a
    /// member to appear (a failover in progress). None after `hold`.
    pub async fn route_wait(&self, role: Role, hold: std::time::Duration) -> Option<Route> {
        if let Some(r) = self.route(role) {
            return Some(r);
        }
        let mut rx = self.rx.clone();
        let wait = async {
            loop {
                if rx.changed().await.is_err() {
                    return None;
                }
                if let Some(r) = self.route(role) {
                    return Some(r);
                }
            }
        };
        tokio::time::timeout(hold, wait).await.ok().flatten()
    }

    /// Whether a session on `addr` should stay there for its next
    /// transaction: the primary for read-write; for read-only a standby, or
    /// the primary only while no standby qualifies (so that read sessions
    /// come back to the standbys once one does).
    pub fn keeps(&self, role: Role, addr: &NodeAddr) -> bool {
        self.serves(role, addr, true)
    }

    /// Whether `addr` may still serve sessions routed for `role` (a pool on
    /// a node that may not is retired).
    pub fn allows(&self, role: Role, addr: &NodeAddr) -> bool {
        self.serves(role, addr, false)
    }

    fn serves(&self, role: Role, addr: &NodeAddr, prefer_standbys: bool) -> bool {
        let topo = self.rx.borrow();
        let is_primary = topo.primary.as_ref().is_some_and(|p| *p.addr == *addr);
        match role {
            Role::ReadWrite => is_primary || self.is_group_leader(&topo, addr),
            Role::ReadOnly => {
                topo.standbys.iter().any(|s| *s.addr == *addr)
                    || (is_primary && self.ro_fallback_to_primary && (!prefer_standbys || topo.standbys.is_empty()))
                    || self.serves_group_reads(&topo, addr)
            }
        }
    }

    /// Picks a member for a new session on `role`.
    pub fn route(&self, role: Role) -> Option<Route> {
        let topo = self.rx.borrow().clone();
        let m = match role {
            Role::ReadWrite => topo.primary.clone(),
            Role::ReadOnly => topo
                .standbys
                .iter()
                .min_by_key(|m| m.sessions(Role::ReadOnly))
                .cloned()
                .or_else(|| {
                    if self.ro_fallback_to_primary {
                        topo.primary.clone()
                    } else {
                        None
                    }
                }),
        }?;
        Some(Route::claim(m, role))
    }

    /// Whether the read session on `mine` should move: another eligible
    /// replica has clearly fewer read sessions (see [`clearly_more`]).
    /// Checked at transaction boundaries, so read sessions spread out when
    /// counts drift (sessions closing, a replica back), not only when the
    /// topology changes.
    pub fn overloaded(&self, mine: &Member) -> bool {
        let topo = self.rx.borrow();
        if !topo.standbys.iter().any(|s| std::ptr::eq(&**s, mine)) {
            return false;
        }
        let least = topo.standbys.iter().map(|s| s.sessions(Role::ReadOnly)).min();
        least.is_some_and(|least| clearly_more(mine.sessions(Role::ReadOnly), least))
    }

    /// A new route for a read session on `mine` when it is overloaded,
    /// to the least loaded eligible replica.
    pub fn rebalance(&self, mine: &Arc<Member>) -> Option<Route> {
        if !self.overloaded(mine) {
            return None;
        }
        self.route(Role::ReadOnly).filter(|c| !Arc::ptr_eq(&c.member, mine))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo(standbys: &[&str]) -> Topology {
        Topology {
            primary: Some(member("p:1").unwrap()),
            standbys: standbys.iter().map(|s| member(s).unwrap()).collect(),
            draining_from: None,
            groups: None,
            group_replicas: Default::default(),
            view: View::default(),
        }
    }

    #[test]
    fn read_only_balances_by_least_sessions() {
        let (r, _tx) = Router::new(topo(&["a:1", "b:1"]), true);
        let x = r.route(Role::ReadOnly).unwrap();
        let y = r.route(Role::ReadOnly).unwrap();
        assert_ne!(x.member.addr, y.member.addr);
        drop(x);
        let z = r.route(Role::ReadOnly).unwrap();
        assert_eq!(z.member.addr.host, "a");
        assert_eq!(r.route(Role::ReadWrite).unwrap().member.addr.host, "p");
    }

    #[test]
    fn read_balance_counts_read_sessions_only() {
        // A demoted leader with idle write sessions still on it (their
        // routes not yet dropped) must get readers.
        let (r, tx) = Router::new(topo(&["a:1"]), true);
        let writers: Vec<_> = (0..5).map(|_| r.route(Role::ReadWrite).unwrap()).collect();
        let old_primary = writers[0].member.clone();
        let reader = r.route(Role::ReadOnly).unwrap();
        assert_eq!(reader.member.addr.host, "a");
        tx.publish(Topology {
            primary: Some(member("n:1").unwrap()),
            standbys: vec![reader.member.clone(), old_primary.clone()],
            draining_from: None,
            groups: None,
            group_replicas: Default::default(),
            view: View::default(),
        });
        assert_eq!(old_primary.sessions(Role::ReadWrite), 5);
        assert_eq!(old_primary.sessions(Role::ReadOnly), 0);
        let next = r.route(Role::ReadOnly).unwrap();
        assert_eq!(next.member.addr.host, "p", "the demoted leader has no readers");
        drop(writers);
        assert_eq!(old_primary.sessions(Role::ReadWrite), 0);
        assert_eq!(next.member.sessions(Role::ReadOnly), 1);
    }

    #[test]
    fn read_sessions_rebalance_when_counts_drift() {
        let (r, _tx) = Router::new(topo(&["a:1", "b:1"]), true);
        let mut routes: Vec<_> = (0..8).map(|_| r.route(Role::ReadOnly).unwrap()).collect();
        // The sessions on b end: a has 4, b none.
        routes.retain(|x| x.member.addr.host == "a");
        let a = routes[0].member.clone();
        assert!(r.overloaded(&a));
        // Sessions move, one at a time, until the counts are even: 2 and 2.
        let mut moved = 0;
        for x in routes.iter_mut() {
            if let Some(to) = r.rebalance(&x.member) {
                assert_eq!(to.member.addr.host, "b");
                *x = to;
                moved += 1;
            }
        }
        assert_eq!(moved, 2);
        let on = |h: &str| routes.iter().filter(|x| x.member.addr.host == h).count();
        assert_eq!((on("a"), on("b")), (2, 2));
        assert!(!r.overloaded(&a), "even: nobody moves");
        // One more session ends: 2 vs 1 is not worth a move (it would
        // only swap the imbalance).
        routes.pop();
        assert!(routes.iter().all(|x| r.rebalance(&x.member).is_none()));
        // Thresholds.
        assert!(clearly_more(2, 0) && !clearly_more(2, 1) && clearly_more(3, 1));
        assert!(!clearly_more(10, 8) && clearly_more(10, 7));
    }

    #[test]
    fn fallback_to_primary_is_optional() {
        let (r, _tx) = Router::new(topo(&[]), true);
        assert_eq!(r.route(Role::ReadOnly).unwrap().member.addr.host, "p");
        let (r, _tx) = Router::new(topo(&[]), false);
        assert!(r.route(Role::ReadOnly).is_none());
    }

    #[test]
    fn topology_changes_are_seen() {
        let (r, tx) = Router::new(topo(&[]), false);
        let g = r.generation();
        tx.publish(Topology::default());
        assert!(r.route(Role::ReadWrite).is_none());
        assert_ne!(r.generation(), g);
    }

    #[tokio::test]
    async fn route_wait_holds_until_a_primary_appears() {
        let (r, tx) = Router::new(Topology::default(), false);
        let hold = std::time::Duration::from_secs(5);
        let waiter = tokio::spawn({
            let r = r.clone();
            async move {
                r.route_wait(Role::ReadWrite, hold)
                    .await
                    .map(|x| x.member.addr.host.clone())
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        tx.publish(topo(&[]));
        assert_eq!(waiter.await.unwrap().as_deref(), Some("p"));
        let (r, _tx) = Router::new(Topology::default(), false);
        assert!(r
            .route_wait(Role::ReadWrite, std::time::Duration::from_millis(50))
            .await
            .is_none());
    }
}
