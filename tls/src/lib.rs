//! TLS for pgferry, on rustls with one explicitly chosen crypto provider
//! (aws-lc-rs): termination for clients on both listeners, and TLS from
//! the pools to PostgreSQL.
//!
//! - [`acceptor`]: the listeners' server configuration, swapped atomically
//!   on reload so that existing connections keep the one they started with;
//! - [`connector`]: server-side TLS with libpq's sslmode meanings;
//! - [`stream`]: a socket that is plain or TLS, and its two halves;
//! - [`endpoint`]: the tls-server-end-point hash for SCRAM channel binding.

#![forbid(unsafe_code)]

pub mod acceptor;
pub mod connector;
pub mod endpoint;
pub mod stream;

pub use acceptor::{Acceptor, Termination};
pub use connector::Connector;
pub use stream::{MaybeTls, ReadHalf, WriteHalf};

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// ALPN protocol name PostgreSQL 17 uses (and requires for direct TLS).
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {what}")]
    Pem { path: PathBuf, what: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA: {0}")]
    Verifier(String),
}

/// The one crypto provider pgferry uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// TLS versions from `min_version` ("1.2" or "1.3") up.
pub fn versions(min_version: &str) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static BOTH: [&rustls::SupportedProtocolVersion; 2] = [&rustls::version::TLS13, &rustls::version::TLS12];
    static ONLY_13: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
    if min_version == "1.3" {
        &ONLY_13
    } else {
        &BOTH
    }
}

fn load_certs(path: &Path) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })?;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.into(),
            what: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.into(),
            what: "no certificate found".into(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<rustls_pki_types::PrivateKeyDer<'static>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })?;
    rustls_pki_types::PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
        path: path.into(),
        what: e.to_string(),
    })
}

fn load_roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(path)? {
        roots.add(c).map_err(|e| TlsError::Pem {
            path: path.into(),
            what: e.to_string(),
        })?;
    }
    Ok(roots)
}
