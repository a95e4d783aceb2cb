//! auth_query: secrets looked up on PostgreSQL for users missing from the
//! users file, as PgBouncer does, through a small control-plane pool
//! (deadpool-postgres) logged in as `auth_user`.
//!
//! Safety rules this module keeps:
//! - the user name only ever travels as a bound parameter ($1), never in
//!   SQL text, and the control connections run with a fixed search_path
//!   (pg_catalog, pg_temp): no client-supplied startup parameter reaches
//!   them (the CVE-2025-12819 class);
//! - an expired VALID UNTIL is refused (CVE-2025-2291);
//! - answers, found or not, are cached for `auth_cache_ttl`, so a flood of
//!   logins costs one query per user per TTL.

use crate::userlist::Credential;
use pgferry_pool::NodeAddr;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum AuthQueryError {
    #[error("auth_query pool: {0}")]
    Pool(String),
    #[error("auth_query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
}

/// What auth_query said about a user.
#[derive(Clone, Debug)]
pub enum Lookup {
    /// No such role, or a role without a password.
    Missing,
    Found {
        credential: Credential,
        /// VALID UNTIL in microseconds since 2000-01-01 (PostgreSQL's
        /// epoch); None when not set.
        valid_until: Option<i64>,
    },
}

impl Lookup {
    pub fn is_expired(&self) -> bool {
        match self {
            Lookup::Found {
                valid_until: Some(t), ..
            } => *t <= pg_now(),
            _ => false,
        }
    }
}

/// Now, in PostgreSQL's timestamp unit and epoch.
fn pg_now() -> i64 {
    const PG_EPOCH: u64 = 946_684_800; // 2000-01-01 in Unix seconds
    let unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    unix.as_micros() as i64 - (PG_EPOCH as i64) * 1_000_000
}

pub struct AuthQuery {
    user: String,
    password: Option<String>,
    query: String,
    dbname: Option<String>,
    ttl: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
    ssl_mode: tokio_postgres::config::SslMode,
    /// Control pools per (node, database), bounded: the database comes from
    /// clients that have not authenticated yet.
    pools: Mutex<Recent<(NodeAddr, String), deadpool_postgres::Pool>>,
    cache: Mutex<HashMap<String, (Instant, Lookup)>>,
}

impl AuthQuery {
    pub fn new(
        config: &pgferry_config::Config,
        password: Option<String>,
        tls: &pgferry_tls::Connector,
    ) -> Option<AuthQuery> {
        let a = &config.auth;
        let user = a.auth_user.clone()?;
        let ssl_mode = match config.tls.server_tls {
            pgferry_config::ServerTls::Disable => tokio_postgres::config::SslMode::Disable,
            pgferry_config::ServerTls::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        };
        Some(AuthQuery {
            user,
            password,
            query: a.auth_query.clone(),
            dbname: a.auth_dbname.clone(),
            ttl: a.auth_cache_ttl,
            tls: tls.client_config(),
            ssl_mode,
            pools: Mutex::new(Recent::new(MAX_CONTROL_POOLS)),
            cache: Mutex::default(),
        })
    }

    /// The user's secret, from the cache or the server `node`.
    pub async fn lookup(&self, node: &NodeAddr, database: &str, user: &str) -> Result<Lookup, AuthQueryError> {
        if let Some((at, l)) = self.cache.lock().unwrap().get(user) {
            if at.elapsed() < self.ttl {
                return Ok(l.clone());
            }
        }
        let dbname = self.dbname.as_deref().unwrap_or(database);
        let pool = self.pool(node, dbname)?;
        let client = match pool.get().await {
            Ok(c) => c,
            Err(e) => {
                // A database that does not exist (or a node that is down)
                // keeps no pool: names a client makes up leave nothing.
                self.pools.lock().unwrap().remove(&(node.clone(), dbname.to_owned()));
                return Err(AuthQueryError::Pool(e.to_string()));
            }
        };
        let stmt = client.prepare_cached(&self.query).await?;
        let rows = client.query(&stmt, &[&user]).await?;
        let lookup = match rows.first() {
            None => Lookup::Missing,
            Some(row) => {
                let secret: Option<String> = row.try_get(1)?;
                let valid_until = if row.len() > 2 {
                    row.try_get::<_, Option<PgTimestamp>>(2)?.map(|t| t.0)
                } else {
                    None
                };
                match secret.as_deref().map(Credential::parse) {
                    Some(Ok(credential)) if secret.as_deref() != Some("") => Lookup::Found {
                        credential,
                        valid_until,
                    },
                    _ => Lookup::Missing,
                }
            }
        };
        let mut cache = self.cache.lock().unwrap();
        if cache.len() > 100_000 {
            let ttl = self.ttl;
            cache.retain(|_, (at, _)| at.elapsed() < ttl);
        }
        cache.insert(user.to_owned(), (Instant::now(), lookup.clone()));
        Ok(lookup)
    }

    fn pool(&self, node: &NodeAddr, dbname: &str) -> Result<deadpool_postgres::Pool, AuthQueryError> {
        let key = (node.clone(), dbname.to_owned());
        if let Some(p) = self.pools.lock().unwrap().get(&key) {
            return Ok(p);
        }
        let mut pg = tokio_postgres::Config::new();
        pg.host(&node.host)
            .port(node.port)
            .user(&self.user)
            .dbname(dbname)
            .application_name("pgferry auth_query")
            // A fixed search_path: nothing the client sent can redirect
            // the lookup to objects it controls.
            .options("-c search_path=pg_catalog,pg_temp")
            .connect_timeout(Duration::from_secs(5))
            .ssl_mode(self.ssl_mode);
        if let Some(p) = &self.password {
            pg.password(p);
        }
        let manager_config = deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        };
        let manager = match &self.tls {
            Some(tls) => deadpool_postgres::Manager::from_config(
                pg,
                tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone()),
                manager_config,
            ),
            None => deadpool_postgres::Manager::from_config(pg, tokio_postgres::NoTls, manager_config),
        };
        let timeouts = deadpool_postgres::Timeouts {
            wait: Some(Duration::from_secs(5)),
            create: Some(Duration::from_secs(5)),
            recycle: Some(Duration::from_secs(5)),
        };
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(4)
            .timeouts(timeouts)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| AuthQueryError::Pool(e.to_string()))?;
        self.pools.lock().unwrap().insert(key, pool.clone());
        Ok(pool)
    }
}

/// Control pools kept at most; the least recently used is dropped (with
/// its connections) to make room.
const MAX_CONTROL_POOLS: usize = 16;

/// A map of at most `cap` entries that drops the least recently used.
struct Recent<K, V> {
    cap: usize,
    tick: u64,
    map: HashMap<K, (V, u64)>,
}

impl<K: std::hash::Hash + Eq + Clone, V: Clone> Recent<K, V> {
    fn new(cap: usize) -> Self {
        Recent {
            cap: cap.max(1),
            tick: 0,
            map: HashMap::new(),
        }
    }

    fn get(&mut self, k: &K) -> Option<V> {
        self.tick += 1;
        let tick = self.tick;
        self.map.get_mut(k).map(|(v, used)| {
            *used = tick;
            v.clone()
        })
    }

    fn insert(&mut self, k: K, v: V) {
        self.tick += 1;
        if !self.map.contains_key(&k) && self.map.len() >= self.cap {
            let oldest = self
                .map
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                self.map.remove(&oldest);
            }
        }
        self.map.insert(k, (v, self.tick));
    }

    fn remove(&mut self, k: &K) {
        self.map.remove(k);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

/// A timestamp or timestamptz as PostgreSQL sends it in binary: i64
/// microseconds since 2000-01-01, where i64::MAX is 'infinity' and i64::MIN
/// '-infinity' (which the ordering above treats correctly).
struct PgTimestamp(i64);

impl<'a> tokio_postgres::types::FromSql<'a> for PgTimestamp {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let b: [u8; 8] = raw.try_into().map_err(|_| "timestamp is not 8 bytes")?;
        Ok(PgTimestamp(i64::from_be_bytes(b)))
    }
    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        matches!(
            *ty,
            tokio_postgres::types::Type::TIMESTAMPTZ | tokio_postgres::types::Type::TIMESTAMP
        )
    }
}

#[cfg(test)]
mod tests {
    use super::Recent;

    #[test]
    fn control_pools_are_bounded_least_recently_used_first() {
        let mut r = Recent::new(3);
        for db in ["a", "b", "c"] {
            r.insert(db.to_owned(), db.len());
        }
        assert_eq!(r.get(&"a".to_owned()), Some(1), "a is now the most recent");
        for i in 0..100 {
            r.insert(format!("made_up_{i}"), i);
            assert!(r.len() <= 3);
        }
        assert_eq!(r.len(), 3);
        assert_eq!(r.get(&"b".to_owned()), None);
        r.insert("x".to_owned(), 7);
        r.insert("x".to_owned(), 8);
        assert_eq!(r.get(&"x".to_owned()), Some(8), "replacing a key keeps one entry");
        r.remove(&"x".to_owned());
        assert_eq!(r.get(&"x".to_owned()), None);
    }
}
