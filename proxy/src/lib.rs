//! pgferry: a PostgreSQL wire-protocol proxy and transaction pooler.
//!
//! `run` starts the listeners over a [`Shared`] state (split into narrow
//! handles, see [`shared`]); each accepted client runs in its own task
//! through `client::serve`: handshake, authentication, login, then the
//! [`session`] state machine.

#![deny(unsafe_code)]

mod admin;
mod auth;
mod authquery;
mod client;
mod clientio;
mod clients;
mod error;
mod handshake;
mod http;
mod listener;
pub mod memory;
pub mod params;
mod park;
mod pending;
mod reload;
mod session;
pub mod shared;
mod throttle;
pub mod userlist;

pub use error::ClientError;
pub use shared::Shared;

use pgferry_config::Config;
use pgferry_routing::{Role, Router, Topology};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio::sync::{watch, Semaphore};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Users(#[from] userlist::UserlistError),
    #[error("topology: {0}")]
    Routing(#[from] pgferry_routing::RoutingError),
    #[error("TLS: {0}")]
    Tls(#[from] pgferry_tls::TlsError),
    #[error("cannot listen on {addr}: {source}{}", in_use_hint(source))]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start event loop {id}: {source}")]
    EventLoop { id: u16, source: std::io::Error },
}

/// Says why a port may be in use, and what shares one on purpose.
fn in_use_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            " (another process listens there; to share the port on purpose, as in a rolling restart, set [listen] reuse_port = true in both)"
        }
        _ => "",
    }
}

/// Accepts clients on `listeners` from the current event loop until
/// shutdown (the sessions run on this loop too).
async fn accept_on(
    listeners: Vec<(std::net::TcpListener, Role)>,
    shared: &Arc<Shared>,
    slots: &Arc<Semaphore>,
    shutdown: &watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut tasks = Vec::new();
    for (l, role) in listeners {
        let l = tokio::net::TcpListener::from_std(l)?;
        tasks.push(tokio::spawn(listener::accept_loop(
            l,
            role,
            shared.clone(),
            slots.clone(),
            shutdown.clone(),
        )));
    }
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

/// One more event loop (thread per core): accepts on its own sockets of the
/// listening groups (`listener::bind_group`); the sessions it accepts run
/// here to their end.
fn event_loop(
    id: u16,
    listeners: Vec<(std::net::TcpListener, Role)>,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
    done: tokio::sync::oneshot::Sender<()>,
) {
    pgferry_pool::affinity::set_current(id);
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(event_loop = id, error = %e, "event loop not started");
            return;
        }
    };
    rt.block_on(async move {
        if let Err(e) = accept_on(listeners, &shared, &slots, &shutdown).await {
            tracing::error!(event_loop = id, error = %e, "listener not registered");
        }
        let _ = done.send(());
        // The sessions accepted here, and the server sockets this loop's
        // reactor watches (other loops' sessions may hold some), need the
        // loop until the process exits: the main loop decides when.
        std::future::pending::<()>().await
    });
}

/// Loads what the configuration points at (the users file).
pub fn load_userlist(config: &Config) -> Result<userlist::Userlist, StartError> {
    Ok(match &config.auth.users_file {
        Some(p) => userlist::Userlist::load(p)?,
        None => userlist::Userlist::default(),
    })
}

/// Runs the proxy until `shutdown` turns true (or the console's SHUTDOWN).
/// `config_path` is what RELOAD and SIGHUP re-read.
pub async fn run(
    config: Config,
    config_path: Option<std::path::PathBuf>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), StartError> {
    let config = Arc::new(config);
    let users = load_userlist(&config)?;
    let (mut router, publisher) = Router::new(Topology::from_config(&config)?, config.pool.ro_fallback_to_primary);
    let tls = Arc::new(pgferry_tls::Acceptor::new(&config.tls)?);
    let server_tls = Arc::new(pgferry_tls::Connector::new(&config.tls)?);
    let login = |user: &str, password: &Option<String>, dbname: &str| pgferry_routing::confirm::CheckLogin {
        user: user.to_owned(),
        password: password.clone(),
        dbname: dbname.to_owned(),
        tls: server_tls.client_config(),
        ssl_mode: match config.tls.server_tls {
            pgferry_config::ServerTls::Disable => tokio_postgres::config::SslMode::Disable,
            pgferry_config::ServerTls::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        },
    };
    let citus = config.citus.as_ref().map(|c| {
        let citus = pgferry_routing::citus::Citus::new(
            c.database.clone(),
            c.routing == pgferry_config::CitusRouting::Shard,
            c.any_node,
        );
        router.set_citus(citus.clone());
        (citus, login(&c.user, &c.password, &c.database), c.refresh_interval)
    });
    if let pgferry_config::Topology::Etcd(etcd) = &config.topology {
        let check = login(&etcd.check_user, &etcd.check_password, &etcd.check_dbname);
        tracing::info!(endpoints = ?etcd.endpoints, scope = %etcd.scope, citus = etcd.citus, "topology: following Patroni through etcd");
        tokio::spawn(pgferry_routing::etcd::run((**etcd).clone(), check, publisher));
    } else {
        // The static topology never changes: nothing publishes.
        drop(publisher);
    }
    let shared = Arc::new(Shared::new(config.clone(), config_path, users, router, tls, server_tls));
    if let Some((citus, login, interval)) = citus {
        tracing::info!(database = %citus.database, routing = citus.enabled, "citus: reading metadata from the coordinator");
        let (pools, obs) = (Arc::downgrade(&shared.pools), Arc::downgrade(&shared.obs));
        let router = shared.router.clone();
        tokio::spawn(pgferry_routing::citus::refresh::run(
            citus,
            shared.router.clone(),
            login,
            interval,
            move || {
                // Worker primaries changed: pools on nodes that left are
                // retired, sessions re-check their routes.
                if let (Some(pools), Some(obs)) = (pools.upgrade(), obs.upgrade()) {
                    router.touch();
                    pools.apply_topology(&router, &obs);
                }
            },
        ));
    }
    // One stop signal for the listeners: the caller's (SIGTERM) or SHUTDOWN.
    let stop = shared.lifecycle.stop_tx.subscribe();
    {
        let lifecycle = shared.lifecycle.clone();
        tokio::spawn(async move {
            if shutdown.wait_for(|s| *s).await.is_ok() {
                lifecycle.stop_tx.send_replace(true);
            }
        });
    }
    let shutdown = stop;
    tokio::spawn(follow_topology(
        shared.router.clone(),
        shared.pools.clone(),
        shared.obs.clone(),
    ));
    if config.http.enabled {
        // The status endpoints matter less than the proxy: a port that
        // cannot be bound is logged, not fatal.
        match listener::bind(config.http.listen, 128, config.listen.reuse_port) {
            Ok(l) => {
                tracing::info!(addr = %config.http.listen, "HTTP: /metrics /health /ready /");
                let view = http::View {
                    obs: shared.obs.clone(),
                    pools: shared.pools.clone(),
                    router: shared.router.clone(),
                    clients: shared.clients.clone(),
                    tls: shared.tls.clone(),
                    lifecycle: shared.lifecycle.clone(),
                };
                // With reuse_port (a rolling restart: the next pgferry
                // binds beside this one) the endpoints serve through the
                // drain to the process's end: /health stays up, /ready
                // turns 503, /metrics shows the clients leaving. Without
                // it the port is given up at SIGTERM, as the client ports
                // are, so that a successor can bind it.
                let (keep, never) = watch::channel(false);
                let stop = if config.listen.reuse_port {
                    never
                } else {
                    shutdown.clone()
                };
                tokio::spawn(async move {
                    let _keep = keep;
                    http::serve(l, Arc::new(view), stop).await
                });
            }
            Err(e) => tracing::error!(addr = %config.http.listen, error = %e, "HTTP listener not started"),
        }
    }
    tokio::spawn(reload_on_sighup(shared.clone()));
    tokio::spawn(park::sweep(shared.clone()));
    tokio::spawn(sweep_auto_pools(shared.pools.clone()));
    tokio::spawn(report_cancels(shared.obs.clone(), shared.settings.clone()));
    let slots = Arc::new(Semaphore::new(config.limits.max_client_conn));
    let mut listeners = vec![(config.listen.rw, Role::ReadWrite)];
    if let Some(ro) = config.listen.ro {
        listeners.push((ro, Role::ReadOnly));
    }
    // Thread per core: every other event loop gets its own thread and its
    // own listening sockets; this thread is loop 0.
    let loops = match config.runtime.scheduler {
        pgferry_config::Scheduler::ThreadPerCore => config.runtime.threads().clamp(1, u16::MAX as usize) as u16,
        pgferry_config::Scheduler::WorkStealing => 1,
    };
    let mut bound = Vec::new();
    let mut per_loop: Vec<Vec<(std::net::TcpListener, Role)>> = (1..loops).map(|_| Vec::new()).collect();
    for (addr, role) in listeners {
        let group = listener::bind_group(addr, config.listen.backlog, config.listen.reuse_port, loops as usize)
            .map_err(|source| StartError::Listen { addr, source })?;
        tracing::info!(%addr, port = role.as_str(), sockets = group.len(), "listening");
        let mut group = group.into_iter();
        bound.push((group.next().expect("one socket per loop"), role));
        for (mine, l) in per_loop.iter_mut().zip(group) {
            mine.push((l, role));
        }
    }
    let mut others = Vec::new();
    for (id, mine) in (1..loops).zip(per_loop) {
        let (done_tx, done) = tokio::sync::oneshot::channel();
        let (shared, slots, shutdown) = (shared.clone(), slots.clone(), shutdown.clone());
        std::thread::Builder::new()
            .name(format!("pgferry-loop-{id}"))
            .spawn(move || event_loop(id, mine, shared, slots, shutdown, done_tx))
            .map_err(|source| StartError::EventLoop { id, source })?;
        others.push(done);
    }
    tracing::info!(
        event_loops = loops,
        scheduler = ?config.runtime.scheduler,
        threads = config.runtime.threads(),
        runtime = match (config.runtime.scheduler, config.runtime.threads()) {
            (pgferry_config::Scheduler::ThreadPerCore, _) => "a current-thread event loop per thread",
            (_, 1) => "one current-thread event loop",
            _ => "tokio's multi-thread runtime",
        },
        "serving clients"
    );
    accept_on(bound, &shared, &slots, &shutdown)
        .await
        .map_err(|source| StartError::EventLoop { id: 0, source })?;
    for done in others {
        let _ = done.await;
    }
    // Graceful shutdown: idle clients get 57P01 now, the others at the end
    // of their transaction; wait for them (bounded), then close the pools.
    shared.lifecycle.start_draining(&shared.obs, &shared.clients);
    let total = config.limits.max_client_conn as u32;
    let timeout = config.runtime.shutdown_timeout;
    tracing::info!(clients = total as usize - slots.available_permits(), timeout = ?timeout, "shutting down: closing clients at transaction boundaries");
    match tokio::time::timeout(timeout, slots.acquire_many(total)).await {
        Ok(_) => tracing::info!("all clients gone"),
        Err(_) => tracing::warn!(
            clients = total as usize - slots.available_permits(),
            "shutdown_timeout reached; closing the remaining clients"
        ),
    }
    for p in shared.pools.all() {
        p.shut_down("pgferry shutting down");
    }
    Ok(())
}

/// Applies every topology change to the pools (see
/// `PoolRegistry::apply_topology`).
async fn follow_topology(router: Router, pools: Arc<shared::PoolRegistry>, obs: Arc<shared::Observability>) {
    let mut rx = router.subscribe();
    let mut last = topology_summary(&router);
    obs.event(format!("started: {last}"));
    let leader = |r: &Router| r.topology().primary.as_ref().map(|p| p.addr.clone());
    let mut last_leader = leader(&router);
    while rx.changed().await.is_ok() {
        pools.apply_topology(&router, &obs);
        let now_leader = leader(&router);
        if now_leader.is_some() && now_leader != last_leader {
            obs.counters.leader_changes.fetch_add(1, Relaxed);
        }
        if now_leader.is_some() {
            last_leader = now_leader;
        }
        let now = topology_summary(&router);
        if now != last {
            obs.event(format!("topology: {now}"));
            last = now;
        }
    }
}

/// "leader 10.0.0.1:5432; replicas serving reads: 10.0.0.2:5432".
fn topology_summary(router: &Router) -> String {
    let t = router.topology();
    let leader = t
        .primary
        .as_ref()
        .map(|p| p.addr.to_string())
        .unwrap_or_else(|| "none (writes wait)".into());
    let standbys: Vec<String> = t.standbys.iter().map(|s| s.addr.to_string()).collect();
    format!(
        "leader {leader}; replicas serving reads: {}",
        if standbys.is_empty() {
            "none".to_owned()
        } else {
            standbys.join(", ")
        }
    )
}

/// Frees unused pools of unlisted databases (see
/// `PoolRegistry::sweep_auto_pools`).
async fn sweep_auto_pools(pools: Arc<shared::PoolRegistry>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        pools.sweep_auto_pools();
    }
}

/// One INFO line per stats_period with the cancel requests of that period
/// (each one is logged at DEBUG only): a flood of cancels costs a line.
async fn report_cancels(obs: Arc<shared::Observability>, settings: Arc<shared::Settings>) {
    let c = &obs.counters;
    let (mut requests, mut forwarded) = (0, 0);
    loop {
        tokio::time::sleep(settings.config().runtime.stats_period).await;
        let (r, f) = (c.cancel_requests.load(Relaxed), c.cancels_forwarded.load(Relaxed));
        if r != requests {
            let period = settings.config().runtime.stats_period;
            tracing::info!(
                requests = r - requests,
                forwarded = f - forwarded,
                ?period,
                "cancel requests in the last period"
            );
        }
        (requests, forwarded) = (r, f);
    }
}

/// SIGHUP does what the console's RELOAD does.
async fn reload_on_sighup(shared: Arc<Shared>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; use the console's RELOAD");
        return;
    };
    while hup.recv().await.is_some() {
        let _ = reload(&shared, "SIGHUP").await;
    }
}

/// Re-reads the configuration, users and TLS files (see `Settings::reload`),
/// and logs the outcome. Connections already established keep their TLS
/// session; clients stay connected.
pub(crate) async fn reload(shared: &Shared, why: &str) -> Result<(), String> {
    match shared.reload().await {
        Ok(restart) if restart.is_empty() => {
            tracing::info!("{why}: configuration, users and TLS files reloaded");
            shared.obs.event(format!("{why}: configuration reloaded"));
            Ok(())
        }
        Ok(restart) => {
            tracing::warn!(needs_restart = ?restart, "{why}: configuration reloaded; these changed settings keep their running values until a restart");
            shared.obs.event(format!(
                "{why}: configuration reloaded; needs a restart: {}",
                restart.join(", ")
            ));
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, "{why}: reload refused; the running configuration stays");
            shared.obs.event(format!("{why}: reload refused: {e}"));
            Err(e)
        }
    }
}
