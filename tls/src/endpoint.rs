//! The `tls-server-end-point` channel binding (RFC 5929): a hash of the
//! server's certificate, with the hash function of the certificate's
//! signature algorithm, SHA-256 when that is MD5 or SHA-1 — PostgreSQL
//! computes it this way, and a client compares it with its own.

use sha2::{Digest, Sha256, Sha384, Sha512};

/// The channel-binding data for a DER certificate.
pub fn server_end_point(cert_der: &[u8]) -> Vec<u8> {
    match signature_hash(cert_der) {
        Hash::Sha384 => Sha384::digest(cert_der).to_vec(),
        Hash::Sha512 => Sha512::digest(cert_der).to_vec(),
        Hash::Sha256 => Sha256::digest(cert_der).to_vec(),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

// DER bodies of the algorithm OIDs whose hash is not SHA-256.
const SHA384_WITH_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c];
const SHA512_WITH_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d];
const ECDSA_WITH_SHA384: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
const ECDSA_WITH_SHA512: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04];

/// Reads Certificate.signatureAlgorithm's OID:
/// `SEQUENCE { tbsCertificate SEQUENCE, AlgorithmIdentifier SEQUENCE { OID, ... }, BIT STRING }`.
fn signature_hash(der: &[u8]) -> Hash {
    fn oid(der: &[u8]) -> Option<&[u8]> {
        let (tag, cert, _) = tlv(der)?;
        if tag != 0x30 {
            return None;
        }
        let (_, _, after_tbs) = tlv(cert)?;
        let (tag, alg, _) = tlv(after_tbs)?;
        if tag != 0x30 {
            return None;
        }
        let (tag, oid, _) = tlv(alg)?;
        (tag == 0x06).then_some(oid)
    }
    match oid(der) {
        Some(SHA384_WITH_RSA | ECDSA_WITH_SHA384) => Hash::Sha384,
        Some(SHA512_WITH_RSA | ECDSA_WITH_SHA512) => Hash::Sha512,
        _ => Hash::Sha256,
    }
}

/// One DER element: (tag, contents, rest).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)?;
    let (len, start) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *b.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = start.checked_add(len)?;
    Some((tag, b.get(start..end)?, b.get(end..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_signature_algorithm() {
        for (alg, want) in [
            (&rcgen::PKCS_ECDSA_P256_SHA256, Hash::Sha256),
            (&rcgen::PKCS_ECDSA_P384_SHA384, Hash::Sha384),
        ] {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let cert = rcgen::CertificateParams::new(vec!["db.example".into()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            assert_eq!(signature_hash(cert.der()), want);
            let len = if want == Hash::Sha384 { 48 } else { 32 };
            assert_eq!(server_end_point(cert.der()).len(), len);
        }
    }

    #[test]
    fn garbage_defaults_to_sha256() {
        assert_eq!(signature_hash(&[]), Hash::Sha256);
        assert_eq!(signature_hash(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), Hash::Sha256);
        assert_eq!(signature_hash(&[0x30, 0x03, 0x30, 0x01]), Hash::Sha256);
    }
}
