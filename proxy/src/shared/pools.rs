//! The server pools, one per (database, user, node, port), and the
//! max_db_connections / max_user_connections limits they share.

use super::settings::server_password;
use super::{shared_limit, Limit, Observability, Settings};
use pgferry_config::Config;
use pgferry_pool::{AsPoolKeyRef, NodeAddr, Pool, PoolKey, PoolKeyRef, ServerCredentials};
use pgferry_routing::{Role, Router};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub struct PoolRegistry {
    /// Read under the pools lock when a pool is made (see `pool`).
    settings: Arc<Settings>,
    /// TLS to PostgreSQL, shared by every pool.
    pub server_tls: Arc<pgferry_tls::Connector>,
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    /// When the sweep first saw each pool of an unlisted database unused
    /// (see `sweep_auto_pools`). Locked after `pools`.
    unused_since: Mutex<HashMap<PoolKey, std::time::Instant>>,
    retired: Mutex<Vec<Arc<Pool>>>,
    db_limits: Mutex<HashMap<String, Limit>>,
    user_limits: Mutex<HashMap<String, Limit>>,
    /// Read-write pools of a leader a switchover is moving away from:
    /// closed to new transactions, their running ones finishing (see
    /// `apply_topology`).
    draining_pools: Mutex<Vec<Arc<Pool>>>,
}

impl PoolRegistry {
    pub fn new(settings: Arc<Settings>, server_tls: Arc<pgferry_tls::Connector>) -> Self {
        PoolRegistry {
            settings,
            server_tls,
            pools: Mutex::default(),
            unused_since: Mutex::default(),
            retired: Mutex::default(),
            db_limits: Mutex::default(),
            user_limits: Mutex::default(),
            draining_pools: Mutex::default(),
        }
    }

    /// The pool for (database, user) on `node` for `role`'s port, created
    /// on first use.
    pub fn pool(&self, database: &str, user: &str, node: &Arc<NodeAddr>, role: Role) -> Arc<Pool> {
        let mut pools = self.pools.lock().unwrap();
        if let Some(p) = pools
            .get(&key_ref(database, user, node, role) as &dyn AsPoolKeyRef)
            .filter(|p| !p.is_closed())
        {
            return p.clone();
        }
        let key = PoolKey {
            database: database.to_owned(),
            user: user.to_owned(),
            node: node.clone(),
            read_only: role == Role::ReadOnly,
        };
        // The settings are read under the pools lock: `Settings::install` stores a new
        // configuration and then replaces stale pools under the same lock, so
        // a pool made from the configuration it replaced is either replaced
        // by it or never made.
        let config = self.settings.config();
        let settings = config.pool_settings(database, user);
        let password = server_password(&config, &self.settings.userlist(), user);
        let creds = ServerCredentials::new(settings.server_user.clone(), password);
        let mut limits = Vec::new();
        if settings.max_db_connections > 0 {
            limits.push(shared_limit(&self.db_limits, database, settings.max_db_connections));
        }
        if settings.max_user_connections > 0 {
            limits.push(shared_limit(&self.user_limits, user, settings.max_user_connections));
        }
        let pool = Pool::new(
            key.clone(),
            settings,
            creds,
            limits,
            config.limits.max_message_size,
            self.server_tls.clone(),
        );
        pools.insert(key, pool.clone());
        pool
    }

    /// The pool a new login uses: [`PoolRegistry::pool`], except that a new
    /// pool of an unlisted database (auto_database) counts against
    /// `max_auto_pools`. At the cap, unused such pools are freed first; if
    /// none is, the login gets 53300 rather than one more pool and task.
    pub fn login_pool(
        &self,
        database: &str,
        user: &str,
        node: &Arc<NodeAddr>,
        role: Role,
    ) -> Result<Arc<Pool>, crate::ClientError> {
        let config = self.settings.config();
        if config.database(database).is_none() {
            let mut pools = self.pools.lock().unwrap();
            let exists = pools
                .get(&key_ref(database, user, node, role) as &dyn AsPoolKeyRef)
                .is_some_and(|p| !p.is_closed());
            let cap = config.pool.max_auto_pools;
            if !exists && auto_pools(&pools, &config) >= cap {
                self.evict(
                    &mut pools,
                    |p| is_auto(p, &config) && is_unused(p),
                    "max_auto_pools reached",
                );
                if auto_pools(&pools, &config) >= cap {
                    return Err(crate::ClientError::refused(
                        pgferry_protocol::sqlstate::TOO_MANY_CONNECTIONS,
                        format!("too many pools of unlisted databases (max_auto_pools = {cap})"),
                    ));
                }
            }
        }
        Ok(self.pool(database, user, node, role))
    }

    /// After a failed login: frees `pool` if it is an unlisted database's
    /// and nothing uses it or has ever connected (a database name that
    /// does not exist leaves nothing behind).
    pub fn forget_if_unused(&self, pool: Arc<Pool>) {
        let key = pool.key.clone();
        drop(pool);
        let config = self.settings.config();
        let mut pools = self.pools.lock().unwrap();
        let Some(p) = pools.get(&key) else { return };
        if is_auto(p, &config) && is_unused(p) && p.idle_count() == 0 {
            self.evict(&mut pools, |p| p.key == key, "login failed");
        }
    }

    /// Frees the pools of unlisted databases that have had no client and
    /// no connection in use for `autodb_idle_timeout` (their idle
    /// connections close, their maintenance task ends). Run every second.
    pub fn sweep_auto_pools(&self) {
        let config = self.settings.config();
        let timeout = config.pool.autodb_idle_timeout;
        if timeout.is_zero() {
            return;
        }
        let mut pools = self.pools.lock().unwrap();
        let now = std::time::Instant::now();
        let mut expired = Vec::new();
        {
            let mut since = self.unused_since.lock().unwrap();
            since.retain(|k, _| pools.contains_key(k));
            for (k, p) in pools.iter() {
                if is_auto(p, &config) && is_unused(p) {
                    let t = *since.entry(k.clone()).or_insert(now);
                    if now.duration_since(t) >= timeout {
                        expired.push(k.clone());
                    }
                } else {
                    since.remove(k);
                }
            }
        }
        if !expired.is_empty() {
            self.evict(&mut pools, |p| expired.contains(&p.key), "autodb_idle_timeout reached");
        }
    }

    /// Shuts down and forgets the pools `which` picks.
    fn evict(&self, pools: &mut HashMap<PoolKey, Arc<Pool>>, which: impl Fn(&Arc<Pool>) -> bool, why: &str) {
        let mut since = self.unused_since.lock().unwrap();
        pools.retain(|k, p| {
            if !which(p) {
                return true;
            }
            tracing::debug!(db = %k.database, user = %k.user, node = %k.node, reason = why, "pool freed");
            p.shut_down(why);
            since.remove(k);
            false
        });
    }

    /// The pool-replacing half of `Settings::install`, run once the new
    /// configuration is stored: pools whose settings or server password
    /// it changed are shut down and retired.
    pub(super) fn replace_changed(&self) {
        let config = self.settings.config();
        let users = self.settings.userlist();
        let mut pools = self.pools.lock().unwrap();
        pools.retain(|_, p| {
            let settings = config.pool_settings(&p.key.database, &p.key.user);
            let password = server_password(&config, &users, &p.key.user);
            if p.settings == settings && p.credentials().has_password(password.as_deref()) {
                return true;
            }
            tracing::info!(db = %p.key.database, user = %p.key.user, node = %p.key.node, "pool settings changed: replacing the pool (clients move at their next transaction)");
            p.shut_down("configuration changed");
            self.retired.lock().unwrap().push(p.clone());
            false
        });
    }

    /// RECONNECT / KILL: shuts down the pools of `db` (None: all), whose
    /// sessions move to new pools at their next transaction. With `cut`,
    /// connections in use are cut too (KILL); without, they close when
    /// their transaction ends (RECONNECT). Returns the number of pools.
    pub fn replace_pools(&self, db: Option<&str>, why: &str, cut: bool) -> usize {
        let mut n = 0;
        self.pools.lock().unwrap().retain(|_, p| {
            if db.is_some_and(|d| d != p.key.database) {
                return true;
            }
            if cut {
                p.retire(why);
            } else {
                p.shut_down(why);
            }
            self.retired.lock().unwrap().push(p.clone());
            n += 1;
            false
        });
        n
    }

    /// Pools shut down (by a reload, a RECONNECT or a failover) that still
    /// have connections in use; pruned as they empty.
    pub fn retired_pools(&self) -> Vec<Arc<Pool>> {
        let mut r = self.retired.lock().unwrap();
        r.retain(|p| p.stats.sv_active.load(std::sync::atomic::Ordering::Relaxed) > 0);
        r.clone()
    }

    /// Every pool in the map (not the retired ones).
    pub fn all(&self) -> Vec<Arc<Pool>> {
        self.pools.lock().unwrap().values().cloned().collect()
    }

    /// All pools in the order the console and the status page list them:
    /// database, user, port, node.
    pub fn sorted(&self) -> Vec<Arc<Pool>> {
        let mut p = self.all();
        p.sort_by(|a, b| {
            let (a, b) = (&a.key, &b.key);
            (&a.database, &a.user, a.read_only, &a.node.host, a.node.port).cmp(&(
                &b.database,
                &b.user,
                b.read_only,
                &b.node.host,
                b.node.port,
            ))
        });
        p
    }

    /// Applies a topology change to the pools: a node that is no longer
    /// the leader loses its read-write connections at once, in use or not
    /// (nothing more may reach it), except during an announced switchover,
    /// when its running transactions may finish first; a node that no longer serves reads has
    /// its idle read-only connections closed, and sessions move at their
    /// next transaction. Closed pools are dropped from the map. `router`
    /// says which node may serve what; `obs` records what changed.
    pub fn apply_topology(&self, router: &Router, obs: &Observability) {
        let topology = router.topology();
        let draining_from = topology.draining_from.as_ref();
        // A switchover announced earlier: once the leader key has moved (or
        // the announcement is gone), what still runs on the old leader is
        // cut; if that node is the leader again, it simply finishes.
        self.draining_pools.lock().unwrap().retain(|p| {
            if draining_from == Some(&*p.key.node) || topology.draining_worker(&p.key.node) {
                return true;
            }
            let leader_again = router.allows(Role::ReadWrite, &p.key.node);
            if !leader_again {
                let cut = p.retire("switchover done: node is no longer the leader");
                tracing::warn!(node = %p.key.node, db = %p.key.database, user = %p.key.user, connections_cut = cut, "read-write pool retired after the switchover");
            }
            false
        });
        let pools = self.all();
        for p in pools {
            let role = if p.key.read_only {
                Role::ReadOnly
            } else {
                Role::ReadWrite
            };
            if p.is_closed() || router.allows(role, &p.key.node) {
                continue;
            }
            if p.key.read_only {
                p.shut_down("node no longer serves the read-only port");
                obs.event(format!(
                    "read-only pool {}/{} on {} closed: node no longer eligible",
                    p.key.database, p.key.user, p.key.node
                ));
                tracing::info!(node = %p.key.node, db = %p.key.database, user = %p.key.user, "read-only pool closed: node no longer eligible");
            } else if draining_from == Some(&*p.key.node) || topology.draining_worker(&p.key.node) {
                // Switchover announced: hold new transactions, let running
                // ones finish (they would commit anyway before Patroni stops
                // the node; cutting them would tell their clients otherwise).
                p.shut_down("switchover announced");
                obs.event(format!(
                    "read-write pool {}/{} on {} draining: switchover announced",
                    p.key.database, p.key.user, p.key.node
                ));
                tracing::info!(node = %p.key.node, db = %p.key.database, user = %p.key.user, "read-write pool draining: switchover announced; running transactions may finish");
                self.draining_pools.lock().unwrap().push(p.clone());
            } else if only_in_citus_metadata(&topology, &p.key.node) {
                // A Citus worker known from pg_dist_node alone left the
                // primaries (drained and removed, or moved by
                // citus_update_node): nothing says it was demoted, and a
                // demoted server ends its sessions itself. Running
                // transactions finish (Citus forwards them); new ones go
                // elsewhere.
                p.shut_down("node is no longer a Citus worker primary");
                obs.event(format!(
                    "read-write pool {}/{} on {} draining: no longer a Citus worker primary",
                    p.key.database, p.key.user, p.key.node
                ));
                tracing::info!(node = %p.key.node, db = %p.key.database, user = %p.key.user, "read-write pool draining: node left the Citus worker primaries; running transactions may finish");
            } else {
                let cut = p.retire("node is no longer the leader");
                obs.event(format!(
                    "read-write pool {}/{} on {} retired: node is no longer the leader ({cut} connections cut)",
                    p.key.database, p.key.user, p.key.node
                ));
                tracing::warn!(node = %p.key.node, db = %p.key.database, user = %p.key.user, connections_cut = cut, "read-write pool retired: node is no longer the leader");
            }
        }
        self.pools.lock().unwrap().retain(|_, p| !p.is_closed());
    }
}

/// `node` is known only from Citus's `pg_dist_node` (not a member the
/// topology source follows, and the source does not follow worker groups):
/// its leaving says nothing about a demotion.
fn only_in_citus_metadata(topology: &pgferry_routing::Topology, node: &NodeAddr) -> bool {
    let addr = node.to_string();
    topology.groups.is_none() && !topology.view.members.iter().any(|m| m.addr == addr)
}

/// Whether `p` serves a database not listed in [[database]].
fn is_auto(p: &Pool, config: &Config) -> bool {
    config.database(&p.key.database).is_none()
}

/// No session holds the pool and no connection is checked out or being
/// made: the map's reference is the only one (every holder clones the Arc,
/// and clones are only handed out under the map's lock).
fn is_unused(p: &Arc<Pool>) -> bool {
    Arc::strong_count(p) == 1
}

fn auto_pools(pools: &HashMap<PoolKey, Arc<Pool>>, config: &Config) -> usize {
    pools.values().filter(|p| !p.is_closed() && is_auto(p, config)).count()
}

/// The key to look a pool up by, borrowed (no allocation per login).
fn key_ref<'a>(database: &'a str, user: &'a str, node: &'a NodeAddr, role: Role) -> PoolKeyRef<'a> {
    PoolKeyRef {
        database,
        user,
        node,
        read_only: role == Role::ReadOnly,
    }
}
