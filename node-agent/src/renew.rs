//! Node certificate renewal: the agent asks over its live session once less than a third of
//! its certificate's lifetime remains, and keeps the new one in its state directory.
//!
//! The key never changes: the request is for the node's own key, so receipts stay verifiable
//! with the key the ledger already has. A new certificate is used from the next connection.

use std::path::Path;
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair};

/// How often a running agent looks at its certificate's expiry (also at every session start).
pub const CHECK_EVERY: Duration = Duration::from_secs(3600);

/// Why a renewal could not be asked for or kept.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error("cannot make a renewal request with the node key: {0}")]
    Request(String),
    #[error("the operator's new certificate is not usable: {0}")]
    Unusable(String),
    #[error("cannot write the new certificate to {path}: {source}")]
    Write { path: String, source: std::io::Error },
}

/// (not before, not after) of a PEM certificate, in unix seconds.
fn validity(cert_pem: &str) -> Option<(i64, i64)> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    Some((cert.validity().not_before.timestamp(), cert.validity().not_after.timestamp()))
}

/// Whether less than a third of the certificate's lifetime remains at `now` (unix seconds).
/// An unreadable certificate is left alone: the session would fail on it anyway, with an error.
pub fn needs_renewal(cert_pem: &str, now: i64) -> bool {
    validity(cert_pem).is_some_and(|(from, until)| (until - now).saturating_mul(3) < until - from)
}

/// A CSR (DER) for the node's own key, naming the node.
pub fn request(key_pem: &str, node_name: &str) -> Result<Vec<u8>, RenewError> {
    let key = KeyPair::from_pem(key_pem).map_err(|e| RenewError::Request(e.to_string()))?;
    let mut params = CertificateParams::new(vec![node_name.to_string()]).map_err(|e| RenewError::Request(e.to_string()))?;
    // rcgen's default subject is a placeholder name; the request names this node or nothing.
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, node_name);
    Ok(params.serialize_request(&key).map_err(|e| RenewError::Request(e.to_string()))?.der().to_vec())
}

/// Checks that `cert_pem` certifies this node's key, then replaces `<dir>/node.crt` with it
/// atomically (a crash leaves the old or the new file, never half of one).
pub fn install(dir: &Path, key_pem: &str, cert_pem: &str) -> Result<(), RenewError> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let key = KeyPair::from_pem(key_pem).map_err(|e| RenewError::Request(e.to_string()))?;
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| RenewError::Unusable(e.to_string()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| RenewError::Unusable(e.to_string()))?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(RenewError::Unusable("it certifies another key".into()));
    }
    let (path, tmp) = (dir.join("node.crt"), dir.join("node.crt.new"));
    let write = |p: &Path, r: std::io::Result<()>| r.map_err(|source| RenewError::Write { path: p.display().to_string(), source });
    write(&tmp, std::fs::write(&tmp, cert_pem))?;
    write(&tmp, std::fs::File::open(&tmp).and_then(|f| f.sync_all()))?;
    write(&path, std::fs::rename(&tmp, &path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(key: &KeyPair, from: i64, until: i64) -> String {
        let mut params = CertificateParams::new(vec!["n".to_string()]).unwrap();
        params.not_before = time_of(from);
        params.not_after = time_of(until);
        params.self_signed(key).unwrap().pem()
    }

    fn time_of(secs: i64) -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp(secs).unwrap()
    }

    #[test]
    fn renewal_is_due_once_less_than_a_third_of_the_lifetime_remains() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let c = cert(&key, 0, 90 * 86400);
        assert!(!needs_renewal(&c, 0));
        assert!(!needs_renewal(&c, 59 * 86400), "31 days left of 90");
        assert!(needs_renewal(&c, 61 * 86400), "29 days left of 90");
        assert!(needs_renewal(&c, 91 * 86400), "expired");
        assert!(!needs_renewal("not a certificate", 0));
    }

    #[test]
    fn a_new_certificate_replaces_the_old_only_when_it_certifies_the_node_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        std::fs::write(dir.path().join("node.crt"), "old").unwrap();
        let other = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let err = install(dir.path(), &key.serialize_pem(), &cert(&other, 0, 100)).unwrap_err();
        assert!(err.to_string().contains("another key"), "{err}");
        assert_eq!(std::fs::read_to_string(dir.path().join("node.crt")).unwrap(), "old");
        let new = cert(&key, 0, 100);
        install(dir.path(), &key.serialize_pem(), &new).unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("node.crt")).unwrap(), new);
        assert!(!dir.path().join("node.crt.new").exists());
        assert!(!request(&key.serialize_pem(), "n").unwrap().is_empty());
    }
}
