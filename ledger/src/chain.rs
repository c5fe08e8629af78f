//! The writer's view of the chain head and running totals, and the decision for each checked
//! receipt: append, duplicate, or reject. Pure apart from what the caller looked up.

use std::collections::{BTreeMap, HashMap, HashSet};

use ed25519_dalek::SigningKey;
use sha2::{Digest, Sha256};

use crate::check::{ReceiptInput, Rejection, VerifiedReceipt};
use crate::entry::{CHECKPOINT_EVERY, Checkpoint, Entry, EntryKind, GENESIS, NodeTotal, UsageFigures, node_totals_sha256};
use crate::records::{Existing, REJECTED_BODY_PREFIX, REJECTED_NAME_MAX, REJECTED_REASON_MAX, RejectedReceipt, capped};
use kommune_core::pricing::Micros;

/// What happened to a submitted receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Appended as ledger entry `seq` with entry hash `hash`.
    Accepted { seq: u64, hash: [u8; 32], cost: Micros },
    /// The same receipt is already entry `seq`: treat as accepted, so the agent stops resending.
    Duplicate { seq: u64, hash: [u8; 32], cost: Micros },
    /// Refused and recorded with the reason; the agent should drop it. `kind` is the bounded
    /// name of the rule it broke ([`Rejection::kind`]), for metrics.
    Rejected { reason: String, kind: &'static str },
}

/// The chain's head and totals as the writer keeps them between batches.
#[derive(Debug, Clone, Default)]
pub struct ChainState {
    pub head_seq: u64,
    pub head_hash: [u8; 32],
    pub since_checkpoint: u64,
    pub head_is_checkpoint: bool,
    pub receipts: u64,
    pub total: Micros,
    pub per_node: BTreeMap<String, NodeTotal>,
    pub keys: HashMap<String, HashSet<[u8; 32]>>,
}

/// The digest identifying a rejected receipt: who sent which bytes.
pub fn rejected_digest(session_node: &str, body: &[u8], signature: &[u8]) -> Vec<u8> {
    let mut h = Sha256::new();
    for p in [session_node.as_bytes(), body, signature] {
        h.update((p.len() as u32).to_be_bytes());
        h.update(p);
    }
    h.finalize().to_vec()
}

/// A batch being assembled: new entries, rejected records and what this batch already used.
#[derive(Default)]
pub struct Batch {
    pub entries: Vec<Entry>,
    pub rejected: Vec<RejectedReceipt>,
    rejected_at: HashMap<Vec<u8>, usize>,
    receipt_keys: HashMap<(String, u64, u64), Existing>,
    attempts: HashMap<String, u64>,
}

impl ChainState {
    /// Seals `entry` after the head and adds it to the batch; returns its seq.
    pub fn push(&mut self, batch: &mut Batch, entry: Entry) -> u64 {
        let e = entry.seal(self.head_hash);
        self.head_seq = e.seq;
        self.head_hash = e.hash32().expect("sealed entries carry a 32-byte hash");
        self.head_is_checkpoint = e.kind == EntryKind::Checkpoint;
        self.since_checkpoint = if self.head_is_checkpoint { 0 } else { self.since_checkpoint + 1 };
        batch.entries.push(e);
        self.head_seq
    }

    /// Appends a checkpoint signed with `key`; returns its seq.
    pub fn checkpoint(&mut self, batch: &mut Batch, recorded_ms: i64, key: &SigningKey) -> u64 {
        let cp = Checkpoint {
            upto_seq: self.head_seq,
            head_hash: if self.head_seq == 0 { GENESIS } else { self.head_hash },
            entry_count: self.head_seq,
            receipt_count: self.receipts,
            total: self.total,
            node_totals_sha256: node_totals_sha256(&self.per_node),
        };
        self.push(batch, Entry::checkpoint(self.head_seq + 1, recorded_ms, &cp, key))
    }

    /// Appends a node key naming its owner, signed by the operator, unless it is registered
    /// already; returns whether it was new.
    pub fn register_key(&mut self, batch: &mut Batch, node: &str, key: [u8; 32], owner: &str, recorded_ms: i64, operator: &SigningKey) -> bool {
        if !self.keys.entry(node.to_string()).or_default().insert(key) {
            return false;
        }
        self.push(batch, Entry::signed_node_key(self.head_seq + 1, recorded_ms, node, key, owner, operator));
        true
    }

    /// Appends a key rotation from `old` (which signs it) to `new`; returns its seq.
    pub fn rotate_key(&mut self, batch: &mut Batch, recorded_ms: i64, old: &SigningKey, new: &ed25519_dalek::VerifyingKey) -> u64 {
        let line = Entry::operator_line(self.head_seq + 1, EntryKind::KeyRotation, recorded_ms, new.to_bytes().to_vec(), old).signed_by(old);
        self.push(batch, line)
    }

    fn reject(batch: &mut Batch, input: &ReceiptInput, why: &Rejection) -> Verdict {
        let reason = why.to_string();
        let kind = why.kind();
        let r = &input.receipt;
        let digest = rejected_digest(&input.session_node, &r.body, &r.signature);
        if let Some(&i) = batch.rejected_at.get(&digest) {
            let prev = &mut batch.rejected[i];
            prev.times += 1;
            prev.last_ms = prev.last_ms.max(input.received_ms);
            return Verdict::Rejected { reason, kind };
        }
        let body = kommune_proto::receipt::decode(r).ok();
        batch.rejected_at.insert(digest.clone(), batch.rejected.len());
        // Kept as a bounded digest: a node sending oversized junk costs a few hundred bytes per
        // distinct receipt, and the store keeps at most REJECTED_KEPT_PER_NODE of them.
        batch.rejected.push(RejectedReceipt {
            digest,
            first_ms: input.received_ms,
            last_ms: input.received_ms,
            times: 1,
            session_node: input.session_node.clone(),
            node: body.as_ref().map(|b| capped(&b.node, REJECTED_NAME_MAX)).unwrap_or_default(),
            epoch: body.as_ref().map_or(0, |b| b.epoch),
            sequence: body.as_ref().map_or(0, |b| b.sequence),
            attempt_id: body.as_ref().map(|b| capped(&b.attempt_id, REJECTED_NAME_MAX)).unwrap_or_default(),
            body_bytes: r.body.len() as u64,
            signature_bytes: r.signature.len() as u64,
            body_prefix: r.body[..r.body.len().min(REJECTED_BODY_PREFIX)].to_vec(),
            reason: capped(&reason, REJECTED_REASON_MAX),
        });
        Verdict::Rejected { reason, kind }
    }

    /// Decides one checked receipt. `in_db` and `attempt_in_db` are what the store holds for its
    /// (node, epoch, sequence) and attempt id (looked up before the batch).
    pub fn decide(
        &mut self,
        batch: &mut Batch,
        input: &ReceiptInput,
        checked: &Result<VerifiedReceipt, Rejection>,
        in_db: Option<&Existing>,
        attempt_in_db: Option<u64>,
        key: &SigningKey,
    ) -> Verdict {
        let v = match checked {
            Ok(v) => v,
            Err(why) => return Self::reject(batch, input, why),
        };
        let b = &v.body;
        if !self.keys.get(&b.node).is_some_and(|k| k.contains(&input.node_public_key)) {
            return Self::reject(batch, input, &Rejection::UnregisteredKey { node: b.node.clone() });
        }
        let rkey = (b.node.clone(), b.epoch, b.sequence);
        if let Some(existing) = batch.receipt_keys.get(&rkey).or(in_db) {
            if existing.body == input.receipt.body {
                return Verdict::Duplicate { seq: existing.seq, hash: existing.hash, cost: existing.cost };
            }
            let why = Rejection::SequenceReused { node: b.node.clone(), epoch: b.epoch, sequence: b.sequence, seq: existing.seq };
            return Self::reject(batch, input, &why);
        }
        if let Some(seq) = batch.attempts.get(&b.attempt_id).copied().or(attempt_in_db) {
            return Self::reject(batch, input, &Rejection::AttemptAlreadyMetered { attempt_id: b.attempt_id.clone(), seq });
        }
        let a = &input.attempt;
        let entry = Entry {
            seq: self.head_seq + 1,
            kind: EntryKind::Receipt,
            recorded_ms: input.received_ms,
            node: b.node.clone(),
            epoch: b.epoch,
            sequence: b.sequence,
            attempt_id: b.attempt_id.clone(),
            job_uid: a.job_uid.clone(),
            job_key: a.job_key.clone(),
            body: input.receipt.body.clone(),
            signature: input.receipt.signature.clone(),
            public_key: input.node_public_key.to_vec(),
            rates: input.rates,
            cost: v.cost,
            usage: UsageFigures::from(&v.usage),
            prev_hash: vec![],
            hash: vec![],
        };
        let seq = self.push(batch, entry);
        let hash = self.head_hash;
        self.receipts += 1;
        self.total = self.total.saturating_add(v.cost);
        let t = self.per_node.entry(b.node.clone()).or_default();
        t.total = t.total.saturating_add(v.cost);
        t.receipts += 1;
        batch.receipt_keys.insert(rkey, Existing { seq, body: input.receipt.body.clone(), cost: v.cost, hash });
        batch.attempts.insert(b.attempt_id.clone(), seq);
        if self.since_checkpoint >= CHECKPOINT_EVERY {
            self.checkpoint(batch, input.received_ms, key);
        }
        Verdict::Accepted { seq, hash, cost: v.cost }
    }
}
