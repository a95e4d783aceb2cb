//! Topology and read/write routing.
//!
//! A topology source publishes the current [`Topology`] through a
//! `tokio::sync::watch` channel; routing reads the latest value on every
//! decision, so a source that changes at run time (the etcd/Patroni watcher)
//! plugs in without touching the sessions. The `static` source publishes
//! the configured primary and standbys once.

#![forbid(unsafe_code)]

use pgferry_config::{split_host_port, Config, Topology as TopologyConfig};
use pgferry_pool::NodeAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
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
    pub addr: Arc<NodeAddr>,
    /// Sessions currently routed here (least-connections balancing).
    pub sessions: AtomicUsize,
}

/// The current view of the cluster.
#[derive(Debug, Default)]
pub struct Topology {
    /// None while there is no confirmed primary (during failover).
    pub primary: Option<Arc<Member>>,
    pub standbys: Vec<Arc<Member>>,
}

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("invalid address {0:?}")]
    BadAddress(String),
}

fn member(addr: &str) -> Result<Arc<Member>, RoutingError> {
    let (host, port) = split_host_port(addr).ok_or_else(|| RoutingError::BadAddress(addr.to_owned()))?;
    Ok(Arc::new(Member {
        addr: Arc::new(NodeAddr { host, port }),
        sessions: AtomicUsize::new(0),
    }))
}

impl Topology {
    pub fn from_config(cfg: &Config) -> Result<Self, RoutingError> {
        let TopologyConfig::Static { primary, standbys } = &cfg.topology;
        Ok(Topology {
            primary: Some(member(primary)?),
            standbys: standbys.iter().map(|s| member(s)).collect::<Result<_, _>>()?,
        })
    }
}

/// Routing decisions over the live topology.
#[derive(Clone)]
pub struct Router {
    rx: watch::Receiver<Arc<Topology>>,
    ro_fallback_to_primary: bool,
}

/// A session's claim on a member; releases the least-connections count on drop.
pub struct Route {
    pub member: Arc<Member>,
}

impl Drop for Route {
    fn drop(&mut self) {
        self.member.sessions.fetch_sub(1, Relaxed);
    }
}

impl Router {
    /// A router plus the sender a topology source publishes on.
    pub fn new(initial: Topology, ro_fallback_to_primary: bool) -> (Router, watch::Sender<Arc<Topology>>) {
        let (tx, rx) = watch::channel(Arc::new(initial));
        (
            Router {
                rx,
                ro_fallback_to_primary,
            },
            tx,
        )
    }

    pub fn topology(&self) -> Arc<Topology> {
        self.rx.borrow().clone()
    }

    /// Picks a member for a new session on `role`.
    pub fn route(&self, role: Role) -> Option<Route> {
        let topo = self.rx.borrow().clone();
        let m = match role {
            Role::ReadWrite => topo.primary.clone(),
            Role::ReadOnly => topo
                .standbys
                .iter()
                .min_by_key(|m| m.sessions.load(Relaxed))
                .cloned()
                .or_else(|| {
                    if self.ro_fallback_to_primary {
                        topo.primary.clone()
                    } else {
                        None
                    }
                }),
        }?;
        m.sessions.fetch_add(1, Relaxed);
        Some(Route { member: m })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo(standbys: &[&str]) -> Topology {
        Topology {
            primary: Some(member("p:1").unwrap()),
            standbys: standbys.iter().map(|s| member(s).unwrap()).collect(),
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
    fn fallback_to_primary_is_optional() {
        let (r, _tx) = Router::new(topo(&[]), true);
        assert_eq!(r.route(Role::ReadOnly).unwrap().member.addr.host, "p");
        let (r, _tx) = Router::new(topo(&[]), false);
        assert!(r.route(Role::ReadOnly).is_none());
    }

    #[test]
    fn topology_changes_are_seen() {
        let (r, tx) = Router::new(topo(&[]), false);
        tx.send(Arc::new(Topology {
            primary: None,
            standbys: vec![],
        }))
        .unwrap();
        assert!(r.route(Role::ReadWrite).is_none());
    }
}
