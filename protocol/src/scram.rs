//! SCRAM-SHA-256 (RFC 5802, RFC 7677) for both directions, as PostgreSQL
//! implements it (`src/backend/libpq/auth-scram.c`, `src/common/scram-common.c`).
//!
//! The server side verifies a client against a stored secret in
//! PostgreSQL's own format and keeps the ClientKey it recovers from the
//! proof, so that the proxy can later log in to PostgreSQL as that user
//! without knowing the password (SCRAM pass-through). The client side logs
//! in with either a password or such recovered keys.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

pub const MECHANISM: &str = "SCRAM-SHA-256";
pub const MECHANISM_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// PostgreSQL's default `scram_iterations`.
pub const DEFAULT_ITERATIONS: u32 = 4096;
const NONCE_LEN: usize = 18;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM secret")]
    BadSecret,
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported on this connection")]
    ChannelBinding,
    #[error("nonce mismatch")]
    Nonce,
    #[error("invalid proof")]
    InvalidProof,
    #[error("server signature mismatch")]
    ServerSignature,
    #[error("server error: {0}")]
    Server(String),
}

/// A stored verifier: `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

fn key32(b64: &str) -> Result<[u8; 32], ScramError> {
    let v = B64.decode(b64).map_err(|_| ScramError::BadSecret)?;
    v.try_into().map_err(|_| ScramError::BadSecret)
}

impl Secret {
    pub fn parse(s: &str) -> Result<Self, ScramError> {
        let rest = s.strip_prefix("SCRAM-SHA-256$").ok_or(ScramError::BadSecret)?;
        let (iter_salt, keys) = rest.split_once('$').ok_or(ScramError::BadSecret)?;
        let (iter, salt) = iter_salt.split_once(':').ok_or(ScramError::BadSecret)?;
        let (stored, server) = keys.split_once(':').ok_or(ScramError::BadSecret)?;
        let iterations: u32 = iter.parse().map_err(|_| ScramError::BadSecret)?;
        if iterations == 0 {
            return Err(ScramError::BadSecret);
        }
        Ok(Secret {
            iterations,
            salt: B64.decode(salt).map_err(|_| ScramError::BadSecret)?,
            stored_key: key32(stored)?,
            server_key: key32(server)?,
        })
    }

    /// Builds a secret from a password, as `CREATE ROLE ... PASSWORD` does.
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Self {
        let salted = salted_password(password, salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        Secret {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&client_key),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// A deterministic fake secret for an unknown user, so that the exchange
    /// looks the same as for a real user with a wrong password (PostgreSQL's
    /// `scram_mock_salt`). `nonce_seed` is a per-process random value.
    pub fn mock(user: &str, nonce_seed: &[u8; 32]) -> Self {
        let mut h = Sha256::new();
        h.update(user.as_bytes());
        h.update(nonce_seed);
        let salt = h.finalize();
        Secret {
            iterations: DEFAULT_ITERATIONS,
            salt: salt[..16].to_vec(),
            stored_key: [0; 32],
            server_key: [0; 32],
        }
    }

    pub fn encode(&self) -> String {
        format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(msg);
    m.finalize().into_bytes().into()
}

fn sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

/// Hi() from RFC 5802: PBKDF2-HMAC-SHA-256. Costs `iterations` HMACs, so
/// callers on an async runtime should run it on a blocking thread.
pub fn salted_password(password: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
    let prepped = stringprep::saslprep(password)
        .map(|c| c.into_owned())
        .unwrap_or_else(|_| password.to_owned());
    let mut m = HmacSha256::new_from_slice(prepped.as_bytes()).expect("any key length");
    m.update(salt);
    m.update(&1u32.to_be_bytes());
    let mut u: [u8; 32] = m.finalize().into_bytes().into();
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(prepped.as_bytes(), &u);
        for (o, x) in out.iter_mut().zip(u.iter()) {
            *o ^= x;
        }
    }
    out
}

fn nonce() -> String {
    let mut b = [0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut b);
    B64.encode(b)
}

fn attr(part: &str, name: char) -> Result<&str, ScramError> {
    part.strip_prefix(name)
        .and_then(|p| p.strip_prefix('='))
        .ok_or(ScramError::Malformed("attribute"))
}

/// How the client asked for channel binding in its GS2 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelBinding {
    /// "n": client does not support it.
    None,
    /// "y": client supports it but thinks the server does not.
    Supported,
    /// "p=tls-server-end-point".
    TlsServerEndPoint,
}

/// Server side of one exchange.
pub struct ServerExchange {
    secret: Secret,
    client_first_bare: String,
    server_first: String,
    nonce: String,
    gs2_header: String,
    pub binding: ChannelBinding,
}

/// What a successful exchange yields.
pub struct Verified {
    /// `server-final-message` to send in AuthenticationSASLFinal.
    pub server_final: Vec<u8>,
    /// The client's ClientKey, recovered from its proof.
    pub client_key: [u8; 32],
}

impl ServerExchange {
    /// Handles client-first-message and returns the exchange plus the
    /// server-first-message. `plus_offered` says whether SCRAM-SHA-256-PLUS
    /// was offered (only on TLS): a client answering "y" then is refused, as
    /// that means a downgrade (RFC 5802 §6).
    pub fn start(
        secret: Secret,
        client_first: &[u8],
        mechanism: &str,
        plus_offered: bool,
    ) -> Result<(Self, Vec<u8>), ScramError> {
        let msg = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("utf8"))?;
        let (cb, rest) = msg.split_once(',').ok_or(ScramError::Malformed("gs2 header"))?;
        let binding = match cb {
            "n" => ChannelBinding::None,
            "y" if plus_offered => return Err(ScramError::ChannelBinding),
            "y" => ChannelBinding::Supported,
            "p=tls-server-end-point" => ChannelBinding::TlsServerEndPoint,
            _ => return Err(ScramError::Malformed("channel binding flag")),
        };
        let uses_plus = mechanism == MECHANISM_PLUS;
        if uses_plus != (binding == ChannelBinding::TlsServerEndPoint) {
            return Err(ScramError::ChannelBinding);
        }
        let (authzid, bare) = rest.split_once(',').ok_or(ScramError::Malformed("gs2 header"))?;
        if !authzid.is_empty() {
            return Err(ScramError::Malformed("authzid is not supported"));
        }
        let gs2_header = format!("{cb},{authzid},");
        let mut parts = bare.split(',');
        let user = parts.next().ok_or(ScramError::Malformed("client-first"))?;
        attr(user, 'n')?; // PostgreSQL ignores it: the startup packet's user counts.
        let cnonce = attr(parts.next().ok_or(ScramError::Malformed("client-first"))?, 'r')?;
        if cnonce.is_empty() || !cnonce.bytes().all(|c| (0x21..=0x7e).contains(&c) && c != b',') {
            return Err(ScramError::Malformed("nonce"));
        }
        let nonce = format!("{cnonce}{}", self::nonce());
        let server_first = format!("r={nonce},s={},i={}", B64.encode(&secret.salt), secret.iterations);
        let out = server_first.clone().into_bytes();
        Ok((
            ServerExchange {
                secret,
                client_first_bare: bare.to_owned(),
                server_first,
                nonce,
                gs2_header,
                binding,
            },
            out,
        ))
    }

    /// Handles client-final-message. `cb_data` is the tls-server-end-point
    /// hash of our certificate when the client asked for binding.
    pub fn finish(self, client_final: &[u8], cb_data: Option<&[u8]>) -> Result<Verified, ScramError> {
        let msg = std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("utf8"))?;
        let (without_proof, proof) = msg.rsplit_once(",p=").ok_or(ScramError::Malformed("client-final"))?;
        let mut parts = without_proof.split(',');
        let c = attr(parts.next().ok_or(ScramError::Malformed("client-final"))?, 'c')?;
        let r = attr(parts.next().ok_or(ScramError::Malformed("client-final"))?, 'r')?;
        let mut expected_cb = self.gs2_header.clone().into_bytes();
        if self.binding == ChannelBinding::TlsServerEndPoint {
            expected_cb.extend_from_slice(cb_data.ok_or(ScramError::ChannelBinding)?);
        }
        let got_cb = B64.decode(c).map_err(|_| ScramError::Malformed("channel binding"))?;
        if got_cb != expected_cb {
            return Err(ScramError::ChannelBinding);
        }
        if r != self.nonce {
            return Err(ScramError::Nonce);
        }
        let proof = B64.decode(proof).map_err(|_| ScramError::Malformed("proof"))?;
        if proof.len() != 32 {
            return Err(ScramError::InvalidProof);
        }
        let auth_message = format!("{},{},{}", self.client_first_bare, self.server_first, without_proof);
        let client_signature = hmac(&self.secret.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ client_signature[i];
        }
        // Constant-time comparison of H(ClientKey) with StoredKey.
        let diff = sha256(&client_key)
            .iter()
            .zip(self.secret.stored_key.iter())
            .fold(0u8, |a, (x, y)| a | (x ^ y));
        if diff != 0 {
            return Err(ScramError::InvalidProof);
        }
        let server_signature = hmac(&self.secret.server_key, auth_message.as_bytes());
        Ok(Verified {
            server_final: format!("v={}", B64.encode(server_signature)).into_bytes(),
            client_key,
        })
    }
}

/// ClientKey and ServerKey: what the client side of an exchange needs.
/// Derived from a password by [`keys_from_password`] (PBKDF2, expensive) or
/// recovered from a client's proof (SCRAM pass-through).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ScramKeys {
    pub client_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramKeys(<redacted>)")
    }
}

/// The salt and iteration count of a server-first-message.
pub struct ServerFirst<'a> {
    pub nonce: &'a str,
    pub salt: Vec<u8>,
    pub iterations: u32,
}

pub fn parse_server_first(server_first: &[u8]) -> Result<ServerFirst<'_>, ScramError> {
    let msg = std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("utf8"))?;
    let mut parts = msg.split(',');
    let nonce = attr(parts.next().ok_or(ScramError::Malformed("server-first"))?, 'r')?;
    let s = attr(parts.next().ok_or(ScramError::Malformed("server-first"))?, 's')?;
    let iterations: u32 = attr(parts.next().ok_or(ScramError::Malformed("server-first"))?, 'i')?
        .parse()
        .map_err(|_| ScramError::Malformed("iterations"))?;
    let salt = B64.decode(s).map_err(|_| ScramError::Malformed("salt"))?;
    Ok(ServerFirst {
        nonce,
        salt,
        iterations,
    })
}

/// ClientKey and ServerKey for a password: runs PBKDF2, so call it off the
/// async workers.
pub fn keys_from_password(password: &str, salt: &[u8], iterations: u32) -> ScramKeys {
    let salted = salted_password(password, salt, iterations);
    ScramKeys {
        client_key: hmac(&salted, b"Client Key"),
        server_key: hmac(&salted, b"Server Key"),
    }
}

/// Client side of one exchange (proxy → PostgreSQL), without channel binding.
pub struct ClientExchange {
    client_first_bare: String,
    expected_server_signature: Option<[u8; 32]>,
}

impl ClientExchange {
    /// Returns the exchange and the client-first-message.
    pub fn start() -> (Self, Vec<u8>) {
        let bare = format!("n=,r={}", nonce());
        let first = format!("n,,{bare}").into_bytes();
        (
            ClientExchange {
                client_first_bare: bare,
                expected_server_signature: None,
            },
            first,
        )
    }

    /// Handles server-first-message and returns client-final-message.
    /// `keys` must be those of the salt and iterations the message names
    /// (see [`parse_server_first`]).
    pub fn respond(&mut self, server_first: &[u8], keys: &ScramKeys) -> Result<Vec<u8>, ScramError> {
        let msg = std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("utf8"))?;
        let sf = parse_server_first(server_first)?;
        let r = sf.nonce;
        let cnonce = &self.client_first_bare[5..];
        if !r.starts_with(cnonce) || r.len() == cnonce.len() {
            return Err(ScramError::Nonce);
        }
        let ScramKeys { client_key, server_key } = *keys;
        let without_proof = format!("c=biws,r={r}");
        let auth_message = format!("{},{},{}", self.client_first_bare, msg, without_proof);
        let stored_key = sha256(&client_key);
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let mut proof = [0u8; 32];
        for i in 0..32 {
            proof[i] = client_key[i] ^ signature[i];
        }
        self.expected_server_signature = Some(hmac(&server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Checks server-final-message.
    pub fn finish(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let msg = std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed("utf8"))?;
        if let Some(e) = msg.strip_prefix("e=") {
            return Err(ScramError::Server(e.to_owned()));
        }
        let v = attr(msg, 'v')?;
        let got = B64.decode(v).map_err(|_| ScramError::Malformed("verifier"))?;
        match self.expected_server_signature {
            Some(exp) if got == exp => Ok(()),
            _ => Err(ScramError::ServerSignature),
        }
    }
}

/// PostgreSQL's MD5 response: "md5" + md5(md5(password + user) + salt).
pub fn md5_response(user: &str, password: &str, salt: [u8; 4]) -> Vec<u8> {
    md5_salted(md5_inner(user, password).as_bytes(), salt)
}

/// md5(password + user) in hex: what pg_authid stores after "md5".
pub fn md5_inner(user: &str, password: &str) -> String {
    use md5::Digest as _;
    hex(&md5::Md5::digest([password.as_bytes(), user.as_bytes()].concat()))
}

/// "md5" + md5(inner_hex + salt).
pub fn md5_salted(inner_hex: &[u8], salt: [u8; 4]) -> Vec<u8> {
    use md5::Digest as _;
    let outer = md5::Md5::digest([inner_hex, &salt[..]].concat());
    let mut out = b"md5".to_vec();
    out.extend_from_slice(hex(&outer).as_bytes());
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_and_server_agree() {
        let secret = Secret::from_password("pencil", b"0123456789abcdef", 4096);
        let parsed = Secret::parse(&secret.encode()).unwrap();
        assert!(parsed == secret);
        let (mut client, first) = ClientExchange::start();
        let (server, server_first) = ServerExchange::start(parsed, &first, MECHANISM, false).unwrap();
        let sf = parse_server_first(&server_first).unwrap();
        let client_final = client
            .respond(&server_first, &keys_from_password("pencil", &sf.salt, sf.iterations))
            .unwrap();
        let verified = server.finish(&client_final, None).unwrap();
        client.finish(&verified.server_final).unwrap();

        // The recovered ClientKey logs in again without the password.
        let keys = ScramKeys {
            client_key: verified.client_key,
            server_key: secret.server_key,
        };
        let (mut c2, first2) = ClientExchange::start();
        let (s2, sf2) = ServerExchange::start(secret.clone(), &first2, MECHANISM, false).unwrap();
        let cf2 = c2.respond(&sf2, &keys).unwrap();
        assert!(s2.finish(&cf2, None).is_ok());
    }

    #[test]
    fn wrong_password_fails() {
        let secret = Secret::from_password("pencil", b"salt", 16);
        let (mut client, first) = ClientExchange::start();
        let (server, sf) = ServerExchange::start(secret, &first, MECHANISM, false).unwrap();
        let cf = client.respond(&sf, &keys_from_password("nope", b"salt", 16)).unwrap();
        assert_eq!(server.finish(&cf, None).err(), Some(ScramError::InvalidProof));
    }

    #[test]
    fn parses_postgres_secret() {
        // Generated by PostgreSQL 15 for password "secret".
        let s = "SCRAM-SHA-256$4096:3Kz8MwtNXmT1yO3V4yq+0g==$uZ2Mgcq9kTnHCyHQJ4vw0GwJdnXcydaeCKXFHFTVVeY=:kmbZQvAiV9c7pH1tYl6s7oS6CFqT3MUnPzS2i5dUNfI=";
        assert_eq!(Secret::parse(s).unwrap().iterations, 4096);
        assert!(Secret::parse("md5abc").is_err());
    }

    #[test]
    fn md5() {
        // md5(md5("secret" + "bob") + salt) computed by PostgreSQL's pg_md5_encrypt.
        let r = md5_response("bob", "secret", [1, 2, 3, 4]);
        assert_eq!(r.len(), 35);
        assert!(r.starts_with(b"md5"));
    }
}
