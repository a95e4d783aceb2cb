//! Logging in to PostgreSQL as a client: StartupMessage, then whatever
//! authentication the server asks for, then its ParameterStatus and
//! BackendKeyData up to the first ReadyForQuery. The exchange itself is
//! [`pgferry_protocol::login`]; this is the IO around it and the pool's
//! credentials, with the SCRAM keys kept so that PBKDF2 runs once a pool.

use crate::error::PoolError;
use crate::wire::Wire;
use pgferry_protocol::encode;
use pgferry_protocol::login::{ClientLogin, Step};
use pgferry_protocol::scram::{self, ScramKeys};
use std::sync::{Arc, Mutex};

/// How a pool's connections authenticate to PostgreSQL.
#[derive(Clone)]
pub struct ServerCredentials {
    pub user: String,
    password: Option<Arc<str>>,
    /// SCRAM keys derived for the server's (salt, iterations): PBKDF2 then
    /// runs once per pool rather than once per connection.
    derived: Arc<Mutex<Option<Derived>>>,
}

struct Derived {
    salt: Vec<u8>,
    iterations: u32,
    keys: ScramKeys,
}

impl std::fmt::Debug for ServerCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerCredentials({:?}, <redacted>)", self.user)
    }
}

impl ServerCredentials {
    pub fn new(user: impl Into<String>, password: Option<String>) -> Self {
        ServerCredentials {
            user: user.into(),
            password: password.map(Arc::from),
            derived: Arc::default(),
        }
    }

    fn password(&self) -> Result<&str, PoolError> {
        self.password.as_deref().ok_or_else(|| {
            PoolError::Auth(format!(
                "server asked for a password for user {:?} and none is configured",
                self.user
            ))
        })
    }

    /// SCRAM pass-through: keys recovered from a client's proof against the
    /// same secret the server stores, so the pool can log in as that user
    /// without a password. Ignored when a password is configured.
    pub fn learn_scram_keys(&self, salt: &[u8], iterations: u32, client_key: [u8; 32], server_key: [u8; 32]) {
        if self.password.is_some() {
            return;
        }
        let mut d = self.derived.lock().unwrap();
        if d.is_none() {
            *d = Some(Derived {
                salt: salt.to_vec(),
                iterations,
                keys: ScramKeys { client_key, server_key },
            });
        }
    }

    /// Whether these credentials log in with `password`.
    pub fn has_password(&self, password: Option<&str>) -> bool {
        self.password.as_deref() == password
    }

    /// Takes over the SCRAM keys another pool of the same user learned (a
    /// session moving to a new leader brings its pass-through keys along).
    pub fn adopt(&self, other: &ServerCredentials) {
        if self.password.is_some() || Arc::ptr_eq(&self.derived, &other.derived) {
            return;
        }
        let theirs = other.derived.lock().unwrap();
        let mut mine = self.derived.lock().unwrap();
        if let (None, Some(d)) = (mine.as_ref(), theirs.as_ref()) {
            *mine = Some(Derived {
                salt: d.salt.clone(),
                iterations: d.iterations,
                keys: d.keys,
            });
        }
    }

    /// The SCRAM keys for a server's salt and iteration count: the ones
    /// learned or derived before if they match, else derived from the
    /// password (once per pool, not once per connection).
    async fn scram_keys(&self, salt: Vec<u8>, iterations: u32) -> Result<ScramKeys, PoolError> {
        if let Some(d) = self.derived.lock().unwrap().as_ref() {
            if d.salt == salt && d.iterations == iterations {
                return Ok(d.keys);
            }
        }
        let password = self.password()?.to_owned();
        let for_derivation = salt.clone();
        // PBKDF2 costs milliseconds of CPU: keep it off the async workers.
        let keys =
            tokio::task::spawn_blocking(move || scram::keys_from_password(&password, &for_derivation, iterations))
                .await
                .map_err(|_| PoolError::Auth("SCRAM key derivation failed".into()))?;
        *self.derived.lock().unwrap() = Some(Derived { salt, iterations, keys });
        Ok(keys)
    }
}

/// Result of a successful login.
pub(crate) struct LoginResult {
    pub params: Vec<(String, String)>,
    pub backend_pid: u32,
    pub backend_key: u32,
}

/// Drives the login on an established connection. `startup`: the
/// StartupMessage's parameters after `user` (`database` and options).
pub(crate) async fn login(
    conn: &mut Wire,
    creds: &ServerCredentials,
    startup: &[(&str, &str)],
) -> Result<LoginResult, PoolError> {
    let mut out = bytes::BytesMut::with_capacity(256);
    let mut params = Vec::with_capacity(1 + startup.len());
    params.push(("user", creds.user.as_str()));
    params.extend_from_slice(startup);
    encode::startup_message(&mut out, &params);
    conn.write_all(&out).await?;
    let mut login = ClientLogin::new(&creds.user, creds.password.as_deref());
    let mut result = LoginResult {
        params: Vec::with_capacity(16),
        backend_pid: 0,
        backend_key: 0,
    };
    loop {
        let frame = conn.read_frame().await?;
        out.clear();
        match login.feed(&frame, &mut out)? {
            Step::Send => conn.write_all(&out).await?,
            Step::ScramKeys { salt, iterations } => {
                let keys = creds.scram_keys(salt, iterations).await?;
                login.scram_keys(&keys, &mut out)?;
                conn.write_all(&out).await?;
            }
            Step::Parameter { name, value } => result.params.push((name.to_owned(), value.to_owned())),
            Step::BackendKey { pid, key } => (result.backend_pid, result.backend_key) = (pid, key),
            Step::Read => {}
            Step::Ready => return Ok(result),
        }
    }
}
