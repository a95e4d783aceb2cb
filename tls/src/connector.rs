//! TLS from pgferry to PostgreSQL, with libpq's sslmode meanings:
//! `prefer` and `require` encrypt without checking the certificate (unless
//! a CA file is given, as libpq does with a root certificate), `verify-ca`
//! checks the chain, `verify-full` also the host name. SNI is sent when the
//! host is a name.

use crate::{load_certs, load_key, load_roots, provider, TlsError, ALPN_POSTGRESQL};
use pgferry_config::ServerTls;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use std::sync::Arc;
use tokio::net::TcpStream;

pub struct Connector {
    pub mode: ServerTls,
    config: Option<Arc<rustls::ClientConfig>>,
}

impl Connector {
    pub fn new(t: &pgferry_config::Tls) -> Result<Connector, TlsError> {
        if t.server_tls == ServerTls::Disable {
            return Ok(Connector {
                mode: t.server_tls,
                config: None,
            });
        }
        let p = provider();
        let builder =
            rustls::ClientConfig::builder_with_provider(p.clone()).with_protocol_versions(crate::versions("1.2"))?;
        let verifier: Arc<dyn ServerCertVerifier> = match (&t.server_ca_file, t.server_tls) {
            (Some(ca), mode) => {
                let roots = Arc::new(load_roots(ca)?);
                let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, p.clone())
                    .build()
                    .map_err(|e| TlsError::Verifier(e.to_string()))?;
                Arc::new(Verify {
                    inner: webpki,
                    check_name: mode == ServerTls::VerifyFull,
                })
            }
            (None, _) => Arc::new(Encrypt(p)),
        };
        let builder = builder.dangerous().with_custom_certificate_verifier(verifier);
        let mut config = match (&t.server_cert_file, &t.server_key_file) {
            (Some(c), Some(k)) => builder.with_client_auth_cert(load_certs(c)?, load_key(k)?)?,
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        Ok(Connector {
            mode: t.server_tls,
            config: Some(Arc::new(config)),
        })
    }

    /// The rustls configuration, for control-plane connections made by
    /// tokio-postgres; None when server_tls = disable.
    pub fn client_config(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.config.clone()
    }

    /// Whether to send SSLRequest at all.
    pub fn wants_tls(&self) -> bool {
        self.config.is_some()
    }

    /// Whether a server answering 'N' is acceptable.
    pub fn plaintext_allowed(&self) -> bool {
        matches!(self.mode, ServerTls::Disable | ServerTls::Prefer)
    }

    /// Runs the TLS handshake after the server answered 'S'.
    pub async fn connect(
        &self,
        host: &str,
        tcp: TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let config = self.config.clone().expect("wants_tls was checked");
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        tokio_rustls::TlsConnector::from(config).connect(name, tcp).await
    }
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Connector({:?})", self.mode)
    }
}

/// prefer / require without a CA: encryption against passive listeners
/// only, as in libpq. The handshake signature is still checked.
#[derive(Debug)]
struct Encrypt(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Encrypt {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// verify-ca (chain only) and verify-full (chain and host name).
#[derive(Debug)]
struct Verify {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for Verify {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
