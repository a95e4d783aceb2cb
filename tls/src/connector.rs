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
        let algs = &self.0.signature_verification_algorithms;
        match rustls::crypto::verify_tls13_signature(m, c, d, algs) {
            // An X.509 v1 certificate (Citus's generated self-signed one is):
            // webpki refuses to parse it, but without verification the
            // certificate is only a carrier for the key that signed the
            // handshake, as in libpq's sslmode=require. Check the signature
            // with that key.
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(_))) => {
                let spki = subject_public_key_info(c)
                    .ok_or(rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
                rustls::crypto::verify_tls13_signature_with_raw_key(m, &spki.into(), d, algs)
            }
            r => r,
        }
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The SubjectPublicKeyInfo of a DER certificate (any X.509 version): the
/// seventh element of tbsCertificate, or the sixth without the optional
/// version.
fn subject_public_key_info(cert: &[u8]) -> Option<&[u8]> {
    /// One DER element at the start of `b`: (tag, whole element, content, rest).
    type Tlv<'a> = (u8, &'a [u8], &'a [u8], &'a [u8]);
    fn tlv(b: &[u8]) -> Option<Tlv<'_>> {
        let (&tag, rest) = b.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (first as usize, rest)
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n].iter().fold(0usize, |a, &x| (a << 8) | x as usize);
            (len, &rest[n..])
        };
        if rest.len() < len {
            return None;
        }
        let header = b.len() - rest.len();
        Some((tag, &b[..header + len], &rest[..len], &rest[len..]))
    }
    let (0x30, _, cert, _) = tlv(cert)? else { return None };
    let (0x30, _, mut tbs, _) = tlv(cert)? else { return None };
    let mut index = 0;
    loop {
        let (tag, whole, _, rest) = tlv(tbs)?;
        if index == 0 && tag == 0xa0 {
            // [0] version: not counted.
        } else {
            index += 1;
            if index == 6 {
                return (tag == 0x30).then_some(whole);
            }
        }
        tbs = rest;
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

#[cfg(test)]
mod spki_tests {
    use super::subject_public_key_info;
    use rcgen::PublicKeyData;

    #[test]
    fn finds_the_key_with_and_without_a_version() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().to_vec();
        assert_eq!(
            subject_public_key_info(&der).unwrap(),
            key.subject_public_key_info().as_slice()
        );
        // The same certificate without its [0] version element (X.509 v1
        // layout): the key is still found.
        let v1 = strip_version(&der);
        assert_eq!(
            subject_public_key_info(&v1).unwrap(),
            key.subject_public_key_info().as_slice()
        );
        for cut in 0..der.len() {
            let _ = subject_public_key_info(&der[..cut]);
        }
    }

    /// Re-encodes `der` without tbsCertificate's version (lengths < 64 KiB).
    fn strip_version(der: &[u8]) -> Vec<u8> {
        fn header(tag: u8, len: usize) -> Vec<u8> {
            if len < 0x80 {
                vec![tag, len as u8]
            } else if len < 0x100 {
                vec![tag, 0x81, len as u8]
            } else {
                vec![tag, 0x82, (len >> 8) as u8, len as u8]
            }
        }
        fn split(b: &[u8]) -> (usize, usize) {
            // (header length, content length)
            if b[1] < 0x80 {
                (2, b[1] as usize)
            } else {
                let n = (b[1] & 0x7f) as usize;
                (2 + n, b[2..2 + n].iter().fold(0, |a, &x| (a << 8) | x as usize))
            }
        }
        let (h, _) = split(der);
        let cert = &der[h..];
        let (th, tl) = split(cert);
        let tbs = &cert[th..th + tl];
        let rest_of_cert = &cert[th + tl..];
        let (vh, vl) = split(tbs);
        let tbs_v1 = &tbs[vh + vl..];
        let mut new_tbs = header(0x30, tbs_v1.len());
        new_tbs.extend_from_slice(tbs_v1);
        let mut body = new_tbs;
        body.extend_from_slice(rest_of_cert);
        let mut out = header(0x30, body.len());
        out.extend(body);
        out
    }
}
