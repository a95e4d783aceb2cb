//! State shared by every client task: configuration, users, pools, the
//! router, cancel keys and the prepared-statement registry. Passed by
//! reference (no globals), so tests can run several proxies in one process.

use crate::cancel::CancelRegistry;
use crate::userlist::Userlist;
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
    pub config: Arc<Config>,
    pub userlist: Userlist,
    pub router: Router,
    /// TLS termination for both listeners (reloadable).
    pub tls: pgferry_tls::Acceptor,
    /// TLS to PostgreSQL, shared by every pool.
    pub server_tls: Arc<pgferry_tls::Connector>,
    pub auth_query: Option<crate::authquery::AuthQuery>,
    pub throttle: crate::throttle::AuthThrottle,
    /// Connections still in startup or authentication.
    pub pending_logins: Arc<Semaphore>,
    /// Per-user client caps (max_client_connections).
    user_clients: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Listener counters for /metrics.
    pub counters: Counters,
    /// Wakes sessions idle between transactions when draining starts.
    pub drain_tx: tokio::sync::watch::Sender<bool>,
    /// Set on SIGTERM: sessions close at their next transaction boundary.
    drain_started: std::sync::OnceLock<std::time::Instant>,
    /// PAUSE: databases whose new transactions wait ("*" = all).
    pause: tokio::sync::watch::Sender<std::collections::BTreeSet<String>>,
    /// Whether anything is paused: the one check on the hot path.
    pub any_paused: std::sync::atomic::AtomicBool,
    pub started: std::time::SystemTime,
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    db_limits: Mutex<HashMap<String, Arc<Semaphore>>>,
    user_limits: Mutex<HashMap<String, Arc<Semaphore>>>,
    pub cancels: Arc<CancelRegistry>,
    pub statements: StatementRegistry,
    /// Seeds mock SCRAM salts for unknown users.
    pub mock_seed: [u8; 32],
    /// SCRAM secrets derived from plaintext users-file passwords.
    plain_secrets: Mutex<HashMap<String, Secret>>,
    pub next_client_id: AtomicU64,
}

impl Shared {
    pub fn new(
        config: Arc<Config>,
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
            throttle: crate::throttle::AuthThrottle::new(l.auth_failure_limit, l.auth_failure_window),
            pending_logins: Arc::new(Semaphore::new(l.max_pending_logins.max(1))),
            user_clients: Mutex::default(),
            counters: Counters::default(),
            drain_tx: tokio::sync::watch::channel(false).0,
            drain_started: std::sync::OnceLock::new(),
            pause: tokio::sync::watch::channel(Default::default()).0,
            any_paused: std::sync::atomic::AtomicBool::new(false),
            started: std::time::SystemTime::now(),
            auth_query,
            tls,
            server_tls,
            config,
            userlist,
            router,
            pools: Mutex::default(),
            db_limits: Mutex::default(),
            user_limits: Mutex::default(),
            cancels: Arc::default(),
            statements: StatementRegistry::default(),
            mock_seed,
            plain_secrets: Mutex::default(),
            next_client_id: AtomicU64::new(1),
        }
    }

    /// The pool for (database, user) on `node` for `role`'s port, created
    /// on first use.
    pub fn pool(&self, database: &str, user: &str, node: &Arc<NodeAddr>, role: Role) -> Arc<Pool> {
        let key = PoolKey {
            database: database.to_owned(),
            user: user.to_owned(),
            node: node.clone(),
            read_only: role == Role::ReadOnly,
        };
        if let Some(p) = self.pools.lock().unwrap().get(&key) {
            if !p.is_closed() {
                return p.clone();
            }
        }
        let settings = self.config.pool_settings(database, user);
        let password = server_password(&self.config, &self.userlist, user);
        let creds = ServerCredentials::new(settings.server_user.clone(), password);
        let mut limits = Vec::new();
        if settings.max_db_connections > 0 {
            limits.push(shared_limit(&self.db_limits, database, settings.max_db_connections));
        }
        if settings.max_user_connections > 0 {
            limits.push(shared_limit(&self.user_limits, user, settings.max_user_connections));
        }
        let mut pools = self.pools.lock().unwrap();
        // Another client may have created it meanwhile.
        if let Some(p) = pools.get(&key).filter(|p| !p.is_closed()) {
            return p.clone();
        }
        let pool = Pool::new(
            key.clone(),
            settings,
            creds,
            limits,
            self.config.limits.max_message_size,
            self.server_tls.clone(),
        );
        pools.insert(key, pool.clone());
        pool
    }

    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.pools.lock().unwrap().values().cloned().collect()
    }

    /// Starts a graceful shutdown: idle clients are closed with 57P01 now,
    /// the others at the end of their transaction.
    pub fn start_draining(&self) {
        let _ = self.drain_started.set(std::time::Instant::now());
        self.drain_tx.send_replace(true);
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
        match &self.config.topology {
            pgferry_config::Topology::Etcd(e) => e.failover_hold_timeout,
            pgferry_config::Topology::Static { .. } => std::time::Duration::ZERO,
        }
    }

    /// Applies a topology change to the pools: a node that is no longer
    /// the leader loses its read-write connections at once, in use or not
    /// (nothing more may reach it); a node that no longer serves reads has
    /// its idle read-only connections closed, and sessions move at their
    /// next transaction. Closed pools are dropped from the map.
    pub fn apply_topology(&self) {
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
                tracing::info!(node = %p.key.node, db = %p.key.database, user = %p.key.user, "read-only pool closed: node no longer eligible");
            } else {
                let cut = p.retire("node is no longer the leader");
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
        let Some(cap) = self.config.user(user).and_then(|u| u.max_client_connections) else {
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
    pub auth_failures: AtomicU64,
    /// Connections refused at accept, by reason.
    pub refused_throttled: AtomicU64,
    pub refused_max_client_conn: AtomicU64,
    pub refused_pending_logins: AtomicU64,
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

fn shared_limit(map: &Mutex<HashMap<String, Arc<Semaphore>>>, name: &str, n: usize) -> Arc<Semaphore> {
    map.lock()
        .unwrap()
        .entry(name.to_owned())
        .or_insert_with(|| Arc::new(Semaphore::new(n)))
        .clone()
}
