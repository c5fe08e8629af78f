//! The operator key in force (the one the newest operator-signed line names) and its rotation:
//! a writer with another key is refused, and a new key is a ledger line signed by the old one.

use ed25519_dalek::SigningKey;

use super::backend::Backend;
use super::chain::Batch;
use super::entry::{EntryKind, fingerprint};
use super::{LedgerError, load_state};

/// How many of the newest operator lines are looked at: the newest one names the key unless it
/// is a node key written before node keys were signed.
const LINES: u64 = 256;

/// The key in force and the seq of the line that says so, or None on a ledger with no
/// operator-signed line yet.
pub fn key_in_force(b: &mut dyn Backend) -> Result<Option<(u64, [u8; 32])>, LedgerError> {
    for e in b.last_operator_lines(LINES)? {
        let key = match e.kind {
            EntryKind::KeyRotation => e.body.as_slice().try_into().ok(),
            _ => e.operator_signer(),
        };
        if let Some(key) = key {
            return Ok(Some((e.seq, key)));
        }
    }
    Ok(None)
}

/// Refuses `key` (read from `path`) when the ledger's lines are signed by another key: every
/// line it signed would make the chain fail verification. Two replicas with keys of their own
/// on one database, or a key file restored from the wrong backup, are stopped here.
pub fn check_key_in_force(b: &mut dyn Backend, key: &SigningKey, path: &str) -> Result<(), LedgerError> {
    let ours = key.verifying_key().to_bytes();
    match key_in_force(b)? {
        Some((seq, theirs)) if theirs != ours => Err(LedgerError::Key {
            path: path.to_string(),
            reason: format!(
                "is operator key {} but this ledger is signed by key {} (entry {seq}); every replica must run with the same key \
                 (the chart mounts one Secret): point --ledger-key-file at that key, or, to change keys, stop the operator and run \
                 `kommune-operator ledger rotate-key` with the old key",
                fingerprint(&ours),
                fingerprint(&theirs)
            ),
        }),
        _ => Ok(()),
    }
}

/// What a rotation appended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotated {
    /// The key-rotation line, signed by the old key.
    pub rotation_seq: u64,
    /// The checkpoint after it, signed by the new key: the chain's head stays signed.
    pub checkpoint_seq: u64,
    pub old: [u8; 32],
    pub new: [u8; 32],
}

/// Appends a key rotation from `old` to `new` (signed by `old`, which must be the key in force)
/// and a checkpoint signed by `new`, in one transaction. The caller holds the ledger
/// exclusively (no operator runs on it).
pub fn rotate(b: &mut dyn Backend, old: &SigningKey, old_path: &str, new: &SigningKey, recorded_ms: i64) -> Result<Rotated, LedgerError> {
    check_key_in_force(b, old, old_path)?;
    let (old_pub, new_pub) = (old.verifying_key().to_bytes(), new.verifying_key().to_bytes());
    if old_pub == new_pub {
        return Err(LedgerError::Key { path: old_path.to_string(), reason: "is the new key too: give a different --new-key-file".into() });
    }
    let mut state = load_state(b)?;
    let mut batch = Batch::default();
    let rotation_seq = state.rotate_key(&mut batch, recorded_ms, old, &new.verifying_key());
    let checkpoint_seq = state.checkpoint(&mut batch, recorded_ms, new);
    b.append(&batch.entries, &batch.rejected, None)?;
    Ok(Rotated { rotation_seq, checkpoint_seq, old: old_pub, new: new_pub })
}
