//! pgferry's configuration: one TOML file.
//!
//! Every struct denies unknown keys, so a misspelt key is an error that
//! names it instead of a silently ignored setting. Setting names follow
//! PgBouncer's where PgBouncer has the same setting with the same meaning.
//! `deploy/pgferry.example.toml` documents every key and is parsed by a test.

#![forbid(unsafe_code)]

pub mod env;

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The longest duration a setting takes. Longer is a typo, and a deadline
/// computed from it (now + duration) must not overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Refuses a duration longer than [`MAX_DURATION`].
pub fn check_duration(d: Duration) -> Result<Duration, String> {
    if d > MAX_DURATION {
        return Err(format!("duration {d:?} is longer than the maximum (10 years)"));
    }
    Ok(d)
}

/// Durations in humantime form ("30s", "5min"), at most [`MAX_DURATION`].
mod duration {
    use serde::de::Error;
    use std::time::Duration;

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v: Duration = humantime_serde::deserialize(d)?;
        super::check_duration(v).map_err(D::Error::custom)
    }

    pub mod option {
        use serde::de::Error;
        use std::time::Duration;

        pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            let v: Option<Duration> = humantime_serde::option::deserialize(d)?;
            v.map(super::super::check_duration)
                .transpose()
                .map_err(D::Error::custom)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Parse(#[from] toml::de::Error),
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
    #[error("{path}: {source}")]
    Environment { path: PathBuf, source: env::ExpandError },
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub listen: Listen,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub runtime: Runtime,
    #[serde(default)]
    pub auth: Auth,
    #[serde(default)]
    pub pool: PoolDefaults,
    pub topology: Topology,
    #[serde(default)]
    pub tls: Tls,
    #[serde(default)]
    pub http: Http,
    /// Citus-aware routing; absent: none.
    #[serde(default)]
    pub citus: Option<Citus>,
    /// Ordered client-authentication rules, like pg_hba.conf; the first that
    /// matches decides. Empty: every client uses `auth.method`.
    #[serde(default, rename = "hba")]
    pub hba: Vec<HbaRule>,
    #[serde(default, rename = "database")]
    pub databases: Vec<DatabaseConfig>,
    #[serde(default, rename = "user")]
    pub users: Vec<UserConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Read-write listener: always the primary (Patroni leader).
    #[serde(default = "d_rw")]
    pub rw: SocketAddr,
    /// Read-only listener: the standbys. Without the key there is none.
    #[serde(default)]
    pub ro: Option<SocketAddr>,
    /// Listen backlog.
    #[serde(default = "d_backlog")]
    pub backlog: u32,
    /// Bind the listeners with SO_REUSEPORT, so that another pgferry can
    /// bind the same ports while this one runs (a rolling restart). Off, a
    /// port already in use is an error at start: two processes with
    /// different configurations must not silently split a port's clients.
    #[serde(default)]
    pub reuse_port: bool,
}

fn d_rw() -> SocketAddr {
    "0.0.0.0:5432".parse().unwrap()
}
fn d_backlog() -> u32 {
    4096
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            rw: d_rw(),
            ro: None,
            backlog: d_backlog(),
            reuse_port: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Most client connections at once; further ones get 53300.
    #[serde(default = "d_max_client_conn")]
    pub max_client_conn: usize,
    /// Time a client has to send its startup packet and finish authentication; 0 = no limit.
    #[serde(default = "d_login_timeout", with = "duration")]
    pub client_login_timeout: Duration,
    /// Close clients idle (between transactions) this long; 0 disables.
    #[serde(default, with = "duration")]
    pub client_idle_timeout: Duration,
    /// Close clients idle inside a transaction this long; 0 disables.
    #[serde(default, with = "duration")]
    pub idle_transaction_timeout: Duration,
    /// Largest message accepted from a client or server, in bytes.
    #[serde(default = "d_max_message_size")]
    pub max_message_size: usize,
    /// Connections that have not finished authenticating, at most; more get 53300.
    #[serde(default = "d_max_pending_logins")]
    pub max_pending_logins: usize,
    /// Of those, from one source address at most (more from it get 53300),
    /// so that silent sockets from one address cannot block every other
    /// login for client_login_timeout; 0 = no per-address cap. Raise it for
    /// many clients behind one address (NAT) that connect all at once.
    #[serde(default = "d_max_pending_logins_per_address")]
    pub max_pending_logins_per_address: usize,
    /// Failed logins of one user from one address within
    /// `auth_failure_window` after which each further failure of that pair
    /// is answered only after `auth_failure_delay`; 0 disables. Nothing is
    /// refused: a correct password logs in whatever others failed.
    #[serde(default = "d_auth_failure_limit")]
    pub auth_failure_limit: u32,
    #[serde(default = "d_auth_failure_window", with = "duration")]
    pub auth_failure_window: Duration,
    #[serde(default = "d_auth_failure_delay", with = "duration")]
    pub auth_failure_delay: Duration,
}

fn d_max_pending_logins() -> usize {
    1000
}
/// Half the login places: one address cannot take them all, and a burst of
/// connections from one application host (a driver's pool filling up)
/// still fits.
fn d_max_pending_logins_per_address() -> usize {
    500
}
fn d_auth_failure_limit() -> u32 {
    20
}
fn d_auth_failure_window() -> Duration {
    Duration::from_secs(60)
}
fn d_auth_failure_delay() -> Duration {
    Duration::from_secs(2)
}

fn d_max_client_conn() -> usize {
    10_000
}
fn d_login_timeout() -> Duration {
    Duration::from_secs(15)
}
fn d_max_message_size() -> usize {
    256 << 20
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_client_conn: d_max_client_conn(),
            client_login_timeout: d_login_timeout(),
            client_idle_timeout: Duration::ZERO,
            idle_transaction_timeout: Duration::ZERO,
            max_message_size: d_max_message_size(),
            max_pending_logins: d_max_pending_logins(),
            max_pending_logins_per_address: d_max_pending_logins_per_address(),
            auth_failure_limit: d_auth_failure_limit(),
            auth_failure_window: d_auth_failure_window(),
            auth_failure_delay: d_auth_failure_delay(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Runtime {
    /// Threads that serve clients; 0 = automatic (see `Runtime::threads`).
    #[serde(default)]
    pub worker_threads: usize,
    /// How those threads share the clients (see `Scheduler`).
    #[serde(default)]
    pub scheduler: Scheduler,
    /// On SIGTERM: how long clients in a transaction may take to finish
    /// before pgferry exits anyway (idle clients are closed at once).
    #[serde(default = "d_shutdown_timeout", with = "duration")]
    pub shutdown_timeout: Duration,
    /// The period of the averages (SHOW STATS, STATS_AVERAGES) and of the
    /// latency window (SHOW LATENCY shows the last one or two periods).
    #[serde(default = "d_stats_period", with = "duration")]
    pub stats_period: Duration,
    /// A plain-TCP client idle this long between transactions is parked:
    /// its socket waits in one epoll set shared by the event loop, without
    /// a task, buffers or reactor registration, and its session is rebuilt
    /// when it sends again (what it freed serves other sessions; see
    /// BENCHMARKS.md for what that does to RSS). 0 = never. TLS clients are
    /// never parked (rustls keeps its state in the stream).
    #[serde(default = "d_park_idle_after", with = "duration")]
    pub park_idle_after: Duration,
}

fn d_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}

fn d_stats_period() -> Duration {
    Duration::from_secs(60)
}

fn d_park_idle_after() -> Duration {
    Duration::from_secs(5)
}

/// How client sessions are spread over threads. With one thread both are
/// the same single event loop (tokio's current-thread scheduler).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduler {
    /// tokio's multi-thread scheduler: one runtime, tasks move between
    /// worker threads (work stealing).
    #[default]
    WorkStealing,
    /// One event loop per thread (tokio's current-thread scheduler on
    /// each), all accepting on the same listening sockets: a client's
    /// session stays on the thread that accepted it; server connections
    /// are shared and go preferably to sessions of the loop that opened
    /// them. Measured on 2 cores (BENCHMARKS.md, session 10) it cost more
    /// CPU per transaction than work stealing: sessions use other loops'
    /// server connections, and each such request crosses threads.
    ThreadPerCore,
}

impl Runtime {
    /// The number of client-serving threads: `worker_threads`, or when it
    /// is 0, [`auto_threads`] for this machine's cores.
    pub fn threads(&self) -> usize {
        match self.worker_threads {
            0 => auto_threads(std::thread::available_parallelism().map_or(1, |n| n.get())),
            n => n,
        }
    }
}

/// `worker_threads = 0` on a machine with `cores` cores: one event loop on
/// two cores or fewer, one thread per core above. On two cores the proxy
/// shares the machine with PostgreSQL or its clients, and one event loop
/// measured less CPU per transaction and per login than two threads, at
/// equal or higher throughput (BENCHMARKS.md, session 13).
pub fn auto_threads(cores: usize) -> usize {
    if cores <= 2 {
        1
    } else {
        cores
    }
}

impl Default for Runtime {
    fn default() -> Self {
        Runtime {
            worker_threads: 0,
            scheduler: Scheduler::default(),
            shutdown_timeout: d_shutdown_timeout(),
            stats_period: d_stats_period(),
            park_idle_after: d_park_idle_after(),
        }
    }
}

/// The default client-authentication method (`reject` is refused there).
pub type AuthMethod = HbaMethod;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    #[serde(default = "d_auth_method")]
    pub method: AuthMethod,
    /// PgBouncer-style userlist: `"user" "secret"` per line, where secret is a
    /// SCRAM verifier as stored in pg_authid.rolpassword, an md5 hash, or a
    /// plaintext password.
    pub users_file: Option<PathBuf>,
    /// Users allowed to run admin-console commands.
    #[serde(default)]
    pub admin_users: Vec<String>,
    /// Users allowed to read the admin console's SHOW commands.
    #[serde(default)]
    pub stats_users: Vec<String>,
    /// Role that runs `auth_query` for users missing from the users file.
    /// Its own credentials come from the users file or its [[user]] entry.
    pub auth_user: Option<String>,
    /// Looks up a user's secret on the server; `$1` is the user name, always
    /// sent as a bound parameter. Returns (name, secret, valid until).
    #[serde(default = "d_auth_query")]
    pub auth_query: String,
    /// Database auth_query runs in (default: the one the client asked for).
    pub auth_dbname: Option<String>,
    /// How long an auth_query answer (found or not) is reused.
    #[serde(default = "d_auth_cache_ttl", with = "duration")]
    pub auth_cache_ttl: Duration,
}

fn d_auth_query() -> String {
    "SELECT usename, passwd, valuntil FROM pg_shadow WHERE usename = $1".into()
}
fn d_auth_cache_ttl() -> Duration {
    Duration::from_secs(10)
}

fn d_auth_method() -> AuthMethod {
    AuthMethod::ScramSha256
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            method: d_auth_method(),
            users_file: None,
            admin_users: vec![],
            stats_users: vec![],
            auth_user: None,
            auth_query: d_auth_query(),
            auth_dbname: None,
            auth_cache_ttl: d_auth_cache_ttl(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    Transaction,
    Session,
}

impl PoolMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Transaction => "transaction",
            PoolMode::Session => "session",
        }
    }
}

/// What to do when a client in transaction mode creates state that lives
/// beyond its transaction (LISTEN, session advisory locks, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionStatePolicy {
    /// Keep the client on its server connection while the state exists.
    Pin,
    /// Refuse the statement with 0A000 before it runs.
    Error,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolDefaults {
    #[serde(default = "d_pool_mode")]
    pub pool_mode: PoolMode,
    /// Server connections per (database, user, node) pool.
    #[serde(default = "d_pool_size")]
    pub pool_size: usize,
    /// Connections kept open even when idle.
    #[serde(default)]
    pub min_pool_size: usize,
    /// Extra connections allowed once a client has waited reserve_pool_timeout.
    #[serde(default)]
    pub reserve_pool_size: usize,
    #[serde(default = "d_reserve_timeout", with = "duration")]
    pub reserve_pool_timeout: Duration,
    /// Cap on server connections per database across users; 0 = none.
    #[serde(default)]
    pub max_db_connections: usize,
    /// Cap on server connections per user across databases; 0 = none.
    #[serde(default)]
    pub max_user_connections: usize,
    /// A client waiting this long for a server connection gets an error; 0 = forever.
    #[serde(default = "d_query_wait_timeout", with = "duration")]
    pub query_wait_timeout: Duration,
    #[serde(default = "d_server_connect_timeout", with = "duration")]
    pub server_connect_timeout: Duration,
    /// Close server connections older than this once idle; 0 = never.
    #[serde(default = "d_server_lifetime", with = "duration")]
    pub server_lifetime: Duration,
    /// Close server connections idle this long (above min_pool_size); 0 = never.
    #[serde(default = "d_server_idle_timeout", with = "duration")]
    pub server_idle_timeout: Duration,
    /// Run when a session-mode client leaves, before the connection is reused.
    #[serde(default = "d_reset_query")]
    pub server_reset_query: String,
    /// Size of each server connection's prepared-statement cache; 0 disables
    /// prepared-statement support in transaction mode.
    #[serde(default = "d_max_prepared")]
    pub max_prepared_statements: usize,
    #[serde(default = "d_session_state")]
    pub session_state: SessionStatePolicy,
    /// Allow databases not listed in [[database]], with these defaults.
    #[serde(default = "d_true")]
    pub auto_database: bool,
    /// A pool of an unlisted database (auto_database) with no client and no
    /// connection in use for this long is freed (PgBouncer's name); 0 = never.
    #[serde(default = "d_autodb_idle_timeout", with = "duration")]
    pub autodb_idle_timeout: Duration,
    /// Pools of unlisted databases at once, at most: at the cap, unused
    /// ones are freed first, else the login gets 53300.
    #[serde(default = "d_max_auto_pools")]
    pub max_auto_pools: usize,
    /// On the read-only port, use the primary when no standby is available.
    #[serde(default = "d_true")]
    pub ro_fallback_to_primary: bool,
}

fn d_pool_mode() -> PoolMode {
    PoolMode::Transaction
}
fn d_pool_size() -> usize {
    20
}
fn d_reserve_timeout() -> Duration {
    Duration::from_secs(5)
}
fn d_query_wait_timeout() -> Duration {
    Duration::from_secs(120)
}
fn d_server_connect_timeout() -> Duration {
    Duration::from_secs(15)
}
fn d_server_lifetime() -> Duration {
    Duration::from_secs(3600)
}
fn d_server_idle_timeout() -> Duration {
    Duration::from_secs(600)
}
fn d_reset_query() -> String {
    "DISCARD ALL".into()
}
fn d_max_prepared() -> usize {
    200
}
fn d_session_state() -> SessionStatePolicy {
    SessionStatePolicy::Pin
}
fn d_autodb_idle_timeout() -> Duration {
    Duration::from_secs(3600)
}
fn d_max_auto_pools() -> usize {
    1000
}
fn d_true() -> bool {
    true
}

impl Default for PoolDefaults {
    fn default() -> Self {
        toml::from_str("").expect("defaults parse")
    }
}

/// Where the servers are.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "source", rename_all = "lowercase", deny_unknown_fields)]
pub enum Topology {
    /// A fixed primary and standbys, for users without Patroni.
    Static {
        primary: String,
        #[serde(default)]
        standbys: Vec<String>,
    },
    /// Patroni's keys in etcd (v3 API), followed through a watch.
    Etcd(Box<EtcdTopology>),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTopology {
    /// etcd v3 endpoints, "host:port" (or "https://host:port" with TLS).
    pub endpoints: Vec<String>,
    /// Patroni's `namespace` (default "/service/") and `scope`.
    #[serde(default = "d_namespace")]
    pub namespace: String,
    pub scope: String,
    /// Patroni's Citus layout: `/<namespace>/<scope>/<group>/...`; 5432
    /// follows group 0 (the coordinator), worker groups are tracked.
    #[serde(default)]
    pub citus: bool,
    /// etcd authentication.
    pub etcd_user: Option<String>,
    pub etcd_password: Option<String>,
    /// The password read from a file instead (Docker/Swarm secrets).
    #[serde(default)]
    pub etcd_password_file: Option<PathBuf>,
    /// CA bundle for https:// endpoints.
    pub etcd_ca_file: Option<PathBuf>,
    /// Role and password for pgferry's control connections (the
    /// pg_is_in_recovery() check that confirms a new leader before writes go
    /// there). Needs only LOGIN and CONNECT on `check_dbname`.
    pub check_user: String,
    pub check_password: Option<String>,
    #[serde(default)]
    pub check_password_file: Option<PathBuf>,
    #[serde(default = "d_check_dbname")]
    pub check_dbname: String,
    /// New transactions on the read-write port wait this long for a
    /// confirmed leader during a failover, then fail with 57P03.
    #[serde(default = "d_failover_hold_timeout", with = "duration")]
    pub failover_hold_timeout: Duration,
    /// With etcd unreachable, the last confirmed leader is kept this long,
    /// then writes stop (a minority partition must not keep writing).
    /// Default: Patroni's `ttl` from its `config` key (30 s if absent).
    #[serde(default, with = "duration::option")]
    pub etcd_grace: Option<Duration>,
    /// Replicas further behind the leader than this many bytes of WAL get
    /// no new read-only sessions.
    #[serde(default = "d_max_replica_lag")]
    pub max_replica_lag: u64,
}

/// `[citus]`: shard-aware routing on the read-write port.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Citus {
    /// "shard" (default): single-shard transactions go to the owning group's
    /// leader; "off": everything goes to the coordinator.
    #[serde(default)]
    pub routing: CitusRouting,
    /// The server database that holds the Citus extension (Citus metadata
    /// is per database); sessions on other databases are not routed.
    pub database: String,
    /// Role and password of the control connection that reads the Citus
    /// metadata from the coordinator (needs only LOGIN and CONNECT: the
    /// pg_dist_* catalogs are readable by any role).
    pub user: String,
    pub password: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// How often the metadata fingerprint is checked (a cheap query); the
    /// whole snapshot is reloaded only when it changed.
    #[serde(default = "d_citus_refresh", with = "duration")]
    pub refresh_interval: Duration,
    /// Multi-shard reads are balanced across metadata-synced primaries
    /// (coordinator and workers: "query from any node").
    #[serde(default)]
    pub any_node: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CitusRouting {
    Off,
    #[default]
    Shard,
}

fn d_citus_refresh() -> Duration {
    Duration::from_secs(2)
}

fn d_namespace() -> String {
    "/service/".into()
}
fn d_check_dbname() -> String {
    "postgres".into()
}
fn d_failover_hold_timeout() -> Duration {
    Duration::from_secs(30)
}
fn d_max_replica_lag() -> u64 {
    16 << 20
}

/// Per-database overrides.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Name clients connect to.
    pub name: String,
    /// Database name on the server (default: `name`).
    pub dbname: Option<String>,
    pub pool_mode: Option<PoolMode>,
    pub pool_size: Option<usize>,
    pub min_pool_size: Option<usize>,
    pub reserve_pool_size: Option<usize>,
    pub max_db_connections: Option<usize>,
}

/// Per-user overrides and server credentials.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    pub pool_mode: Option<PoolMode>,
    pub pool_size: Option<usize>,
    pub max_user_connections: Option<usize>,
    /// Role used to log in to PostgreSQL (default: the client's user).
    pub server_user: Option<String>,
    /// Password for server logins (default: the users_file entry, if it is plaintext).
    pub server_password: Option<String>,
    /// The server password read from a file instead (Docker/Swarm secrets).
    #[serde(default)]
    pub server_password_file: Option<PathBuf>,
    /// Client connections of this user at once, at most; more get 53300.
    pub max_client_connections: Option<usize>,
    #[serde(default)]
    pub access: Access,
}

/// Where a user may connect and what it may do there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    #[default]
    ReadWrite,
    /// Only the read-only port; the read-write port refuses the login.
    ReadOnlyPort,
    /// Both ports, and sessions on either are read-only: server
    /// connections log in with default_transaction_read_only = on, and
    /// statements that would turn it off are refused. PostgreSQL grants
    /// remain the real boundary.
    ReadOnly,
}

/// The HTTP listener: /metrics (Prometheus), /health, /ready and a status page.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http {
    #[serde(default = "d_true")]
    pub enabled: bool,
    #[serde(default = "d_http_listen")]
    pub listen: SocketAddr,
}

/// Loopback: the status page and /metrics show users, client addresses,
/// backend pids and console commands, without authentication. Exposing
/// them is a choice the configuration makes explicitly.
fn d_http_listen() -> SocketAddr {
    "127.0.0.1:8404".parse().unwrap()
}

impl Default for Http {
    fn default() -> Self {
        Http {
            enabled: true,
            listen: d_http_listen(),
        }
    }
}

/// TLS for clients (termination) and for server connections.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// disable | allow | require. Default: allow when a certificate is set.
    pub client_tls: Option<ClientTls>,
    /// PEM certificate chain and private key presented to clients; re-read on SIGHUP.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// CA bundle for client certificates; setting it turns on mTLS.
    pub client_ca_file: Option<PathBuf>,
    /// With client_ca_file: whether a client must present a certificate.
    #[serde(default = "d_client_cert")]
    pub client_cert: ClientCert,
    /// Lowest TLS version accepted from clients: "1.2" or "1.3".
    #[serde(default = "d_min_version")]
    pub min_version: String,
    /// TLS to PostgreSQL, with libpq's sslmode meanings.
    #[serde(default = "d_server_tls")]
    pub server_tls: ServerTls,
    /// CA bundle for verify-ca / verify-full.
    pub server_ca_file: Option<PathBuf>,
    /// Client certificate presented to PostgreSQL, if it asks for one.
    pub server_cert_file: Option<PathBuf>,
    pub server_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientTls {
    Disable,
    Allow,
    Require,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientCert {
    Optional,
    Require,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerTls {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

fn d_client_cert() -> ClientCert {
    ClientCert::Require
}
fn d_min_version() -> String {
    "1.2".into()
}
fn d_server_tls() -> ServerTls {
    ServerTls::Prefer
}

impl Default for Tls {
    fn default() -> Self {
        toml::from_str("").expect("defaults parse")
    }
}

impl Tls {
    pub fn client_tls(&self) -> ClientTls {
        self.client_tls.unwrap_or(if self.cert_file.is_some() {
            ClientTls::Allow
        } else {
            ClientTls::Disable
        })
    }
}

/// One client-authentication rule.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HbaRule {
    /// host (any connection) | hostssl (TLS only) | hostnossl (plaintext only).
    #[serde(default = "d_hba_type", rename = "type")]
    pub conn_type: HbaType,
    /// "all" or a CIDR such as "10.0.0.0/8" or "::1/128".
    #[serde(default = "d_all")]
    pub address: String,
    /// "all" or database names.
    #[serde(default = "d_all_list")]
    pub database: Vec<String>,
    /// "all" or user names.
    #[serde(default = "d_all_list")]
    pub user: Vec<String>,
    pub method: HbaMethod,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HbaType {
    Host,
    Hostssl,
    Hostnossl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum HbaMethod {
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "trust")]
    Trust,
    #[serde(rename = "reject")]
    Reject,
}

fn d_hba_type() -> HbaType {
    HbaType::Host
}
fn d_all() -> String {
    "all".into()
}
fn d_all_list() -> Vec<String> {
    vec!["all".into()]
}

/// An address range: "all", or base address and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cidr {
    All,
    Net(std::net::IpAddr, u8),
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        if s == "all" {
            return Some(Cidr::All);
        }
        let (a, len) = match s.split_once('/') {
            Some((a, l)) => (a.parse::<std::net::IpAddr>().ok()?, Some(l.parse::<u8>().ok()?)),
            None => (s.parse().ok()?, None),
        };
        let max = if a.is_ipv4() { 32 } else { 128 };
        let len = len.unwrap_or(max);
        (len <= max).then_some(Cidr::Net(a, len))
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (*self, ip) {
            (Cidr::All, _) => true,
            (Cidr::Net(IpAddr::V4(n), len), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - len as u32).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (Cidr::Net(IpAddr::V6(n), len), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - len as u32).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl HbaRule {
    /// Whether this rule applies to a client.
    pub fn matches(&self, ip: std::net::IpAddr, tls: bool, database: &str, user: &str) -> bool {
        let conn = match self.conn_type {
            HbaType::Host => true,
            HbaType::Hostssl => tls,
            HbaType::Hostnossl => !tls,
        };
        let names = |list: &[String], name: &str| list.iter().any(|n| n == "all" || n == name);
        conn && Cidr::parse(&self.address).is_some_and(|c| c.contains(ip))
            && names(&self.database, database)
            && names(&self.user, user)
    }
}

impl Config {
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let mut c: Config = toml::from_str(text)?;
        c.validate().map_err(ConfigError::Invalid)?;
        c.read_secret_files()?;
        Ok(c)
    }

    /// Fills each password given as `*_file` from its file (a Docker or
    /// Swarm secret, a mounted Kubernetes secret): the content up to a
    /// trailing line break. Setting both a password and its file is an
    /// error, as is a file that cannot be read.
    fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        fn fill(what: &str, value: &mut Option<String>, file: &Option<PathBuf>) -> Result<(), ConfigError> {
            let Some(path) = file else { return Ok(()) };
            if value.is_some() {
                return Err(ConfigError::Invalid(vec![format!(
                    "{what} and {what}_file are both set"
                )]));
            }
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            *value = Some(text.trim_end_matches(['\n', '\r']).to_owned());
            Ok(())
        }
        if let Topology::Etcd(e) = &mut self.topology {
            fill("topology.etcd_password", &mut e.etcd_password, &e.etcd_password_file)?;
            fill("topology.check_password", &mut e.check_password, &e.check_password_file)?;
        }
        if let Some(c) = &mut self.citus {
            fill("citus.password", &mut c.password, &c.password_file)?;
        }
        for u in &mut self.users {
            let what = format!("user \"{}\" server_password", u.name);
            fill(&what, &mut u.server_password, &u.server_password_file)?;
        }
        Ok(())
    }

    /// Reads, fills `${NAME}` references from the environment (see
    /// [`env::expand`]), parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let text = env::expand(&text, |name| std::env::var(name).ok()).map_err(|source| ConfigError::Environment {
            path: path.into(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// Checks what serde cannot: ranges and cross-field rules.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errs = Vec::new();
        if self.limits.max_client_conn == 0 {
            errs.push("limits.max_client_conn must be at least 1".into());
        }
        if self.limits.max_message_size < 1024 {
            errs.push("limits.max_message_size must be at least 1024 bytes".into());
        }
        if self.pool.pool_size == 0 {
            errs.push("pool.pool_size must be at least 1".into());
        }
        if self.pool.min_pool_size > self.pool.pool_size {
            errs.push("pool.min_pool_size cannot exceed pool.pool_size".into());
        }
        if self.auth.method == AuthMethod::Reject {
            errs.push("auth.method cannot be \"reject\" (use an [[hba]] rule)".into());
        }
        if self.auth.method != AuthMethod::Trust && self.auth.users_file.is_none() && self.auth.auth_user.is_none() {
            errs.push("auth.users_file or auth.auth_user is required unless auth.method = \"trust\"".into());
        }
        if Some(self.listen.rw) == self.listen.ro {
            errs.push("listen.rw and listen.ro must differ".into());
        }
        match &self.topology {
            Topology::Static { primary, standbys } => {
                for a in std::iter::once(primary).chain(standbys) {
                    if split_host_port(a).is_none() {
                        errs.push(format!("topology: {a:?} is not host:port"));
                    }
                }
            }
            Topology::Etcd(e) => {
                if e.endpoints.is_empty() {
                    errs.push("topology.endpoints: at least one etcd endpoint".into());
                }
                if e.scope.is_empty() || e.scope.contains('/') {
                    errs.push("topology.scope must be Patroni's scope (no '/')".into());
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for d in &self.databases {
            if !seen.insert(&d.name) {
                errs.push(format!("database {:?} is listed twice", d.name));
            }
            if d.pool_size == Some(0) {
                errs.push(format!("database {:?}: pool_size must be at least 1", d.name));
            }
        }
        for (i, r) in self.hba.iter().enumerate() {
            if Cidr::parse(&r.address).is_none() {
                errs.push(format!(
                    "hba rule {}: address {:?} is not \"all\" or a CIDR",
                    i + 1,
                    r.address
                ));
            }
        }
        let t = &self.tls;
        if t.cert_file.is_some() != t.key_file.is_some() {
            errs.push("tls.cert_file and tls.key_file go together".into());
        }
        if t.client_tls() != ClientTls::Disable && t.cert_file.is_none() {
            errs.push("tls.client_tls needs tls.cert_file and tls.key_file".into());
        }
        if !matches!(t.min_version.as_str(), "1.2" | "1.3") {
            errs.push(format!(
                "tls.min_version must be \"1.2\" or \"1.3\", not {:?}",
                t.min_version
            ));
        }
        if matches!(t.server_tls, ServerTls::VerifyCa | ServerTls::VerifyFull) && t.server_ca_file.is_none() {
            errs.push("tls.server_tls = verify-ca / verify-full needs tls.server_ca_file".into());
        }
        if t.server_cert_file.is_some() != t.server_key_file.is_some() {
            errs.push("tls.server_cert_file and tls.server_key_file go together".into());
        }
        if self.auth.auth_user.is_some() && !self.auth.auth_query.contains("$1") {
            errs.push("auth.auth_query must take the user name as $1".into());
        }
        let mut seen = std::collections::HashSet::new();
        for u in &self.users {
            if !seen.insert(&u.name) {
                errs.push(format!("user {:?} is listed twice", u.name));
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs)
        }
    }

    pub fn database(&self, name: &str) -> Option<&DatabaseConfig> {
        self.databases.iter().find(|d| d.name == name)
    }

    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }

    /// Effective settings of the pool for (database, user).
    pub fn pool_settings(&self, database: &str, user: &str) -> PoolSettings {
        let d = self.database(database);
        let u = self.user(user);
        let p = &self.pool;
        PoolSettings {
            pool_mode: u
                .and_then(|u| u.pool_mode)
                .or(d.and_then(|d| d.pool_mode))
                .unwrap_or(p.pool_mode),
            pool_size: u
                .and_then(|u| u.pool_size)
                .or(d.and_then(|d| d.pool_size))
                .unwrap_or(p.pool_size),
            min_pool_size: d.and_then(|d| d.min_pool_size).unwrap_or(p.min_pool_size),
            reserve_pool_size: d.and_then(|d| d.reserve_pool_size).unwrap_or(p.reserve_pool_size),
            reserve_pool_timeout: p.reserve_pool_timeout,
            max_db_connections: d.and_then(|d| d.max_db_connections).unwrap_or(p.max_db_connections),
            max_user_connections: u.and_then(|u| u.max_user_connections).unwrap_or(p.max_user_connections),
            query_wait_timeout: p.query_wait_timeout,
            server_connect_timeout: p.server_connect_timeout,
            server_lifetime: p.server_lifetime,
            server_idle_timeout: p.server_idle_timeout,
            server_reset_query: p.server_reset_query.clone(),
            max_prepared_statements: p.max_prepared_statements,
            server_dbname: d.and_then(|d| d.dbname.clone()).unwrap_or_else(|| database.to_owned()),
            server_user: u.and_then(|u| u.server_user.clone()).unwrap_or_else(|| user.to_owned()),
            stats_period: self.runtime.stats_period,
            read_only: u.is_some_and(|u| u.access == Access::ReadOnly),
        }
    }
}

/// The settings one pool runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    pub pool_mode: PoolMode,
    pub pool_size: usize,
    pub min_pool_size: usize,
    pub reserve_pool_size: usize,
    pub reserve_pool_timeout: Duration,
    pub max_db_connections: usize,
    pub max_user_connections: usize,
    pub query_wait_timeout: Duration,
    pub server_connect_timeout: Duration,
    pub server_lifetime: Duration,
    pub server_idle_timeout: Duration,
    pub server_reset_query: String,
    pub max_prepared_statements: usize,
    pub server_dbname: String,
    pub server_user: String,
    pub stats_period: Duration,
    /// The user's access is read-only: server connections log in with
    /// default_transaction_read_only = on, whichever port and node.
    pub read_only: bool,
}

/// Splits `host:port`, `[v6]:port` or a bare host (port 5432).
pub fn split_host_port(s: &str) -> Option<(String, u16)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, port) = rest.split_once(']')?;
        let port = match port.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if port.is_empty() => 5432,
            None => return None,
        };
        return Some((host.to_owned(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !h.contains(':') => Some((h.to_owned(), p.parse().ok()?)),
        None if !s.is_empty() => Some((s.to_owned(), 5432)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "[topology]\nsource = \"static\"\nprimary = \"127.0.0.1:5432\"\n[auth]\nmethod = \"trust\"\n";

    #[test]
    fn passwords_can_come_from_files() {
        let dir = std::env::temp_dir().join(format!("pgferry-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (server, citus) = (dir.join("server"), dir.join("citus"));
        std::fs::write(&server, "s3cret\n").unwrap();
        std::fs::write(&citus, "c1tus").unwrap();
        let text = format!(
            "[topology]\nsource = \"static\"\nprimary = \"127.0.0.1:5432\"\n[auth]\nmethod = \"trust\"\n\
             [[user]]\nname = \"app\"\nserver_password_file = {server:?}\n\
             [citus]\ndatabase = \"app\"\nuser = \"app\"\npassword_file = {citus:?}\n"
        );
        let c = Config::from_toml(&text).unwrap();
        assert_eq!(
            c.user("app").unwrap().server_password.as_deref(),
            Some("s3cret"),
            "trailing newline dropped"
        );
        assert_eq!(c.citus.as_ref().unwrap().password.as_deref(), Some("c1tus"));
        // Both at once: refused.
        let both = text.replace("name = \"app\"\n", "name = \"app\"\nserver_password = \"x\"\n");
        let e = Config::from_toml(&both).unwrap_err().to_string();
        assert!(e.contains("server_password_file are both set"), "{e}");
        // A file that cannot be read: refused, naming it.
        std::fs::remove_file(&citus).unwrap();
        let e = Config::from_toml(&text).unwrap_err().to_string();
        assert!(e.contains("cannot read") && e.contains("citus"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_toml(MIN).unwrap();
        assert_eq!(c.pool.pool_size, 20);
        assert_eq!(c.pool.pool_mode, PoolMode::Transaction);
        assert_eq!(c.listen.rw.port(), 5432);
        assert_eq!(c.listen.ro, None, "no read-only listener unless listen.ro is set");
        assert!(!c.listen.reuse_port, "port sharing is opt-in");
        assert_eq!(c.pool.query_wait_timeout, Duration::from_secs(120));
    }

    #[test]
    fn http_listens_on_loopback_by_default() {
        let c = Config::from_toml(MIN).unwrap();
        assert!(c.http.listen.ip().is_loopback(), "{}", c.http.listen);
        assert_eq!(c.http.listen.port(), 8404);
    }

    #[test]
    fn durations_beyond_ten_years_are_refused() {
        let err = Config::from_toml(&format!("{MIN}[limits]\nclient_idle_timeout = \"400000days\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("client_idle_timeout") && err.contains("maximum"), "{err}");
        let c = Config::from_toml(&format!("{MIN}[limits]\nclient_idle_timeout = \"3650days\"\n")).unwrap();
        assert_eq!(c.limits.client_idle_timeout, Duration::from_secs(3650 * 86400));
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml(&format!("{MIN}[pool]\npool_sise = 3\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("pool_sise"), "{err}");
    }

    #[test]
    fn invalid_values_are_listed() {
        let err = Config::from_toml(&format!("{MIN}[pool]\npool_size = 0\nmin_pool_size = 2\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pool_size must be at least 1") && err.contains("min_pool_size"),
            "{err}"
        );
    }

    #[test]
    fn overrides_apply() {
        let c = Config::from_toml(&format!(
            "{MIN}[[database]]\nname = \"app\"\npool_size = 5\ndbname = \"real\"\n[[user]]\nname = \"bob\"\npool_mode = \"session\"\n"
        ))
        .unwrap();
        let s = c.pool_settings("app", "bob");
        assert_eq!(
            (s.pool_size, s.pool_mode, s.server_dbname.as_str()),
            (5, PoolMode::Session, "real")
        );
        assert_eq!(c.pool_settings("other", "amy").pool_size, 20);
    }

    #[test]
    fn example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/pgferry.example.toml");
        let c = Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            !c.databases.is_empty() && !c.users.is_empty(),
            "the example shows every section"
        );
    }

    #[test]
    fn cidr_matching() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.0.9".parse().unwrap()), "v4-mapped v6");
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("1.2.3.4".parse().unwrap()));
        assert!(Cidr::parse("::1").unwrap().contains("::1".parse().unwrap()));
        assert!(!Cidr::parse("::1").unwrap().contains("127.0.0.1".parse().unwrap()));
        assert_eq!(Cidr::parse("10.0.0.0/33"), None);
        assert_eq!(Cidr::parse("nonsense"), None);
    }

    #[test]
    fn hba_rules_match_in_order() {
        let c = Config::from_toml(&format!(
            "{MIN}[[hba]]\ntype = \"hostnossl\"\nmethod = \"reject\"\n[[hba]]\naddress = \"127.0.0.0/8\"\nuser = [\"bob\"]\nmethod = \"trust\"\n"
        ))
        .unwrap();
        let ip = "127.0.0.1".parse().unwrap();
        let first = |tls, user| c.hba.iter().find(|r| r.matches(ip, tls, "db", user)).map(|r| r.method);
        assert_eq!(first(false, "bob"), Some(HbaMethod::Reject));
        assert_eq!(first(true, "bob"), Some(HbaMethod::Trust));
        assert_eq!(first(true, "amy"), None);
        let bad = Config::from_toml(&format!(
            "{MIN}[[hba]]\naddress = \"10.0.0.0/40\"\nmethod = \"trust\"\n"
        ));
        assert!(bad.unwrap_err().to_string().contains("hba rule 1"));
    }

    #[test]
    fn tls_needs_a_certificate() {
        let err = Config::from_toml(&format!("{MIN}[tls]\nclient_tls = \"require\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("client_tls needs"), "{err}");
        let c = Config::from_toml(&format!("{MIN}[tls]\ncert_file = \"a\"\nkey_file = \"b\"\n")).unwrap();
        assert_eq!(c.tls.client_tls(), ClientTls::Allow);
        assert_eq!(Config::from_toml(MIN).unwrap().tls.client_tls(), ClientTls::Disable);
    }

    #[test]
    fn host_port() {
        assert_eq!(split_host_port("db:6432"), Some(("db".into(), 6432)));
        assert_eq!(split_host_port("[::1]:7"), Some(("::1".into(), 7)));
        assert_eq!(split_host_port("db"), Some(("db".into(), 5432)));
        assert_eq!(split_host_port("a:b:c"), None);
    }

    #[test]
    fn automatic_threads_are_one_event_loop_on_two_cores_or_fewer() {
        assert_eq!([1, 2, 3, 4, 16].map(auto_threads), [1, 1, 3, 4, 16]);
        let r = Runtime::default();
        assert_eq!(r.worker_threads, 0);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(r.threads(), auto_threads(cores));
        let two = Runtime {
            worker_threads: 2,
            ..Runtime::default()
        };
        assert_eq!(two.threads(), 2, "a set worker_threads is kept");
    }
}
