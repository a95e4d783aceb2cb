//! What logins need besides the users file: auth_query, the failure
//! throttle, the pending-login and per-user client caps, and secrets
//! derived for plaintext passwords.

use super::{settings::server_password, shared_limit, Limit};
use crate::userlist::Userlist;
use pgferry_config::Config;
use pgferry_protocol::scram::{self, Secret};
use rand::RngCore;
use std::collections::HashMap;
use std::sync::Mutex;

pub struct AuthState {
    pub auth_query: Option<crate::authquery::AuthQuery>,
    pub throttle: crate::throttle::AuthThrottle,
    /// Connections still in startup or authentication.
    pub pending_logins: crate::pending::PendingLogins,
    /// Per-user client caps (max_client_connections).
    user_clients: Mutex<HashMap<String, Limit>>,
    /// Seeds mock SCRAM salts for unknown users.
    pub mock_seed: [u8; 32],
    /// SCRAM secrets derived from plaintext users-file passwords.
    plain_secrets: Mutex<HashMap<String, Secret>>,
}

impl AuthState {
    pub fn new(config: &Config, userlist: &Userlist, server_tls: &pgferry_tls::Connector) -> Self {
        let mut mock_seed = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut mock_seed);
        let auth_query = config.auth.auth_user.as_deref().and_then(|u| {
            let password = server_password(config, userlist, u);
            crate::authquery::AuthQuery::new(config, password, server_tls)
        });
        let l = &config.limits;
        AuthState {
            auth_query,
            throttle: crate::throttle::AuthThrottle::new(
                l.auth_failure_limit,
                l.auth_failure_window,
                l.auth_failure_delay,
            ),
            pending_logins: crate::pending::PendingLogins::new(l.max_pending_logins, l.max_pending_logins_per_address),
            user_clients: Mutex::default(),
            mock_seed,
            plain_secrets: Mutex::default(),
        }
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

    /// A reload replaced the users file: derive again from its passwords.
    pub(super) fn forget_plain_secrets(&self) {
        self.plain_secrets.lock().unwrap().clear();
    }

    /// A permit for one more client of `user` when `config` gives it a
    /// max_client_connections cap; 53300 once the cap is reached.
    pub fn user_client_permit(
        &self,
        config: &Config,
        user: &str,
    ) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, crate::ClientError> {
        let Some(cap) = config.user(user).and_then(|u| u.max_client_connections) else {
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
