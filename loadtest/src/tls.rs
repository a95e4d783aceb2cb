//! TLS for the generator: SSLRequest, then a rustls handshake that accepts
//! any server certificate (benchmarks run against self-signed certificates
//! on loopback; nothing here is fit for anything else).

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio_rustls::TlsConnector;

/// Accepts every certificate; still checks the handshake signatures, so the
/// server does its full share of the work.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What the client offers.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// Key-exchange groups to offer, by rustls name (e.g. `X25519`,
    /// `X25519MLKEM768`, `secp256r1`); empty: the provider's defaults.
    pub groups: Vec<String>,
    /// Resume TLS sessions across connections (libpq does not).
    pub resume: bool,
}

/// The connector shared by all connections to TLS targets: aws-lc-rs only,
/// TLS 1.2 and 1.3, no certificate verification, and by default no session
/// resumption, so every connection pays a full handshake as a libpq client
/// does.
pub fn connector(opts: &TlsOptions) -> Result<TlsConnector> {
    let mut provider = aws_lc_rs::default_provider();
    if !opts.groups.is_empty() {
        let all = provider.kx_groups.clone();
        provider.kx_groups = opts
            .groups
            .iter()
            .map(|want| {
                all.iter()
                    .find(|g| format!("{:?}", g.name()).eq_ignore_ascii_case(want))
                    .copied()
                    .with_context(|| {
                        let names: Vec<String> = all.iter().map(|g| format!("{:?}", g.name())).collect();
                        format!("unknown key-exchange group {want:?}; known: {}", names.join(", "))
                    })
            })
            .collect::<Result<_>>()?;
    }
    let provider = Arc::new(provider);
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
        .with_no_client_auth();
    if !opts.resume {
        config.resumption = Resumption::disabled();
    }
    Ok(TlsConnector::from(Arc::new(config)))
}

/// "TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519MLKEM768" for an established connection.
pub fn describe(conn: &rustls::ClientConnection) -> String {
    let version = conn.protocol_version().map_or("-".to_owned(), |v| format!("{v:?}"));
    let suite = conn
        .negotiated_cipher_suite()
        .map_or("-".to_owned(), |s| format!("{:?}", s.suite()));
    let group = conn
        .negotiated_key_exchange_group()
        .map_or("-".to_owned(), |g| format!("{:?}", g.name()));
    format!(
        "version={version} suite={suite} group={group} resumed={:?}",
        conn.handshake_kind()
    )
}

/// Checks the one-byte answer to SSLRequest.
pub fn check_ssl_answer(b: u8) -> Result<()> {
    match b {
        b'S' => Ok(()),
        b'N' => bail!("server refused TLS (answered N to SSLRequest)"),
        b'E' => bail!("server answered SSLRequest with an error"),
        other => bail!("unexpected answer {other:#04x} to SSLRequest"),
    }
}
