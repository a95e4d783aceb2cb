//! The configuration and users file in force. RELOAD / SIGHUP / SET swap
//! them whole (see `reload.rs`); everything else reads a snapshot.

use super::{AuthState, PoolRegistry};
use crate::userlist::Userlist;
use arc_swap::ArcSwap;
use pgferry_config::Config;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct Settings {
    /// Swapped whole by RELOAD / SIGHUP / SET (see `reload.rs`); readers
    /// take a snapshot with `config()`.
    config: ArcSwap<Config>,
    config_path: Option<PathBuf>,
    userlist: ArcSwap<Userlist>,
}

impl Settings {
    pub fn new(config: Arc<Config>, config_path: Option<PathBuf>, userlist: Userlist) -> Self {
        Settings {
            config: ArcSwap::new(config),
            config_path,
            userlist: ArcSwap::from_pointee(userlist),
        }
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
    ///
    /// `tls`, `auth` and `pools` are what the files feed besides these
    /// settings: the listeners' certificates, secrets derived from the
    /// users file's passwords, and the pools (`pools` must be the registry
    /// built over these settings: it reads the new ones back).
    pub async fn reload(
        &self,
        tls: &pgferry_tls::Acceptor,
        auth: &AuthState,
        pools: &PoolRegistry,
    ) -> Result<Vec<&'static str>, String> {
        let path = self
            .config_path
            .clone()
            .ok_or("pgferry was started without a configuration file")?;
        let (old, old_users) = (self.config.load_full(), self.userlist.load_full());
        let tls_on = tls.mode() != pgferry_config::ClientTls::Disable;
        let loaded = tokio::task::spawn_blocking(move || load_for_reload(&path, &old, &old_users, tls_on))
            .await
            .map_err(|e| format!("reload task failed: {e}"))??;
        tls.replace(loaded.tls);
        self.userlist.store(Arc::new(loaded.users));
        auth.forget_plain_secrets();
        self.install(loaded.config, pools);
        Ok(loaded.restart)
    }

    /// SET key = value from the console (`pools`: as for `reload`).
    pub fn set(&self, key: &str, value: &str, pools: &PoolRegistry) -> Result<(), String> {
        let new = crate::reload::set(&self.config(), key, value)?;
        self.install(new, pools);
        Ok(())
    }

    /// Puts a new configuration in force. Pools whose settings or server
    /// password changed are shut down gracefully: idle connections close
    /// now, busy ones when their transaction ends, and sessions move to a
    /// new pool at their next transaction. Clients stay connected.
    fn install(&self, new: Config, pools: &PoolRegistry) {
        self.config.store(Arc::new(new));
        pools.replace_changed();
    }

    /// How long a new read-write transaction waits for a confirmed leader.
    pub fn failover_hold(&self) -> std::time::Duration {
        match &self.config().topology {
            pgferry_config::Topology::Etcd(e) => e.failover_hold_timeout,
            pgferry_config::Topology::Static { .. } => std::time::Duration::ZERO,
        }
    }
}

/// The password for server logins of `user`: its [[user]] server_password,
/// else a plaintext users-file entry.
pub(super) fn server_password(config: &Config, userlist: &Userlist, user: &str) -> Option<String> {
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
fn load_for_reload(path: &Path, old: &Config, old_users: &Userlist, tls_on: bool) -> Result<Reloaded, String> {
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
