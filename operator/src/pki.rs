//! The operator's certificate authority: it signs the gateway's serving certificate and each
//! node's client certificate. Agents pin it by the hash carried in their join token, so no
//! public CA or cert-manager is involved.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType,
};
use std::sync::atomic::{AtomicI64, Ordering};

use time::{Duration, OffsetDateTime};

/// How long a node's client certificate is valid by default. Agents renew it over their
/// session once less than a third of it remains (see [`Ca::renew_node`]).
pub const NODE_CERT_VALIDITY: Duration = Duration::days(90);
const CA_VALIDITY: Duration = Duration::days(3650);
const SERVER_CERT_VALIDITY: Duration = Duration::days(365);

/// A PKI failure.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot parse the CA certificate or key: {0}")]
    LoadCa(rcgen::Error),
    #[error("cannot create a certificate: {0}")]
    Issue(rcgen::Error),
    #[error("the certificate signing request is invalid: {0}")]
    BadCsr(rcgen::Error),
    #[error("the certificate signing request uses {0}; node keys must be ed25519")]
    WrongKeyType(String),
    #[error("the renewal request is for another key than the one registered for node {0}")]
    OtherKey(String),
    #[error("the renewal request names {named:?}, not this session's node {node}")]
    OtherName { node: String, named: String },
}

/// The operator CA: certificate and signing key.
pub struct Ca {
    cert_pem: String,
    cert_der: Vec<u8>,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
    /// Lifetime of node certificates signed from now on, in seconds.
    node_validity_secs: AtomicI64,
}

fn validity(params: &mut CertificateParams, length: Duration) {
    let now = OffsetDateTime::now_utc();
    // Backdate a little so clocks slightly behind ours still accept the certificate.
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + length;
}

impl Ca {
    /// A fresh CA with an ECDSA P-256 key.
    pub fn generate() -> Result<Ca, PkiError> {
        let key = KeyPair::generate().map_err(PkiError::Issue)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "kommune-operator-ca");
        dn.push(DnType::OrganizationName, "kommune.dev");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        validity(&mut params, CA_VALIDITY);
        let cert = params.self_signed(&key).map_err(PkiError::Issue)?;
        let key_pem = key.serialize_pem();
        Ok(Ca { cert_pem: cert.pem(), cert_der: cert.der().to_vec(), key_pem, issuer: Issuer::new(params, key), node_validity_secs: default_node_validity() })
    }

    /// Loads a CA kept as PEM (e.g. in the `kommune-ca` Secret).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(PkiError::LoadCa)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(PkiError::LoadCa)?;
        let der = pem_to_der(cert_pem).ok_or(PkiError::LoadCa(rcgen::Error::CouldNotParseCertificate))?;
        Ok(Ca { cert_pem: cert_pem.to_string(), cert_der: der, key_pem: key_pem.to_string(), issuer, node_validity_secs: default_node_validity() })
    }

    /// Sets how long node certificates signed from now on are valid (tests use seconds).
    pub fn set_node_validity(&self, validity: std::time::Duration) {
        self.node_validity_secs.store(i64::try_from(validity.as_secs()).unwrap_or(i64::MAX).max(1), Ordering::Relaxed);
    }

    fn node_validity(&self) -> Duration {
        Duration::seconds(self.node_validity_secs.load(Ordering::Relaxed))
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The pin agents check: sha256 of the CA certificate's DER.
    pub fn pin(&self) -> String {
        kommune_proto::ca_pin(&self.cert_der)
    }

    /// A serving certificate for the gateway, valid for `GATEWAY_SERVER_NAME` plus `extra_names`.
    /// Returns (certificate chain PEM: leaf then CA, key PEM).
    pub fn issue_server(&self, extra_names: &[String]) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate().map_err(PkiError::Issue)?;
        let mut names = vec![kommune_proto::GATEWAY_SERVER_NAME.to_string()];
        names.extend(extra_names.iter().cloned());
        let mut params = CertificateParams::new(names).map_err(PkiError::Issue)?;
        params.distinguished_name.push(DnType::CommonName, "kommune-gateway");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, SERVER_CERT_VALIDITY);
        let cert = params.signed_by(&key, &self.issuer).map_err(PkiError::Issue)?;
        // The chain carries the CA so a joining agent can find and pin it in the handshake.
        Ok((format!("{}{}", cert.pem(), self.cert_pem), key.serialize_pem()))
    }

    /// Signs a node's CSR. The subject is set by the operator (CN = node name), never taken from
    /// the request. Returns (certificate PEM, sha256 of the node's public key).
    pub fn sign_node(&self, csr_der: &[u8], node_name: &str) -> Result<(String, String), PkiError> {
        let csr = parse_node_csr(csr_der)?;
        self.sign_parsed(csr, node_name)
    }

    /// Signs a renewal on a node's live session: only for that session's node name and the key
    /// registered for it (`registered_key_sha256`), so a node cannot obtain a certificate for
    /// another name or move its name to another key. A subject or DNS name in the request must
    /// name the node. Returns the certificate PEM.
    pub fn renew_node(&self, csr_der: &[u8], node_name: &str, registered_key_sha256: &str) -> Result<String, PkiError> {
        let csr = parse_node_csr(csr_der)?;
        if kommune_proto::sha256_hex(csr.public_key.der_bytes()) != registered_key_sha256 {
            return Err(PkiError::OtherKey(node_name.to_string()));
        }
        let other = |named: String| PkiError::OtherName { node: node_name.to_string(), named };
        for (kind, value) in csr.params.distinguished_name.iter() {
            if *kind == DnType::CommonName {
                let named = match value {
                    rcgen::DnValue::Utf8String(s) => s.clone(),
                    rcgen::DnValue::PrintableString(s) => s.as_str().to_string(),
                    rcgen::DnValue::Ia5String(s) => s.as_str().to_string(),
                    other_value => format!("{other_value:?}"),
                };
                if named != node_name {
                    return Err(other(named));
                }
            }
        }
        for san in &csr.params.subject_alt_names {
            match san {
                SanType::DnsName(n) if n.as_str() == node_name => {}
                other_san => return Err(other(format!("{other_san:?}"))),
            }
        }
        Ok(self.sign_parsed(csr, node_name)?.0)
    }

    fn sign_parsed(&self, csr: CertificateSigningRequestParams, node_name: &str) -> Result<(String, String), PkiError> {
        let key_sha = kommune_proto::sha256_hex(csr.public_key.der_bytes());
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, node_name);
        params.subject_alt_names = vec![SanType::DnsName(node_name.try_into().map_err(PkiError::Issue)?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, self.node_validity());
        let cert = params.signed_by(&csr.public_key, &self.issuer).map_err(PkiError::Issue)?;
        Ok((cert.pem(), key_sha))
    }
}

fn default_node_validity() -> AtomicI64 {
    AtomicI64::new(NODE_CERT_VALIDITY.whole_seconds())
}

/// A node's CSR, checked: well-formed, self-signed, for an ed25519 key.
fn parse_node_csr(csr_der: &[u8]) -> Result<CertificateSigningRequestParams, PkiError> {
    let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into()).map_err(PkiError::BadCsr)?;
    if csr.public_key.algorithm() != &rcgen::PKCS_ED25519 {
        return Err(PkiError::WrongKeyType(format!("{:?}", csr.public_key.algorithm())));
    }
    Ok(csr)
}

fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::from_pem_slice(pem.as_bytes()).ok().map(|c| c.to_vec())
}

/// The node name in a peer certificate (its common name), as verified by the TLS layer.
pub fn node_name_of(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}

/// The raw ed25519 public key (32 bytes) a certificate certifies; None for other key types.
pub fn public_key_of(cert_der: &[u8]) -> Option<[u8; 32]> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    cert.public_key().subject_public_key.data.as_ref().try_into().ok()
}

/// sha256 of the subject public key (the raw key bits) of a certificate.
pub fn public_key_sha256_of(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(kommune_proto::sha256_hex(&cert.public_key().subject_public_key.data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node_csr(name: &str) -> (KeyPair, Vec<u8>) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let params = CertificateParams::new(vec![name.to_string()]).unwrap();
        let csr = params.serialize_request(&key).unwrap();
        (key, csr.der().to_vec())
    }

    #[test]
    fn ca_round_trips_through_pem_and_keeps_its_pin() {
        let ca = Ca::generate().unwrap();
        let again = Ca::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        assert_eq!(ca.pin(), again.pin());
        assert!(kommune_proto::is_sha256_hex(&ca.pin()));
        // The reloaded CA still signs.
        let (_, csr) = node_csr("n1");
        again.sign_node(&csr, "n1").unwrap();
    }

    #[test]
    fn node_certificates_carry_the_operator_chosen_name_and_the_csr_key() {
        let ca = Ca::generate().unwrap();
        let (key, csr) = node_csr("chosen-by-agent");
        let (pem, key_sha) = ca.sign_node(&csr, "pn-assigned").unwrap();
        let der = pem_to_der(&pem).unwrap();
        assert_eq!(node_name_of(&der).as_deref(), Some("pn-assigned"));
        assert_eq!(public_key_sha256_of(&der).unwrap(), key_sha);
        assert_eq!(public_key_of(&der).unwrap().as_slice(), key.public_key_raw());
        assert_eq!(key_sha, kommune_proto::sha256_hex(key.public_key_raw()));
    }

    /// A renewal request as the agent makes it: subject and DNS name are the node's.
    fn renewal_csr(key: &KeyPair, name: &str) -> Vec<u8> {
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.serialize_request(key).unwrap().der().to_vec()
    }

    #[test]
    fn renewals_are_signed_only_for_the_sessions_name_and_registered_key() {
        let ca = Ca::generate().unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let csr = renewal_csr(&key, "n1");
        let (_, key_sha) = ca.sign_node(&csr, "n1").unwrap();
        let pem = ca.renew_node(&csr, "n1", &key_sha).unwrap();
        let der = pem_to_der(&pem).unwrap();
        assert_eq!((node_name_of(&der).as_deref(), public_key_sha256_of(&der)), (Some("n1"), Some(key_sha.clone())));
        assert_eq!(public_key_of(&der).unwrap().as_slice(), key.public_key_raw());
        // Another key under this node's name: refused.
        let other_key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        assert!(matches!(ca.renew_node(&renewal_csr(&other_key, "n1"), "n1", &key_sha), Err(PkiError::OtherKey(_))));
        // This key asking for another node's name: refused, by DNS name or by subject.
        let mut by_san = CertificateParams::new(vec!["victim".to_string()]).unwrap();
        by_san.distinguished_name = DistinguishedName::new();
        let by_san = by_san.serialize_request(&key).unwrap();
        assert!(matches!(ca.renew_node(by_san.der(), "n1", &key_sha), Err(PkiError::OtherName { .. })), "the SAN names another node");
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "victim");
        let by_cn = params.serialize_request(&key).unwrap();
        let err = ca.renew_node(by_cn.der(), "n1", &key_sha).unwrap_err().to_string();
        assert!(err.contains("victim") && err.contains("n1"), "{err}");
        // An empty subject is fine: the operator sets it.
        let mut bare = CertificateParams::new(Vec::<String>::new()).unwrap();
        bare.distinguished_name = DistinguishedName::new();
        let bare = bare.serialize_request(&key).unwrap();
        ca.renew_node(bare.der(), "n1", &key_sha).unwrap();
    }

    #[test]
    fn node_certificates_last_the_configured_lifetime() {
        let ca = Ca::generate().unwrap();
        let (_, csr) = node_csr("n");
        let lifetime = |pem: &str| {
            let der = pem_to_der(pem).unwrap();
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            cert.validity().not_after.timestamp() - OffsetDateTime::now_utc().unix_timestamp()
        };
        let days90 = lifetime(&ca.sign_node(&csr, "n").unwrap().0);
        assert!((NODE_CERT_VALIDITY.whole_seconds() - 5..=NODE_CERT_VALIDITY.whole_seconds()).contains(&days90), "{days90}");
        ca.set_node_validity(std::time::Duration::from_secs(30));
        assert!((25..=30).contains(&lifetime(&ca.sign_node(&csr, "n").unwrap().0)));
    }

    #[test]
    fn bad_csrs_are_refused() {
        let ca = Ca::generate().unwrap();
        assert!(matches!(ca.sign_node(b"not a csr", "n"), Err(PkiError::BadCsr(_))));
        let (_, mut csr) = node_csr("n");
        let last = csr.len() - 1;
        csr[last] ^= 0xff; // break the signature
        assert!(matches!(ca.sign_node(&csr, "n"), Err(PkiError::BadCsr(_))));
        let p256 = KeyPair::generate().unwrap();
        let csr = CertificateParams::new(vec!["n".into()]).unwrap().serialize_request(&p256).unwrap();
        assert!(matches!(ca.sign_node(csr.der(), "n"), Err(PkiError::WrongKeyType(_))));
    }
}
