//! TLS termination for the listeners.
//!
//! The current [`Termination`] lives in an `ArcSwap`: a reload (SIGHUP)
//! builds a new one from the files and swaps it in; handshakes already
//! under way and established connections keep the one they started with.
//! A reload that fails keeps the old configuration.

use crate::{load_certs, load_key, load_roots, provider, versions, TlsError, ALPN_POSTGRESQL};
use arc_swap::ArcSwapOption;
use pgferry_config::{ClientCert, ClientTls};
use std::sync::Arc;

/// One loaded certificate, key and policy.
pub struct Termination {
    pub config: Arc<rustls::ServerConfig>,
    /// tls-server-end-point data of our certificate, for SCRAM-SHA-256-PLUS.
    pub end_point: Arc<[u8]>,
    /// When the certificate expires (Unix seconds), for the expiry alert.
    pub not_after: Option<i64>,
}

impl Termination {
    pub fn load(t: &pgferry_config::Tls) -> Result<Option<Termination>, TlsError> {
        let (Some(cert), Some(key)) = (&t.cert_file, &t.key_file) else {
            return Ok(None);
        };
        if t.client_tls() == ClientTls::Disable {
            return Ok(None);
        }
        let chain = load_certs(cert)?;
        let key = load_key(key)?;
        let builder =
            rustls::ServerConfig::builder_with_provider(provider()).with_protocol_versions(versions(&t.min_version))?;
        let builder = match &t.client_ca_file {
            Some(ca) => {
                let roots = Arc::new(load_roots(ca)?);
                let v = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider());
                let v = match t.client_cert {
                    ClientCert::Optional => v.allow_unauthenticated(),
                    ClientCert::Require => v,
                };
                builder.with_client_cert_verifier(v.build().map_err(|e| TlsError::Verifier(e.to_string()))?)
            }
            None => builder.with_no_client_auth(),
        };
        let end_point = crate::endpoint::server_end_point(&chain[0]).into();
        let not_after = x509_parser::parse_x509_certificate(&chain[0])
            .ok()
            .map(|(_, c)| c.validity().not_after.timestamp());
        let mut config = builder.with_single_cert(chain, key)?;
        // Clients that offer ALPN must offer "postgresql" (PostgreSQL 17
        // does the same); direct TLS additionally requires it.
        config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        Ok(Some(Termination {
            config: Arc::new(config),
            end_point,
            not_after,
        }))
    }
}

/// The listeners' TLS state.
pub struct Acceptor {
    mode: ClientTls,
    current: ArcSwapOption<Termination>,
}

impl Acceptor {
    pub fn new(t: &pgferry_config::Tls) -> Result<Acceptor, TlsError> {
        Ok(Acceptor {
            mode: t.client_tls(),
            current: ArcSwapOption::from(Termination::load(t)?.map(Arc::new)),
        })
    }

    pub fn mode(&self) -> ClientTls {
        self.mode
    }

    /// The configuration for a new handshake; None when TLS is off.
    pub fn current(&self) -> Option<Arc<Termination>> {
        self.current.load_full()
    }

    /// Re-reads the certificate and key. On error the old ones stay.
    pub fn reload(&self, t: &pgferry_config::Tls) -> Result<(), TlsError> {
        if self.mode == ClientTls::Disable {
            return Ok(());
        }
        self.replace(Termination::load(t)?);
        Ok(())
    }

    /// Puts a [`Termination`] loaded beforehand (off the async runtime:
    /// loading reads files) in force. Ignored while TLS is disabled.
    pub fn replace(&self, new: Option<Termination>) {
        if self.mode != ClientTls::Disable {
            self.current.store(new.map(Arc::new));
        }
    }
}
