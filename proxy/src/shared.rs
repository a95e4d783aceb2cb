//! State shared by every client task: configuration, users, pools, the
//! router, cancel keys and the prepared-statement registry. Passed by
//! reference (no globals), so tests can run several proxies in one process.

use crate::clients::ClientRegistry;
use crate::userlist::Userlist;
use arc_swap::ArcSwap;
use pgferry_config::Config;
use pgferry_pool::statements::StatementRegistry;
use pgferry_pool::{NodeAddr, Pool, PoolKey, ServerCredentials};
use pgferry_protocol::scram::{self, Secret};
use pgferry_routing::{Role, Router};
use rand::RngCore;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;

pub struct Shared {
    /// Swapped whole by RELOAD / SIGHUP / SET (see `reload.rs`); readers
    /// take a snapshot with `config()`.
    config: ArcSwap<Config>,
    config_path: Option<std::path::PathBuf>,
    userlist: ArcSwap<Userlist>,
    pub router: Router,
    /// TLS termination for both listeners (reloadable).
    pub tls: pgferry_tls::Acceptor,
    /// TLS to PostgreSQL, shared by every pool.
    pub server_tls: Arc<pgferry_tls::Connector>,
    pub auth_query: Option<crate::authquery::AuthQuery>,
    pub throttle: crate::throttle::AuthThrottle,
    /// Connections still in startup or authentication.
    pub pending_logins: crate::pending::PendingLogins,
    /// Per-user client caps (max_client_connections).
    user_clients: Mutex<HashMap<String, Limit>>,
    /// Listener counters for /metrics.
    pub counters: Counters,
    /// Wakes sessions idle between transactions when draining starts.
    pub drain_tx: tokio::sync::watch::Sender<bool>,
    /// Console SHUTDOWN: asks `run` to stop as SIGTERM does.
    pub stop_tx: tokio::sync::watch::Sender<bool>,
    /// Set on SIGTERM: sessions close at their next transaction boundary.
    drain_started: std::sync::OnceLock<std::time::Instant>,
    draining: std::sync::atomic::AtomicBool,
    /// PAUSE: databases whose new transactions wait ("*" = all).
    pause: tokio::sync::watch::Sender<std::collections::BTreeSet<String>>,
    /// Whether anything is paused: the one check on the hot path.
    pub any_paused: std::sync::atomic::AtomicBool,
    pub started: std::time::SystemTime,
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    /// When the sweep first saw each pool of an unlisted database unused
    /// (see `sweep_auto_pools`). Locked after `pools`.
    unused_since: Mutex<HashMap<PoolKey, std::time::Instant>>,
    retired: Mutex<Vec<Arc<Pool>>>,
    db_limits: Mutex<HashMap<String, Limit>>,
    user_limits: Mutex<HashMap<String, Limit>>,
    pub clients: Arc<ClientRegistry>,
    pub statements: StatementRegistry,
    /// Seeds mock SCRAM salts for unknown users.
    pub mock_seed: [u8; 32],
    /// SCRAM secrets derived from plaintext users-file passwords.
    plain_secrets: Mutex<HashMap<String, Secret>>,
    pub next_client_id: AtomicU64,
    /// Recent operational events for the status page, newest last.
    events: Mutex<std::collections::VecDeque<(std::time::SystemTime, String)>>,
    /// Read-write pools of a leader a switchover is moving away from:
    /// closed to new transactions, their running ones finishing (see
    /// `apply_topology`).
    draining_pools: Mutex<Vec<Arc<Pool>>>,
}

/// How many events the status page keeps.
const EVENTS_KEPT: usize = 100;

impl Shared {
    pub fn new(
        config: Arc<Config>,
        config_path: Option<std::path::PathBuf>,
        userlist: Userlist,
        router: Router,
        tls: pgferry_tls::Acceptor,
        server_tls: Arc<pgferry_tls::Connector>,
    ) -> Self {
        let mut mock_seed = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut mock_seed);
        let auth_query = config.auth.auth_user.as_deref().and_then(|u| {
            let password = server_password(&config, &userlist, u);
            crate::authquery::AuthQuery::new(&config, password, &server_tls)
        });
        let l = &config.limits;
        Shared {
            throttle: crate::throttle::AuthThrottle::new(
                l.auth_failure_limit,
                l.auth_failure_window,
                l.auth_failure_delay,
            ),
            pending_logins: crate::pending::PendingLogins::new(l.max_pending_logins, l.max_pending_logins_per_address),
            user_clients: Mutex::default(),
            counters: Counters::default(),
            drain_tx: tokio::sync::watch::channel(false).0,
            stop_tx: tokio::sync::watch::channel(false).0,
            drain_started: std::sync::OnceLock::new(),
            draining: std::sync::atomic::AtomicBool::new(false),
            pause: tokio::sync::watch::channel(Default::default()).0,
            any_paused: std::sync::atomic::AtomicBool::new(false),
            started: std::time::SystemTime::now(),
            auth_query,
            tls,
            server_tls,
            config: ArcSwap::new(config),
            config_path,
            userlist: ArcSwap::from_pointee(userlist),
            router,
            pools: Mutex::default(),
            unused_since: Mutex::default(),
            retired: Mutex::default(),
            db_limits: Mutex::default(),
            user_limits: Mutex::default(),
            clients: Arc::default(),
            statements: StatementRegistry::default(),
            mock_seed,
            plain_secrets: Mutex::default(),
            next_client_id: AtomicU64::new(1),
            events: Mutex::default(),
            draining_pools: Mutex::default(),
        }
    }

    /// The pool for (database, user) on `node` for `role`'s port, created
    /// on first use.
    pub fn pool(&self, database: &str, user: &str, node: &Arc<NodeAddr>, role: Role) -> Arc<Pool> {
        let key = pool_key(database, user, node, role);
        let mut pools = self.pools.lock().unwrap();
        if let Some(p) = pools.get(&key).filter(|p| !p.is_closed()) {
            return p.clone();
        }
        // The settings are read under the pools lock: `install` stores a new
        // configuration and then replaces stale pools under the same lock, so
        // a pool made from the configuration it replaced is either replaced
        // by it or never made.
        let config = self.config();
        let settings = config.pool_settings(database, user);
        let password = server_password(&config, &self.userlist(), user);
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

    /// The pool a new login uses: [`Shared::pool`], except that a new pool
    /// of an unlisted database (auto_database) counts against
    /// `max_auto_pools`. At the cap, unused such pools are freed first; if
    /// none is, the login gets 53300 rather than one more pool and task.
    pub fn login_pool(
        &self,
        database: &str,
        user: &str,
        node: &Arc<NodeAddr>,
        role: Role,
    ) -> Result<Arc<Pool>, crate::ClientError> {
        let config = self.config();
        if config.database(database).is_none() {
            let key = pool_key(database, user, node, role);
            let mut pools = self.pools.lock().unwrap();
            let exists = pools.get(&key).is_some_and(|p| !p.is_closed());
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
        let config = self.config();
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
        let config = self.config();
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

    /// Records an operational event (a reload, a console command, a
    /// topology change) for the status page. Callers log it themselves.
    pub fn event(&self, what: impl Into<String>) {
        let mut e = self.events.lock().unwrap();
        if e.len() == EVENTS_KEPT {
            e.pop_front();
        }
        e.push_back((std::time::SystemTime::now(), what.into()));
    }

    pub fn events(&self) -> Vec<(std::time::SystemTime, String)> {
        self.events.lock().unwrap().iter().cloned().collect()
    }

    /// The configuration now in force.
    pub fn config(&self) -> arc_swap::Guard<Arc<Config>> {
        self.config.load()
    }

    pub fn userlist(&self) -> arc_swap::Guard<Arc<Userlist>> {
        self.userlist.load()
    }

    /// RELOAD / SIGHUP: re-reads the configuration file, the users file and
    /// the TLS files, and applies them all, or nothing if any fails.
    /// Returns the names of changed settings that need a restart.
    ///
    /// The files are read and parsed on a blocking thread: a slow disk (or
    /// a file that is a pipe) must not stall the runtime's workers, which
    /// serve every client.
    pub async fn reload(&self) -> Result<Vec<&'static str>, String> {
        let path = self
            .config_path
            .clone()
            .ok_or("pgferry was started without a configuration file")?;
        let (old, old_users) = (self.config.load_full(), self.userlist.load_full());
        let tls_on = self.tls.mode() != pgferry_config::ClientTls::Disable;
        let loaded = tokio::task::spawn_blocking(move || load_for_reload(&path, &old, &old_users, tls_on))
            .await
            .map_err(|e| format!("reload task failed: {e}"))??;
        self.tls.replace(loaded.tls);
        self.userlist.store(Arc::new(loaded.users));
        self.plain_secrets.lock().unwrap().clear();
        self.install(loaded.config);
        Ok(loaded.restart)
    }

    /// SET key = value from the console.
    pub fn set(&self, key: &str, value: &str) -> Result<(), String> {
        let new = crate::reload::set(&self.config(), key, value)?;
        self.install(new);
        Ok(())
    }

    /// Puts a new configuration in force. Pools whose settings or server
    /// password changed are shut down gracefully: idle connections close
    /// now, busy ones when their transaction ends, and sessions move to a
    /// new pool at their next transaction. Clients stay connected.
    fn install(&self, new: Config) {
        self.config.store(Arc::new(new));
        let config = self.config();
        let users = self.userlist();
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

    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.pools.lock().unwrap().values().cloned().collect()
    }

    /// Starts a graceful shutdown: idle clients are closed with 57P01 now,
    /// the others at the end of their transaction.
    pub fn start_draining(&self) {
        if self.drain_started.set(std::time::Instant::now()).is_ok() {
            self.event("shutting down: closing clients at transaction boundaries");
        }
        self.draining.store(true, std::sync::atomic::Ordering::Release);
        self.drain_tx.send_replace(true);
        for c in self.clients.all() {
            c.nudge();
        }
    }

    /// Set once a drain has started (sessions check it when nudged).
    pub fn draining(&self) -> &std::sync::atomic::AtomicBool {
        &self.draining
    }

    /// How long pgferry has been draining; None while it is not.
    pub fn drain_age(&self) -> Option<std::time::Duration> {
        self.drain_started.get().map(|t| t.elapsed())
    }

    /// PAUSE `db` (None: every database): new transactions wait.
    pub fn pause(&self, db: Option<&str>) {
        self.pause.send_modify(|p| {
            p.insert(db.unwrap_or("*").to_owned());
        });
        self.any_paused.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// RESUME `db` (None: everything). Returns false if it was not paused.
    pub fn resume(&self, db: Option<&str>) -> bool {
        let mut was = false;
        self.pause.send_modify(|p| {
            was = match db {
                Some(d) => p.remove(d),
                None => {
                    let any = !p.is_empty();
                    p.clear();
                    any
                }
            };
            self.any_paused
                .store(!p.is_empty(), std::sync::atomic::Ordering::Relaxed);
        });
        was
    }

    pub fn is_paused(&self, db: &str) -> bool {
        let p = self.pause.borrow();
        p.contains("*") || p.contains(db)
    }

    /// Waits until `db` is not paused.
    pub async fn wait_unpaused(&self, db: &str) {
        let mut rx = self.pause.subscribe();
        while self.is_paused(db) {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// How long a new read-write transaction waits for a confirmed leader.
    pub fn failover_hold(&self) -> std::time::Duration {
        match &self.config().topology {
            pgferry_config::Topology::Etcd(e) => e.failover_hold_timeout,
            pgferry_config::Topology::Static { .. } => std::time::Duration::ZERO,
        }
    }

    /// Applies a topology change to the pools: a node that is no longer
    /// the leader loses its read-write connections at once, in use or not
    /// (nothing more may reach it), except during an announced switchover,
    /// when its running transactions may finish first; a node that no longer serves reads has
    /// its idle read-only connections closed, and sessions move at their
    /// next transaction. Closed pools are dropped from the map.
    pub fn apply_topology(&self) {
        let topology = self.router.topology();
        let draining_from = topology.draining_from.as_ref();
        // A switchover announced earlier: once the leader key has moved (or
        // the announcement is gone), what still runs on the old leader is
        // cut; if that node is the leader again, it simply finishes.
        self.draining_pools.lock().unwrap().retain(|p| {
            if draining_from == Some(&*p.key.node) || topology.draining_worker(&p.key.node) {
                return true;
            }
            let leader_again = self.router.allows(Role::ReadWrite, &p.key.node);
            if !leader_again {
                let cut = p.retire("switchover done: node is no longer the leader");
                tracing::warn!(node = %p.key.node, db = %p.key.database, user = %p.key.user, connections_cut = cut, "read-write pool retired after the switchover");
            }
            false
        });
        let pools = self.pools();
        for p in pools {
            let role = if p.key.read_only {
                Role::ReadOnly
            } else {
                Role::ReadWrite
            };
            if p.is_closed() || self.router.allows(role, &p.key.node) {
                continue;
            }
            if p.key.read_only {
                p.shut_down("node no longer serves the read-only port");
                self.event(format!(
                    "read-only pool {}/{} on {} closed: node no longer eligible",
                    p.key.database, p.key.user, p.key.node
                ));
                tracing::info!(node = %p.key.node, db = %p.key.database, user = %p.key.user, "read-only pool closed: node no longer eligible");
            } else if draining_from == Some(&*p.key.node) || topology.draining_worker(&p.key.node) {
                // Switchover announced: hold new transactions, let running
                // ones finish (they would commit anyway before Patroni stops
                // the node; cutting them would tell their clients otherwise).
                p.shut_down("switchover announced");
                self.event(format!(
                    "read-write pool {}/{} on {} draining: switchover announced",
                    p.key.database, p.key.user, p.key.node
                ));
                tracing::info!(node = %p.key.node, db = %p.key.database, user = %p.key.user, "read-write pool draining: switchover announced; running transactions may finish");
                self.draining_pools.lock().unwrap().push(p.clone());
            } else {
                let cut = p.retire("node is no longer the leader");
                self.event(format!(
                    "read-write pool {}/{} on {} retired: node is no longer the leader ({cut} connections cut)",
                    p.key.database, p.key.user, p.key.node
                ));
                tracing::warn!(node = %p.key.node, db = %p.key.database, user = %p.key.user, connections_cut = cut, "read-write pool retired: node is no longer the leader");
            }
        }
        self.pools.lock().unwrap().retain(|_, p| !p.is_closed());
    }

    /// A SCRAM secret for a plaintext password, derived once (PBKDF2 runs
    /// on a blocking thread) with a random salt.
    pub async fn plain_secret(&self, user: &str, password: &str) -> Secret {
        if let Some(s) = self.plain_secrets.lock().unwrap().get(user) {
            return s.clone();
        }
        let password = password.to_owned();
        let secret = tokio::task::spawn_blocking(move || {
            let mut salt = [0u8; 16];
            rand::thread_rng().fill_bytes(&mut salt);
            Secret::from_password(&password, &salt, scram::DEFAULT_ITERATIONS)
        })
        .await
        .expect("key derivation does not panic");
        self.plain_secrets
            .lock()
            .unwrap()
            .entry(user.to_owned())
            .or_insert(secret)
            .clone()
    }
}

impl Shared {
    /// A permit for one more client of `user` when it has a
    /// max_client_connections cap; 53300 once the cap is reached.
    pub fn user_client_permit(
        &self,
        user: &str,
    ) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, crate::ClientError> {
        let Some(cap) = self.config().user(user).and_then(|u| u.max_client_connections) else {
            return Ok(None);
        };
        match shared_limit(&self.user_clients, user, cap).try_acquire_owned() {
            Ok(p) => Ok(Some(p)),
            Err(_) => Err(crate::ClientError::refused(
                pgferry_protocol::sqlstate::TOO_MANY_CONNECTIONS,
                format!("too many connections for user \"{user}\" (max_client_connections)"),
            )),
        }
    }
}

/// What the listeners count (read by /metrics).
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections accepted on the read-write and read-only ports.
    pub accepted_rw: AtomicU64,
    pub accepted_ro: AtomicU64,
    pub tls_handshakes: AtomicU64,
    /// Failed logins: wrong password / unknown user, hba refusal,
    /// plaintext where TLS is required.
    pub auth_failures: AtomicU64,
    pub auth_failures_hba: AtomicU64,
    pub auth_failures_tls: AtomicU64,
    /// Cancel requests received, and those that matched a client with a
    /// query on a server (and were passed on).
    pub cancel_requests: AtomicU64,
    pub cancels_forwarded: AtomicU64,
    /// Times the read-write port's server changed.
    pub leader_changes: AtomicU64,
    /// Failed logins answered late (see `throttle.rs`).
    pub auth_failures_delayed: AtomicU64,
    /// Connections refused at accept, by reason.
    pub refused_max_client_conn: AtomicU64,
    pub refused_pending_logins: AtomicU64,
    pub refused_pending_per_address: AtomicU64,
}

/// The password for server logins of `user`: its [[user]] server_password,
/// else a plaintext users-file entry.
fn server_password(config: &Config, userlist: &Userlist, user: &str) -> Option<String> {
    config
        .user(user)
        .and_then(|u| u.server_password.clone())
        .or_else(|| match userlist.get(user) {
            Some(crate::userlist::Credential::Plain(p)) => Some(p.clone()),
            _ => None,
        })
}

/// What a reload read from the files, ready to put in force.
struct Reloaded {
    config: Config,
    users: Userlist,
    tls: Option<pgferry_tls::Termination>,
    restart: Vec<&'static str>,
}

/// The blocking half of a reload: reads and checks every file, and
/// carries restart-only settings over from `old`.
fn load_for_reload(
    path: &std::path::Path,
    old: &Config,
    old_users: &Userlist,
    tls_on: bool,
) -> Result<Reloaded, String> {
    let mut config = Config::load(path).map_err(|e| e.to_string())?;
    let users = crate::load_userlist(&config).map_err(|e| e.to_string())?;
    let mut restart = crate::reload::carry_over(old, &mut config);
    // auth_query's connections log in with the password they started with.
    if let Some(au) = &config.auth.auth_user {
        if server_password(old, old_users, au) != server_password(&config, &users, au) {
            restart.push("the auth_user's password");
        }
    }
    // The listeners' TLS mode is fixed at start: with TLS off the files are not read.
    let tls = match tls_on {
        true => pgferry_tls::Termination::load(&config.tls).map_err(|e| format!("TLS: {e}"))?,
        false => None,
    };
    Ok(Reloaded {
        config,
        users,
        tls,
        restart,
    })
}

/// A max_db_connections / max_user_connections semaphore and its size.
type Limit = (usize, Arc<Semaphore>);

/// The semaphore every pool of `name` shares. A new size (a reload changed
/// the limit, so every pool under it is being replaced) starts a new one;
/// the old pools keep theirs until their last transaction ends. The same
/// size keeps the semaphore, so that a pool replaced for another reason
/// still shares it with the pools that were not.
fn shared_limit(map: &Mutex<HashMap<String, Limit>>, name: &str, n: usize) -> Arc<Semaphore> {
    let mut map = map.lock().unwrap();
    match map.get(name) {
        Some((size, sem)) if *size == n => sem.clone(),
        _ => {
            let sem = Arc::new(Semaphore::new(n));
            map.insert(name.to_owned(), (n, sem.clone()));
            sem
        }
    }
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

fn pool_key(database: &str, user: &str, node: &Arc<NodeAddr>, role: Role) -> PoolKey {
    PoolKey {
        database: database.to_owned(),
        user: user.to_owned(),
        node: node.clone(),
        read_only: role == Role::ReadOnly,
    }
}
