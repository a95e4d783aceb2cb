//! Logging in to PostgreSQL as a client: StartupMessage, then whatever
//! authentication the server asks for, then its ParameterStatus and
//! BackendKeyData up to the first ReadyForQuery.

use crate::error::PoolError;
use pgferry_protocol::backend::{self, AuthRequest};
use pgferry_protocol::scram::{self, ClientCredentials, ClientExchange};
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
    client_key: [u8; 32],
    server_key: [u8; 32],
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
                client_key,
                server_key,
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
                client_key: d.client_key,
                server_key: d.server_key,
            });
        }
    }

    /// Credentials for a SCRAM exchange with this server-first message.
    async fn scram_credentials(&self, server_first: &[u8]) -> Result<ClientCredentials, PoolError> {
        let sf = scram::parse_server_first(server_first).map_err(|e| PoolError::Auth(e.to_string()))?;
        if let Some(d) = self.derived.lock().unwrap().as_ref() {
            if d.salt == sf.salt && d.iterations == sf.iterations {
                return Ok(ClientCredentials::Keys {
                    client_key: d.client_key,
                    server_key: d.server_key,
                });
            }
        }
        let password = self.password()?.to_owned();
        let (salt, iterations) = (sf.salt.clone(), sf.iterations);
        // PBKDF2 costs milliseconds of CPU: keep it off the async workers.
        let (client_key, server_key) =
            tokio::task::spawn_blocking(move || scram::keys_from_password(&password, &salt, iterations))
                .await
                .map_err(|_| PoolError::Auth("SCRAM key derivation failed".into()))?;
        *self.derived.lock().unwrap() = Some(Derived {
            salt: sf.salt,
            iterations,
            client_key,
            server_key,
        });
        Ok(ClientCredentials::Keys { client_key, server_key })
    }
}

/// Result of a successful login.
pub(crate) struct LoginResult {
    pub params: Vec<(String, String)>,
    pub backend_pid: u32,
    pub backend_key: u32,
}

/// Drives the login on an established connection.
pub(crate) async fn login(
    conn: &mut crate::server::Wire,
    creds: &ServerCredentials,
    database: &str,
) -> Result<LoginResult, PoolError> {
    use pgferry_protocol::encode;
    let mut out = bytes::BytesMut::with_capacity(256);
    encode::startup_message(&mut out, &[("user", creds.user.as_str()), ("database", database)]);
    conn.write_all(&out).await?;
    let mut scram_state: Option<ClientExchange> = None;
    let mut result = LoginResult {
        params: Vec::with_capacity(16),
        backend_pid: 0,
        backend_key: 0,
    };
    loop {
        let frame = conn.read_frame().await?;
        match frame.tag {
            backend::AUTHENTICATION => {
                out.clear();
                match backend::authentication(frame.body())? {
                    AuthRequest::Ok => continue,
                    AuthRequest::CleartextPassword => encode::password(&mut out, &nul_terminated(creds.password()?)),
                    AuthRequest::Md5Password { salt } => {
                        let mut r = scram::md5_response(&creds.user, creds.password()?, salt);
                        r.push(0);
                        encode::password(&mut out, &r);
                    }
                    AuthRequest::Sasl { mechanisms } => {
                        if !mechanisms.contains(&scram::MECHANISM) {
                            return Err(PoolError::Auth(format!(
                                "server offers no supported SASL mechanism: {mechanisms:?}"
                            )));
                        }
                        let (ex, first) = ClientExchange::start();
                        scram_state = Some(ex);
                        encode::sasl_initial_response(&mut out, scram::MECHANISM, &first);
                    }
                    AuthRequest::SaslContinue { data } => {
                        let ex = scram_state
                            .as_mut()
                            .ok_or(PoolError::Auth("unexpected SASL continue".into()))?;
                        let creds = creds.scram_credentials(data).await?;
                        let fin = ex.respond(data, &creds).map_err(|e| PoolError::Auth(e.to_string()))?;
                        encode::password(&mut out, &fin);
                    }
                    AuthRequest::SaslFinal { data } => {
                        let ex = scram_state
                            .as_ref()
                            .ok_or(PoolError::Auth("unexpected SASL final".into()))?;
                        ex.finish(data).map_err(|e| PoolError::Auth(e.to_string()))?;
                        continue;
                    }
                    AuthRequest::Other(n) => {
                        return Err(PoolError::Auth(format!("unsupported authentication request {n}")))
                    }
                }
                conn.write_all(&out).await?;
            }
            backend::PARAMETER_STATUS => {
                let (k, v) = backend::parameter_status(frame.body())?;
                result.params.push((k.to_owned(), v.to_owned()));
            }
            backend::BACKEND_KEY_DATA => {
                (result.backend_pid, result.backend_key) = backend::backend_key_data(frame.body())?;
            }
            backend::NOTICE_RESPONSE | backend::NEGOTIATE_PROTOCOL_VERSION => {}
            backend::ERROR_RESPONSE => {
                let e = backend::error_fields(frame.body())?;
                return Err(PoolError::Server {
                    severity: e.severity.to_owned(),
                    code: e.code.to_owned(),
                    message: e.message.to_owned(),
                });
            }
            backend::READY_FOR_QUERY => return Ok(result),
            t => {
                return Err(PoolError::Protocol(pgferry_protocol::ProtocolError::UnexpectedTag(
                    t as char,
                )))
            }
        }
    }
}

fn nul_terminated(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}
