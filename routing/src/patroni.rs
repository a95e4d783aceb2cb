//! Patroni's keys in etcd, read into a view of each cluster (sans-IO: the
//! etcd watcher feeds keys in, routing reads the result).
//!
//! Authority rules (see shared/reference/patroni-etcd.md, section 8):
//! the `leader` key names the primary; a member's `role` lags and is never
//! trusted for that. `status` and `xlog_location`-only member updates
//! change nothing a router cares about except replica lag.

use serde::Deserialize;
use std::collections::BTreeMap;

/// One member, from `members/<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatroniMember {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub role: String,
    pub state: String,
    pub xlog_location: Option<u64>,
    pub noloadbalance: bool,
}

#[derive(Deserialize)]
struct MemberJson {
    conn_url: Option<String>,
    #[serde(default)]
    role: String,
    #[serde(default)]
    state: String,
    xlog_location: Option<u64>,
    #[serde(default)]
    tags: serde_json::Map<String, serde_json::Value>,
}

impl PatroniMember {
    pub fn parse(name: &str, value: &[u8]) -> Option<PatroniMember> {
        let m: MemberJson = serde_json::from_slice(value).ok()?;
        let (host, port) = parse_conn_url(m.conn_url.as_deref()?)?;
        let noloadbalance = m.tags.get("noloadbalance").is_some_and(truthy);
        Some(PatroniMember {
            name: name.to_owned(),
            host,
            port,
            role: m.role,
            state: m.state,
            xlog_location: m.xlog_location,
            noloadbalance,
        })
    }

    /// Whether this member can take read-only sessions (lag aside).
    pub fn is_serving_replica(&self) -> bool {
        matches!(self.role.as_str(), "replica" | "sync_standby")
            && matches!(self.state.as_str(), "running" | "streaming")
            && !self.noloadbalance
    }
}

fn truthy(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Bool(b) => *b,
        serde_json::Value::String(s) => matches!(s.to_ascii_lowercase().as_str(), "true" | "on" | "yes" | "1"),
        serde_json::Value::Number(n) => n.as_u64() != Some(0),
        _ => false,
    }
}

/// `postgres://host:port/dbname` (also `postgresql://`, `[v6]`, user info).
pub fn parse_conn_url(url: &str) -> Option<(String, u16)> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))?;
    let authority = rest.split(['/', '?']).next()?;
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(v6) = hostport.strip_prefix('[') {
        let (host, port) = v6.split_once(']')?;
        let port = port.strip_prefix(':').map_or(Some(5432), |p| p.parse().ok())?;
        return Some((host.to_owned(), port));
    }
    match hostport.rsplit_once(':') {
        Some((h, p)) => Some((h.to_owned(), p.parse().ok()?)),
        None if !hostport.is_empty() => Some((hostport.to_owned(), 5432)),
        None => None,
    }
}

/// One Patroni cluster: the whole scope, or one Citus group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Group {
    pub leader: Option<String>,
    pub members: BTreeMap<String, PatroniMember>,
    /// A switchover or failover announced in the `failover` key.
    pub failover_pending: bool,
    /// The leader's WAL position from `status` (`optime`).
    pub optime: Option<u64>,
    /// `ttl` from the `config` key.
    pub ttl: Option<u64>,
    /// `loop_wait` from the `config` key: how often each member publishes.
    pub loop_wait: Option<u64>,
    /// The synchronous standbys the `sync` key names.
    pub sync_standbys: Vec<String>,
}

impl Group {
    /// The member the `leader` key names, if its member key is known.
    pub fn leader_member(&self) -> Option<&PatroniMember> {
        self.members.get(self.leader.as_deref()?)
    }

    /// The leader's WAL position: the later of `status` and its member key.
    pub fn leader_wal(&self) -> Option<u64> {
        let m = self.leader_member().and_then(|m| m.xlog_location);
        match (self.optime, m) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// A member that may take read-only sessions, lag aside: a serving
    /// replica that the leader key does not name. Lag is [`crate::lag`]'s.
    pub fn is_replica(&self, m: &PatroniMember) -> bool {
        Some(m.name.as_str()) != self.leader.as_deref() && m.is_serving_replica()
    }
}

/// Everything under `/<namespace>/<scope>/`.
#[derive(Debug, Clone)]
pub struct PatroniState {
    prefix: String,
    citus: bool,
    pub groups: BTreeMap<u32, Group>,
}

/// What a key change touched.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing routing cares about (status heartbeats, unknown keys).
    None,
    /// Replica positions (lag) only.
    Lag,
    /// Leader, members' roles or states, failover, config.
    Topology,
}

impl PatroniState {
    pub fn new(namespace: &str, scope: &str, citus: bool) -> Self {
        let ns = namespace.trim_matches('/');
        let prefix = if ns.is_empty() {
            format!("/{scope}/")
        } else {
            format!("/{ns}/{scope}/")
        };
        PatroniState {
            prefix,
            citus,
            groups: BTreeMap::new(),
        }
    }

    /// The etcd key prefix to read and watch.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn clear(&mut self) {
        self.groups.clear();
    }

    /// The group 5432 follows: 0 (the Citus coordinator, or the only one).
    pub fn coordinator(&self) -> Option<&Group> {
        self.groups.get(&0)
    }

    /// Applies a PUT (`Some(value)`) or DELETE (`None`) of `key`.
    pub fn apply(&mut self, key: &str, value: Option<&[u8]>) -> Change {
        let Some(rest) = key.strip_prefix(&self.prefix) else {
            return Change::None;
        };
        let (group, rest) = if self.citus {
            let Some((g, rest)) = rest.split_once('/') else {
                return Change::None;
            };
            match g.parse::<u32>() {
                Ok(n) if g == "0" || !g.starts_with('0') => (n, rest),
                _ => return Change::None,
            }
        } else {
            (0, rest)
        };
        let before = self.groups.get(&group).cloned().unwrap_or_default();
        let g = self.groups.entry(group).or_default();
        let change = match rest {
            "leader" => {
                g.leader = value.map(|v| String::from_utf8_lossy(v).trim().to_owned());
                Change::Topology
            }
            "failover" => {
                // Left as "{}" after a switchover: only a non-empty object
                // counts. A scheduled one ("scheduled_at") is not imminent.
                g.failover_pending = value
                    .and_then(|v| serde_json::from_slice::<serde_json::Value>(v).ok())
                    .is_some_and(|v| {
                        v.as_object()
                            .is_some_and(|o| !o.is_empty() && !o.contains_key("scheduled_at"))
                    });
                Change::Topology
            }
            "status" => {
                g.optime = value
                    .and_then(|v| serde_json::from_slice::<serde_json::Value>(v).ok())
                    .and_then(|v| v.get("optime").and_then(|o| o.as_u64()));
                Change::Lag
            }
            "config" => {
                let config = value.and_then(|v| serde_json::from_slice::<serde_json::Value>(v).ok());
                let seconds = |name: &str| {
                    config
                        .as_ref()
                        .and_then(|v| v.get(name))
                        .and_then(|t| t.as_u64().or_else(|| t.as_str()?.parse().ok()))
                };
                g.ttl = seconds("ttl");
                g.loop_wait = seconds("loop_wait");
                Change::Topology
            }
            "sync" => {
                // {"leader":"pg1","sync_standby":"pg2,pg3"}, or null.
                g.sync_standbys = value
                    .and_then(|v| serde_json::from_slice::<serde_json::Value>(v).ok())
                    .and_then(|v| v.get("sync_standby")?.as_str().map(str::to_owned))
                    .map(|s| {
                        s.split(',')
                            .map(str::trim)
                            .filter(|n| !n.is_empty())
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default();
                Change::Lag
            }
            _ => match rest.strip_prefix("members/") {
                Some(name) if !name.is_empty() && !name.contains('/') => {
                    match value.and_then(|v| PatroniMember::parse(name, v)) {
                        Some(m) => {
                            let lag_only = g.members.get(name).is_some_and(|old| {
                                PatroniMember {
                                    xlog_location: m.xlog_location,
                                    ..old.clone()
                                } == m
                            });
                            g.members.insert(name.to_owned(), m);
                            if lag_only {
                                Change::Lag
                            } else {
                                Change::Topology
                            }
                        }
                        None => {
                            g.members.remove(name);
                            Change::Topology
                        }
                    }
                }
                _ => Change::None,
            },
        };
        if change != Change::None && *g == before {
            return Change::None;
        }
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PG1: &str = r#"{"conn_url":"postgres://10.0.0.1:5432/postgres","api_url":"http://10.0.0.1:8008/patroni","state":"running","role":"master","version":"3.0.2","tags":{"zone":"z1"},"xlog_location":67108944,"timeline":1}"#;
    const PG2: &str = r#"{"conn_url":"postgres://10.0.0.2:5433/postgres","state":"running","role":"replica","xlog_location":67108000,"timeline":1}"#;
    const PG3: &str = r#"{"conn_url":"postgres://10.0.0.3:5432/postgres","state":"running","role":"replica","xlog_location":1000,"tags":{"noloadbalance":true}}"#;

    #[test]
    fn plain_layout() {
        let mut s = PatroniState::new("/service/", "demo", false);
        assert_eq!(s.prefix(), "/service/demo/");
        assert_eq!(
            s.apply("/service/demo/members/pg1", Some(PG1.as_bytes())),
            Change::Topology
        );
        assert_eq!(
            s.apply("/service/demo/members/pg2", Some(PG2.as_bytes())),
            Change::Topology
        );
        assert_eq!(
            s.apply("/service/demo/members/pg3", Some(PG3.as_bytes())),
            Change::Topology
        );
        assert_eq!(s.apply("/service/demo/leader", Some(b"pg1")), Change::Topology);
        assert_eq!(
            s.apply("/service/demo/status", Some(br#"{"optime":67109000}"#)),
            Change::Lag
        );
        assert_eq!(
            s.apply("/service/demo/status", Some(br#"{"optime":67109000}"#)),
            Change::None
        );
        assert_eq!(s.apply("/service/other/leader", Some(b"x")), Change::None);
        let g = s.coordinator().unwrap();
        let l = g.leader_member().unwrap();
        assert_eq!((l.host.as_str(), l.port), ("10.0.0.1", 5432));
        assert_eq!(g.leader_wal(), Some(67109000));
        let replicas: Vec<_> = g
            .members
            .values()
            .filter(|m| g.is_replica(m))
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(replicas, ["pg2"], "pg1 leads, pg3 has noloadbalance");
        // A position-only update is lag, not topology.
        let moved = PG2.replace("67108000", "67108500");
        assert_eq!(
            s.apply("/service/demo/members/pg2", Some(moved.as_bytes())),
            Change::Lag
        );
        // The failover key: non-empty announces, "{}" is the leftover.
        s.apply("/service/demo/failover", Some(br#"{"leader":"pg1","member":"pg2"}"#));
        assert!(s.coordinator().unwrap().failover_pending);
        s.apply("/service/demo/failover", Some(b"{}"));
        assert!(!s.coordinator().unwrap().failover_pending);
        s.apply(
            "/service/demo/failover",
            Some(br#"{"leader":"pg1","member":"pg2","scheduled_at":"2030-01-01T00:00:00+00:00"}"#),
        );
        assert!(!s.coordinator().unwrap().failover_pending, "scheduled: not yet");
        assert_eq!(s.apply("/service/demo/leader", None), Change::Topology);
        assert!(s.coordinator().unwrap().leader_member().is_none());
        s.apply("/service/demo/config", Some(br#"{"ttl": 10, "loop_wait": 2}"#));
        assert_eq!(s.coordinator().unwrap().ttl, Some(10));
        assert_eq!(s.coordinator().unwrap().loop_wait, Some(2));
        assert_eq!(
            s.apply(
                "/service/demo/sync",
                Some(br#"{"leader":"pg1","sync_standby":"pg2,pg3"}"#)
            ),
            Change::Lag
        );
        assert_eq!(s.coordinator().unwrap().sync_standbys, ["pg2", "pg3"]);
        s.apply("/service/demo/sync", Some(br#"{"leader":"pg1","sync_standby":null}"#));
        assert!(s.coordinator().unwrap().sync_standbys.is_empty());
    }

    #[test]
    fn citus_layout_groups() {
        let mut s = PatroniState::new("/service", "citusdemo", true);
        s.apply("/service/citusdemo/0/members/c1", Some(PG1.as_bytes()));
        s.apply("/service/citusdemo/0/leader", Some(b"c1"));
        s.apply("/service/citusdemo/1/members/w1a", Some(PG2.as_bytes()));
        s.apply("/service/citusdemo/1/leader", Some(b"w1a"));
        assert_eq!(s.apply("/service/citusdemo/01/leader", Some(b"x")), Change::None);
        assert_eq!(s.apply("/service/citusdemo/leader", Some(b"x")), Change::None);
        assert_eq!(s.coordinator().unwrap().leader.as_deref(), Some("c1"));
        assert_eq!(s.groups[&1].leader_member().unwrap().port, 5433);
        assert_eq!(s.groups.len(), 2);
    }

    #[test]
    fn conn_urls() {
        assert_eq!(parse_conn_url("postgres://h:7/db"), Some(("h".into(), 7)));
        assert_eq!(parse_conn_url("postgresql://u:p@h/db"), Some(("h".into(), 5432)));
        assert_eq!(parse_conn_url("postgres://[::1]:6/x"), Some(("::1".into(), 6)));
        assert_eq!(parse_conn_url("mysql://h:1"), None);
        assert!(PatroniMember::parse("x", b"not json").is_none());
    }
}
