//! Usage receipts: the agent signs what an attempt used with its node key (ed25519), the
//! operator verifies the signature against the key the node registered at join, and auditors
//! can verify it again from the ledger. The signature covers the exact encoded body bytes, so
//! both sides hash and verify the same bytes and never re-encode.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use prost::Message;

use crate::v1::{ReceiptBody, UsageReceipt};

/// Domain separation: a receipt signature can never be mistaken for another signature made
/// with the node key (its certificate requests), nor the other way round.
pub const SIGNING_CONTEXT: &[u8] = b"kommune.receipt.v1\0";

/// Largest encoded body accepted; a real one is a few hundred bytes.
pub const MAX_BODY_BYTES: usize = 4096;

/// Why a receipt does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    #[error("receipt body is {0} bytes, more than the {MAX_BODY_BYTES} allowed")]
    TooLarge(usize),
    #[error("receipt body does not decode: {0}")]
    Malformed(String),
    #[error("receipt signature is {0} bytes, not 64")]
    BadSignatureLength(usize),
    #[error("node public key is not a valid ed25519 key")]
    BadKey,
    #[error("receipt signature does not verify with the node's registered key")]
    BadSignature,
}

/// The bytes actually signed: the context followed by the body.
pub fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNING_CONTEXT.len() + body.len());
    m.extend_from_slice(SIGNING_CONTEXT);
    m.extend_from_slice(body);
    m
}

/// Encodes and signs `body` with the node key.
pub fn sign(body: &ReceiptBody, key: &SigningKey) -> UsageReceipt {
    let bytes = body.encode_to_vec();
    let signature = key.sign(&signed_message(&bytes));
    UsageReceipt { body: bytes, signature: signature.to_bytes().to_vec() }
}

/// Decodes a receipt body without checking the signature (for display and for storing a
/// rejected receipt with its reason).
pub fn decode(receipt: &UsageReceipt) -> Result<ReceiptBody, ReceiptError> {
    decode_body(&receipt.body)
}

/// Decodes a receipt body (the signed bytes) without checking any signature.
pub fn decode_body(body: &[u8]) -> Result<ReceiptBody, ReceiptError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(ReceiptError::TooLarge(body.len()));
    }
    ReceiptBody::decode(body).map_err(|e| ReceiptError::Malformed(e.to_string()))
}

/// Checks the signature over the body with `public_key` (32 raw bytes) and decodes the body.
pub fn verify(receipt: &UsageReceipt, public_key: &[u8]) -> Result<ReceiptBody, ReceiptError> {
    let body = decode(receipt)?;
    let key: [u8; 32] = public_key.try_into().map_err(|_| ReceiptError::BadKey)?;
    let key = VerifyingKey::from_bytes(&key).map_err(|_| ReceiptError::BadKey)?;
    let sig: [u8; 64] = receipt.signature.as_slice().try_into().map_err(|_| ReceiptError::BadSignatureLength(receipt.signature.len()))?;
    key.verify(&signed_message(&receipt.body), &Signature::from_bytes(&sig)).map_err(|_| ReceiptError::BadSignature)?;
    Ok(body)
}

/// Loads a node signing key from the PKCS#8 PEM the agent keeps in its state directory.
pub fn signing_key_from_pem(pem: &str) -> Result<SigningKey, String> {
    use ed25519_dalek::pkcs8::DecodePrivateKey;
    SigningKey::from_pkcs8_pem(pem).map_err(|e| format!("node key is not an ed25519 PKCS#8 key: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{AttemptState, Usage};

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn body() -> ReceiptBody {
        ReceiptBody {
            node: "pn-1".into(),
            epoch: 7,
            sequence: 3,
            attempt_id: "a-1".into(),
            job: "ns/j".into(),
            state: AttemptState::Succeeded as i32,
            usage: Some(Usage { wall_millis: 1200, cpu_micros: 900_000, source: "rusage".into(), ..Default::default() }),
            started_unix_millis: 1,
            finished_unix_millis: 1201,
        }
    }

    #[test]
    fn a_signed_receipt_verifies_with_its_key_only() {
        let k = key(1);
        let r = sign(&body(), &k);
        assert_eq!(verify(&r, k.verifying_key().as_bytes()).unwrap(), body());
        assert_eq!(verify(&r, key(2).verifying_key().as_bytes()), Err(ReceiptError::BadSignature));
        assert_eq!(verify(&r, &[0u8; 31]), Err(ReceiptError::BadKey));
    }

    #[test]
    fn any_changed_byte_breaks_the_signature() {
        let k = key(1);
        let r = sign(&body(), &k);
        for i in 0..r.body.len() {
            let mut bad = r.clone();
            bad.body[i] ^= 0x01;
            assert!(verify(&bad, k.verifying_key().as_bytes()).is_err(), "byte {i}");
        }
        let mut bad = r.clone();
        bad.signature[10] ^= 0x80;
        assert_eq!(verify(&bad, k.verifying_key().as_bytes()), Err(ReceiptError::BadSignature));
        bad.signature.pop();
        assert_eq!(verify(&bad, k.verifying_key().as_bytes()), Err(ReceiptError::BadSignatureLength(63)));
    }

    #[test]
    fn oversized_and_garbage_bodies_are_refused_before_any_crypto() {
        let big = UsageReceipt { body: vec![0; MAX_BODY_BYTES + 1], signature: vec![0; 64] };
        assert_eq!(decode(&big), Err(ReceiptError::TooLarge(MAX_BODY_BYTES + 1)));
        let garbage = UsageReceipt { body: vec![0xff; 10], signature: vec![0; 64] };
        assert!(matches!(decode(&garbage), Err(ReceiptError::Malformed(_))));
    }

    #[test]
    fn the_agent_key_pem_loads() {
        use ed25519_dalek::pkcs8::{EncodePrivateKey, spki::der::pem::LineEnding};
        let pem = key(9).to_pkcs8_pem(LineEnding::LF).unwrap();
        assert_eq!(signing_key_from_pem(&pem).unwrap().to_bytes(), key(9).to_bytes());
        assert!(signing_key_from_pem("nope").unwrap_err().contains("ed25519"));
    }
}
