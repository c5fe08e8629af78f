//! One ledger line and its hash: a fixed, length-prefixed binary layout so every auditor hashes
//! the same bytes. Checkpoints (operator-signed summaries) and node-key registrations are lines
//! of the same chain. Pure: no I/O.

use std::collections::BTreeMap;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use kommune_proto::v1::Usage;
use sha2::{Digest, Sha256};

use kommune_core::pricing::{Micros, Rates};

/// The `prev_hash` of entry 1.
pub const GENESIS: [u8; 32] = [0; 32];

/// A checkpoint is appended after this many entries (and on demand).
pub const CHECKPOINT_EVERY: u64 = 1024;

/// Domain separation for entry hashes.
pub const ENTRY_CONTEXT: &[u8] = b"kommune.ledger.entry.v1\0";

/// Domain separation for checkpoint signatures made with the operator's ledger key.
pub const CHECKPOINT_CONTEXT: &[u8] = b"kommune.ledger.checkpoint.v1\0";

/// Domain separation for the other operator-signed entries (node keys, reversals, statements,
/// paid marks, key rotations).
pub const OPERATOR_CONTEXT: &[u8] = b"kommune.ledger.operator.v1\0";

/// What a ledger line records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EntryKind {
    /// A verified, priced usage receipt: a payout line.
    Receipt = 0,
    /// An operator-signed summary of everything before it.
    Checkpoint = 1,
    /// A node's public key, registered at join; receipts of that node verify against it. The
    /// body names the node's owner; the operator signs it (entries before this rule are unsigned
    /// and trusted only under a checkpoint).
    NodeKey = 2,
    /// The operator takes back an earlier receipt (outvoted, disproved): it is not paid.
    Reversal = 3,
    /// One owner's settlement for a period, signed by the operator.
    Statement = 4,
    /// A statement was paid outside the ledger, with the payment's reference.
    Paid = 5,
    /// The operator's ledger key changes; signed by the old key.
    KeyRotation = 6,
}

impl EntryKind {
    /// The stored code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The kind for a stored code, if any.
    pub fn from_code(code: i64) -> Option<EntryKind> {
        match code {
            0 => Some(EntryKind::Receipt),
            1 => Some(EntryKind::Checkpoint),
            2 => Some(EntryKind::NodeKey),
            3 => Some(EntryKind::Reversal),
            4 => Some(EntryKind::Statement),
            5 => Some(EntryKind::Paid),
            6 => Some(EntryKind::KeyRotation),
            _ => None,
        }
    }

    /// A lower-case name for exports.
    pub fn name(self) -> &'static str {
        match self {
            EntryKind::Receipt => "receipt",
            EntryKind::Checkpoint => "checkpoint",
            EntryKind::NodeKey => "node-key",
            EntryKind::Reversal => "reversal",
            EntryKind::Statement => "statement",
            EntryKind::Paid => "paid",
            EntryKind::KeyRotation => "key-rotation",
        }
    }

    /// The kind named `name` (as [`EntryKind::name`] writes it).
    pub fn from_name(name: &str) -> Option<EntryKind> {
        (0..=6).filter_map(EntryKind::from_code).find(|k| k.name() == name)
    }

    /// Whether the operator signs entries of this kind with [`operator_message`] (checkpoints
    /// have their own older layout; receipts are signed by nodes).
    pub fn operator_signed(self) -> bool {
        !matches!(self, EntryKind::Receipt | EntryKind::Checkpoint)
    }
}

/// The usage figures of a receipt, kept beside the body so totals are a SUM in the database;
/// verification checks they equal the signed body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UsageFigures {
    pub wall_millis: u64,
    pub cpu_micros: u64,
    pub memory_peak_bytes: u64,
    pub memory_mib_millis: u64,
    pub wasm_fuel: u64,
    pub gpu_millis: u64,
    pub output_bytes: u64,
}

impl From<&Usage> for UsageFigures {
    fn from(u: &Usage) -> Self {
        UsageFigures {
            wall_millis: u.wall_millis,
            cpu_micros: u.cpu_micros,
            memory_peak_bytes: u.memory_peak_bytes,
            memory_mib_millis: u.memory_mib_millis,
            wasm_fuel: u.wasm_fuel,
            gpu_millis: u.gpu_millis,
            output_bytes: u.output_bytes,
        }
    }
}

/// One ledger line. Byte fields are kept as stored (not fixed arrays) so that a damaged row
/// still reads and verification can say what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Position in the chain, from 1.
    pub seq: u64,
    pub kind: EntryKind,
    /// When the operator recorded it, Unix ms.
    pub recorded_ms: i64,
    /// The provider node (receipts, node keys); empty for checkpoints.
    pub node: String,
    /// The receipt's (epoch, sequence); 0 for other kinds.
    pub epoch: u64,
    pub sequence: u64,
    /// The metered attempt and its job; empty for other kinds.
    pub attempt_id: String,
    pub job_uid: String,
    pub job_key: String,
    /// Receipts: the signed ReceiptBody bytes. Checkpoints: the signed checkpoint payload.
    pub body: Vec<u8>,
    /// Receipts: the node's signature. Checkpoints: the operator's signature. Node keys: empty.
    pub signature: Vec<u8>,
    /// Receipts and node keys: the node's key. Checkpoints: the operator's ledger key.
    pub public_key: Vec<u8>,
    /// The effective rates the receipt was priced at.
    pub rates: Rates,
    /// The receipt's cost at `rates`.
    pub cost: Micros,
    /// The receipt's usage, as in the body.
    pub usage: UsageFigures,
    /// The hash of the entry before (GENESIS for entry 1).
    pub prev_hash: Vec<u8>,
    /// sha256(prev_hash || canonical bytes).
    pub hash: Vec<u8>,
}

struct Canon(Vec<u8>);

impl Canon {
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        // Lengths are bounded far below 4 GiB by the receipt and row limits; saturate anyway
        // so an absurd value still hashes to something that cannot match.
        self.0.extend_from_slice(&u32::try_from(b.len()).unwrap_or(u32::MAX).to_be_bytes());
        self.0.extend_from_slice(b);
    }
}

impl Entry {
    /// The fixed binary layout hashed into the chain: a context tag, then every field except
    /// `prev_hash` and `hash` in declaration order; integers as 8-byte big-endian, strings and
    /// byte strings as a 4-byte big-endian length and the bytes.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut c = Canon(Vec::with_capacity(256 + self.body.len()));
        c.0.extend_from_slice(ENTRY_CONTEXT);
        c.u64(self.seq);
        c.0.push(self.kind.code());
        c.u64(self.recorded_ms as u64);
        c.bytes(self.node.as_bytes());
        c.u64(self.epoch);
        c.u64(self.sequence);
        c.bytes(self.attempt_id.as_bytes());
        c.bytes(self.job_uid.as_bytes());
        c.bytes(self.job_key.as_bytes());
        c.bytes(&self.body);
        c.bytes(&self.signature);
        c.bytes(&self.public_key);
        for r in [self.rates.cpu_core_hour, self.rates.memory_gib_hour, self.rates.gpu_hour, self.rates.output_gib] {
            c.u64(r.0);
        }
        c.u64(self.cost.0);
        let u = &self.usage;
        for v in [u.wall_millis, u.cpu_micros, u.memory_peak_bytes, u.memory_mib_millis, u.wasm_fuel, u.gpu_millis, u.output_bytes] {
            c.u64(v);
        }
        c.0
    }

    /// The hash this entry should carry given its `prev_hash`.
    pub fn compute_hash(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(&self.prev_hash);
        h.update(self.canonical_bytes());
        h.finalize().into()
    }

    /// Fills in `prev_hash` and `hash` to chain this entry after `prev`.
    pub fn seal(mut self, prev: [u8; 32]) -> Entry {
        self.prev_hash = prev.to_vec();
        self.hash = self.compute_hash().to_vec();
        self
    }

    /// A blank line of `kind` at `seq`, for the builders below.
    fn blank(seq: u64, kind: EntryKind, recorded_ms: i64) -> Entry {
        Entry {
            seq,
            kind,
            recorded_ms,
            node: String::new(),
            epoch: 0,
            sequence: 0,
            attempt_id: String::new(),
            job_uid: String::new(),
            job_key: String::new(),
            body: vec![],
            signature: vec![],
            public_key: vec![],
            rates: Rates::default(),
            cost: Micros(0),
            usage: UsageFigures::default(),
            prev_hash: vec![],
            hash: vec![],
        }
    }

    /// A node-key registration line (unsealed).
    pub fn node_key(seq: u64, recorded_ms: i64, node: &str, key: [u8; 32]) -> Entry {
        Entry { node: node.to_string(), public_key: key.to_vec(), ..Entry::blank(seq, EntryKind::NodeKey, recorded_ms) }
    }

    /// A node-key line naming the node's owner, signed by the operator (unsealed). `public_key`
    /// holds the node's key, so the signature field carries the operator's 64-byte signature
    /// followed by the operator's 32-byte key: a verifier checks it without looking elsewhere.
    pub fn signed_node_key(seq: u64, recorded_ms: i64, node: &str, key: [u8; 32], owner: &str, operator: &SigningKey) -> Entry {
        let e = Entry { body: owner.as_bytes().to_vec(), ..Entry::node_key(seq, recorded_ms, node, key) };
        let mut e = e.signed_by(operator);
        e.signature.extend_from_slice(&operator.verifying_key().to_bytes());
        e
    }

    /// The operator key that signs this line: its public key, or for a node-key line the key
    /// after its signature (None when it has none).
    pub fn operator_signer(&self) -> Option<[u8; 32]> {
        match self.kind {
            EntryKind::NodeKey if self.signature.len() == 96 => self.signature[64..].try_into().ok(),
            EntryKind::NodeKey => None,
            _ => self.public_key.as_slice().try_into().ok(),
        }
    }

    /// An operator-made line of `kind` whose body is `body` and whose public key is the
    /// operator's (unsealed, unsigned: see [`Entry::signed_by`]).
    pub fn operator_line(seq: u64, kind: EntryKind, recorded_ms: i64, body: Vec<u8>, operator: &SigningKey) -> Entry {
        Entry { body, public_key: operator.verifying_key().to_bytes().to_vec(), ..Entry::blank(seq, kind, recorded_ms) }
    }

    /// Signs this line with `key` over [`operator_message`].
    pub fn signed_by(mut self, key: &SigningKey) -> Entry {
        self.signature = key.sign(&operator_message(&self)).to_bytes().to_vec();
        self
    }

    /// The owner a node-key line names (empty in lines written before owners were recorded:
    /// such a node is its own owner).
    pub fn owner(&self) -> String {
        match std::str::from_utf8(&self.body) {
            Ok(o) if !o.is_empty() => o.to_string(),
            _ => self.node.clone(),
        }
    }

    /// A checkpoint line signed with the operator's ledger key (unsealed).
    pub fn checkpoint(seq: u64, recorded_ms: i64, cp: &Checkpoint, key: &SigningKey) -> Entry {
        let body = cp.payload();
        let signature = key.sign(&checkpoint_message(&body)).to_bytes().to_vec();
        Entry { body, signature, public_key: key.verifying_key().to_bytes().to_vec(), ..Entry::blank(seq, EntryKind::Checkpoint, recorded_ms) }
    }

    /// The hash as an array, when it has the right length.
    pub fn hash32(&self) -> Option<[u8; 32]> {
        self.hash.as_slice().try_into().ok()
    }
}

/// What a checkpoint asserts about the chain before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// The last entry covered (the checkpoint itself is `upto_seq + 1`).
    pub upto_seq: u64,
    /// The hash of entry `upto_seq`.
    pub head_hash: [u8; 32],
    /// Entries covered (equals `upto_seq`).
    pub entry_count: u64,
    /// Receipts among them.
    pub receipt_count: u64,
    /// Sum of their costs.
    pub total: Micros,
    /// sha256 of the per-node totals, see [`node_totals_sha256`].
    pub node_totals_sha256: [u8; 32],
}

/// Size of a checkpoint payload.
pub const CHECKPOINT_PAYLOAD_LEN: usize = 8 + 32 + 8 + 8 + 8 + 32;

impl Checkpoint {
    /// Fixed layout: upto_seq, head_hash, entry_count, receipt_count, total, node_totals_sha256
    /// (integers 8-byte big-endian).
    pub fn payload(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(CHECKPOINT_PAYLOAD_LEN);
        b.extend_from_slice(&self.upto_seq.to_be_bytes());
        b.extend_from_slice(&self.head_hash);
        b.extend_from_slice(&self.entry_count.to_be_bytes());
        b.extend_from_slice(&self.receipt_count.to_be_bytes());
        b.extend_from_slice(&self.total.0.to_be_bytes());
        b.extend_from_slice(&self.node_totals_sha256);
        b
    }

    /// Parses a payload; None when it has the wrong size.
    pub fn parse(b: &[u8]) -> Option<Checkpoint> {
        if b.len() != CHECKPOINT_PAYLOAD_LEN {
            return None;
        }
        let u = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Some(Checkpoint {
            upto_seq: u(0),
            head_hash: b[8..40].try_into().expect("32 bytes"),
            entry_count: u(40),
            receipt_count: u(48),
            total: Micros(u(56)),
            node_totals_sha256: b[64..96].try_into().expect("32 bytes"),
        })
    }
}

/// The bytes a checkpoint signature covers.
pub fn checkpoint_message(payload: &[u8]) -> Vec<u8> {
    [CHECKPOINT_CONTEXT, payload].concat()
}

/// The bytes an operator signature covers: every field but the signature and the hashes, so it
/// binds the line's seq and kind as well as its body.
pub fn operator_message(e: &Entry) -> Vec<u8> {
    let unsigned = Entry { signature: vec![], prev_hash: vec![], hash: vec![], ..e.clone() };
    [OPERATOR_CONTEXT, &unsigned.canonical_bytes()].concat()
}

/// Checks an operator-signed line's signature against `key`.
pub fn operator_signature_ok(e: &Entry, key: &[u8; 32]) -> bool {
    let sig = if e.kind == EntryKind::NodeKey && e.signature.len() == 96 { &e.signature[..64] } else { &e.signature[..] };
    let (Ok(key), Ok(sig)) = (VerifyingKey::from_bytes(key), <[u8; 64]>::try_from(sig)) else {
        return false;
    };
    key.verify(&operator_message(e), &Signature::from_bytes(&sig)).is_ok()
}

/// Checks a checkpoint line's operator signature.
pub fn checkpoint_signature_ok(e: &Entry) -> bool {
    let (Ok(key), Ok(sig)) = (<[u8; 32]>::try_from(e.public_key.as_slice()), <[u8; 64]>::try_from(e.signature.as_slice())) else {
        return false;
    };
    let Ok(key) = VerifyingKey::from_bytes(&key) else {
        return false;
    };
    key.verify(&checkpoint_message(&e.body), &Signature::from_bytes(&sig)).is_ok()
}

/// Earnings of one node: total cost and how many receipts make it up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct NodeTotal {
    pub total: Micros,
    pub receipts: u64,
}

/// sha256 over the per-node totals sorted by node name: for each node its length-prefixed name,
/// total and receipt count (8-byte big-endian).
pub fn node_totals_sha256(totals: &BTreeMap<String, NodeTotal>) -> [u8; 32] {
    let mut h = Sha256::new();
    for (node, t) in totals {
        h.update((node.len() as u32).to_be_bytes());
        h.update(node.as_bytes());
        h.update(t.total.0.to_be_bytes());
        h.update(t.receipts.to_be_bytes());
    }
    h.finalize().into()
}

/// Hex sha256 of a public key: how keys are named to humans.
pub fn fingerprint(key: &[u8]) -> String {
    hex::encode(Sha256::digest(key))
}

impl EntryKind {
    /// Whether entries of this kind carry a payout.
    pub fn is_receipt(self) -> bool {
        self == EntryKind::Receipt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt_entry(seq: u64) -> Entry {
        Entry {
            node: "pn-1".into(),
            epoch: 1,
            sequence: seq,
            attempt_id: format!("a-{seq}"),
            job_uid: "u".into(),
            job_key: "ns/j".into(),
            body: vec![1, 2, 3],
            signature: vec![9; 64],
            public_key: vec![7; 32],
            cost: Micros(5),
            ..Entry::blank(seq, EntryKind::Receipt, 1000)
        }
    }

    #[test]
    fn canonical_bytes_are_unambiguous_between_adjacent_strings() {
        let a = Entry { job_uid: "ab".into(), job_key: "c".into(), ..receipt_entry(1) };
        let b = Entry { job_uid: "a".into(), job_key: "bc".into(), ..receipt_entry(1) };
        assert_ne!(a.canonical_bytes(), b.canonical_bytes());
        assert_ne!(a.seal(GENESIS).hash, b.seal(GENESIS).hash);
    }

    #[test]
    fn the_hash_covers_the_previous_hash_and_every_field() {
        let e = receipt_entry(1).seal(GENESIS);
        assert_eq!(e.hash, e.compute_hash().to_vec());
        assert_ne!(receipt_entry(1).seal([1; 32]).hash, e.hash);
        let variants = [
            Entry { seq: 2, ..e.clone() },
            Entry { kind: EntryKind::NodeKey, ..e.clone() },
            Entry { recorded_ms: 1001, ..e.clone() },
            Entry { node: "pn-2".into(), ..e.clone() },
            Entry { epoch: 2, ..e.clone() },
            Entry { sequence: 9, ..e.clone() },
            Entry { attempt_id: "x".into(), ..e.clone() },
            Entry { body: vec![1, 2, 4], ..e.clone() },
            Entry { signature: vec![8; 64], ..e.clone() },
            Entry { public_key: vec![6; 32], ..e.clone() },
            Entry { rates: Rates { gpu_hour: Micros(1), ..e.rates }, ..e.clone() },
            Entry { cost: Micros(6), ..e.clone() },
            Entry { usage: UsageFigures { output_bytes: 1, ..e.usage }, ..e.clone() },
        ];
        for v in variants {
            assert_ne!(v.compute_hash().to_vec(), e.hash, "{v:?}");
        }
    }

    #[test]
    fn a_checkpoint_round_trips_and_its_signature_binds_its_payload() {
        let key = SigningKey::from_bytes(&[4; 32]);
        let cp = Checkpoint { upto_seq: 7, head_hash: [3; 32], entry_count: 7, receipt_count: 5, total: Micros(99), node_totals_sha256: [8; 32] };
        assert_eq!(Checkpoint::parse(&cp.payload()), Some(cp));
        let e = Entry::checkpoint(8, 5, &cp, &key);
        assert!(checkpoint_signature_ok(&e));
        let mut bad = e.clone();
        bad.body[60] ^= 1;
        assert!(!checkpoint_signature_ok(&bad));
        assert_eq!(Checkpoint::parse(&bad.body[1..]), None);
    }
}
