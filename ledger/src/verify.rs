//! Whole-chain verification: every hash link, every receipt signature (batched, on all cores),
//! every cost, every checkpoint, uniqueness of receipts, and registered keys. Streams: entries
//! are pushed one at a time, so a million-entry ledger is never held in memory.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kommune_proto::receipt;
use sha2::{Digest, Sha256};

use crate::check::{KeyCache, SignedMessage, signed_message, verify_signatures};
use crate::entry::{
    Checkpoint, Entry, EntryKind, GENESIS, NodeTotal, UsageFigures, checkpoint_signature_ok, fingerprint, node_totals_sha256, operator_signature_ok,
};
use crate::payout::Settlement;
use kommune_core::pricing::{self, Micros};

/// The first entry that does not verify, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("entry {seq}: {reason}")]
pub struct BadEntry {
    pub seq: u64,
    pub reason: String,
}

fn bad(seq: u64, reason: impl Into<String>) -> BadEntry {
    BadEntry { seq, reason: reason.into() }
}

/// What a successful verification found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    pub entries: u64,
    pub receipts: u64,
    pub checkpoints: u64,
    pub node_keys: u64,
    pub reversals: u64,
    pub statements: u64,
    pub paid: u64,
    pub key_rotations: u64,
    /// Sum of all receipt costs (reversed ones included: checkpoints sum what was metered).
    pub total: Micros,
    /// Sum of the reversed receipts' costs: what is not paid of `total`.
    pub reversed: Micros,
    /// Per provider node.
    pub per_node: BTreeMap<String, NodeTotal>,
    /// The last entry's seq and hash (hex; empty for an empty ledger).
    pub head_seq: u64,
    pub head_hash: String,
    /// The last checkpoint's seq (0 when none).
    pub last_checkpoint_seq: u64,
    /// sha256 fingerprints (hex) of the operator keys that signed checkpoints.
    pub operator_keys: BTreeSet<String>,
    /// The operator key in force at the head (after every rotation), sha256 hex.
    pub operator_key: String,
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "ledger OK: {} entries ({} receipts, {} checkpoints, {} node keys)", self.entries, self.receipts, self.checkpoints, self.node_keys)?;
        writeln!(f, "settlement: {} reversals, {} statements, {} paid, {} key rotations", self.reversals, self.statements, self.paid, self.key_rotations)?;
        writeln!(f, "total credits: {} metered, {} reversed", self.total, self.reversed)?;
        for (node, t) in &self.per_node {
            writeln!(f, "  {node}: {} credits from {} receipts", t.total, t.receipts)?;
        }
        writeln!(f, "head: entry {} hash {}", self.head_seq, if self.head_hash.is_empty() { "-" } else { &self.head_hash })?;
        writeln!(f, "last checkpoint: entry {}", self.last_checkpoint_seq)?;
        for k in &self.operator_keys {
            writeln!(f, "operator ledger key sha256: {k}")?;
        }
        if !self.operator_key.is_empty() {
            writeln!(f, "operator ledger key now: {}", self.operator_key)?;
        }
        Ok(())
    }
}

/// Options for [`ChainVerifier`].
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// When set, the operator key with this sha256 (hex) must be the ledger's key, or one a
    /// chain of key rotations from the first key leads to.
    pub operator_key_sha256: Option<String>,
    /// Accept entries after the last checkpoint (which no operator signature covers). Off by
    /// default: a truncated or extended export must not verify.
    pub accept_unsigned_tail: bool,
    /// Signature-checking threads; 0 means one per core.
    pub threads: usize,
}

/// Signatures are checked this many at a time (one batch verification each).
const SIG_CHUNK: usize = 256;

type SigJob = (u64, Vec<(u64, SignedMessage)>);

struct SigPool {
    jobs: Option<SyncSender<SigJob>>,
    results: Receiver<(u64, Option<u64>)>,
    workers: Vec<JoinHandle<()>>,
    sent: u64,
}

impl SigPool {
    fn new(threads: usize) -> SigPool {
        let (jobs, rx) = sync_channel::<SigJob>(threads * 4);
        let rx = Arc::new(Mutex::new(rx));
        let (res_tx, results) = sync_channel(1 << 16);
        let workers = (0..threads)
            .map(|_| {
                let rx = rx.clone();
                let res_tx = res_tx.clone();
                std::thread::spawn(move || {
                    loop {
                        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok((id, chunk)) = job else { return };
                        let refs: Vec<&SignedMessage> = chunk.iter().map(|(_, m)| m).collect();
                        let first_bad = verify_signatures(&refs).iter().position(|ok| !ok).map(|i| chunk[i].0);
                        if res_tx.send((id, first_bad)).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        SigPool { jobs: Some(jobs), results, workers, sent: 0 }
    }

    fn send(&mut self, chunk: Vec<(u64, SignedMessage)>) {
        if let Some(j) = &self.jobs {
            // Workers only stop when the sender is dropped, so this send cannot fail.
            let _ = j.send((self.sent, chunk));
            self.sent += 1;
        }
    }

    /// Waits for every chunk and returns the smallest seq whose signature failed.
    fn finish(mut self) -> Option<u64> {
        self.jobs = None;
        let mut first: Option<u64> = None;
        for _ in 0..self.sent {
            match self.results.recv() {
                Ok((_, Some(seq))) => first = Some(first.map_or(seq, |f| f.min(seq))),
                Ok((_, None)) => {}
                Err(_) => break,
            }
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        first
    }
}

fn key128(parts: &[&[u8]]) -> u128 {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u32).to_be_bytes());
        h.update(p);
    }
    u128::from_be_bytes(h.finalize()[..16].try_into().expect("16 bytes"))
}

/// Verifies a chain pushed entry by entry, in seq order.
pub struct ChainVerifier {
    opts: VerifyOptions,
    report: VerifyReport,
    prev: [u8; 32],
    next_seq: u64,
    keys: HashMap<String, HashSet<[u8; 32]>>,
    receipt_keys: HashSet<u128>,
    attempts: HashSet<u128>,
    pending: Vec<(u64, SignedMessage)>,
    key_cache: KeyCache,
    pool: SigPool,
    failed: Option<BadEntry>,
    settlement: Settlement,
    /// The operator key in force, once an entry names it; each key with the seq naming it.
    current_key: Option<[u8; 32]>,
    key_path: Vec<([u8; 32], u64)>,
    /// The first unsigned (pre-owner) node-key line since the last checkpoint.
    unsigned_node_key: Option<(u64, String)>,
}

impl ChainVerifier {
    /// A verifier for a chain starting at entry 1.
    pub fn new(opts: VerifyOptions) -> ChainVerifier {
        let threads = if opts.threads == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { opts.threads };
        ChainVerifier {
            opts,
            report: VerifyReport::default(),
            prev: GENESIS,
            next_seq: 1,
            keys: HashMap::new(),
            receipt_keys: HashSet::new(),
            attempts: HashSet::new(),
            pending: Vec::with_capacity(SIG_CHUNK),
            key_cache: KeyCache::default(),
            pool: SigPool::new(threads.max(1)),
            failed: None,
            settlement: Settlement::default(),
            current_key: None,
            key_path: vec![],
            unsigned_node_key: None,
        }
    }

    /// Checks the next entry. After the first error, further entries are ignored and the
    /// error is returned again.
    pub fn push(&mut self, e: &Entry) -> Result<(), BadEntry> {
        if let Some(f) = &self.failed {
            return Err(f.clone());
        }
        let r = self.check(e);
        if let Err(b) = &r {
            self.failed = Some(b.clone());
        }
        r
    }

    fn check(&mut self, e: &Entry) -> Result<(), BadEntry> {
        if e.seq != self.next_seq {
            let seq = self.next_seq;
            return Err(bad(seq, format!("is missing (the next stored entry is {})", e.seq)));
        }
        let seq = e.seq;
        if e.prev_hash != self.prev {
            return Err(bad(
                seq,
                format!("prev_hash {} does not link to the hash of entry {} ({})", hex::encode(&e.prev_hash), seq - 1, hex::encode(self.prev)),
            ));
        }
        let computed = e.compute_hash();
        if e.hash != computed {
            return Err(bad(seq, format!("hash does not match its content (stored {}, computed {})", hex::encode(&e.hash), hex::encode(computed))));
        }
        match e.kind {
            EntryKind::Receipt => self.check_receipt(e)?,
            EntryKind::Checkpoint => self.check_checkpoint(e)?,
            EntryKind::NodeKey => self.check_node_key(e)?,
            EntryKind::KeyRotation => self.check_rotation(e)?,
            EntryKind::Reversal | EntryKind::Statement | EntryKind::Paid => {
                self.signer(e)?;
                if !self.current_key.is_some_and(|k| operator_signature_ok(e, &k)) {
                    return Err(bad(seq, format!("{} signature does not verify with the operator key", e.kind.name())));
                }
                match e.kind {
                    EntryKind::Reversal => {
                        self.report.reversals += 1;
                        self.report.reversed = self.report.reversed.saturating_add(e.cost);
                    }
                    EntryKind::Statement => self.report.statements += 1,
                    _ => self.report.paid += 1,
                }
            }
        }
        self.settlement.apply(e).map_err(|m| bad(seq, m))?;
        self.prev = computed;
        self.next_seq += 1;
        self.report.entries += 1;
        self.report.head_seq = seq;
        Ok(())
    }

    fn check_receipt(&mut self, e: &Entry) -> Result<(), BadEntry> {
        let seq = e.seq;
        let body = receipt::decode_body(&e.body).map_err(|err| bad(seq, format!("receipt {err}")))?;
        if (body.node.as_str(), body.epoch, body.sequence, body.attempt_id.as_str()) != (e.node.as_str(), e.epoch, e.sequence, e.attempt_id.as_str()) {
            return Err(bad(seq, "node, epoch, sequence or attempt id differ from the signed receipt body"));
        }
        let usage = body.usage.unwrap_or_default();
        if UsageFigures::from(&usage) != e.usage {
            return Err(bad(seq, "usage figures differ from the signed receipt body"));
        }
        let cost = pricing::cost(&usage, &e.rates);
        if cost != e.cost {
            return Err(bad(seq, format!("cost {} does not equal the usage priced at the recorded rates ({cost})", e.cost)));
        }
        let key: [u8; 32] = e.public_key.as_slice().try_into().map_err(|_| bad(seq, "node public key is not 32 bytes"))?;
        if !self.keys.get(&e.node).is_some_and(|k| k.contains(&key)) {
            return Err(bad(seq, format!("key {} is not registered for node {} before this entry", fingerprint(&key), e.node)));
        }
        if !self.receipt_keys.insert(key128(&[e.node.as_bytes(), &e.epoch.to_be_bytes(), &e.sequence.to_be_bytes()])) {
            return Err(bad(seq, format!("node {} epoch {} sequence {} is counted twice", e.node, e.epoch, e.sequence)));
        }
        if !self.attempts.insert(key128(&[e.attempt_id.as_bytes()])) {
            return Err(bad(seq, format!("attempt {} is metered twice", e.attempt_id)));
        }
        let msg = signed_message(&e.body, &e.signature, &key, &mut self.key_cache).map_err(|rej| bad(seq, rej.to_string()))?;
        self.pending.push((seq, msg));
        if self.pending.len() >= SIG_CHUNK {
            let chunk = std::mem::replace(&mut self.pending, Vec::with_capacity(SIG_CHUNK));
            self.pool.send(chunk);
        }
        self.report.receipts += 1;
        // Saturating, as the writer sums them into its checkpoints: a total past u64::MAX is
        // shown as u64::MAX, never an error, so verification completes whatever is stored.
        self.report.total = self.report.total.saturating_add(cost);
        let t = self.report.per_node.entry(e.node.clone()).or_default();
        t.total = t.total.saturating_add(cost);
        t.receipts += 1;
        Ok(())
    }

    fn check_checkpoint(&mut self, e: &Entry) -> Result<(), BadEntry> {
        let seq = e.seq;
        let cp = Checkpoint::parse(&e.body).ok_or_else(|| bad(seq, "checkpoint payload has the wrong size"))?;
        if !checkpoint_signature_ok(e) {
            return Err(bad(seq, "checkpoint signature does not verify with the operator key it names"));
        }
        let fp = fingerprint(&e.public_key);
        self.signer(e)?;
        let want = Checkpoint {
            upto_seq: seq - 1,
            head_hash: self.prev,
            entry_count: seq - 1,
            receipt_count: self.report.receipts,
            total: self.report.total,
            node_totals_sha256: node_totals_sha256(&self.report.per_node),
        };
        if cp != want {
            return Err(bad(seq, format!("checkpoint does not match the chain before it (it says {cp:?}, the chain gives {want:?})")));
        }
        self.report.operator_keys.insert(fp);
        self.report.checkpoints += 1;
        self.unsigned_node_key = None;
        self.report.last_checkpoint_seq = seq;
        Ok(())
    }

    fn check_node_key(&mut self, e: &Entry) -> Result<(), BadEntry> {
        let key: [u8; 32] = e.public_key.as_slice().try_into().map_err(|_| bad(e.seq, "node public key is not 32 bytes"))?;
        if e.node.is_empty() || ed25519_dalek::VerifyingKey::from_bytes(&key).is_err() {
            return Err(bad(e.seq, "node key registration names no node or an invalid ed25519 key"));
        }
        if !self.keys.entry(e.node.clone()).or_default().insert(key) {
            return Err(bad(e.seq, format!("key {} is registered twice for node {}", fingerprint(&key), e.node)));
        }
        if e.signature.is_empty() {
            // Written before node keys were signed: trusted only under a later checkpoint.
            self.unsigned_node_key.get_or_insert((e.seq, e.node.clone()));
        } else {
            let what = format!("node key registration of {}", e.node);
            let op = e.operator_signer().ok_or_else(|| bad(e.seq, format!("{what} carries no operator signature and key")))?;
            self.signer_key(op, e.seq, &what)?;
            if !operator_signature_ok(e, &op) {
                return Err(bad(e.seq, format!("{what} is not signed by the operator key {}", fingerprint(&op))));
            }
        }
        self.report.node_keys += 1;
        Ok(())
    }

    /// Checks that `e` names the operator key in force (learning it from the first entry that
    /// names one).
    fn signer(&mut self, e: &Entry) -> Result<[u8; 32], BadEntry> {
        let key: [u8; 32] = e.public_key.as_slice().try_into().map_err(|_| bad(e.seq, "operator public key is not 32 bytes"))?;
        self.signer_key(key, e.seq, e.kind.name())?;
        Ok(key)
    }

    fn signer_key(&mut self, key: [u8; 32], seq: u64, what: &str) -> Result<(), BadEntry> {
        match self.current_key {
            Some(k) if k == key => Ok(()),
            Some(k) => Err(bad(
                seq,
                format!(
                    "{what} is signed by operator key {}, but the ledger's key here is {} (a new key needs a key-rotation entry signed by the old one)",
                    fingerprint(&key),
                    fingerprint(&k)
                ),
            )),
            None => {
                self.current_key = Some(key);
                self.key_path.push((key, seq));
                Ok(())
            }
        }
    }

    fn check_rotation(&mut self, e: &Entry) -> Result<(), BadEntry> {
        let old = self.signer(e)?;
        if !operator_signature_ok(e, &old) {
            return Err(bad(e.seq, format!("key rotation is not signed by the old operator key {}", fingerprint(&old))));
        }
        let new: [u8; 32] = e.body.as_slice().try_into().map_err(|_| bad(e.seq, "key rotation names no 32-byte key"))?;
        if ed25519_dalek::VerifyingKey::from_bytes(&new).is_err() {
            return Err(bad(e.seq, "key rotation names an invalid ed25519 key"));
        }
        self.current_key = Some(new);
        self.key_path.push((new, e.seq));
        self.report.key_rotations += 1;
        Ok(())
    }

    /// Waits for the outstanding signature checks and returns the report, or the first bad
    /// entry (the lowest seq among signature and structural failures).
    pub fn finish(mut self) -> Result<VerifyReport, BadEntry> {
        let chunk = std::mem::take(&mut self.pending);
        if !chunk.is_empty() {
            self.pool.send(chunk);
        }
        let final_checks = self.final_checks();
        let sig_bad = self.pool.finish().map(|seq| bad(seq, "receipt signature does not verify with the node's registered key"));
        let first = match (sig_bad, self.failed.take()) {
            (Some(a), Some(b)) => Some(if a.seq <= b.seq { a } else { b }),
            (a, b) => a.or(b),
        };
        if let Some(f) = first {
            return Err(f);
        }
        final_checks?;
        self.report.operator_key = self.current_key.map(|k| fingerprint(&k)).unwrap_or_default();
        self.report.head_hash = if self.report.entries == 0 { String::new() } else { hex::encode(self.prev) };
        Ok(self.report)
    }
}

impl ChainVerifier {
    /// What can only be said once the whole chain was read: the tail is covered, every node
    /// key is signed or covered, the pinned key is the ledger's.
    fn final_checks(&self) -> Result<(), BadEntry> {
        if let Some((seq, node)) = &self.unsigned_node_key {
            return Err(bad(*seq, format!("node key registration of {node} is not signed by the operator and no checkpoint covers it")));
        }
        let head = self.report.head_seq;
        if !self.opts.accept_unsigned_tail && head > self.report.last_checkpoint_seq {
            let from = self.report.last_checkpoint_seq + 1;
            return Err(bad(
                from,
                format!(
                    "entries {from}..={head} come after the last checkpoint ({}) and no operator signature covers them: the ledger may be truncated or extended (pass --accept-unsigned-tail to check them anyway)",
                    if self.report.last_checkpoint_seq == 0 { "there is none".to_string() } else { format!("entry {}", self.report.last_checkpoint_seq) }
                ),
            ));
        }
        if let Some(want) = &self.opts.operator_key_sha256
            && !self.key_path.iter().any(|(k, _)| want.eq_ignore_ascii_case(&fingerprint(k)))
        {
            let (seq, got) = self.key_path.first().map_or((head.max(1), "no key".to_string()), |(k, s)| (*s, fingerprint(k)));
            return Err(bad(seq, format!("the ledger is signed by operator key {got}, not the expected {want} (and no key rotation leads to it)")));
        }
        Ok(())
    }
}

/// Verifies a whole chain given in seq order.
pub fn verify<'a>(entries: impl IntoIterator<Item = &'a Entry>, opts: VerifyOptions) -> Result<VerifyReport, BadEntry> {
    let mut v = ChainVerifier::new(opts);
    for e in entries {
        if v.push(e).is_err() {
            break;
        }
    }
    v.finish()
}
