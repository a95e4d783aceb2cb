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
    pub salt: std::sync::Arc<[u8]>,
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
            salt: B64.decode(salt).map_err(|_| ScramError::BadSecret)?.into(),
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
            salt: salt.into(),
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
            salt: salt[..16].into(),
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

/// Appends a fresh random nonce (base64, no commas) to `out`.
fn push_nonce(out: &mut String) {
    let mut b = [0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut b);
    B64.encode_string(b, out);
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
///
/// One allocation per exchange (this runs for every login): `auth_message`
/// holds client-first-message-bare and server-first-message from the
/// start, and `finish` appends client-final-message-without-proof, which
/// makes the AuthMessage both signatures are computed over.
pub struct ServerExchange {
    secret: Secret,
    auth_message: String,
    /// Where server-first-message starts in `auth_message`.
    server_first_at: usize,
    /// The combined nonce (the client's, then ours) in `auth_message`.
    nonce: std::ops::Range<usize>,
    pub binding: ChannelBinding,
}

impl ChannelBinding {
    /// The GS2 header the client sent (authzid is always empty), which
    /// client-final-message's `c=` must repeat.
    fn gs2_header(self) -> &'static str {
        match self {
            ChannelBinding::None => "n,,",
            ChannelBinding::Supported => "y,,",
            ChannelBinding::TlsServerEndPoint => "p=tls-server-end-point,,",
        }
    }
}

/// What a successful exchange yields.
pub struct Verified {
    /// `server-final-message`: "v=" and the base64 ServerSignature.
    server_final: [u8; 46],
    /// The client's ClientKey, recovered from its proof.
    pub client_key: [u8; 32],
}

impl Verified {
    /// `server-final-message`, for AuthenticationSASLFinal.
    pub fn server_final(&self) -> &[u8] {
        &self.server_final
    }
}

impl ServerExchange {
    /// Handles client-first-message and returns the exchange, whose
    /// [`server_first`](Self::server_first) is the reply. `plus_offered`
    /// says whether SCRAM-SHA-256-PLUS was offered (only on TLS): a client
    /// answering "y" then is refused, as that means a downgrade (RFC 5802 §6).
    pub fn start(secret: Secret, client_first: &[u8], mechanism: &str, plus_offered: bool) -> Result<Self, ScramError> {
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
        let mut parts = bare.split(',');
        let user = parts.next().ok_or(ScramError::Malformed("client-first"))?;
        attr(user, 'n')?; // PostgreSQL ignores it: the startup packet's user counts.
        let cnonce = attr(parts.next().ok_or(ScramError::Malformed("client-first"))?, 'r')?;
        if cnonce.is_empty() || !cnonce.bytes().all(|c| (0x21..=0x7e).contains(&c) && c != b',') {
            return Err(ScramError::Malformed("nonce"));
        }
        // Room for all three parts: client-final-without-proof repeats the
        // nonce and a base64 GS2 header (with up to 64 bytes of binding data).
        let mut m = String::with_capacity(2 * (bare.len() + NONCE_B64) + secret.salt.len() * 4 / 3 + 160);
        m.push_str(bare);
        m.push(',');
        let server_first_at = m.len();
        m.push_str("r=");
        let nonce_at = m.len();
        m.push_str(cnonce);
        push_nonce(&mut m);
        let nonce = nonce_at..m.len();
        m.push_str(",s=");
        B64.encode_string(&secret.salt, &mut m);
        m.push_str(",i=");
        m.push_str(crate::encode::decimal(secret.iterations.into(), &mut [0u8; 20]));
        Ok(ServerExchange {
            secret,
            auth_message: m,
            server_first_at,
            nonce,
            binding,
        })
    }

    /// `server-first-message`, for AuthenticationSASLContinue.
    pub fn server_first(&self) -> &[u8] {
        &self.auth_message.as_bytes()[self.server_first_at..]
    }

    /// Handles client-final-message. `cb_data` is the tls-server-end-point
    /// hash of our certificate when the client asked for binding.
    pub fn finish(mut self, client_final: &[u8], cb_data: Option<&[u8]>) -> Result<Verified, ScramError> {
        let msg = std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("utf8"))?;
        let (without_proof, proof) = msg.rsplit_once(",p=").ok_or(ScramError::Malformed("client-final"))?;
        let mut parts = without_proof.split(',');
        let c = attr(parts.next().ok_or(ScramError::Malformed("client-final"))?, 'c')?;
        let r = attr(parts.next().ok_or(ScramError::Malformed("client-final"))?, 'r')?;
        let binding_data = match self.binding {
            ChannelBinding::TlsServerEndPoint => cb_data.ok_or(ScramError::ChannelBinding)?,
            _ => &[],
        };
        // c= is base64(GS2 header, then the binding data): 24 + 64 bytes at
        // most for a valid one. A longer one cannot match.
        let mut got = [0u8; 96];
        let n = B64.decode_slice(c, &mut got).map_err(|e| match e {
            base64::DecodeSliceError::OutputSliceTooSmall => ScramError::ChannelBinding,
            base64::DecodeSliceError::DecodeError(_) => ScramError::Malformed("channel binding"),
        })?;
        let header = self.binding.gs2_header().as_bytes();
        if n != header.len() + binding_data.len()
            || &got[..header.len()] != header
            || &got[header.len()..n] != binding_data
        {
            return Err(ScramError::ChannelBinding);
        }
        if r != &self.auth_message[self.nonce.clone()] {
            return Err(ScramError::Nonce);
        }
        let mut proof_bytes = [0u8; 48];
        let n = B64.decode_slice(proof, &mut proof_bytes).map_err(|e| match e {
            base64::DecodeSliceError::OutputSliceTooSmall => ScramError::InvalidProof,
            base64::DecodeSliceError::DecodeError(_) => ScramError::Malformed("proof"),
        })?;
        if n != 32 {
            return Err(ScramError::InvalidProof);
        }
        self.auth_message.push(',');
        self.auth_message.push_str(without_proof);
        let client_signature = hmac(&self.secret.stored_key, self.auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof_bytes[i] ^ client_signature[i];
        }
        // Constant-time comparison of H(ClientKey) with StoredKey.
        let diff = sha256(&client_key)
            .iter()
            .zip(self.secret.stored_key.iter())
            .fold(0u8, |a, (x, y)| a | (x ^ y));
        if diff != 0 {
            return Err(ScramError::InvalidProof);
        }
        let server_signature = hmac(&self.secret.server_key, self.auth_message.as_bytes());
        let mut server_final = *b"v=--------------------------------------------";
        let n = B64
            .encode_slice(server_signature, &mut server_final[2..])
            .expect("32 bytes are 44 base64 characters");
        debug_assert_eq!(n, 44);
        Ok(Verified {
            server_final,
            client_key,
        })
    }
}

/// Base64 characters of our part of the nonce.
const NONCE_B64: usize = NONCE_LEN / 3 * 4;

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
        let mut bare = String::from("n=,r=");
        push_nonce(&mut bare);
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
        let server = ServerExchange::start(parsed, &first, MECHANISM, false).unwrap();
        let server_first = server.server_first().to_vec();
        let sf = parse_server_first(&server_first).unwrap();
        let client_final = client
            .respond(&server_first, &keys_from_password("pencil", &sf.salt, sf.iterations))
            .unwrap();
        let verified = server.finish(&client_final, None).unwrap();
        client.finish(verified.server_final()).unwrap();

        // The recovered ClientKey logs in again without the password.
        let keys = ScramKeys {
            client_key: verified.client_key,
            server_key: secret.server_key,
        };
        let (mut c2, first2) = ClientExchange::start();
        let s2 = ServerExchange::start(secret.clone(), &first2, MECHANISM, false).unwrap();
        let cf2 = c2.respond(s2.server_first(), &keys).unwrap();
        assert!(s2.finish(&cf2, None).is_ok());
    }

    #[test]
    fn wrong_password_fails() {
        let secret = Secret::from_password("pencil", b"salt", 16);
        let (mut client, first) = ClientExchange::start();
        let server = ServerExchange::start(secret, &first, MECHANISM, false).unwrap();
        let cf = client
            .respond(server.server_first(), &keys_from_password("nope", b"salt", 16))
            .unwrap();
        assert_eq!(server.finish(&cf, None).err(), Some(ScramError::InvalidProof));
    }

    /// client-final-message for `server` with the given GS2 header part
    /// (`c=` before base64) and nonce, with a valid proof for "pencil".
    fn client_final(bare: &str, server: &ServerExchange, secret: &Secret, cb: &[u8], nonce: &str) -> Vec<u8> {
        let keys = keys_from_password("pencil", &secret.salt, secret.iterations);
        let without_proof = format!("c={},r={nonce}", B64.encode(cb));
        let server_first = std::str::from_utf8(server.server_first()).unwrap();
        let auth = format!("{bare},{server_first},{without_proof}");
        let sig = hmac(&sha256(&keys.client_key), auth.as_bytes());
        let proof: Vec<u8> = keys.client_key.iter().zip(sig).map(|(k, s)| k ^ s).collect();
        format!("{without_proof},p={}", B64.encode(proof)).into_bytes()
    }

    fn server_nonce(server: &ServerExchange) -> String {
        let sf = std::str::from_utf8(server.server_first()).unwrap();
        sf.strip_prefix("r=").unwrap().split(',').next().unwrap().to_owned()
    }

    #[test]
    fn server_first_carries_both_nonces_the_salt_and_the_iterations() {
        let secret = Secret::from_password("pencil", b"0123456789abcdef", 4096);
        let server = ServerExchange::start(secret, b"n,,n=,r=abc", MECHANISM, false).unwrap();
        let sf = std::str::from_utf8(server.server_first()).unwrap().to_owned();
        let (r, rest) = sf.split_once(',').unwrap();
        assert!(r.starts_with("r=abc") && r.len() == 5 + NONCE_B64, "{sf}");
        assert!(!r[2..].contains(','));
        assert_eq!(rest, "s=MDEyMzQ1Njc4OWFiY2RlZg==,i=4096");
        let again =
            ServerExchange::start(Secret::from_password("x", b"s", 1), b"n,,n=,r=abc", MECHANISM, false).unwrap();
        assert_ne!(
            server_nonce(&again),
            server_nonce(&server),
            "a fresh nonce per exchange"
        );
        assert!(again.server_first().ends_with(b",s=cw==,i=1"));
    }

    #[test]
    fn server_exchange_accepts_a_hand_made_final_message() {
        let secret = Secret::from_password("pencil", b"salt", 16);
        let server = ServerExchange::start(secret.clone(), b"n,,n=,r=xyz", MECHANISM, false).unwrap();
        let nonce = server_nonce(&server);
        let cf = client_final("n=,r=xyz", &server, &secret, b"n,,", &nonce);
        let v = server.finish(&cf, None).unwrap();
        let sig = hmac(
            &secret.server_key,
            {
                let sf = format!("r={nonce},s={},i=16", B64.encode(b"salt"));
                format!("n=,r=xyz,{sf},c=biws,r={nonce}")
            }
            .as_bytes(),
        );
        assert_eq!(v.server_final(), format!("v={}", B64.encode(sig)).as_bytes());
        assert_eq!(v.client_key, keys_from_password("pencil", b"salt", 16).client_key);
    }

    #[test]
    fn server_exchange_refuses_what_does_not_match() {
        let secret = Secret::from_password("pencil", b"salt", 16);
        let run = |first: &[u8],
                   mech: &str,
                   plus: bool,
                   cb: &[u8],
                   cb_data: Option<&[u8]>,
                   tweak: &dyn Fn(Vec<u8>, &str) -> Vec<u8>| {
            let server = ServerExchange::start(secret.clone(), first, mech, plus)?;
            let bare = std::str::from_utf8(first)
                .unwrap()
                .splitn(3, ',')
                .nth(2)
                .unwrap()
                .to_owned();
            let nonce = server_nonce(&server);
            let cf = tweak(client_final(&bare, &server, &secret, cb, &nonce), &nonce);
            server.finish(&cf, cb_data).map(|v| v.client_key)
        };
        let same = |cf: Vec<u8>, _: &str| cf;
        let hash = [7u8; 32];
        // Channel binding: the header and the certificate hash must both match.
        let first_plus = b"p=tls-server-end-point,,n=,r=q";
        let mut cb = b"p=tls-server-end-point,,".to_vec();
        cb.extend_from_slice(&hash);
        assert!(run(first_plus, MECHANISM_PLUS, true, &cb, Some(&hash), &same).is_ok());
        assert_eq!(
            run(first_plus, MECHANISM_PLUS, true, &cb, Some(&[8u8; 32]), &same).err(),
            Some(ScramError::ChannelBinding)
        );
        assert_eq!(
            run(first_plus, MECHANISM_PLUS, true, &cb, None, &same).err(),
            Some(ScramError::ChannelBinding)
        );
        assert_eq!(
            run(
                first_plus,
                MECHANISM_PLUS,
                true,
                b"p=tls-server-end-point,,",
                Some(&hash),
                &same
            )
            .err(),
            Some(ScramError::ChannelBinding)
        );
        assert_eq!(
            run(first_plus, MECHANISM, true, &cb, Some(&hash), &same).err(),
            Some(ScramError::ChannelBinding)
        );
        assert_eq!(
            run(b"n,,n=,r=q", MECHANISM, false, b"y,,", None, &same).err(),
            Some(ScramError::ChannelBinding)
        );
        assert!(run(b"y,,n=,r=q", MECHANISM, false, b"y,,", None, &same).is_ok());
        assert_eq!(
            run(b"y,,n=,r=q", MECHANISM, true, b"y,,", None, &same).err(),
            Some(ScramError::ChannelBinding)
        );
        // A c= too long to be a valid one, or not base64.
        let long = vec![b'n'; 200];
        assert_eq!(
            run(b"n,,n=,r=q", MECHANISM, false, &long, None, &same).err(),
            Some(ScramError::ChannelBinding)
        );
        let bad_c = |cf: Vec<u8>, _: &str| {
            let s = String::from_utf8(cf).unwrap();
            s.replacen("c=biws", "c=b!ws", 1).into_bytes()
        };
        assert_eq!(
            run(b"n,,n=,r=q", MECHANISM, false, b"n,,", None, &bad_c).err(),
            Some(ScramError::Malformed("channel binding"))
        );
        // The nonce must be the combined one.
        let other_nonce = |cf: Vec<u8>, nonce: &str| {
            let s = String::from_utf8(cf).unwrap();
            s.replacen(nonce, &format!("{nonce}x"), 1).into_bytes()
        };
        assert_eq!(
            run(b"n,,n=,r=q", MECHANISM, false, b"n,,", None, &other_nonce).err(),
            Some(ScramError::Nonce)
        );
        // Proofs: wrong length, far too long, not base64, wrong.
        let proof = |p: &'static str| {
            move |cf: Vec<u8>, _: &str| {
                let s = String::from_utf8(cf).unwrap();
                let (head, _) = s.rsplit_once(",p=").unwrap();
                format!("{head},p={p}").into_bytes()
            }
        };
        assert_eq!(
            run(b"n,,n=,r=q", MECHANISM, false, b"n,,", None, &proof("AAAA")).err(),
            Some(ScramError::InvalidProof)
        );
        let huge: &'static str = Box::leak("A".repeat(400).into_boxed_str());
        assert_eq!(
            run(b"n,,n=,r=q", MECHANISM, false, b"n,,", None, &proof(huge)).err(),
            Some(ScramError::InvalidProof)
        );
        assert_eq!(
            run(b"n,,n=,r=q", MECHANISM, false, b"n,,", None, &proof("!!!!")).err(),
            Some(ScramError::Malformed("proof"))
        );
        let zero = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        assert_eq!(
            run(b"n,,n=,r=q", MECHANISM, false, b"n,,", None, &proof(zero)).err(),
            Some(ScramError::InvalidProof)
        );
        // Malformed first messages.
        for first in [&b"x,,n=,r=q"[..], b"n,a=b,n=,r=q", b"n,,n=,r=", b"n,,n=", b"n", b"\xff"] {
            assert!(
                matches!(
                    run(first, MECHANISM, false, b"n,,", None, &same).err(),
                    Some(ScramError::Malformed(_)) | Some(ScramError::Nonce)
                ),
                "{first:?}"
            );
        }
    }

    #[test]
    fn decimal_writes_decimal() {
        for n in [0, 7, 10, 4096, 99_999, u32::MAX.into(), u64::MAX] {
            assert_eq!(crate::encode::decimal(n, &mut [0; 20]), n.to_string());
        }
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
