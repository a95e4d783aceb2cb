//! The etcd topology source: follows Patroni's keys and publishes who may
//! take sessions.
//!
//! The loop (shared/reference/crates.md, "etcd-client"; patroni-etcd.md,
//! "Watch recipe"): read the scope's keys and note the revision R; watch
//! the prefix from R + 1 with previous values; apply events as they come.
//! On a stream error, a cancel (compaction) or a lost connection: back off,
//! read everything again and watch again, never acting on a partial view.
//!
//! Writes go to a new leader only after [`confirm`](crate::confirm) has seen
//! it out of recovery; until then, and whenever the leader key is absent,
//! the published topology has no primary and new read-write transactions
//! wait. If etcd cannot be reached for longer than the grace period, the
//! last leader is dropped as well: a proxy cut off from etcd may be on the
//! minority side of a partition, where the leader it knows may have lost
//! its lease already.

use crate::confirm::{self, CheckLogin};
use crate::lag::LagTracker;
use crate::patroni::{Change, PatroniState};
use crate::{Member, MemberView, Publisher, Topology, View};
use pgferry_config::EtcdTopology;
use pgferry_pool::NodeAddr;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;

const HEARTBEAT: Duration = Duration::from_secs(1);
/// While etcd is unreachable, how often the nodes are asked directly.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// How long a direct answer counts.
const PROBE_VALID: Duration = Duration::from_secs(3);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Patroni's default ttl, used as the grace period until its config is read.
const DEFAULT_TTL: u64 = 30;

/// Runs forever (spawn it).
pub async fn run(cfg: EtcdTopology, check: CheckLogin, publisher: Publisher) {
    let mut w = Watcher {
        state: PatroniState::new(&cfg.namespace, &cfg.scope, cfg.citus),
        cfg,
        check,
        publisher,
        revision: 0,
        last_ok: None,
        connected: false,
        confirmed: None,
        confirming: None,
        members: HashMap::new(),
        published: None,
        draining_since: None,
        changed_at: SystemTime::now(),
        direct: HashMap::new(),
        probing: std::collections::HashSet::new(),
        lag: LagTracker::default(),
        group_lags: Default::default(),
    };
    w.run().await
}

struct Watcher {
    cfg: EtcdTopology,
    check: CheckLogin,
    publisher: Publisher,
    state: PatroniState,
    revision: i64,
    /// Last successful exchange with etcd.
    last_ok: Option<Instant>,
    connected: bool,
    /// The leader writes go to: (member name, address).
    confirmed: Option<(String, NodeAddr)>,
    /// The leader being confirmed, with the attempt's number.
    confirming: Option<(String, NodeAddr, u64)>,
    /// One `Member` per (name, address), so that session counts survive
    /// republishing.
    members: HashMap<(String, NodeAddr), Arc<Member>>,
    /// What routing last published: primary, standbys, worker group
    /// leaders and worker group replicas.
    published: Option<Routing>,
    /// Since when a switchover announced in the `failover` key holds
    /// writes, and the leader it was announced under.
    draining_since: Option<(Instant, Option<String>)>,
    /// When routing last changed.
    changed_at: SystemTime,
    /// While etcd is unreachable: what each node last answered to a direct
    /// check. A leader Patroni demotes in the meantime (its retry_timeout
    /// passed) is seen in recovery and loses the writes at once; replicas
    /// seen streaming keep serving reads after the grace period.
    direct: HashMap<NodeAddr, (Instant, confirm::Probe)>,
    probing: std::collections::HashSet<NodeAddr>,
    /// Replica lag and the read set (kept across resyncs: it has history).
    lag: LagTracker,
    /// Citus worker groups' replica lag, one tracker per group.
    group_lags: std::collections::BTreeMap<u32, LagTracker>,
}

/// A finished direct check: (address, answer).
type Probed = (NodeAddr, Result<confirm::Probe, String>);

/// A finished confirmation: (attempt, name, address, result).
type Confirmed = (u64, String, NodeAddr, Result<Duration, String>);

impl Watcher {
    async fn run(&mut self) {
        let (done_tx, mut done_rx) = mpsc::channel::<Confirmed>(8);
        let (probe_tx, mut probe_rx) = mpsc::channel::<Probed>(16);
        let mut probe_tick = tokio::time::interval(PROBE_EVERY);
        probe_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut attempt = 0u64;
        let mut backoff = Duration::from_millis(100);
        let mut next_try = Instant::now();
        let mut client: Option<etcd_client::Client> = None;
        let mut stream: Option<etcd_client::WatchStream> = None;
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if stream.is_none() && Instant::now() >= next_try {
                match self.resync(&mut client).await {
                    Ok(s) => {
                        stream = Some(s);
                        backoff = Duration::from_millis(100);
                        if !self.connected {
                            tracing::info!(revision = self.revision, prefix = self.state.prefix(), "etcd: watching");
                        }
                        self.connected = true;
                        self.direct.clear();
                    }
                    Err(e) => {
                        if self.connected || client.is_none() {
                            tracing::warn!(error = %e, retry_in = ?backoff, "etcd: cannot read the topology");
                        }
                        self.connected = false;
                        client = None;
                        next_try = Instant::now() + backoff;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
                self.reconcile(&done_tx, &mut attempt);
            }
            tokio::select! {
                msg = async { stream.as_mut().expect("checked").message().await }, if stream.is_some() => {
                    match msg {
                        Ok(Some(resp)) if resp.canceled() => {
                            tracing::warn!(compact_revision = resp.compact_revision(), reason = resp.cancel_reason(), "etcd: watch canceled; reading everything again");
                            stream = None;
                        }
                        Ok(Some(resp)) => {
                            self.last_ok = Some(Instant::now());
                            if let Some(h) = resp.header() {
                                self.revision = self.revision.max(h.revision());
                            }
                            let mut change = Change::None;
                            for ev in resp.events() {
                                let Some(kv) = ev.kv() else { continue };
                                let value = match ev.event_type() {
                                    etcd_client::EventType::Put => Some(kv.value()),
                                    etcd_client::EventType::Delete => None,
                                };
                                let key = String::from_utf8_lossy(kv.key());
                                let c = self.state.apply(&key, value);
                                if c == Change::Topology {
                                    let what = if value.is_some() { "put" } else { "delete" };
                                    tracing::info!(key = %key, event = what, revision = kv.mod_revision(), "etcd: topology event");
                                }
                                change = change.max_with(c);
                            }
                            if change != Change::None {
                                self.reconcile(&done_tx, &mut attempt);
                            }
                        }
                        Ok(None) | Err(_) => {
                            let why = match msg { Err(e) => e.to_string(), _ => "stream ended".into() };
                            tracing::warn!(error = %why, "etcd: watch lost; reconnecting");
                            stream = None;
                            client = None;
                            self.connected = false;
                            next_try = Instant::now() + backoff;
                            self.reconcile(&done_tx, &mut attempt);
                        }
                    }
                }
                Some((n, name, addr, result)) = done_rx.recv() => {
                    self.on_confirmed(n, name, addr, result, &done_tx, &mut attempt);
                }
                _ = probe_tick.tick(), if !self.connected => self.start_probes(&probe_tx),
                Some((addr, result)) = probe_rx.recv() => {
                    self.probing.remove(&addr);
                    if self.on_probe(addr, result) {
                        self.reconcile(&done_tx, &mut attempt);
                    }
                }
                _ = tick.tick() => {
                    // A watch on an idle cluster is silent: check that etcd
                    // still answers, so that the grace period means something.
                    if let (Some(c), true) = (client.as_mut(), stream.is_some()) {
                        let key = format!("{}leader", self.coordinator_prefix());
                        match tokio::time::timeout(HEARTBEAT, c.get(key, None)).await {
                            Ok(Ok(_)) => self.last_ok = Some(Instant::now()),
                            Ok(Err(e)) => tracing::debug!(error = %e, "etcd: heartbeat failed"),
                            Err(_) => tracing::debug!("etcd: heartbeat timed out"),
                        }
                    }
                    self.reconcile(&done_tx, &mut attempt);
                }
            }
        }
    }

    /// The key prefix of the group 5432 follows.
    fn coordinator_prefix(&self) -> String {
        if self.cfg.citus {
            format!("{}0/", self.state.prefix())
        } else {
            self.state.prefix().to_owned()
        }
    }

    /// Connects if needed, reads the whole prefix, starts the watch.
    async fn resync(&mut self, client: &mut Option<etcd_client::Client>) -> Result<etcd_client::WatchStream, String> {
        if client.is_none() {
            *client = Some(self.connect().await?);
        }
        let c = client.as_mut().expect("just set");
        let prefix = self.state.prefix().to_owned();
        let get = c.get(prefix.clone(), Some(etcd_client::GetOptions::new().with_prefix()));
        let resp = tokio::time::timeout(Duration::from_secs(5), get)
            .await
            .map_err(|_| "range request timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        // A fresh, complete view replaces the old one in one step.
        let mut state = PatroniState::new(&self.cfg.namespace, &self.cfg.scope, self.cfg.citus);
        for kv in resp.kvs() {
            state.apply(&String::from_utf8_lossy(kv.key()), Some(kv.value()));
        }
        let opts = etcd_client::WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_start_revision(revision + 1);
        let watch = tokio::time::timeout(Duration::from_secs(5), c.watch(prefix, Some(opts)))
            .await
            .map_err(|_| "watch request timed out".to_string())?
            .map_err(|e| e.to_string())?;
        self.state = state;
        self.revision = revision;
        self.last_ok = Some(Instant::now());
        Ok(watch)
    }

    async fn connect(&self) -> Result<etcd_client::Client, String> {
        let mut opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            // A member that lost quorum cancels the watch instead of
            // serving a stale view silently.
            .with_require_leader(true);
        if let (Some(u), Some(p)) = (&self.cfg.etcd_user, &self.cfg.etcd_password) {
            opts = opts.with_user(u.clone(), p.clone());
        }
        if let Some(ca) = &self.cfg.etcd_ca_file {
            let pem = std::fs::read(ca).map_err(|e| format!("etcd_ca_file {}: {e}", ca.display()))?;
            opts =
                opts.with_tls(etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(pem)));
        }
        tokio::time::timeout(
            Duration::from_secs(5),
            etcd_client::Client::connect(self.cfg.endpoints.clone(), Some(opts)),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())
    }

    fn grace(&self) -> Duration {
        self.cfg
            .etcd_grace
            .unwrap_or_else(|| Duration::from_secs(self.state.coordinator().and_then(|g| g.ttl).unwrap_or(DEFAULT_TTL)))
    }

    fn etcd_fresh(&self) -> bool {
        self.last_ok.is_some_and(|t| t.elapsed() <= self.grace())
    }

    /// A switchover announced in the `failover` key (1.3–1.4 s before the
    /// leader key moves, while the old primary is already shutting down):
    /// new write transactions are held from then on, rather than sent to a
    /// primary that is about to refuse them. Bounded by
    /// failover_hold_timeout, in case the switchover never happens.
    fn draining(&mut self) -> bool {
        let g = self.state.coordinator();
        let announced = g.is_some_and(|g| g.failover_pending);
        let leader = g.and_then(|g| g.leader.clone());
        match (announced, &self.draining_since) {
            (false, _) => {
                self.draining_since = None;
                false
            }
            (true, None) => {
                tracing::info!("topology: switchover announced in etcd; holding new write transactions");
                self.draining_since = Some((Instant::now(), leader));
                true
            }
            // Drain only while the leader that was being switched away from
            // still holds the key: once the key has moved, the new leader is
            // confirmed at once, even if the failover key is not cleared yet.
            (true, Some((t, from))) => *from == leader && t.elapsed() < self.cfg.failover_hold_timeout,
        }
    }

    /// Decides the leader from the current state and publishes.
    fn reconcile(&mut self, done_tx: &mpsc::Sender<Confirmed>, attempt: &mut u64) {
        let draining = self.draining();
        let desired = if self.etcd_fresh() && !draining {
            self.state.coordinator().and_then(|g| g.leader_member()).map(|m| {
                (
                    m.name.clone(),
                    NodeAddr {
                        host: m.host.clone(),
                        port: m.port,
                    },
                )
            })
        } else {
            None
        };
        if self.confirmed.is_some() && self.confirmed != desired {
            let (name, addr) = self.confirmed.take().expect("checked");
            let why = if !self.etcd_fresh() {
                "etcd unreachable for longer than the grace period"
            } else if draining {
                "switchover announced"
            } else if desired.is_none() {
                "leader key gone"
            } else {
                "leader key moved"
            };
            tracing::warn!(leader = %name, addr = %addr, reason = why, "topology: writes stop going to the old leader");
        }
        match &desired {
            Some((name, addr)) if self.confirmed.is_none() => {
                let already = self.confirming.as_ref().is_some_and(|(n, a, _)| n == name && a == addr);
                if !already {
                    *attempt += 1;
                    self.start_confirm(name.clone(), addr.clone(), *attempt, done_tx);
                }
            }
            None => self.confirming = None,
            _ => {}
        }
        self.publish();
    }

    fn start_confirm(&mut self, name: String, addr: NodeAddr, n: u64, done_tx: &mpsc::Sender<Confirmed>) {
        tracing::info!(leader = %name, addr = %addr, "topology: new leader in etcd; confirming it is writable");
        self.confirming = Some((name.clone(), addr.clone(), n));
        let (check, tx) = (self.check.clone(), done_tx.clone());
        let deadline = self.cfg.failover_hold_timeout.max(Duration::from_secs(5));
        tokio::spawn(async move {
            let r = confirm::wait_writable(&addr, &check, deadline).await;
            let _ = tx.send((n, name, addr, r)).await;
        });
    }

    fn on_confirmed(
        &mut self,
        n: u64,
        name: String,
        addr: NodeAddr,
        result: Result<Duration, String>,
        done_tx: &mpsc::Sender<Confirmed>,
        attempt: &mut u64,
    ) {
        if self.confirming.as_ref().is_none_or(|(_, _, m)| *m != n) {
            return; // superseded by a later change
        }
        self.confirming = None;
        match result {
            Ok(took) => {
                tracing::info!(leader = %name, addr = %addr, confirm_ms = took.as_millis() as u64, "topology: leader confirmed writable; writes go there now");
                self.confirmed = Some((name, addr));
            }
            Err(e) => {
                tracing::warn!(leader = %name, addr = %addr, error = %e, "topology: leader not confirmed writable; trying again");
            }
        }
        self.reconcile(done_tx, attempt);
    }

    /// etcd is unreachable: ask the leader and the replicas directly.
    fn start_probes(&mut self, tx: &mpsc::Sender<Probed>) {
        let Some(group) = self.state.coordinator() else {
            return;
        };
        let mut targets: Vec<NodeAddr> = group
            .members
            .values()
            .map(|m| NodeAddr {
                host: m.host.clone(),
                port: m.port,
            })
            .collect();
        if let Some((_, a)) = &self.confirmed {
            if !targets.contains(a) {
                targets.push(a.clone());
            }
        }
        for addr in targets {
            if !self.probing.insert(addr.clone()) {
                continue; // one check per node at a time
            }
            let (check, tx) = (self.check.clone(), tx.clone());
            tokio::spawn(async move {
                let r = confirm::probe(&addr, &check).await;
                let _ = tx.send((addr, r)).await;
            });
        }
    }

    /// A direct answer. Returns whether routing may change.
    fn on_probe(&mut self, addr: NodeAddr, result: Result<confirm::Probe, String>) -> bool {
        if self.connected {
            return false; // etcd is back: it decides again
        }
        let Ok(p) = result else {
            self.direct.remove(&addr);
            return !self.etcd_fresh();
        };
        self.direct.insert(addr.clone(), (Instant::now(), p));
        if p.in_recovery && self.confirmed.as_ref().is_some_and(|(_, a)| *a == addr) {
            let (name, _) = self.confirmed.take().expect("checked");
            tracing::warn!(leader = %name, addr = %addr, "topology: etcd unreachable and the leader is in recovery (Patroni demoted it); writes stop going there");
            return true;
        }
        !self.etcd_fresh()
    }

    /// A node serves reads while etcd cannot say: it answered a direct
    /// check recently, in recovery, and either streaming from a primary or
    /// with no primary among the nodes at all (Patroni demoted the leader:
    /// nothing is written anywhere, so every replica is current).
    fn directly_readable(&self, addr: &NodeAddr) -> bool {
        let recent = |(t, _): &&(Instant, confirm::Probe)| t.elapsed() < PROBE_VALID;
        let no_primary = !self.direct.values().filter(recent).any(|(_, p)| !p.in_recovery);
        self.direct
            .get(addr)
            .filter(recent)
            .is_some_and(|(_, p)| p.in_recovery && (p.streaming || no_primary))
    }

    fn member(&mut self, name: &str, addr: &NodeAddr) -> Arc<Member> {
        self.members
            .entry((name.to_owned(), addr.clone()))
            .or_insert_with(|| Member::new(name, addr.host.clone(), addr.port))
            .clone()
    }

    fn publish(&mut self) {
        let fresh = self.etcd_fresh();
        let primary = self.confirmed.clone().map(|(n, a)| self.member(&n, &a));
        let mut standbys = Vec::new();
        let mut members = Vec::new();
        let group = self.state.coordinator().cloned().unwrap_or_default();
        // Called on every watch event that moves a position and on every
        // heartbeat tick: the tracker stamps new positions with their
        // arrival and lets its hysteresis clock run.
        let assessed = self.lag.update(&group, self.cfg.max_replica_lag, Instant::now());
        for m in group.members.values() {
            let assessment = assessed.get(&m.name);
            let addr = NodeAddr {
                host: m.host.clone(),
                port: m.port,
            };
            let eligible = if fresh {
                assessment.is_some_and(|a| a.serving)
            } else {
                self.directly_readable(&addr)
            };
            if eligible {
                standbys.push(self.member(&m.name, &addr));
            }
            members.push(MemberView {
                name: m.name.clone(),
                addr: addr.to_string(),
                role: if group.leader.as_deref() == Some(m.name.as_str()) {
                    "leader".into()
                } else {
                    m.role.clone()
                },
                state: m.state.clone(),
                // The leader has no lag (and shows none).
                lag: assessment.and_then(|a| a.lag),
                lag_time: assessment.and_then(|a| a.lag_time),
                serving_reads: eligible,
            });
        }
        let workers: Vec<(u32, Option<String>, Option<String>)> = self
            .state
            .groups
            .iter()
            .filter(|(g, _)| **g != 0)
            .map(|(g, grp)| {
                let addr = grp.leader_member().map(|m| format!("{}:{}", m.host, m.port));
                (*g, grp.leader.clone(), addr)
            })
            .collect();
        // Worker groups' leaders (Citus layout): routed to directly by
        // Citus routing. A group whose leader key is gone (or whose leader
        // Patroni is moving away from) has none: its transactions wait.
        let groups = self.cfg.citus.then(|| {
            let leaders: Vec<(u32, Option<(String, NodeAddr)>)> = self
                .state
                .groups
                .iter()
                .filter(|(g, _)| **g != 0)
                .map(|(g, grp)| {
                    let leader = grp.leader_member().filter(|_| !grp.failover_pending).map(|m| {
                        (
                            m.name.clone(),
                            NodeAddr {
                                host: m.host.clone(),
                                port: m.port,
                            },
                        )
                    });
                    (*g, leader)
                })
                .collect();
            leaders
                .into_iter()
                .map(|(g, l)| (g, l.map(|(name, addr)| self.member(&name, &addr))))
                .collect::<std::collections::BTreeMap<_, _>>()
        });
        // Worker groups' caught-up replicas (read-only port, Citus routing),
        // by the same lag rules as the coordinator's.
        let mut group_replicas = std::collections::BTreeMap::new();
        if self.cfg.citus && fresh {
            let groups: Vec<(u32, crate::patroni::Group)> = self
                .state
                .groups
                .iter()
                .filter(|(g, _)| **g != 0)
                .map(|(g, grp)| (*g, grp.clone()))
                .collect();
            for (g, grp) in groups {
                let assessed =
                    self.group_lags
                        .entry(g)
                        .or_default()
                        .update(&grp, self.cfg.max_replica_lag, Instant::now());
                let mut readers = Vec::new();
                for m in grp.members.values() {
                    if grp.leader.as_deref() != Some(m.name.as_str())
                        && assessed.get(&m.name).is_some_and(|a| a.serving)
                    {
                        let addr = NodeAddr {
                            host: m.host.clone(),
                            port: m.port,
                        };
                        readers.push(self.member(&m.name, &addr));
                    }
                }
                group_replicas.insert(g, readers);
            }
        }
        let routing = (
            primary.as_ref().map(|p| (*p.addr).clone()),
            standbys.iter().map(|s| (*s.addr).clone()).collect::<Vec<_>>(),
            groups
                .iter()
                .flatten()
                .map(|(g, m)| (*g, m.as_ref().map(|m| (*m.addr).clone())))
                .collect::<Vec<_>>(),
            group_replicas
                .iter()
                .flat_map(|(g, rs)| rs.iter().map(move |m| (*g, (*m.addr).clone())))
                .collect::<Vec<_>>(),
        );
        let routing_changed = self.published.as_ref() != Some(&routing);
        if routing_changed {
            let workers_text = workers
                .iter()
                .map(|(g, l, a)| format!("{g}:{}@{}", l.as_deref().unwrap_or("-"), a.as_deref().unwrap_or("-")))
                .collect::<Vec<_>>();
            tracing::info!(
                primary = ?routing.0.as_ref().map(|a| a.to_string()),
                standbys = ?routing.1.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                workers = ?workers_text,
                etcd_revision = self.revision,
                "topology: routing changed"
            );
        }
        if routing_changed {
            self.changed_at = SystemTime::now();
        }
        self.published = Some(routing);
        let view = View {
            source: "etcd",
            leader: group.leader.clone(),
            leader_confirmed: primary.is_some(),
            members,
            workers,
            etcd_revision: self.revision,
            etcd_connected: self.connected && fresh,
            failover_pending: group.failover_pending,
            since: Some(self.changed_at),
        };
        // While a switchover is announced (and the leader it moves away
        // from still holds the key), that node's running transactions may
        // finish: only new ones are held.
        let draining_from = match &self.draining_since {
            Some((_, Some(from)))
                if primary.is_none() && group.failover_pending && group.leader.as_ref() == Some(from) =>
            {
                group.leader_member().map(|m| NodeAddr {
                    host: m.host.clone(),
                    port: m.port,
                })
            }
            _ => None,
        };
        let topo = Topology {
            primary,
            standbys,
            draining_from,
            groups,
            group_replicas,
            view,
        };
        if routing_changed {
            self.publisher.publish(topo);
        } else {
            self.publisher.update_view(topo);
        }
    }
}

/// The routing part of a published topology (a change in it re-routes
/// sessions; lag or view changes alone do not).
type Routing = (
    Option<NodeAddr>,
    Vec<NodeAddr>,
    Vec<(u32, Option<NodeAddr>)>,
    Vec<(u32, NodeAddr)>,
);

impl Change {
    fn max_with(self, other: Change) -> Change {
        match (self, other) {
            (Change::Topology, _) | (_, Change::Topology) => Change::Topology,
            (Change::Lag, _) | (_, Change::Lag) => Change::Lag,
            _ => Change::None,
        }
    }
}
