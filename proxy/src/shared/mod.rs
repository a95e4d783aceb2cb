//! State shared by every client task, split by concept so that each part
//! of pgferry takes only the handles it uses:
//!
//! - [`Settings`]: the configuration and users file in force;
//! - [`PoolRegistry`]: the server pools and the limits they share;
//! - [`Lifecycle`]: draining, SHUTDOWN, PAUSE;
//! - [`AuthState`]: what logins need besides the users file;
//! - [`Observability`]: counters and events for /metrics and the status page.
//!
//! [`Shared`] owns one of each, with the router, TLS termination, cancel
//! keys and the prepared-statement registry. Passed by reference (no
//! globals), so tests can run several proxies in one process.

pub mod auth;
pub mod lifecycle;
pub mod observe;
pub mod pools;
pub mod settings;

pub use auth::AuthState;
pub use lifecycle::Lifecycle;
pub use observe::{Counters, Observability};
pub use pools::PoolRegistry;
pub use settings::Settings;

use crate::clients::ClientRegistry;
use crate::userlist::Userlist;
use pgferry_config::Config;
use pgferry_pool::statements::StatementRegistry;
use pgferry_routing::Router;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;

pub struct Shared {
    pub settings: Arc<Settings>,
    pub pools: Arc<PoolRegistry>,
    pub lifecycle: Arc<Lifecycle>,
    pub auth: Arc<AuthState>,
    pub obs: Arc<Observability>,
    pub router: Router,
    /// TLS termination for both listeners (reloadable).
    pub tls: Arc<pgferry_tls::Acceptor>,
    pub clients: Arc<ClientRegistry>,
    pub statements: Arc<StatementRegistry>,
    pub next_client_id: AtomicU64,
    /// What sessions use, built once: each session holds one pointer to
    /// it, not one per handle (bytes per idle client).
    pub session: Arc<crate::session::Handles>,
}

impl Shared {
    pub fn new(
        config: Arc<Config>,
        config_path: Option<std::path::PathBuf>,
        userlist: Userlist,
        router: Router,
        tls: Arc<pgferry_tls::Acceptor>,
        server_tls: Arc<pgferry_tls::Connector>,
    ) -> Self {
        let auth = Arc::new(AuthState::new(&config, &userlist, &server_tls));
        let settings = Arc::new(Settings::new(config, config_path, userlist));
        let pools = Arc::new(PoolRegistry::new(settings.clone(), server_tls));
        let lifecycle = Arc::new(Lifecycle::default());
        let statements = Arc::new(StatementRegistry::default());
        let session = Arc::new(crate::session::Handles {
            settings: settings.clone(),
            pools: pools.clone(),
            lifecycle: lifecycle.clone(),
            router: router.clone(),
            statements: statements.clone(),
        });
        Shared {
            settings,
            pools,
            lifecycle,
            auth,
            obs: Arc::default(),
            router,
            tls,
            clients: Arc::default(),
            statements,
            next_client_id: AtomicU64::new(1),
            session,
        }
    }

    /// RELOAD / SIGHUP (see [`Settings::reload`]).
    pub async fn reload(&self) -> Result<Vec<&'static str>, String> {
        self.settings.reload(&self.tls, &self.auth, &self.pools).await
    }
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
